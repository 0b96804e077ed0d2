"""The homework end to end, step by step through the course's entry points (what `bash demo.sh` runs):

    [toy world] -> preflight -> P1: hw3_1.sh, p1_clip.py report -> P2: p2_train.py per config, the self-critical
    stage on the best run, the submitted run (hw3/p2/selection.py's rule), hw3_2.sh with it, p2_evaluate.py -> P3:
    grounding (toy world only), p3_attention.py on the p3 images and the top-1/last-1 val images -> the notes draft,
    make_report.py -> numbers.json -> "submission ready": the checkpoints.json entry that publishes the checkpoint
    -> [--candidates: the encoder candidates; a candidate that beats the submission gets the self-critical stage,
    and the better of the two replaces the submission].

A run stopped after "submission ready" leaves a complete submission: the report is replaced only whole (by a better
run's), and every run folder's checkpoint stays as its run left it.

Every step is a command line (printed before it runs, hw3/pipeline/steps.py) built from RunInputs alone, so the toy
world and the course data go through the same code with other inputs. With jobs > 1, P1's steps and the
cross-entropy runs share that many lanes (each step's output then goes to RESULTS/logs/); the rest runs in order.
"""
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from hw3.common.files import REPO_ROOT, read_json, sha256_file, write_atomically, write_json_atomically
from hw3.p2.selection import choose_run
from hw3.pipeline.inputs import ResultPaths, RunInputs
from hw3.pipeline.numbers import closing_comparison, collect_numbers
from hw3.pipeline.preflight import passed, run_preflight
from hw3.pipeline.steps import Step, StepRunner
from hw3.pipeline.submission import ready_lines
from hw3.toy.world import ToyWorld

PUBLISHED_REPORT = REPO_ROOT / "hw3_report.pdf"
PUBLISHED_NUMBERS = REPO_ROOT / "demo_numbers.json"  # the default toy run's numbers.json, which README.md quotes
PUBLISHED_SPREAD = REPO_ROOT / "demo_spread.json"  # how far they move on other CPU kinds (bench/arithmetic_spread.py)


def option(flag: str, value) -> List[str]:
    """[flag, value] when the value is set, else nothing (the tool's own default applies)."""
    return [flag, str(value)] if value else []


@dataclass
class TrainedRun:
    folder: Path
    made_by: str  # the p2_train.py options that made it, for checkpoints.json's "made_by"

    @property
    def summary(self) -> dict:
        return read_json(self.folder / "summary.json", "run summary")

    @property
    def checkpoint(self) -> Path:
        return self.folder / "best.pt"


def training_step(title: str, command: List[str], out: Path) -> Step:
    """p2_train.py always runs: it says "nothing to do" for a finished run of the same config, and refuses any
    other run in `out` (a finished run is never replaced)."""
    return Step(title, command, [out / "summary.json", out / "best.pt"], always=True)


def p1_steps(inputs: RunInputs, results: ResultPaths) -> List[Step]:
    model, data = option("--model", inputs.clip_model), inputs.layout
    return [Step("P1: zero-shot classification of the val images through hw3_1.sh",
                 ["bash", "hw3_1.sh", str(data.p1_val), str(data.id2label), str(results.p1_csv), *model],
                 [results.p1_csv]),
            Step("P1: the report's analyses (prompt table, top-5 probabilities, confusions)",
                 ["python3", "p1_clip.py", "report", str(data.p1_val), str(data.id2label), "--out-dir",
                  str(results.p1), *model],
                 [results.p1 / name for name in ("summary.json", "accuracy.csv", "top5.png", "top5.json")])]


def cross_entropy_runs(configs: Sequence[str], inputs: RunInputs,
                       results: ResultPaths) -> Tuple[List[TrainedRun], List[Step]]:
    """One cross-entropy run per config: the runs, and the steps that train them."""
    runs, steps = [], []
    for config in configs:
        out = results.run(config)
        steps.append(training_step(f"P2: train {config}", ["python3", "p2_train.py", "--config", config, "--out",
                                                           str(out), "--set", *inputs.train_overrides()], out))
        runs.append(TrainedRun(out, f"p2_train.py --config {config}"))
    return runs, steps


def lanes(training: List[Step], others: List[Step], jobs: int) -> List[List[Step]]:
    """`jobs` lanes of steps to run at once: the training steps dealt in turn, then `others` (in order) after the
    lane with the fewest."""
    dealt = [training[lane::jobs] for lane in range(jobs)]
    min(reversed(dealt), key=len).extend(others)
    return dealt


