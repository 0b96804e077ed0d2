"""The training loop behind p2_train.py (config: hw3.p2.config.TrainConfig).

- AdamW on the trainable parameters only (weight decay on matrices), linear warmup then cosine to zero, gradient
  clipping, gradient accumulation; fp16 autocast + GradScaler on CUDA, fp32 on CPU.
- The objective is an object with one call, `loss, stats = objective(model, batch)`: CrossEntropy (stage xe) or
  scst.SelfCritical (stage scst, on a model loaded from `init`). The loop does not know which one it runs.
- Several processes through torchrun: DistributedDataParallel with a DistributedSampler; only rank 0 validates,
  saves and logs, the other ranks wait at a barrier meanwhile.
- Validation: captions for the val images (generation.caption_images), CIDEr + CLIPScore (metrics.score_captions);
  the best checkpoint by CIDEr is kept.
- `train_vocab: captions` gives the run's model an output vocabulary of the training captions' tokens and the end
  token (CaptionModel.restrict_output): training, SCST candidates and validation compute those logits only.
  hw3_2.sh, P3 and the report load the checkpoint into a full-vocabulary model.
- Exact resume: every micro-batch seeds torch's generator from (seed, rank, epoch, batch), and resume.pt holds the
  trainable tensors with the optimizer, schedule and progress, so a run stopped anywhere (Ctrl-C, a kill) and
  resumed with --resume computes the same tensors as the run that never stopped. Ctrl-C or SIGTERM stops at the next
  optimizer step and saves (TrainingStopped); a second one stops at once, and --resume goes back to the last save.
  A resumed run takes the config's lr and schedule from the restored step on, and refuses other encoder weights.
- Finite or stop: a non-finite loss or (fp32) gradient norm stops the run before the step is applied, and a save
  checks every trained tensor first (TrainingDiverged), so best, last and resume.pt never hold inf or nan.
- One run per folder: train() claims config.out (hw3.p2.run_lock) for the run's lifetime.

The model: `run_model_config` completes the config's model for this run (the decoder's sizes from its file) and
model.build_caption_model, the one builder that load_captioner uses too, builds it.

The step, as plain functions a benchmark or a test calls as the Trainer does:

    backward_batch(model: nn.Module, batch: CaptionBatch, objective: Objective, scaler: GradScaler,
                   grad_accum: int = 1, sync: bool = True) -> Tuple[float, Dict[str, float]]   # loss, stats
    optimizer_step(model: nn.Module, optimizer: Optimizer, scheduler, scaler: GradScaler, grad_clip: float,
                   losses: Sequence[float] = ()) -> None

    optimizer, scheduler, scaler = build_optimizer(model, config, batches_per_epoch, device)
    objective = CrossEntropy(config.label_smoothing, config.amp)     # or build_objective(...)
    losses = [backward_batch(model, batch.to(device), objective, scaler, config.grad_accum)[0]
              for batch in micro_batches]                            # grad_accum of them
    optimizer_step(model, optimizer, scheduler, scaler, config.grad_clip, losses)

`model` is the captioner or its DistributedDataParallel wrapper (then sync=False for all but a step's last
micro-batch). optimizer_step raises NonFiniteStep before it applies anything when one of `losses` or the fp32
gradient norm is not finite; the Trainer turns that into TrainingDiverged.

The phases of a run, in order: `Trainer(...)` sets up (processes and seed, model, resume state, data, objective,
optimizer); `run()` trains epoch by epoch (`train_epoch`: per micro-batch a seed and backward_batch, per step
`step` -> optimizer_step), validating and saving (`validate_and_save`, `save_last`); `finish()` writes the summary.
The run folder's files are written by run_files.py.
"""
import dataclasses
import hashlib
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from statistics import mean
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.cuda.amp import GradScaler
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from hw3.common.encoder_names import parse_encoder_name
from hw3.common.errors import UserError
from hw3.common.files import check_writable, sha256_file
from hw3.common.images import ImageFiles
from hw3.p2.checkpoint import load_trainable, read_tensors
from hw3.p2.config import DataPaths, TrainConfig
from hw3.p2.data import (CaptionBatch, CaptionDataset, CaptionSplit, caption_vocabulary, collate_captions,
                         feature_cache, image_batches, read_split, tokenize_captions)
