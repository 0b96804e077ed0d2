"""hw3_download.sh (hw3_download.py, hw3/common/download.py) against a local HTTP server on 127.0.0.1, the manifest
checks, the backbone pre-load, and the course's script rules for every hw3_*.sh."""
import hashlib
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import types
from pathlib import Path
from typing import Optional

import pytest

import hw3_download
from hw3.common import download, manifest as checkpoints_manifest
from hw3.common.download import BAD_INPUT, FAILED, NOT_PUBLISHED, OK
from hw3.common.errors import run_cli
from hw3.common.files import sha256_file
from hw3.common.manifest import ManifestError

ROOT = Path(__file__).resolve().parents[1]
GOOD = b"trained weights " * 4096
SHA_GOOD = hashlib.sha256(GOOD).hexdigest()
# The scripts call `python3`: make it the interpreter running the tests; keep the loopback server off any proxy.
ENV = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           no_proxy="127.0.0.1,localhost", NO_PROXY="127.0.0.1,localhost")


class FileServer:
    """Serves `files` ({url path: bytes}) on an ephemeral 127.0.0.1 port; records every requested path."""

    def __init__(self, files):
        self.files, self.requests = files, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                body = server.files.get(self.path)
                self.send_response(200 if body is not None else 404)
                body = body if body is not None else b"not found"
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.deadline = threading.Timer(120, self.httpd.shutdown)  # stops by itself even if a test hangs
        self.deadline.daemon = True
        self.deadline.start()

    def stop(self):
        self.deadline.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    server = FileServer({"/good.bin": GOOD, "/corrupt.bin": GOOD[:-1] + b"X"})
    yield server
    server.stop()


def write_manifest(tmp_path, **entry):
    checkpoint = dict({"name": "p2_best", "path": "checkpoints/p2_best.pt", "made_by": "p2_train.py",
                       "config": {"encoder": "ViT-B/32", "peft": ["adapter"]}}, **entry)
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"checkpoints": [checkpoint], "backbones": [{"library": "clip", "name": "ViT-B/32"}]}))
    return path


def run_script(manifest, dest_root):
    return subprocess.run(["bash", str(ROOT / "hw3_download.sh"), "--manifest", str(manifest),
                           "--dest-root", str(dest_root), "--skip-backbones"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)


def run_main(argv) -> int:
    """hw3_download.py's exit status for `argv`, run in this process as its __main__ block runs it."""
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: hw3_download.main(argv), "hw3_download.py")
    return exit_.value.code


def test_good_download_then_second_run_skips_it(server, tmp_path):
    manifest = write_manifest(tmp_path, url=server.url + "/good.bin", sha256=SHA_GOOD)
    dest = tmp_path / "out" / "checkpoints" / "p2_best.pt"
    first = run_script(manifest, tmp_path / "out")
    assert first.returncode == OK, first.stderr
    assert dest.read_bytes() == GOOD
    assert os.listdir(dest.parent) == [dest.name]  # no temporary folder left beside it
    assert server.requests == ["/good.bin"]

    second = run_script(manifest, tmp_path / "out")
    assert second.returncode == OK, second.stderr
    assert "already present, sha256 verified" in second.stdout
    assert server.requests == ["/good.bin"]  # no new request
    assert dest.read_bytes() == GOOD


@pytest.mark.parametrize("path, message", [("/corrupt.bin", "sha256 MISMATCH"), ("/missing.bin", "download FAILED")])
def test_corrupt_or_missing_download_leaves_nothing(server, tmp_path, path, message):
    manifest = write_manifest(tmp_path, url=server.url + path, sha256=SHA_GOOD)
    result = run_script(manifest, tmp_path / "out")
    assert result.returncode == FAILED
    assert message in result.stderr
    assert server.requests == [path]
    assert os.listdir(tmp_path / "out" / "checkpoints") == []  # no file at the destination, no temporary left


def test_file_with_another_hash_is_replaced_and_kept_aside(server, tmp_path):
    manifest = write_manifest(tmp_path, url=server.url + "/good.bin", sha256=SHA_GOOD)
    dest = tmp_path / "out" / "checkpoints" / "p2_best.pt"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"a checkpoint trained here")
    result = run_script(manifest, tmp_path / "out")
    assert result.returncode == OK, result.stderr
    assert dest.read_bytes() == GOOD
    assert dest.with_name(dest.name + ".old").read_bytes() == b"a checkpoint trained here"


