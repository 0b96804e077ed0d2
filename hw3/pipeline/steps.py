"""Running one pipeline step: print what it runs and where it writes, run it from the repository root, and skip it
when it finished before with the same command and the same inputs.

RESULTS/steps.json records each finished step: its command, and the sha256 of the files it reads that an earlier step
made (a checkpoint, a per-image CSV). A step whose outputs all exist and whose record matches is skipped, with a line
saying so; any other step runs, and says so first when it replaces outputs that another command or other inputs made.
Steps that decide for themselves (p2_train.py: "nothing to do" for a finished run, a refusal for another one) and
cheap ones (the report) always run.
"""
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from hw3.common.errors import UserError
from hw3.common.files import REPO_ROOT, read_json, sha256_file, write_json_atomically


class StepFailed(UserError):
    pass


@dataclass
class Step:
    title: str
    command: List[str]  # run from the repository root; "python3" is this Python
    outputs: List[Path]  # what it writes (files or folders)
    reads: List[Path] = field(default_factory=list)  # files of earlier steps it depends on
    always: bool = False  # run even when it finished before with the same command


def child_environment() -> dict:
    """This Python first on PATH (hw3_*.sh call `python3`), and unbuffered output so the log keeps its order."""
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    return dict(os.environ, PATH=path, PYTHONUNBUFFERED="1")


class StepRunner:
    """Runs steps in order, numbering them, and keeps their records in `record_file` (None: keeps none)."""

    def __init__(self, record_file: Optional[Path]):
        self.record_file = record_file
        self.records = read_json(record_file, "pipeline step record") if record_file and record_file.is_file() else {}
        self.number = 0

    def record_of(self, step: Step) -> dict:
        return {"command": step.command, "reads": {str(path): sha256_file(path) for path in step.reads}}

    def announce(self, title: str, lines: List[str] = ()) -> None:
        self.number += 1
        print(f"\n== [{self.number}] {title}", flush=True)
        for line in lines:
            print(f"   {line}", flush=True)

    def run(self, step: Step) -> None:
        """Runs `step` (or skips it, see the module docstring); raises StepFailed when its command fails."""
        self.announce(step.title, [f"runs:   {shlex.join(step.command)}",
                                   f"writes: {', '.join(str(path) for path in step.outputs)}"])
        record = self.record_of(step)
        done = all(path.exists() for path in step.outputs)
        if done and not step.always and self.records.get(step.title) == record:
            print("   skipped: done before with the same command and inputs (delete its outputs to run it again)")
            return
        if done and not step.always:
            print("   its outputs exist, made by another command, from other inputs or not by this pipeline: running "
                  "it again, replacing them")
        started = time.time()
        status = subprocess.run(step.command, cwd=REPO_ROOT, env=child_environment()).returncode
        if status != 0:
            raise StepFailed(f"step [{self.number}] {step.title} failed (exit status {status}; its messages are "
                             "above). Run the same command again after fixing it: finished steps are kept")
        self.records[step.title] = record
        if self.record_file:
            write_json_atomically(self.record_file, self.records, indent=1)
        print(f"   done in {time.time() - started:.1f} s", flush=True)
