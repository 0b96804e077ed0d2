#!/usr/bin/env bash
# Problem 1: zero-shot CLIP classification of every image in $1.
#   bash hw3_1.sh IMAGE_DIR ID2LABEL_JSON OUTPUT_CSV [options, e.g. --model ViT-L/14 --templates cifar18]
# Options after the three paths go to p1_clip.py (see `python3 p1_clip.py --help`).
# exec: Python takes over the shell's pid, so a signal sent to the script (a time limit) ends Python, not only bash
exec python3 "$(dirname "$0")/p1_clip.py" "$@"
