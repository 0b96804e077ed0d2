"""Builds the homework's report PDF from result files and the student's notes (hw3/report.py): every number on its
pages is read from the results, every sentence of analysis comes from the notes.

    python3 make_report.py --p1-dir results/p1 --p2-runs results/p2 --p3-dir results/p3 --notes notes.md \\
        --student-id r12345678 --out results/hw3_report.pdf       # writes results/hw3_r12345678.pdf
    python3 make_report.py --draft-notes notes.md                 # first: a notes file to fill in

Inputs (missing ones are listed together in one error):
  --p1-dir   `p1_clip.py report` output: summary.json, accuracy.csv, top5.png, top5.json
  --p2-runs  a folder of p2_train.py run folders (each: summary.json, curves.png), one per PEFT method (adapter,
             prefix, lora), any self-critical runs (stage scst), and beside them
               submission.json  {"run": RUN, "rule": how it was chosen, "checkpoint_sha256": ...}: the run whose
                                checkpoint hw3_2.sh uses, the report's best setting (--submitted RUN overrides it)
               val_scores.json  p2_evaluate.py --json-out of hw3_2.sh's val captions with that run: the best
                                setting's CIDEr and CLIPScore, what the TA reproduces
  --p3-dir   searched recursively for p3_attention.py's attention.json files (figures beside them; the top-1/last-1
             run is the one whose records have a "rank") and, optionally, grounding.json (toy world only)
  --toy-world  the toy world the numbers come from (default: the one grounding.json names, if any); every page of a
             toy-world report says so at its foot
  --notes    the student's written answers: a UTF-8 Markdown/plain text file with one section per question, headed
             exactly
               ## P1 Q1   why CLIP works zero-shot
               ## P1 Q2   the three prompts compared
               ## P2      the best setting and the three PEFT attempts discussed
               ## P3 Q3   is the caption reasonable, does the attended region reflect the word
             Blank lines separate paragraphs; lines starting with ">" (facts, for reference) or "TODO" are never
             printed; text before the first heading is ignored. A section without text of its own is marked on its
             page as still to be written (in red on course data).
  --draft-notes PATH  writes such a file, each heading with the facts its answer should cite ("> " lines) and a
             TODO line, from the same inputs; it never replaces an existing file, and builds no PDF.
Output: --out, or with --student-id ID the course's file name hw3_<ID>.pdf in the folder of --out.
Pages: data and models; P1 (answer Q1, prompt table, answer Q2, top-5 figure); P2 (best setting, three PEFT
attempts, answer, curves); P3 (figures of the p3 images, top-1/last-1 with CLIPScores, how the maps are made,
grounding table on the toy world, answer Q3). They name runs, files and hashes only: no folder of this machine, no
date.
"""
import argparse

from hw3.common.errors import run_cli
from hw3.report import build_report, draft_notes


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--p1-dir", default="results/p1", help="default %(default)s")
    parser.add_argument("--p2-runs", default="results/p2", help="default %(default)s")
    parser.add_argument("--p3-dir", default="results/p3", help="default %(default)s")
    parser.add_argument("--toy-world", help="toy world folder (default: the one grounding.json names)")
    parser.add_argument("--submitted", metavar="RUN",
                        help="the submitted run's folder name under --p2-runs (default: submission.json's run)")
    parser.add_argument("--notes", metavar="FILE", help="the student's written answers (format above)")
    parser.add_argument("--draft-notes", metavar="PATH", help="write a notes file to fill in, then exit")
    parser.add_argument("--student-id", metavar="ID", help="letters and digits, e.g. r12345678: the report is "
                                                           "written as hw3_<ID>.pdf in the folder of --out")
    parser.add_argument("--out", default="hw3_report.pdf", help="default %(default)s")
    args = parser.parse_args(argv)
    if args.draft_notes:
        path = draft_notes(args.p1_dir, args.p2_runs, args.p3_dir, args.draft_notes, toy_world=args.toy_world,
                           submitted=args.submitted)
        print(f"wrote {path}: replace each TODO line with your answer, then make_report.py --notes {path}")
        return
    built = build_report(args.p1_dir, args.p2_runs, args.p3_dir, args.out, toy_world=args.toy_world,
                         submitted=args.submitted, notes=args.notes, student_id=args.student_id)
    print(f"wrote {built.path} ({built.pages} pages)")
    if built.unwritten:
        print(f"still to be written by the student: {', '.join(built.unwritten)} (make_report.py --draft-notes "
              "FILE, then --notes FILE)")


if __name__ == "__main__":
    run_cli(main, "make_report.py")