from hw3.p2.encoder import ImageEncoder
from hw3.p2.generation import autocast_for, caption_images
from hw3.p2.metrics import ClipScorer, score_captions
from hw3.p2.model import (CaptionModel, build_caption_model, decoder_settings, parameter_table,
                          read_decoder_config, trainable_state_dict)
from hw3.p2.optim import adamw, warmup_cosine_scheduler
from hw3.p2.run_files import RunFiles, finished_run
from hw3.p2.run_lock import RunFolderLock
from hw3.p2.scst import ClipReward, SelfCritical
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


def run_model_config(config: TrainConfig, paths: DataPaths) -> TrainConfig:
    """`config` with its model made whole for this run: the decoder's sizes read from decoder_model.bin (n_head =
    n_embd // 64, as GPT-2's; a config file's sizes are not used), its other settings (dropout, layer_norm_eps) the
    config's, and the encoder the run uses. Raises UserError when decode.max_length does not fit the decoder."""
    settings = {name: value for name, value in decoder_settings(config.model.decoder).items() if name != "n_head"}
    decoder = read_decoder_config(paths.decoder, **settings)
    if config.decode.max_length + 1 > decoder.block_size:  # found now, not at the first validation
        raise UserError(f"decode.max_length {config.decode.max_length} + the start token exceeds the decoder's "
                        f"block_size {decoder.block_size}")
    return dataclasses.replace(config, model=dataclasses.replace(config.model, decoder=decoder, encoder=paths.encoder))


def build_run_model(config: TrainConfig, paths: DataPaths, device: torch.device) -> Tuple[CaptionModel, TrainConfig]:
    """The run's captioner, built by THE builder (model.build_caption_model) from run_model_config's model config,
    and that config, the one the run saves beside its checkpoints (load_captioner rebuilds the same model from it).
    `config` itself is left as it was."""
    config = run_model_config(config, paths)
    return build_caption_model(config.model, paths.decoder, device), config


def encoder_fingerprint(name: str) -> dict:
    """What identifies the encoder's weights: its name, and the sha256 of its file when the name is a local file (a
    CLIP state_dict path, or timm:NAME@FILE). A named encoder's weights are fixed by its name."""
    file = parse_encoder_name(name).file
    return {"name": name, "sha256": sha256_file(file) if file and os.path.isfile(file) else None}


def check_same_encoder(saved: Optional[dict], current: dict, out: str) -> None:
    """Raises UserError when a run is resumed with other encoder weights than it was trained with (`saved`, from
    resume.pt; None in a resume.pt written before fingerprints: not checked)."""
    if saved is None or saved == current:
        return

    def shown(fingerprint: dict) -> str:
        sha256 = fingerprint.get("sha256")
        return f"{fingerprint.get('name')} (sha256 {sha256[:12]}...)" if sha256 else f"{fingerprint.get('name')}"
    raise UserError(f"--resume: {out} was trained with the encoder {shown(saved)}, not {shown(current)}: resume "
                    "with the weights it was trained with, or train a new run in another --out")


# ---- the objectives ------------------------------------------------------------------------------------------------

Objective = Callable[[nn.Module, CaptionBatch], Tuple[torch.Tensor, Dict[str, float]]]  # loss, stats = objective(...)


class CrossEntropy:
    """Mean token cross-entropy of a CaptionBatch (stage xe): `loss, stats = objective(model, batch)`, where `model` is
    the captioner or its DistributedDataParallel wrapper. stats is empty."""

    def __init__(self, label_smoothing: float = 0.0, amp: bool = False):
        self.label_smoothing, self.amp = label_smoothing, amp

    def __call__(self, model: nn.Module, batch: CaptionBatch) -> Tuple[torch.Tensor, Dict[str, float]]:
        captioner: CaptionModel = getattr(model, "module", model)
        tokens = captioner.image_tokens(batch.images)
        with autocast_for(tokens.device) if self.amp else nullcontext():
            logits = model(batch.input_ids, tokens)
        targets = captioner.output_targets(batch.targets)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                               label_smoothing=self.label_smoothing)
        return loss, {}


