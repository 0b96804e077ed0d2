"""The homework end to end, step by step through the course's entry points (what `bash demo.sh` runs):

    [toy world] -> preflight -> P1: hw3_1.sh, p1_clip.py report -> P2: p2_train.py per config, the self-critical
    stage on the best run, hw3_2.sh with the best of all runs (val CIDEr), p2_evaluate.py -> P3: grounding (toy
    world only), p3_attention.py on the p3 images and the top-1/last-1 val images -> make_report.py ->
    numbers.json -> the checkpoints.json entry that publishes the best checkpoint.

Every step is a command line (printed before it runs, hw3/pipeline/steps.py) built from RunInputs alone, so the toy
world and the course data go through the same code with other inputs. With jobs > 1, P1's steps and the
cross-entropy runs share that many lanes (each step's output then goes to RESULTS/logs/); the rest runs in order.
"""
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from hw3.common.files import REPO_ROOT, read_json, sha256_file, write_atomically, write_json_atomically
from hw3.common.manifest import DEFAULT_CHECKPOINT, load_manifest
from hw3.pipeline.inputs import ResultPaths, RunInputs
from hw3.pipeline.numbers import collect_numbers, compare_files, input_identity
from hw3.pipeline.preflight import passed, run_preflight
from hw3.pipeline.steps import Step, StepRunner
from hw3.toy.world import ToyWorld

PUBLISHED_REPORT = REPO_ROOT / "hw3_report.pdf"
PUBLISHED_NUMBERS = REPO_ROOT / "demo_numbers.json"  # the default toy run's numbers.json, which README.md quotes


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
    def cider(self) -> float:
        return self.summary["best"]["CIDEr"]

    @property
    def checkpoint(self) -> Path:
        return self.folder / "best.safetensors"


def training_step(title: str, command: List[str], out: Path) -> Step:
    """p2_train.py always runs: it says "nothing to do" for a finished run of the same config, and refuses any
    other run in `out` (a finished run is never replaced)."""
    return Step(title, command, [out / "summary.json", out / "best.safetensors"], always=True)


def p1_steps(inputs: RunInputs, results: ResultPaths) -> List[Step]:
    model, data = option("--model", inputs.clip_model), inputs.layout
    return [Step("P1: zero-shot classification of the val images through hw3_1.sh",
                 ["bash", "hw3_1.sh", str(data.p1_val), str(data.id2label), str(results.p1_csv), *model],
                 [results.p1_csv]),
            Step("P1: the report's analyses (prompt table, top-5 probabilities, confusions)",
                 ["python3", "p1_clip.py", "report", str(data.p1_val), str(data.id2label), "--out-dir",
                  str(results.p1), *model],
                 [results.p1 / name for name in ("summary.json", "accuracy.csv", "top5.png", "top5.json")])]


def cross_entropy_runs(inputs: RunInputs, results: ResultPaths) -> Tuple[List[TrainedRun], List[Step]]:
    """One cross-entropy run per config: the runs, and the steps that train them."""
    runs, steps = [], []
    for config in inputs.configs:
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


def self_critical_run(runner: StepRunner, inputs: RunInputs, results: ResultPaths,
                      runs: List[TrainedRun]) -> List[TrainedRun]:
    """The self-critical stage on the best of `runs` (by val CIDEr): [its run], or [] when there is none."""
    best = max(runs, key=lambda run: run.cider)
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


def choose_best(runner: StepRunner, runs: List[TrainedRun]) -> TrainedRun:
    best = max(runs, key=lambda run: run.cider)
    lines = [f"{'run':<24} {'val CIDEr':>10} {'CLIPScore':>10} {'best epoch':>11}"]
    for run in runs:
        summary = run.summary
        lines.append(f"{run.folder.name:<24} {summary['best']['CIDEr']:>10.4f} {summary['best']['CLIPScore']:>10.4f} "
                     f"{summary['best_epoch']:>11}" + ("   <- best: it captions the val images" if run is best else ""))
    runner.announce("P2: the best run by val CIDEr", lines)
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


def report_step(runner: StepRunner, results: ResultPaths, world: Optional[ToyWorld], publish: bool) -> None:
    toy_world = option("--toy-world", world.root if world else None)
    runner.run(Step("Report", ["python3", "make_report.py", "--p1-dir", str(results.p1), "--p2-runs",
                               str(results.p2), "--p3-dir", str(results.p3), *toy_world, "--out",
                               str(results.report)], [results.report], always=True))
    if publish:
        publish_file(results.report, PUBLISHED_REPORT)


def publish_file(source: Path, destination: Path) -> None:
    write_atomically(destination, lambda temporary: shutil.copyfile(source, temporary))
    print(f"   --publish: copied it to {destination} (committed)", flush=True)


