"""The training loop behind p2_train.py (config: p2_train.TrainConfig).

- AdamW on the trainable parameters only (weight decay on matrices), linear warmup then cosine to zero, gradient
  clipping, label smoothing, gradient accumulation; fp16 autocast + GradScaler on CUDA, fp32 on CPU.
- Several processes through torchrun: DistributedDataParallel with a DistributedSampler; only rank 0 validates,
  saves and logs, the other ranks wait at a barrier meanwhile.
- Validation: captions for the val images (generation.caption_images), CIDEr + CLIPScore (metrics.score_captions);
  the best checkpoint by CIDEr is kept.
- `train_vocab: captions` computes the training softmax over the tokens that occur in the training captions (and
  the end token) instead of all 50257: exact when the LM gives every other token no probability, as the toy
  world's tiny GPT-2 does, an approximation otherwise. Generation always uses the full vocabulary.
- Ctrl-C saves last.safetensors + resume.pt before leaving; `--resume` continues at the last optimizer step.

Run folder (shared_contract.md): best.safetensors, last.safetensors, resume.pt, log.jsonl, curves.png,
val_predictions.json, summary.json (the files are written by run_files.py).
"""
import math
import os
import time
from contextlib import contextmanager, nullcontext
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from caption_data import (CaptionDataset, ImageFiles, caption_vocabulary, collate_captions, feature_cache,
                          image_batches, image_transform, read_split, tokenize_captions)
from captioner import CaptionModel, load_trainable, parameter_table, read_checkpoint
from decoder import Decoder
from generation import caption_images
from image_encoder import load_image_encoder
from metrics import ClipScorer, score_captions
from p2_train import TrainConfig
from run_files import RunFiles
from tokenizer import EOT_ID, IGNORE_INDEX, BPETokenizer


# ---- setup ------------------------------------------------------------------------------------------------------

def setup_distributed(device: Optional[str]) -> Tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1) joins the process group: NCCL on GPUs, else gloo."""
    world_size, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


def build_model(config: TrainConfig, paths: dict, device: torch.device) -> CaptionModel:
    """GPT-2 from the course file (its shapes set config.model.decoder), the frozen encoder, the new modules."""
    decoder = Decoder.from_course_file(paths["decoder"], dropout=config.model.decoder.dropout,
                                       layer_norm_eps=config.model.decoder.layer_norm_eps)
    config.model.decoder = decoder.config
    config.model.encoder = paths["encoder"]
    encoder = load_image_encoder(paths["encoder"], device, layer=config.model.encoder_layer)
    return CaptionModel(config.model, encoder, decoder).to(device)


def warmup_cosine(warmup_steps: int, total_steps: int):
    """Learning-rate factor per optimizer step: linear warmup to 1, then cosine to 0 at total_steps."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; biases and LayerNorm weights (1-d) get no weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.999))


# ---- the loss ---------------------------------------------------------------------------------------------------

class VocabularyHead(nn.Module):
    """The frozen, tied output layer restricted to `token_ids`: logits [..., len(token_ids)]."""

    def __init__(self, weight: nn.Parameter, token_ids: torch.Tensor):
        super().__init__()
        self.weight = weight
        self.register_buffer("token_ids", token_ids)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight[self.token_ids])


class VocabularySubset:
    """Training over a subset of the vocabulary: `head(decoder)` swaps the output layer for the subset's while a
    forward pass runs, `targets(t)` maps token ids to their rows in it."""

    def __init__(self, token_ids: torch.Tensor, vocab_size: int, device: torch.device):
        self.token_ids = token_ids.to(device)
        self.rows = torch.full((vocab_size,), -1, dtype=torch.long, device=device)
        self.rows[self.token_ids] = torch.arange(len(token_ids), device=device)

    @contextmanager
    def head(self, decoder: Decoder):
        full = decoder.lm_head
        decoder.lm_head = VocabularyHead(full.weight, self.token_ids)
        try:
            yield
        finally:
            decoder.lm_head = full

    def targets(self, targets: torch.Tensor) -> torch.Tensor:
        rows = self.rows[targets.clamp(min=0)]
        if bool((rows[targets != IGNORE_INDEX] < 0).any()):
            raise ValueError("a target token is outside the training vocabulary")
        return torch.where(targets == IGNORE_INDEX, targets, rows)


def caption_loss(model: nn.Module, captioner: CaptionModel, batch, encode: bool, device: torch.device,
                 config: TrainConfig, vocabulary: Optional[VocabularySubset]) -> torch.Tensor:
    """Mean token cross-entropy of a CaptionBatch (model: the captioner itself or its DDP wrapper)."""
    images = batch.images.to(device, non_blocking=True)
    with torch.no_grad():
        tokens = captioner.encode_images(images) if encode else images.float()
    input_ids, targets = batch.input_ids.to(device), batch.targets.to(device)
    amp = torch.cuda.amp.autocast() if config.amp and device.type == "cuda" else nullcontext()
    with amp, \
            (vocabulary.head(captioner.decoder) if vocabulary else nullcontext()):
        logits = model(input_ids, tokens)
    if vocabulary:
        targets = vocabulary.targets(targets)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                           label_smoothing=config.label_smoothing)


