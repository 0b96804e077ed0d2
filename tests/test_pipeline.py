"""demo.py's pieces (hw3/pipeline): both modes fill the same RunInputs, steps are skipped only when they finished
with the same command and inputs, numbers.json files compare, and demo.sh --help prints help."""
import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.arithmetic_spread import markdown as spread_table
from demo import main as demo_main
from hw3.common.errors import UserError
from hw3.common.files import read_json
from hw3.common.files import write_json_atomically
from hw3.pipeline import homework
from hw3.pipeline.homework import comparison_step, lanes
from hw3.pipeline.inputs import CONFIG_SETS, ResultPaths, add_input_options, inputs_from_args
from hw3.pipeline.numbers import compare_numbers, readme_table
from hw3.pipeline.spread import path_entry, reference_identity, scored_numbers
from hw3.pipeline.steps import Step, StepFailed, StepRunner
from hw3.toy.world import ToyWorld

ROOT = Path(__file__).resolve().parents[1]


def parse(argv):
    parser = argparse.ArgumentParser()
    add_input_options(parser)
    return parser.parse_args(argv)


def test_the_toy_run_and_its_files_through_data_are_one_run(tmp_path):
    world = ToyWorld(tmp_path / "world")
    default = inputs_from_args(parse([]), None, world)
    through_data = inputs_from_args(parse([
        "--configs", "toy", "--decoder", str(world.decoder), "--encoder", str(world.clip), "--clip-model",
        str(world.clip)]), world.data, None)
    assert default == through_data
    assert default.configs == CONFIG_SETS["toy"] and default.scst_config == "configs/toy_scst.yaml"
    assert default.train_overrides() == [f"data_dir={world.p2_data}", f"decoder_weights={world.decoder}",
                                         f"model.encoder={world.clip}", f"clip_model={world.clip}"]


def test_course_data_defaults(tmp_path):
    inputs = inputs_from_args(parse(["--no-scst"]), tmp_path / "hw3_data", None)
    assert inputs.configs == CONFIG_SETS["real"] and inputs.scst_config is None and inputs.candidates == ()
    assert len(inputs.configs) == 3 and all(Path(ROOT, c).is_file() for c in inputs.configs)
    with_candidates = inputs_from_args(parse(["--candidates"]), tmp_path / "hw3_data", None)
    assert with_candidates.configs == inputs.configs and len(with_candidates.candidates) == 2
    assert all(Path(ROOT, c).is_file() for c in with_candidates.candidates)
    assert inputs.decoder == tmp_path / "hw3_data" / "p2_data" / "decoder_model.bin"
    assert (inputs.encoder, inputs.clip_model, inputs.p1_models, inputs.clipscore_model) == \
        (None, None, ("ViT-L/14",), "ViT-B/32")
    assert inputs.toy_world() is None


def test_candidates_need_the_course_data(tmp_path):
    with pytest.raises(UserError, match="--candidates needs --data"):
        inputs_from_args(parse(["--candidates"]), None, ToyWorld(tmp_path / "world"))


def test_a_step_is_skipped_only_when_it_finished_with_the_same_command_and_inputs(tmp_path, capsys):
    out, source = tmp_path / "out.txt", tmp_path / "in.txt"
    source.write_text("one")
    copy = [sys.executable, "-c", f"import shutil; shutil.copy({str(source)!r}, {str(out)!r})"]

    def run(command=copy) -> str:
        StepRunner(tmp_path / "steps.json").run(Step("copy", command, [out], reads=[source]))
        return capsys.readouterr().out

    assert "done in" in run() and out.read_text() == "one"
    assert "skipped: done before" in run()
    source.write_text("two")  # another input: run again, and say that it replaces the outputs
    assert "running it again, replacing them" in run() and out.read_text() == "two"
    assert "running it again" in run(copy + ["another argument"])


def test_lanes_deal_the_training_runs_and_put_the_others_after_the_shortest_lane():
    training, others = [Step(name, [], []) for name in "abc"], [Step(name, [], []) for name in "pq"]
    assert [[step.title for step in lane] for lane in lanes(training, others, 2)] == [["a", "c"], ["b", "p", "q"]]
    assert [[step.title for step in lane] for lane in lanes(training, others, 1)] == [["a", "b", "c", "p", "q"]]


