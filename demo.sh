#!/usr/bin/env bash
# The whole homework end to end on the offline toy world (no pretrained weights or course data needed):
# build the toy world, P1 zero-shot classification + report analyses, P2 training of the three PEFT methods,
# inference through hw3_2.sh + scoring, P3 attention maps + grounding, and hw3_report.pdf from those results.
#
#   bash demo.sh [RESULTS_DIR]   (default results/; the report is written to ./hw3_report.pdf; the toy world is
#                                cached in $HW3_CACHE or ~/.cache/dlcv-hw3, shared with the tests)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bash "$root/setup.sh"
cd "$root"
export PATH="$root/.venv/bin:$PATH"  # hw3_*.sh call `python3`: make it the project's Python 3.8 environment
results="$(realpath -m "${1:-results}")"
world="${HW3_CACHE:-$HOME/.cache/dlcv-hw3}/toyworld-seed0"
step() { printf '\n== %s\n' "$*"; }

step "Toy world -> $world"
python3 toyworld.py "$world"
p1="$world/hw3_data/p1_data"
p2="$world/hw3_data/p2_data"

step "P1: zero-shot classification through hw3_1.sh, then the report analyses"
bash hw3_1.sh "$p1/val" "$p1/id2label.json" "$results/p1/pred.csv" --model "$world/clip.pt"
python3 p1_clip.py report "$p1/val" "$p1/id2label.json" --model "$world/clip.pt" --out-dir "$results/p1"

step "P2: train adapter, prefix tuning and LoRA"
for method in adapter prefix lora; do
    python3 p2_train.py --config "configs/toy_$method.yaml" --toy-world "$world" --out "$results/p2/toy_$method"
done
best_run="$(python3 - "$results/p2" <<'EOF'
import json, pathlib, sys
runs = {p.parent: json.loads(p.read_text())["best"]["CIDEr"] for p in pathlib.Path(sys.argv[1]).glob("toy_*/summary.json")}
print(max(runs, key=runs.get))
EOF
)"
echo "best run by val CIDEr: $best_run"

step "P2: caption the val images through hw3_2.sh with the best run, then score them"
bash hw3_2.sh "$p2/images/val" "$results/p2/val_pred.json" "$world/decoder_model.bin" \
    --checkpoint "$best_run/best.safetensors" --encoder "$world/clip.pt"
python3 p2_evaluate.py --pred_file "$results/p2/val_pred.json" --images_root "$p2/images/val" \
    --annotation_file "$p2/val.json" --clip-model "$world/clip.pt" \
    --per-image-csv "$results/p2/val_scores.csv" --json-out "$results/p2/val_scores.json"

step "P3: grounding score per layer, then attention maps (p3 images, top-1/last-1 val images) on the best layer"
p3_options=(--checkpoint "$best_run/best.safetensors" --decoder "$world/decoder_model.bin" --encoder "$world/clip.pt")
python3 p3_attention.py grounding "$world" "${p3_options[@]}" --out-dir "$results/p3/grounding"
p3_options+=(--grounding "$results/p3/grounding/grounding.json")
python3 p3_attention.py "$world/hw3_data/p3_data/images" "${p3_options[@]}" --out-dir "$results/p3/images"
python3 p3_attention.py "$p2/images/val" --top-last "$results/p2/val_scores.csv" "${p3_options[@]}" \
    --out-dir "$results/p3/top_last"

step "Report"
python3 make_report.py --p1-dir "$results/p1" --p2-runs "$results/p2" --p3-dir "$results/p3" \
    --toy-world "$world" --out hw3_report.pdf
echo
echo "All results are in $results; the report is $root/hw3_report.pdf"