def build_objective(config: TrainConfig, paths: DataPaths, split: CaptionSplit, tokenizer: BPETokenizer,
                    scorer: Optional[ClipScorer], device: torch.device):
    """The config's objective: CrossEntropy, or (stage scst) SelfCritical with rewards against the training
    references and, when scst.clip_weight > 0, the CLIPScore model's embeddings of the training images."""
    if config.stage == "xe":
        return CrossEntropy(config.label_smoothing, config.amp)
    clip_reward = None
    if config.scst.clip_weight > 0:
        clip_reward = ClipReward(scorer or ClipScorer.load(paths.clip_model, device), split.paths)
    return SelfCritical(config.scst, config.decode, split.captions, tokenizer, clip_reward, config.amp)


def step_seed(seed: int, rank: int, epoch: int, batch: int) -> int:
    """The seed of one micro-batch's randomness (dropout): a function of where the batch stands, so a resumed run
    draws what the uninterrupted one drew."""
    return int(hashlib.sha256(f"{seed}/{rank}/{epoch}/{batch}".encode()).hexdigest()[:15], 16)


STOP_SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}  # SIGTERM: what Slurm, Kubernetes, `timeout` send


class StopRequest:
    """While active, the first SIGINT (Ctrl-C) or SIGTERM asks the run to stop at the next optimizer step, where the
    saved state is whole; a second one stops it at once (KeyboardInterrupt). `signum` is the first one's number."""

    def __init__(self):
        self.signum: Optional[int] = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> "StopRequest":
        self.pid = os.getpid()
        self.previous = {signum: signal.signal(signum, self.handle) for signum in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def handle(self, signum, frame) -> None:
        if os.getpid() != self.pid:  # a forked DataLoader worker inherits the handler: its parent decides
            return
        if self.requested:
            raise KeyboardInterrupt
        self.signum = signum
        name = STOP_SIGNALS[signum]
        print(f"\n{name}: stopping after this optimizer step, then saving ({name} again: stop now, without saving)",
              file=sys.stderr, flush=True)


class StopTraining(Exception):
    pass


class TrainingStopped(Exception):
    """The run ended on a stop request (StopRequest): `saved` tells whether it saved its state for --resume first.
    A command line exits with `exit_status`, the shell's 128 + the signal's number (130 Ctrl-C, 143 SIGTERM)."""

    def __init__(self, signum: int, saved: bool, message: str):
        super().__init__(message)
        self.signum, self.saved = signum, saved

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class TrainingDiverged(UserError):
    """A non-finite loss, gradient norm or trained tensor: the run stops before it applies or saves one."""


# ---- the step: plain functions, for the Trainer and for benchmarks ------------------------------------------------

class NonFiniteStep(Exception):
    """A step whose loss or gradient norm is not finite, found before anything was applied; str(): what is not."""


def backward_batch(model: nn.Module, batch: CaptionBatch, objective: Objective, scaler: GradScaler,
                   grad_accum: int = 1, sync: bool = True) -> Tuple[float, Dict[str, float]]:
    """Forward and backward of one micro-batch (on the model's device): `loss, stats = objective(model, batch)`,
    then the GradScaler-scaled loss / grad_accum backpropagated into the parameters' gradients. `model` is the
    captioner or its DistributedDataParallel wrapper, whose gradients are synchronised across processes only when
    `sync` (the last micro-batch of a step). Returns the loss's value (maybe not finite: optimizer_step checks it)
    and the objective's stats."""
    no_sync = isinstance(model, DistributedDataParallel) and not sync
    with model.no_sync() if no_sync else nullcontext():
        loss, stats = objective(model, batch)
        scaler.scale(loss / grad_accum).backward()
    return loss.item(), stats


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, scaler: GradScaler,
                   grad_clip: float, losses: Sequence[float] = ()) -> None:
    """Applies the accumulated gradients of `model` (or its DistributedDataParallel wrapper): unscaled and clipped
    to norm grad_clip (0: not clipped), GradScaler's step and update, gradients set to None, one scheduler step.
    Raises NonFiniteStep before applying anything when one of `losses` (the step's micro-batches') or, in fp32, the
    gradient norm is not finite; under torchrun every process raises it when one finds it. With amp on CUDA the norm
    is not checked: GradScaler skips a step whose fp16 gradients overflowed and lowers its scale, fp16's normal
    course."""
    fp32 = not scaler.is_enabled()
    grad_norm = None
    if grad_clip > 0 or fp32:  # in fp32 the norm also tells whether the gradients are finite
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or math.inf)
    check_step(losses, grad_norm if fp32 else None, next(model.parameters()).device)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()


