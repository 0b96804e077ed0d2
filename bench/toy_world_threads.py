"""How the toy world's two training loops scale with CPU threads: seconds per optimizer step of the tiny CLIP (a
50-image single-object batch with its attribute prompts, and a 128-image scene batch, at 64 and 96 px) and of the
tiny LM (64 captions), for each thread count, and the epoch times they project for the default WorldConfig.

    python3 bench/toy_world_threads.py [--threads 1 2] [--steps 8] [--json-out FILE]

Random inputs of the real shapes; the models and losses are the build's (hw3/toy/models.py). Run it on an idle
machine: another busy process changes the answer (OpenMP threads spin-wait for a core).
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from decoder import Decoder, GPTConfig  # noqa: E402
from hw3.common.clip_models import encode_text_trimmed  # noqa: E402
from hw3.toy import models  # noqa: E402
from hw3.toy.world import WorldConfig  # noqa: E402

CAPTION_TOKENS = 20  # about the longest toy caption in a batch (CLIP and GPT-2 tokens alike)


def seconds_per_step(step, steps: int) -> float:
    step()  # warm-up: allocations, kernel selection
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - started) / steps


def clip_step(size: int, batch: int, attributes: bool):
    config = models.ClipConfig()
    model = models.build_tiny_clip(config, size).float().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    tokens = torch.randint(1, 1000, (batch, CAPTION_TOKENS))
    tokens[:, -1] = 49407  # the end token (the largest id): encode_text_trimmed reads the features there
    prompts = [torch.randint(1, 1000, (n, 5)) for n in (10, 5)]  # "a {colour} shape." and "a {shape}." prompts
    for prompt in prompts:
        prompt[:, -1] = 49407

    def step():
        image_features = F.normalize(model.encode_image(models.normalise_images(images)), dim=-1)
        text_features = F.normalize(encode_text_trimmed(model, tokens), dim=-1)
        loss = models.contrastive_loss(image_features, text_features, torch.tensor(40.0))
        if attributes:
            for prompt in prompts:
                logits = image_features @ F.normalize(encode_text_trimmed(model, prompt), dim=-1).t()
                loss = loss + F.cross_entropy(logits, torch.zeros(batch, dtype=torch.long))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def lm_step(batch: int):
    """A train_tiny_lm step: logits over the ~51 tokens the toy captions use (SeenTokenEmbedding, SeenTokenHead)."""
    config = models.LMConfig()
    decoder = Decoder(GPTConfig(n_layer=config.n_layer, n_head=config.n_embd // 64, n_embd=config.n_embd)).train()
    seen = torch.arange(51)
    decoder.transformer.wte = models.SeenTokenEmbedding(decoder.transformer.wte, seen)
    decoder.lm_head = models.SeenTokenHead(decoder.transformer.wte.weight)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=1e-4)
    input_ids = torch.randint(0, len(seen), (batch, CAPTION_TOKENS))
    targets = torch.randint(0, len(seen), (batch * CAPTION_TOKENS,))

    def step():
        logits, _ = decoder(input_ids, use_cache=False)
        loss = F.cross_entropy(logits.flatten(0, 1), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per measurement (default: %(default)s)")
    parser.add_argument("--json-out", help="also write the table as JSON here")
    args = parser.parse_args(argv)
    world, clip_config = WorldConfig(), models.ClipConfig()
    single_batches = world.clip_images_per_class  # each class once per batch: 50 images
    scene_batches = -(-world.p2_train // clip_config.batch_size)
    lm_batches = -(-world.p2_train * 5 // models.LMConfig().batch_size)  # five captions per image
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        row = {"threads": threads}
        for size in (clip_config.low_res_size, clip_config.image_size):
            single = seconds_per_step(clip_step(size, 50, True), args.steps)
            scene = seconds_per_step(clip_step(size, clip_config.batch_size, False), args.steps)
            row[f"clip_{size}px_single_s"], row[f"clip_{size}px_scene_s"] = round(single, 4), round(scene, 4)
            row[f"clip_{size}px_epoch_s"] = round(single * single_batches + scene * scene_batches, 1)
        row["lm_step_s"] = round(seconds_per_step(lm_step(models.LMConfig().batch_size), args.steps), 4)
        row["lm_epoch_s"] = round(row["lm_step_s"] * lm_batches, 1)
        low, full = clip_config.low_res_size, clip_config.image_size
        low_epochs = world.clip_epochs - clip_config.full_size_epochs
        row["projected_training_s"] = round(low_epochs * row[f"clip_{low}px_epoch_s"] + clip_config.full_size_epochs
                                            * row[f"clip_{full}px_epoch_s"] + world.lm_epochs * row["lm_epoch_s"], 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json_out:
        with open(args.json_out, "w") as file:
            json.dump(rows, file, indent=1)
        print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
