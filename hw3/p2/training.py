"""The training loop behind p2_train.py (config: hw3.p2.config.TrainConfig).

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
- `stage: scst` replaces the cross-entropy by the self-critical loss (hw3/p2/scst.py) on a model loaded from `init`
  (a trained checkpoint); everything else (validation, checkpoints, resume, AMP, DDP) is the same loop.

The phases, in order: `Trainer(...)` sets up (processes, model, data, optimizer, resume state); `run()` trains epoch
by epoch (`train_epoch` -> `train_batch` -> `optimizer_step`), validating and saving (`validate_and_save`,
`save_last`); `finish()` writes the summary. The run folder's files are written by run_files.py.
"""
import dataclasses
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from statistics import mean
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from hw3.common.errors import UserError
from hw3.common.files import check_writable
from hw3.common.images import ImageFiles
from hw3.p2.checkpoint import load_trainable, read_checkpoint
from hw3.p2.config import DataPaths, TrainConfig
from hw3.p2.data import (CaptionBatch, CaptionDataset, CaptionSplit, caption_vocabulary, collate_captions,
                         feature_cache, image_batches, image_transform, read_split, tokenize_captions)
from hw3.p2.encoder import ImageEncoder, load_image_encoder
from hw3.p2.generation import autocast_for, caption_images
from hw3.p2.metrics import ClipScorer, score_captions
from hw3.p2.model import CaptionModel, load_decoder, parameter_table
from hw3.p2.optim import VocabularySubset, adamw, warmup_cosine_scheduler
from hw3.p2.run_files import RunFiles, finished_run
from hw3.p2.scst import ClipReward, SCSTStats, SelfCritical
from tokenizer import EOT_ID, IGNORE_INDEX, BPETokenizer


# ---- setup ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Processes:
    """This process's place among the training processes (one without torchrun)."""
    rank: int
    world_size: int
    device: torch.device

    @property
    def main(self) -> bool:  # rank 0 validates, saves and logs
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def setup_processes(device: Optional[str]) -> Processes:
    """Under torchrun (WORLD_SIZE > 1) joins the process group: NCCL on GPUs, else gloo. A cuda device without an
    index takes LOCAL_RANK's GPU."""
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
    return Processes(rank, world_size, device)


def build_model(config: TrainConfig, paths: DataPaths, device: torch.device) -> Tuple[CaptionModel, TrainConfig]:
    """GPT-2 from the course file, the frozen encoder, the new modules. Returns the model and the config it was
    built with: `config` with model.decoder set to the file's sizes and model.encoder to the encoder used (`config`
    itself is left as it was)."""
    decoder = load_decoder(paths.decoder, dropout=config.model.decoder.dropout,
                           layer_norm_eps=config.model.decoder.layer_norm_eps)
    if config.decode.max_length + 1 > decoder.config.block_size:  # found now, not at the first validation
        raise UserError(f"decode.max_length {config.decode.max_length} + the start token exceeds the decoder's "
                        f"block_size {decoder.config.block_size}")
    model_config = dataclasses.replace(config.model, decoder=decoder.config, encoder=paths.encoder)
    encoder = load_image_encoder(paths.encoder, device, layer=model_config.encoder_layer)
    return CaptionModel(model_config, encoder, decoder).to(device), dataclasses.replace(config, model=model_config)


# ---- the loss ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LossSettings:
    encode: bool  # batch.images are images for the encoder (False: cached encoder tokens)
    amp: bool = False  # fp16 autocast (CUDA only)
    label_smoothing: float = 0.0
    vocabulary: Optional[VocabularySubset] = None  # train_vocab: captions


def caption_loss(captioner: CaptionModel, batch: CaptionBatch, settings: LossSettings, device: torch.device,
                 forward: Optional[nn.Module] = None) -> torch.Tensor:
    """Mean token cross-entropy of a CaptionBatch. `forward`: what runs the decoder (the captioner's DDP wrapper
    under torchrun; default the captioner itself)."""
    images = batch.images.to(device, non_blocking=True)
    with torch.no_grad():
        tokens = captioner.encode_images(images) if settings.encode else images.float()
    input_ids, targets = batch.input_ids.to(device), batch.targets.to(device)
    amp = autocast_for(device) if settings.amp else nullcontext()  # fp16 on CUDA only
    vocabulary = settings.vocabulary
    with amp, (vocabulary.head(captioner.decoder) if vocabulary else nullcontext()):
        logits = (forward or captioner)(input_ids, tokens)
    if vocabulary:
        targets = vocabulary.targets(targets)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                           label_smoothing=settings.label_smoothing)


# ---- data -------------------------------------------------------------------------------------------------------

