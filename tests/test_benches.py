"""Every bench/*.py runs here at a tiny size, so that no bench rots: each as a subprocess with tiny arguments, which
must exit with status 0 and print (or write as JSON) its numbers; docs/development.md's Benchmarks table says what
each measures and where the docs quote it. Also: docs/readiness.md holds the table of the committed
docs/readiness.json."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.readiness import markdown
from hw3.common.files import read_json

ROOT = Path(__file__).resolve().parent.parent
TABLE_START = "<!-- generated: python3 bench/readiness.py --table docs/readiness.json -->"
TABLE_END = "<!-- end of the generated table -->"


def run_bench(name: str, *args, timeout: int = 600) -> str:
    """bench/NAME's output (stdout + stderr) when it exits with status 0."""
    command = [sys.executable, str(ROOT / "bench" / name), *map(str, args)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(command)}\n{output[-4000:]}"
    return output


def test_every_bench_runs_here():
    source = Path(__file__).read_text()
    untested = [path.name for path in (ROOT / "bench").glob("*.py") if f'run_bench("{path.name}"' not in source]
    assert not untested, f"benches no test runs: {untested}"


@pytest.fixture(scope="module")
def trained_run(toy_world_small, tmp_path_factory):
    """(runs folder, its --set values): configs/toy_lora.yaml for one epoch on the small toy world, in the folder
    bench/p2_scst_gains.py gives method lora and seed 0, so that the bench finds it finished."""
    runs = tmp_path_factory.mktemp("bench_runs")
    overrides = ["epochs=1", "val_images=10", f"cache_dir={runs / 'cache'}"]
    result = subprocess.run([sys.executable, "p2_train.py", "--config", "configs/toy_lora.yaml", "--toy-world",
                             str(toy_world_small), "--out", str(runs / "lora_seed0"), "--set", "seed=0", *overrides],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return runs, overrides


# ---- random weights at the real sizes -------------------------------------------------------------------------------

def test_clip_score_check():
    output = run_bench("clip_score_check.py", "--device", "cpu", "--num-images", 3, "--num-workers", 1)
    assert output.count("3/3 scores identical to the course loop") == 2, output


def test_p1_speed():
    output = run_bench("p1_speed.py", "--device", "cpu", "--batch-size", 1, "--batches", 1)
    assert re.search(r"ViT-L/14 @ 224px, .*: [\d.]+ images/s", output) and "2500 images: " in output, output


def test_p2_cache_speed():
    output = run_bench("p2_cache_speed.py", "--device", "cpu", "--batch-size", 1, "--steps", 1)
    assert re.search(r"[\d.]+ s/step from images, [\d.]+ s/step from cached tokens", output), output


def test_p2_decode_speed(tmp_path):
    run_bench("p2_decode_speed.py", "--device", "cpu", "--images", 2, "--uncached-images", 1, "--beams", 1, 2,
              "--max-length", 3, "--bar", 0, "--json-out", tmp_path / "decode.json")
    rows = json.loads((tmp_path / "decode.json").read_text())["rows"]
    assert [(row["beam_size"], row["way"]) for row in rows] == [
        (beam, way) for beam in (1, 2) for way in ("uncached", "cached", "batched")]
    assert all(row["same_as_uncached"] and row["images_per_s"] > 0 for row in rows)


def test_toy_world_threads(tmp_path):
    run_bench("toy_world_threads.py", "--threads", 1, "--steps", 1, "--json-out", tmp_path / "threads.json")
    row, = json.loads((tmp_path / "threads.json").read_text())
    assert row["threads"] == 1 and row["lm_step_s"] > 0 and row["projected_training_s"] > 0
    assert {"clip_64px_epoch_s", "clip_96px_epoch_s", "lm_epoch_s"} <= set(row)


def test_readiness(toy_world_small, tmp_path):
    """The real configs' code paths on the toy world's tiny models (the real sizes take minutes: docs/readiness.md)."""
    output = run_bench("readiness.py", "--device", "cpu", "--toy-world", toy_world_small, "--configs",
                       ROOT / "configs" / "adapter.yaml", ROOT / "configs" / "siglip_adapter.yaml", "--batch", 1,
                       "--json-out", tmp_path / "readiness.json")
    result = read_json(tmp_path / "readiness.json")
    assert [row["config"] for row in result["configs"]] == ["adapter.yaml", "siglip_adapter.yaml"]
    for row in result["configs"]:
        assert row["measured"]["step_s"] > 0 and row["measured"]["batch"] == 1
        assert row["memory_gib"]["total"] > row["memory_gib"]["saved"] > 0 and row["memory_gib"]["largest_batch"] > 0
        assert set(row["projected_s"]) == {"cache_build", "hw3_2", "hw3_1", "training", "step"}
        assert all(seconds > 0 for seconds in row["projected_s"].values())
    assert result["scst"]["projected_s"]["training"] > 3 * result["scst"]["projected_s"]["epoch"] > 0
    assert markdown(result) in output  # what it printed is the table of what it wrote


def test_readiness_docs_hold_the_table_of_the_committed_json():
    """docs/readiness.md's projections are the generated table of docs/readiness.json, pasted whole between its
    markers: the one place the other documents quote."""
    text = (ROOT / "docs" / "readiness.md").read_text()
    assert text.count(TABLE_START) == 1 and text.count(TABLE_END) == 1
    pasted = text.split(TABLE_START)[1].split(TABLE_END)[0].strip()
    assert pasted == markdown(read_json(ROOT / "docs" / "readiness.json")), \
        "paste the output of: python3 bench/readiness.py --table docs/readiness.json"


def test_arithmetic_spread(tmp_path):
    """Two measured paths around the committed numbers: the file keeps both, a label given again replaces its path,
    and the table it prints is the one --table makes of the file it wrote."""
    reference = read_json(ROOT / "demo_numbers.json")
    for name, moved in (("a", 1.0), ("b", -0.5)):
        numbers = json.loads(json.dumps(reference))
        numbers["p1"]["hw3_1"]["accuracy"] += moved
        numbers["inputs"]["clip_model"] = name * 64
        (tmp_path / f"{name}.json").write_text(json.dumps(numbers))
    out = tmp_path / "spread.json"
    run_bench("arithmetic_spread.py", f"path A={tmp_path / 'a.json'}", "--out", out)
    output = run_bench("arithmetic_spread.py", f"path A={tmp_path / 'b.json'}", f"path=B={tmp_path / 'a.json'}",
                       "--out", out)
    spread = read_json(out)
    assert list(spread["paths"]) == ["path A", "path=B"] and spread["paths"]["path A"]["clip_model"] == "b" * 64
    table = run_bench("arithmetic_spread.py", "--table", out)
    assert table.strip() in output and "| path=B | " in table and "| 2.00 |" in table  # 2 x path=B's 1.00 points


# ---- the toy world and a trained toy checkpoint ---------------------------------------------------------------------

def test_p2_scst_reward(toy_world_small):
    output = run_bench("p2_scst_reward.py", toy_world_small, "--captions", 200)
    assert re.search(r"toy references: [\d.]+% of \d+ identical to the Java PTB tokenizer's tokens", output), output
    assert re.search(r"200 captions scored in [\d.]+ s = [\d,]+ captions/s", output), output


def test_p2_toy_baselines(toy_world_small, tmp_path):
    run_bench("p2_toy_baselines.py", toy_world_small, "--top", 2, "--json-out", tmp_path / "baselines.json")
    result = json.loads((tmp_path / "baselines.json").read_text())
    assert {"CIDEr", "CLIPScore", "cider_caption", "clipscore_caption"} <= set(result)
    assert len(result["candidates"]) >= 2 and result["CIDEr"] > 0


def test_p2_toy_template_oracle(toy_world_small, tmp_path):
    keys = json.loads((toy_world_small / "hw3_data" / "p2_data" / "val.json").read_text())["images"]
    predictions = tmp_path / "predictions.json"
    predictions.write_text(json.dumps({Path(image["file_name"]).stem: "A red circle and a blue square."
                                       for image in keys}))
    run_bench("p2_toy_template_oracle.py", toy_world_small, "--predictions", predictions, "--json-out",
              tmp_path / "oracle.json")
    result = json.loads((tmp_path / "oracle.json").read_text())
    assert len(result["templates"]) == 6 and all(row["CIDEr_with_sizes"] > 0 for row in result["templates"])
    rewrite, = result["rewrites"]
    assert rewrite["rewritable"] == rewrite["images"] == len(keys) and len(rewrite["CIDEr"]) == 4


def test_p2_decode_sweep(toy_world_small, trained_run, tmp_path):
    runs, _ = trained_run
    data = toy_world_small / "hw3_data" / "p2_data"
    run_bench("p2_decode_sweep.py", "--checkpoint", runs / "lora_seed0" / "best.pt", "--decoder-bin",
              toy_world_small / "decoder_model.bin", "--images", data / "images" / "val", "--annotations",
              data / "val.json", "--encoder", toy_world_small / "clip.pt", "--clip-model", toy_world_small / "clip.pt",
              "--beams", 1, 2, "--workers", 0, "--device", "cpu", "--json-out", tmp_path / "sweep.json")
    rows = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    assert [row["beam_size"] for row in rows] == [1, 2] and all(row["CIDEr"] > 0 for row in rows)


@pytest.mark.slow  # two more trainings' worth of work: the self-critical stage, hw3_2.sh and p2_evaluate.py twice
def test_p2_scst_gains(toy_world_small, trained_run, tmp_path):
    runs, overrides = trained_run
    run_bench("p2_scst_gains.py", toy_world_small, "--runs", runs, "--methods", "lora", "--seeds", 0,
              "--scst-threads", 1, "--set", *overrides, "--json-out", tmp_path / "gains.json")
    row, = json.loads((tmp_path / "gains.json").read_text())
    assert row["method"] == "lora" and row["xe"]["CIDEr"] > 0 and row["scst"]["CIDEr"] > 0
    assert {"cider_gain", "clipscore_change", "scst_epoch_seconds"} <= set(row)