# ---- validation ---------------------------------------------------------------------------------------------------

@torch.no_grad()
def validate(captioner: CaptionModel, loader: DataLoader, keys: List[str], encode: bool, config: TrainConfig,
             paths: dict, scorer: ClipScorer, tokenizer: BPETokenizer, device: torch.device
             ) -> Tuple[Dict[str, float], Dict[str, str]]:
    """Captions for the val images (in `keys` order) and their CIDEr / CLIPScore."""
    captioner.eval()
    captions: List[str] = []
    for images in tqdm(loader, desc="val captions", leave=False):
        images = images.to(device)
        tokens = captioner.encode_images(images) if encode else images.float()
        captions += caption_images(captioner, tokens, config.decode, tokenizer)
    captioner.train()
    predictions = dict(zip(keys, captions))
    result = score_captions(predictions, paths["val_json"], paths["val_images"], clip_model=scorer, device=device,
                            tokenizer=config.cider_tokenizer, allow_subset=bool(config.val_images), progress=False)
    return {"CIDEr": result["CIDEr"], "CLIPScore": result["CLIPScore"]}, predictions


class TrainingData(NamedTuple):
    train: CaptionDataset  # items: (image or cached tokens, caption tokens, image index)
    val_loader: DataLoader  # val images (or cached tokens) in val_keys order
    val_keys: List[str]
    encode: bool  # items are images for the encoder, not cached tokens
    workers: int  # DataLoader processes for the training items
    vocabulary: Optional[VocabularySubset]  # train_vocab: captions


def load_data(config: TrainConfig, paths: dict, model: CaptionModel, tokenizer: BPETokenizer, rank: int,
              world_size: int, device: torch.device) -> TrainingData:
    """Annotations, tokenised captions, and images or (cache_features; rank 0 computes, the others wait) their
    cached encoder tokens."""
    train_split = read_split(paths["train_json"], paths["train_images"])
    val_split = read_split(paths["val_json"], paths["val_images"])
    captions = tokenize_captions(train_split, tokenizer, config.model.max_caption_length)
    encoder = model.encoder
    if config.cache_features:
        started, cache_dir = time.time(), os.path.expanduser(config.cache_dir)
        for turn in (0, 1) if world_size > 1 else (0,):
            if (rank == 0) == (turn == 0):
                train_images = feature_cache(encoder, train_split.paths, cache_dir, device)
                val_images = feature_cache(encoder, val_split.paths, cache_dir, device)
            if world_size > 1:
                dist.barrier()
        if rank == 0:
            print(f"encoder tokens cached in {cache_dir} ({time.time() - started:.1f} s)", flush=True)
    else:
        train_images = ImageFiles(train_split.paths, image_transform(encoder, config.augment))
        val_images = ImageFiles(val_split.paths, encoder.preprocess)
    workers = 0 if config.cache_features else config.num_workers  # a memmap read is cheaper than a process
    val_loader = image_batches(val_images, config.val_batch_size, workers, config.val_images or None)
    vocabulary = None
    if config.train_vocab == "captions":
        token_ids = caption_vocabulary(captions, extra=[EOT_ID])
        vocabulary = VocabularySubset(token_ids, model.decoder.config.vocab_size, device)
        if rank == 0:
            print(f"training softmax over the {len(token_ids)} tokens of the training captions", flush=True)
    train = CaptionDataset(train_images, captions, per_image=config.epoch_items == "images", seed=config.seed)
    return TrainingData(train, val_loader, val_split.keys[:len(val_loader.dataset)], not config.cache_features,
                        workers, vocabulary)


# ---- the loop -----------------------------------------------------------------------------------------------------

