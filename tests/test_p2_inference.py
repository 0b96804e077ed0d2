"""Problem 2 inference through `bash hw3_2.sh` on the small toy world: every image gets a caption, the scorer accepts
the JSON, unreadable files still get an entry, and bad checkpoints fail naming what is wrong."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import p2_inference
from decoder import GPTConfig
from hw3.common.errors import run_cli
from hw3.common.manifest import checkpoint_path, config_path
from hw3.p2.checkpoint import read_checkpoint, save_trainable
from hw3.p2.generation import DecodeConfig
from hw3.p2.model import CaptionConfig, build_caption_model

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def run_hw3_2(image_dir, output, decoder_bin, *options):
    return subprocess.run(["bash", str(ROOT / "hw3_2.sh"), str(image_dir), str(output), str(decoder_bin),
                           *map(str, options)], capture_output=True, text=True, env=ENV, cwd=ROOT)


@pytest.fixture(scope="module")
def toy_checkpoint(toy_world_small, tmp_path_factory):
    """A checkpoint for the toy world's tiny LM with adapters, prefixes and LoRA, all random but small (the captions
    stay the LM's). Its config names a CLIP path that does not exist: runs pass --encoder DIR/clip.pt."""
    config = CaptionConfig(encoder="/nonexistent/clip.pt", decoder=GPTConfig(n_layer=2, n_head=2, n_embd=128),
                           context_width=64, cross_attn_width=64, cross_attn_heads=2,
                           peft=["adapter", "prefix", "lora"], adapter_size=16, prefix_length=3, prefix_hidden=8)
    model = build_caption_model(config, str(toy_world_small / "decoder_model.bin"),
                                encoder=str(toy_world_small / "clip.pt"))
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn_like(param) * 0.02)
    path = tmp_path_factory.mktemp("checkpoint") / "toy.pt"
    save_trainable(model, str(path))
    return path


@pytest.fixture(scope="module")
def p2(toy_world_small):
    return toy_world_small / "hw3_data" / "p2_data"


def toy_options(toy_world_small, checkpoint, *extra):
    return ["--checkpoint", checkpoint, "--encoder", toy_world_small / "clip.pt", "--workers", 0, *extra]


