"""Training and the graded scripts under faults: one p2_train.py run per folder (hw3/p2/run_lock.py), SIGTERM
handled as Ctrl-C is, a diverging run stopped in one line without saving anything non-finite (and, with amp, an fp16
overflow left to GradScaler), what --resume takes from a changed config and what it refuses, hw3_2.sh and
hw3_download.sh ended through their bash pid, and run_cli's one-line mapping of a full disk, a denied permission and
a file cut short (hw3/common/errors.py). All fast: the mini world, the small toy world."""
import errno
import http.server
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from caption_fixtures import make_mini_world
from decoder import GPTConfig
from hw3.common.errors import run_cli
from hw3.p2 import training
from hw3.p2.checkpoint import save_trainable
from hw3.p2.config import load_config
from hw3.p2.model import CaptionConfig, build_caption_model
from hw3.p2.optim import warmup_cosine_scheduler
from p2_train import main
from test_p2_train import CONFIGS, assert_same_tensors, run_args

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    return make_mini_world(tmp_path_factory.mktemp("mini"))


def cli_error(argv, capsys) -> str:
    """The error p2_train.py ends with for `argv`: exit status 2, one `p2_train.py: error:` line (among the progress
    bars), no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv), "p2_train.py")
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("p2_train.py: error: ")]
    assert exit_info.value.code == 2 and len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def saved_tensors(out: Path) -> dict:
    """Every tensor the run folder holds in best.pt, last.pt and resume.pt (those that exist)."""
    tensors = {}
    for name in ("best.pt", "last.pt"):
        if (out / name).is_file():
            tensors.update({f"{name}/{k}": v for k, v in torch.load(out / name, map_location="cpu").items()})
    if (out / "resume.pt").is_file():
        tensors.update({f"resume/{k}": v for k, v in torch.load(out / "resume.pt")["model"].items()})
    return tensors


# ---- one run per folder ---------------------------------------------------------------------------------------------

def wait_for(condition, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert process.poll() is None, process.communicate()[0][-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_a_second_run_into_a_folder_is_refused_naming_the_first_and_a_dead_ones_claim_is_taken_over(
        mini, tmp_path, capsys):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, str(ROOT / "p2_train.py"), "--device", "cpu",
                              *run_args("toy_lora.yaml", mini, out, tmp_path / "cache", "epochs=100000")],
                             cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: (out / "log.jsonl").is_file() and (out / "log.jsonl").read_text().strip(), first)
        error = cli_error(run_args("toy_lora.yaml", mini, out, tmp_path / "cache", "epochs=1") + ["--overwrite"],
                          capsys)
        assert f"in use by another p2_train.py run (pid {first.pid}: " in error, error
        assert str(ROOT / "p2_train.py") in error and "epochs=100000" in error, error  # its command line
    finally:
        first.kill()  # a claim the kernel drops with its process
        first.communicate()
    assert f"pid {first.pid}:" in (out / ".lock").read_text()  # the file stays, naming the dead process
    assert main(run_args("toy_lora.yaml", mini, out, tmp_path / "cache", "epochs=1") + ["--overwrite"]) == 0
    assert json.loads((out / "summary.json").read_text())["finished_at"]
    assert f"pid {os.getpid()}:" in (out / ".lock").read_text()


# ---- SIGTERM ------------------------------------------------------------------------------------------------------

def test_sigterm_mid_epoch_then_resume_equals_an_uninterrupted_run(mini, tmp_path, monkeypatch, capsys):
    """As test_p2_train's Ctrl-C test: SIGTERM (Slurm, Kubernetes, `timeout`) stops at the next optimizer step,
    saves, and p2_train.py returns 143; --resume then ends with the same tensors as the run that never stopped."""
    cache = tmp_path / "cache"
    overrides = ("epochs=2", "model.lora_dropout=0.2", "model.decoder.dropout=0.1")  # randomness to repeat
    assert main(run_args("toy_lora.yaml", mini, tmp_path / "straight", cache, *overrides)) == 0

    unhandled = []  # a SIGTERM the run did not take: without this guard it would end pytest itself

    def guard(signum, frame):
        unhandled.append(signum)
    previous = signal.signal(signal.SIGTERM, guard)
    calls = {"n": 0}
    real_call = training.CrossEntropy.__call__

    def terminated(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # epoch 2, second batch: SIGTERM in the middle of a step
            os.kill(os.getpid(), signal.SIGTERM)
        return real_call(self, *args, **kwargs)
    monkeypatch.setattr(training.CrossEntropy, "__call__", terminated)
    out = tmp_path / "stopped"
    try:
        status = main(run_args("toy_lora.yaml", mini, out, cache, *overrides))
        after = signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert not unhandled and status == 143  # 128 + SIGTERM, as a shell reports it
    assert "stopped by SIGTERM at step 5" in capsys.readouterr().out
    assert after is guard  # the handler from before the run is back
    state = torch.load(out / "resume.pt")  # stopped after the step it was in
    assert (state["progress"]["epoch"], state["progress"]["batches_done"], state["progress"]["step"]) == (1, 2, 5)

    monkeypatch.setattr(training.CrossEntropy, "__call__", real_call)
    assert main(["--resume", "--out", str(out)]) == 0
    assert_same_tensors(tmp_path / "straight", out)


def test_a_second_signal_stops_at_once_without_saving(mini, tmp_path, monkeypatch, capsys):
    real_call = training.CrossEntropy.__call__

    def terminated_twice(self, *args, **kwargs):
        if not hasattr(terminated_twice, "sent") and (tmp_path / "run" / "resume.pt").is_file():  # in epoch 2
            terminated_twice.sent = True
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return real_call(self, *args, **kwargs)
    monkeypatch.setattr(training.CrossEntropy, "__call__", terminated_twice)
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)  # without the run's handler: not the end of pytest
    try:
        status = main(run_args("toy_lora.yaml", mini, tmp_path / "run", tmp_path / "cache", "epochs=2"))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert status == 143
    assert "stopped at once by a second SIGTERM, without saving" in capsys.readouterr().out
    assert torch.load(tmp_path / "run" / "resume.pt")["progress"]["step"] == 3  # the end of epoch 1, as saved


# ---- finite or stop ---------------------------------------------------------------------------------------------

def test_a_diverging_run_stops_in_one_line_and_saves_nothing_non_finite(mini, tmp_path, capsys):
    out = tmp_path / "run"
    error = cli_error(run_args("toy_lora.yaml", mini, out, tmp_path / "cache", "epochs=3", "lr=1e4"), capsys)
    assert "training diverged at step " in error and "the loss is nan" in error, error
    assert "learning rate too high for this config" in error and "--set lr=1000" in error, error
    tensors = saved_tensors(out)
    assert tensors, "the first epoch's save"  # lr 1e4 survives the first epoch of the mini world, then breaks
    assert all(torch.isfinite(t).all() for t in tensors.values())
    assert not json.loads((out / "summary.json").read_text())["finished_at"]


def test_a_model_gone_non_finite_is_never_validated_or_saved(mini, tmp_path, monkeypatch, capsys):
    """A step that leaves an inf or nan in a trained tensor without a non-finite loss or gradient norm: the save
    after it (here the first validation's, which would make it best.pt) refuses."""
    real_step = training.Trainer.step

    def corrupting_step(self, losses):
        real_step(self, losses)
        if self.progress.step == 3:  # the first epoch's last step, just before its validation
            with torch.no_grad():
                next(p for p in self.model.parameters() if p.requires_grad).fill_(float("nan"))
    monkeypatch.setattr(training.Trainer, "step", corrupting_step)
    out = tmp_path / "run"
    error = cli_error(run_args("toy_lora.yaml", mini, out, tmp_path / "cache", "epochs=2"), capsys)
    assert "training diverged at step 3: the trained tensor " in error and "is not finite" in error, error
    assert not saved_tensors(out) and not (out / "val_predictions.json").exists()


class FakeScaler:
    """GradScaler's interface; enabled, it stands for amp on CUDA: a step whose gradients hold inf or nan is skipped."""

    def __init__(self, enabled: bool):
        self.enabled, self.skipped = enabled, 0

    def is_enabled(self) -> bool:
        return self.enabled

    def unscale_(self, optimizer) -> None:
        pass

    def step(self, optimizer) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]]
        if self.enabled and not all(bool(torch.isfinite(g).all()) for g in grads):
            self.skipped += 1
        else:
            optimizer.step()

    def update(self) -> None:
        pass


