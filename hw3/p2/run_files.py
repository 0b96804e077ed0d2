"""The files of a p2_train.py run folder (make_report.py and the tests read them):

    best.safetensors      trainable tensors of the best validation (by CIDEr), prefixes collapsed: for inference
    last.safetensors      trainable tensors of the latest state (prefix MLP kept)
    resume.pt             the same tensors with the optimizer, scheduler, GradScaler, progress and config, in one
                          file, so what --resume reads is always one consistent state (a pickle: training only)
    log.jsonl             one JSON object per logged training step ("type": "train") and validation ("val")
    curves.png            training loss per step, val CIDEr / CLIPScore per validation (SCST: and the reward)
    val_predictions.json  {image key: caption} of the best validation
    summary.json          the run in one object (read by the report builder)
    config.yaml           the resolved config of the run
Only rank 0 writes (`active`). Every file appears whole or not at all (written beside, then renamed).
"""
import dataclasses
import datetime
import json
import os
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")  # headless
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import torch  # noqa: E402
import yaml  # noqa: E402

from hw3.common.dotted import flatten  # noqa: E402
from hw3.common.errors import UserError  # noqa: E402
from hw3.common.files import (load_torch_file, read_json, write_atomically, write_json_atomically,  # noqa: E402
                              write_text_atomically)
from hw3.p2.checkpoint import count_checkpoint_params, save_trainable  # noqa: E402
from hw3.p2.config import DataPaths, TrainConfig  # noqa: E402
from hw3.p2.model import CaptionModel, count_trainable, trainable_state_dict  # noqa: E402


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


# Set by training from the data (the decoder file's sizes, the encoder's path), not asked for: two configs that
# differ only here ask for the same run.
DERIVED_FIELDS = ("out", "model.encoder", "model.decoder.n_layer", "model.decoder.n_head", "model.decoder.n_embd",
                  "model.decoder.vocab_size", "model.decoder.block_size")


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
        self.best, self.last = self.out / "best.safetensors", self.out / "last.safetensors"
        self.resume, self.log_path = self.out / "resume.pt", self.out / "log.jsonl"
        self.summary = self.out / "summary.json"
        self.records = []

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
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def save_best(self, model: CaptionModel, predictions: dict) -> None:
        save_trainable(model, str(self.best))
        write_json_atomically(self.out / "val_predictions.json", predictions, indent=1, sort_keys=True)

    def save_last(self, model: CaptionModel, state: dict) -> None:
        if not self.active:
            return
        save_trainable(model, str(self.last), collapse_prefix=False)
        state = dict(state, model={name: t.cpu() for name, t in trainable_state_dict(model, False).items()})
        write_atomically(self.resume, lambda path: torch.save(state, path))

    def write_summary(self, config, config_file: Optional[str], paths: DataPaths, model: CaptionModel, progress,
                      finished: bool = False) -> dict:
        """summary.json from the config and the training Progress (hw3.p2.training)."""
        summary = {
            "config_file": config_file, "method": "+".join(config.model.peft) or "none", "stage": config.stage,
            "encoder": config.model.encoder, "init": config.init,
            "trainable_params": count_trainable(model),
            "checkpoint_params": count_checkpoint_params(str(self.best)) if self.best.is_file() else None,
            "best_epoch": progress.best_epoch, "best": progress.best, "epochs": progress.history,
            "decode": dataclasses.asdict(config.decode), "data": paths.description,
            "finished_at": datetime.datetime.now().isoformat(timespec="seconds") if finished else None,
        }
        if self.active:
            write_json_atomically(self.summary, summary, indent=1)
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
        write_atomically(self.out / "curves.png", lambda path: figure.savefig(path, dpi=100, format="png"))
        plt.close(figure)
