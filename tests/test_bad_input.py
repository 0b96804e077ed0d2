"""Bad input never costs data: each class of bad input, through the real entry points
(`bash hw3_1.sh`, `bash hw3_2.sh`, `p2_evaluate.py`, `p2_train.py`) on the small toy world: the exit status, the
message, and that no partial or wrong output is left behind."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from caption_fixtures import make_mini_world
from decoder import GPTConfig
from hw3.common.files import write_atomically, write_json_atomically
from hw3.p2.checkpoint import save_trainable
from hw3.p2.generation import clean_caption
from hw3.p2.model import CaptionConfig, build_caption_model
from hw3.p2.run_files import RunFiles
from scoring_fixtures import pycocoevalcap_cider

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
NOT_UTF8 = b"caf\xe9 \xff"  # latin-1 bytes, as a zip made on another system leaves them


def run(*command, timeout=300):
    return subprocess.run([str(part) for part in command], capture_output=True, text=True, env=ENV, cwd=ROOT,
                          timeout=timeout, errors="backslashreplace")


def hw3_1(world, image_dir, output, *options):
    return run("bash", ROOT / "hw3_1.sh", image_dir, world / "hw3_data" / "p1_data" / "id2label.json", output,
               "--model", world / "clip.pt", "--workers", 0, *options)


def hw3_2(world, checkpoint, image_dir, output, *options, decoder=None):
    return run("bash", ROOT / "hw3_2.sh", image_dir, output, decoder or world / "decoder_model.bin",
               "--checkpoint", checkpoint, "--encoder", world / "clip.pt", "--workers", 0, "--beam-size", 1,
               "--max-length", 8, *options)


def p2_train(*args):
    return run(sys.executable, ROOT / "p2_train.py", *args)


def one_error_line(result, prog: str) -> str:
    """The CLI's error: exit status 2, a `PROG: error:` line, no traceback."""
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith(f"{prog}: error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.fixture(scope="module")
def checkpoint(toy_world_small, tmp_path_factory):
    """A small random captioner for the small world's tiny LM (its captions are the LM's)."""
    config = CaptionConfig(encoder="/nonexistent/clip.pt", decoder=GPTConfig(n_layer=2, n_head=2, n_embd=128),
                           context_width=64, cross_attn_width=64, cross_attn_heads=2, peft=["adapter"],
                           adapter_size=8)
    model = build_caption_model(config, str(toy_world_small / "decoder_model.bin"),
                                encoder=str(toy_world_small / "clip.pt"))
    path = tmp_path_factory.mktemp("checkpoint") / "toy.pt"
    save_trainable(model, str(path))
    return path


@pytest.fixture()
def images(toy_world_small, tmp_path):
    """Three val images of the small world, as JPEG, WebP and BMP, in a fresh folder."""
    folder = tmp_path / "images"
    folder.mkdir()
    sources = sorted((toy_world_small / "hw3_data" / "p2_data" / "images" / "val").glob("*.jpg"))[:3]
    shutil.copy(sources[0], folder / "a.jpg")
    Image.open(sources[1]).save(folder / "b.webp")
    Image.open(sources[2]).save(folder / "c.bmp")
    return folder


# ---- 1. file names that are not valid UTF-8 ------------------------------------------------------------------------

def test_names_that_are_not_utf8_keep_the_key_the_scorer_computes(toy_world_small, checkpoint, images, tmp_path):
    odd = os.path.join(os.fsencode(images), NOT_UTF8 + b".jpg")
    shutil.copy(images / "a.jpg", odd)
    stem = os.fsdecode(NOT_UTF8)  # what Python (the course's scorer) makes of the name: surrogate escapes

    result = hw3_2(toy_world_small, checkpoint, images, tmp_path / "pred.json")
    assert result.returncode == 0, result.stderr
    predictions = json.loads((tmp_path / "pred.json").read_text())  # valid JSON: ASCII escapes
    assert set(predictions) == {"a", "b", "c", stem}
    # the course's scorer: keys are file_name minus .jpg from an annotation file, images read from root/file_name
    references = {key: ["a small shape on a noisy background"] for key in predictions}
    annotations = {"images": [{"file_name": f"{key}.{'jpg' if key in ('a', stem) else {'b': 'webp', 'c': 'bmp'}[key]}",
                               "id": i} for i, key in enumerate(sorted(predictions))],
                   "annotations": [{"caption": references[key][0], "id": i, "image_id": i}
                                   for i, key in enumerate(sorted(predictions))]}
    write_json_atomically(tmp_path / "val.json", annotations)
    scored = run(sys.executable, ROOT / "p2_evaluate.py", "--pred_file", tmp_path / "pred.json", "--images_root",
                 images, "--annotation_file", tmp_path / "val.json", "--clip-model", toy_world_small / "clip.pt",
                 "--num-workers", 0)
    assert scored.returncode == 0, scored.stderr
    assert scored.stdout.strip().splitlines()[-1].startswith("CIDEr: ")

    result = hw3_1(toy_world_small, images, tmp_path / "pred.csv")
    assert result.returncode == 0, result.stderr
    lines = (tmp_path / "pred.csv").read_bytes().splitlines()
    assert lines[0] == b"filename,label" and len(lines) == 5
    assert sorted(line.split(b",")[0].strip(b'"') for line in lines[1:]) == sorted(
        [b"a.jpg", b"b.webp", b"c.bmp", NOT_UTF8 + b".jpg"])  # the file name's own bytes


# ---- 2. outputs appear whole or not at all ---------------------------------------------------------------------------

def test_a_failed_write_leaves_the_previous_file_and_no_partial_one(tmp_path):
    target = tmp_path / "pred.json"
    target.write_text('{"old": "kept"}')

    def fails_halfway(temporary):
        Path(temporary).write_text('{"new": "half')
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, fails_halfway)
    with pytest.raises(TypeError):
        write_json_atomically(target, {"not serialisable": object()})
    assert target.read_text() == '{"old": "kept"}' and sorted(p.name for p in tmp_path.iterdir()) == ["pred.json"]


