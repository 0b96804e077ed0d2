"""Caption decoding speed at the real sizes: ViT-L/14 image tokens (257 x 1024) + GPT-2 small + the recipe's
cross-attention and PEFT, all random weights; greedy and beam 5 decoding (generation.py) three ways:

    uncached   one image at a time, the whole sequence recomputed at every step (no key/value cache)
    cached     one image at a time, key/value cache, image keys/values computed once
    batched    the cache, and --batch-size images x K beams per forward pass

    python3 bench/p2_decode_speed.py [--device cuda] [--images 64] [--uncached-images 8] [--bar 10] [--json-out FILE]

The image tokens are random (the encoder's cost is left out: see bench/p1_speed.py). Random weights seldom choose the
end token, so every caption runs to --max-length tokens (20 by default, longer than a typical caption): the same work
for every way, and the token ids of all three ways are compared on the images they share. The bar (--bar, 10 by
default; the exit status): for each beam size, batched at least that many times the images/s of uncached, with
identical captions.
"""
import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hw3.common.files import write_json_atomically  # noqa: E402
from hw3.p2.generation import DecodeConfig, generate  # noqa: E402
from hw3.p2.model import CaptionConfig, build_caption_model, count_trainable  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEST_IMAGES = 1404  # the private test set of hw3_2.sh


def recipe(path):
    """CaptionConfig from a training config's `model:` section (yaml), or CaptionConfig's defaults."""
    if path is None:
        return CaptionConfig(), "CaptionConfig defaults"
    import yaml
    with open(path) as file:
        model = yaml.safe_load(file).get("model", {})
    return CaptionConfig.from_dict(dict(model, encoder="ViT-L/14")), str(path)


def build_model(config: CaptionConfig, device: str):
    torch.manual_seed(0)
    model = build_caption_model(config, None, device, pretrained_encoder=False)
    with torch.no_grad():  # stands in for training: the new modules must not be zero (cross-attention output)
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(0.0, 0.02)
    return model.eval()


def timed(device: torch.device, run):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def decode(model, tokens, config: DecodeConfig, batch_size: int):
    captions = []
    for i in range(0, tokens.size(0), batch_size):
        captions += generate(model, tokens[i:i + batch_size], config)
    return captions


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=None, help="images for cached/batched (default: 128 CUDA, 16 CPU)")
    parser.add_argument("--uncached-images", type=int, default=None,
                        help="images for the slow uncached way (default: 16 CUDA, 2 CPU)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch in the batched way")
    parser.add_argument("--max-length", type=int, default=20, help="tokens per caption")
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 5], help="beam sizes to time (1 = greedy)")
    default_recipe = ROOT / "configs" / "adapter.yaml"
    parser.add_argument("--config", default=str(default_recipe) if default_recipe.exists() else None,
                        help="training config whose `model:` section is the recipe (default: configs/adapter.yaml "
                             "when present, else CaptionConfig's defaults)")
    parser.add_argument("--bar", type=float, default=10.0,
                        help="least speed-up of batched over uncached for exit status 0 (default: %(default)s)")
    parser.add_argument("--json-out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    n_images = args.images or (128 if cuda else 16)
    n_uncached = min(n_images, args.uncached_images or (16 if cuda else 2))

    config, recipe_name = recipe(args.config)
    model = build_model(config, args.device)
    tokens = torch.randn(n_images, 257, 1024, generator=torch.Generator().manual_seed(0)).to(device)
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.processor() or platform.machine()}), " \
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}"
    print(f"{name}; recipe {recipe_name}: PEFT {'+'.join(config.peft)}, cross-attention in "
          f"{'all' if config.cross_attn_layers is None else config.cross_attn_layers} blocks, "
          f"{count_trainable(model):,} trainable parameters; {'fp16 autocast' if cuda else 'fp32'}; "
          f"{args.max_length} tokens per caption")

    ways = [("uncached", False, 1, n_uncached), ("cached", True, 1, n_images), ("batched", True, args.batch_size,
                                                                               n_images)]
    rows = []
    for beam_size in args.beams:
        captions = {}
        for way, use_cache, batch_size, count in ways:
            decode_config = DecodeConfig(beam_size, args.max_length, use_cache=use_cache)
            decode(model, tokens[:min(batch_size, 2)], decode_config, batch_size)  # warm-up
            captions[way], seconds = timed(device, lambda: decode(model, tokens[:count], decode_config, batch_size))
            rows.append(dict(beam_size=beam_size, way=way, batch_size=batch_size, images=count, seconds=seconds,
                             images_per_s=count / seconds))
            print(f"beam {beam_size} {way:<8} {count:>4} images in {seconds:7.2f} s: {count / seconds:8.2f} images/s",
                  flush=True)
        same = all(captions[way][:n_uncached] == captions["uncached"] for way in ("cached", "batched"))
        same_cached = captions["batched"] == captions["cached"]
        for row in rows[-3:]:
            row["same_as_uncached"], row["batched_same_as_cached"] = same, same_cached

    print(f"\n{'beam':>4} {'way':<9} {'batch':>5} {'images':>6} {'seconds':>8} {'images/s':>9} {'x uncached':>10} "
          f"{'same ids':>8}")
    for row in rows:
        uncached = next(r for r in rows if r["beam_size"] == row["beam_size"] and r["way"] == "uncached")
        row["speedup"] = row["images_per_s"] / uncached["images_per_s"]
        print(f"{row['beam_size']:>4} {row['way']:<9} {row['batch_size']:>5} {row['images']:>6} {row['seconds']:>8.2f} "
              f"{row['images_per_s']:>9.2f} {row['speedup']:>10.1f} {str(row['same_as_uncached']):>8}")
    verdicts = []
    for row in rows:
        if row["way"] == "batched":
            met = row["speedup"] >= args.bar and row["same_as_uncached"] and row["batched_same_as_cached"]
            verdicts.append(met)
            print(f"beam {row['beam_size']}: batched is {row['speedup']:.1f}x uncached, captions "
                  f"{'identical' if row['same_as_uncached'] and row['batched_same_as_cached'] else 'DIFFER'}; "
                  f"{TEST_IMAGES} test images: ~{TEST_IMAGES / row['images_per_s']:.0f} s of decoding; "
                  f"bar (>= {args.bar:g}x, same ids) {'met' if met else 'NOT met'}")
    if args.json_out:
        result = dict(device=name, recipe=recipe_name, caption_config=json.loads(config.to_json()),
                      max_length=args.max_length, torch=torch.__version__, rows=rows)
        write_json_atomically(args.json_out, result, indent=1)
        print(f"wrote {args.json_out}")
    return 0 if all(verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