def linear_with_gradients(grad: float):
    """What optimizer_step uses: a Linear layer whose gradients are all `grad`, its SGD optimizer, a constant
    schedule."""
    model = torch.nn.Linear(2, 2)
    for param in model.parameters():
        param.grad = torch.full_like(param, grad)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # a skipped step, as with amp
def test_with_amp_an_overflowing_gradient_is_the_scalers_to_skip_and_a_nan_loss_stops():
    model, optimizer, scheduler = linear_with_gradients(float("inf"))
    scaler = FakeScaler(enabled=True)
    before = [p.clone() for p in model.parameters()]
    training.optimizer_step(model, optimizer, scheduler, scaler, grad_clip=1.0)  # GradScaler's normal course
    assert scaler.skipped == 1 and scheduler.last_epoch == 1  # skipped, training goes on
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))

    with pytest.raises(training.NonFiniteStep, match="^the loss is nan$"):
        training.optimizer_step(*linear_with_gradients(0.1), FakeScaler(enabled=True), 1.0, losses=[2.0, math.nan])

    model, optimizer, scheduler = linear_with_gradients(float("inf"))  # fp32: nothing skips it
    with pytest.raises(training.NonFiniteStep, match="^the gradient norm is inf$"):
        training.optimizer_step(model, optimizer, scheduler, FakeScaler(enabled=False), grad_clip=1.0)
    assert all(torch.isfinite(p).all() for p in model.parameters()) and scheduler.last_epoch == 0  # never applied

    model, optimizer, scheduler = linear_with_gradients(0.1)
    optimizer.zero_grad = lambda set_to_none: None  # to see the gradients the step used
    training.optimizer_step(model, optimizer, scheduler, FakeScaler(enabled=False), grad_clip=0.0)  # norm checked
    assert scheduler.last_epoch == 1  # applied, with the gradients left unclipped:
    assert all(torch.equal(p.grad, torch.full_like(p, 0.1)) for p in model.parameters())


