"""hw3/p2/data.py's feature cache under faults: a cut-off file, images replaced under the same names, a build killed
mid-way, two builds at once, too little disk, a disk that fills during the build, a read-only cache folder, and
$HW3_CACHE moving the default folder. The encoder is a tiny fake with the interface feature_cache uses; builds that
may die run in a subprocess."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hw3.common.errors import UserError
from hw3.common.images import open_image
from hw3.p2.config import TrainConfig
from hw3.p2.data import feature_cache, feature_cache_path, resolve_cache_dir

ROOT = Path(__file__).resolve().parents[1]
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (200, 200, 40)]


class FakeEncoder:
    """The encoder interface feature_cache uses: tokens [B, n_tokens, width] that depend on each image's mean
    colour. `calls`: a file that gets a line per call; `hold`: a file each call waits for (the test decides when the
    build goes on); `fill`: a file written on the first call until the disk is full (another program taking the
    space during the build)."""
    name, layer, image_size = "fake", -1, 8

    def __init__(self, width: int = 4, n_tokens: int = 3, calls: str = "", hold: str = "", fill: str = ""):
        self.width, self.n_tokens, self.calls, self.hold, self.fill = width, n_tokens, calls, hold, fill
        self.count = 0

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return torch.tensor(np.asarray(image, dtype=np.float32).mean(axis=(0, 1)) / 255)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.count += 1
        if self.calls:
            with open(self.calls, "a") as file:
                file.write("call\n")
        if self.fill and self.count == 1:
            fill_disk(self.fill)
        while self.hold and not os.path.exists(self.hold):
            time.sleep(0.02)
        pattern = torch.arange(self.n_tokens * self.width, dtype=torch.float32).reshape(self.n_tokens, self.width)
        return (images @ torch.tensor([1.0, 2.0, 4.0]))[:, None, None] + pattern / pattern.numel()


def fill_disk(path: str) -> None:
    try:
        with open(path, "wb") as file:
            while True:
                file.write(b"x" * 4096)
                file.flush()
    except OSError:  # the disk is full: what this is for
        pass


def make_images(folder: Path, colours=COLOURS) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, colour in enumerate(colours):
        path = folder / f"img{index}.png"
        Image.new("RGB", (8, 8), colour).save(path)
        paths.append(str(path))
    return paths


def expected_tokens(encoder: FakeEncoder, paths) -> torch.Tensor:
    images = torch.stack([encoder.preprocess(open_image(path)) for path in paths])
    return encoder(images).half()


def tokens_of(cache) -> torch.Tensor:
    return torch.stack([cache[i] for i in range(len(cache))])


def leftovers(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".partial", ".tmp")))


BUILD = """
import json, os, sys
sys.path.insert(0, {tests!r})
from test_feature_cache import FakeEncoder
from hw3.common.errors import run_cli
from hw3.p2.data import feature_cache
args = json.loads(sys.argv[1])
if args["no_fallocate"]:  # a file system without fallocate: the writes themselves meet the full disk
    del os.posix_fallocate
run_cli(lambda: feature_cache(FakeEncoder(**args["encoder"]), args["paths"], args["cache_dir"], batch_size=1),
        "cache")
"""


def start_build(cache_dir, paths, no_fallocate: bool = False, **encoder) -> subprocess.Popen:
    """A build of `paths` into `cache_dir` in another process (run_cli: a UserError is one line, exit status 2)."""
    args = json.dumps({"cache_dir": str(cache_dir), "paths": paths, "encoder": encoder,
                       "no_fallocate": no_fallocate})
    return subprocess.Popen([sys.executable, "-c", BUILD.format(tests=str(ROOT / "tests")), args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_calls(calls: Path, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not (calls.is_file() and calls.read_text()):
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, "the build never called the encoder"
        time.sleep(0.05)


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs (needs root, or a container that allows mounts); unmounted afterwards."""
    folder = tmp_path / "small_disk"
    folder.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


# ---- the cache proves itself ------------------------------------------------------------------------------------