# ---- 3. nothing in the folder is skipped without a line, P1 and P2 alike --------------------------------------------

def test_p1_and_p2_take_the_same_files_and_name_the_others(toy_world_small, checkpoint, images, tmp_path):
    (images / "notes.txt").write_text("not an image")
    (images / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (images / "nested").mkdir()
    (images / "broken.png").write_bytes(b"\x89PNG but cut off")
    p1 = hw3_1(toy_world_small, images, tmp_path / "pred.csv")
    p2 = hw3_2(toy_world_small, checkpoint, images, tmp_path / "pred.json")
    assert p1.returncode == 0 and p2.returncode == 0, p1.stderr + p2.stderr
    for result in (p1, p2):
        for skipped in ("notes.txt (not an image by its suffix)", ".DS_Store (not an image by its suffix)",
                        "nested (a folder)"):
            assert f"warning: skipped {skipped}" in result.stderr
        assert "broken.png" in result.stderr  # an image suffix that does not decode
    p1_names = {line.split(",")[0] for line in (tmp_path / "pred.csv").read_text().splitlines()[1:]}
    p2_keys = set(json.loads((tmp_path / "pred.json").read_text()))
    assert p1_names == {"a.jpg", "b.webp", "c.bmp"}  # the undecodable file has no class to give
    assert p2_keys == {"a", "b", "c", "broken"}  # ... and the fallback caption keeps the scorer's key check


# ---- 4. garbage where a model file should be -------------------------------------------------------------------------

def garbage_files(folder: Path):
    """An HTML page from a failed download, random bytes, a pickled list, a state_dict without GPT-2's keys, a cut
    -off file: (path, what the message must say)."""
    folder.mkdir(exist_ok=True)
    (folder / "page.bin").write_text("<!DOCTYPE html><html><body>Too many users have viewed this file</body></html>")
    (folder / "random.bin").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    torch.save([1, 2, 3], folder / "list.bin")
    torch.save({"weight": torch.zeros(2)}, folder / "other.bin")
    return [(folder / "page.bin", "PyTorch cannot load it"), (folder / "random.bin", "PyTorch cannot load it"),
            (folder / "list.bin", "holds a list, not a dict of tensors"), (folder / "other.bin", "no wte.weight")]


def test_garbage_model_files_end_in_one_line_naming_the_file(toy_world_small, checkpoint, images, tmp_path):
    for path, says in garbage_files(tmp_path / "garbage"):
        result = hw3_2(toy_world_small, checkpoint, images, tmp_path / "pred.json", decoder=path)
        line = one_error_line(result, "p2_inference.py")
        assert str(path) in line and says in line, line
    assert not (tmp_path / "pred.json").exists()
    for path, says in garbage_files(tmp_path / "garbage")[:3]:  # the encoder: a CLIP state_dict path
        result = run("bash", ROOT / "hw3_2.sh", images, tmp_path / "pred.json", toy_world_small / "decoder_model.bin",
                     "--checkpoint", checkpoint, "--encoder", path, "--workers", 0)
        line = one_error_line(result, "p2_inference.py")
        assert str(path) in line and says in line and "CLIP" in line, line
        result = hw3_1(toy_world_small, images, tmp_path / "pred.csv", "--model", path)
        assert str(path) in one_error_line(result, "p1_clip.py")
    assert not (tmp_path / "pred.json").exists() and not (tmp_path / "pred.csv").exists()


def test_garbage_decoder_weights_stop_training_before_it_starts(tmp_path):
    world = make_mini_world(tmp_path / "mini")
    for path, says in garbage_files(tmp_path / "garbage"):
        shutil.copy(path, world / "decoder_model.bin")
        result = p2_train("--config", ROOT / "configs" / "toy_lora.yaml", "--toy-world", world, "--out",
                          tmp_path / "run")
        line = one_error_line(result, "p2_train.py")
        assert "decoder_model.bin" in line and says in line, line
    assert not (tmp_path / "run").exists()


# ---- 5. captions with characters the Java PTB tokenizer takes as line breaks ----------------------------------------

def test_line_breaks_in_captions_keep_the_course_number_and_are_named(toy_world_small, tmp_path):
    p2 = toy_world_small / "hw3_data" / "p2_data"
    annotations = json.loads((p2 / "val.json").read_text())
    names = {image["id"]: image["file_name"] for image in annotations["images"]}
    references = {}
    for annotation in annotations["annotations"]:
        references.setdefault(Path(names[annotation["image_id"]]).stem, []).append(annotation["caption"])
    keys = sorted(references)
    predictions = {key: references[key][0] for key in keys}
    predictions[keys[0]] = predictions[keys[0]].replace(" ", "\r", 1)
    predictions[keys[1]] = predictions[keys[1]].replace(" ", "\u2028", 1)
    (tmp_path / "pred.json").write_text(json.dumps(predictions))
    result = run(sys.executable, ROOT / "p2_evaluate.py", "--pred_file", tmp_path / "pred.json", "--images_root",
                 p2 / "images" / "val", "--annotation_file", p2 / "val.json", "--clip-model",
                 toy_world_small / "clip.pt", "--num-workers", 0)
    assert result.returncode == 0, result.stderr
    warning = next(line for line in result.stderr.splitlines() if "line break" in line)
    assert keys[0] in warning and keys[1] in warning and "OTHER images" in warning
    cider = float(result.stdout.strip().splitlines()[-1].split()[1])
    course, _ = pycocoevalcap_cider(predictions, references)  # the course's pipeline, flaw included
    assert cider == pytest.approx(course, abs=1e-9)
    clean = {key: caption.replace("\r", " ").replace("\u2028", " ") for key, caption in predictions.items()}
    assert abs(pycocoevalcap_cider(clean, references)[0] - course) > 0.05  # the flaw moves the number


def test_our_captions_never_hold_line_breaks():
    assert clean_caption(" A red\rsquare\u2028on\x0ba\x0cnoisy\u2029background.\n<|endoftext|>") == \
        "A red square on a noisy background."


# ---- 6. p2_train.py --out pointing at a run --------------------------------------------------------------------------

def test_train_never_replaces_a_run_silently(tmp_path):
    world = make_mini_world(tmp_path / "mini")
    out = tmp_path / "run"
    base = ["--config", ROOT / "configs" / "toy_lora.yaml", "--toy-world", world, "--out", out, "--set",
            f"cache_dir={tmp_path / 'cache'}", "cider_tokenizer=simple", "batch_size=4", "model.encoder_layer=-1",
            "epochs=1"]
    assert p2_train(*base).returncode == 0
    files = RunFiles(str(out))
    before = {path.name: path.read_bytes() for path in out.iterdir() if path.name != ".lock"}  # .lock: who claims

    again = p2_train(*base)  # the same config, finished: nothing to do
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stderr
    other = p2_train(*base, "lr=0.01")  # another config: refused
    line = one_error_line(other, "p2_train.py")
    assert "with another config (differs in lr)" in line and "--overwrite" in line and "new --out" in line
    assert {path.name: path.read_bytes() for path in out.iterdir() if path.name != ".lock"} == before

    summary = json.loads(files.summary.read_text())
    files.summary.write_text(json.dumps(dict(summary, finished_at=None)))  # as Ctrl-C leaves it
    line = one_error_line(p2_train(*base), "p2_train.py")
    assert "unfinished run" in line and f"--resume --out {out}" in line

    replaced = p2_train(*base, "lr=0.01", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert json.loads(files.summary.read_text())["finished_at"]
    assert files.best.read_bytes() != before["best.pt"]


# ---- 7. errors that came late or said too little --------------------------------------------------------------------

def test_bad_output_paths_fail_before_the_work(toy_world_small, checkpoint, images, tmp_path):
    (tmp_path / "a_file").write_text("in the way")
    for output, says in ((tmp_path, "is a folder"), (tmp_path / "a_file" / "pred.json", "is a file, not a folder")):
        result = hw3_2(toy_world_small, checkpoint, images, output)
        assert says in one_error_line(result, "p2_inference.py") and "loaded in" not in result.stdout  # no model
        result = hw3_1(toy_world_small, images, output)
        assert says in one_error_line(result, "p1_clip.py") and "classes" not in result.stdout  # nothing encoded
    p2 = toy_world_small / "hw3_data" / "p2_data"
    result = run(sys.executable, ROOT / "p2_evaluate.py", "--pred_file", tmp_path / "missing.json", "--images_root",
                 p2 / "images" / "val", "--annotation_file", p2 / "val.json", "--per-image-csv", tmp_path)
    assert "is a folder" in one_error_line(result, "p2_evaluate.py")


def test_cut_off_or_wrongly_encoded_files_are_named(toy_world_small, tmp_path):
    p2 = toy_world_small / "hw3_data" / "p2_data"
    predictions = {Path(image["file_name"]).stem: "a shape"
                   for image in json.loads((p2 / "val.json").read_text())["images"]}
    (tmp_path / "utf16.json").write_text(json.dumps(predictions), encoding="utf-16")
    (tmp_path / "cut.json").write_text((p2 / "val.json").read_text()[:500])
    (tmp_path / "pred.json").write_text(json.dumps(predictions))
    for pred, annotation, says in ((tmp_path / "utf16.json", p2 / "val.json", "is not UTF-8 text"),
                                   (tmp_path / "pred.json", tmp_path / "cut.json", "is not valid JSON")):
        result = run(sys.executable, ROOT / "p2_evaluate.py", "--pred_file", pred, "--images_root",
                     p2 / "images" / "val", "--annotation_file", annotation, "--tokenizer", "simple")
        line = one_error_line(result, "p2_evaluate.py")
        assert says in line and (str(pred) in line or str(annotation) in line), line


@pytest.mark.parametrize("damage, says", [
    ("missing_image", "images of"), ("unknown_image_id", "unknown image_id 424242"),
    ("no_annotations", "has no captioned images"), ("fractional_batch", "batch_size must be a whole number")])
def test_training_data_errors_come_before_training(tmp_path, damage, says):
    world = make_mini_world(tmp_path / "mini")
    train_json = world / "hw3_data" / "p2_data" / "train.json"
    annotations = json.loads(train_json.read_text())
    overrides = ["--set", "model.encoder_layer=-1"]  # the mini world's CLIP has one block
    if damage == "missing_image":
        os.remove(world / "hw3_data" / "p2_data" / "images" / "train" / annotations["images"][0]["file_name"])
    elif damage == "unknown_image_id":
        annotations["annotations"].append({"caption": "a square", "id": 1, "image_id": 424242})
    elif damage == "no_annotations":
        annotations["annotations"] = []
    else:
        overrides.append("batch_size=3.5")
    train_json.write_text(json.dumps(annotations))
    result = p2_train("--config", ROOT / "configs" / "toy_lora.yaml", "--toy-world", world, "--out",
                      tmp_path / "run", *overrides)
    line = one_error_line(result, "p2_train.py")
    assert says in line, line
    assert "epoch 1" not in result.stdout + result.stderr and not (tmp_path / "run" / "log.jsonl").exists()