def test_unpublished_checkpoint_is_reported_not_silently_ok(tmp_path):
    manifest = write_manifest(tmp_path, url="", sha256="")
    result = run_script(manifest, tmp_path / "out")
    assert result.returncode == NOT_PUBLISHED
    assert "not published yet: train it with p2_train.py" in result.stderr

    dest = tmp_path / "out" / "checkpoints" / "p2_best.pt"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"trained locally")
    result = run_script(manifest, tmp_path / "out")
    assert result.returncode == OK, result.stderr
    assert "not published, so no sha256" in result.stdout


@pytest.mark.parametrize("entry, message", [
    ({"url": "http://127.0.0.1/x.bin", "sha256": ""}, "needs its sha256"),
    ({"url": "http://127.0.0.1/x.bin", "sha256": "abc"}, "needs its sha256"),
    ({"path": "../outside.bin"}, "stay inside"),
    ({"path": "/abs/p2.bin"}, "stay inside"),
    ({"url": "http://127.0.0.1/x.bin", "sha256": "a" * 64, "config": None}, "needs its 'config'"),
    ({"config": ["ViT-L/14"]}, "'config' must be the CaptionConfig object"),
    ({"config": {"peft": ["adapter"]}}, "'config' must be the CaptionConfig object"),
])
def test_bad_manifest_entries_are_rejected(tmp_path, capsys, entry, message):
    with pytest.raises(ManifestError, match=message):
        checkpoints_manifest.load_manifest(write_manifest(tmp_path, **entry))
    assert run_main(["--manifest", str(tmp_path / "manifest.json"), "--skip-backbones"]) == BAD_INPUT == 2
    assert re.search(f"^hw3_download.py: error: .*{message}", capsys.readouterr().err)