def train(config: TrainConfig, config_file: Optional[str] = None, resume: bool = False,
          device: Optional[str] = None) -> Optional[dict]:
    """Trains as `config` says; returns the summary (rank 0) or None (other ranks)."""
    rank, world_size, device = setup_distributed(device)
    main = rank == 0
    if device.type == "cpu" and config.cpu_threads:
        torch.set_num_threads(config.cpu_threads)
    torch.manual_seed(config.seed)
    paths = config.data_paths()
    model = build_model(config, paths, device)
    files = RunFiles(config.out, active=main)
    state = files.load_resume() if resume else None
    if state is not None:
        load_trainable(model, read_checkpoint(files.last)[1], source=files.last)
    if main:
        print(parameter_table(model), flush=True)

    tokenizer = BPETokenizer()
    data = load_data(config, paths, model, tokenizer, rank, world_size, device)
    dataset, val_loader, encode = data.train, data.val_loader, data.encode
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=config.seed)
    scorer = ClipScorer.load(paths["clip_model"], device) if main else None

    # optimisation
    batches_per_epoch = math.ceil(len(sampler) / config.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accum)
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    optimizer = make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(max(1, round(config.warmup_ratio * total_steps)), total_steps))
    scaler = torch.cuda.amp.GradScaler(enabled=config.amp and device.type == "cuda")
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world_size > 1 else model
    progress = dict(epoch=0, batches_done=0, step=0, best=None, best_epoch=None, history=[])
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        progress.update(state["progress"])
        files.restore_log(progress["step"])
    files.start(config, config_file, paths)

    def evaluate(epoch: int, losses: List[float], seconds: float) -> None:
        """Validation, checkpoints and logs (rank 0); the other ranks wait."""
        if main:
            started = time.time()
            scores, predictions = validate(model, val_loader, data.val_keys, encode, config, paths, scorer,
                                           tokenizer, device)
            record = dict(epoch=epoch + 1, step=progress["step"], train_loss=sum(losses) / max(1, len(losses)),
                          CIDEr=scores["CIDEr"], CLIPScore=scores["CLIPScore"], seconds=round(seconds, 2),
                          val_seconds=round(time.time() - started, 2))
            progress["history"].append(record)
            if progress["best"] is None or scores["CIDEr"] > progress["best"]["CIDEr"]:
                progress["best"], progress["best_epoch"] = scores, epoch + 1
                files.save_best(model, predictions)
            files.log(type="val", **record)
            tqdm.write(f"epoch {epoch + 1} step {progress['step']}: train loss {record['train_loss']:.4f}, val CIDEr "
                       f"{scores['CIDEr']:.4f}, CLIPScore {scores['CLIPScore']:.4f} ({record['val_seconds']} s)")
            save_last()
            files.write_summary(config, config_file, paths, model, progress)
        if world_size > 1:
            dist.barrier()

    def save_last() -> None:
        files.save_last(model, dict(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                                    scaler=scaler.state_dict(), progress=progress, config=config.to_dict()))

    try:
        while progress["epoch"] < config.epochs and not (config.max_steps and progress["step"] >= config.max_steps):
            epoch = progress["epoch"]
            sampler.set_epoch(epoch)
            dataset.set_epoch(epoch)
            order = list(sampler)[progress["batches_done"] * config.batch_size:]  # resume mid-epoch
            loader = DataLoader(dataset, config.batch_size, sampler=order, collate_fn=collate_captions,
                                num_workers=data.workers, pin_memory=device.type == "cuda")
            batch_index, losses, started = progress["batches_done"], [], time.time()
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not main,
                       initial=batch_index, total=batches_per_epoch)
            for batch in bar:
                batch_index += 1
                sync = batch_index % config.grad_accum == 0 or batch_index == batches_per_epoch
                with ddp.no_sync() if world_size > 1 and not sync else nullcontext():
                    loss = caption_loss(ddp, model, batch, encode, device, config, data.vocabulary)
                    scaler.scale(loss / config.grad_accum).backward()
                losses.append(loss.item())
                if not sync:
                    continue
                if config.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                progress["step"] += 1
                progress["batches_done"] = batch_index
                step = progress["step"]
                bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                if step % config.log_every == 0:
                    files.log(type="train", epoch=epoch + 1, step=step, loss=sum(losses[-config.log_every:]) /
                              len(losses[-config.log_every:]), lr=scheduler.get_last_lr()[0])
                if config.val_every and step % config.val_every == 0:
                    evaluate(epoch, losses, time.time() - started)
                    losses, started = [], time.time()
                if config.max_steps and step >= config.max_steps:
                    break
            if batch_index >= batches_per_epoch:
                progress["epoch"], progress["batches_done"] = epoch + 1, 0
            finished = progress["epoch"] >= config.epochs or (config.max_steps and progress["step"] >= config.max_steps)
            if losses and (not config.val_every or finished):
                evaluate(epoch, losses, time.time() - started)
            elif main:
                save_last()
    except KeyboardInterrupt:
        if main:
            save_last()
            print(f"\ninterrupted: saved {files.last} and {files.resume} (continue with --resume --out {config.out})")
        raise SystemExit(130)
    summary = files.write_summary(config, config_file, paths, model, progress, finished=True) if main else None
    if main and progress["best"]:
        print(f"best val CIDEr {progress['best']['CIDEr']:.4f} (epoch {progress['best_epoch']}); "
              f"wrote {files.out}/(best.safetensors, last.safetensors, resume.pt, log.jsonl, curves.png, "
              "val_predictions.json, summary.json)")
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary
