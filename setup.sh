#!/usr/bin/env bash
# Creates .venv with Python 3.8 and the grader's pinned packages (requirements.txt + requirements-dev.txt).
# Idempotent: does nothing when .venv already matches both requirement files.
# Python 3.8 is looked for in: $PYTHON, python3.8 on PATH, then ~/.pyenv/versions/3.8.*.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$root/.venv"
stamp="$venv/.requirements.sha256"
want="$(cat "$root/requirements.txt" "$root/requirements-dev.txt" | sha256sum | cut -d' ' -f1)"

if [ -x "$venv/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi

is_py38() { [ -n "$1" ] && "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 8))' 2>/dev/null; }
python=""
for candidate in "${PYTHON:-}" "$(command -v python3.8 || true)" $(ls -d "$HOME"/.pyenv/versions/3.8.*/bin/python3.8 2>/dev/null | sort -V -r); do
  if is_py38 "$candidate"; then python="$candidate"; break; fi
done
if [ -z "$python" ]; then
  echo "setup.sh: no Python 3.8 found (the grader runs 3.8)." >&2
  echo "  Set PYTHON=/path/to/python3.8, put python3.8 on PATH, or install one: pyenv install 3.8.18" >&2
  exit 1
fi

echo "setup.sh: creating $venv with $python ($("$python" --version 2>&1))"
"$python" -m venv --clear "$venv"
"$venv/bin/python" -m pip install -q --upgrade "pip<25"
"$venv/bin/python" -m pip install -q -r "$root/requirements.txt" -r "$root/requirements-dev.txt"

# System tools: Java for the CIDEr scorer's PTB tokenizer (as in the course's scorer); wget, which hw3_download.sh
# fetches the checkpoint with; pdftotext, which the report's tests read the PDF with.
missing=()
command -v java >/dev/null 2>&1 || missing+=(default-jre-headless)
command -v wget >/dev/null 2>&1 || missing+=(wget)
command -v pdftotext >/dev/null 2>&1 || missing+=(poppler-utils)
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup.sh: installing ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "setup.sh: warning: not installed: ${missing[*]} (java: p2_evaluate.py's CIDEr refuses to run without it;" \
         "wget: hw3_download.sh; pdftotext: some report tests are skipped)" >&2
  fi
fi
echo "$want" > "$stamp"
echo "setup.sh: ready ($venv)"
