#!/usr/bin/env bash
# Problem 2: caption every image in $1 and write {file stem: caption} JSON to $2, with GPT-2 weights from $3.
#   bash hw3_2.sh IMAGE_DIR OUTPUT_JSON DECODER_BIN [options, e.g. --checkpoint PATH --beam-size 5]
# The trained checkpoint comes from `bash hw3_download.sh`; options go to p2_inference.py (`python3 p2_inference.py --help`).
# exec: Python takes over the shell's pid, so a signal sent to the script (a time limit) ends Python, not only bash
exec python3 "$(dirname "$0")/p2_inference.py" "$@"
