"""The trained checkpoint in the course's format (hw3/p2/checkpoint.py): `torch.save` of {name: tensor} and nothing
else, counted as the course counts it (`p2_inference.py --count`); its config beside it, or for the published one in
checkpoints.json; the published one loaded only when its sha256 is the published one; files PyTorch cannot read
refused in one line; and a run's save on a full disk: one error line, the previous save's files intact."""
import errno
import json
import shutil
import struct
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

import p2_inference
from caption_fixtures import make_mini_world
from decoder import GPTConfig
from hw3.common.errors import run_cli
from hw3.common.errors import is_disk_full
from hw3.common.files import sha256_file, write_together
from hw3.common.manifest import config_path, parse_checkpoint
from hw3.p2 import checkpoint as checkpoints
from hw3.p2.checkpoint import (CheckpointError, count_checkpoint_params, load_captioner, publication_entry,
                               save_trainable)
from hw3.p2.model import CaptionConfig, build_caption_model, count_trainable, trainable_state_dict
from p2_train import main as p2_train

ROOT = Path(__file__).resolve().parents[1]
RUN_FILES = ("best.pt", "best.config.json", "last.pt", "last.config.json", "resume.pt", "summary.json",
             "val_predictions.json")


@pytest.fixture(scope="module")
def world(toy_world_small):
    """(encoder, decoder_model.bin) of the small toy world."""
    return str(toy_world_small / "clip.pt"), str(toy_world_small / "decoder_model.bin")


def tiny_model(world, **overrides):
    """A captioner with adapters, a reparameterised prefix and LoRA on the small world's LM, trainable tensors
    random."""
    config = CaptionConfig(encoder=world[0], decoder=GPTConfig(n_layer=2, n_head=2, n_embd=128), context_width=32,
                           cross_attn_width=32, cross_attn_heads=2, peft=["adapter", "prefix", "lora"],
                           adapter_size=4, prefix_length=2, prefix_hidden=8, lora_rank=2, **overrides)
    model = build_caption_model(config, world[1])
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn_like(param) * 0.02)
    return model.eval()


def one_error_line(err: str, prog: str) -> str:
    """The one `PROG: error:` line `err` ends with (progress bars before it are fine), without a traceback."""
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(f"{prog}: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err, err
    return errors[0]


def cli_error(main, argv, capsys, prog: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv), prog)
    assert exit_info.value.code == 2
    return one_error_line(capsys.readouterr().err, prog)


# ---- the format -----------------------------------------------------------------------------------------------------

def test_a_checkpoint_is_a_plain_dict_of_tensors_counted_as_the_course_counts(world, tmp_path):
    model = tiny_model(world)
    path = tmp_path / "best.pt"
    count = save_trainable(model, str(path))
    raw = torch.load(str(path), map_location="cpu")  # the course's check, as it runs it
    assert type(raw) is dict and set(raw) == set(trainable_state_dict(model))
    assert all(type(t) is torch.Tensor and t.device.type == "cpu" and t.is_contiguous() for t in raw.values())
    assert count == sum(t.numel() for t in raw.values()) == count_checkpoint_params(str(path))
    assert count < count_trainable(model)  # the prefix MLP is collapsed into the prefixes it computes
    assert json.loads((tmp_path / "best.config.json").read_text()) == {"caption_config": asdict(model.config)}

    save_trainable(model, str(tmp_path / "last.pt"), collapse_prefix=False)
    assert count_checkpoint_params(str(tmp_path / "last.pt")) == count_trainable(model)


@pytest.fixture(scope="module")
def mini_run(tmp_path_factory):
    """A finished one-epoch prefix-tuning run on the mini world (tests/caption_fixtures.py)."""
    folder = tmp_path_factory.mktemp("mini_run")
    mini = make_mini_world(folder / "mini")
    out = folder / "run"
    assert p2_train(run_args(mini, out, folder / "cache", "toy_prefix.yaml", "epochs=1")) == 0
    return out


def run_args(mini, out, cache, config, *overrides):
    return ["--config", str(ROOT / "configs" / config), "--toy-world", str(mini), "--out", str(out), "--set",
            f"cache_dir={cache}", "cider_tokenizer=simple", "batch_size=4", "model.encoder_layer=-1", *overrides]


