"""Readiness at the real sizes, random weights: does each graded job fit an 11 GB RTX 2080 Ti and the course's time
limits, and which stronger frozen encoder could P2 use instead of ViT-L/14?

    python3 bench/readiness.py [--device cpu|cuda] [--sections p1 p2 train cache encoders candidates]
                               [--json-out FILE]

Sections, each through the project's own code path (random weights: nothing is downloaded):
  p1        hw3_1.sh: hw3.p1.zero_shot.encode_classes (50 classes x the default cifar18 templates) and encode_images
            (32 x 32 PNGs, mirror images averaged) with CLIP ViT-L/14 (fp16 weights on CUDA, as load_clip gives)
  p2        hw3_2.sh: hw3.p2.inference.caption_files over 640 x 480 JPEGs with the adapter recipe
            (configs/adapter.yaml) and DecodeConfig's defaults (beam 3, 30 tokens). Random weights never choose the
            end token, so every caption runs to 30 tokens: the worst case
  train     per real config (configs/adapter.yaml, prefix.yaml, lora.yaml): one optimizer step from cached encoder
            tokens (fp16, as the cache holds them) with the steps of hw3.p2.training.Trainer (CrossEntropy,
            GradScaler, gradient clipping, hw3.p2.optim.adamw), and the validation captions (generation.generate
            on cached tokens, val_batch_size per batch)
  cache     hw3.p2.data.feature_cache: the encoder tokens of the train + val images, written as an fp16 .npy
  encoders  frozen encoders one could pick (OpenAI CLIP ViT-L/14 and ViT-L/14@336px, timm CLIP/SigLIP towers): tokens
            per image, feature-cache size, encoder time per image, and the adapter recipe built on each (trainable
            parameters, training step, projected training memory); plus P1's ViT-L/14 + ViT-L/14@336px ensemble
  candidates per candidate-encoder config (configs/siglip_adapter.yaml, dfn5b_adapter.yaml): the config's own
            captioner on its tower: hw3_2.sh time (the tower's encoding + decoding with the tower's token count),
            feature-cache size and build time, training step and projected peak at the config's batch, validation
            captions at its val_batch_size. All 2080 Ti figures are projections (measured only with --device cuda)

Sizes (the assignment and the course data): P1 2500 val images of 32 x 32 px (homework 1's P1 images); P2 1404 test images, 10604 train +
1789 val images with about 5 captions each. Limits on an RTX 2080 Ti 11 GB: hw3_1.sh 10 min, hw3_2.sh 40 min;
training has none.

Time. Wall time measured on this device over a few items (CPU) or many (CUDA), extrapolated linearly to the full
size. "2080 Ti" times are projections: FLOPs (torch.profiler's count of mm / bmm / addmm / conv) / --tflops (fp16;
--fp32-tflops where the project runs a timm encoder in fp32: feature_cache does not autocast), plus --launch-us per
kernel-launching op (profiled leaf ops that are not views or allocations), plus image reading (measured here, per
image) divided by the job's loader processes. Model loading from disk is not counted. On CPU the profile is taken on
the timed run itself; on CUDA on a separate run of one batch.

Memory. On CUDA: torch.cuda.max_memory_allocated (and _reserved) under a cap of --budget-gib
(torch.cuda.set_per_process_memory_fraction). Projected 2080 Ti training peak (on any device), at the config's batch
size and its longest caption (max_caption_length tokens + start and end token):
    weights     the frozen encoder (fp16 for OpenAI CLIP, as load_clip gives on CUDA; fp32 for timm; it sits on the GPU
                even when training from the cache), GPT-2 and the new modules in fp32
    casts       under fp16 autocast, the fp16 copies of the decoder-side weights that matmuls keep for backward: 2 bytes
                per decoder-side parameter when the count below ran without autocast (on CUDA they are in "saved")
    gradients   4 bytes per trainable parameter
    AdamW       exp_avg + exp_avg_sq: 8 bytes per trainable parameter
    saved       what the forward keeps for backward: torch.autograd.graph.saved_tensors_hooks over one training
                forward, each storage counted once, parameters left out; counted at batch 1 and 2 and extrapolated
                linearly. On CPU the forward runs in fp32 with fp32 dropout masks, so this overstates fp16 autocast
                (most tensors in 2 bytes, dropout masks in 1): an upper bound
    transient   the loss's largest temporaries, 10 bytes per logit [B, T, 50257]: the fp16 logits and two fp32
                gradients of the log-probabilities in backward (the fp32 log-probabilities are among "saved")
A job fits when its peak is at most --budget-gib, what PyTorch can allocate on a 2080 Ti (the driver reports 11019 MiB
= 10.76 GiB; the CUDA context and cuBLAS workspace take about 0.4 GiB of it).
"""
import argparse
import dataclasses
import gc
import math
import os
import platform
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from clip.model import VisionTransformer, convert_weights
from PIL import Image
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.p1_speed import vit_l14  # noqa: E402
from bench.p2_decode_speed import build_model as random_captioner  # noqa: E402
from hw3.common.clip_models import clip_transform  # noqa: E402
from hw3.common.errors import UserError  # noqa: E402
from hw3.common.files import write_json_atomically  # noqa: E402
from hw3.common.images import ImageFiles  # noqa: E402
from hw3.p1.prompts import class_names, resolve_templates  # noqa: E402
from hw3.p1.zero_shot import ClassifierConfig, encode_classes, encode_images  # noqa: E402
from hw3.p2.config import TrainConfig, load_config  # noqa: E402
from hw3.p2.data import CaptionBatch, feature_cache  # noqa: E402
from hw3.p2.encoder import ImageEncoder, load_image_encoder  # noqa: E402
from hw3.p2.generation import DecodeConfig, autocast_for, generate  # noqa: E402
from hw3.p2.inference import caption_files  # noqa: E402
from hw3.p2.model import CaptionModel, count_trainable, trainable_state_dict  # noqa: E402
from hw3.p2.optim import adamw  # noqa: E402
from hw3.p2.training import CrossEntropy  # noqa: E402
from tokenizer import make_caption_batch  # noqa: E402

