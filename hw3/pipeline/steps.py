"""Running one pipeline step: print what it runs and where it writes, run it from the repository root, and skip it
when it finished before with the same command and the same inputs.

RESULTS/steps.json records each finished step: its command, and the sha256 of the files it reads that an earlier step
made (a checkpoint, a per-image CSV). A step whose outputs all exist and whose record matches is skipped, with a line
saying so; any other step runs, and says so first when it replaces outputs that another command or other inputs made.
Steps that decide for themselves (p2_train.py: "nothing to do" for a finished run, a refusal for another one) and
cheap ones (the report) always run. Independent steps can run at once (`StepRunner.run_together`), their output then
goes to log files.
"""
import os
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

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


def child_environment(threads: Optional[int] = None) -> dict:
    """This Python first on PATH (hw3_*.sh call `python3`), unbuffered output so the log keeps its order, and
    `threads` CPU threads (OpenMP, MKL) unless None."""
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    environment = dict(os.environ, PATH=path, PYTHONUNBUFFERED="1")
    if threads:
        environment.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return environment


class StepRunner:
    """Runs steps, numbering them, and keeps their records in `record_file` (None: keeps none). `run` runs one step
    with its output on the terminal; `run_together` runs lanes of steps at once, each step's output in a log file."""

    def __init__(self, record_file: Optional[Path]):
        self.record_file = record_file
        self.records = read_json(record_file, "pipeline step record") if record_file and record_file.is_file() else {}
        self.number = 0
        self.lock = threading.Lock()  # run_together's lanes share the numbering, the records and the terminal

    def record_of(self, step: Step) -> dict:
        return {"command": step.command, "reads": {str(path): sha256_file(path) for path in step.reads}}

    def announce(self, title: str, lines: List[str] = ()) -> int:
        """Prints the next step number, the title and `lines`; returns the number."""
        self.number += 1
        print(f"\n== [{self.number}] {title}", flush=True)
        for line in lines:
            print(f"   {line}", flush=True)
        return self.number

    def start(self, step: Step, extra: Sequence[str] = ()) -> Tuple[int, Optional[dict]]:
        """Announces `step`; returns its number and the record to keep once it succeeds, or None when it is skipped."""
        number = self.announce(step.title, [f"runs:   {shlex.join(step.command)}",
                                            f"writes: {', '.join(str(path) for path in step.outputs)}", *extra])
        record = self.record_of(step)
        done = all(path.exists() for path in step.outputs)
        if done and not step.always and self.records.get(step.title) == record:
            print("   skipped: done before with the same command and inputs (delete its outputs to run it again)",
                  flush=True)
            return number, None
        if done and not step.always:
            print("   its outputs exist, made by another command, from other inputs or not by this pipeline: running "
                  "it again, replacing them", flush=True)
        return number, record

    def finish(self, step: Step, record: dict) -> None:
        self.records[step.title] = record
        if self.record_file:
            write_json_atomically(self.record_file, self.records, indent=1)

    def run(self, step: Step) -> None:
        """Runs `step` (or skips it, see the module docstring); raises StepFailed when its command fails."""
        number, record = self.start(step)
        if record is None:
            return
        started = time.time()
        status = subprocess.run(step.command, cwd=REPO_ROOT, env=child_environment()).returncode
        if status != 0:
            raise StepFailed(f"step [{number}] {step.title} failed (exit status {status}; its messages are above). "
                             "Run the same command again after fixing it: finished steps are kept")
        self.finish(step, record)
        print(f"   done in {time.time() - started:.1f} s", flush=True)

    def run_together(self, lanes: Sequence[Sequence[Step]], log_dir: Path) -> None:
        """Runs the lanes at once, each one's steps in order; step [N]'s output goes to log_dir/step-N.log and its
        start and end are printed as they happen. Each step gets the CPU cores / lanes threads (OpenMP threads that
        outnumber the cores spin-wait: two 2-thread runs on 2 cores ran ~30x slower). After a failure no lane starts
        another step; once the running ones end, StepFailed names the failed step and shows the end of its log."""
        log_dir.mkdir(parents=True, exist_ok=True)
        failures: List[str] = []
        environment = child_environment(max(1, (os.cpu_count() or 1) // max(1, len(lanes))))

        def run_lane(steps: Sequence[Step]) -> None:
            for step in steps:
                with self.lock:
                    if failures:
                        return
                    number, record = self.start(step, [f"log:    {log_dir / f'step-{self.number + 1}.log'}"])
                if record is None:
                    continue
                log, started = log_dir / f"step-{number}.log", time.time()
                with open(log, "w") as output:
                    status = subprocess.run(step.command, cwd=REPO_ROOT, env=environment, stdout=output,
                                            stderr=subprocess.STDOUT).returncode
                with self.lock:
                    if status != 0:
                        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-20:])
                        failures.append(f"step [{number}] {step.title} failed (exit status {status}); the end of "
                                        f"its log {log}:\n{tail}")
                        print(f"\n== [{number}] failed after {time.time() - started:.1f} s: {step.title}", flush=True)
                        return
                    self.finish(step, record)
                    print(f"\n== [{number}] done in {time.time() - started:.1f} s: {step.title}", flush=True)

        threads = [threading.Thread(target=run_lane, args=(lane,)) for lane in lanes if lane]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if failures:
            raise StepFailed("\n".join(failures) + "Run the same command again after fixing it: finished steps are "
                                                   "kept")
