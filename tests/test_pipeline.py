"""demo.py's pieces (hw3/pipeline): both modes fill the same RunInputs, steps are skipped only when they finished
with the same command and inputs, numbers.json files compare, and demo.sh --help prints help."""
import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from demo import main as demo_main
from hw3.common.errors import UserError
from hw3.common.files import read_json
from hw3.common.files import write_json_atomically
from hw3.pipeline import homework
from hw3.pipeline.homework import comparison_step, lanes
from hw3.pipeline.inputs import CONFIG_SETS, ResultPaths, add_input_options, inputs_from_args
from hw3.pipeline.numbers import compare_numbers, readme_table
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


def test_the_closing_comparison_runs_only_on_the_reference_inputs(tmp_path, monkeypatch, capsys):
    """demo_numbers.json is compared with a run of the same inputs (toy world hash, models' sha256) only; another
    run gets one line naming what differs: the data, the CPU arithmetic (with how far the headlines moved) or the
    pretrained files."""
    reference = read_json(ROOT / "demo_numbers.json")
    monkeypatch.setattr(homework, "PUBLISHED_NUMBERS", ROOT / "demo_numbers.json")
    results = ResultPaths(tmp_path)

    def closing_lines(numbers: dict) -> list:
        write_json_atomically(results.numbers, numbers)
        comparison_step(StepRunner(None), results, publish=False)
        return capsys.readouterr().out.strip().splitlines()[1:]  # after the step's title

    assert closing_lines(reference) == ["identical"]
    moved = read_json(ROOT / "demo_numbers.json")
    moved["p1"]["hw3_1"]["accuracy"] += 1
    assert closing_lines(moved)[1:] == [f"  p1.hw3_1.accuracy: {reference['p1']['hw3_1']['accuracy']!r} vs "
                                        f"{moved['p1']['hw3_1']['accuracy']!r}"]
    assert closing_lines(dict(reference, arithmetic="0" * 16)) == ["identical"]  # it explains, it is no result
    other_world = dict(moved, toy_world={**reference["toy_world"], "hash": "0123456789abcdef"})
    other_decoder = dict(moved, inputs={**reference["inputs"], "decoder_sha256": "0" * 64})
    other_cpu = dict(other_decoder, arithmetic="0" * 16)
    course_data = {key: value for key, value in moved.items() if key != "toy_world"}
    for numbers, verdict in ((other_world, "other data: this run read the toy world 0123456789abcdef"),
                             (course_data, "other data: this run read the course data"),
                             (other_decoder, "other pretrained files"), (other_cpu, "other CPU arithmetic")):
        lines = closing_lines(numbers)
        assert len(lines) == 1 and lines[0].startswith("   not comparable: ") and verdict in lines[0], lines
    assert f"p1.hw3_1.accuracy {reference['p1']['hw3_1']['accuracy']:.4f} -> " in closing_lines(other_cpu)[0]


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
    same path gets the same one."""
    def fingerprint(**environment) -> str:
        command = [sys.executable, "-c", "from hw3.common.arithmetic import arithmetic_fingerprint as f; print(f())"]
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True,
                              env={**os.environ, **environment}).stdout.strip()
    assert fingerprint() == fingerprint() != fingerprint(MKL_ENABLE_INSTRUCTIONS="SSE4_2")
