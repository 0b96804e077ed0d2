"""RESULTS/numbers.json: a run's headline numbers and the sha256 of what it made, and comparing two of them.

    {"inputs": {"decoder_sha256", "encoder", "clip_model"}: the pretrained files' sha256 (a model name as given),
     "toy_world": {generator_version, hash}      (toy world only),
     "arithmetic": the CPU arithmetic's fingerprint (hw3/common/arithmetic.py; not a result: it explains),
     "p1": {"hw3_1": {images, correct, accuracy, csv_sha256}, "prompts": {"PROMPT | templates T | ...": accuracy}},
     "p2": {"runs": {RUN: {CIDEr, CLIPScore, best_epoch, checkpoint_params, checkpoint_tensors_sha256}},
            "submitted": {run, CIDEr, CLIPScore, captions_sha256}},
     "p3": {"grounding": {best_layer, words_scored, ratio_by_layer}}}      (p3: toy world only)

Every value is read from the result files; paths are left out (a checkpoint's digest covers its tensors, not the config beside
it, which names the data's folder), so two runs of the same work on the same data give identical files
wherever they ran. `compare_numbers` lists what differs ([] = identical); `closing_comparison` is the demo's verdict
on a run against the committed reference: identical, the differences, what input differs, or (under other CPU
arithmetic) each number against the measured spread.
"""
import csv
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from hw3.common.arithmetic import arithmetic_fingerprint
from hw3.common.dotted import flatten
from hw3.common.files import read_json, sha256_file
from hw3.p2.checkpoint import tensors_sha256
from hw3.pipeline.inputs import ResultPaths, RunInputs
from hw3.pipeline.spread import check_against_spread, reference_identity


def read_rows(path: Path) -> List[dict]:
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as file:
        return list(csv.DictReader(file))


def csv_accuracy(path: Path) -> dict:
    """hw3_1.sh's CSV scored by the labels in its file names ({class_id}_{image_id}.png)."""
    rows = read_rows(path)
    correct = sum(row["filename"].split("_", 1)[0] == row["label"] for row in rows)
    return {"images": len(rows), "correct": correct, "accuracy": 100 * correct / max(1, len(rows)),
            "csv_sha256": sha256_file(path)}


def prompt_table(path: Path) -> Dict[str, float]:
    """p1_clip.py report's accuracy.csv: accuracy by prompt, template set, synonyms and flip (not by model: its
    name may be a path)."""
    return {f"{row['prompt']} | templates {row['templates']} | synonyms {row['synonyms']} | flip {row['flip']}":
            float(row["accuracy"]) for row in read_rows(path)}


def run_numbers(run: Path) -> dict:
    summary = read_json(run / "summary.json", "run summary")
    return {"CIDEr": summary["best"]["CIDEr"], "CLIPScore": summary["best"]["CLIPScore"],
            "best_epoch": summary["best_epoch"], "checkpoint_params": summary["checkpoint_params"],
            "checkpoint_tensors_sha256": tensors_sha256(str(run / "best.pt"))}


def model_identity(model: Optional[str]) -> Optional[str]:
    """A model file's sha256, or the model's name (a CLIP or timm name, or None: the tool's default)."""
    return sha256_file(Path(model)) if model and Path(model).is_file() else model


def input_numbers(inputs: RunInputs) -> dict:
    numbers = {"inputs": {"decoder_sha256": sha256_file(inputs.decoder), "encoder": model_identity(inputs.encoder),
                          "clip_model": model_identity(inputs.clip_model)},
               "arithmetic": arithmetic_fingerprint()}
    world = inputs.toy_world()
    if world:
        manifest = world.manifest()
        numbers["toy_world"] = {"generator_version": manifest["generator_version"], "hash": manifest["hash"]}
    return numbers


def input_identity(numbers: dict) -> dict:
    """What the run of a numbers.json read: its "inputs" (the pretrained files' sha256, a model name as given) and
    its toy world's hash (None: no toy world). Two runs' numbers are comparable only when these are equal."""
    return {**numbers.get("inputs", {}), "toy_world_hash": (numbers.get("toy_world") or {}).get("hash")}


def closing_comparison(reference: dict, run: dict, spread: Optional[dict]) -> Tuple[List[str], bool]:
    """A toy run's numbers against the reference's: (the lines to print, whether the run passed).

    "identical" when every number is; otherwise the verdict names what differs. Other data (another toy world, or
    the course data) or other pretrained files under the same arithmetic: nothing is compared. The same toy world
    under other CPU arithmetic (another fingerprint): every number is checked against the spread measured across
    CPU kinds (`spread`, demo_spread.json; hw3/pipeline/spread.py). The same inputs and arithmetic: every
    difference is listed, and the run fails."""
    world, own_world = (reference.get("toy_world") or {}).get("hash"), (run.get("toy_world") or {}).get("hash")
    if world != own_world:
        return [f"not comparable: other data: this run read "
                f"{'the toy world ' + own_world if own_world else 'the course data'}, the reference "
                f"{'the toy world ' + world if world else 'the course data'}; nothing is compared"], True
    differences = compare_numbers(reference, run)
    if not differences:
        return ["identical"], True
    if reference.get("arithmetic") != run.get("arithmetic"):
        cause = (f"same toy world, other CPU arithmetic (fingerprint {run.get('arithmetic')} here, "
                 f"{reference.get('arithmetic') or 'not recorded'} in the reference): this CPU kind trains other tiny "
                 "models, so no number comes back exactly")
        if not spread or spread.get("reference") != reference_identity(reference):
            return [f"not comparable: {cause}, and demo_spread.json was not measured around these reference "
                    "numbers, so nothing is compared (docs/reproducibility.md)"], True
        lines, passed = check_against_spread(reference, run, spread)
        return ([f"{cause}; each number against the spread measured across CPU kinds (docs/reproducibility.md):"]
                + [f"  {line}" for line in lines[:-1]] + [lines[-1]]), passed
    if input_identity(reference) == input_identity(run):
        return [f"{len(differences)} difference(s) from the reference, on the same inputs and CPU arithmetic:"] + [
            f"  {line}" for line in differences], False
    return ["not comparable: same toy world and CPU arithmetic, other pretrained files (a model's sha256 differs); "
            "nothing is compared"], True