def picked_run(runs: Sequence[TrainedRun], course_data: bool) -> Tuple[TrainedRun, str]:
    """The run hw3/p2/selection.py's rule picks by the runs' best val scores, and the rule as a phrase."""
    name, rule = choose_run({run.folder.name: run.summary["best"] for run in runs}, course_data)
    return next(run for run in runs if run.folder.name == name), rule


def best_run(runs: Sequence[TrainedRun], course_data: bool) -> TrainedRun:
    return picked_run(runs, course_data)[0]


def self_critical_run(runner: StepRunner, inputs: RunInputs, results: ResultPaths,
                      best: TrainedRun) -> List[TrainedRun]:
    """The self-critical stage on `best`: [its run], or [] when there is none."""
    if inputs.scst_config is None:
        runner.announce("P2: self-critical stage", ["skipped: --no-scst"])
        return []
    if not (REPO_ROOT / inputs.scst_config).is_file():
        runner.announce("P2: self-critical stage", [f"skipped: its config {inputs.scst_config} does not exist "
                                                    "(give --scst-config FILE, or --no-scst)"])
        return []
    out = results.p2 / f"{best.folder.name}_scst"
    runner.run(training_step(f"P2: self-critical stage from the best run so far, {best.folder.name}",
                             ["python3", "p2_train.py", "--init", str(best.folder), "--config", inputs.scst_config,
                              "--out", str(out)], out))
    return [TrainedRun(out, f"p2_train.py --init <the {best.folder.name} run> --config {inputs.scst_config}")]


def choose_submission(runner: StepRunner, results: ResultPaths, runs: List[TrainedRun],
                      course_data: bool) -> TrainedRun:
    """The run to submit, by hw3/p2/selection.py's rule; written to RESULTS/p2/submission.json for the report."""
    best, rule = picked_run(runs, course_data)
    lines = [f"{'run':<24} {'val CIDEr':>10} {'CLIPScore':>10} {'best epoch':>11}"]
    for run in runs:
        summary = run.summary
        lines.append(f"{run.folder.name:<24} {summary['best']['CIDEr']:>10.4f} {summary['best']['CLIPScore']:>10.4f} "
                     f"{summary['best_epoch']:>11}" + ("   <- submitted: it captions the val images" if run is best
                                                       else ""))
    runner.announce("P2: the run to submit", lines + [f"rule: {rule}"])
    write_json_atomically(results.submission, {"run": best.folder.name, "rule": rule,
                                               "checkpoint_sha256": sha256_file(best.checkpoint)}, indent=1)
    return best


def submission_steps(runner: StepRunner, inputs: RunInputs, results: ResultPaths, best: TrainedRun) -> None:
    val_images = inputs.layout.p2_images("val")
    runner.run(Step("P2: caption the val images through hw3_2.sh with the best run",
                    ["bash", "hw3_2.sh", str(val_images), str(results.val_predictions), str(inputs.decoder),
                     "--checkpoint", str(best.checkpoint), *option("--encoder", inputs.encoder)],
                    [results.val_predictions], reads=[best.checkpoint]))
    runner.run(Step("P2: score the captions with p2_evaluate.py (the course's CIDEr-D and CLIPScore)",
                    ["python3", "p2_evaluate.py", "--pred_file", str(results.val_predictions), "--images_root",
                     str(val_images), "--annotation_file", str(inputs.layout.p2_annotations("val")), "--clip-model",
                     inputs.clipscore_model, "--per-image-csv", str(results.val_scores_csv), "--json-out",
                     str(results.val_scores)],
                    [results.val_scores_csv, results.val_scores], reads=[results.val_predictions]))


def p3_steps(runner: StepRunner, inputs: RunInputs, results: ResultPaths, best: TrainedRun,
             world: Optional[ToyWorld]) -> None:
    model = ["--checkpoint", str(best.checkpoint), "--decoder", str(inputs.decoder),
             *option("--encoder", inputs.encoder)]
    reads = [best.checkpoint]
    if world is None:
        runner.announce("P3: grounding score", ["skipped: it needs a toy world's object boxes"])
    else:
        grounding = results.grounding / "grounding.json"
        runner.run(Step("P3: grounding score per decoder layer (the toy world's object boxes)",
                        ["python3", "p3_attention.py", "grounding", str(world.root), *model, "--out-dir",
                         str(results.grounding)], [grounding, results.grounding / "grounding.csv"], reads=reads))
        model += ["--grounding", str(grounding)]
        reads = reads + [grounding]
    data = inputs.layout
    runner.run(Step("P3: attention maps of the p3 images",
                    ["python3", "p3_attention.py", str(data.p3_images), *model, "--out-dir",
                     str(results.p3_figures)], [results.p3_figures / "attention.json"], reads=reads))
    runner.run(Step("P3: attention maps of the top-1 and last-1 val images by CLIPScore",
                    ["python3", "p3_attention.py", str(data.p2_images("val")), "--top-last",
                     str(results.val_scores_csv), *model, "--out-dir", str(results.top_last)],
                    [results.top_last / "attention.json"],
                    reads=reads + [results.val_scores_csv]))


