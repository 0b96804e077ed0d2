#!/usr/bin/env bash
# The homework end to end: `bash setup.sh` (the Python 3.8 .venv), then demo.py, whose --help lists every option.
#   bash demo.sh [--out DIR]              the offline toy world (no pretrained weights or course data needed)
#   bash demo.sh --data hw3_data          the course data, through the same steps
#   bash demo.sh --check [--data DIR]     the preflight only
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bash "$root/setup.sh"
exec "$root/.venv/bin/python" "$root/demo.py" "$@"
