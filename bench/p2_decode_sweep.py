"""Caption quality per decoding setting: a trained checkpoint on a labelled image folder, images encoded once, then
CIDEr / CLIPScore (hw3/p2/metrics.py, the course's numbers) and images/s for every beam size x length penalty x no-repeat
n-gram size asked for. For choosing p2_inference.py's defaults on the val set.

    python3 bench/p2_decode_sweep.py --checkpoint CK --decoder-bin decoder_model.bin \\
        --images hw3_data/p2_data/images/val --annotations hw3_data/p2_data/val.json \\
        [--beams 1 3 5] [--length-penalties 0 0.5 1] [--no-repeat 0 3] [--json-out FILE]
    (toy world: add --encoder DIR/clip.pt --clip-model DIR/clip.pt)
"""
import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hw3.common.files import image_key, write_json_atomically  # noqa: E402
from hw3.common.images import list_image_files  # noqa: E402
from hw3.p2.checkpoint import load_captioner  # noqa: E402
from hw3.p2.generation import DecodeConfig, caption_images  # noqa: E402
from hw3.p2.inference import encoded_batches  # noqa: E402
from hw3.p2.metrics import ClipScorer, score_captions  # noqa: E402
from tokenizer import BPETokenizer  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--decoder-bin", required=True, help="the course's decoder_model.bin")
    parser.add_argument("--images", required=True, help="labelled image folder (e.g. p2_data/images/val)")
    parser.add_argument("--annotations", required=True, help="its COCO-style caption file (e.g. p2_data/val.json)")
    parser.add_argument("--encoder", default=None, help="image encoder override (toy world: DIR/clip.pt)")
    parser.add_argument("--clip-model", default="ViT-B/32", help="CLIPScore model (toy world: DIR/clip.pt)")
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 3, 5])
    parser.add_argument("--length-penalties", type=float, nargs="+", default=[1.0])
    parser.add_argument("--no-repeat", type=int, nargs="+", default=[0])
    parser.add_argument("--max-length", type=int, default=DecodeConfig().max_length)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()

    model = load_captioner(args.checkpoint, args.decoder_bin, args.device, args.encoder)
    paths = list_image_files(args.images)
    batches = [(names, tokens) for names, tokens, _ in
               encoded_batches(model, paths, args.batch_size, args.workers, args.device, "encoding") if names]
    scorer = ClipScorer.load(args.clip_model, args.device)
    tokenizer = BPETokenizer()
    rows = []
    settings = list(itertools.product(args.beams, args.length_penalties, args.no_repeat))
    for beam_size, length_penalty, no_repeat in settings:
        config = DecodeConfig(beam_size, args.max_length, length_penalty, no_repeat)
        start = time.perf_counter()
        predictions = {}
        for names, tokens in batches:
            predictions.update((image_key(name), caption)
                               for name, caption in zip(names, caption_images(model, tokens, config, tokenizer)))
        seconds = time.perf_counter() - start
        scores = score_captions(predictions, args.annotations, args.images, clip_model=scorer, progress=False)
        words = sum(len(caption.split()) for caption in predictions.values()) / max(len(predictions), 1)
        rows.append(dict(beam_size=beam_size, length_penalty=length_penalty, no_repeat_ngram_size=no_repeat,
                         CIDEr=scores["CIDEr"], CLIPScore=scores["CLIPScore"], mean_words=words,
                         images_per_s=len(predictions) / seconds))
        print(f"beam {beam_size} length_penalty {length_penalty} no_repeat {no_repeat}: CIDEr {scores['CIDEr']:.4f} "
              f"CLIPScore {scores['CLIPScore']:.4f}, {words:.1f} words, {len(predictions) / seconds:.1f} images/s",
              flush=True)
    print(f"\n{'beam':>4} {'len.pen':>7} {'no-rep':>6} {'CIDEr':>7} {'CLIPScore':>9} {'words':>5} {'images/s':>8}")
    for row in rows:
        print(f"{row['beam_size']:>4} {row['length_penalty']:>7} {row['no_repeat_ngram_size']:>6} {row['CIDEr']:>7.4f} "
              f"{row['CLIPScore']:>9.4f} {row['mean_words']:>5.1f} {row['images_per_s']:>8.1f}")
    if args.json_out:
        write_json_atomically(args.json_out, dict(checkpoint=args.checkpoint, images=args.images,
                                                  device=args.device, rows=rows), indent=1)
        print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