def check_step(losses: Sequence[float], grad_norm: Optional[torch.Tensor], device: torch.device) -> None:
    """Raises NonFiniteStep naming the first non-finite loss of `losses`, else a non-finite `grad_norm`; every
    process agrees (any_process)."""
    bad_loss = next((loss for loss in losses if not math.isfinite(loss)), None)
    detail = None
    if bad_loss is not None:
        detail = f"the loss is {bad_loss}"
    elif grad_norm is not None and not torch.isfinite(grad_norm):
        detail = f"the gradient norm is {grad_norm.item()}"
    if any_process(detail is not None, device):
        raise NonFiniteStep(detail or "another process's loss or gradient norm is not finite")


def any_process(flag: bool, device: torch.device) -> bool:
    """Whether `flag` holds in any training process (all of them get the same answer; one process: `flag`)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    total = torch.tensor([float(flag)], device=device)
    dist.all_reduce(total)
    return bool(total.item())


# ---- data -------------------------------------------------------------------------------------------------------

class TrainingData(NamedTuple):
    train: CaptionDataset  # items: (image or cached tokens, caption tokens, image index)
    train_split: CaptionSplit  # the training images' files and reference captions
    val_loader: DataLoader  # val images (or cached tokens) in val_keys order
    val_keys: List[str]
    workers: int  # DataLoader processes for the training items


def encoder_inputs(config: TrainConfig, encoder: ImageEncoder, splits: List[CaptionSplit], processes: Processes):
    """Per split, its images for the encoder, or (cache_features; rank 0 computes, the others wait) their cached
    encoder tokens."""
    if not config.cache_features:
        return [ImageFiles(split.paths, encoder.preprocess) for split in splits]
    started, cache_dir = time.time(), os.path.expanduser(config.cache_dir)
    for turn in (0, 1) if processes.world_size > 1 else (0,):
        if processes.main == (turn == 0):
            inputs = [feature_cache(encoder, split.paths, cache_dir, processes.device) for split in splits]
        processes.barrier()
    if processes.main:
        print(f"encoder tokens cached in {cache_dir} ({time.time() - started:.1f} s)", flush=True)
    return inputs


def load_data(config: TrainConfig, paths: DataPaths, encoder: ImageEncoder, tokenizer: BPETokenizer,
              processes: Processes) -> TrainingData:
    """Annotations, tokenised captions, and images or their cached encoder tokens."""
    train_split = read_split(paths.train_json, paths.train_images)
    val_split = read_split(paths.val_json, paths.val_images)
    captions = tokenize_captions(train_split, tokenizer, config.model.max_caption_length)
    train_images, val_images = encoder_inputs(config, encoder, [train_split, val_split], processes)
    workers = 0 if config.cache_features else config.num_workers  # a memmap read is cheaper than a process
    val_loader = image_batches(val_images, config.val_batch_size, workers, config.val_images or None)
    train = CaptionDataset(train_images, captions, per_image=config.epoch_items == "images", seed=config.seed)
    return TrainingData(train, train_split, val_loader, val_split.keys[:len(val_loader.dataset)], workers)


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


def build_optimizer(model: CaptionModel, config: TrainConfig, batches_per_epoch: int, device: torch.device):
    """AdamW over the trainable parameters, its warmup + cosine schedule over the run's optimizer steps, and the
    GradScaler (a no-op unless amp on CUDA)."""
    total_steps = config.epochs * math.ceil(batches_per_epoch / config.grad_accum)
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    optimizer = adamw(model.named_parameters(), config.lr, config.weight_decay)
    scheduler = warmup_cosine_scheduler(optimizer, max(1, round(config.warmup_ratio * total_steps)), total_steps)
    return optimizer, scheduler, torch.cuda.amp.GradScaler(enabled=config.amp and device.type == "cuda")


def seed_process(config: TrainConfig, device: torch.device) -> None:
    """This process's torch-wide settings: its CPU threads (cpu_threads) and the seed of the new modules' initial
    weights."""
    if device.type == "cpu" and config.cpu_threads:
        torch.set_num_threads(config.cpu_threads)
    torch.manual_seed(config.seed)


def distributed(model: CaptionModel, processes: Processes) -> nn.Module:
    """`model` in a DistributedDataParallel wrapper under torchrun; itself in a single process."""
    if processes.world_size == 1:
        return model
    device = processes.device
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


@torch.no_grad()
def validate(model: CaptionModel, data: TrainingData, config: TrainConfig, paths: DataPaths,
             tokenizer: BPETokenizer, scorer: ClipScorer) -> Tuple[Dict[str, float], Dict[str, str]]:
    """Captions for the val images (in val_keys order) and their CIDEr / CLIPScore."""
    model.eval()
    device = model.image_proj.weight.device
    captions: List[str] = []
    for images in tqdm(data.val_loader, desc="val captions", leave=False):
        captions += caption_images(model, model.image_tokens(images.to(device)), config.decode, tokenizer)
    model.train()
    predictions = dict(zip(data.val_keys, captions))
    result = score_captions(predictions, paths.val_json, paths.val_images, clip_model=scorer, device=device,
                            tokenizer=config.cider_tokenizer, allow_subset=bool(config.val_images), progress=False)
    return {"CIDEr": result["CIDEr"], "CLIPScore": result["CLIPScore"]}, predictions


class Trainer:
    """One training run (see the module docstring for its phases)."""

    def __init__(self, config: TrainConfig, config_file: Optional[str] = None, resume: bool = False,
                 device: Optional[str] = None):
        # The order matters: the seed before the model (its new modules draw their initial weights from it), the
        # trained tensors before the optimizer (loading may collapse the prefix MLP).
        self.processes = setup_processes(device)
        self.device = self.processes.device
        self.stop = StopRequest()  # run() listens for Ctrl-C and SIGTERM; the loop asks it after each step
        seed_process(config, self.device)
        self.paths = config.data_paths()
        self.model, self.config = build_run_model(config, self.paths, self.device)
        self.config_file = config_file
        self.files = RunFiles(self.config.out, active=self.processes.main)
        state = self.load_start(resume)
        self.tokenizer = BPETokenizer()
        self.data = self.prepare_data()
        self.scorer = ClipScorer.load(self.paths.clip_model, self.device) if self.processes.main else None
        self.objective = build_objective(self.config, self.paths, self.data.train_split, self.tokenizer,
                                         self.scorer, self.device)
        self.stats: List[Dict[str, float]] = []  # the objective's stats of the batches since the last validation
        self.saved_step: Optional[int] = None  # the step of the state resume.pt holds
        self.sampler = DistributedSampler(self.data.train, num_replicas=self.processes.world_size,
                                          rank=self.processes.rank, shuffle=True, seed=self.config.seed)
        self.batches_per_epoch = math.ceil(len(self.sampler) / self.config.batch_size)
        self.optimizer, self.scheduler, self.scaler = build_optimizer(self.model, self.config, self.batches_per_epoch,
                                                                      self.device)
        self.forward = distributed(self.model, self.processes)  # what the objective calls
        self.progress = Progress()
        if state is not None:
            self.restore(state)
        self.files.start(self.config, config_file, self.paths)

    def load_start(self, resume: bool) -> Optional[dict]:
        """Loads the trained tensors to start from: with `resume`, resume.pt's (refused when the encoder's weights
        are not the ones it was trained with), else `init`'s checkpoint, if any. Returns resume.pt's state, or
        None."""
        state = self.files.load_resume() if resume else None
        self.encoder_id = encoder_fingerprint(self.paths.encoder)  # saved in resume.pt
        if state is not None:
            check_same_encoder(state.get("encoder"), self.encoder_id, self.config.out)
            load_trainable(self.model, state["model"], source=str(self.files.resume))
        elif self.config.init:
            load_trainable(self.model, read_tensors(self.config.init), source=self.config.init)
        if self.processes.main:
            print(parameter_table(self.model), flush=True)
        return state

    def prepare_data(self) -> TrainingData:
        """load_data's data; with train_vocab 'captions', the model's output layer restricted to the training
        captions' tokens and the end token."""
        data = load_data(self.config, self.paths, self.model.encoder, self.tokenizer, self.processes)
        if self.config.train_vocab == "captions":
            token_ids = caption_vocabulary(data.train.captions, extra=[EOT_ID])
            self.model.restrict_output(token_ids)
            if self.processes.main:
                print(f"output layer over the {len(token_ids)} tokens of the training captions", flush=True)
        return data

    def restore(self, state: dict) -> None:
        """Optimizer moments, schedule position, GradScaler and progress from a resume.pt state. The optimizer's
        settings and the schedule's shape stay the config's: a resumed run's lr, weight_decay, warmup_ratio, epochs
        and max_steps take effect from the restored step on (the same state when none changed)."""
        settings = [{key: value for key, value in group.items() if key != "params"}
                    for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])  # its position; the lr factor stays this config's
        for group, fresh in zip(self.optimizer.param_groups, settings):
            group.update(fresh)
        scheduler = self.scheduler
        scheduler.base_lrs = [group["initial_lr"] for group in self.optimizer.param_groups]
        for group, base_lr, factor in zip(self.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base_lr * factor(scheduler.last_epoch)  # as LambdaLR.step computes it
        scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]  # what get_last_lr() reports
        self.scaler.load_state_dict(state["scaler"])
        self.progress = Progress(**state["progress"])
        self.saved_step = self.progress.step
        self.files.restore_log(self.progress.step)

    @property
    def finished(self) -> bool:
        config, progress = self.config, self.progress
        return progress.epoch >= config.epochs or bool(config.max_steps and progress.step >= config.max_steps)

    def run(self) -> Optional[dict]:
        """Trains until the epochs (or max_steps) are done; returns the summary (rank 0) or None (other ranks).
        Ctrl-C or SIGTERM stops at the next optimizer step, saves the state for --resume and raises TrainingStopped;
        a second one raises it at once, without saving."""
        with self.stop:  # still ours while a stop saves
            try:
                while not self.finished:
                    if self.stop_requested():
                        raise StopTraining
                    self.train_epoch()
            except StopTraining:
                raise self.stopped(saved=True) from None
            except KeyboardInterrupt:
                if not self.stop.requested:
                    raise
                raise self.stopped(saved=False) from None
        return self.finish()

    def stopped(self, saved: bool) -> TrainingStopped:
        """The end of a requested stop: with `saved`, the state saved for --resume first (rank 0)."""
        if saved:
            try:
                self.check_finite()
                if self.processes.main:
                    self.save_last()
            except KeyboardInterrupt:  # a second signal during the save: the previous save stays, whole
                saved = False
        signum = self.stop.signum or signal.SIGINT  # None: another process was asked
        out, name = self.config.out, STOP_SIGNALS[signum]
        if not self.processes.main:
            message = ""
        elif saved:
            message = f"stopped by {name} at step {self.progress.step}: saved {self.files.resume} (continue with " \
                      f"--resume --out {out})"
        elif self.saved_step is None:
            message = f"stopped at once by a second {name}, before any save: nothing to resume in {out}"
        else:
            message = f"stopped at once by a second {name}, without saving: `--resume --out {out}` goes back to " \
                      f"the last save (step {self.saved_step})"
        return TrainingStopped(signum, saved, message)

    def stop_requested(self) -> bool:
        """Whether any process was asked to stop (all agree, so they stop at the same step)."""
        return any_process(self.stop.requested, self.device)

    def train_epoch(self) -> None:
        """The rest of the current epoch (all of it, unless resumed mid-epoch), then validation."""
        config, progress = self.config, self.progress
        epoch = progress.epoch
        batch_index, losses, step_losses, started = progress.batches_done, [], [], time.time()
        bar = tqdm(self.epoch_batches(epoch), desc=f"epoch {epoch + 1}/{config.epochs}",
                   disable=not self.processes.main, initial=batch_index, total=self.batches_per_epoch)
        for batch in bar:
            torch.manual_seed(step_seed(config.seed, self.processes.rank, epoch, batch_index))
            batch_index += 1
            sync = batch_index % config.grad_accum == 0 or batch_index == self.batches_per_epoch
            loss, stats = backward_batch(self.forward, batch.to(self.device), self.objective, self.scaler,
                                         config.grad_accum, sync)
            losses.append(loss)
            step_losses.append(loss)
            if stats:
                self.stats.append(stats)
            if not sync:
                continue
            self.step(step_losses)
            step_losses = []
            progress.batches_done = batch_index
            bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
            self.log_loss(epoch, losses)
            if config.val_every and progress.step % config.val_every == 0:
                self.validate_and_save(epoch + 1, losses, time.time() - started)
                losses, started = [], time.time()
            if batch_index < self.batches_per_epoch and self.stop_requested():  # the epoch's end validates first
                raise StopTraining
            if config.max_steps and progress.step >= config.max_steps:
                break
        self.end_epoch(epoch, batch_index, losses, started)

    def epoch_batches(self, epoch: int) -> DataLoader:
        """The batches of `epoch` not trained yet (all of them, unless resumed mid-epoch), in the sampler's order."""
        self.sampler.set_epoch(epoch)
        self.data.train.set_epoch(epoch)
        order = list(self.sampler)[self.progress.batches_done * self.config.batch_size:]  # resume mid-epoch
        return DataLoader(self.data.train, self.config.batch_size, sampler=order, collate_fn=collate_captions,
                          num_workers=self.data.workers, pin_memory=self.device.type == "cuda")

    def end_epoch(self, epoch: int, batch_index: int, losses: List[float], started: float) -> None:
        """After an epoch's loop (its batches done, or max_steps reached): the progress, then validation and a save,
        or (val_every and not finished) a save only."""
        if batch_index >= self.batches_per_epoch:
            self.progress.epoch, self.progress.batches_done = epoch + 1, 0
        if losses and (not self.config.val_every or self.finished):
            self.validate_and_save(epoch + 1, losses, time.time() - started)
        elif self.processes.main:
            self.save_last()

    def step(self, losses: List[float]) -> None:
        """One optimizer step (optimizer_step) over the micro-batches whose losses are `losses`; a non-finite loss or
        gradient norm stops the run before it is applied (TrainingDiverged)."""
        try:
            optimizer_step(self.model, self.optimizer, self.scheduler, self.scaler, self.config.grad_clip, losses)
        except NonFiniteStep as problem:
            raise TrainingDiverged(self.divergence(self.progress.step + 1, str(problem))) from None
        self.progress.step += 1

    def check_finite(self) -> None:
        """Raises TrainingDiverged when a trained tensor holds inf or nan: nothing non-finite is ever saved."""
        for name, tensor in trainable_state_dict(self.model, False).items():
            if not bool(torch.isfinite(tensor).all()):
                raise TrainingDiverged(self.divergence(self.progress.step, f"the trained tensor {name} is not finite"))

    def divergence(self, step: int, detail: str) -> str:
        """The one line a diverged run ends with: where, what, the likely cause and what to change, what is kept."""
        config = self.config
        if self.scaler.is_enabled():
            cause = "fp16 overflow, or a learning rate too high for this config: train in fp32 (--set amp=false) " \
                    f"or with a lower lr (now {config.lr:g})"
        else:
            cause = f"a learning rate too high for this config: lower it (now {config.lr:g}; e.g. --set " \
                    f"lr={config.lr / 10:g})" + ("" if config.grad_clip > 0 else " or clip gradients (grad_clip=1)")
        kept = "nothing was saved" if self.saved_step is None else \
            f"the last save (step {self.saved_step}) is kept: `--resume --out {config.out} --set lr=...` goes on " \
            "from it"
        return f"training diverged at step {step}: {detail}; likely cause: {cause}; {kept}"

    def mean_stats(self, last: Optional[int] = None) -> Dict[str, float]:
        """The mean of each objective statistic over the `last` batches (None: since the last validation)."""
        recent = self.stats[-last:] if last else self.stats
        return {key: mean(stats[key] for stats in recent) for key in recent[0]} if recent else {}

    def log_loss(self, epoch: int, losses: List[float]) -> None:
        """Every log_every optimizer steps: the mean loss (and objective statistics) of the last log_every
        micro-batches."""
        step, every = self.progress.step, self.config.log_every
        if step % every == 0:
            recent = losses[-every:]
            self.files.log(type="train", epoch=epoch + 1, step=step, loss=sum(recent) / len(recent),
                           lr=self.scheduler.get_last_lr()[0], **self.mean_stats(every))

    def validate_and_save(self, epoch: int, losses: List[float], seconds: float) -> None:
        """Validation, then one save of last.pt + resume.pt, the best checkpoint when it is one, and the summary
        (rank 0); the other ranks wait."""
        self.check_finite()  # on every rank (they hold the same tensors), before validating a broken model
        if self.processes.main:
            self.save_last(best_predictions=self.record_validation(epoch, losses, seconds), with_summary=True)
        self.stats = []  # on every rank (only rank 0 reports them)
        self.processes.barrier()

    def record_validation(self, epoch: int, losses: List[float], seconds: float) -> Optional[dict]:
        """Validates and logs; returns the captions when they are the best so far (to be saved), else None."""
        progress, started, best_predictions = self.progress, time.time(), None
        scores, predictions = validate(self.model, self.data, self.config, self.paths, self.tokenizer, self.scorer)
        record = dict(epoch=epoch, step=progress.step, train_loss=sum(losses) / max(1, len(losses)),
                      CIDEr=scores["CIDEr"], CLIPScore=scores["CLIPScore"], seconds=round(seconds, 2),
                      val_seconds=round(time.time() - started, 2), **self.mean_stats())
        progress.history.append(record)
        if progress.best is None or scores["CIDEr"] > progress.best["CIDEr"]:
            progress.best, progress.best_epoch = scores, record["epoch"]
            best_predictions = predictions
        self.files.log(type="val", **record)
        reward = f", mean candidate reward {record['reward']:.4f}" if "reward" in record else ""
        tqdm.write(f"epoch {record['epoch']} step {progress.step}: train loss {record['train_loss']:.4f}{reward}, "
                   f"val CIDEr {scores['CIDEr']:.4f}, CLIPScore {scores['CLIPScore']:.4f} "
                   f"({record['val_seconds']} s)")
        return best_predictions

    def save_last(self, best_predictions: Optional[dict] = None, with_summary: bool = False) -> None:
        """One save (run_files.RunFiles.save): last.pt + resume.pt; with `best_predictions` also best.pt, with
        `with_summary` also summary.json. Never a non-finite tensor (check_finite)."""
        self.check_finite()
        summary = self.files.summarize(self.config, self.config_file, self.paths, self.model, self.progress) \
            if with_summary else None
        self.files.save(self.model, dict(
            optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(), progress=dataclasses.asdict(self.progress), config=self.config.to_dict(),
            encoder=self.encoder_id), best_predictions=best_predictions, summary=summary)
        self.saved_step = self.progress.step

    def finish(self) -> Optional[dict]:
        main, progress = self.processes.main, self.progress
        summary = self.files.write_summary(self.config, self.config_file, self.paths, self.model, progress,
                                           finished=True) if main else None
        if main and progress.best:
            print(f"best val CIDEr {progress.best['CIDEr']:.4f} (epoch {progress.best_epoch}); "
                  f"wrote {self.files.out}/(best.pt, last.pt, their .config.json, resume.pt, log.jsonl, curves.png, "
                  "val_predictions.json, summary.json)")
        if self.processes.world_size > 1:
            self.processes.barrier()
            dist.destroy_process_group()
        return summary


def train(config: TrainConfig, config_file: Optional[str] = None, resume: bool = False,
          device: Optional[str] = None, overwrite: bool = False) -> Optional[dict]:
    """Trains as `config` says; returns the summary (rank 0) or None (other ranks). The run claims config.out for its
    lifetime (hw3.p2.run_lock: a second run there is refused). A new run never replaces another one in config.out
    unless `overwrite` (hw3.p2.run_files.finished_run); a finished run of the same config is not trained again."""
    check_writable(config.out, "folder")
    with RunFolderLock(config.out, active=int(os.environ.get("RANK", 0)) == 0):
        if not resume and not overwrite:
            done = finished_run(config.out, config.to_dict())
            if done is not None:
                best = f"best val CIDEr {done['best']['CIDEr']:.4f}, epoch {done['best_epoch']}" if done["best"] \
                    else "never validated"
                print(f"{config.out} already holds this run, finished at {done['finished_at']} ({best}): nothing "
                      "to do (--overwrite trains it again)")
                return done
        return Trainer(config, config_file, resume, device).run()
