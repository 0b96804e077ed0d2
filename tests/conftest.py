"""Shared fixtures: the toy world (hw3/toy/world.py), built once per generator version into a cache outside the repo.

The cache is `$HW3_CACHE` or `~/.cache/dlcv-hw3/`. `build_toy_world` returns at once when the world there is current
and serialises concurrent builds (file lock, build in a staging folder, atomic rename), so parallel pytest runs share
one build safely.
"""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hw3.toy.world import build_toy_world  # noqa: E402  (needs ROOT on sys.path)


def toy_world_cache() -> Path:
    return Path(os.environ.get("HW3_CACHE", "~/.cache/dlcv-hw3")).expanduser()


@pytest.fixture(scope="session")
def toy_world_small() -> Path:
    """The --small toy world (seed 0): seconds to build, for fast tests. Its tiny CLIP is barely trained."""
    return build_toy_world(toy_world_cache() / "toyworld-small-seed0", small=True, seed=0)


@pytest.fixture(scope="session")
def toy_world() -> Path:
    """The full toy world (seed 0): minutes to build on first use; mark tests that use it `slow`."""
    return build_toy_world(toy_world_cache() / "toyworld-seed0", small=False, seed=0)


@pytest.fixture(scope="session")
def toy_run(toy_world, tmp_path_factory):
    """A function: method -> the run folder of configs/toy_METHOD.yaml trained on the full toy world through
    p2_train.py, as demo.sh trains it; each method is trained once per session (slow tests share the runs)."""
    import subprocess
    runs = {}

    def train(method: str) -> Path:
        if method not in runs:
            out = tmp_path_factory.mktemp(f"toy_{method}")
            cache = tmp_path_factory.getbasetemp() / "toy_feature_cache"  # shared: the first run computes it
            config = ROOT / "configs" / f"toy_{method}.yaml"
            command = [sys.executable, str(ROOT / "p2_train.py"), "--config", str(config), "--toy-world",
                       str(toy_world), "--out", str(out), "--set", f"cache_dir={cache}"]
            result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1800)
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
            runs[method] = out
        return runs[method]
    return train


@pytest.fixture(scope="session")
def toy_model(toy_world_small):
    """The small toy world's tiny LM (2 layers, width 128) with cross-attention in both blocks and adapters, the new
    weights random, LayerNorm gains at their init of 1 (so the image context reaches the decoder at unit scale): the
    cross-attention is large enough for the image to change the caption, small enough for captions to end.
    Image tokens for it: [B, 17, 128]."""
    import torch

    from decoder import GPTConfig
    from hw3.p2.model import CaptionConfig, build_caption_model
    config = CaptionConfig(encoder=str(toy_world_small / "clip.pt"), decoder=GPTConfig(n_layer=2, n_head=2, n_embd=128),
                           context_width=64, cross_attn_width=64, cross_attn_heads=2, peft=["adapter"],
                           adapter_size=16)
    model = build_caption_model(config, str(toy_world_small / "decoder_model.bin"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and not name.endswith(("image_ln.weight", "ln_cross.weight")):
                param.copy_(torch.randn_like(param) * (0.05 if ".cross_attn." in name else 0.02))
    return model.eval()