def publish_file(source: Path, destination: Path) -> None:
    write_atomically(destination, lambda temporary: shutil.copyfile(source, temporary))
    print(f"   --publish: copied it to {destination} (committed)", flush=True)


def comparison_step(runner: StepRunner, results: ResultPaths, publish: bool) -> bool:
    """This run's numbers against the committed ones (numbers.closing_comparison: identical, the differences, which
    input differs, or under other CPU arithmetic each number against demo_spread.json's spread); then, with
    `publish`, they replace them. Returns whether the run passed (a run being published always does)."""
    runner.announce(f"This run's numbers against the committed {PUBLISHED_NUMBERS.name} (the default `bash demo.sh`"
                    " on the CPU kind that made it; README.md quotes it)")
    if not PUBLISHED_NUMBERS.is_file():
        lines, passed = [f"not comparable: {PUBLISHED_NUMBERS} does not exist yet"], True
    else:
        spread = read_json(PUBLISHED_SPREAD, "demo_spread.json") if PUBLISHED_SPREAD.is_file() else None
        lines, passed = closing_comparison(read_json(PUBLISHED_NUMBERS, "numbers.json"),
                                           read_json(results.numbers, "numbers.json"), spread)
    print("\n".join(f"   {line}" for line in lines))
    if publish:
        publish_file(results.numbers, PUBLISHED_NUMBERS)
    return passed or publish


@dataclass(frozen=True)
class RunOptions:
    """How the pipeline runs, beyond its inputs."""
    jobs: int = 1  # how many of P1's steps and the cross-entropy runs run at once
    publish: bool = False  # copy the report and numbers.json over the committed ones
    student_id: Optional[str] = None  # names the report hw3_<ID>.pdf


def report_steps(runner: StepRunner, results: ResultPaths, world: Optional[ToyWorld], options: RunOptions) -> Path:
    """The notes draft (once: the student's edits are never overwritten), then the report; returns its path."""
    inputs = ["--p1-dir", str(results.p1), "--p2-runs", str(results.p2), "--p3-dir", str(results.p3),
              *option("--toy-world", world.root if world else None)]
    if not results.notes.is_file():
        runner.run(Step("Report: a draft of your answers to the prose questions, with the numbers they cite",
                        ["python3", "make_report.py", *inputs, "--draft-notes", str(results.notes)],
                        [results.notes], always=True))
    report = results.report(options.student_id)
    runner.run(Step("Report", ["python3", "make_report.py", *inputs, "--notes", str(results.notes), "--out",
                               str(results.report()), *option("--student-id", options.student_id)],
                    [report], always=True))
    if options.publish:
        publish_file(report, PUBLISHED_REPORT)
    return report


def submit(runner: StepRunner, inputs: RunInputs, results: ResultPaths, runs: List[TrainedRun],
           world: Optional[ToyWorld], options: RunOptions) -> TrainedRun:
    """Chooses the run to submit among `runs`, captions and scores the val images with it, draws P3 and writes the
    report; returns the submitted run."""
    best = choose_submission(runner, results, runs, course_data=world is None)
    submission_steps(runner, inputs, results, best)
    p3_steps(runner, inputs, results, best, world)
    report = report_steps(runner, results, world, options)
    runner.announce("Submission ready", ready_lines(best.checkpoint, best.made_by, report, options.student_id,
                                                    toy=world is not None))
    return best


def candidate_runs(runner: StepRunner, inputs: RunInputs, results: ResultPaths, submitted: TrainedRun,
                   course_data: bool) -> List[TrainedRun]:
    """The encoder candidates, one at a time, then the self-critical stage on the best of them if it beats the
    submitted run; returns every run made."""
    runs, steps = cross_entropy_runs(inputs.candidates, inputs, results)
    for step in steps:
        runner.run(step)
    challenger = best_run(runs, course_data)
    if best_run([submitted, challenger], course_data) is submitted:
        runner.announce("P2: the encoder candidates", [f"none beats the submitted run {submitted.folder.name}: the "
                                                       "submission stays"])
        return runs
    return runs + self_critical_run(runner, inputs, results, challenger)