@pytest.mark.parametrize("cut", ["end", "all"])
def test_a_cut_off_cache_is_rebuilt(tmp_path, capsys, cut):
    encoder, paths = FakeEncoder(), make_images(tmp_path / "images")
    cache = feature_cache(encoder, paths, str(tmp_path / "cache"))
    size = os.path.getsize(cache.path)
    del cache
    os.truncate(feature_cache_path(str(tmp_path / "cache"), "fake", -1, 8, paths), size - 10 if cut == "end" else 0)
    capsys.readouterr()
    again = feature_cache(encoder, paths, str(tmp_path / "cache"))
    line = capsys.readouterr().out
    assert ("cut off" if cut == "end" else "header does not read") in line and "rebuilding" in line
    assert line.count("\n") == 1
    assert os.path.getsize(again.path) == size
    assert torch.equal(tokens_of(again), expected_tokens(encoder, paths))


def test_images_replaced_under_the_same_names_are_rebuilt(tmp_path, capsys):
    encoder, paths = FakeEncoder(), make_images(tmp_path / "images")
    feature_cache(encoder, paths, str(tmp_path / "cache"))
    for path in paths[1:3]:
        before = os.stat(path).st_mtime_ns
        Image.new("RGB", (8, 8), (10, 20, 30)).save(path)
        os.utime(path, ns=(before + 10**9, before + 10**9))  # a copy a second later: some clocks tick coarser
    capsys.readouterr()
    cache = feature_cache(encoder, paths, str(tmp_path / "cache"))
    assert "2 images changed since it was built (e.g. img1.png); rebuilding" in capsys.readouterr().out
    assert torch.equal(tokens_of(cache), expected_tokens(encoder, paths))
    assert not torch.equal(cache[1], cache[0]) and torch.equal(cache[1], cache[2])

    counting = FakeEncoder()
    feature_cache(counting, paths, str(tmp_path / "cache"))
    assert counting.count == 0  # now current: read back, nothing encoded


def test_a_build_killed_mid_way_leaves_nothing_behind(tmp_path, capsys):
    paths, folder, calls = make_images(tmp_path / "images"), tmp_path / "cache", tmp_path / "calls"
    build = start_build(folder, paths, calls=str(calls), hold=str(tmp_path / "never"))
    try:
        wait_for_calls(calls, build)
        assert leftovers(folder), "the build should be under way"
    finally:
        os.kill(build.pid, signal.SIGKILL)
        build.communicate()
    capsys.readouterr()
    encoder = FakeEncoder()
    cache = feature_cache(encoder, paths, str(folder))
    assert "removed 1 leftover file of interrupted builds" in capsys.readouterr().out
    assert leftovers(folder) == []
    assert torch.equal(tokens_of(cache), expected_tokens(encoder, paths))


def test_two_builds_at_once_keep_the_live_partial_and_remove_the_dead_ones(tmp_path):
    """A build of other images removes a dead build's partial file but not the one of a build still running."""
    folder, calls = tmp_path / "cache", tmp_path / "calls"
    slow_paths, other_paths = make_images(tmp_path / "slow"), make_images(tmp_path / "other", COLOURS[:2])
    dead = folder / "features-0123456789abcdef.npy.4242.partial"
    go = tmp_path / "go"
    build = start_build(folder, slow_paths, calls=str(calls), hold=str(go))
    try:
        wait_for_calls(calls, build)
        dead.write_bytes(b"\0" * 1000)  # after the slow build's start, which removes such files too
        live = leftovers(folder)
        assert len(live) == 2 and dead.name in live
        feature_cache(FakeEncoder(), other_paths, str(folder))
        assert build.poll() is None, "the slow build should still be running"
        assert leftovers(folder) == [name for name in live if name != dead.name]
    finally:
        go.touch()
        output = build.communicate(timeout=120)
    assert build.returncode == 0, output
    assert leftovers(folder) == []
    counting = FakeEncoder()
    cache = feature_cache(counting, slow_paths, str(folder))
    assert counting.count == 0 and torch.equal(tokens_of(cache), expected_tokens(FakeEncoder(), slow_paths))


