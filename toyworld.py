"""Builds the toy world: an offline, hw3_data-shaped dataset with tiny "pretrained" CLIP and GPT-2 models
(hw3/toy/world.py). A world already built with the same generator and settings is reused at once.

    python3 toyworld.py DIR [--small] [--seed S]
"""
import argparse
import time

from hw3.common.errors import run_cli
from hw3.toy.world import build_toy_world, describe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="folder to write the toy world into (created; reused when already built)")
    parser.add_argument("--small", action="store_true", help="a small world for fast tests (seconds to minutes)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of everything generated (default 0)")
    args = parser.parse_args()
    start = time.time()
    out_dir = build_toy_world(args.out_dir, small=args.small, seed=args.seed)
    print(describe(out_dir, time.time() - start))


if __name__ == "__main__":
    run_cli(main, "toyworld.py")