def test_steps_run_together_with_their_output_in_logs_and_a_failure_stops_the_lanes(tmp_path, capsys):
    def write(name: str, text: str) -> Step:
        return Step(name, [sys.executable, "-c", f"print({text!r}); open({str(tmp_path / name)!r}, 'w').write('x')"],
                    [tmp_path / name])

    runner = StepRunner(tmp_path / "steps.json")
    runner.run_together([[write("a", "from a"), write("b", "from b")], [write("c", "from c")]], tmp_path / "logs")
    assert all((tmp_path / name).is_file() for name in "abc")
    logs = sorted(path.read_text() for path in (tmp_path / "logs").iterdir())
    assert logs == ["from a\n", "from b\n", "from c\n"]
    assert capsys.readouterr().out.count("done in") == 3
    assert set(read_json(tmp_path / "steps.json")) == {"a", "b", "c"}

    fail = Step("fail", [sys.executable, "-c", "import sys; print('the reason'); sys.exit(3)"], [tmp_path / "f"])
    blocker = Step("slow", [sys.executable, "-c", "import time; time.sleep(1)"], [tmp_path / "s"])
    with pytest.raises(StepFailed, match="(?s)fail failed \\(exit status 3\\).*the reason"):
        StepRunner(None).run_together([[fail, write("after", "never")], [blocker, write("later", "never")]],
                                      tmp_path / "logs2")
    assert not (tmp_path / "after").exists() and not (tmp_path / "later").exists()


def test_compare_numbers():
    first = {"p1": {"accuracy": 87.5}, "p2": {"runs": {"toy_lora": {"CIDEr": 1.8, "sha256": "ab"}}}}
    assert compare_numbers(first, first) == []
    second = {"p1": {"accuracy": 87.5}, "p2": {"runs": {"toy_lora": {"CIDEr": 1.9}}}}
    assert compare_numbers(first, second) == ["p2.runs.toy_lora.CIDEr: 1.8 vs 1.9",
                                              "p2.runs.toy_lora.sha256: 'ab' vs (absent)"]