GIB = 1024 ** 3
P1_IMAGES, P1_SIZE, P1_CLASSES, P1_BATCH, TEXT_BATCH = 2500, 32, 50, ClassifierConfig().batch_size, 256
P2_IMAGES, P2_BATCH = 1404, 32  # hw3_2.sh's test set; p2_inference.py's default batch
TRAIN_IMAGES, VAL_IMAGES, CAPTIONS_PER_IMAGE, CACHE_BATCH = 10604, 1789, 5, 64
LIMITS = {"hw3_1.sh": 600, "hw3_2.sh": 2400}
VOCAB = 50257
CONFIGS = [str(ROOT / "configs" / f"{name}.yaml") for name in ("adapter", "prefix", "lora")]
CANDIDATES = [str(ROOT / "configs" / f"{name}.yaml") for name in ("siglip_adapter", "dfn5b_adapter")]
SECTIONS = ["p1", "p2", "train", "cache", "encoders", "candidates"]
ENCODERS = ["ViT-L/14", "ViT-L/14@336px", "timm:eva02_large_patch14_clip_336.merged2b",
            "timm:vit_huge_patch14_clip_quickgelu_378.dfn5b", "timm:vit_so400m_patch14_siglip_384.webli"]
ADAPTER_TRAINING_KEYS = ("batch_size", "caption_tokens", "trainable", "checkpoint_tensors", "s_per_step", "work",
                         "peak", "error", "projected_memory_gib", "here_s_per_step_at_batch",
                         "projected_2080ti_s_per_step")  # training_row's keys
NO_KERNEL = {"aten::view", "aten::as_strided", "aten::_reshape_alias", "aten::reshape", "aten::transpose", "aten::t",
             "aten::permute", "aten::expand", "aten::unsqueeze", "aten::squeeze", "aten::select", "aten::slice",
             "aten::narrow", "aten::split", "aten::chunk", "aten::unbind", "aten::alias", "aten::_unsafe_view",
             "aten::flatten", "aten::contiguous", "aten::resolve_conj", "aten::resolve_neg", "aten::detach",
             "detach", "aten::lift", "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::to",
             "aten::result_type", "aten::is_nonzero", "aten::set_", "aten::numpy_T"}


@dataclass
class Settings:
    device: torch.device
    tflops: float
    fp32_tflops: float
    launch_us: float
    budget_gib: float
    workers: int  # loader processes of this run (the graded scripts use 4)
    grading_workers: int = 4  # hw3_1.sh / hw3_2.sh defaults: min(4, cpu_count)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


@dataclass
class Work:
    """What a profiled run computed: FLOPs and kernel-launching ops over `units` items in `batches` batches."""
    flops: float
    launches: int
    units: int
    batches: int

    def gpu_seconds(self, units: float, batches: float, tflops: float, launch_us: float) -> float:
        """Projected seconds for `units` items in `batches` batches: FLOPs scale with items, launches with batches."""
        compute = self.flops * units / self.units / (tflops * 1e12)
        return compute + self.launches * batches / self.batches * launch_us / 1e6


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured(settings: Settings, run: Callable[[], object], units: int, batches: int,
             profiled: bool = True) -> Tuple[float, Optional[Work]]:
    """(wall seconds, Work when profiled) of run()."""
    synchronize(settings.device)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) if profiled else nullcontext() as prof:
        run()
        synchronize(settings.device)
    seconds = time.perf_counter() - start
    if not profiled:
        return seconds, None
    events = prof.events()
    launches = sum(1 for e in events if not e.cpu_children and e.name not in NO_KERNEL)
    return seconds, Work(float(sum(e.flops for e in events)), launches, units, batches)


def timed_work(settings: Settings, run: Callable[[int], object], units: int, batch_size: int) -> Tuple[float, Work]:
    """Wall seconds of run(units) and its Work: profiled in the same run on CPU, on one batch apart on CUDA."""
    if not settings.cuda:
        return measured(settings, lambda: run(units), units, math.ceil(units / batch_size))
    small = min(units, batch_size)
    measured(settings, lambda: run(small), small, 1, profiled=False)  # warm-up
    seconds, _ = measured(settings, lambda: run(units), units, math.ceil(units / batch_size), profiled=False)
    return seconds, measured(settings, lambda: run(small), small, 1)[1]


def start_peak(settings: Settings) -> None:
    if settings.cuda:
        torch.cuda.reset_peak_memory_stats(settings.device)


def peak(settings: Settings) -> Optional[Dict[str, float]]:
    """GiB allocated / reserved at most since start_peak (CUDA only)."""
    if not settings.cuda:
        return None
    return dict(allocated_gib=torch.cuda.max_memory_allocated(settings.device) / GIB,
                reserved_gib=torch.cuda.max_memory_reserved(settings.device) / GIB)


def free_memory(settings: Settings) -> None:
    gc.collect()
    if settings.cuda:
        torch.cuda.empty_cache()


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- inputs ---------------------------------------------------------------------------------------------------------