def test_help_and_errors_with_a_malformed_repo_manifest(tmp_path):
    """--help reads no manifest; a run without --manifest reads the repo's checkpoints.json and stops with status 2
    before fetching anything. Run on a copy of the scripts and the package beside a malformed checkpoints.json."""
    shutil.copy(ROOT / "hw3_download.sh", tmp_path)
    shutil.copy(ROOT / "hw3_download.py", tmp_path)
    (tmp_path / "hw3").mkdir()
    shutil.copy(ROOT / "hw3" / "__init__.py", tmp_path / "hw3")
    shutil.copytree(ROOT / "hw3" / "common", tmp_path / "hw3" / "common", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "checkpoints.json").write_text('{"checkpoints": [{"name": "p2_best"')
    command = ["bash", str(tmp_path / "hw3_download.sh")]
    result = subprocess.run(command + ["--help"], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == OK, result.stderr
    assert "--manifest" in result.stdout and "3 a checkpoint is not published yet" in result.stdout
    assert str(tmp_path / "checkpoints.json") in "".join(result.stdout.split())  # the default: this copy's manifest

    result = subprocess.run(command + ["--skip-backbones"], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == BAD_INPUT
    assert result.stderr.startswith(f"hw3_download.py: error: cannot read manifest {tmp_path / 'checkpoints.json'}")
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert sorted(os.listdir(tmp_path)) == ["checkpoints.json", "hw3", "hw3_download.py", "hw3_download.sh"]


def test_bad_arguments_exit_with_status_2(capsys):
    assert run_main(["--no-such-option"]) == BAD_INPUT
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err


def test_repo_manifest_lists_the_default_backbones():
    checkpoints, backbones = checkpoints_manifest.load_manifest(ROOT / "checkpoints.json")
    assert [c.path for c in checkpoints] == ["checkpoints/p2_best.pt"]
    assert all(c.made_by for c in checkpoints)
    names = {(b.library, b.name) for b in backbones}
    assert {("clip", "ViT-L/14"), ("clip", "ViT-B/32")} <= names
    assert checkpoints_manifest.checkpoint_path("p2_best") == ROOT / "checkpoints" / "p2_best.pt"
    with pytest.raises(ManifestError, match="no checkpoint named"):
        checkpoints_manifest.checkpoint_path("p9")


def test_google_drive_links_go_through_gdown_with_output_flag(server, tmp_path):
    drive_url = "https://drive.google.com/file/d/FILE_ID/view?usp=sharing"
    command = download.fetch_command(drive_url, tmp_path / "p2.bin")
    assert command[1:3] == ["-m", "gdown"] and command[-2:] == ["-O", str(tmp_path / "p2.bin")]
    assert download.fetch_command("https://example.org/p2.bin", tmp_path / "p2.bin")[0] == "wget"
    # The same gdown command line, pointed at the local server, really downloads (gdown takes plain URLs too).
    command[command.index(drive_url)] = server.url + "/good.bin"
    subprocess.run(command, env=ENV, check=True, capture_output=True, timeout=120)
    assert (tmp_path / "p2.bin").read_bytes() == GOOD


def test_backbones_are_preloaded_after_checkpoints_and_failures_do_not_stop_the_rest(monkeypatch, tmp_path, capsys):
    loaded = []

    def clip_load(name, device, jit):
        if name == "ViT-L/14":
            raise RuntimeError("connection reset")
        loaded.append(("clip", name, device))

    monkeypatch.setitem(sys.modules, "clip", types.SimpleNamespace(
        available_models=lambda: ["ViT-B/32", "ViT-L/14"], load=clip_load))
    monkeypatch.setattr(download, "timm_weights_file", lambda name: loaded.append(("timm", name)) or "/cache/w.bin")
    monkeypatch.setattr(hw3_download, "load_encoder_offline", lambda name: loaded.append(("verified", name)))
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({
        "checkpoints": [{"name": "p2_best", "path": "p2.bin", "url": "", "sha256": ""}],
        "backbones": [{"library": "clip", "name": "ViT-L/14"}, {"library": "clip", "name": "ViT-B/32"},
                      {"library": "clip", "name": "ViT-X/99"}, {"library": "timm", "name": "vit_base_patch16_224"}]}))
    (tmp_path / "p2.bin").write_bytes(b"trained here")

    assert run_main(["--manifest", str(manifest), "--dest-root", str(tmp_path)]) == FAILED
    assert loaded == [("clip", "ViT-B/32", "cpu"), ("timm", "vit_base_patch16_224"),
                      ("verified", "timm:vit_base_patch16_224")]
    err = capsys.readouterr().err
    assert "clip ViT-L/14: FAILED: RuntimeError: connection reset" in err and "unknown CLIP model" in err
    assert (tmp_path / "p2.bin").read_bytes() == b"trained here"  # the checkpoint is untouched by backbone failures

    assert run_main(["--manifest", str(manifest), "--dest-root", str(tmp_path), "--skip-backbones"]) == OK


def write_checkpoint(path: Path, encoder: Optional[str] = None) -> Path:
    """A trained-checkpoint file as hw3/p2/checkpoint.py writes it: the tensors, and with `encoder` the config file
    beside it."""
    import torch
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"image_proj.weight": torch.zeros(2, 2)}, str(path))
    if encoder is not None:
        config = {"caption_config": {"encoder": encoder, "peft": ["adapter"]}}
        checkpoints_manifest.config_path(path).write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("encoder, expected", [
    ("timm:vit_huge_patch14_clip_quickgelu_378.dfn5b", [("timm", "vit_huge_patch14_clip_quickgelu_378.dfn5b"),
                                                        ("verified", "timm:vit_huge_patch14_clip_quickgelu_378.dfn5b")]),
    ("ViT-L/14", []),  # already in the manifest's list: loaded once
    ("ViT-L/14@336px", [("clip", "ViT-L/14@336px")]),
    ("timm:vit_base_patch16_clip_quickgelu_224.openai@/toy/clip.pt", []),  # a local file: nothing to download
])
@pytest.mark.parametrize("published", [True, False])
def test_the_checkpoints_encoder_and_no_other_is_preloaded(monkeypatch, tmp_path, capsys, encoder, expected,
                                                           published):
    """hw3_download pre-loads the manifest's CLIP models, then exactly the encoder the checkpoint's config names
    (published: its checkpoints.json entry's, not a config file beside it; trained here: the config file beside it);
    never the other candidate towers."""
    loaded = []
    monkeypatch.setitem(sys.modules, "clip", types.SimpleNamespace(
        available_models=lambda: ["ViT-B/32", "ViT-L/14", "ViT-L/14@336px"],
        load=lambda name, device, jit: loaded.append(("clip", name))))
    monkeypatch.setattr(download, "timm_weights_file", lambda name: loaded.append(("timm", name)) or "/cache/w.bin")
    monkeypatch.setattr(hw3_download, "load_encoder_offline", lambda name: loaded.append(("verified", name)))
    checkpoint = write_checkpoint(tmp_path / "checkpoints" / "p2_best.pt", None if published else encoder)
    entry = {"name": "p2_best", "path": "checkpoints/p2_best.pt", "url": "", "sha256": ""}
    if published:  # already fetched: its sha256 matches, so nothing is downloaded
        entry.update(url="http://127.0.0.1:9/p2_best.pt", sha256=sha256_file(checkpoint),
                     config={"encoder": encoder, "peft": ["adapter"]})
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({
        "checkpoints": [entry],
        "backbones": [{"library": "clip", "name": "ViT-L/14"}, {"library": "clip", "name": "ViT-B/32"}]}))
    assert run_main(["--manifest", str(manifest), "--dest-root", str(tmp_path)]) == OK, capsys.readouterr().err
    assert loaded == [("clip", "ViT-L/14"), ("clip", "ViT-B/32")] + expected


