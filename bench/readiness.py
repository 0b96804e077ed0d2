"""Readiness on the course data: do the graded jobs and the training runs fit an 11 GB RTX 2080 Ti and the course's
time limits? Random weights at the real sizes through the project's own code; nothing is downloaded.

    python3 bench/readiness.py [--device cpu|cuda] [--configs C.yaml ...] [--batch N] [--json-out FILE]
    python3 bench/readiness.py --table docs/readiness.json     # the Markdown of a JSON written before

Measured on the device it runs on: per config, a training step through hw3.p2.training's step functions
(backward_batch with the config's objective, optimizer_step) on cached fp16 encoder tokens, --batch images with
22-token captions, and on CUDA torch.cuda.max_memory_allocated of a step at the config's batch and longest caption,
allocations capped at 10.3 GiB; the self-critical stage's step likewise (SelfCritical).

Projected for a 2080 Ti, which this never ran on. Time: FLOPs (torch.profiler's count of mm, bmm, addmm and conv,
linear in the batch) / 12 TFLOPS fp16 (7 for the timm towers the feature cache runs in fp32) + 10 us per
kernel-launching op + image reading (CPU time of one thread here) / 4 loader processes for hw3_2.sh (the feature
cache and the reward's image embeddings read in the main process). hw3_1.sh: the ViT-L/14 tower's work on the images
and their mirror images. Not counted: loading models, hw3_1.sh's 900 prompts, CLIPScore at validation, the CIDEr
reward's Python, P3. Training memory at the config's batch and longest caption: the weights as the GPU holds them
(OpenAI CLIP fp16, timm fp32, the rest fp32) + fp16 copies of the decoder-side weights under autocast + 12 bytes per
trainable parameter (gradient, AdamW) + what the forward saves for backward (saved_tensors_hooks at batch 1 and 2,
extrapolated; fp32 on a CPU: an upper bound) + 10 bytes per logit for the loss; it fits within 10.3 GiB (a 2080 Ti
reports 11019 MiB, the CUDA context takes about 0.4 GiB). --toy-world DIR builds every model from the toy world's
tiny CLIP and LM instead: a quick run of this script.
"""
import argparse
import dataclasses
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from clip.model import VisionTransformer, convert_weights
from PIL import Image
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.clip_score_check import random_clip_state_dict  # noqa: E402
from hw3.common.files import read_json, write_json_atomically  # noqa: E402
from hw3.common.images import ImageFiles  # noqa: E402
from hw3.p2.config import load_config  # noqa: E402
from hw3.p2.data import CaptionBatch  # noqa: E402
from hw3.p2.generation import autocast_for, generate  # noqa: E402
from hw3.p2.metrics import ClipScorer  # noqa: E402
from hw3.p2.model import build_caption_model, count_trainable, read_decoder_config  # noqa: E402
from hw3.p2.scst import ClipReward, SelfCritical  # noqa: E402
from hw3.p2.training import CrossEntropy, backward_batch, build_optimizer, optimizer_step  # noqa: E402
from tokenizer import BPETokenizer, make_caption_batch  # noqa: E402

GIB, TFLOPS, FP32_TFLOPS, LAUNCH_S, BUDGET_GIB, LOADERS = 1024 ** 3, 12e12, 7e12, 10e-6, 10.3, 4
TRAIN, VAL, TEST, P1_IMAGES, CAPTIONS, VOCAB = 10604, 1789, 1404, 2500, 5, 50257  # the course's data
CONFIGS = [str(ROOT / "configs" / f"{name}.yaml") for name in ("adapter", "prefix", "lora", "siglip_adapter",
                                                                 "dfn5b_adapter")]
SUBMISSION = ("adapter.yaml", "prefix.yaml", "lora.yaml")  # before "submission ready"; --candidates: the others
SCST = ("lora.yaml", "scst.yaml")  # the stage's config over the run it fine-tunes
NO_KERNEL = set("view as_strided _reshape_alias reshape transpose t permute expand unsqueeze squeeze select slice "
                "narrow split chunk unbind alias _unsafe_view flatten contiguous resolve_conj resolve_neg detach lift "
                "empty empty_strided empty_like to result_type is_nonzero set_ numpy_T".split())


