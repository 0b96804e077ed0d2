"""The check a toy run gets when its CPU computes differently from the one that made demo_numbers.json.

The same toy world trained under other CPU arithmetic (another MKL kernel path: AVX-512, AVX2, SSE4.2, AMD) gives
other tiny models, and every number after them moves (docs/reproducibility.md). So such a run is not compared for
identity but against a spread: demo_spread.json holds the numbers the default demo gave on measured arithmetic
paths, and each kind of number (a P1 accuracy, a CIDEr, a CLIPScore, a grounding ratio) may lie as far from the
reference as MARGIN times the farthest any number of its kind moved on those paths. Counts that no arithmetic
changes (the val images, each checkpoint's parameters) must be equal.

    demo_spread.json: {"reference": {"arithmetic", "captions_sha256"}   which demo_numbers.json it was measured around
                       "paths": {LABEL: {"arithmetic", "clip_model", "numbers": {dotted key: value}}}}
"""
from typing import Dict, List, Optional, Tuple

from hw3.common.dotted import flatten

MARGIN = 2.0  # the measured paths are few; another CPU kind may move a number further than any of them did
KINDS = ("P1 accuracy", "CIDEr", "CLIPScore", "grounding ratio")


def number_kind(key: str) -> Optional[str]:
    """Which of KINDS a numbers.json key (dotted) is, or None for what the spread does not cover."""
    if key == "p1.hw3_1.accuracy" or key.startswith("p1.prompts."):
        return "P1 accuracy"
    if key.startswith("p2.") and key.rsplit(".", 1)[-1] in ("CIDEr", "CLIPScore"):
        return key.rsplit(".", 1)[-1]
    if key.startswith("p3.grounding.ratio_by_layer."):
        return "grounding ratio"
    return None


def scored_numbers(numbers: dict) -> Dict[str, float]:
    """The numbers of a numbers.json that the spread covers, by dotted key."""
    return {key: value for key, value in flatten(numbers).items() if number_kind(key)}


def fixed_counts(numbers: dict) -> Dict[str, int]:
    """The counts no arithmetic changes: the val images P1 classified and each checkpoint's parameter count."""
    return {key: value for key, value in flatten(numbers).items()
            if key == "p1.hw3_1.images" or key.endswith(".checkpoint_params")}


def reference_identity(numbers: dict) -> dict:
    """What names the reference numbers a spread was measured around."""
    return {"arithmetic": numbers.get("arithmetic"),
            "captions_sha256": numbers.get("p2", {}).get("submitted", {}).get("captions_sha256")}


def path_entry(numbers: dict) -> dict:
    """A measured path's entry in demo_spread.json, from the numbers.json of its demo run."""
    return {"arithmetic": numbers.get("arithmetic"), "clip_model": numbers.get("inputs", {}).get("clip_model"),
            "numbers": scored_numbers(numbers)}


def farthest_moves(reference: dict, spread: dict) -> Dict[str, Dict[str, float]]:
    """{path label: {kind: the largest distance from the reference of a number of that kind on that path}}."""
    expected = scored_numbers(reference)
    moves = {}
    for label, path in spread["paths"].items():
        moves[label] = {kind: 0.0 for kind in KINDS}
        for key, value in path["numbers"].items():
            if key in expected:
                kind = number_kind(key)
                moves[label][kind] = max(moves[label][kind], abs(value - expected[key]))
    return moves


def tolerances(reference: dict, spread: dict) -> Dict[str, float]:
    """{kind: how far from the reference a number of that kind may lie}: MARGIN times the farthest move measured."""
    moves = farthest_moves(reference, spread).values()
    return {kind: MARGIN * max((move[kind] for move in moves), default=0.0) for kind in KINDS}


def check_against_spread(reference: dict, run: dict, spread: dict) -> Tuple[List[str], bool]:
    """(one line per number: how far it moved and whether that is within its kind's tolerance, then the verdict;
    whether every number is within it and every fixed count equal)."""
    allowed = tolerances(reference, spread)
    expected, measured = scored_numbers(reference), scored_numbers(run)
    lines, outside = [], 0
    for key in sorted(expected):
        tolerance = allowed[number_kind(key)]
        if key not in measured:
            lines.append(f"{key}: {expected[key]:.4f} in the reference, absent here")
            outside += 1
            continue
        move = measured[key] - expected[key]
        within = abs(move) <= tolerance
        outside += not within
        lines.append(f"{key}: {expected[key]:.4f} -> {measured[key]:.4f} ({move:+.4f}; "
                     f"{'within' if within else 'OUTSIDE'} ±{tolerance:.4f})")
    counts, own_counts = fixed_counts(reference), fixed_counts(run)
    for key in sorted(counts):
        if own_counts.get(key) != counts[key]:
            lines.append(f"{key}: {counts[key]} in the reference, {own_counts.get(key, 'absent')} here (no arithmetic "
                         "changes it)")
            outside += 1
    verdict = (f"all {len(expected)} numbers within the spread measured across CPU kinds" if not outside else
               f"{outside} number(s) outside the spread measured across CPU kinds: this is not the arithmetic alone")
    return lines + [verdict], not outside
