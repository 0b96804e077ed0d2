"""Image-encoding speed of CLIP ViT-L/14 (random weights, same architecture and cost as the released model).

    python3 bench/p1_speed.py [--device cpu|cuda] [--resolution 224|336] [--batch-size N] [--batches N]

Prints images/s of `encode_image` (fp32 on CPU, fp16 on CUDA, like p1_clip.py) and what that means for the 2500
val images, once plain and once with the mirror images p1_clip.py adds by default (twice the encoding work).
"""
import argparse
import time

import torch
from clip.model import CLIP, convert_weights

VAL_IMAGES = 2500


def vit_l14(resolution: int) -> CLIP:
    return CLIP(embed_dim=768, image_resolution=resolution, vision_layers=24, vision_width=1024, vision_patch_size=14,
                context_length=77, vocab_size=49408, transformer_width=768, transformer_heads=12,
                transformer_layers=12)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--resolution", type=int, default=224, help="224 (ViT-L/14) or 336 (ViT-L/14@336px)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 64 on CUDA, 8 on CPU")
    parser.add_argument("--batches", type=int, default=None, help="timed batches (default: 10 on CUDA, 3 on CPU)")
    args = parser.parse_args()
    device = torch.device(args.device)
    batch_size = args.batch_size or (64 if device.type == "cuda" else 8)
    batches = args.batches or (10 if device.type == "cuda" else 3)

    model = vit_l14(args.resolution).eval()
    if device.type == "cuda":
        convert_weights(model)  # fp16 weights, as clip.load gives on a GPU
    model = model.to(device)
    images = torch.randn(batch_size, 3, args.resolution, args.resolution, device=device, dtype=model.dtype)
    with torch.no_grad():
        model.encode_image(images)  # warm-up (allocator, cuDNN/BLAS kernels)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(batches):
            model.encode_image(images)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    speed = batch_size * batches / seconds
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"ViT-L/14 @ {args.resolution}px, {model.dtype}, batch {batch_size}, {name}: {speed:.2f} images/s")
    print(f"{VAL_IMAGES} images: {VAL_IMAGES / speed:.0f} s plain, {2 * VAL_IMAGES / speed:.0f} s with mirror images "
          "(image encoding only)")


if __name__ == "__main__":
    main()
