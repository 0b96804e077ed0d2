"""The graded submission: the run-selection rule, the submission check, and a rehearsal of what the TA does."""
import functools
import http.server
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml

from hw3.common.files import read_json, sha256_file, write_json_atomically
from hw3.p2.selection import STRONG_BASELINE, choose_run
from hw3.pipeline.steps import child_environment  # this Python first on PATH: the scripts call python3
from hw3.pipeline.submission import script_problems

ROOT = Path(__file__).resolve().parent.parent


# ---- the rule ------------------------------------------------------------------------------------------------------

def test_a_run_that_clears_both_strong_bars_beats_one_with_more_cider_that_misses_clipscore():
    scores = {"high_cider": {"CIDEr": 0.97, "CLIPScore": 0.70}, "clears_both": {"CIDEr": 0.90, "CLIPScore": 0.72}}
    assert choose_run(scores, course_data=True)[0] == "clears_both"
    assert choose_run(scores, course_data=False)[0] == "high_cider"  # the toy world keeps CIDEr


def test_among_runs_that_all_miss_the_one_nearer_to_both_bars_wins():
    scores = {"far_on_clipscore": {"CIDEr": 0.88, "CLIPScore": 0.60}, "near": {"CIDEr": 0.85, "CLIPScore": 0.70}}
    assert choose_run(scores, course_data=True)[0] == "near"


def test_among_runs_that_clear_both_the_larger_weaker_margin_wins_and_the_rule_names_the_bars():
    scores = {"a": {"CIDEr": 1.00, "CLIPScore": 0.715}, "b": {"CIDEr": 0.95, "CLIPScore": 0.74}}
    name, rule = choose_run(scores, course_data=True)
    assert name == "b"  # a's CLIPScore margin (0.715 / 0.71) is thinner than b's weaker one (0.95 / 0.89)
    assert str(STRONG_BASELINE["CIDEr"]) in rule and str(STRONG_BASELINE["CLIPScore"]) in rule


# ---- the submission check --------------------------------------------------------------------------------------------

def git(folder: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=folder, check=True,
                   capture_output=True)


def test_the_script_check_names_a_changed_or_missing_graded_script(tmp_path):
    for name in ("hw3_download.sh", "hw3_1.sh", "hw3_2.sh"):
        shutil.copy(ROOT / name, tmp_path / name)
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-q", "-m", "scripts")
    assert script_problems(tmp_path) == []
    with open(tmp_path / "hw3_2.sh", "a") as script:
        script.write("echo changed\n")
    assert len(script_problems(tmp_path)) == 1 and "hw3_2.sh" in script_problems(tmp_path)[0]
    (tmp_path / "hw3_1.sh").unlink()
    assert any("hw3_1.sh is missing" in problem for problem in script_problems(tmp_path))