def timed(device: torch.device, run) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    sync()
    start = time.perf_counter()
    run()
    sync()
    return time.perf_counter() - start


def work(device: torch.device, run) -> list:
    """[FLOPs, kernel-launching ops] of run()."""
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        timed(device, run)
    leaves = [event.name.split("::")[-1] for event in prof.events() if not event.cpu_children]
    return [float(sum(event.flops for event in prof.events())), sum(name not in NO_KERNEL for name in leaves)]


def gpu_s(flops: float, launches: float, tflops: float = TFLOPS) -> float:
    return flops / tflops + launches * LAUNCH_S


def reading_s(paths: list, preprocess) -> float:
    """CPU seconds to read and preprocess one image on one thread, as a loader process does: this thread's CPU time
    (time.thread_time), which other processes' load does not inflate, of the fastest of four reads of each image."""
    files, threads = ImageFiles(paths, preprocess), torch.get_num_threads()
    torch.set_num_threads(1)

    def cpu_s(i: int) -> float:
        start = time.thread_time()
        files[i]
        return time.thread_time() - start
    fastest = [min(cpu_s(i) for _ in range(4)) for i in range(len(files))]
    torch.set_num_threads(threads)
    return sum(fastest) / len(fastest)


def captioner(model_config, device: torch.device, toy):
    """The config's captioner with random weights, its new modules drawn as trained ones (random weights then never
    end a caption: every caption runs to its longest); OpenAI CLIP towers in fp16 on CUDA, as load_clip gives them."""
    torch.manual_seed(0)
    if toy:
        decoder = str(toy / "decoder_model.bin")
        model_config = dataclasses.replace(model_config, decoder=read_decoder_config(decoder))
        model = build_caption_model(model_config, decoder, device, encoder=str(toy / "clip.pt"))
    else:
        model = build_caption_model(model_config, None, device, pretrained_encoder=False)
    with torch.no_grad():
        for param in (p for p in model.parameters() if p.requires_grad):
            param.normal_(0.0, 0.02)
    if device.type == "cuda" and isinstance(model.encoder.backbone, VisionTransformer):
        convert_weights(model.encoder.backbone)
    return model


def caption_batch(encoder, images: int, tokens: int) -> CaptionBatch:
    """Cached tokens (fp16, as the feature cache holds them) of `images` images, each with a `tokens`-token caption."""
    cached = torch.randn(images, encoder.n_tokens, encoder.width, generator=torch.Generator().manual_seed(0)).half()
    input_ids, targets = make_caption_batch([list(range(100, 100 + tokens))] * images)
    return CaptionBatch(cached, input_ids, targets, torch.arange(images))


