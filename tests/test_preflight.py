"""preflight.py (hw3/pipeline/preflight.py) on the small toy world: the good world passes; copies broken in one way
each fail, naming what is wrong; the course data's counts are checked exactly."""
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hw3.p2.config import load_config
from hw3.p2.data import CaptionSplit, feature_cache_path
from hw3.pipeline.inputs import CONFIG_SETS, ENCODER_CANDIDATES, RunInputs
from hw3.pipeline.preflight import FAIL, check_feature_cache, passed, run_preflight

ROOT = Path(__file__).resolve().parents[1]


def world_inputs(world: Path, data: Path = None, decoder: Path = None) -> RunInputs:
    """The toy configs with the world's models, as `bash demo.sh` runs them."""
    return RunInputs(data=data or world / "hw3_data", configs=CONFIG_SETS["toy"],
                     decoder=decoder or world / "decoder_model.bin", encoder=str(world / "clip.pt"),
                     clip_model=str(world / "clip.pt"))


def failures(inputs: RunInputs) -> list:
    return [f"{finding.subject}: {finding.text}" for finding in run_preflight(inputs) if finding.level == FAIL]


@pytest.fixture
def world_copy(toy_world_small, tmp_path) -> Path:
    return Path(shutil.copytree(toy_world_small, tmp_path / "world"))


def test_the_small_toy_world_passes(toy_world_small, capsys):
    findings = run_preflight(world_inputs(toy_world_small))
    printed = capsys.readouterr().out
    assert passed(findings), printed
    assert "p2 val: 50 images (its toy world's boxes.json lists 50)" in printed
    assert "decoder weights: 28 tensors loaded" in printed  # the decoder's own load report
    assert "preflight: 0 problem(s)" in printed


@pytest.mark.parametrize("image, expected", [
    ("hw3_data/p2_data/images/val", "1 images of {data}/p2_data/val.json are not in {data}/p2_data/images/val"),
    ("hw3_data/p1_data/val", "p1 val: 199 images in {data}/p1_data/val, its toy world's boxes.json lists 200"),
])
def test_a_missing_image_fails(world_copy, capsys, image, expected):
    removed = sorted((world_copy / image).iterdir())[0]
    removed.unlink()
    data = world_copy / "hw3_data"
    found = failures(world_inputs(world_copy))
    assert len(found) == 1 and expected.format(data=data) in found[0], found
    if "p2_data" in image:
        assert removed.name in found[0]


def test_a_truncated_decoder_fails(world_copy):
    decoder = world_copy / "decoder_model.bin"
    decoder.write_bytes(decoder.read_bytes()[:decoder.stat().st_size // 2])
    found = failures(world_inputs(world_copy))
    assert len(found) == 1, found
    assert found[0].startswith(f"decoder: {decoder} is not a GPT-2 state_dict in the course's decoder_model.bin "
                               "format: PyTorch cannot load it")


def test_an_empty_folder_fails_through_the_command_line(toy_world_small, tmp_path):
    empty = tmp_path / "hw3_data"
    empty.mkdir()
    result = subprocess.run([sys.executable, str(ROOT / "preflight.py"), str(empty), "--configs", "toy",
                             "--encoder", str(toy_world_small / "clip.pt"), "--clip-model",
                             str(toy_world_small / "clip.pt")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    for expected in [f"FAIL  data: no P1 val folder {empty}/p1_data/val",
                     f"FAIL  data: caption annotation file not found: {empty}/p2_data/train.json",
                     f"FAIL  data: no P3 image folder {empty}/p3_data/images",
                     f"FAIL  decoder: a GPT-2 state_dict in the course's decoder_model.bin format not found: "
                     f"{empty}/p2_data/decoder_model.bin",
                     "37 tokens x 128 x 2 bytes x 12393 images (the course's P2 count; the data did not read)",
                     "preflight: 5 problem(s)"]:
        assert expected in result.stdout, result.stdout


def test_course_data_counts_are_checked_exactly(toy_world_small, tmp_path, capsys):
    """The small world's hw3_data outside its world folder is course data to the preflight: its counts are wrong."""
    data = Path(shutil.copytree(toy_world_small / "hw3_data", tmp_path / "hw3_data"))
    found = failures(world_inputs(toy_world_small, data=data))
    assert found == [f"data: p1 val: 200 images in {data}/p1_data/val, the course data has 2500",
                     f"data: p2 train: 400 images in {data}/p2_data/images/train, the course data has 10604",
                     f"data: p2 val: 50 images in {data}/p2_data/images/val, the course data has 1789"]
    assert ("WARN  gpu: none" in capsys.readouterr().out) != torch.cuda.is_available()


def test_the_feature_cache_size_counts_what_the_cache_key_does_not_find(tmp_path):
    """The disk check asks hw3.p2.data.feature_cache_path, the key feature_cache itself uses, which split is cached."""
    cache = tmp_path / "cache"
    config = SimpleNamespace(model=SimpleNamespace(encoder="ViT-B/32", encoder_layer=-1), cache_dir=str(cache),
                             cache_features=True)
    train = CaptionSplit(str(tmp_path / "train"), ["a.jpg", "b.jpg", "c.jpg"], [["a"], ["b"], ["c"]])
    val = CaptionSplit(str(tmp_path / "val"), ["d.jpg"], [["d"]])
    per_image = 50 * 768 * 2  # ViT-B/32 at 224 px: 7 x 7 patches + CLS, width 768, fp16

    def cache_line() -> str:
        return str(check_feature_cache([config], [train, val], 0)[0])

    assert f"x 4 images not cached yet = {4 * per_image / 1e6:.1f} MB" in cache_line()
    cache.mkdir()
    Path(feature_cache_path(str(cache), "ViT-B/32", -1, 224, train.paths)).write_bytes(b"")
    assert f"x 1 images not cached yet = {per_image / 1e6:.1f} MB" in cache_line()
    Path(feature_cache_path(str(cache), "ViT-B/32", -1, 224, val.paths)).write_bytes(b"")
    assert "already in" in cache_line()
    Path(feature_cache_path(str(cache), "ViT-B/32", -2, 224, val.paths)).write_bytes(b"")  # another layer's: no
    config.model.encoder_layer = -2
    assert "x 3 images not cached yet" in cache_line()


def test_every_encoder_of_the_course_runs_gets_its_cache_sized_and_the_disk_their_total(tmp_path):
    """The course data's runs with --candidates (three ViT-L/14 recipes and the encoder candidates) share one cache
    folder: one size line per encoder, and the disk line asks for their sum."""
    configs = [load_config(str(ROOT / path), [f"cache_dir={tmp_path / 'cache'}"])
               for path in CONFIG_SETS["real"] + ENCODER_CANDIDATES]
    train = CaptionSplit(str(tmp_path / "train"), ["a.jpg", "b.jpg"], [["a"], ["b"]])
    findings = [str(finding) for finding in check_feature_cache(configs, [train], 0)]
    shapes = {"ViT-L/14": 257 * 1024, "timm:vit_so400m_patch14_siglip_384.webli": 729 * 1152,
              "timm:vit_huge_patch14_clip_quickgelu_378.dfn5b": 730 * 1280}
    for encoder, size in shapes.items():
        assert any(encoder in line and f"= {2 * size * 2 / 1e6:.1f} MB" in line for line in findings), encoder
    total = sum(2 * size * 2 for size in shapes.values())
    assert any("disk" in line and f"needs {total / 1e6:.1f} MB" in line for line in findings), findings