def test_compare_through_the_command_line(tmp_path, capsys):
    (tmp_path / "a.json").write_text('{"x": 1}')
    (tmp_path / "b.json").write_text('{"x": 2}')
    assert demo_main(["--compare", str(tmp_path / "a.json"), str(tmp_path / "a.json")]) == 0
    assert capsys.readouterr().out == "identical\n"
    assert demo_main(["--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 1
    assert "x: 1 vs 2" in capsys.readouterr().out


def spread_around(reference: dict, moves: dict) -> dict:
    """A demo_spread.json around `reference` with one measured path, whose numbers moved by `moves` {key: amount}."""
    path = path_entry(reference)
    path["numbers"] = {key: value + moves.get(key, 0.0) for key, value in path["numbers"].items()}
    return {"reference": reference_identity(reference), "reference_label": "test", "paths": {"measured": path}}


def test_the_closing_comparison_names_what_differs_and_checks_other_arithmetic_against_the_spread(
        tmp_path, monkeypatch, capsys):
    """demo_numbers.json against a run: identical; the same inputs and arithmetic with a number moved fails and lists
    it; other data or other pretrained files compare nothing; the same toy world under other CPU arithmetic passes
    only when every number lies within the spread (2 x the farthest move of its kind on the measured paths)."""
    reference = read_json(ROOT / "demo_numbers.json")
    monkeypatch.setattr(homework, "PUBLISHED_NUMBERS", tmp_path / "reference.json")
    monkeypatch.setattr(homework, "PUBLISHED_SPREAD", tmp_path / "spread.json")
    write_json_atomically(tmp_path / "reference.json", reference)
    write_json_atomically(tmp_path / "spread.json", spread_around(reference, {"p1.hw3_1.accuracy": 1.0,
                                                                              "p2.submitted.CIDEr": -0.01}))
    results = ResultPaths(tmp_path / "run")

    def closing(numbers: dict) -> tuple:
        write_json_atomically(results.numbers, numbers)
        passed = comparison_step(StepRunner(None), results, publish=False)
        return capsys.readouterr().out.strip().splitlines()[1:], passed  # after the step's title

    def moved(**amounts) -> dict:
        numbers = read_json(ROOT / "demo_numbers.json")
        for name, amount in amounts.items():
            *parents, last = name.split("__")
            holder = numbers
            for parent in parents:
                holder = holder[parent]
            holder[last] += amount
        return numbers

    assert closing(reference) == (["   identical"], True)
    assert closing(dict(reference, arithmetic="0" * 16)) == (["   identical"], True)  # it explains, it is no result
    accuracy = reference["p1"]["hw3_1"]["accuracy"]
    lines, passed = closing(moved(p1__hw3_1__accuracy=1))
    assert not passed and lines[1:] == [f"     p1.hw3_1.accuracy: {accuracy!r} vs {accuracy + 1!r}"]
    assert lines[0].endswith("on the same inputs and CPU arithmetic:")

    other_models = dict(inputs={**reference["inputs"], "clip_model": "0" * 64})
    other_world = dict(moved(p1__hw3_1__accuracy=1), toy_world={**reference["toy_world"], "hash": "0123456789abcdef"})
    course_data = {key: value for key, value in moved(p1__hw3_1__accuracy=1).items() if key != "toy_world"}
    for numbers, verdict in ((other_world, "other data: this run read the toy world 0123456789abcdef"),
                             (course_data, "other data: this run read the course data"),
                             (dict(moved(p1__hw3_1__accuracy=1), **other_models), "other pretrained files")):
        lines, passed = closing(numbers)
        assert passed and len(lines) == 1 and lines[0].startswith("   not comparable: ") and verdict in lines[0], lines

    # other CPU arithmetic: P1 may move 2.0 points, CIDEr 0.02; CLIPScore and grounding moved nowhere, so not at all
    other_cpu = dict(arithmetic="0" * 16, **other_models)
    lines, passed = closing(dict(moved(p1__hw3_1__accuracy=-1.9, p2__submitted__CIDEr=0.015), **other_cpu))
    assert passed and "other CPU arithmetic" in lines[0] and lines[-1].startswith("   all ")
    assert f"     p1.hw3_1.accuracy: {accuracy:.4f} -> {accuracy - 1.9:.4f} (-1.9000; within ±2.0000)" in lines
    for numbers, outside in ((moved(p1__hw3_1__accuracy=2.1), "p1.hw3_1.accuracy"),
                             (moved(p2__submitted__CLIPScore=0.001), "p2.submitted.CLIPScore"),
                             (moved(p2__runs__toy_lora__checkpoint_params=1), "checkpoint_params")):
        lines, passed = closing(dict(numbers, **other_cpu))
        assert not passed and lines[-1].startswith("   1 number(s) outside the spread"), lines
        assert [line for line in lines if outside in line and ("OUTSIDE" in line or "no arithmetic" in line)], lines
    absent = moved()
    del absent["p2"]["runs"]["toy_lora_scst"]
    lines, passed = closing(dict(absent, **other_cpu))
    scst_cider = reference["p2"]["runs"]["toy_lora_scst"]["CIDEr"]
    assert not passed and f"     p2.runs.toy_lora_scst.CIDEr: {scst_cider:.4f} in the reference, absent here" in lines

    # a spread measured around other reference numbers judges nothing
    republished = dict(moved(), arithmetic="f" * 16, p2={**reference["p2"], "submitted": {
        **reference["p2"]["submitted"], "captions_sha256": "0" * 64}})
    write_json_atomically(tmp_path / "spread.json", spread_around(republished, {"p1.hw3_1.accuracy": 60.0}))
    lines, passed = closing(dict(moved(p1__hw3_1__accuracy=50), **other_cpu))
    assert passed and len(lines) == 1 and "demo_spread.json was not measured around these" in lines[0]


def test_the_committed_spread_was_measured_around_the_committed_numbers():
    """demo_spread.json belongs to demo_numbers.json (republishing one means measuring the other again), every path
    in it ran the same toy world's demo to the end, and docs/reproducibility.md holds its generated table."""
    reference, spread = read_json(ROOT / "demo_numbers.json"), read_json(ROOT / "demo_spread.json")
    assert spread["reference"] == reference_identity(reference)
    assert len(spread["paths"]) >= 3
    for label, path in spread["paths"].items():
        assert set(path["numbers"]) == set(scored_numbers(reference)), label
        assert path["clip_model"] != reference["inputs"]["clip_model"], f"{label}: the reference's own arithmetic"
    text = (ROOT / "docs" / "reproducibility.md").read_text()
    start = "<!-- generated: python3 bench/arithmetic_spread.py --table demo_spread.json -->"
    assert text.count(start) == 1, "docs/reproducibility.md lost its spread table's marker"
    pasted = text.split(start)[1].split("<!-- end of the generated table -->")[0].strip()
    assert pasted == spread_table(reference, spread), \
        "paste the output of: python3 bench/arithmetic_spread.py --table demo_spread.json"


def test_the_readme_quotes_the_committed_numbers():
    """README.md's results table is the one made from demo_numbers.json (what `bash demo.sh --publish` wrote)."""
    table = readme_table(read_json(ROOT / "demo_numbers.json"))
    assert table in (ROOT / "README.md").read_text(), "paste the output of: bash demo.sh --table demo_numbers.json"


def test_demo_sh_help_prints_help():
    result = subprocess.run(["bash", str(ROOT / "demo.sh"), "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: demo.sh") and "--data" in result.stdout and "--check" in result.stdout


def test_the_arithmetic_fingerprint_tells_two_mkl_paths_apart():
    """The same machine under another MKL instruction path (what an older CPU computes) gets another fingerprint; the
    same path gets the same one, whatever the process's thread count (the toy runs fix theirs)."""
    def fingerprint(**environment) -> str:
        command = [sys.executable, "-c", "from hw3.common.arithmetic import arithmetic_fingerprint as f; print(f())"]
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True,
                              env={**os.environ, **environment}).stdout.strip()
    assert fingerprint() == fingerprint(OMP_NUM_THREADS="1") == fingerprint(OMP_NUM_THREADS="3") != fingerprint(
        MKL_ENABLE_INSTRUCTIONS="SSE4_2")