@pytest.mark.slow
def test_hw3_2_captions_all_val_images_and_the_scorer_scores_them(toy_world_small, toy_checkpoint, p2, tmp_path):
    output = tmp_path / "new" / "nested" / "pred.json"
    result = run_hw3_2(p2 / "images" / "val", output, toy_world_small / "decoder_model.bin",
                       *toy_options(toy_world_small, toy_checkpoint, "--beam-size", 3, "--batch-size", 16))
    assert result.returncode == 0, result.stderr
    assert re.search(r"images/s", result.stdout) and str(output) in result.stdout
    predictions = json.loads(output.read_text())
    val = json.loads((p2 / "val.json").read_text())
    assert set(predictions) == {Path(image["file_name"]).stem for image in val["images"]}
    assert all(isinstance(caption, str) and caption for caption in predictions.values())

    scored = subprocess.run([sys.executable, str(ROOT / "p2_evaluate.py"), "--pred_file", str(output),
                             "--images_root", str(p2 / "images" / "val"), "--annotation_file", str(p2 / "val.json"),
                             "--clip-model", str(toy_world_small / "clip.pt"), "--device", "cpu"],
                            capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert scored.returncode == 0, scored.stderr
    cider, clip_score = map(float, re.search(r"CIDEr: ([\d.]+) \| CLIPScore: ([\d.]+)", scored.stdout).groups())
    assert cider > 0.05, "the toy LM's captions share words with the references"


def test_unreadable_files_get_an_entry_and_other_files_are_ignored(toy_world_small, toy_checkpoint, p2, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    sources = sorted((p2 / "images" / "val").glob("*.jpg"))[:3]
    shutil.copy(sources[0], folder / "plain name.jpg")
    shutil.copy(sources[1], folder / "UPPER.JPEG")
    Image.open(sources[2]).convert("RGBA").save(folder / "converted.png")
    (folder / "broken.jpg").write_bytes(b"not a jpeg at all")
    (folder / "notes.txt").write_text("not an image")
    output = tmp_path / "out" / "pred.json"
    result = run_hw3_2(folder, output, toy_world_small / "decoder_model.bin",
                       *toy_options(toy_world_small, toy_checkpoint, "--beam-size", 2, "--max-length", 12))
    assert result.returncode == 0, result.stderr
    predictions = json.loads(output.read_text())
    assert set(predictions) == {"plain name", "UPPER", "converted", "broken"}
    assert predictions["broken"] == p2_inference.FALLBACK_CAPTION
    assert "broken.jpg" in result.stderr
    assert all(predictions[name] != p2_inference.FALLBACK_CAPTION for name in ("plain name", "UPPER", "converted"))


def checkpoint_error(toy_world_small, checkpoint, tmp_path, capsys) -> str:
    """The error p2_inference.py exits with (in-process: faster than the script): exit status 2, one
    `p2_inference.py: error:` message, no traceback, no output file."""
    (tmp_path / "images").mkdir(exist_ok=True)
    argv = [str(tmp_path / "images"), str(tmp_path / "pred.json"), str(toy_world_small / "decoder_model.bin"),
            *map(str, toy_options(toy_world_small, checkpoint))]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: p2_inference.main(argv), "p2_inference.py")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("p2_inference.py: error: ") and "Traceback" not in err
    assert not (tmp_path / "pred.json").exists()
    return err


def rewrite_checkpoint(source, target, change):
    """`change`d tensors of checkpoint `source` at `target`, with the config beside it."""
    tensors = read_checkpoint(str(source))[1]
    torch.save(change(dict(tensors)), str(target))
    shutil.copy(config_path(source), config_path(target))
    return target


def test_bad_checkpoints_fail_naming_the_keys(toy_world_small, toy_checkpoint, tmp_path, capsys):
    key = "decoder.transformer.h.1.cross_attn.q_proj.weight"

    def renamed(tensors):
        tensors[key.replace("q_proj", "query_proj")] = tensors.pop(key)
        return tensors

    message = checkpoint_error(toy_world_small, rewrite_checkpoint(toy_checkpoint, tmp_path / "r.pt", renamed),
                               tmp_path, capsys)
    assert "unknown tensors" in message and "query_proj" in message
    assert "lacks trained tensors" in message and key in message

    adapter_key = sorted(name for name in read_checkpoint(str(toy_checkpoint))[1] if "adapter" in name)[0]

    def dropped(tensors):
        del tensors[adapter_key]
        return tensors

    message = checkpoint_error(toy_world_small, rewrite_checkpoint(toy_checkpoint, tmp_path / "d.pt", dropped),
                               tmp_path, capsys)
    assert "lacks trained tensors" in message and adapter_key in message and "unknown" not in message

    def reshaped(tensors):
        tensors[key] = tensors[key][:, :-1].contiguous()
        return tensors

    message = checkpoint_error(toy_world_small, rewrite_checkpoint(toy_checkpoint, tmp_path / "s.pt", reshaped),
                               tmp_path, capsys)
    assert "wrong shape" in message and key in message

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(toy_checkpoint.read_bytes()[:5000])
    shutil.copy(config_path(toy_checkpoint), config_path(truncated))
    message = checkpoint_error(toy_world_small, truncated, tmp_path, capsys)
    assert f"{truncated} is not a captioner checkpoint" in message and len(message.splitlines()) == 1


def test_missing_checkpoint_says_to_run_the_download_script(toy_world_small, tmp_path):
    result = run_hw3_2(tmp_path, tmp_path / "pred.json", toy_world_small / "decoder_model.bin",
                       "--checkpoint", tmp_path / "nowhere.pt")
    assert result.returncode != 0 and "hw3_download.sh" in result.stderr and "nowhere.pt" in result.stderr
    assert not (tmp_path / "pred.json").exists()


def test_default_checkpoint_is_the_download_manifests():
    manifest = json.loads((ROOT / "checkpoints.json").read_text())
    p2_best = next(entry for entry in manifest["checkpoints"] if entry["name"] == "p2_best")
    assert checkpoint_path() == ROOT / p2_best["path"]


def test_cli_help_and_bad_options(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "p2_inference.py"), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--beam-size" in result.stdout and "--checkpoint" in result.stdout
    for bad in (["--beam-size", "0"], ["--batch-size", "0"], ["--max-length", "0"]):
        with pytest.raises(SystemExit):
            p2_inference.parse_args([str(tmp_path), "out.json", "decoder_model.bin", *bad])


def test_help_survives_a_malformed_manifest_and_shows_decode_config_defaults(tmp_path):
    broken = tmp_path / "repo"  # the CLI and hw3/ beside a malformed checkpoints.json
    shutil.copytree(ROOT / "hw3", broken / "hw3", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "p2_inference.py", broken)
    (broken / "checkpoints.json").write_text("{not json")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # decoder.py and tokenizer.py from the repository
    result = subprocess.run([sys.executable, str(broken / "p2_inference.py"), "--help"], capture_output=True,
                            text=True, cwd=broken, env=env)
    help_text = " ".join(result.stdout.split())
    assert result.returncode == 0 and "no default: cannot read manifest" in help_text, result.stderr
    assert f"beam size (1 = greedy) (default: {DecodeConfig().beam_size})" in help_text
    assert f"(default: {DecodeConfig().max_length})" in help_text
    result = subprocess.run([sys.executable, str(broken / "p2_inference.py"), str(tmp_path), str(tmp_path / "o.json"),
                             "decoder_model.bin"], capture_output=True, text=True, cwd=broken, env=env)
    assert result.returncode == 2 and result.stderr.startswith("p2_inference.py: error: cannot read manifest")
    assert "Traceback" not in result.stderr and not (tmp_path / "o.json").exists()