class TrainingData(NamedTuple):
    train: CaptionDataset  # items: (image or cached tokens, caption tokens, image index)
    train_split: CaptionSplit  # the training images' files and reference captions
    val_loader: DataLoader  # val images (or cached tokens) in val_keys order
    val_keys: List[str]
    encode: bool  # items are images for the encoder, not cached tokens
    workers: int  # DataLoader processes for the training items
    vocabulary: Optional[VocabularySubset]  # train_vocab: captions


def load_data(config: TrainConfig, paths: DataPaths, encoder: ImageEncoder, tokenizer: BPETokenizer,
              processes: Processes) -> TrainingData:
    """Annotations, tokenised captions, and images or (cache_features; rank 0 computes, the others wait) their
    cached encoder tokens."""
    train_split = read_split(paths.train_json, paths.train_images)
    val_split = read_split(paths.val_json, paths.val_images)
    captions = tokenize_captions(train_split, tokenizer, config.model.max_caption_length)
    if config.cache_features:
        started, cache_dir = time.time(), os.path.expanduser(config.cache_dir)
        for turn in (0, 1) if processes.world_size > 1 else (0,):
            if processes.main == (turn == 0):
                train_images = feature_cache(encoder, train_split.paths, cache_dir, processes.device)
                val_images = feature_cache(encoder, val_split.paths, cache_dir, processes.device)
            processes.barrier()
        if processes.main:
            print(f"encoder tokens cached in {cache_dir} ({time.time() - started:.1f} s)", flush=True)
    else:
        train_images = ImageFiles(train_split.paths, image_transform(encoder, config.augment))
        val_images = ImageFiles(val_split.paths, encoder.preprocess)
    workers = 0 if config.cache_features else config.num_workers  # a memmap read is cheaper than a process
    val_loader = image_batches(val_images, config.val_batch_size, workers, config.val_images or None)
    vocabulary = None
    if config.train_vocab == "captions":
        token_ids = caption_vocabulary(captions, extra=[EOT_ID])
        vocabulary = VocabularySubset(token_ids, config.model.decoder.vocab_size, processes.device)
        if processes.main:
            print(f"training softmax over the {len(token_ids)} tokens of the training captions", flush=True)
    train = CaptionDataset(train_images, captions, per_image=config.epoch_items == "images", seed=config.seed)
    return TrainingData(train, train_split, val_loader, val_split.keys[:len(val_loader.dataset)],
                        not config.cache_features, workers, vocabulary)


# ---- the loop -----------------------------------------------------------------------------------------------------

@dataclass
class Progress:
    """Where training stands; saved in resume.pt (as a dict) and restored by --resume."""
    epoch: int = 0  # epochs completed
    batches_done: int = 0  # batches of the current epoch already trained (resume mid-epoch)
    step: int = 0  # optimizer steps taken
    best: Optional[Dict[str, float]] = None  # the scores of the best validation so far (by CIDEr)
    best_epoch: Optional[int] = None
    history: List[dict] = field(default_factory=list)  # one record per validation


