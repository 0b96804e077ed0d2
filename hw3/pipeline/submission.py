"""The graded submission: what a run prints once it is ready, and the check a student runs before handing in.

`bash demo.sh --check-submission --student-id ID` does what the TA will do, and says in one line per problem what to
fix: checkpoints.json's p2_best has a url and a sha256, the file at that url is that file (fetched into a temporary
folder as hw3_download.sh fetches it), the course's parameter count (`torch.load` + the tensors' numel) is under 35M,
RESULTS/hw3_<ID>.pdf exists and is a course-data report (not the toy world's), and hw3_1.sh, hw3_2.sh and
hw3_download.sh are the repository's own, committed. It ends with the TA's three commands.
"""
import json
import subprocess
import tempfile
from pathlib import Path
from typing import List, Optional

from hw3.common.download import OK, fetch_checkpoint
from hw3.common.errors import UserError
from hw3.common.files import REPO_ROOT
from hw3.common.manifest import DEFAULT_CHECKPOINT, MANIFEST, load_manifest
from hw3.p2.checkpoint import count_checkpoint_params, publication_entry
from hw3.pipeline.inputs import ResultPaths
from hw3.report import TOY_KEYWORD

PARAMETER_LIMIT = 35_000_000  # the course's limit on the trainable parameters in the checkpoint
GRADED_SCRIPTS = ("hw3_download.sh", "hw3_1.sh", "hw3_2.sh")
TOY_REPORT_MARK = f"/Keywords ({TOY_KEYWORD})".encode()  # a toy-world report's PDF metadata, as hw3/report.py writes it
TA_COMMANDS = ["bash hw3_download.sh",
               "bash hw3_1.sh $1 $2 $3   # $1 image folder, $2 id2label.json, $3 output CSV",
               "bash hw3_2.sh $1 $2 $3   # $1 image folder, $2 output JSON, $3 decoder_model.bin"]


def ready_lines(checkpoint: Path, made_by: str, report: Path, student_id: Optional[str], toy: bool) -> List[str]:
    """What a finished run tells the student to hand in, and how."""
    entry = publication_entry(str(checkpoint), made_by)
    lines = [f"checkpoint: {checkpoint} ({Path(checkpoint).stat().st_size:,} bytes, "
             f"{count_checkpoint_params(str(checkpoint)):,} trainable parameters counted the course's way)",
             f"report:     {report}" + ("" if student_id else
                                         " (the course names it hw3_<studentID>.pdf: run again with --student-id ID)"),
             "publish:    upload the checkpoint (a Google Drive link works), put its direct download link in this "
             f"entry's url, and make it the {DEFAULT_CHECKPOINT!r} entry of checkpoints.json; keep the upload online "
             "until grades are out:",
             "  " + json.dumps(entry),
             f"then:       bash demo.sh --check-submission --student-id {student_id or 'ID'}   (the TA's steps, "
             "rehearsed)"]
    if toy:
        lines.append("(a toy-world submission: for practice only; its checkpoint fits the toy world's tiny models)")
    return lines


def manifest_problems(manifest: Path, fetched_root: Path) -> List[str]:
    """The published checkpoint: an entry with url and sha256, the file there matching it, under the course's
    parameter limit. Fetches it into `fetched_root`."""
    try:
        checkpoints, _ = load_manifest(manifest)
    except UserError as error:
        return [f"{error} (fix checkpoints.json)"]
    entry = next((c for c in checkpoints if c.name == DEFAULT_CHECKPOINT), None)
    if entry is None:
        return [f"{manifest} has no {DEFAULT_CHECKPOINT!r} entry: paste the one your run printed"]
    if not entry.url:
        return [f"{DEFAULT_CHECKPOINT} is not published: upload your checkpoint and put its url and sha256 in "
                f"{manifest.name} (the entry the run printed)"]
    if fetch_checkpoint(entry, fetched_root) != OK:
        return [f"{entry.url} did not give the file whose sha256 {manifest.name} lists (see the lines above): "
                "re-upload it, or fix the url or the sha256"]
    count = count_checkpoint_params(str(fetched_root / entry.path))
    if count >= PARAMETER_LIMIT:
        return [f"the published checkpoint holds {count:,} parameters, not under {PARAMETER_LIMIT:,}: save only the "
                "trainable tensors (p2_train.py does), or shrink the PEFT modules"]
    print(f"ok    published checkpoint: {entry.url} matches sha256 {entry.sha256[:16]}...; {count:,} parameters "
          f"(torch.load + numel, the course's count) < {PARAMETER_LIMIT:,}", flush=True)
    return []


def report_problems(report: Path, student_id: Optional[str]) -> List[str]:
    if not student_id:
        return ["no --student-id: the report must be named hw3_<studentID>.pdf (run the pipeline and this check with "
                "--student-id ID)"]
    if not report.is_file():
        return [f"{report} does not exist: run `bash demo.sh --data hw3_data --student-id {student_id}` (its report "
                "step writes it)"]
    if TOY_REPORT_MARK in report.read_bytes():
        return [f"{report} is a toy-world report: build it from your course-data run (bash demo.sh --data hw3_data "
                f"--student-id {student_id})"]
    print(f"ok    report: {report}", flush=True)
    return []


def script_problems(root: Path = REPO_ROOT) -> List[str]:
    """The graded scripts exist, are tracked by git, and have no uncommitted changes."""
    problems = [f"{name} is missing from the repository root: restore it (git checkout -- {name})"
                for name in GRADED_SCRIPTS if not (root / name).is_file()]
    if problems:
        return problems
    git = subprocess.run(["git", "status", "--porcelain", "--", *GRADED_SCRIPTS], cwd=root, capture_output=True,
                         text=True)
    if git.returncode != 0:
        return [f"cannot ask git about {', '.join(GRADED_SCRIPTS)} ({git.stderr.strip()}): hand in the repository's "
                "own scripts"]
    changed = [line[3:] for line in git.stdout.splitlines()]
    if changed:
        return [f"{', '.join(changed)}: changed or untracked: commit them (the TA runs what is committed)"]
    print(f"ok    scripts: {', '.join(GRADED_SCRIPTS)} are the repository's, committed", flush=True)
    return []


def check_submission(results: ResultPaths, student_id: Optional[str], manifest: Path = MANIFEST) -> int:
    """Every check of the module docstring, each problem on one line; returns 0 when there is none, else 1."""
    with tempfile.TemporaryDirectory(prefix="hw3-check-") as fetched:
        problems = manifest_problems(manifest, Path(fetched))
    problems += report_problems(results.report(student_id), student_id)
    problems += script_problems()
    for problem in problems:
        print(f"FAIL  {problem}", flush=True)
    print("\nWhat the TA runs, from the repository root:\n" + "\n".join("   " + line for line in TA_COMMANDS))
    print(f"\n{len(problems)} problem(s): " + ("fix the FAIL lines, then check again" if problems else
                                              "ready to hand in"), flush=True)
    return 1 if problems else 0