def write_images(folder: Path, count: int, size: Tuple[int, int], suffix: str) -> List[Path]:
    """`count` smooth random RGB images (upsampled noise, photo-like file sizes) of `size` (w, h)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        small = rng.integers(0, 256, (max(2, size[1] // 32), max(2, size[0] // 32), 3), dtype=np.uint8)
        image = Image.fromarray(small).resize(size, Image.Resampling.BILINEAR)
        path = folder / f"{i:05d}{suffix}"
        image.save(path, quality=90) if suffix == ".jpg" else image.save(path)
        paths.append(path)
    return paths


def reading_seconds(paths: List[Path], preprocess) -> float:
    """Seconds per image of hw3.common.images reading + the encoder's preprocessing with one torch thread, as in a
    DataLoader worker (on a busy 2-core machine, 2 threads made ToTensor + Normalize of one image take ~70 ms, 1 thread
    under 1 ms): the fastest of three reads of each image."""
    files = ImageFiles(paths[:8], preprocess)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    files[0]  # warm-up: the first read loads PIL's plugins
    fastest = []
    for i in range(len(files)):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            files[i]
            times.append(time.perf_counter() - start)
        fastest.append(min(times))
    torch.set_num_threads(threads)
    return sum(fastest) / len(fastest)


def as_graded(encoder: ImageEncoder, device: torch.device) -> ImageEncoder:
    """An OpenAI CLIP encoder in fp16 on CUDA, as load_clip gives it (random weights are built in fp32)."""
    if device.type == "cuda" and isinstance(encoder.backbone, VisionTransformer):
        convert_weights(encoder.backbone)
    return encoder


def caption_batch(tokens: torch.Tensor, caption_tokens: int) -> CaptionBatch:
    """A training batch of cached tokens [B, N, D] (fp16) with B captions of `caption_tokens` tokens each."""
    input_ids, targets = make_caption_batch([list(range(100, 100 + caption_tokens))] * tokens.size(0))
    return CaptionBatch(tokens, input_ids, targets, torch.arange(tokens.size(0)))


def cached_tokens(encoder: ImageEncoder, count: int) -> torch.Tensor:
    return torch.randn(count, encoder.n_tokens, encoder.width, generator=torch.Generator().manual_seed(0)).half()


# ---- P1 ------------------------------------------------------------------------------------------------------------

def p1_section(settings: Settings, work_dir: Path, n_images: int, n_classes: int, resolution: int = 224) -> dict:
    """hw3_1.sh's encoding work for one CLIP model: class prompts and images (with mirror images)."""
    progress(f"p1: CLIP ViT-L/14@{resolution}, {n_classes} classes x cifar18 templates, {n_images} {P1_SIZE}px PNGs")
    torch.manual_seed(0)
    model = vit_l14(resolution).eval()
    if settings.cuda:
        convert_weights(model)
    model = model.to(settings.device)
    preprocess = clip_transform(resolution)
    templates = resolve_templates(ClassifierConfig().templates)
    names = class_names([f"object {i}" for i in range(n_classes)])
    paths = write_images(work_dir / "p1", n_images, (P1_SIZE, P1_SIZE), ".png")
    config = ClassifierConfig(device=str(settings.device), num_workers=settings.workers)
    start_peak(settings)
    text_seconds, text_work = timed_work(  # units: classes, TEXT_BATCH // 18 of them per text batch
        settings, lambda n: encode_classes(model, names[:n], templates, config.device), n_classes,
        TEXT_BATCH // len(templates))
    image_seconds, image_work = timed_work(
        settings, lambda n: encode_images(model, preprocess, paths[:n], config, desc="p1 images"), n_images, P1_BATCH)
    memory = peak(settings)
    reading = reading_seconds(paths, preprocess)
    weights = 2 * sum(p.numel() for p in model.parameters())  # fp16, as load_clip gives on CUDA
    prompts = P1_CLASSES * len(templates)
    parts = dict(text=text_work.gpu_seconds(P1_CLASSES, math.ceil(prompts / TEXT_BATCH), settings.tflops,
                                            settings.launch_us),
                 images=image_work.gpu_seconds(P1_IMAGES, math.ceil(P1_IMAGES / P1_BATCH), settings.tflops,
                                               settings.launch_us),
                 reading=reading * P1_IMAGES / settings.grading_workers)
    here = text_seconds * P1_CLASSES / n_classes + image_seconds * P1_IMAGES / n_images
    return dict(resolution=resolution, images=n_images, classes=n_classes, prompts=n_classes * len(templates),
                text_seconds=text_seconds, image_seconds=image_seconds, reading_s_per_image=reading,
                text_work=dataclasses.asdict(text_work), image_work=dataclasses.asdict(image_work),
                here_full_seconds=here, projected_2080ti_parts=parts, projected_2080ti_seconds=sum(parts.values()),
                peak=memory, weights_gib=weights / GIB)


# ---- P2 inference, decoding ----------------------------------------------------------------------------------------

def adapter_config() -> TrainConfig:
    return load_config(CONFIGS[0])


def p2_section(settings: Settings, work_dir: Path, n_images: int) -> dict:
    """hw3_2.sh's work: read, encode and caption JPEGs with the adapter recipe (hw3.p2.inference.caption_files)."""
    progress(f"p2: hw3_2.sh path, adapter recipe, {n_images} 640x480 JPEGs, {DecodeConfig()}")
    model = random_captioner(adapter_config().model, str(settings.device))
    as_graded(model.encoder, settings.device)
    paths = write_images(work_dir / "p2", n_images, (640, 480), ".jpg")
    start_peak(settings)
    seconds, work = timed_work(
        settings, lambda n: caption_files(model, paths[:n], DecodeConfig(), P2_BATCH, settings.workers,
                                          str(settings.device)), n_images, P2_BATCH)
    memory = peak(settings)
    reading = reading_seconds(paths, model.encoder.preprocess)
    weights = parameter_bytes(model)
    projected = (work.gpu_seconds(P2_IMAGES, math.ceil(P2_IMAGES / P2_BATCH), settings.tflops, settings.launch_us)
                 + reading * P2_IMAGES / settings.grading_workers)
    return dict(images=n_images, seconds=seconds, reading_s_per_image=reading, work=dataclasses.asdict(work),
                here_full_seconds=seconds * P2_IMAGES / n_images, projected_2080ti_seconds=projected, peak=memory,
                weights_gib=weights / GIB)


def parameter_bytes(model: CaptionModel) -> int:
    """Bytes of the model's parameters on a 2080 Ti: the encoder as loaded there (see the module docstring), the rest
    in fp32."""
    clip = isinstance(model.encoder.backbone, VisionTransformer)
    encoder = sum(p.numel() for p in model.encoder.parameters()) * (2 if clip else 4)
    return encoder + 4 * sum(p.numel() for name, p in model.named_parameters() if not name.startswith("encoder."))


def decoding_work(settings: Settings, model: CaptionModel, n_images: int, batch_size: int) -> Tuple[float, Work]:
    """Captions (DecodeConfig's defaults) for cached tokens, `batch_size` images per generate call."""
    tokens = cached_tokens(model.encoder, n_images).to(settings.device)

    def run(n: int) -> None:
        for i in range(0, n, batch_size):
            generate(model, tokens[i:min(n, i + batch_size)].float(), DecodeConfig())
    model.eval()
    return timed_work(settings, run, n_images, batch_size)


# ---- training --------------------------------------------------------------------------------------------------

def train_step(model: CaptionModel, batch: CaptionBatch, config: TrainConfig, optimizer, scaler,
               device: torch.device) -> None:
    """Trainer.train_batch + Trainer.optimizer_step for one micro-batch (grad_accum 1)."""
    loss = CrossEntropy(config.label_smoothing, config.amp)(model, batch.to(device))[0]
    scaler.scale(loss).backward()
    if config.grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    loss.item()  # Trainer.train_batch reads the loss every micro-batch: a sync, as there


def saved_bytes(model: CaptionModel, batch: CaptionBatch, config: TrainConfig, device: torch.device) -> int:
    """Bytes the training forward keeps for backward: saved tensors' storages, each once, parameters left out."""
    parameters = {t.storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    storages: Dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = CrossEntropy(config.label_smoothing, config.amp)(model, batch.to(device))[0]
    del loss
    return sum(storages.values())


def projected_memory(model: CaptionModel, config: TrainConfig, settings: Settings) -> dict:
    """The projected 2080 Ti training peak in GiB at config.batch_size and the longest caption (module docstring),
    and the largest batch that would fit."""
    length = config.model.max_caption_length
    counts = [saved_bytes(model, caption_batch(cached_tokens(model.encoder, b), length), config, settings.device)
              for b in (1, 2)]
    per_item, batch = counts[1] - counts[0], config.batch_size
    logits_bytes = 10 * (length + 2) * VOCAB  # transient bytes per item
    trainable = count_trainable(model)
    casts_counted = settings.cuda  # the count ran under autocast (with amp), so the casts are among the saved tensors
    decoder_side = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("encoder."))
    casts = 2 * decoder_side if config.amp and not casts_counted else 0
    parts = dict(weights=parameter_bytes(model), casts=casts, gradients=4 * trainable,
                 adamw=8 * trainable, saved=counts[0] + per_item * (batch - 1), transient=logits_bytes * batch)
    fixed = sum(parts.values()) - (per_item + logits_bytes) * batch  # what does not grow with the batch
    gib = {name: value / GIB for name, value in parts.items()}
    gib.update(total=sum(parts.values()) / GIB, saved_per_item=per_item / GIB)
    gib.update(fits=gib["total"] <= settings.budget_gib,
               largest_fitting_batch=max(0, int((settings.budget_gib * GIB - fixed) // (per_item + logits_bytes))))
    return gib


def training_row(settings: Settings, model: CaptionModel, config: TrainConfig, batch_size: int, steps: int,
                 caption_tokens: int) -> dict:
    """Timed optimizer steps at `batch_size` (typical caption length), the projected memory, and on CUDA the measured
    peak at config.batch_size with the longest caption."""
    model.train()
    optimizer = adamw(model.named_parameters(), config.lr, config.weight_decay)
    scaler = torch.cuda.amp.GradScaler(enabled=config.amp and settings.cuda)
    batch = caption_batch(cached_tokens(model.encoder, batch_size), caption_tokens)
    row = dict(batch_size=batch_size, caption_tokens=caption_tokens, trainable=count_trainable(model),
               checkpoint_tensors=sum(t.numel() for t in trainable_state_dict(model).values()))
    try:
        train_step(model, batch, config, optimizer, scaler, settings.device)  # warm-up: AdamW state, allocator
        if settings.cuda:
            seconds, _ = measured(settings, lambda: [train_step(model, batch, config, optimizer, scaler,
                                                                settings.device) for _ in range(steps)],
                                  steps * batch_size, steps, profiled=False)
            work = measured(settings, lambda: train_step(model, batch, config, optimizer, scaler, settings.device),
                            batch_size, 1)[1]
        else:
            seconds, work = measured(settings, lambda: train_step(model, batch, config, optimizer, scaler,
                                                                  settings.device), batch_size, 1)
            steps = 1
        row.update(s_per_step=seconds / steps, work=dataclasses.asdict(work))
        if settings.cuda:
            longest = caption_batch(cached_tokens(model.encoder, config.batch_size), config.model.max_caption_length)
            start_peak(settings)
            train_step(model, longest, config, optimizer, scaler, settings.device)
            row["peak"] = peak(settings)
    except RuntimeError as error:
        if "out of memory" not in str(error):
            raise
        row["error"] = f"out of memory: {str(error).splitlines()[0]}"
    model.zero_grad(set_to_none=True)
    optimizer.state.clear()  # the AdamW state is not part of the counting forward below
    free_memory(settings)
    row["projected_memory_gib"] = projected_memory(model, config, settings)
    if "work" in row:
        step = Work(**row["work"])
        micro = config.batch_size
        row["here_s_per_step_at_batch"] = row["s_per_step"] * micro / batch_size  # linear in the batch
        row["projected_2080ti_s_per_step"] = step.gpu_seconds(micro, 1, settings.tflops, settings.launch_us)
    return row


def train_section(settings: Settings, configs: List[str], batch_size: Optional[int], steps: int,
                  caption_tokens: int, val_images: int) -> List[dict]:
    rows = []
    for path in configs:
        rows.append(config_row(settings, path, batch_size, steps, caption_tokens, val_images))
        free_memory(settings)
    return rows


def config_row(settings: Settings, path: str, batch_size: Optional[int], steps: int, caption_tokens: int,
               val_images: int, model: Optional[CaptionModel] = None) -> dict:
    """One real config: its training steps, projected memory and validation captions (`model`: the config's
    captioner, when already built)."""
    config = load_config(path)
    progress(f"train: {Path(path).name}, batch {config.batch_size} x accum {config.grad_accum}, PEFT "
             f"{'+'.join(config.model.peft)}")
    if model is None:
        model = random_captioner(config.model, str(settings.device))
    as_graded(model.encoder, settings.device)
    row = dict(config=Path(path).name, config_batch=config.batch_size, grad_accum=config.grad_accum,
               epochs=config.epochs, val_batch_size=config.val_batch_size)
    row.update(training_row(settings, model, config, batch_size or config.batch_size, steps, caption_tokens))
    progress(f"train: {Path(path).name}: validation captions of {val_images} cached images")
    seconds, work = decoding_work(settings, model, val_images, config.val_batch_size)
    row.update(val_seconds=seconds, val_images=val_images, val_work=dataclasses.asdict(work))
    if "work" in row:
        row.update(epoch_projection(settings, row, config, work))
    return row


def epoch_projection(settings: Settings, row: dict, config: TrainConfig, val_work: Work) -> dict:
    """2080 Ti epoch time: every caption once (epoch_items: captions), then the val captions (CLIPScore not counted)."""
    micro_steps = math.ceil(TRAIN_IMAGES * CAPTIONS_PER_IMAGE / config.batch_size)
    val = val_work.gpu_seconds(VAL_IMAGES, math.ceil(VAL_IMAGES / config.val_batch_size), settings.tflops,
                               settings.launch_us)
    epoch = micro_steps * row["projected_2080ti_s_per_step"] + val
    here = micro_steps * row["here_s_per_step_at_batch"] + row["val_seconds"] * VAL_IMAGES / row["val_images"]
    return dict(micro_steps_per_epoch=micro_steps, projected_2080ti_val_seconds=val,
                projected_2080ti_epoch_seconds=epoch, projected_2080ti_training_seconds=epoch * config.epochs,
                here_epoch_seconds=here)


# ---- feature cache, encoders ---------------------------------------------------------------------------------------

def cache_section(settings: Settings, work_dir: Path, n_images: int) -> dict:
    """hw3.p2.data.feature_cache over JPEGs with ViT-L/14 (as load_data calls it: batch 64, no loader processes)."""
    progress(f"cache: feature_cache, ViT-L/14, {n_images} 640x480 JPEGs")
    encoder = as_graded(load_image_encoder("ViT-L/14", settings.device, pretrained=False), settings.device)
    paths = [str(p) for p in write_images(work_dir / "p2", n_images, (640, 480), ".jpg")]
    runs = iter(range(1000))  # a new cache folder per run: a cached result would be returned at once
    seconds, work = timed_work(
        settings, lambda n: feature_cache(encoder, paths[:n], str(work_dir / "cache" / str(next(runs))),
                                          settings.device), n_images, CACHE_BATCH)
    size = max(os.path.getsize(path) for path in (work_dir / "cache").glob("*/features-*.npy"))  # the full run's
    item_bytes = encoder.n_tokens * encoder.width * 2
    reading = reading_seconds([Path(p) for p in paths], encoder.preprocess)
    images = TRAIN_IMAGES + VAL_IMAGES
    projected = (work.gpu_seconds(images, math.ceil(images / CACHE_BATCH), settings.tflops, settings.launch_us)
                 + reading * images)  # feature_cache reads in the main process
    return dict(images=n_images, seconds=seconds, s_per_image=seconds / n_images, file_bytes=size,
                full_bytes=size + (images - n_images) * item_bytes, reading_s_per_image=reading,
                work=dataclasses.asdict(work), here_full_seconds=seconds * images / n_images,
                projected_2080ti_seconds=projected)


def encoder_section(settings: Settings, names: List[str], n_images: int, batch_size: Optional[int], steps: int,
                    caption_tokens: int, adapter_row: Optional[dict], jpeg_reading: float) -> List[dict]:
    """Per encoder: tokens, cache size, encoder time and FLOPs per image, and the adapter recipe built on it.
    `adapter_row`: the train section's adapter.yaml row, reused for its own encoder and, for the hw3_2.sh
    projection, its decoding work; `jpeg_reading`: seconds to read one test image (0 when not measured)."""
    rows = []
    for name in names:
        rows.append(encoder_row_of(settings, name, n_images, batch_size, steps, caption_tokens, adapter_row,
                                   jpeg_reading))
        free_memory(settings)
    return rows


def encoder_measurements(settings: Settings, encoder: ImageEncoder, n_images: int, decode: Optional[Work],
                         jpeg_reading: float) -> dict:
    """An encoder's tokens, feature-cache size, time and FLOPs per image, and the projected 2080 Ti cache build and
    (with `decode`, the decoding work of a captioner on this encoder's tokens) hw3_2.sh times."""
    as_graded(encoder, settings.device)
    clip = isinstance(encoder.backbone, VisionTransformer)
    row = dict(tokens=encoder.n_tokens, width=encoder.width, image_size=encoder.image_size,
               parameters=sum(p.numel() for p in encoder.parameters()),
               cache_gb=(TRAIN_IMAGES + VAL_IMAGES) * encoder.n_tokens * encoder.width * 2 / 1e9)
    images = torch.randn(n_images, 3, encoder.image_size, encoder.image_size, device=settings.device)

    def encode(n: int) -> None:
        with torch.no_grad(), autocast_for(settings.device):  # as hw3.p2.inference.encoded_batches
            for i in range(0, n, P2_BATCH):
                encoder(images[i:min(n, i + P2_BATCH)])
    seconds, work = timed_work(settings, encode, n_images, P2_BATCH)
    train_images = TRAIN_IMAGES + VAL_IMAGES
    cache_tflops = settings.tflops if clip else settings.fp32_tflops  # feature_cache runs timm encoders in fp32
    row.update(s_per_image=seconds / n_images, gflops_per_image=work.flops / work.units / 1e9,
               work=dataclasses.asdict(work),
               projected_2080ti_ms_per_image=1e3 * work.gpu_seconds(P2_BATCH, 1, settings.tflops,
                                                                    settings.launch_us) / P2_BATCH,
               projected_2080ti_cache_seconds=work.gpu_seconds(train_images, math.ceil(train_images / CACHE_BATCH),
                                                               cache_tflops, settings.launch_us)
               + jpeg_reading * train_images)  # feature_cache reads in the main process
    if decode is not None:
        batches = math.ceil(P2_IMAGES / P2_BATCH)
        row["projected_2080ti_hw3_2_seconds"] = (
            work.gpu_seconds(P2_IMAGES, batches, settings.tflops, settings.launch_us)
            + decode.gpu_seconds(P2_IMAGES, batches, settings.tflops, settings.launch_us)
            + jpeg_reading * P2_IMAGES / settings.grading_workers)
    return row


def encoder_row_of(settings: Settings, name: str, n_images: int, batch_size: Optional[int], steps: int,
                   caption_tokens: int, adapter_row: Optional[dict], jpeg_reading: float) -> dict:
    """One encoder's row of encoder_section."""
    config = adapter_config()
    decode = Work(**adapter_row["val_work"]) if adapter_row else None
    progress(f"encoders: {name}")
    row = dict(encoder=name)
    try:
        model = random_captioner(dataclasses.replace(config.model, encoder=name), str(settings.device))
        encoder = model.encoder
    except UserError as error:  # e.g. more trainable parameters than the limit allows
        row["error"] = str(error).splitlines()[0]
        model, encoder = None, load_image_encoder(name, settings.device, pretrained=False)
    row.update(encoder_measurements(settings, encoder, n_images, decode, jpeg_reading))
    clip = isinstance(encoder.backbone, VisionTransformer)
    if clip:  # P1 with this tower (CLIP's text tower is the same for both ViT-L/14): images and mirror images
        work = Work(**row["work"])
        row["projected_2080ti_p1_images_seconds"] = 2 * work.gpu_seconds(
            P1_IMAGES, math.ceil(P1_IMAGES / P1_BATCH), settings.tflops, settings.launch_us)
    if adapter_row and name == config.model.encoder:
        row["adapter_training"] = {key: adapter_row[key] for key in ADAPTER_TRAINING_KEYS if key in adapter_row}
    elif model is not None:
        row["adapter_training"] = training_row(settings, model, config, batch_size or config.batch_size, steps,
                                               caption_tokens)
    return row


def candidate_section(settings: Settings, configs: List[str], n_images: int, batch_size: Optional[int], steps: int,
                      caption_tokens: int, val_images: int, jpeg_reading: float) -> List[dict]:
    """Per candidate-encoder config: config_row (training, projected memory, validation captions) on the config's
    own captioner, and encoder_measurements with that captioner's decoding work (hw3_2.sh on the tower's tokens)."""
    rows = []
    for path in configs:
        config = load_config(path)
        progress(f"candidates: {Path(path).name} ({config.model.encoder})")
        model = random_captioner(config.model, str(settings.device))
        row = dict(encoder=config.model.encoder, peft="+".join(config.model.peft))
        row.update(config_row(settings, path, batch_size, steps, caption_tokens, val_images, model=model))
        decode = Work(**row["val_work"])  # this captioner's decoding: cross-attention over the tower's tokens
        row["encoder_measurements"] = encoder_measurements(settings, model.encoder, n_images, decode, jpeg_reading)
        rows.append(row)
        del model
        free_memory(settings)
    return rows


# ---- report -----------------------------------------------------------------------------------------------------

def duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1e3:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def memory_text(row: dict) -> str:
    memory = row.get("peak")
    if memory:
        return f"{memory['allocated_gib']:.2f} GiB allocated, {memory['reserved_gib']:.2f} reserved (measured)"
    return f"weights {row['weights_gib']:.2f} GiB (activations: measured on CUDA only)"


def verdict(seconds: Optional[float], limit: Optional[float]) -> str:
    if seconds is None or limit is None:
        return "-"
    return "yes" if seconds <= limit else "NO"


def report(result: dict, settings: Settings) -> str:
    where = "CUDA" if settings.cuda else "CPU"
    lines = [f"# Readiness at the real sizes, random weights ({result['device']})", ""]
    lines += [f"Measured on {where}; the \"here, full size\" column extrapolates linearly from the items measured. "
              f"2080 Ti: projected from FLOPs at {settings.tflops:g} TFLOPS fp16 ({settings.fp32_tflops:g} fp32), "
              f"{settings.launch_us:g} us per kernel launch, image reading / {settings.grading_workers} loader "
              f"processes; memory budget {settings.budget_gib:g} GiB.", ""]
    lines += ["| job | full size | measured here | here, full size | 2080 Ti (projected) | limit | fits the limit | "
              "GPU memory |", "|---|---|---|---|---|---|---|---|"]
    p1, p2, cache = result.get("p1"), result.get("p2"), result.get("cache")
    if p1:
        lines.append(f"| hw3_1.sh: P1 zero-shot, ViT-L/14, {P1_CLASSES} classes x 18 templates, mirror images | "
                     f"{P1_IMAGES} {P1_SIZE}px PNGs | {p1['images']} images in {duration(p1['image_seconds'])}, "
                     f"{p1['prompts']} prompts in {duration(p1['text_seconds'])} ({where}) | "
                     f"{duration(p1['here_full_seconds'])} | {duration(p1['projected_2080ti_seconds'])} | 10 min | "
                     f"{verdict(p1['projected_2080ti_seconds'], LIMITS['hw3_1.sh'])} | "
                     f"{memory_text(p1)} |")
    if p2:
        lines.append(f"| hw3_2.sh: P2 captions, adapter recipe, beam 3, 30 tokens | {P2_IMAGES} 640x480 JPEGs | "
                     f"{p2['images']} images in {duration(p2['seconds'])} ({where}) | "
                     f"{duration(p2['here_full_seconds'])} | {duration(p2['projected_2080ti_seconds'])} | 40 min | "
                     f"{verdict(p2['projected_2080ti_seconds'], LIMITS['hw3_2.sh'])} | "
                     f"{memory_text(p2)} |")
    if cache:
        lines.append(f"| feature cache (ViT-L/14 tokens, fp16) | {TRAIN_IMAGES} + {VAL_IMAGES} JPEGs, "
                     f"{cache['full_bytes'] / 1e9:.2f} GB on disk | {cache['images']} images in "
                     f"{duration(cache['seconds'])}, {cache['file_bytes'] / 1e6:.1f} MB ({where}) | "
                     f"{duration(cache['here_full_seconds'])} | {duration(cache['projected_2080ti_seconds'])} | none "
                     f"(training) | - | - |")
    for row in result.get("train", []):
        if "work" not in row:
            continue
        lines.append(f"| training, {row['config']} (batch {row['config_batch']} x accum {row['grad_accum']}, "
                     f"{row['epochs']} epochs + val captions) | {row['micro_steps_per_epoch']} steps per epoch | "
                     f"{row['s_per_step']:.2f} s/step at batch {row['batch_size']} ({where}) | "
                     f"{duration(row['here_epoch_seconds'])} per epoch | "
                     f"{duration(row['projected_2080ti_epoch_seconds'])} per epoch, "
                     f"{duration(row['projected_2080ti_training_seconds'])} in all | none | - | "
                     f"{training_memory_text(row)} |")
    train = result.get("train", [])
    if train:
        lines += ["", f"Training memory at the config's batch size and the longest caption "
                      f"(max_caption_length + 2 tokens), projected for a 2080 Ti, GiB"
                      f"{' (saved tensors counted in fp32 on CPU: an upper bound)' if not settings.cuda else ''}:", "",
                  "| config | batch | trainable (checkpoint) | weights | casts | grads + AdamW | saved | transient | "
                  "total | fits | largest fitting batch | measured peak | steps/s here (batch) | "
                  "2080 Ti s/step (projected) |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in train:
            lines.append(memory_row(row))
    encoders = result.get("encoders", [])
    if encoders:
        lines += ["", "Frozen encoders (random weights; P2's adapter recipe built on each; 2080 Ti columns projected, "
                  "hw3_2.sh and cache build with image reading):",
                  "", "| encoder | tokens x width | parameters | cache, 12393 images fp16 | encoder here, per image | "
                  "GFLOP per image | 2080 Ti ms per image | hw3_2.sh 1404 images | cache build | adapter trainable | "
                  "adapter training peak | fits | 2080 Ti s/step |", "|---" * 13 + "|"]
        for row in encoders:
            lines.append(encoder_row(row, where))
        others = [row for row in encoders
                  if "projected_2080ti_p1_images_seconds" in row and row["encoder"] != "ViT-L/14"]
        if p1 and others:
            parts = p1["projected_2080ti_parts"]
            total, models = p1["projected_2080ti_seconds"], ["ViT-L/14"]
            lines += ["", "P1 ensembles (hw3_1.sh: 2500 images + mirror images, 900 prompts and a pass over the images "
                          "per model), projected 2080 Ti:", "", f"- ViT-L/14 (the p1 row): {duration(total)}"]
            for row in others:
                total += parts["text"] + parts["reading"] + row["projected_2080ti_p1_images_seconds"]
                models.append(row["encoder"])
                lines.append(f"- {' + '.join(models)}: {duration(total)} (limit 10 min: "
                             f"{verdict(total, LIMITS['hw3_1.sh'])})")
    candidates = result.get("candidates", [])
    if candidates:
        lines += ["", f"Candidate-encoder configs, each on its own captioner (random weights). Every 2080 Ti figure is "
                      f"a PROJECTION (FLOPs / assumed throughput; memory {'measured and ' if settings.cuda else ''}"
                      f"projected at the config's batch{', saved tensors in fp32: an upper bound' if not settings.cuda else ''}):",
                  "", "| config | encoder | tokens x width | trainable (checkpoint) | feature cache (fp16) | "
                      "cache build, 2080 Ti (projected) | hw3_2.sh 1404 images, 2080 Ti (projected) | training peak "
                      "at batch (projected) | fits | largest fitting batch | 2080 Ti s/step (projected) | training, "
                      "epochs + val captions (projected) |", "|---" * 12 + "|"]
        for row in candidates:
            lines.append(candidate_row_text(row))
    return "\n".join(lines)


def candidate_row_text(row: dict) -> str:
    encoder = row["encoder_measurements"]
    memory = row["projected_memory_gib"]
    measured_peak = f", {row['peak']['allocated_gib']:.2f} measured" if row.get("peak") else ""
    step = f"{row['projected_2080ti_s_per_step']:.3f}" if "projected_2080ti_s_per_step" in row else row.get("error", "-")
    training = (f"{duration(row['projected_2080ti_training_seconds'])} ({row['epochs']} epochs)"
                if "projected_2080ti_training_seconds" in row else "-")
    return (f"| {row['config']} | {row['encoder']} | {encoder['tokens']} x {encoder['width']} | "
            f"{row['trainable']:,} ({row['checkpoint_tensors']:,}) | {encoder['cache_gb']:.1f} GB | "
            f"{duration(encoder['projected_2080ti_cache_seconds'])} | "
            f"{duration(encoder.get('projected_2080ti_hw3_2_seconds'))} | {memory['total']:.2f} GiB at batch "
            f"{row['config_batch']}{measured_peak} | {'yes' if memory['fits'] else 'NO'} | "
            f"{memory['largest_fitting_batch']} | {step} | {training} |")


def training_memory_text(row: dict) -> str:
    memory = row["projected_memory_gib"]
    text = f"{memory['total']:.2f} GiB projected at batch {row['config_batch']}"
    if row.get("peak"):
        text += f", {row['peak']['allocated_gib']:.2f} GiB measured"
    return text + (" (fits)" if memory["fits"] else " (DOES NOT FIT)")


def memory_row(row: dict) -> str:
    memory = row["projected_memory_gib"]
    measured_peak = f"{row['peak']['allocated_gib']:.2f}" if row.get("peak") else row.get("error", "-")
    speed = f"{1 / row['s_per_step']:.3f} ({row['batch_size']})" if "s_per_step" in row else row.get("error", "-")
    step = f"{row['projected_2080ti_s_per_step']:.3f}" if "projected_2080ti_s_per_step" in row else "-"
    return (f"| {row['config']} | {row['config_batch']} | {row['trainable']:,} ({row['checkpoint_tensors']:,}) | "
            f"{memory['weights']:.2f} | {memory['casts']:.2f} | {memory['gradients'] + memory['adamw']:.2f} | "
            f"{memory['saved']:.2f} | {memory['transient']:.2f} | {memory['total']:.2f} | "
            f"{'yes' if memory['fits'] else 'NO'} | {memory['largest_fitting_batch']} | {measured_peak} | {speed} | "
            f"{step} |")


def encoder_row(row: dict, where: str) -> str:
    training = row.get("adapter_training")
    if training:
        memory = training["projected_memory_gib"]
        trainable = f"{training['trainable']:,}"
        peak_text, fits = f"{memory['total']:.2f} GiB", "yes" if memory["fits"] else "NO"
        step = f"{training['projected_2080ti_s_per_step']:.3f}" if "projected_2080ti_s_per_step" in training else "-"
    else:
        trainable, peak_text, fits, step = row.get("error", "-"), "-", "-", "-"
    return (f"| {row['encoder']} | {row['tokens']} x {row['width']} | {row['parameters'] / 1e6:.0f}M | "
            f"{row['cache_gb']:.1f} GB | {duration(row['s_per_image'])} ({where}) | {row['gflops_per_image']:.0f} | "
            f"{row['projected_2080ti_ms_per_image']:.1f} | {duration(row.get('projected_2080ti_hw3_2_seconds'))} | "
            f"{duration(row['projected_2080ti_cache_seconds'])} | {trainable} | {peak_text} | {fits} | {step} |")


# ---- command line ----------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--sections", nargs="+", default=SECTIONS, choices=SECTIONS,
                        help="what to measure (default: all)")
    parser.add_argument("--p1-images", type=int, default=None, help="P1 images measured (default: 2500 CUDA, 2 CPU)")
    parser.add_argument("--p1-classes", type=int, default=None,
                        help="P1 classes whose prompts are encoded (default: 50 CUDA, 2 CPU)")
    parser.add_argument("--p2-images", type=int, default=None,
                        help="hw3_2.sh images measured (default: 1404 CUDA, 2 CPU)")
    parser.add_argument("--cache-images", type=int, default=None,
                        help="feature-cache images measured (default: 512 CUDA, 2 CPU)")
    parser.add_argument("--val-images", type=int, default=None,
                        help="cached images captioned per config for the validation estimate (default: 256 CUDA, "
                             "1 CPU)")
    parser.add_argument("--encoder-images", type=int, default=None,
                        help="images per encoder in the encoder comparison (default: 64 CUDA, 1 CPU)")
    parser.add_argument("--train-batch", type=int, default=None,
                        help="batch of the timed training steps (default: the config's on CUDA, 2 on CPU; the "
                             "projections always use the config's)")
    parser.add_argument("--train-steps", type=int, default=5, help="timed training steps on CUDA (CPU: 1)")
    parser.add_argument("--caption-tokens", type=int, default=22,
                        help="caption length of the timed training steps (default: %(default)s, a long COCO caption; "
                             "memory is taken at max_caption_length)")
    parser.add_argument("--configs", nargs="+", default=CONFIGS, help="training configs (default: the three real ones)")
    parser.add_argument("--candidates", nargs="+", default=CANDIDATES,
                        help="candidate-encoder configs (default: configs/siglip_adapter.yaml, dfn5b_adapter.yaml)")
    parser.add_argument("--encoders", nargs="+", default=ENCODERS,
                        help="encoders to compare, names as hw3/p2/encoder.py takes them (default: %(default)s)")
    parser.add_argument("--tflops", type=float, default=12.0,
                        help="assumed effective fp16 TFLOPS of a 2080 Ti (peak 53.8 with fp32 accumulation; "
                             "default: %(default)s)")
    parser.add_argument("--fp32-tflops", type=float, default=7.0,
                        help="assumed effective fp32 TFLOPS of a 2080 Ti (peak 13.4; default: %(default)s)")
    parser.add_argument("--launch-us", type=float, default=10.0,
                        help="assumed microseconds per kernel launch (default: %(default)s)")
    parser.add_argument("--budget-gib", type=float, default=10.3,
                        help="GPU memory PyTorch may use on a 2080 Ti; the CUDA allocation cap and the bar of every "
                             "'fits' (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=None,
                        help="image-loading processes here (default: 4 CUDA, 0 CPU; projections assume 4)")
    parser.add_argument("--work-dir", default=None, help="where the test images and caches go (default: a "
                                                         "temporary folder, removed afterwards)")
    parser.add_argument("--json-out", default=None, help="write every number as JSON here")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but no GPU is available")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    settings = Settings(device, args.tflops, args.fp32_tflops, args.launch_us, args.budget_gib,
                        args.workers if args.workers is not None else (4 if cuda else 0))
    if cuda:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.budget_gib * GIB / total), device)
        name = f"{torch.cuda.get_device_name(device)}, capped at {args.budget_gib:g} GiB"
    else:
        name = (f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads, load "
                f"average {os.getloadavg()[0]:.1f} at the start")

    def default(value, on_cuda, on_cpu):
        return value if value is not None else (on_cuda if cuda else on_cpu)

    started = time.time()
    result = dict(device=name, torch=torch.__version__, settings=dict(vars(args), workers=settings.workers))
    with tempfile.TemporaryDirectory() as temporary:
        work_dir = Path(args.work_dir or temporary)
        if "p1" in args.sections:
            result["p1"] = p1_section(settings, work_dir, default(args.p1_images, P1_IMAGES, 2),
                                      default(args.p1_classes, P1_CLASSES, 2))
        if "p2" in args.sections:
            result["p2"] = p2_section(settings, work_dir, default(args.p2_images, P2_IMAGES, 2))
        if "train" in args.sections:
            result["train"] = train_section(settings, args.configs, default(args.train_batch, None, 2),
                                            args.train_steps, args.caption_tokens, default(args.val_images, 256, 1))
        if "cache" in args.sections:
            result["cache"] = cache_section(settings, work_dir, default(args.cache_images, 512, 2))
        if "encoders" in args.sections:
            adapter_row = next((row for row in result.get("train", []) if row["config"] == "adapter.yaml"), None)
            jpeg_reading = (result.get("p2") or result.get("cache") or {}).get("reading_s_per_image", 0.0)
            result["encoders"] = encoder_section(settings, args.encoders, default(args.encoder_images, 64, 1),
                                                 default(args.train_batch, None, 2), args.train_steps,
                                                 args.caption_tokens, adapter_row, jpeg_reading)
        if "candidates" in args.sections:
            jpeg_reading = (result.get("p2") or result.get("cache") or {}).get("reading_s_per_image", 0.0)
            result["candidates"] = candidate_section(settings, args.candidates, default(args.encoder_images, 64, 1),
                                                     default(args.train_batch, None, 2), args.train_steps,
                                                     args.caption_tokens, default(args.val_images, 256, 1),
                                                     jpeg_reading)
    result["wall_seconds"] = time.time() - started
    if not cuda:
        result["device"] += f", load average {os.getloadavg()[0]:.1f} at the end"
    print(report(result, settings))
    print(f"\nwall time of this benchmark: {duration(result['wall_seconds'])}")
    if args.json_out:
        write_json_atomically(args.json_out, result, indent=1)
        print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