def bare_trainer(amp: bool, grad: float) -> training.Trainer:
    """A Trainer holding only what Trainer.step uses, over linear_with_gradients(grad), at step 4, saved at 3."""
    trainer = training.Trainer.__new__(training.Trainer)
    trainer.model, trainer.optimizer, trainer.scheduler = linear_with_gradients(grad)
    trainer.scaler, trainer.config = FakeScaler(amp), load_config(str(CONFIGS / "toy_lora.yaml"))
    trainer.progress, trainer.saved_step = training.Progress(step=4), 3
    return trainer


def test_a_non_finite_step_stops_the_run_in_one_line_saying_what_to_change():
    trainer = bare_trainer(amp=True, grad=0.1)
    trainer.step([2.0])
    assert trainer.progress.step == 5
    with pytest.raises(training.TrainingDiverged, match="step 6: the loss is nan; likely cause: fp16 overflow"):
        trainer.step([math.nan])
    with pytest.raises(training.TrainingDiverged, match="step 5: the gradient norm is inf; likely cause: a learning "
                                                        "rate too high for this config"):
        bare_trainer(amp=False, grad=float("inf")).step([2.0])


# ---- resume -----------------------------------------------------------------------------------------------------

def fresh_schedule_lrs(lr: float, warmup_ratio: float, total_steps: int) -> list:
    """The lr after each optimizer step 1..total_steps of a fresh warmup + cosine schedule."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    scheduler = warmup_cosine_scheduler(optimizer, max(1, round(warmup_ratio * total_steps)), total_steps)
    lrs = []
    for _ in range(total_steps):
        optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    return lrs


def train_records(out: Path) -> list:
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["type"] == "train"]


def test_resume_with_a_changed_lr_and_epochs_trains_on_the_new_schedule(mini, tmp_path):
    out = tmp_path / "run"
    assert main(run_args("toy_lora.yaml", mini, out, tmp_path / "cache", "epochs=1")) == 0
    steps_per_epoch = len(train_records(out))
    assert main(["--resume", "--out", str(out), "--epochs", "3", "--set", "lr=3e-3"]) == 0
    records = train_records(out)
    assert [r["step"] for r in records] == list(range(1, 3 * steps_per_epoch + 1))
    warmup_ratio = load_config(str(CONFIGS / "toy_lora.yaml")).warmup_ratio
    expected = fresh_schedule_lrs(3e-3, warmup_ratio, 3 * steps_per_epoch)
    resumed = [r["lr"] for r in records[steps_per_epoch:]]
    assert resumed == expected[steps_per_epoch:]  # exactly: the same float operations
    state = torch.load(out / "resume.pt")
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [expected[-1]] * 2
    assert state["scheduler"]["base_lrs"] == [3e-3, 3e-3] and state["optimizer"]["state"]  # the moments go on


def test_resume_with_a_changed_encoder_file_is_refused(tmp_path, capsys):
    world = make_mini_world(tmp_path / "world")  # its own: this test rewrites clip.pt
    out = tmp_path / "run"
    assert main(run_args("toy_lora.yaml", world, out, tmp_path / "cache", "epochs=1")) == 0
    clip = world / "clip.pt"
    os.utime(clip, (time.time() + 100, time.time() + 100))  # touched, same bytes: the same encoder
    assert main(["--resume", "--out", str(out), "--epochs", "2"]) == 0
    state = torch.load(clip)
    state["visual.conv1.weight"] += 0.01  # other weights under the same path
    torch.save(state, clip)
    error = cli_error(["--resume", "--out", str(out), "--epochs", "3"], capsys)
    assert f"{out} was trained with the encoder {clip} (sha256 " in error and "not " in error, error
    assert torch.load(out / "resume.pt")["progress"]["epoch"] == 2  # left as it was


# ---- the graded scripts under a time limit ---------------------------------------------------------------------

def processes_in_group(group: int) -> list:
    """The pids of the live processes of process group `group` (from /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # ended meanwhile
                continue
            if fields[0] != "Z" and int(fields[2]) == group:
                pids.append(int(entry.name))
    return pids


def start_script(*command) -> subprocess.Popen:
    """bash SCRIPT ... in its own process group (start_new_session), so that whatever it leaves is findable."""
    return subprocess.Popen(["bash", *map(str, command)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def terminate_through_bash_pid(script: subprocess.Popen) -> list:
    """A grader's time limit as subprocess.Popen.terminate() does it, SIGTERM to the script's pid only; returns the
    command lines of the processes still in its group 10 s later (then kills them): time for an orphaned DataLoader
    worker to notice (5 s), not for the work to finish."""
    try:
        script.terminate()
        script.wait(timeout=60)
        deadline = time.time() + 10
        while processes_in_group(script.pid) and time.time() < deadline:
            time.sleep(0.2)
        left = []
        for pid in processes_in_group(script.pid):
            left.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        return left
    finally:
        for pid in processes_in_group(script.pid):
            os.kill(pid, signal.SIGKILL)
        script.stdout.close()


needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads process groups from /proc")


@needs_proc
def test_hw3_2_ended_through_its_bash_pid_leaves_no_python_and_no_output(toy_world_small, tmp_path):
    """Python ends with the script (DataLoader workers included) and writes no output, not even a temporary file."""
    config = CaptionConfig(encoder=str(toy_world_small / "clip.pt"), decoder=GPTConfig(n_layer=2, n_head=2, n_embd=128),
                           context_width=64, cross_attn_width=64, cross_attn_heads=2, peft=["adapter"],
                           adapter_size=8)
    model = build_caption_model(config, str(toy_world_small / "decoder_model.bin"))
    checkpoint = tmp_path / "toy.pt"
    save_trainable(model, str(checkpoint))
    images = tmp_path / "images"
    images.mkdir()
    for copy in range(8):  # about 30 s of work on a CPU: ended in the middle of it
        for source in sorted((toy_world_small / "hw3_data" / "p2_data" / "images" / "val").glob("*.jpg")):
            shutil.copy(source, images / f"{copy}_{source.name}")
    output = tmp_path / "out" / "pred.json"
    script = start_script(ROOT / "hw3_2.sh", images, output, toy_world_small / "decoder_model.bin", "--checkpoint",
                          checkpoint, "--encoder", toy_world_small / "clip.pt", "--workers", 1, "--batch-size", 1,
                          "--beam-size", 5)
    for line in script.stdout:
        if " images in " in line:  # the model is loaded, captioning starts
            break
    assert terminate_through_bash_pid(script) == []
    assert script.returncode == 143  # run_cli's exit on SIGTERM: 128 + 15
    assert not output.exists()
    assert not output.parent.exists() or not os.listdir(output.parent)


class StallingServer:
    """Serves a 1 MB file on 127.0.0.1 that stops after its first kilobyte until `release` (a download in
    progress); `requested` is set once a download started."""

    def __init__(self):
        self.requested, self.release = threading.Event(), threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Length", str(1 << 20))
                self.end_headers()
                self.wfile.write(b"x" * 1024)
                self.wfile.flush()
                server.requested.set()
                server.release.wait(60)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/weights.pt"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@needs_proc
@pytest.mark.skipif(shutil.which("wget") is None, reason="hw3_download.sh fetches with wget")
def test_hw3_download_ended_through_its_bash_pid_leaves_no_wget_and_no_file(tmp_path):
    """The download's own child, wget, ends with it too, and no part of the file is left at its place."""
    server = StallingServer()
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"checkpoints": [{
        "name": "p2_best", "path": "checkpoints/p2_best.pt", "url": server.url, "sha256": "0" * 64,
        "made_by": "p2_train.py", "config": {"encoder": "ViT-B/32", "peft": ["adapter"]}}], "backbones": []}))
    dest = tmp_path / "root"
    try:
        script = start_script(ROOT / "hw3_download.sh", "--manifest", manifest, "--dest-root", dest,
                              "--skip-backbones")
        assert server.requested.wait(120), script.communicate(timeout=60)[0]
        assert terminate_through_bash_pid(script) == []
        assert script.returncode == 143
        assert not (dest / "checkpoints").exists() or os.listdir(dest / "checkpoints") == []
    finally:
        server.stop()


