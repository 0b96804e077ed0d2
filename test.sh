#!/usr/bin/env bash
# Runs the whole test suite (fast tests and the end-to-end `slow` ones) under Python 3.8 + torch 1.12.1.
# Extra arguments go to pytest, e.g. `bash test.sh -m "not slow"` for the fast tests only.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bash "$root/setup.sh"
cd "$root"
exec .venv/bin/python -m pytest "$@"
