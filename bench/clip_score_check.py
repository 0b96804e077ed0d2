"""CLIPScore on the scorer's device path: equal to the course's one-image loop, and how fast, at ViT-B/32 size.

    python3 bench/clip_score_check.py [--device cuda] [--num-images 500] [--num-workers 4]

Random weights in the ViT-B/32 architecture (no pretrained weights needed), fp16 on GPU as `clip.load` gives;
random JPEGs of COCO size. Prints how many scores equal the course's loop exactly, the largest difference, and
images/s of metrics.ClipScorer.
"""
import argparse
import os
import random
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from clip.model import CLIP
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hw3.p2 import metrics  # noqa: E402

WORDS = "a man woman dog cat red blue on the with riding sitting street table two of in next to".split()


def course_loop(model, preprocess, captions, paths, device):
    """The course scorer's computation, one image at a time."""
    import clip
    scores = {}
    for key, caption in captions.items():
        image = preprocess(Image.open(paths[key]).convert("RGB")).unsqueeze(0).to(device)
        with torch.no_grad():
            image_features = model.encode_image(image)
            text_features = model.encode_text(clip.tokenize([caption]).to(device))
        scores[key] = 2.5 * max(F.cosine_similarity(image_features, text_features).item(), 0)
    return scores


def random_clip_state_dict(shared_scale: float = 1.0) -> dict:
    """Random ViT-B/32-shaped CLIP whose final LayerNorm biases map to one shared embedding direction, so that
    cosines are mostly positive (pure random weights give mostly negative ones, which all clamp to 0)."""
    state_dict = CLIP(512, 224, 12, 768, 32, 77, 49408, 512, 8, 12).state_dict()
    shared = torch.randn(512) * shared_scale
    for bias, projection in [("visual.ln_post.bias", "visual.proj"), ("ln_final.bias", "text_projection")]:
        state_dict[bias] = torch.linalg.pinv(state_dict[projection].T) @ shared  # bias @ projection == shared
    return state_dict


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-images", type=int, default=500)
    parser.add_argument("--num-workers", type=int, default=4)
    args = parser.parse_args()

    torch.manual_seed(0)
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as folder:
        clip_path = os.path.join(folder, "vit_b32_random.pt")
        torch.save(random_clip_state_dict(), clip_path)
        captions, paths = {}, {}
        for i in range(args.num_images):
            key = f"{i:06d}"
            pixels = np.random.default_rng(i).integers(0, 256, size=(375, 500, 3), dtype=np.uint8)
            paths[key] = os.path.join(folder, f"{key}.jpg")
            Image.fromarray(pixels).save(paths[key])
            captions[key] = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15)))

        scorer = metrics.ClipScorer.load(clip_path, args.device)
        print(f"device {args.device}, CLIP weights {scorer.model.dtype}, {args.num_images} images")
        expected = course_loop(scorer.model, scorer.preprocess, captions, paths, args.device)
        for num_workers in [0, args.num_workers]:
            start = time.time()
            got = scorer(captions, paths, num_workers=num_workers, progress=False)
            seconds = time.time() - start
            same = sum(got[key] == expected[key] for key in captions)
            worst = max(abs(got[key] - expected[key]) for key in captions)
            low, high = min(expected.values()), max(expected.values())
            print(f"num_workers={num_workers}: {same}/{len(captions)} scores identical to the course loop "
                  f"(scores {low:.4f} to {high:.4f}), max |difference| {worst:.3g}, "
                  f"{len(captions) / seconds:.1f} images/s")


if __name__ == "__main__":
    main()