def test_check_submission_fails_on_the_unpublished_manifest_and_a_missing_report(tmp_path):
    result = subprocess.run([sys.executable, "demo.py", "--check-submission", "--out", str(tmp_path),
                             "--student-id", "r12345678"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    fails = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert any("not published" in line for line in fails), result.stdout
    assert any("hw3_r12345678.pdf does not exist" in line for line in fails), result.stdout
    assert "bash hw3_2.sh $1 $2 $3" in result.stdout


def test_a_bad_student_id_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "demo.py", "--check-submission", "--student-id", "r1/../x"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr


# ---- the rehearsal ---------------------------------------------------------------------------------------------------

def quick_config(method: str, folder: Path) -> str:
    """configs/toy_METHOD.yaml for one short epoch on the small toy world."""
    config = yaml.safe_load((ROOT / "configs" / f"toy_{method}.yaml").read_text())
    config.update(epochs=1, batch_size=16, val_images=20, cache_dir=str(folder / "cache"))
    path = folder / f"toy_{method}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def working_tree_copy(destination: Path) -> Path:
    """The repository's files as a fresh clone of this working tree has them (tracked and new, not ignored)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, destination / name)
    return destination


@functools.lru_cache(maxsize=None)
def pipeline_results(world: Path, folder: Path) -> Path:
    """demo.sh's pipeline on the small toy world with one-epoch configs and no self-critical stage."""
    from hw3.pipeline.homework import RunOptions, run_homework
    from hw3.pipeline.inputs import ResultPaths, RunInputs
    inputs = RunInputs(data=world / "hw3_data", configs=tuple(quick_config(m, folder) for m in ("adapter", "prefix",
                                                                                                "lora")),
                       decoder=world / "decoder_model.bin", encoder=str(world / "clip.pt"),
                       clip_model=str(world / "clip.pt"))
    results = folder / "results"
    assert run_homework(inputs, ResultPaths(results), options=RunOptions(student_id="r12345678")) == 0
    return results


def serve(folder: Path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def best_setting_line(report: Path) -> str:
    text = subprocess.run(["pdftotext", "-layout", str(report), "-"], capture_output=True, text=True,
                          check=True).stdout
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("Best setting:")]
    assert len(lines) == 1, text
    return lines[0]


def names_the_numbers(line: str, run: str, scores: dict) -> bool:
    return (line.startswith(f"Best setting: {run} ") and f"CIDEr {scores['CIDEr']:.3f}" in line
            and f"CLIPScore {scores['CLIPScore']:.3f}" in line)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("pdftotext") is None or shutil.which("wget") is None,
                    reason="needs pdftotext (poppler-utils) and wget; setup.sh installs them as root")
def test_the_ta_rehearsal(toy_world_small, tmp_path):
    """Publish the submitted checkpoint on 127.0.0.1, point a fresh copy's checkpoints.json at it, hw3_download.sh,
    count the course's way, stop the server, hw3_2.sh, score, and find that score in the report's best-setting line;
    the same check rejects a report whose best setting names another run."""
    results = pipeline_results(toy_world_small, tmp_path)
    submission = read_json(results / "p2" / "submission.json")
    run = results / "p2" / submission["run"]
    published = tmp_path / "web"
    published.mkdir()
    shutil.copy(run / "best.pt", published / "p2_best.pt")
    clone = working_tree_copy(tmp_path / "clone")
    entry = read_json(run / "best.config.json")
    server = serve(published)
    try:
        (clone / "checkpoints.json").write_text(json.dumps({"checkpoints": [{
            "name": "p2_best", "path": "checkpoints/p2_best.pt", "sha256": sha256_file(run / "best.pt"),
            "url": f"http://127.0.0.1:{server.server_address[1]}/p2_best.pt", "made_by": "rehearsal",
            "config": entry["caption_config"]}], "backbones": []}))
        download = subprocess.run(["bash", "hw3_download.sh"], cwd=clone, capture_output=True, text=True, timeout=600,
                                  env=child_environment())
        assert download.returncode == 0, download.stdout + download.stderr
    finally:
        server.shutdown()
    state = torch.load(clone / "checkpoints" / "p2_best.pt", map_location="cpu")
    count = sum(tensor.numel() for tensor in state.values())
    assert count < 35_000_000 and count == read_json(run / "summary.json")["checkpoint_params"]

    layout = toy_world_small / "hw3_data" / "p2_data"
    captions = tmp_path / "ta" / "pred.json"  # its folder does not exist: the script creates it
    caption = subprocess.run(["bash", "hw3_2.sh", str(layout / "images" / "val"), str(captions),
                              str(toy_world_small / "decoder_model.bin")], cwd=clone, capture_output=True, text=True,
                             timeout=900, env=child_environment())
    assert caption.returncode == 0, caption.stdout + caption.stderr
    scored = tmp_path / "ta" / "scores.json"
    score = subprocess.run([sys.executable, "p2_evaluate.py", "--pred_file", str(captions), "--images_root",
                            str(layout / "images" / "val"), "--annotation_file", str(layout / "val.json"),
                            "--clip-model", str(toy_world_small / "clip.pt"), "--json-out", str(scored)],
                           cwd=clone, capture_output=True, text=True, timeout=900)
    assert score.returncode == 0, score.stdout + score.stderr
    ta_scores = read_json(scored)

    report = results / "hw3_r12345678.pdf"
    assert names_the_numbers(best_setting_line(report), submission["run"], ta_scores), best_setting_line(report)
    other = next(name for name in ("toy_adapter", "toy_prefix", "toy_lora") if name != submission["run"])
    wrong = tmp_path / "wrong" / "hw3_report.pdf"
    subprocess.run([sys.executable, "make_report.py", "--p1-dir", str(results / "p1"), "--p2-runs",
                    str(results / "p2"), "--p3-dir", str(results / "p3"), "--submitted", other, "--out", str(wrong)],
                   cwd=ROOT, check=True, capture_output=True)
    assert not names_the_numbers(best_setting_line(wrong), submission["run"], ta_scores)


# ---- the encoder candidates come after the submission ----------------------------------------------------------------

class ScriptedRunner:
    """A StepRunner stand-in: a training step "finishes" by writing the summary.json its scores say."""

    def __init__(self, scores: dict):
        self.scores, self.ran, self.said = scores, [], []

    def run(self, step) -> None:
        out = Path(step.command[step.command.index("--out") + 1])
        self.ran.append(out.name)
        write_json_atomically(out / "summary.json", {"best": self.scores[out.name], "best_epoch": 1})

    def announce(self, title: str, lines=()) -> None:
        self.said.append((title, list(lines)))


def candidate_setting(tmp_path, scores: dict):
    from hw3.pipeline.homework import TrainedRun
    from hw3.pipeline.inputs import ENCODER_CANDIDATES, ResultPaths, RunInputs
    runner = ScriptedRunner(scores)
    inputs = RunInputs(data=tmp_path / "hw3_data", configs=(), decoder=tmp_path / "decoder_model.bin",
                       scst_config="configs/scst.yaml", candidates=ENCODER_CANDIDATES)
    submitted = TrainedRun(tmp_path / "results" / "p2" / "lora_scst", "p2_train.py ...")
    write_json_atomically(submitted.folder / "summary.json", {"best": {"CIDEr": 0.95, "CLIPScore": 0.72},
                                                              "best_epoch": 1})
    return runner, inputs, ResultPaths(tmp_path / "results"), submitted


def test_candidates_that_do_not_beat_the_submission_get_no_self_critical_stage(tmp_path):
    from hw3.pipeline.homework import candidate_runs
    runner, inputs, results, submitted = candidate_setting(tmp_path, {
        "siglip_adapter": {"CIDEr": 0.99, "CLIPScore": 0.70}, "dfn5b_adapter": {"CIDEr": 0.90, "CLIPScore": 0.71}})
    runs = candidate_runs(runner, inputs, results, submitted, course_data=True)
    assert runner.ran == ["siglip_adapter", "dfn5b_adapter"] and len(runs) == 2
    assert "the submission stays" in runner.said[-1][1][0]


def test_a_candidate_that_beats_the_submission_gets_the_self_critical_stage(tmp_path):
    from hw3.pipeline.homework import best_run, candidate_runs
    runner, inputs, results, submitted = candidate_setting(tmp_path, {
        "siglip_adapter": {"CIDEr": 0.97, "CLIPScore": 0.75}, "dfn5b_adapter": {"CIDEr": 0.90, "CLIPScore": 0.71},
        "siglip_adapter_scst": {"CIDEr": 1.02, "CLIPScore": 0.75}})
    runs = candidate_runs(runner, inputs, results, submitted, course_data=True)
    assert runner.ran == ["siglip_adapter", "dfn5b_adapter", "siglip_adapter_scst"]
    assert best_run([submitted, *runs], course_data=True).folder.name == "siglip_adapter_scst"
