"""The files of a p2_train.py run folder (make_report.py and the tests read them):

    best.pt               trainable tensors of the best validation (by CIDEr), prefixes collapsed: for inference and
                          for publishing (the course's checkpoint format, hw3/p2/checkpoint.py)
    best.config.json      its CaptionConfig ({"caption_config": {...}}), which rebuilds the model
    last.pt               trainable tensors of the latest state (prefix MLP kept), and last.config.json
    resume.pt             the same tensors with the optimizer, scheduler, GradScaler, progress and config, in one
                          file, so what --resume reads is always one consistent state (a pickle: training only)
    log.jsonl             one JSON object per logged training step ("type": "train") and validation ("val")
    curves.png            training loss per step, val CIDEr / CLIPScore per validation (SCST: and the reward)
    val_predictions.json  {image key: caption} of the best validation
    summary.json          the run in one object (read by the report builder)
    config.yaml           the resolved config of the run
Only rank 0 writes (`active`). A save (`RunFiles.save`) is one change: last.pt and resume.pt, with a new best also
best.pt and val_predictions.json, with the summary also summary.json, are all written beside their targets first,
then renamed into place (hw3.common.files.write_together): a failed save, e.g. on a full disk, leaves the previous
set as it was and ends in one UserError. Every other file appears whole or not at all (written beside, renamed).
"""
import dataclasses
import datetime
import json
import os
import shutil
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")  # headless
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import torch  # noqa: E402
import yaml  # noqa: E402

from hw3.common.dotted import flatten  # noqa: E402
from hw3.common.errors import UserError, is_disk_full  # noqa: E402
from hw3.common.files import (json_writer, load_torch_file, read_json, save_torch,  # noqa: E402
                              write_text_atomically, write_together)
from hw3.p2.checkpoint import (Writes, checkpoint_tensors, checkpoint_writes,  # noqa: E402
                               count_checkpoint_params)
from hw3.p2.config import DataPaths, TrainConfig  # noqa: E402
from hw3.p2.model import CaptionModel, count_trainable  # noqa: E402