def step_figures(model, objective, batch: CaptionBatch, config, device: torch.device, longest=None) -> dict:
    """A training step as the Trainer takes it: its seconds, and the work of backward_batch and of optimizer_step
    apart (a step takes grad_accum micro-batches); on CUDA the peak memory of a step on `longest`."""
    optimizer, scheduler, scaler = build_optimizer(model.train(), config, 1000, device)
    losses = []

    def backward(micro=batch):
        losses.append(backward_batch(model, micro.to(device), objective, scaler)[0])

    def apply():
        optimizer_step(model, optimizer, scheduler, scaler, config.grad_clip, losses[-1:])
    backward(), apply()  # warm-up: AdamW's state, the allocator
    figures = dict(batch=len(batch.image_index), step_s=timed(device, lambda: (backward(), apply())),
                   backward=work(device, backward), optimizer=work(device, apply))
    if device.type == "cuda" and longest is not None:
        torch.cuda.reset_peak_memory_stats(device)
        try:
            backward(longest), apply()
            figures["peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        except RuntimeError as error:  # over the cap of BUDGET_GIB: it does not fit
            figures["peak_gib"] = str(error).splitlines()[0]
    model.zero_grad(set_to_none=True)
    optimizer.state.clear()
    return figures


def saved_bytes(model, objective, batch: CaptionBatch, device: torch.device) -> int:
    """Bytes the training forward keeps for backward: the saved tensors' storages, each once, parameters left out."""
    parameters = {t.storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    storages = {}

    def pack(tensor):
        if tensor.storage().data_ptr() not in parameters:
            storages[tensor.storage().data_ptr()] = tensor.storage().nbytes()
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        objective(model, batch.to(device))
    return sum(storages.values())


def training_memory(model, objective, config, device: torch.device) -> dict:
    """The projected 2080 Ti peak in GiB by part (module docstring) and the largest batch within BUDGET_GIB."""
    length, batch, trainable = config.model.max_caption_length, config.batch_size, count_trainable(model)
    one, two = (saved_bytes(model, objective, caption_batch(model.encoder, b, length), device) for b in (1, 2))
    per_item, logits = two - one, 10 * (length + 2) * VOCAB
    decoder_side = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("encoder."))
    encoder = sum(p.numel() for p in model.encoder.parameters())
    clip = isinstance(model.encoder.backbone, VisionTransformer)
    parts = dict(weights=encoder * (2 if clip else 4) + 4 * decoder_side, optimizer=12 * trainable,
                 casts=2 * decoder_side if config.amp and device.type != "cuda" else 0,  # CUDA: among the saved
                 saved=one + per_item * (batch - 1), loss=logits * batch)
    fixed = sum(parts.values()) - (per_item + logits) * batch
    return dict({name: value / GIB for name, value in parts.items()}, total=sum(parts.values()) / GIB,
                largest_batch=int((BUDGET_GIB * GIB - fixed) // (per_item + logits)))


def image_work(model, decode, device: torch.device) -> dict:
    """The work of encoding one image (under autocast, as hw3_2.sh) and of decoding its tokens with `decode`."""
    size, encoder = model.encoder.image_size, model.encoder
    with torch.no_grad(), autocast_for(device):
        encode = work(device, lambda: encoder(torch.randn(1, 3, size, size, device=device)))
    tokens = torch.randn(1, encoder.n_tokens, encoder.width, device=device)
    return dict(encode=encode, decode=work(device, lambda: generate(model.eval(), tokens, decode)))


def epoch_s(figures: dict, config, decode: list, items: int) -> float:
    """A projected epoch: `items` micro-batch items, an optimizer step per grad_accum micro-batches, val captions."""
    (flops, launches), micro = figures["backward"], math.ceil(items / config.batch_size)
    return (micro * gpu_s(flops * config.batch_size / figures["batch"], launches)
            + math.ceil(micro / config.grad_accum) * gpu_s(*figures["optimizer"])
            + gpu_s(decode[0] * VAL, decode[1] * math.ceil(VAL / config.val_batch_size)))


def config_row(path: str, device: torch.device, batch, jpegs: list, toy, readings: dict) -> dict:
    """A cross-entropy config: its sizes, measured step, projected memory and projected times. `readings`: reading_s
    per encoder name, measured once for all configs of an encoder, so that they project one cache build."""
    config = load_config(path)
    print(f"{path}: {config.model.encoder}, PEFT {'+'.join(config.model.peft)}", file=sys.stderr, flush=True)
    model = captioner(config.model, device, toy)
    encoder, objective, images = model.encoder, CrossEntropy(config.label_smoothing, config.amp), TRAIN + VAL
    if encoder.name not in readings:
        readings[encoder.name] = reading_s(jpegs, encoder.preprocess)
    row = dict(config=Path(path).name, encoder=encoder.name, tokens=encoder.n_tokens, width=encoder.width,
               trainable=count_trainable(model), batch=config.batch_size, epochs=config.epochs,
               cache_gb=images * encoder.n_tokens * encoder.width * 2 / 1e9,
               reading_s=readings[encoder.name], **image_work(model, config.decode, device))
    longest = caption_batch(encoder, config.batch_size, config.model.max_caption_length)
    row["measured"] = step_figures(model, objective, caption_batch(encoder, batch or config.batch_size, 22), config,
                                   device, longest)
    row["memory_gib"] = training_memory(model, objective, config, device)
    (encode, encode_launches), (decode, decode_launches) = row["encode"], row["decode"]
    tflops = TFLOPS if isinstance(encoder.backbone, VisionTransformer) else FP32_TFLOPS  # the cache runs timm in fp32
    row["projected_s"] = dict(
        cache_build=(gpu_s(encode * images, encode_launches * math.ceil(images / 64), tflops)
                     + row["reading_s"] * images),
        hw3_2=(gpu_s((encode + decode) * TEST, (encode_launches + decode_launches) * math.ceil(TEST / 32))
               + row["reading_s"] * TEST / LOADERS),
        training=config.epochs * epoch_s(row["measured"], config, row["decode"], TRAIN * CAPTIONS),
        hw3_1=gpu_s(2 * encode * P1_IMAGES, 2 * encode_launches * math.ceil(P1_IMAGES / 64)))
    row["projected_s"]["step"] = epoch_s(row["measured"], config, [0, 0], config.batch_size)  # one, no val
    return row


def scst_row(device: torch.device, batch, jpegs: list, toy) -> dict:
    """The self-critical stage: SelfCritical's step (beam-5 candidates, their teacher-forced pass, the CLIPScore
    reward with a random ViT-B/32), the val captions, and the reward's image embeddings at the stage's start."""
    with open(ROOT / "configs" / SCST[0]) as file:
        config = load_config(str(ROOT / "configs" / SCST[1]), base=yaml.safe_load(file), flags=dict(init=SCST[0]))
    model = captioner(config.model, device, toy)
    clip_file = toy / "clip.pt" if toy else Path(jpegs[0]).parent / "vit_b32.pt"
    if not toy:
        torch.save(random_clip_state_dict(), clip_file)
    scorer, images = ClipScorer.load(str(clip_file), str(device)), batch or config.batch_size
    objective = SelfCritical(config.scst, config.decode, [["a photo of a thing."]] * images, BPETokenizer(),
                             ClipReward(scorer, (jpegs * images)[:images]), config.amp)
    micro = caption_batch(model.encoder, images, 1)  # the images' cached tokens: the captions are the candidates
    figures = step_figures(model, objective, micro, config, device, longest=micro)
    epoch = epoch_s(figures, config, image_work(model, config.decode, device)["decode"], TRAIN)  # an item per image
    setup = TRAIN * (gpu_s(work(device, lambda: ClipReward(scorer, jpegs[:1]))[0], 0)
                     + reading_s(jpegs, scorer.preprocess))
    return dict(base=SCST[0], config=SCST[1], epochs=config.epochs, measured=figures,
                projected_s=dict(epoch=epoch, training=setup + config.epochs * epoch))


def duration(seconds: float) -> str:
    return next(f"{seconds / size:.1f} {unit}" for unit, size, limit in (("s", 1, 120), ("min", 60, 7200),
                                                                        ("h", 3600, math.inf)) if seconds < limit)


def cost(rows: list) -> list:
    """[projected seconds, feature-cache GB] of training `rows`, one feature cache per encoder."""
    caches = list({row["encoder"]: row for row in rows}.values())
    return [sum(row["projected_s"]["training"] for row in rows)
            + sum(row["projected_s"]["cache_build"] for row in caches), sum(row["cache_gb"] for row in caches)]


def row_text(row: dict) -> str:
    times, memory, measured = row["projected_s"], row["memory_gib"], row["measured"]
    peak = measured.get("peak_gib", "")
    return (f"| `{row['config']}` | `{row['encoder']}` | {row['tokens']} x {row['width']} | {row['trainable']:,} | "
            f"{row['cache_gb']:.2f} GB | {duration(times['cache_build'])} | {times['step']:.3f} | "
            f"{duration(times['training'])} | {duration(times['hw3_2'])} | "
            f"{memory['total']:.2f} GiB at {row['batch']} | {memory['largest_batch']} | "
            f"{measured['step_s']:.2f} s at batch {measured['batch']}"
            f"{f', peak {peak:.2f} GiB' if isinstance(peak, float) else peak} |")


def markdown(result: dict) -> str:
    """The table and sums docs/readiness.md holds between its markers, from a JSON of measure()."""
    rows, scst = result["configs"], result["scst"]
    ready, more = [[row for row in rows if (row["config"] in SUBMISSION) == first] for first in (True, False)]
    (ready_s, ready_gb), (more_s, more_gb) = cost(ready), cost(more)
    jobs = [max(row["projected_s"][job] for row in ready or rows) for job in ("hw3_1", "hw3_2")]
    names = ", ".join(f"`{name}`" for name in SUBMISSION)
    bound = "" if result["cuda"] else ", an upper bound (saved tensors counted in fp32)"
    return "\n".join([
        f"Made by `bench/readiness.py` on {result['device']}, torch {result['torch']}. Every figure is a projection "
        "for a 2080 Ti but the last column's, measured there. Training: the config's epochs with val captions; peak "
        f"memory at the config's batch and longest caption{bound}; the largest batch within {BUDGET_GIB} GiB.",
        "", "| config | encoder | tokens x width | trainable | feature cache | cache build | s/step | training | "
            "`hw3_2.sh`, 1,404 images | training peak | largest batch | measured: one step |", "|---" * 12 + "|",
        *map(row_text, rows), "",
        f"- `hw3_1.sh`, 2,500 images and their mirror images through ViT-L/14: {duration(jobs[0])} (limit 10 min); "
        f"`hw3_2.sh`: at most {duration(jobs[1])} with a ViT-L/14 config (limit 40 min).",
        f"- The self-critical stage (`{scst['config']}` over `{scst['base']}`, {scst['epochs']} epochs of "
        f"{TRAIN:,} images with beam-5 candidates): {duration(scst['projected_s']['epoch'])} per epoch, "
        f"{duration(scst['projected_s']['training'])} in all.",
        f"- To \"submission ready\" (the {names} runs, their feature cache, the self-critical stage, `hw3_1.sh`, "
        "`hw3_2.sh`; P3 and scoring not counted): "
        f"{duration(ready_s + scst['projected_s']['training'] + sum(jobs))} and {ready_gb:.1f} GB of feature cache. "
        f"`--candidates` adds {duration(more_s)} and {more_gb:.1f} GB ({ready_gb + more_gb:.1f} GB in all)."])


def measure(args) -> dict:
    device, toy = torch.device(args.device), Path(args.toy_world) if args.toy_world else None
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, BUDGET_GIB * GIB / total), device)
        name = f"{torch.cuda.get_device_name(device)} (allocations capped at {BUDGET_GIB} GiB)"
    else:
        name = (f"a CPU ({platform.processor() or platform.machine()}, torch threads: {torch.get_num_threads()}, "
                f"load average {os.getloadavg()[0]:.1f} at the start)")
    batch, readings = args.batch or (None if device.type == "cuda" else 2), {}
    with tempfile.TemporaryDirectory() as folder:
        jpegs = []
        for i, pixels in enumerate(np.random.default_rng(0).integers(0, 256, (8, 15, 20, 3), dtype=np.uint8)):
            jpegs.append(f"{folder}/{i}.jpg")  # smooth noise: a photo's file size, at the course's 640 x 480
            Image.fromarray(pixels).resize((640, 480), Image.Resampling.BILINEAR).save(jpegs[-1], quality=90)
        return dict(device=name, cuda=device.type == "cuda", torch=torch.__version__,
                    configs=[config_row(path, device, batch, jpegs[:4], toy, readings) for path in args.configs],
                    scst=scst_row(device, batch, jpegs, toy))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--configs", nargs="+", default=CONFIGS, help="cross-entropy configs (default: the five "
                                                                      "real ones)")
    parser.add_argument("--batch", type=int, help="images of each measured step (default: the config's on CUDA, "
                                                  "2 on a CPU); the projections are at the config's")
    parser.add_argument("--toy-world", help="build every model from this toy world's tiny CLIP and LM")
    parser.add_argument("--json-out", help="write every figure as JSON here")
    parser.add_argument("--table", metavar="JSON", help="print the Markdown of this JSON and measure nothing")
    args = parser.parse_args(argv)
    result = read_json(args.table) if args.table else measure(args)
    if args.json_out:
        write_json_atomically(args.json_out, result, indent=1)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
