"""Builds hw3_report.pdf from result files alone (every number on its pages is read from them; hw3/report.py):

    python3 make_report.py --p1-dir results/p1 --p2-runs results/p2 --p3-dir results/p3 --out hw3_report.pdf

Inputs (missing ones are listed together in one error):
  --p1-dir   `p1_clip.py report` output: summary.json, accuracy.csv, top5.png, top5.json
  --p2-runs  a folder of p2_train.py run folders (each: summary.json, curves.png), one per PEFT method (adapter,
             prefix, lora); optionally val_scores.json there (p2_evaluate.py --json-out of the submitted captions)
  --p3-dir   searched recursively for p3_attention.py's attention.json files (figures beside them; the top-1/last-1
             run is the one whose records have a "rank") and, optionally, grounding.json (toy world only)
  --toy-world  the toy world the numbers come from (default: the one the runs' summaries name, if any)
Pages: data and models; P1 (why zero-shot works, prompt table, top-5 figure); P2 (three PEFT settings, curves);
P3 (figures of the p3 images, top-1/last-1 with CLIPScores, grounding table, analysis).
"""
import argparse

from hw3.common.errors import run_cli
from hw3.report import build_report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--p1-dir", default="results/p1", help="default %(default)s")
    parser.add_argument("--p2-runs", default="results/p2", help="default %(default)s")
    parser.add_argument("--p3-dir", default="results/p3", help="default %(default)s")
    parser.add_argument("--toy-world", help="toy world folder (default: the one the P2 summaries name)")
    parser.add_argument("--out", default="hw3_report.pdf", help="default %(default)s")
    args = parser.parse_args(argv)
    count = build_report(args.p1_dir, args.p2_runs, args.p3_dir, args.out, toy_world=args.toy_world)
    print(f"wrote {args.out} ({count} pages)")


if __name__ == "__main__":
    run_cli(main, "make_report.py")
