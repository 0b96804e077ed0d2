"""Training-step time at the real sizes, with and without the frozen-feature cache (config key `cache_features`).

    python3 bench/p2_cache_speed.py [--config configs/adapter.yaml] [--device cuda] [--batch-size 8] [--steps 3]

The recipe's model (ViT-L/14 + GPT-2 small + its cross-attention and PEFT) with random weights, random images and
20-token captions. One optimizer step two ways, through hw3.p2.training.CrossEntropy as p2_train.py runs it:
    images   the frozen encoder runs on the images every step (no cache)
    cached   the encoder's tokens are given (what the memmap cache serves), only the decoder runs
Prints seconds per step and the ratio, i.e. how much faster an epoch is with the cache (image loading left out).
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hw3.p2.config import load_config  # noqa: E402
from hw3.p2.data import CaptionBatch  # noqa: E402
from hw3.p2.model import build_caption_model  # noqa: E402
from hw3.p2.training import CrossEntropy  # noqa: E402
from tokenizer import make_caption_batch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def seconds_per_step(model, batch, device, config, steps: int) -> float:
    """Seconds per optimizer step; batch.images are images (the encoder runs) or cached tokens."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    scaler = torch.cuda.amp.GradScaler(enabled=config.amp and device.type == "cuda")
    timings = []
    for _ in range(steps + 1):  # the first step warms up and is not counted
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = CrossEntropy(config.label_smoothing, config.amp)(model, batch.to(device))[0]
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - start)
    return sum(timings[1:]) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "adapter.yaml"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per way")
    args = parser.parse_args()

    config = load_config(args.config)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_caption_model(config.model, None, device, pretrained_encoder=False).train()
    size = model.encoder.image_size
    input_ids, targets = make_caption_batch([list(range(100, 120))] * args.batch_size)
    images = torch.randn(args.batch_size, 3, size, size)
    with torch.no_grad():
        tokens = model.encode_images(images.to(device)).half().cpu()  # the cache stores fp16
    index = torch.arange(args.batch_size)
    uncached = seconds_per_step(model, CaptionBatch(images, input_ids, targets, index), device, config,
                                args.steps)
    cached = seconds_per_step(model, CaptionBatch(tokens, input_ids, targets, index), device, config,
                              args.steps)
    print(f"{Path(args.config).name}: encoder {config.model.encoder}, {args.device}, batch {args.batch_size}: "
          f"{uncached:.3f} s/step from images, {cached:.3f} s/step from cached tokens: "
          f"the cache makes a step {uncached / cached:.1f}x faster")


if __name__ == "__main__":
    main()
