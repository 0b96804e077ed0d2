"""demo_spread.json: how far the toy demo's numbers move under other CPU arithmetic, measured; and its table.

Each measured path is the default `bash demo.sh` under other arithmetic, from an empty cache (the toy world's tiny
models are what move). One machine emulates older CPUs by capping MKL's kernels before the first matrix product:

    MKL_ENABLE_INSTRUCTIONS=AVX2 HW3_CACHE=/tmp/cache-avx2 bash demo.sh --out /tmp/avx2
    python3 bench/arithmetic_spread.py "Intel AVX-512, MKL capped at AVX2=/tmp/avx2/numbers.json" [LABEL=FILE ...]
    python3 bench/arithmetic_spread.py --table demo_spread.json     # the Markdown of the committed file

The paths already in demo_spread.json stay when they were measured around the same demo_numbers.json; the ones given
are added (a label given again is replaced). It writes the file and prints the table docs/reproducibility.md holds.
A run under other arithmetic then passes the demo's comparison when each number lies within MARGIN times the
farthest its kind moved on these paths (hw3/pipeline/spread.py).
"""
import argparse
import sys
from pathlib import Path
from typing import List, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from hw3.common.dotted import flatten  # noqa: E402
from hw3.common.files import read_json, write_json_atomically  # noqa: E402
from hw3.pipeline.spread import KINDS, MARGIN, farthest_moves, path_entry, reference_identity, tolerances  # noqa: E402

REFERENCE_LABEL = "the committed demo_numbers.json"
DIGITS = {"P1 accuracy": 2, "CIDEr": 4, "CLIPScore": 4, "grounding ratio": 3}


def labelled_file(text: str) -> Tuple[str, Path]:
    """LABEL=FILE, split at the last "=" (a label may hold one: "MKL_ENABLE_INSTRUCTIONS=AVX2=FILE")."""
    label, separator, path = text.rpartition("=")
    if not separator or not label:
        raise argparse.ArgumentTypeError(f"expected LABEL=NUMBERS.json, got {text!r}")
    return label, Path(path)


def headline(numbers: dict) -> Tuple[float, float, float]:
    """P1 hw3_1.sh accuracy, hw3_2.sh's CIDEr and CLIPScore from a numbers.json or a path's flat numbers."""
    flat = flatten(numbers)
    return flat["p1.hw3_1.accuracy"], flat["p2.submitted.CIDEr"], flat["p2.submitted.CLIPScore"]


def markdown(reference: dict, spread: dict) -> str:
    """One row per path (its fingerprint, tiny CLIP, headline numbers and each kind's farthest move), the reference
    first and the tolerance last."""
    moves = farthest_moves(reference, spread)
    kinds = " | ".join(f"{kind}: farthest move" for kind in KINDS)
    lines = [f"| arithmetic path | fingerprint | tiny CLIP | P1 `hw3_1.sh` | `hw3_2.sh` CIDEr / CLIPScore | {kinds} |",
             "|" + "---|" * (5 + len(KINDS))]

    def row(label: str, arithmetic, clip, numbers: dict, cells: List[str]) -> str:
        accuracy, cider, clipscore = headline(numbers)
        return (f"| {label} | `{arithmetic or 'not recorded'}` | `{(clip or '?')[:8]}` | {accuracy:.2f}% | "
                f"{cider:.4f} / {clipscore:.4f} | " + " | ".join(cells) + " |")

    lines.append(row(f"{spread['reference_label']} (the reference)", reference.get("arithmetic"),
                     reference["inputs"]["clip_model"], reference, ["0"] * len(KINDS)))
    for label, path in spread["paths"].items():
        lines.append(row(label, path["arithmetic"], path["clip_model"], path["numbers"],
                         [f"{moves[label][kind]:.{DIGITS[kind]}f}" for kind in KINDS]))
    allowed = tolerances(reference, spread)
    lines.append(f"| another CPU kind may move a number up to ({MARGIN:g} x the farthest move) | | | | | "
                 + " | ".join(f"{allowed[kind]:.{DIGITS[kind]}f}" for kind in KINDS) + " |")
    return "\n".join(lines)


def measured_spread(reference: dict, previous: dict, runs: List[Tuple[str, Path]], reference_label: str) -> dict:
    """The previous file's paths (when measured around this reference) with the given runs added or replaced."""
    identity = reference_identity(reference)
    kept = previous.get("paths", {}) if previous.get("reference") == identity else {}
    for label, path in runs:
        numbers = read_json(path, "numbers.json")
        if (numbers.get("toy_world") or {}).get("hash") != reference["toy_world"]["hash"]:
            raise SystemExit(f"{path} is a run of another toy world than the reference's: it measures no arithmetic")
        kept[label] = path_entry(numbers)
    return {"reference": identity, "reference_label": reference_label, "paths": kept}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", type=labelled_file, metavar="LABEL=NUMBERS.json",
                        help="a demo run's numbers.json under other arithmetic, and what that arithmetic is")
    parser.add_argument("--reference", type=Path, default=ROOT / "demo_numbers.json",
                        help="the numbers the spread is measured around (default: the committed ones)")
    parser.add_argument("--reference-label", help="the CPU kind that made the reference (default: kept from --out)")
    parser.add_argument("--out", type=Path, default=ROOT / "demo_spread.json", help="the file to update")
    parser.add_argument("--table", type=Path, metavar="SPREAD_JSON", help="only print the table of this file")
    args = parser.parse_args(argv)
    reference = read_json(args.reference, "numbers.json")
    if args.table:
        print(markdown(reference, read_json(args.table, "demo_spread.json")))
        return 0
    previous = read_json(args.out, "demo_spread.json") if args.out.is_file() else {}
    label = args.reference_label or previous.get("reference_label") or REFERENCE_LABEL
    spread = measured_spread(reference, previous, args.runs, label)
    write_json_atomically(args.out, spread, indent=1, sort_keys=True)
    print(markdown(reference, spread))
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