def test_a_runs_checkpoints_hold_its_trainable_counts_and_count_prints_them(mini_run):
    summary = json.loads((mini_run / "summary.json").read_text())
    counts = {}
    for name in ("best.pt", "last.pt"):
        raw = torch.load(str(mini_run / name), map_location="cpu")
        assert type(raw) is dict and all(type(t) is torch.Tensor for t in raw.values()), name
        counts[name] = sum(t.numel() for t in raw.values())
    assert counts["best.pt"] == summary["checkpoint_params"] < counts["last.pt"] == summary["trainable_params"]

    result = subprocess.run([sys.executable, str(ROOT / "p2_inference.py"), "--count", str(mini_run / "best.pt")],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"{counts['best.pt']:,} parameters" in result.stdout and "under the limit of 35,000,000" in result.stdout


def test_count_says_when_a_checkpoint_is_over_the_limit_and_names_a_file_it_cannot_read(mini_run, tmp_path,
                                                                                         monkeypatch, capsys):
    monkeypatch.setattr(p2_inference, "MAX_TRAINABLE", 1000)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: p2_inference.main(["--count", str(mini_run / "best.pt")]), "p2_inference.py")
    assert exit_info.value.code == 1 and "OVER the limit of 1,000" in capsys.readouterr().out
    page = tmp_path / "page.pt"
    page.write_text("<!DOCTYPE html><html>Too many users have viewed this file</html>")
    line = cli_error(p2_inference.main, ["--count", str(page)], capsys, "p2_inference.py")
    assert f"{page} is not a captioner checkpoint" in line


# ---- where the config comes from -------------------------------------------------------------------------------------

def test_the_config_comes_from_the_file_beside_the_checkpoint(world, tmp_path):
    model = tiny_model(world)
    path = tmp_path / "run" / "best.pt"
    save_trainable(model, str(path))
    sidecar = json.loads(config_path(path).read_text())
    sidecar["caption_config"]["max_caption_length"] = 33  # a field that changes no tensor
    config_path(path).write_text(json.dumps(sidecar))
    assert load_captioner(str(path), world[1]).config == replace(model.config, max_caption_length=33)

    config_path(path).unlink()
    with pytest.raises(CheckpointError, match=r"no config for checkpoint .*best.pt: .*best.config.json is missing"):
        load_captioner(str(path), world[1])


@pytest.fixture
def published(world, tmp_path, monkeypatch):
    """A repository folder whose checkpoints.json publishes p2_best: the file alone (no config file beside it), with
    the entry's sha256 and config (max_caption_length 33, a field that changes no tensor). Returns (model, path,
    manifest)."""
    model = tiny_model(world)
    path = tmp_path / "repo" / "checkpoints" / "p2_best.pt"
    save_trainable(model, str(path))
    config_path(path).unlink()
    manifest = tmp_path / "repo" / "checkpoints.json"
    write_entry(manifest, url="https://example.org/p2_best.pt", sha256=sha256_file(path),
                config=dict(asdict(model.config), max_caption_length=33))
    monkeypatch.setattr(checkpoints, "MANIFEST", manifest)
    monkeypatch.setattr(checkpoints, "REPO_ROOT", manifest.parent)
    return model, path, manifest


def write_entry(manifest: Path, **entry) -> None:
    entry = dict({"name": "p2_best", "path": "checkpoints/p2_best.pt", "made_by": "p2_train.py"}, **entry)
    manifest.write_text(json.dumps({"checkpoints": [entry], "backbones": []}))


def test_the_published_checkpoint_loads_with_its_entrys_config(world, published):
    model, path, _ = published
    expected = replace(model.config, max_caption_length=33)
    loaded = load_captioner(None, world[1])
    assert loaded.config == expected
    assert all(torch.equal(loaded.state_dict()[k], t) for k, t in trainable_state_dict(model).items())
    assert load_captioner(str(path), world[1]).config == expected  # named explicitly: the entry still says how


def test_a_changed_default_checkpoint_is_refused_before_torch_load_runs(world, published, tmp_path, monkeypatch,
                                                                       capsys):
    model, path, manifest = published
    tensors = torch.load(str(path))
    tensors["image_ln.bias"] += 1.0
    torch.save(tensors, str(path))
    (tmp_path / "images").mkdir()
    argv = [str(tmp_path / "images"), str(tmp_path / "pred.json"), world[1]]
    with monkeypatch.context() as patch:
        patch.setattr(torch, "load", lambda *args, **kwargs: pytest.fail("torch.load ran on an unverified file"))
        line = cli_error(p2_inference.main, argv, capsys, "p2_inference.py")
        assert "does not match the sha256 published in checkpoints.json" in line and "bash hw3_download.sh" in line
        write_entry(manifest, url="", sha256="")  # nothing published: nothing to verify the file against
        with pytest.raises(CheckpointError, match=r"publishes no sha256 .* pass --checkpoint .*p2_best.pt"):
            load_captioner(None, world[1])
        path.unlink()
        with pytest.raises(CheckpointError, match=r"checkpoint not found: .*p2_best.pt \(run `bash hw3_download.sh`"):
            load_captioner(None, world[1])
    torch.save(tensors, str(path))  # the user's own file, named explicitly: loaded as given
    config_path(path).write_text(json.dumps({"caption_config": asdict(model.config)}))
    assert torch.equal(load_captioner(str(path), world[1]).image_ln.bias, tensors["image_ln.bias"])
    assert not (tmp_path / "pred.json").exists()