def numbers_step(runner: StepRunner, inputs: RunInputs, results: ResultPaths, runs: List[TrainedRun],
                 best: TrainedRun) -> None:
    numbers = collect_numbers(inputs, results, [run.folder for run in runs], best.folder)
    write_json_atomically(results.numbers, numbers, indent=1, sort_keys=True)
    submitted = numbers["p2"]["submitted"]
    runner.announce("Numbers", [f"P1 hw3_1.sh: {numbers['p1']['hw3_1']['accuracy']:.2f}% of "
                                f"{numbers['p1']['hw3_1']['images']} val images",
                                f"P2 hw3_2.sh with {submitted['run']}: CIDEr {submitted['CIDEr']:.4f}, CLIPScore "
                                f"{submitted['CLIPScore']:.4f}",
                                f"all of them, with the checkpoints' sha256: {results.numbers} (compare two runs: "
                                "bash demo.sh --compare A/numbers.json B/numbers.json)"])


def train_first_runs(runner: StepRunner, inputs: RunInputs, results: ResultPaths, jobs: int) -> List[TrainedRun]:
    """P1's steps and the cross-entropy runs (`jobs` at a time), then the self-critical stage on the best run."""
    runs, training = cross_entropy_runs(inputs.configs, inputs, results)
    if jobs > 1:
        runner.run_together(lanes(training, p1_steps(inputs, results), jobs), results.logs)
    else:
        for step in p1_steps(inputs, results) + training:
            runner.run(step)
    return runs + self_critical_run(runner, inputs, results, best_run(runs, inputs.toy_world() is None))


def run_homework(inputs: RunInputs, results: ResultPaths, build_world: Optional[ToyWorld] = None,
                 options: RunOptions = RunOptions(), check_only: bool = False) -> int:
    """The whole pipeline (check_only: the preflight alone); returns the exit status (1: the preflight failed, or a
    toy run's numbers fail the comparison with the committed ones).
    `build_world`: the toy world to build, or reuse, first. A failing step raises StepFailed."""
    started = time.time()
    runner = StepRunner(None if check_only else results.steps)
    if build_world:
        runner.run(Step("Toy world: build it, or reuse the cached one",
                        ["python3", "toyworld.py", str(build_world.root)], [build_world.manifest_path], always=True))
    runner.announce("Preflight")
    if not passed(run_preflight(inputs)):
        return 1
    if check_only:
        return 0
    world = inputs.toy_world()
    runs = train_first_runs(runner, inputs, results, options.jobs)
    best = submit(runner, inputs, results, runs, world, options)
    numbers_step(runner, inputs, results, runs, best)
    as_committed = comparison_step(runner, results, options.publish) if world else True
    if inputs.candidates:
        runs += candidate_runs(runner, inputs, results, best, course_data=world is None)
        if best_run(runs, world is None) is not best:
            best = submit(runner, inputs, results, runs, world, options)
            numbers_step(runner, inputs, results, runs, best)
    closing_lines(results, runs, best, world, options, time.time() - started)
    if not as_committed:
        print(f"\nThe numbers fail the comparison with {PUBLISHED_NUMBERS.name} (above): exit status 1")
    return 0 if as_committed else 1


def closing_lines(results: ResultPaths, runs: List[TrainedRun], best: TrainedRun, world: Optional[ToyWorld],
                  options: RunOptions, seconds: float) -> None:
    def shown(path: Path) -> str:
        return os.path.relpath(path, results.root)
    report = results.report(options.student_id)
    print(f"\nDone in {seconds / 60:.1f} min; everything is in {results.root}:")
    print("\n".join("   " + line for line in [
        f"P1      {shown(results.p1_csv)} (hw3_1.sh), {shown(results.p1)}/ (prompt table, top-5, confusions)",
        f"P2      {', '.join(shown(run.folder) for run in runs)} (run folders); {shown(results.val_predictions)} "
        f"(hw3_2.sh, {best.folder.name}), {shown(results.val_scores)} and {shown(results.val_scores_csv)} (scores)",
        f"P3      {shown(results.p3)}/ (figures" + (", grounding)" if world else ")"),
        f"report  {shown(report)}" + (f" (also {PUBLISHED_REPORT})" if options.publish else "") +
        f"; your answers to its prose questions: {shown(results.notes)} (edit it, then run the same command again)",
        f"numbers {shown(results.numbers)}; what each step ran: {shown(results.steps)} (the same command again "
        "skips the finished steps)" + (f"; the output of the steps that ran at once: {shown(results.logs)}/"
                                       if options.jobs > 1 else "")]))
