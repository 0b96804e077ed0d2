"""Cross-entropy vs self-critical training on the toy world, judged as the grader judges: captions of the val images
through hw3_2.sh (the default decoding), scored by p2_evaluate.py.

    python3 bench/p2_scst_gains.py ~/.cache/dlcv-hw3/toyworld-seed0 --runs runs/scst_gains [--methods lora adapter]
        [--seeds 0 1] [--scst-config configs/toy_scst.yaml] [--scst-threads N] [--set KEY=VALUE ...]
        [--json-out gains.json]

For each method and seed: p2_train.py with configs/toy_METHOD.yaml (--set seed=S), then the SCST stage over it
(--init), both skipped when their run folder already holds the finished run; --set values go over both stages'
configs (e.g. `--set epochs=1 val_images=10` for a quick check). Then each best checkpoint goes through
hw3_2.sh and p2_evaluate.py. Printed per run: CIDEr, CLIPScore, the share of captions in the toy references' most
frequent template ("There is ... on a noisy background", 19% of the references) and the share ending on a dangling
word (hw3.p2.scst.DANGLING_WORDS), then the gain of SCST over its cross-entropy start.
"""
import argparse
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from hw3.common.files import read_json, write_json_atomically  # noqa: E402
from hw3.p2.scst import dangling_share  # noqa: E402
from hw3.toy.world import ToyWorld  # noqa: E402

MODAL_TEMPLATE = re.compile(r"^there is .* on a noisy background\.?$", re.IGNORECASE)


def run(command):
    print("+", " ".join(command), flush=True)
    path = f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"  # hw3_2.sh runs `python3`: this one
    subprocess.run(command, cwd=ROOT, check=True, env=dict(os.environ, PATH=path))


def evaluate(world: ToyWorld, run_dir: str) -> dict:
    """hw3_2.sh + p2_evaluate.py on the val images for the run's best checkpoint."""
    layout = world.layout
    predictions, scores = os.path.join(run_dir, "hw3_2_val.json"), os.path.join(run_dir, "hw3_2_val_scores.json")
    started = time.time()
    run(["bash", "hw3_2.sh", str(layout.p2_images("val")), predictions, str(world.decoder),
         "--checkpoint", os.path.join(run_dir, "best.pt"), "--encoder", str(world.clip)])
    decode_seconds = time.time() - started
    run([sys.executable, "p2_evaluate.py", "--pred_file", predictions, "--images_root", str(layout.p2_images("val")),
         "--annotation_file", str(layout.p2_annotations("val")), "--clip-model", str(world.clip), "--json-out", scores])
    captions = read_json(predictions)
    result = read_json(scores)
    return {"CIDEr": result["CIDEr"], "CLIPScore": result["CLIPScore"],
            "modal_template": sum(bool(MODAL_TEMPLATE.match(c)) for c in captions.values()) / len(captions),
            "dangling": dangling_share(captions), "decode_seconds": round(decode_seconds, 1)}


def epoch_seconds(run_dir: str) -> float:
    epochs = read_json(os.path.join(run_dir, "summary.json"))["epochs"]
    return sum(e["seconds"] for e in epochs) / len(epochs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("toy_world", help="a toyworld.py folder")
    parser.add_argument("--runs", required=True, help="folder for the run folders (METHOD_seedS, METHOD_seedS_scst)")
    parser.add_argument("--methods", nargs="+", default=["lora", "adapter"], choices=["adapter", "prefix", "lora"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--scst-config", default="configs/toy_scst.yaml")
    parser.add_argument("--scst-threads", type=int,
                        help="CPU threads of the SCST runs (default: the config's; 1 when two benches share 2 cores)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="config overrides for both stages, as p2_train.py --set takes them")
    parser.add_argument("--json-out", help="also write the table as JSON here")
    args = parser.parse_args(argv)
    world = ToyWorld(args.toy_world)
    rows = []
    for method in args.methods:
        for seed in args.seeds:
            xe = os.path.join(args.runs, f"{method}_seed{seed}")
            scst = xe + "_scst"
            run([sys.executable, "p2_train.py", "--config", f"configs/toy_{method}.yaml", "--toy-world",
                 str(world.root), "--out", xe, "--set", f"seed={seed}", *args.overrides])
            threads = [f"cpu_threads={args.scst_threads}"] if args.scst_threads else []
            overrides = ["--set", *threads, *args.overrides] if threads or args.overrides else []
            run([sys.executable, "p2_train.py", "--init", xe, "--config", args.scst_config, "--out", scst, *overrides])
            before, after = evaluate(world, xe), evaluate(world, scst)
            rows.append({"method": method, "seed": seed, "xe": before, "scst": after,
                         "scst_epoch_seconds": round(epoch_seconds(scst), 1),
                         "cider_gain": after["CIDEr"] / before["CIDEr"] - 1,
                         "clipscore_change": after["CLIPScore"] / before["CLIPScore"] - 1})
    print("\n| method | seed | XE CIDEr | SCST CIDEr | gain | XE CLIPScore | SCST CLIPScore | change | modal template "
          "XE -> SCST | dangling end XE -> SCST | SCST s/epoch |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        xe, sc = r["xe"], r["scst"]
        print(f"| {r['method']} | {r['seed']} | {xe['CIDEr']:.3f} | {sc['CIDEr']:.3f} | {r['cider_gain']:+.1%} | "
              f"{xe['CLIPScore']:.3f} | {sc['CLIPScore']:.3f} | {r['clipscore_change']:+.1%} | "
              f"{xe['modal_template']:.1%} -> {sc['modal_template']:.1%} | {xe['dangling']:.1%} -> "
              f"{sc['dangling']:.1%} | {r['scst_epoch_seconds']} |")
    if args.json_out:
        write_json_atomically(args.json_out, rows, indent=1)
        print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