def test_publication_entry_is_a_valid_published_entry(world, tmp_path):
    model = tiny_model(world)
    path = tmp_path / "best.pt"
    save_trainable(model, str(path))
    entry = publication_entry(str(path), "p2_train.py --config configs/adapter.yaml")
    assert entry == {"name": "p2_best", "path": "checkpoints/p2_best.pt", "url": "", "sha256": sha256_file(path),
                     "made_by": "p2_train.py --config configs/adapter.yaml", "config": asdict(model.config)}
    parsed = parse_checkpoint(dict(entry, url="https://example.org/p2_best.pt"))
    assert CaptionConfig.from_dict(parsed.config) == model.config
    config_path(path).unlink()
    with pytest.raises(CheckpointError, match="best.config.json .* is missing"):
        publication_entry(str(path), "p2_train.py")


def safetensors_bytes() -> bytes:
    """A one-tensor file in the safetensors layout: an 8-byte header length, a JSON header, the data."""
    header = json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    return struct.pack("<Q", len(header)) + header + b"\0" * 4


def test_files_pytorch_cannot_read_end_in_one_line_naming_the_file(world, tmp_path):
    model = tiny_model(world)
    save_trainable(model, str(tmp_path / "good.pt"))
    cases = {"page.pt": b"<!DOCTYPE html><html><body>Quota exceeded</body></html>",
             "cut.pt": (tmp_path / "good.pt").read_bytes()[:3000], "model.safetensors": safetensors_bytes()}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    torch.save({"model": trainable_state_dict(model), "epoch": 3}, str(tmp_path / "state.pt"))  # not only tensors
    for name in [*cases, "state.pt"]:
        shutil.copy(tmp_path / "good.config.json", config_path(tmp_path / name))
        with pytest.raises(CheckpointError) as error:
            load_captioner(str(tmp_path / name), world[1])
        message = str(error.value)
        assert message.startswith(f"{tmp_path / name} is not a captioner checkpoint") and "\n" not in message, name


# ---- saving on a full disk -------------------------------------------------------------------------------------------

def test_disk_full_errors_are_recognised():
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:319] . unexpected pos 320 vs 248")
    except RuntimeError as wrapped:
        assert is_disk_full(wrapped)
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied")) and not is_disk_full(RuntimeError("x"))


def test_a_failing_write_leaves_every_target_as_it_was(tmp_path):
    (tmp_path / "a").write_text("old a")

    def fail(temporary):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        write_together([(tmp_path / "a", lambda temporary: Path(temporary).write_text("new a")),
                        (tmp_path / "b", fail)])
    assert [p.name for p in tmp_path.iterdir()] == ["a"] and (tmp_path / "a").read_text() == "old a"


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (skipped where mounting is not permitted)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)],
                                 capture_output=True, text=True, timeout=60)
    except OSError as error:
        pytest.skip(f"cannot run mount: {error}")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=60)


def test_a_save_on_a_full_disk_fails_in_one_line_and_keeps_the_previous_save(small_disk, tmp_path, capsys):
    mini = make_mini_world(tmp_path / "mini")
    out = small_disk / "run"
    args = run_args(mini, out, tmp_path / "cache", "toy_lora.yaml", "epochs=1")
    assert p2_train(args) == 0
    before = {name: (out / name).read_bytes() for name in RUN_FILES}
    filler = small_disk / "filler"
    with open(filler, "wb") as file:  # leaves 96 KiB: enough for the log and config.yaml, not for a checkpoint
        file.write(b"\0" * (shutil.disk_usage(small_disk).free - 96 * 1024))
    capsys.readouterr()

    line = cli_error(p2_train, ["--resume", "--out", str(out), "--epochs", "2"], capsys, "p2_train.py")
    assert f"no space left on the device of {out} (this save needs about " in line and " MB free there)" in line
    assert f"--resume --out {out}" in line
    assert {name: (out / name).read_bytes() for name in RUN_FILES} == before
    assert not [path.name for path in out.iterdir() if path.name.endswith(".tmp")]

    filler.unlink()  # space again: the run continues from the save that was kept
    assert p2_train(["--resume", "--out", str(out), "--epochs", "2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished_at"] and [e["epoch"] for e in summary["epochs"]] == [1, 2]