def collect_numbers(inputs: RunInputs, results: ResultPaths, runs: Sequence[Path], submitted: Path) -> dict:
    """The numbers of a finished run (`runs`: its P2 run folders; `submitted`: the one hw3_2.sh used)."""
    scores = read_json(results.val_scores, "p2_evaluate.py summary")
    numbers = {
        **input_numbers(inputs),
        "p1": {"hw3_1": csv_accuracy(results.p1_csv), "prompts": prompt_table(results.p1 / "accuracy.csv")},
        "p2": {"runs": {run.name: run_numbers(run) for run in runs},
               "submitted": {"run": submitted.name, "CIDEr": scores["CIDEr"], "CLIPScore": scores["CLIPScore"],
                             "captions_sha256": sha256_file(results.val_predictions)}},
    }
    grounding_file = results.grounding / "grounding.json"
    if grounding_file.is_file():
        grounding = read_json(grounding_file, "grounding.json")
        numbers["p3"] = {"grounding": {"best_layer": grounding["best_layer"],
                                       "words_scored": grounding["words_scored"],
                                       "ratio_by_layer": {str(row["layer"]): row["ratio"]
                                                          for row in grounding["table"]}}}
    return numbers


def compare_numbers(first: dict, second: dict) -> List[str]:
    """One line per value that differs or is in one file only; [] when the two are identical. The arithmetic
    fingerprint is left out: it explains a difference, it is not a result."""
    a, b = ({key: value for key, value in flatten(numbers).items() if key != "arithmetic"}
            for numbers in (first, second))
    missing = object()
    lines = []
    for key in sorted(set(a) | set(b)):
        left, right = a.get(key, missing), b.get(key, missing)
        if left != right:
            lines.append(f"{key}: {'(absent)' if left is missing else repr(left)} vs "
                         f"{'(absent)' if right is missing else repr(right)}")
    return lines


def compare_files(first: Path, second: Path) -> List[str]:
    """Prints "identical" or the differences of two numbers.json files; returns the differences."""
    differences = compare_numbers(read_json(first, "numbers.json"), read_json(second, "numbers.json"))
    print("identical" if not differences else f"{len(differences)} difference(s) between {first} and {second}:")
    for line in differences:
        print(f"  {line}")
    return differences


PLAIN_PROMPT = "a photo of a {object}. | templates 1 | synonyms no | flip yes"  # compared with hw3_1.sh's setting


def readme_table(numbers: dict) -> str:
    """The README's results table, made from a numbers.json (tests/test_pipeline.py checks that README.md holds the
    one of the committed demo_numbers.json): each headline number beside the sha256 (first 16 hex digits) of the file
    it was read from or computed with, then the toy world and its two trained models."""
    def digest(value: str) -> str:
        return f"`{value[:16]}`"

    p1, p2 = numbers["p1"], numbers["p2"]
    submitted = p2["submitted"]
    rows = [("P1 `hw3_1.sh`: 18-template ensemble, mirror images (accuracy)", f"{p1['hw3_1']['accuracy']:.2f}%",
             f"pred.csv {digest(p1['hw3_1']['csv_sha256'])}"),
            ('P1 plain prompt "a photo of a {object}.", mirror images (accuracy)', f"{p1['prompts'][PLAIN_PROMPT]:.2f}%",
             f"clip.pt {digest(numbers['inputs']['clip_model'])}")]
    for name, run in sorted(p2["runs"].items()):
        rows.append((f"P2 {name}: best val CIDEr / CLIPScore (epoch {run['best_epoch']})",
                     f"{run['CIDEr']:.4f} / {run['CLIPScore']:.4f}",
                     f"best.pt tensors {digest(run['checkpoint_tensors_sha256'])}"))
    rows.append((f"P2 `hw3_2.sh` with {submitted['run']}, scored by `p2_evaluate.py`: CIDEr / CLIPScore",
                 f"{submitted['CIDEr']:.4f} / {submitted['CLIPScore']:.4f}",
                 f"val_pred.json {digest(submitted['captions_sha256'])}"))
    if "p3" in numbers:
        grounding = numbers["p3"]["grounding"]
        ratio = grounding["ratio_by_layer"][str(grounding["best_layer"])]
        rows.append((f"P3 grounding with {submitted['run']}: attention share in the named object's box / the box's "
                     f"share of the image ({grounding['words_scored']} words)", f"{ratio:.2f}x",
                     f"best.pt tensors {digest(p2['runs'][submitted['run']]['checkpoint_tensors_sha256'])}"))
    lines = ["| what | number | sha256 of the file |", "|---|---|---|"]
    lines += [f"| {what} | {number} | {made_by} |" for what, number, made_by in rows]
    if "toy_world" in numbers:
        world = numbers["toy_world"]
        lines += ["", f"Toy world {world['generator_version']}, hash `{world['hash']}`: tiny CLIP `clip.pt` "
                      f"{digest(numbers['inputs']['clip_model'])}, tiny GPT-2 `decoder_model.bin` "
                      f"{digest(numbers['inputs']['decoder_sha256'])}."]
    return "\n".join(lines) + "\n"