# ---- run_cli ------------------------------------------------------------------------------------------------------

def raising(error: BaseException):
    def main():
        raise error
    return main


def chained(error: BaseException, cause: BaseException, context: bool = False) -> BaseException:
    if context:
        error.__context__ = cause
    else:
        error.__cause__ = cause
    return error


def truncated_files(folder: Path) -> list:
    """(what reading it raises) for a .npy memmap, a torch zip file and a legacy torch file, each cut in half."""
    folder.mkdir()
    np.save(folder / "a.npy", np.zeros(10000))
    torch.save({"a": torch.zeros(1000)}, folder / "zip.pt")
    torch.save({"a": torch.zeros(1000)}, folder / "legacy.pt", _use_new_zipfile_serialization=False)
    errors = []
    for name, load in (("a.npy", lambda p: np.load(p, mmap_mode="r")), ("zip.pt", torch.load),
                       ("legacy.pt", torch.load)):
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[:len(data) // 2] if name != "legacy.pt" else data[:-100])
        with pytest.raises(Exception) as info:
            load(folder / name)
        errors.append(info.value)
    return errors


@pytest.mark.parametrize("error, says", [
    (chained(RuntimeError("[enforce fail at inline_container.cc:319] . unexpected pos 320 vs 248"),
             OSError(errno.ENOSPC, "No space left on device")), "no space left"),
    (chained(OSError(errno.ENOSPC, "No space left on device"),
             RuntimeError("[enforce fail at inline_container.cc:319] . unexpected pos 320 vs 248"), context=True),
     "no space left"),  # what torch.save to a full disk raises
    (RuntimeError("PytorchStreamWriter failed writing file data/0: No space left on device"), "no space left"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), "no space left"),
    (PermissionError(errno.EACCES, "Permission denied", "/runs/x/best.pt"), "permission denied"),
    (chained(RuntimeError("cannot open file"), PermissionError(errno.EPERM, "Operation not permitted")),
     "permission denied"),
    (ValueError("mmap length is greater than file size"), "a file was cut short"),
    (EOFError("Ran out of input"), "a file was cut short"),
    (RuntimeError("unexpected EOF, expected 100 more bytes. The file might be corrupted."), "a file was cut short"),
])
def test_run_cli_ends_full_disks_denied_permissions_and_cut_files_in_one_line(error, says, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(raising(error), "prog")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith(f"prog: error: {says}") and len(err.splitlines()) == 1, err


def test_run_cli_ends_real_cut_files_in_one_line(tmp_path, capsys):
    for error in truncated_files(tmp_path / "cut"):
        with pytest.raises(SystemExit) as exit_info:
            run_cli(raising(error), "prog")
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith("prog: error: a file was cut short"), (error, err)


@pytest.mark.parametrize("error", [ValueError("bad value"), KeyError("x"), RuntimeError("CUDA out of memory"),
                                   EOFError(), RuntimeError("expected scalar type Float but found Half"),
                                   chained(ValueError("bad value"), KeyError("no space"))])
def test_run_cli_keeps_the_traceback_of_anything_else(error):
    with pytest.raises(type(error)):
        run_cli(raising(error), "prog")