def tensor_bytes(value) -> int:
    """The bytes of every tensor in `value` (nested dicts, lists and tuples): about what torch.save writes."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        value = list(value.values())
    return sum(tensor_bytes(item) for item in value) if isinstance(value, (list, tuple)) else 0


def megabytes(size: int) -> str:
    return f"{size / 1e6:,.1f} MB"


def saved_config(out: str) -> dict:
    """The config dict a run saved in OUT/resume.pt."""
    path = os.path.join(out, "resume.pt")
    if not os.path.isfile(path):
        raise UserError(f"nothing to resume: {path} does not exist")
    return load_resume_state(path)["config"]


def load_resume_state(path) -> dict:
    """resume.pt: {model, optimizer, scheduler, scaler, progress, config}; another file raises UserError naming it."""
    state = load_torch_file(path, "a p2_train.py resume.pt")
    keys = {"model", "optimizer", "scheduler", "scaler", "progress", "config"}
    if not isinstance(state, dict) or not keys <= set(state):
        raise UserError(f"{path} is not a p2_train.py resume.pt (no model/optimizer/progress/config state)")
    return state


# Set by training from the data (the decoder file's sizes, the encoder's path) or where files go (the run folder, the
# feature cache's folder), not asked for: two configs that differ only here ask for the same run.
DERIVED_FIELDS = ("out", "cache_dir", "model.encoder", "model.decoder.n_layer", "model.decoder.n_head",
                  "model.decoder.n_embd", "model.decoder.vocab_size", "model.decoder.block_size")


def requested(config: dict) -> dict:
    """The config dict without DERIVED_FIELDS (and, outside the self-critical stage, without its unused `scst:`
    section), flattened to dotted keys."""
    flat = flatten(config)
    unused = () if flat.get("stage") == "scst" else ("scst.",)
    return {key: value for key, value in flat.items() if key not in DERIVED_FIELDS and not key.startswith(unused)}


def finished_run(out: str, config: dict) -> Optional[dict]:
    """Before a new (not resumed) run writes to `out`: the summary of the finished run already there when it was
    trained with the same config (nothing to do), None when `out` holds no run. Raises UserError when `out` holds a
    run it would replace: an unfinished one, or one trained with another config."""
    files = RunFiles(out)
    existing = [path.name for path in (files.best, files.last, files.resume, files.summary) if path.is_file()]
    if not existing:
        return None
    choices = f"choose a new --out, or pass --overwrite to replace the run in {out}"
    try:
        summary = read_json(files.summary, "run summary")
        saved = load_resume_state(files.resume)["config"]
    except (OSError, ValueError):  # UserError is a ValueError
        raise UserError(f"{out} holds the files of a run ({', '.join(existing)}) that cannot be read back: "
                        f"{choices}") from None
    if not summary.get("finished_at"):
        raise UserError(f"{out} holds an unfinished run: continue it with `--resume --out {out}`, or {choices}")
    try:  # fields added to TrainConfig since that run was saved count with their defaults
        saved = TrainConfig.from_dict(saved).to_dict()
    except UserError:
        pass  # compared as saved: what no longer loads differs
    differ = sorted(key for key in set(requested(saved)) | set(requested(config))
                    if requested(saved).get(key) != requested(config).get(key))
    if differ:
        raise UserError(f"{out} holds a run finished at {summary['finished_at']} with another config (differs in "
                        f"{', '.join(differ[:8])}{' ...' if len(differ) > 8 else ''}): to train it longer, "
                        f"`--resume --out {out} --epochs N`; else {choices}")
    return summary


class RunFiles:
    def __init__(self, out: str, active: bool = True):
        self.out, self.active = Path(out), active
        self.best, self.last = self.out / "best.pt", self.out / "last.pt"
        self.resume, self.log_path = self.out / "resume.pt", self.out / "log.jsonl"
        self.summary, self.predictions = self.out / "summary.json", self.out / "val_predictions.json"
        self.records = []
        self.best_params: Optional[int] = None  # the course's count of best.pt, once known

    def load_resume(self) -> dict:
        if not self.resume.is_file():
            raise UserError(f"nothing to resume in {self.out}: no resume.pt")
        return load_resume_state(self.resume)

    def restore_log(self, step: int) -> None:
        """Keeps the log lines up to the resumed step (later ones belong to work that was not saved)."""
        if self.log_path.is_file():
            records = [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]
            self.records = [r for r in records if r.get("step", 0) <= step]

    def start(self, config, config_file: Optional[str], paths: DataPaths) -> None:
        if not self.active:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_path.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        write_text_atomically(self.out / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
        print(f"run folder: {self.out} (data: {paths.description}; config: {config_file or 'resumed'})",
              flush=True)

    def log(self, **record) -> None:
        if not self.active:
            return
        record["time"] = datetime.datetime.now().isoformat(timespec="seconds")
        self.records.append(record)
        try:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as error:
            raise self.disk_full(error) from None

    def save(self, model: CaptionModel, state: dict, best_predictions: Optional[dict] = None,
             summary: Optional[dict] = None) -> None:
        """One save, as one change (see the module docstring): last.pt and resume.pt (`state` with the trainable
        tensors); with `best_predictions` (a new best) best.pt and val_predictions.json; with `summary`
        (RunFiles.summarize) summary.json, then curves.png."""
        if not self.active:
            return
        last = checkpoint_tensors(model, collapse_prefix=False)
        state = dict(state, model=last)
        writes = checkpoint_writes(last, model.config, self.last)
        writes.append((self.resume, lambda path: save_torch(state, path)))
        best = checkpoint_tensors(model) if best_predictions is not None else None
        best_params = sum(t.numel() for t in best.values()) if best is not None else None
        if best is not None:
            writes += checkpoint_writes(best, model.config, self.best)
            writes.append((self.predictions, json_writer(best_predictions, indent=1, sort_keys=True)))
        if summary is not None:
            params = summary["checkpoint_params"] if best_params is None else best_params
            writes.append((self.summary, json_writer(dict(summary, checkpoint_params=params), indent=1)))
        self.write(writes, tensor_bytes([best, last, state]))  # last.pt and resume.pt both hold `last`
        if best_params is not None:
            self.best_params = best_params
        if summary is not None:
            self.plot()

    def write(self, writes: Writes, size: Optional[int] = None) -> None:
        """write_together; a full disk ends in one UserError naming the folder and the `size` the save needs."""
        try:
            write_together(writes)
        except (OSError, RuntimeError) as error:
            raise self.disk_full(error, size) from None

    def disk_full(self, error: Exception, size: Optional[int] = None) -> Exception:
        """The UserError to raise for a full disk (naming the folder, and the space a save of `size` bytes needs);
        `error` itself for any other error."""
        if not is_disk_full(error):
            return error
        free = shutil.disk_usage(self.out).free if self.out.is_dir() else 0
        needs = f"this save needs about {megabytes(size)}, " if size else ""
        then = f"continue with `--resume --out {self.out}`" if self.resume.is_file() else "run it again"
        return UserError(f"no space left on the device of {self.out} ({needs}{megabytes(free)} free there); the "
                         f"files of the previous save are unchanged: free some space, then {then}")

    def checkpoint_params(self) -> Optional[int]:
        """The course's count of best.pt (torch.load + numel), None while there is none."""
        if self.best_params is None and self.best.is_file():
            self.best_params = count_checkpoint_params(str(self.best))
        return self.best_params

    def summarize(self, config, config_file: Optional[str], paths: DataPaths, model: CaptionModel, progress,
                  finished: bool = False) -> dict:
        """summary.json's object, from the config and the training Progress (hw3.p2.training)."""
        return {
            "config_file": config_file, "method": "+".join(config.model.peft) or "none", "stage": config.stage,
            "encoder": config.model.encoder, "init": config.init,
            "trainable_params": count_trainable(model),
            "checkpoint_params": self.checkpoint_params(),
            "best_epoch": progress.best_epoch, "best": progress.best, "epochs": progress.history,
            "decode": dataclasses.asdict(config.decode), "data": paths.description,
            "finished_at": datetime.datetime.now().isoformat(timespec="seconds") if finished else None,
        }

    def write_summary(self, config, config_file: Optional[str], paths: DataPaths, model: CaptionModel, progress,
                      finished: bool = False) -> dict:
        """summary.json (and curves.png) on their own, e.g. when the run finishes; returns the summary."""
        summary = self.summarize(config, config_file, paths, model, progress, finished)
        if self.active:
            self.write([(self.summary, json_writer(summary, indent=1))])
            self.plot()
        return summary

    def plot(self) -> None:
        train = [r for r in self.records if r["type"] == "train"]
        val = [r for r in self.records if r["type"] == "val"]
        rewards = [r for r in val if "reward" in r]  # self-critical runs
        figure, axes = plt.subplots(1, 3 if rewards else 2, figsize=(16 if rewards else 11, 4))
        loss_axes, score_axes = axes[0], axes[1]
        loss_axes.plot([r["step"] for r in train], [r["loss"] for r in train], label="train (logged steps)")
        loss_axes.plot([r["step"] for r in val], [r["train_loss"] for r in val], "o-", label="train (per validation)")
        loss_axes.set(xlabel="optimizer step", ylabel="self-critical loss" if rewards else "cross-entropy",
                      title="training loss")
        loss_axes.legend()
        if rewards:
            reward_axes = axes[2]
            reward_axes.plot([r["step"] for r in rewards], [r["reward"] for r in rewards], "o-",
                             label="mean reward of the candidates")
            reward_axes.plot([r["step"] for r in rewards], [r["sample_cider"] for r in rewards], "s--",
                             label="their CIDEr-D (training references)")
            reward_axes.set(xlabel="optimizer step", title="SCST reward (per validation)")
            reward_axes.legend()
        for metric in ("CIDEr", "CLIPScore"):
            score_axes.plot([r["step"] for r in val], [r[metric] for r in val], "o-", label=f"val {metric}")
        score_axes.set(xlabel="optimizer step", title="validation")
        score_axes.legend()
        figure.tight_layout()
        try:
            self.write([(self.out / "curves.png", lambda path: figure.savefig(path, dpi=100, format="png"))])
        finally:
            plt.close(figure)
