"""Checks that a run can succeed before it starts (hw3/pipeline/preflight.py): the environment against the grader's
pins, Java, the GPU, the data's layout, counts and annotations, the configs, every pretrained model, decoder_model.bin
with its load report, and free disk for the feature cache. Exit status 0: no FAIL line; 1: at least one.

    python3 preflight.py hw3_data                          the course data with the real configs and models
    python3 preflight.py ~/.cache/dlcv-hw3/toyworld-seed0/hw3_data --configs toy \\
        --decoder ~/.cache/dlcv-hw3/toyworld-seed0/decoder_model.bin \\
        --encoder ~/.cache/dlcv-hw3/toyworld-seed0/clip.pt --clip-model ~/.cache/dlcv-hw3/toyworld-seed0/clip.pt

`bash demo.sh --check [--data DIR ...]` runs the same checks with demo.sh's defaults.
"""
import argparse
from pathlib import Path

from hw3.common.errors import run_cli
from hw3.pipeline.inputs import add_input_options, inputs_from_args
from hw3.pipeline.preflight import passed, run_preflight


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, help="the data folder (p1_data, p2_data, p3_data)")
    add_input_options(parser)
    args = parser.parse_args(argv)
    return 0 if passed(run_preflight(inputs_from_args(args, args.data, None))) else 1


if __name__ == "__main__":
    run_cli(main, "preflight.py")
