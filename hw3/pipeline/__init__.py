"""The homework end to end behind demo.sh / demo.py, and its preflight (preflight.py).

inputs.py (what a run reads, where it writes) · preflight.py (checks before the work) · steps.py (running and
skipping one step) · homework.py (the steps in order) · numbers.py (numbers.json, comparing two runs)
"""
