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
