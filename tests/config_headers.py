"""The trainable counts a config states in its header comment, `# Trainable parameters: A while training ..., B in the
checkpoint ...`. One reader for every test that holds a config's comment to the captioner the config builds:
tests/test_p2_train.py (the real recipes, configs/{adapter,prefix,lora}.yaml, at real size; the toy configs' runs)
and tests/test_encoders.py (the candidate encoders' configs)."""
import re
from pathlib import Path
from typing import Tuple

STATED_COUNTS = re.compile(r"^# Trainable parameters: ([\d,]+) while training.*?, ([\d,]+) in the checkpoint", re.M)


def stated_trainable_counts(path) -> Tuple[int, int]:
    """(while training, in the checkpoint) as the header comment of the config at `path` states them."""
    match = STATED_COUNTS.search(Path(path).read_text())
    assert match, f"{path}: no '# Trainable parameters: A while training, B in the checkpoint' line"
    return tuple(int(number.replace(",", "")) for number in match.groups())