def comparison_step(runner: StepRunner, results: ResultPaths, publish: bool) -> None:
    """This run's numbers against the committed ones when this run read the same inputs (toy world hash, models'
    sha256); then, with `publish`, they replace them."""
    runner.announce(f"This run's numbers against the committed {PUBLISHED_NUMBERS.name} (the default `bash demo.sh`"
                    " on this machine kind; README.md quotes it)")
    if not PUBLISHED_NUMBERS.is_file():
        print(f"   {PUBLISHED_NUMBERS} does not exist yet")
    elif input_identity(read_json(PUBLISHED_NUMBERS, "numbers.json")) != input_identity(
            read_json(results.numbers, "numbers.json")):
        print(f"   these inputs have no reference numbers: {PUBLISHED_NUMBERS.name} comes from another toy world or "
              "other models (its toy world hash or model sha256 differ), so nothing is compared")
    else:
        compare_files(PUBLISHED_NUMBERS, results.numbers)
    if publish:
        publish_file(results.numbers, PUBLISHED_NUMBERS)


def publication_lines(best: TrainedRun, world: Optional[ToyWorld]) -> List[str]:
    """The checkpoints.json entry that publishes the best checkpoint (hw3/common/manifest.py), once uploaded."""
    checkpoints, _ = load_manifest()
    path = next(c.path for c in checkpoints if c.name == DEFAULT_CHECKPOINT)
    entry = {"name": DEFAULT_CHECKPOINT, "path": path, "url": "", "sha256": sha256_file(best.checkpoint),
             "made_by": best.made_by}
    lines = [f"file:   {best.checkpoint}", f"size:   {best.checkpoint.stat().st_size} bytes",
             f"sha256: {entry['sha256']}",
             f"upload the file, then make this the {DEFAULT_CHECKPOINT!r} entry of checkpoints.json, with the "
             "upload's direct download link as its url (bash hw3_download.sh then fetches and verifies it):",
             "  " + json.dumps(entry)]
    if world:
        lines.append("(a toy-world checkpoint: for practice only, it fits the toy world's tiny models, not the "
                     "course's)")
    return lines


def run_homework(inputs: RunInputs, results: ResultPaths, build_world: Optional[ToyWorld] = None,
                 publish: bool = False, check_only: bool = False, jobs: int = 1) -> int:
    """The whole pipeline (check_only: the preflight alone); returns the exit status (1: the preflight failed).
    `build_world`: the toy world to build, or reuse, first. `jobs`: how many of P1's steps and the cross-entropy
    runs run at once (1: one after another, their output on the terminal). A failing step raises StepFailed."""
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
    runs, training = cross_entropy_runs(inputs, results)
    if jobs > 1:
        runner.run_together(lanes(training, p1_steps(inputs, results), jobs), results.logs)
    else:
        for step in p1_steps(inputs, results) + training:
            runner.run(step)
    runs += self_critical_run(runner, inputs, results, runs)
    best = choose_best(runner, runs)
    submission_steps(runner, inputs, results, best)
    p3_steps(runner, inputs, results, best, world)
    report_step(runner, results, world, publish)

    numbers = collect_numbers(inputs, results, [run.folder for run in runs], best.folder)
    write_json_atomically(results.numbers, numbers, indent=1, sort_keys=True)
    submitted = numbers["p2"]["submitted"]
    runner.announce("Numbers", [f"P1 hw3_1.sh: {numbers['p1']['hw3_1']['accuracy']:.2f}% of "
                                f"{numbers['p1']['hw3_1']['images']} val images",
                                f"P2 hw3_2.sh with {submitted['run']}: CIDEr {submitted['CIDEr']:.4f}, CLIPScore "
                                f"{submitted['CLIPScore']:.4f}",
                                f"all of them, with the checkpoints' sha256: {results.numbers} (compare two runs: "
                                "bash demo.sh --compare A/numbers.json B/numbers.json)"])
    runner.announce("Publishing the best checkpoint", publication_lines(best, world))
    if world:
        comparison_step(runner, results, publish)

    def shown(path: Path) -> str:
        return os.path.relpath(path, results.root)
    print(f"\nDone in {(time.time() - started) / 60:.1f} min; everything is in {results.root}:")
    print("\n".join("   " + line for line in [
        f"P1      {shown(results.p1_csv)} (hw3_1.sh), {shown(results.p1)}/ (prompt table, top-5, confusions)",
        f"P2      {', '.join(shown(run.folder) for run in runs)} (run folders); {shown(results.val_predictions)} "
        f"(hw3_2.sh, {best.folder.name}), {shown(results.val_scores)} and {shown(results.val_scores_csv)} (scores)",
        f"P3      {shown(results.p3)}/ (figures" + (", grounding)" if world else ")"),
        f"report  {shown(results.report)}" + (f" (also {PUBLISHED_REPORT})" if publish else ""),
        f"numbers {shown(results.numbers)}; what each step ran: {shown(results.steps)} (the same command again "
        "skips the finished steps)" + (f"; the output of the steps that ran at once: {shown(results.logs)}/"
                                       if jobs > 1 else "")]))
    return 0