def test_a_checkpoint_without_a_config_preloads_no_encoder(monkeypatch, tmp_path, capsys):
    loaded = []
    monkeypatch.setitem(sys.modules, "clip", types.SimpleNamespace(
        available_models=lambda: ["ViT-B/32"], load=lambda name, device, jit: loaded.append(("clip", name))))
    manifest = write_manifest(tmp_path, url="", sha256="", config=None)
    write_checkpoint(tmp_path / "out" / "checkpoints" / "p2_best.pt")  # trained here, its config file lost
    assert run_main(["--manifest", str(manifest), "--dest-root", str(tmp_path / "out")]) == OK
    assert loaded == [("clip", "ViT-B/32")]
    assert "no config names its image encoder" in capsys.readouterr().err


def test_no_checkpoint_no_encoder_preloaded(monkeypatch, tmp_path, capsys):
    """An unpublished checkpoint that is not here names no encoder: only the manifest's list is loaded."""
    loaded = []
    monkeypatch.setitem(sys.modules, "clip", types.SimpleNamespace(
        available_models=lambda: ["ViT-B/32"], load=lambda name, device, jit: loaded.append(("clip", name))))
    monkeypatch.setattr(download, "timm_weights_file", lambda name: loaded.append(("timm", name)))
    manifest = write_manifest(tmp_path, url="", sha256="")
    assert run_main(["--manifest", str(manifest), "--dest-root", str(tmp_path / "out")]) == NOT_PUBLISHED
    assert loaded == [("clip", "ViT-B/32")]


# --- the course's script rules --------------------------------------------------------------------------------------
FORBIDDEN_COMMANDS = {"rm", "sudo", "CUDA_VISIBLE_DEVICES", "cp", "mv", "mkdir", "cd", "pip", "pip3"}


def shell_words(text: str):
    """The words of a shell script, comments dropped (a `#` that starts a word, as bash reads it)."""
    code = "\n".join(re.sub(r"(^|\s)#.*", r"\1", line) for line in text.splitlines())
    return set(re.findall(r"[A-Za-z0-9_][\w.-]*", code))


def test_shell_words_finds_commands_not_substrings():
    assert {"mkdir", "rm"} <= shell_words("mkdir -p out && /bin/rm -f x  # fine\npython3 a.py")
    assert not FORBIDDEN_COMMANDS & shell_words("python3 p.py --format cpu  # rm mv cd in a comment\n[ $# -lt 3 ]")
    assert "CUDA_VISIBLE_DEVICES" in shell_words("CUDA_VISIBLE_DEVICES=0 python3 a.py")


# The course's three scripts always (a missing one fails its check, never goes unchecked), and any other hw3_*.sh
SCRIPTS = sorted({"hw3_1.sh", "hw3_2.sh", "hw3_download.sh"} | {path.name for path in ROOT.glob("hw3_*.sh")})


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_obeys_the_grader_rules(script):
    assert (ROOT / script).is_file(), f"{script} is missing: the TA runs it"
    words = shell_words((ROOT / script).read_text())
    assert not FORBIDDEN_COMMANDS & words, f"{script} uses {sorted(FORBIDDEN_COMMANDS & words)}, forbidden in hw3_*.sh"
    assert "python3" in words and "python" not in words, f"{script} must call python3"
