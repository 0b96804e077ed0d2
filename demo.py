"""The homework end to end (hw3/pipeline/homework.py): what `bash demo.sh` runs after `bash setup.sh`.

    bash demo.sh                          the offline toy world (built or reused in ~/.cache/dlcv-hw3, or
                                          $HW3_CACHE): P1, P2 (three PEFT methods + the self-critical stage), P3,
                                          the report; results in results/
    bash demo.sh --data hw3_data --student-id ID
                                          the course data, the same steps: configs/{adapter,prefix,lora}.yaml
                                          (CLIP ViT-L/14), hw3_data/p2_data/decoder_model.bin, the self-critical
                                          stage on the best run; then "submission ready": RESULTS/hw3_ID.pdf and
                                          the checkpoints.json entry that publishes the submitted checkpoint
    ... --candidates                      then also the encoder candidates configs/{siglip,dfn5b}_adapter.yaml
                                          (projected on a 2080 Ti: about 1 hour and 22 GB of feature cache each);
                                          a better run replaces the submission
    bash demo.sh --fetch --data hw3_data [--candidates]
                                          download every pretrained model the run will load, then training needs
                                          no network (the preflight names any still missing)
    bash demo.sh --check [--data DIR]     the preflight only (python3 preflight.py DIR does the same)
    bash demo.sh --check-submission --student-id ID
                                          before handing in: the published checkpoint fetched and counted as the
                                          TA will, RESULTS/hw3_ID.pdf, the graded scripts; prints the TA's commands
    bash demo.sh --compare A/numbers.json B/numbers.json     "identical", or what differs
    bash demo.sh --table demo_numbers.json                   README.md's results table of a numbers.json

The submitted run: on the course data, the one whose weaker margin over the strong baseline (CIDEr 0.89,
CLIPScore 0.71), min(CIDEr / 0.89, CLIPScore / 0.71), is largest, so a run that clears both bars is never passed
over for one that misses either; on the toy world, the highest val CIDEr (hw3/p2/selection.py).

Each step prints what it runs and where it writes. A run begins with the preflight and stops when it fails. Run
again, the same command skips the finished steps: p2_train.py leaves a finished run of the same config as it is and
refuses to replace another one; the other steps are skipped when their outputs exist and came from the same command
and inputs. P1's steps and the cross-entropy runs run two at a time on the toy world (--jobs; each toy run uses one
CPU thread), one at a time with --data (one GPU). A toy run ends by comparing its numbers with the committed
./demo_numbers.json: "identical", or every difference (exit status 1). On another CPU kind the same toy world trains
other tiny models, so there each number is checked against the spread measured across CPU kinds (./demo_spread.json;
exit status 1 outside it); a run of other data or other pretrained files gets one line saying so. The report goes to
RESULTS/hw3_<ID>.pdf (without --student-id: RESULTS/hw3_report.pdf); its prose answers come from RESULTS/notes.md,
which the first run drafts with the numbers each answer should cite (edit it, run again). --publish also copies the
report to ./hw3_report.pdf and RESULTS/numbers.json to ./demo_numbers.json (the committed ones).
"""
import argparse
import os
from pathlib import Path

from hw3.common.errors import run_cli
from hw3.common.files import cache_root, check_writable, read_json
from hw3.pipeline.homework import RunOptions, run_homework
from hw3.pipeline.inputs import TOY_WORLD_NAME, ResultPaths, add_input_options, inputs_from_args
from hw3.pipeline.numbers import compare_files, readme_table
from hw3.pipeline.preflight import fetch_models
from hw3.pipeline.submission import check_submission
from hw3.report import check_student_id
from hw3.toy.world import ToyWorld


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="demo.sh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="the course data (p1_data, p2_data, p3_data) instead of the toy "
                                                  "world")
    parser.add_argument("--out", type=Path, default=Path("results"), help="results folder (default: %(default)s)")
    add_input_options(parser)
    parser.add_argument("--student-id", help="your student ID: the report is named hw3_<ID>.pdf, as the course "
                                             "requires")
    parser.add_argument("--check", action="store_true", help="run the preflight only; exit 0 when it passes")
    parser.add_argument("--fetch", action="store_true",
                        help="download every pretrained model the run will load (P2 encoders, P1 CLIP, CLIPScore "
                             "CLIP; the candidates' with --candidates) and exit; then training needs no network")
    parser.add_argument("--check-submission", action="store_true",
                        help="check what you hand in, as the TA will use it, and exit (0: ready)")
    parser.add_argument("--jobs", type=int, help="how many of P1's steps and the cross-entropy runs run at once "
                                                 "(default: 2 on the toy world, 1 with --data)")
    parser.add_argument("--publish", action="store_true",
                        help="also copy the report to ./hw3_report.pdf and numbers.json to ./demo_numbers.json (the "
                             "committed ones, which README.md quotes)")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"),
                        help="compare two numbers.json files and exit (0: identical, 1: they differ)")
    parser.add_argument("--table", type=Path, metavar="NUMBERS_JSON",
                        help="print README.md's results table made from a numbers.json and exit")
    args = parser.parse_args(argv)
    if args.compare:
        return 1 if compare_files(*args.compare) else 0
    if args.table:
        print(readme_table(read_json(args.table, "numbers.json")), end="")
        return 0
    if args.student_id:
        check_student_id(args.student_id)
    out = Path(os.path.abspath(args.out))
    if args.check_submission:
        return check_submission(ResultPaths(out), args.student_id)
    jobs = args.jobs or (1 if args.data else 2)
    if jobs < 1:
        parser.error("--jobs must be at least 1")
    world = None if args.data else ToyWorld(cache_root() / TOY_WORLD_NAME)
    inputs = inputs_from_args(args, args.data, world)
    if args.fetch:
        return fetch_models(inputs)
    check_writable(out, "folder")
    return run_homework(inputs, ResultPaths(out), build_world=world, check_only=args.check,
                        options=RunOptions(jobs=jobs, publish=args.publish, student_id=args.student_id))


if __name__ == "__main__":
    run_cli(main, "demo.sh")