# ---- disk space -------------------------------------------------------------------------------------------------

def test_too_little_free_space_stops_before_encoding(tmp_path):
    paths, folder = make_images(tmp_path / "images"), tmp_path / "cache"
    folder.mkdir()
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    encoder = MustNotEncode(width=free // (len(paths) * 3 * 2) + 1, n_tokens=3)  # just more than the disk has
    with pytest.raises(UserError) as error:
        feature_cache(encoder, paths, str(folder))
    message = str(error.value)
    assert message.startswith("the feature cache needs ") and f" in {folder}, " in message and "are free" in message
    assert "\n" not in message
    assert leftovers(folder) == [] and not list(folder.glob("*.npy"))


class MustNotEncode(FakeEncoder):
    def __call__(self, images: torch.Tensor) -> torch.Tensor:  # its tokens would not fit in memory either
        raise AssertionError("encoding began")


@pytest.mark.parametrize("fallocate", [True, False])
def test_a_disk_that_fills_during_the_build(tmp_path, small_disk, fallocate):
    """Another program fills the disk after the build began. With the space reserved (posix_fallocate) the build
    still succeeds; on a file system without it, the failing write is one error line, and no partial file stays.
    Never SIGBUS."""
    paths = make_images(tmp_path / "images")
    encoder = dict(width=1024, fill=str(small_disk / "filler"))  # 24 KiB of tokens on a 64 KiB disk
    build = start_build(small_disk, paths, no_fallocate=not fallocate, **encoder)
    stdout, stderr = build.communicate(timeout=120)
    assert build.returncode != -signal.SIGBUS, "killed by SIGBUS"
    assert leftovers(small_disk) == []
    if fallocate:
        assert build.returncode == 0, stderr
        os.remove(small_disk / "filler")
        cache = feature_cache(FakeEncoder(width=1024), paths, str(small_disk))
        assert torch.equal(tokens_of(cache), expected_tokens(FakeEncoder(width=1024), paths))
    else:
        assert build.returncode == 2, stderr
        assert "Traceback" not in stderr
        assert stderr.strip().splitlines()[-1] == (f"cache: error: cannot write the feature cache in {small_disk}: "
                                                   "No space left on device (the feature cache needs 24704 bytes)")
        assert not list(small_disk.glob("*.npy"))


def test_a_cache_in_a_read_only_folder_is_read_and_a_bad_one_named(tmp_path, small_disk):
    encoder, paths = FakeEncoder(), make_images(tmp_path / "images")
    feature_cache(encoder, paths, str(small_disk))
    path = feature_cache_path(str(small_disk), "fake", -1, 8, paths)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    cache = feature_cache(encoder, paths, str(small_disk))
    assert torch.equal(tokens_of(cache), expected_tokens(encoder, paths))
    del cache
    subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    os.truncate(path, 200)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises(UserError) as error:
        feature_cache(encoder, paths, str(small_disk))
    message = str(error.value)
    assert message.startswith(f"feature cache {path}: ") and "cut off" in message and "cannot be built" in message
    assert "\n" not in message


# ---- where the cache lives --------------------------------------------------------------------------------------

def test_hw3_cache_moves_the_default_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HW3_CACHE", str(tmp_path / "elsewhere"))
    default = TrainConfig().cache_dir
    assert resolve_cache_dir(default) == str(tmp_path / "elsewhere" / "features")
    paths = make_images(tmp_path / "images")
    cache = feature_cache(FakeEncoder(), paths, default)
    assert Path(cache.path).parent == tmp_path / "elsewhere" / "features"
    monkeypatch.delenv("HW3_CACHE")
    assert resolve_cache_dir(TrainConfig().cache_dir) == os.path.expanduser("~/.cache/dlcv-hw3/features")
    assert resolve_cache_dir(str(tmp_path / "mine")) == str(tmp_path / "mine")  # a given folder stays as given