class Trainer:
    """One training run (see the module docstring for its phases)."""

    def __init__(self, config: TrainConfig, config_file: Optional[str] = None, resume: bool = False,
                 device: Optional[str] = None):
        self.processes = setup_processes(device)
        self.device = self.processes.device
        if self.device.type == "cpu" and config.cpu_threads:
            torch.set_num_threads(config.cpu_threads)
        torch.manual_seed(config.seed)
        self.paths = config.data_paths()
        self.model, self.config = build_model(config, self.paths, self.device)
        self.config_file = config_file
        self.files = RunFiles(self.config.out, active=self.processes.main)
        state = self.files.load_resume() if resume else None
        start_from = str(self.files.last) if state is not None else self.config.init
        if start_from:  # before the optimizer is built: loading may collapse the prefix MLP
            load_trainable(self.model, read_checkpoint(start_from)[1], source=start_from)
        if self.processes.main:
            print(parameter_table(self.model), flush=True)

        self.tokenizer = BPETokenizer()
        self.data = load_data(self.config, self.paths, self.model.encoder, self.tokenizer, self.processes)
        self.loss_settings = LossSettings(self.data.encode, self.config.amp, self.config.label_smoothing,
                                          self.data.vocabulary)
        self.sampler = DistributedSampler(self.data.train, num_replicas=self.processes.world_size,
                                          rank=self.processes.rank, shuffle=True, seed=self.config.seed)
        self.scorer = ClipScorer.load(self.paths.clip_model, self.device) if self.processes.main else None
        self.self_critical = self.build_self_critical() if self.config.stage == "scst" else None
        self.scst_stats: List[SCSTStats] = []  # of the batches since the last validation

        self.batches_per_epoch = math.ceil(len(self.sampler) / self.config.batch_size)
        total_steps = self.config.epochs * math.ceil(self.batches_per_epoch / self.config.grad_accum)
        if self.config.max_steps:
            total_steps = min(total_steps, self.config.max_steps)
        self.optimizer = adamw(self.model.named_parameters(), self.config.lr, self.config.weight_decay)
        self.scheduler = warmup_cosine_scheduler(self.optimizer, max(1, round(self.config.warmup_ratio * total_steps)),
                                                 total_steps)
        self.scaler = torch.cuda.amp.GradScaler(enabled=self.config.amp and self.device.type == "cuda")
        self.forward = DistributedDataParallel(
            self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None) \
            if self.processes.world_size > 1 else self.model
        self.progress = Progress()
        if state is not None:
            self.restore(state)
        self.files.start(self.config, config_file, self.paths)

    def build_self_critical(self) -> SelfCritical:
        """The SCST objective: rewards against the training references (and the CLIPScore model's embeddings of the
        training images when scst.clip_weight > 0)."""
        scst, split = self.config.scst, self.data.train_split
        clip_reward = None
        if scst.clip_weight > 0:
            scorer = self.scorer or ClipScorer.load(self.paths.clip_model, self.device)
            clip_reward = ClipReward(scorer, split.paths)
        return SelfCritical(scst, self.config.decode, split.captions, self.tokenizer, clip_reward,
                            self.data.vocabulary, seed=self.config.seed + self.processes.rank, device=self.device)

    def restore(self, state: dict) -> None:
        """Optimizer, schedule, GradScaler and progress from a resume.pt state."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.progress = Progress(**state["progress"])
        self.files.restore_log(self.progress.step)

    @property
    def finished(self) -> bool:
        config, progress = self.config, self.progress
        return progress.epoch >= config.epochs or bool(config.max_steps and progress.step >= config.max_steps)

    def run(self) -> Optional[dict]:
        """Trains until the epochs (or max_steps) are done; returns the summary (rank 0) or None (other ranks).
        Ctrl-C saves the state for --resume and exits with status 130."""
        try:
            while not self.finished:
                self.train_epoch()
        except KeyboardInterrupt:
            if self.processes.main:
                self.save_last()
                print(f"\ninterrupted: saved {self.files.last} and {self.files.resume} (continue with --resume "
                      f"--out {self.config.out})")
            raise SystemExit(130)
        return self.finish()

    def train_epoch(self) -> None:
        """The rest of the current epoch (all of it, unless resumed mid-epoch), then validation."""
        config, progress = self.config, self.progress
        epoch = progress.epoch
        self.sampler.set_epoch(epoch)
        self.data.train.set_epoch(epoch)
        order = list(self.sampler)[progress.batches_done * config.batch_size:]  # resume mid-epoch
        loader = DataLoader(self.data.train, config.batch_size, sampler=order, collate_fn=collate_captions,
                            num_workers=self.data.workers, pin_memory=self.device.type == "cuda")
        batch_index, losses, started = progress.batches_done, [], time.time()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not self.processes.main,
                   initial=batch_index, total=self.batches_per_epoch)
        for batch in bar:
            batch_index += 1
            sync = batch_index % config.grad_accum == 0 or batch_index == self.batches_per_epoch
            losses.append(self.train_batch(batch, sync))
            if not sync:
                continue
            self.optimizer_step()
            progress.batches_done = batch_index
            bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
            self.log_loss(epoch, losses)
            if config.val_every and progress.step % config.val_every == 0:
                self.validate_and_save(epoch + 1, losses, time.time() - started)
                losses, started = [], time.time()
            if config.max_steps and progress.step >= config.max_steps:
                break
        if batch_index >= self.batches_per_epoch:
            progress.epoch, progress.batches_done = epoch + 1, 0
        if losses and (not config.val_every or self.finished):
            self.validate_and_save(epoch + 1, losses, time.time() - started)
        elif self.processes.main:
            self.save_last()

    def train_batch(self, batch: CaptionBatch, sync: bool) -> float:
        """Forward and backward of one micro-batch (gradients are synchronised across processes only when `sync`);
        returns its loss."""
        no_sync = self.processes.world_size > 1 and not sync
        with self.forward.no_sync() if no_sync else nullcontext():
            if self.self_critical is not None:
                loss, stats = self.self_critical.loss(self.model, batch, self.data.encode, self.config.amp,
                                                      self.device, self.forward)
                self.scst_stats.append(stats)
            else:
                loss = caption_loss(self.model, batch, self.loss_settings, self.device, self.forward)
            self.scaler.scale(loss / self.config.grad_accum).backward()
        return loss.item()

    def optimizer_step(self) -> None:
        if self.config.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.progress.step += 1

    def log_loss(self, epoch: int, losses: List[float]) -> None:
        """Every log_every optimizer steps: the mean loss of the last log_every micro-batches."""
        step, every = self.progress.step, self.config.log_every
        if step % every == 0:
            recent = losses[-every:]
            scst = {"reward": mean([s.reward for s in self.scst_stats[-every:]])} if self.scst_stats else {}
            self.files.log(type="train", epoch=epoch + 1, step=step, loss=sum(recent) / len(recent),
                           lr=self.scheduler.get_last_lr()[0], **scst)

    @torch.no_grad()
    def validate(self) -> Tuple[Dict[str, float], Dict[str, str]]:
        """Captions for the val images (in val_keys order) and their CIDEr / CLIPScore."""
        self.model.eval()
        captions: List[str] = []
        for images in tqdm(self.data.val_loader, desc="val captions", leave=False):
            images = images.to(self.device)
            tokens = self.model.encode_images(images) if self.data.encode else images.float()
            captions += caption_images(self.model, tokens, self.config.decode, self.tokenizer)
        self.model.train()
        predictions = dict(zip(self.data.val_keys, captions))
        result = score_captions(predictions, self.paths.val_json, self.paths.val_images, clip_model=self.scorer,
                                device=self.device, tokenizer=self.config.cider_tokenizer,
                                allow_subset=bool(self.config.val_images), progress=False)
        return {"CIDEr": result["CIDEr"], "CLIPScore": result["CLIPScore"]}, predictions

    def validate_and_save(self, epoch: int, losses: List[float], seconds: float) -> None:
        """Validation, the best checkpoint, last.safetensors + resume.pt, logs and summary (rank 0); the other ranks
        wait."""
        progress = self.progress
        if self.processes.main:
            started = time.time()
            scores, predictions = self.validate()
            record = dict(epoch=epoch, step=progress.step,
                          train_loss=sum(losses) / max(1, len(losses)), CIDEr=scores["CIDEr"],
                          CLIPScore=scores["CLIPScore"], seconds=round(seconds, 2),
                          val_seconds=round(time.time() - started, 2))
            if self.scst_stats:  # the training candidates since the last validation
                stats = self.scst_stats
                record.update(reward=mean([s.reward for s in stats]), sample_cider=mean([s.cider for s in stats]),
                              sample_ended=mean([s.ended for s in stats]))
            progress.history.append(record)
            if progress.best is None or scores["CIDEr"] > progress.best["CIDEr"]:
                progress.best, progress.best_epoch = scores, record["epoch"]
                self.files.save_best(self.model, predictions)
            self.files.log(type="val", **record)
            reward = f", mean candidate reward {record['reward']:.4f}" if "reward" in record else ""
            tqdm.write(f"epoch {record['epoch']} step {progress.step}: train loss {record['train_loss']:.4f}{reward}, "
                       f"val CIDEr {scores['CIDEr']:.4f}, CLIPScore {scores['CLIPScore']:.4f} "
                       f"({record['val_seconds']} s)")
            self.save_last()
            self.files.write_summary(self.config, self.config_file, self.paths, self.model, progress)
        self.scst_stats = []  # on every rank (only rank 0 reports them)
        self.processes.barrier()

    def save_last(self) -> None:
        self.files.save_last(self.model, dict(
            optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(), progress=dataclasses.asdict(self.progress), config=self.config.to_dict()))

    def finish(self) -> Optional[dict]:
        main, progress = self.processes.main, self.progress
        summary = self.files.write_summary(self.config, self.config_file, self.paths, self.model, progress,
                                           finished=True) if main else None
        if main and progress.best:
            print(f"best val CIDEr {progress.best['CIDEr']:.4f} (epoch {progress.best_epoch}); "
                  f"wrote {self.files.out}/(best.safetensors, last.safetensors, resume.pt, log.jsonl, curves.png, "
                  "val_predictions.json, summary.json)")
        if self.processes.world_size > 1:
            self.processes.barrier()
            dist.destroy_process_group()
        return summary


def train(config: TrainConfig, config_file: Optional[str] = None, resume: bool = False,
          device: Optional[str] = None, overwrite: bool = False) -> Optional[dict]:
    """Trains as `config` says; returns the summary (rank 0) or None (other ranks). A new run never replaces
    another one in config.out unless `overwrite` (hw3.p2.run_files.finished_run); a finished run of the same config
    is not trained again."""
    check_writable(config.out, "folder")
    if not resume and not overwrite:
        done = finished_run(config.out, config.to_dict())
        if done is not None:
            best = f"best val CIDEr {done['best']['CIDEr']:.4f}, epoch {done['best_epoch']}" if done["best"] else \
                "never validated"
            print(f"{config.out} already holds this run, finished at {done['finished_at']} ({best}): nothing to "
                  "do (--overwrite trains it again)")
            return done
    return Trainer(config, config_file, resume, device).run()
