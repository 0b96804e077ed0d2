"""The best image-blind captioner on the toy world: one fixed caption for every val image.

    python3 bench/p2_toy_baselines.py TOY_WORLD_DIR [--top 20] [--json-out FILE]

Candidates: the `top` most frequent training captions and the tiny GPT-2's greedy caption (what the decoder says
without an image). Every candidate is scored on the toy val set; the best CIDEr and the best CLIPScore (tiny CLIP)
may come from different captions, and both bars count. The winners are scored again with metrics.score_captions
(the project's scorer); the search itself uses the same CIDEr on one PTB tokenisation of all candidates and batched
CLIP features. Prints JSON: {"CIDEr", "CLIPScore", "cider_caption", "clipscore_caption", "candidates": [...]}.
"""
import argparse
import json
import os
import sys
from collections import Counter
from typing import Dict, List

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hw3.p2.model import load_decoder  # noqa: E402
from hw3.common.errors import UserError  # noqa: E402
from hw3.common.files import write_text_atomically  # noqa: E402
from hw3.p2.config import DataPaths  # noqa: E402
from hw3.p2.data import read_split  # noqa: E402
from hw3.p2.metrics import (ClipScorer, cider_d_tokenized, load_references, ptb_tokenize,  # noqa: E402
                            read_image_like_course, score_captions, tokenize_for_scoring)
from hw3.toy.world import ToyWorld  # noqa: E402
from tokenizer import EOT_ID, BPETokenizer  # noqa: E402


@torch.no_grad()
def lm_greedy_caption(decoder_path: str, max_tokens: int = 40) -> str:
    """The decoder's most likely caption without an image: greedy from <|endoftext|> to the next one."""
    decoder = load_decoder(decoder_path).eval()
    tokens, past = [EOT_ID], None
    for _ in range(max_tokens):
        logits, past = decoder(torch.tensor([tokens[-1:]]), past=past)
        token = int(logits[0, -1].argmax())
        if token == EOT_ID:
            break
        tokens.append(token)
    return BPETokenizer().decode(tokens[1:]).strip()


def cider_of_fixed_captions(candidates: List[str], annotation_file: str) -> List[float]:
    """CIDEr of each candidate given to every image (one PTB run for all candidates, one for the references)."""
    references, _ = load_references(annotation_file)
    _, tokenized_refs = tokenize_for_scoring({key: candidates[0] for key in references}, references)
    tokenized = ptb_tokenize({str(i): [caption] for i, caption in enumerate(candidates)})
    return [cider_d_tokenized({key: tokenized[str(i)][0] for key in references}, tokenized_refs)[0]
            for i in range(len(candidates))]


def clipscore_of_fixed_captions(candidates: List[str], scorer: ClipScorer, image_paths: List[str],
                                batch_size: int = 100) -> List[float]:
    """Mean CLIPScore (2.5 * max(cos, 0)) of each candidate over the images, from batched image features."""
    model, device = scorer.model, scorer.device
    features = []
    for start in range(0, len(image_paths), batch_size):
        images = []
        for path in image_paths[start:start + batch_size]:
            images.append(scorer.preprocess(read_image_like_course(path)))
        features.append(model.encode_image(torch.stack(images).to(device)).float())
    images = F.normalize(torch.cat(features), dim=-1)
    texts = F.normalize(torch.cat([model.encode_text(scorer.tokenize(c)[0].to(device)).float()
                                   for c in candidates]), dim=-1)
    return (2.5 * (images @ texts.t()).clamp(min=0)).mean(0).tolist()


def best_fixed_caption(toy_world: str, top: int = 20, device: str = "cpu") -> Dict:
    world = ToyWorld(toy_world)
    paths = DataPaths.of_course_data(str(world.p2_data), str(world.decoder), str(world.clip), str(world.clip))
    train = read_split(paths.train_json, paths.train_images)
    val_json, val_images = paths.val_json, paths.val_images
    val = read_split(val_json, val_images)
    frequent = [caption for caption, _ in Counter(c for caps in train.captions for c in caps).most_common(top)]
    candidates = list(dict.fromkeys(frequent + [lm_greedy_caption(paths.decoder)]))
    scorer = ClipScorer.load(paths.clip_model, device)
    ciders = cider_of_fixed_captions(candidates, val_json)
    with torch.no_grad():
        clipscores = clipscore_of_fixed_captions(candidates, scorer, val.paths)
    best_cider = candidates[max(range(len(candidates)), key=ciders.__getitem__)]
    best_clip = candidates[max(range(len(candidates)), key=clipscores.__getitem__)]
    result = {}
    for metric, caption in (("CIDEr", best_cider), ("CLIPScore", best_clip)):
        scores = score_captions({key: caption for key in val.keys}, val_json, val_images,
                                clip_model=scorer if metric == "CLIPScore" else None, progress=False)
        result[metric] = scores[metric]
    result.update(cider_caption=best_cider, clipscore_caption=best_clip,
                  candidates=[{"caption": c, "CIDEr": round(a, 4), "CLIPScore": round(b, 4)}
                              for c, a, b in zip(candidates, ciders, clipscores)])
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("toy_world", help="a toyworld.py folder")
    parser.add_argument("--top", type=int, default=20, help="how many of the most frequent training captions to try")
    parser.add_argument("--json-out", help="also write the result here")
    args = parser.parse_args(argv)
    try:
        ToyWorld(args.toy_world).check()
    except UserError as error:
        parser.error(str(error))
    result = best_fixed_caption(args.toy_world, args.top)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json_out:
        write_text_atomically(args.json_out, text + "\n")
        print(f"wrote {args.json_out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
