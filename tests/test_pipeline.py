"""demo.py's pieces (hw3/pipeline): both modes fill the same RunInputs, steps are skipped only when they finished
with the same command and inputs, numbers.json files compare, and demo.sh --help prints help."""
import argparse
import subprocess
import sys
from pathlib import Path

from demo import main as demo_main
from hw3.pipeline.inputs import CONFIG_SETS, add_input_options, inputs_from_args
from hw3.pipeline.numbers import compare_numbers
from hw3.pipeline.steps import Step, StepRunner
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
    assert inputs.configs == CONFIG_SETS["real"] and inputs.scst_config is None
    assert inputs.decoder == tmp_path / "hw3_data" / "p2_data" / "decoder_model.bin"
    assert (inputs.encoder, inputs.clip_model, inputs.p1_models, inputs.clipscore_model) == \
        (None, None, ("ViT-L/14",), "ViT-B/32")
    assert inputs.toy_world() is None


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


def test_demo_sh_help_prints_help():
    result = subprocess.run(["bash", str(ROOT / "demo.sh"), "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: demo.sh") and "--data" in result.stdout and "--check" in result.stdout
