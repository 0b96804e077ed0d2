"""p2_train.py + hw3/p2 (config, training, run_files): configs and overrides, the loss, run folders, checkpoints holding only
trainable tensors, Ctrl-C or a kill + resume equal to an uninterrupted run tensor for tensor, torchrun/DDP on CPU
(slow), the real recipes' parameter budget at real size, and the three toy configs against the best image-blind
baseline and the 2x grounding bar (slow)."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.p2_toy_baselines import best_fixed_caption
from caption_fixtures import MINI_GPT, make_mini_world
from config_headers import stated_trainable_counts
from decoder import Decoder, GPTConfig, gpt2_parameter_names
from hw3.common.errors import run_cli
from hw3.p2 import training
from hw3.p2.checkpoint import count_checkpoint_params, load_captioner, read_checkpoint, save_trainable
from hw3.p2.config import load_config
from hw3.p2.encoder import load_image_encoder
from hw3.p2.model import MAX_TRAINABLE, CaptionModel, OutputVocabulary, count_trainable, trainable_state_dict
from hw3.p2.optim import warmup_cosine
from p2_train import main, toy_world_settings

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
METHODS = ("adapter", "prefix", "lora")


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    return make_mini_world(tmp_path_factory.mktemp("mini"))


def run_args(config, world, out, cache, *overrides):
    """A toy config on the mini world, whose one-block CLIP has only the last block to take tokens from."""
    return ["--config", str(CONFIGS / config), "--toy-world", str(world), "--out", str(out), "--set",
            f"cache_dir={cache}", "cider_tokenizer=simple", "batch_size=4", "log_every=1", "model.encoder_layer=-1",
            *overrides]


def cli_error(argv, capsys) -> str:
    """The error p2_train.py ends with for `argv`: exit status 2, one `p2_train.py: error:` line, no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv), "p2_train.py")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("p2_train.py: error: ") and "Traceback" not in err, err
    return err


# ---- configs ------------------------------------------------------------------------------------------------------

def test_yaml_config_with_overrides_and_flags(tmp_path):
    config = load_config(str(CONFIGS / "toy_adapter.yaml"),
                         ["lr=3e-4", "model.adapter_size=16", "decode.beam_size=2", "model.lora_alpha=8",
                          "model.cross_attn_layers=[0]"], flags=dict(epochs=7, out=str(tmp_path)))
    assert config.lr == 3e-4 and isinstance(config.lr, float)  # YAML reads 3e-4 as a string
    assert config.model.adapter_size == 16 and config.model.cross_attn_layers == [0]
    assert config.model.lora_alpha == 8.0 and isinstance(config.model.lora_alpha, float)
    assert config.decode.beam_size == 2 and config.epochs == 7 and config.out == str(tmp_path)
    assert config.model.peft == ["adapter"] and config.train_vocab == "captions"


@pytest.mark.parametrize("overrides, message", [
    (["lerning_rate=1"], "unknown config keys: \\['lerning_rate'\\]"),
    (["model.adapter_sise=1"], "unknown CaptionConfig fields"),
    (["decode.beams=2"], "unknown decode keys"),
    (["lr=fast"], "lr must be a number"),
    (["amp=maybe"], "amp must be true or false"),
    (["train_vocab=some"], "train_vocab must be one of"),
    (["lr"], "--set expects key=value"),
    (["model.peft=[ia3]"], "unknown PEFT kinds"),
])
def test_bad_configs_fail_clearly(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(str(CONFIGS / "toy_adapter.yaml"), overrides)


def test_every_config_file_loads():
    for path in sorted(CONFIGS.glob("*.yaml")):
        if path.stem.endswith("scst"):  # a stage over a finished run: loaded over each method's config
            toy = path.stem.startswith("toy_")
            for method in METHODS:
                base = load_config(str(CONFIGS / f"{'toy_' if toy else ''}{method}.yaml")).to_dict()
                config = load_config(str(path), base=dict(base, init="best.pt"))
                assert config.stage == "scst" and config.model.peft == [method], path
                assert config.model == load_config(None, base=base).model  # the stage leaves the model alone
            continue
        config = load_config(str(path))
        toy = path.stem.startswith("toy_")
        assert config.model.peft == [path.stem.split("_")[-1]], path  # {toy_,ENCODER_,}METHOD.yaml
        assert (config.model.encoder == "toy") == toy and (config.train_vocab == "captions") == toy
        if not toy:
            assert config.clip_model == "ViT-B/32" and config.amp
            assert (config.model.encoder == "ViT-L/14") == (path.stem in METHODS), path  # the others: candidates
    with pytest.raises(ValueError, match="--toy-world"):
        load_config(str(CONFIGS / "toy_lora.yaml")).data_paths()


def test_cli_help_and_usage_errors(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "--resume" in help_text and "cache_features: False  # encode every image once" in help_text
    assert "label_smoothing: 0.0" in help_text and "clip_weight: 1.0" in help_text  # TrainConfig's and SCSTConfig's
    assert "give --config FILE" in cli_error([], capsys)
    assert "nothing to resume" in cli_error(["--resume", "--out", str(tmp_path)], capsys)
    assert "cannot read config" in cli_error(["--config", str(tmp_path / "none.yaml")], capsys)
    config = str(CONFIGS / "toy_adapter.yaml")
    for override, message in (("model.adapter_sise=1", "unknown CaptionConfig fields"),
                              ("model.decoder.dropot=0.1", "unknown decoder (GPTConfig) fields"),
                              ("model.lora_targets=[x]", "LoRA targets"), ("decode.max_length=5000", "block_size")):
        argv = ["--config", config, "--set", override, "model.encoder_layer=-1"] + \
            (["model.peft=[lora]"] if "lora" in override else [])
        if message in ("LoRA targets", "block_size"):  # checked when the model is built: needs the data
            world = make_mini_world(tmp_path / override)
            argv += ["--toy-world", str(world), "--out", str(tmp_path / "runs" / override)]
        assert message in cli_error(argv, capsys), override


# ---- pieces of the loop ---------------------------------------------------------------------------------------------

def test_warmup_then_cosine_to_zero():
    factor = warmup_cosine(4, 20)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(12) == pytest.approx(0.5) and factor(20) == pytest.approx(0.0) and factor(25) == pytest.approx(0.0)
    assert all(factor(s) >= factor(s + 1) for s in range(4, 20))


def test_an_output_vocabulary_is_the_softmax_over_those_tokens():
    torch.manual_seed(0)
    decoder = Decoder(GPTConfig(n_layer=1, n_head=1, n_embd=16, vocab_size=50, block_size=16))
    ids = torch.tensor([1, 5, 7, 49])
    vocabulary = OutputVocabulary(ids, 50)
    input_ids, targets = torch.tensor([[49, 5, 7, 1]]), torch.tensor([[5, 7, 49, -100]])
    full, _ = decoder(input_ids)
    restricted, _ = decoder(input_ids, output_ids=vocabulary.token_ids)
    assert torch.allclose(restricted, full[..., ids], atol=1e-6)
    mapped = vocabulary.targets(targets)
    assert mapped.tolist() == [[1, 2, 3, -100]]
    expected = F.cross_entropy(full[0, :3, ids], torch.tensor([1, 2, 3]))
    assert torch.allclose(F.cross_entropy(restricted[0], mapped[0]), expected)
    with pytest.raises(ValueError, match="outside the training vocabulary"):
        vocabulary.targets(torch.tensor([[2]]))
    assert not dict(vocabulary.state_dict())  # never saved in a checkpoint


def test_a_configs_decoder_settings_reach_the_trained_and_the_loaded_model_alike(mini, tmp_path):
    """One builder (model.build_caption_model) for training and load_captioner: the decoder settings a config sets
    that decoder_model.bin does not hold arrive in the model a run trains and in the one its checkpoint loads into."""
    config = load_config(str(CONFIGS / "toy_adapter.yaml"), toy_world_settings(str(mini)) + [
        "model.encoder_layer=-1", "model.decoder.layer_norm_eps=1e-3", "model.decoder.dropout=0.25"])
    paths = config.data_paths()
    trained, run_config = training.build_run_model(config, paths, torch.device("cpu"))
    save_trainable(trained, str(tmp_path / "best.pt"))
    loaded = load_captioner(str(tmp_path / "best.pt"), paths.decoder)

    def settings(model: CaptionModel) -> dict:
        return {name: module.eps if isinstance(module, nn.LayerNorm) else module.p
                for name, module in model.named_modules() if isinstance(module, (nn.LayerNorm, nn.Dropout))}
    assert settings(loaded) == settings(trained)
    assert trained.decoder.config == loaded.decoder.config == run_config.model.decoder
    assert trained.decoder.transformer.ln_f.eps == 1e-3 and trained.decoder.transformer.drop.p == 0.25


# ---- whole runs on the mini world -----------------------------------------------------------------------------------

def test_run_folder_layout_and_checkpoints_hold_only_trainable_tensors(mini, tmp_path):
    out = tmp_path / "run"
    assert main(run_args("toy_prefix.yaml", mini, out, tmp_path / "cache", "epochs=2", "grad_accum=2")) == 0
    for name in ("best.pt", "best.config.json", "last.pt", "last.config.json", "resume.pt", "log.jsonl", "curves.png",
                 "val_predictions.json", "summary.json", "config.yaml"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"config_file", "method", "stage", "encoder", "init", "trainable_params",
                            "checkpoint_params", "best_epoch", "best", "epochs", "decode", "data", "finished_at"}
    assert summary["encoder"] == str(mini / "clip.pt")  # --toy-world's encoder
    assert summary["stage"] == "xe" and summary["init"] is None
    assert summary["method"] == "prefix" and str(mini) in summary["data"] and summary["finished_at"]
    assert [e["epoch"] for e in summary["epochs"]] == [1, 2]
    assert [e["step"] for e in summary["epochs"]] == [2, 4]  # 12 images / batch 4 = 3 batches -> 2 optimizer steps
    assert summary["best"]["CIDEr"] == max(e["CIDEr"] for e in summary["epochs"])
    assert set(summary["epochs"][0]) == {"epoch", "step", "train_loss", "CIDEr", "CLIPScore", "seconds", "val_seconds"}
    assert summary["decode"]["beam_size"] == 1

    model = load_captioner(str(out / "best.pt"), str(mini / "decoder_model.bin"))  # strict key checks
    best = torch.load(str(out / "best.pt"), map_location="cpu")  # the course's format: a dict of tensors only
    assert type(best) is dict and all(type(t) is torch.Tensor for t in best.values())
    assert set(best) == set(trainable_state_dict(model))
    assert "prefix.prefixes" in best and not any(k.startswith("prefix.mlp") for k in best)  # collapsed
    frozen = {f"decoder.transformer.{name}" for name in gpt2_parameter_names(MINI_GPT)}
    assert not any(k in frozen or k.startswith("encoder.") for k in best)
    assert summary["checkpoint_params"] == count_checkpoint_params(str(out / "best.pt")) \
        == sum(t.numel() for t in best.values()) < summary["trainable_params"]  # the prefix MLP is not saved
    _, last = read_checkpoint(str(out / "last.pt"))
    assert any(k.startswith("prefix.mlp") for k in last)  # kept for resuming

    predictions = json.loads((out / "val_predictions.json").read_text())
    assert sorted(predictions) == [f"v{i:05d}" for i in range(4)]
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "train"] == [1, 2, 3, 4]
    assert [r["type"] for r in records].count("val") == 2


def trained_tensors(run: Path) -> dict:
    """The tensors a run folder ends with: last.pt, best.pt and resume.pt's."""
    tensors = {f"last/{k}": v for k, v in read_checkpoint(str(run / "last.pt"))[1].items()}
    tensors.update({f"best/{k}": v for k, v in read_checkpoint(str(run / "best.pt"))[1].items()})
    tensors.update({f"resume/{k}": v for k, v in torch.load(run / "resume.pt")["model"].items()})
    return tensors


def assert_same_tensors(first: Path, second: Path) -> None:
    a, b = trained_tensors(first), trained_tensors(second)
    assert set(a) == set(b) and any(k.endswith("lora_B") for k in a)
    differ = [key for key in a if not torch.equal(a[key], b[key])]
    assert not differ, differ


def test_ctrl_c_then_resume_equals_an_uninterrupted_run(mini, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    overrides = ("epochs=2", "model.lora_dropout=0.2", "model.decoder.dropout=0.1")  # randomness to repeat
    assert main(run_args("toy_lora.yaml", mini, tmp_path / "straight", cache, *overrides)) == 0

    calls = {"n": 0}
    real_call = training.CrossEntropy.__call__

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # epoch 2, second batch: Ctrl-C in the middle of a step
            os.kill(os.getpid(), signal.SIGINT)
        return real_call(self, *args, **kwargs)
    monkeypatch.setattr(training.CrossEntropy, "__call__", interrupted)
    out = tmp_path / "stopped"
    assert main(run_args("toy_lora.yaml", mini, out, cache, *overrides)) == 130  # 128 + SIGINT, as a shell says
    assert "continue with --resume" in capsys.readouterr().out
    state = torch.load(out / "resume.pt")  # stopped after the step it was in
    assert (state["progress"]["epoch"], state["progress"]["batches_done"], state["progress"]["step"]) == (1, 2, 5)
    assert json.loads((out / "summary.json").read_text())["finished_at"] is None
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C is Python's again

    monkeypatch.setattr(training.CrossEntropy, "__call__", real_call)
    assert main(["--resume", "--out", str(out)]) == 0
    assert_same_tensors(tmp_path / "straight", out)
    summary = json.loads((out / "summary.json").read_text())
    assert [e["step"] for e in summary["epochs"]] == [3, 6] and summary["finished_at"]
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()
             if json.loads(line)["type"] == "train"]
    assert steps == list(range(1, 7))


def test_uncached_training_reads_images_and_validates_every_n_steps(mini, tmp_path):
    out = tmp_path / "run"
    assert main(run_args("toy_adapter.yaml", mini, out, tmp_path / "cache", "cache_features=false",
                         "num_workers=0", "val_every=2", "epoch_items=captions", "train_vocab=full",
                         "label_smoothing=0.1") + ["--max-steps", "5"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [e["step"] for e in summary["epochs"]] == [2, 4, 5]  # every 2 steps, and where training stopped
    assert not (tmp_path / "cache").exists()


# ---- slow: several processes, real sizes, the toy world ----------------------------------------------------------

@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(toy_world_small, tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "p2_train.py"), "--device", "cpu", "--max-steps", "4",
               *run_args("toy_adapter.yaml", toy_world_small, out, tmp_path / "cache", "val_images=20")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished_at"] and [e["step"] for e in summary["epochs"]] == [4]
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "train"] == [1, 2, 3, 4]  # one writer: rank 0

    scst = tmp_path / "ddp_scst"  # the self-critical stage over it, under torchrun too
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "p2_train.py"), "--device", "cpu", "--max-steps", "2", "--init", str(out),
               "--config", str(CONFIGS / "toy_scst.yaml"), "--out", str(scst), "--set", "scst.max_length=10",
               "cpu_threads=1"]  # two ranks on two cores: the config's 2 threads each would spin-wait for a core
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((scst / "summary.json").read_text())
    assert summary["stage"] == "scst" and [e["step"] for e in summary["epochs"]] == [2]
    assert "reward" in summary["epochs"][0]


def stop_in_second_epoch(command, log: Path, stop: int) -> subprocess.CompletedProcess:
    """Runs `command`, sends signal `stop` once the run logs a step of its 2nd epoch, and waits for it to end."""
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and process.poll() is None:
        lines = log.read_text().splitlines() if log.is_file() else []
        if any(json.loads(line).get("epoch") == 2 for line in lines if line.strip()):
            process.send_signal(stop)
            break
        time.sleep(0.05)
    output = process.communicate(timeout=600)[0]
    return subprocess.CompletedProcess(command, process.returncode, output)


@pytest.mark.slow
@pytest.mark.parametrize("stop, status", [(signal.SIGKILL, -signal.SIGKILL), (signal.SIGINT, 130)])
def test_a_run_killed_or_interrupted_mid_epoch_resumes_to_the_same_tensors(toy_world_small, tmp_path, stop, status):
    """p2_train.py in its own process, stopped in its 2nd epoch by SIGKILL (resume goes back to the last save) or by
    Ctrl-C (it saves at the next step), then resumed: the same tensors, bit for bit, as the run never stopped."""
    def command(out):
        return [sys.executable, str(ROOT / "p2_train.py"), "--device", "cpu",
                *run_args("toy_lora.yaml", toy_world_small, out, tmp_path / "cache", "epochs=2", "batch_size=8",
                          "val_images=20", "cpu_threads=1", "model.lora_dropout=0.2", "model.decoder.dropout=0.1")]
    straight = subprocess.run(command(tmp_path / "straight"), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert straight.returncode == 0, straight.stdout[-2000:] + straight.stderr[-2000:]
    out = tmp_path / "stopped"
    stopped = stop_in_second_epoch(command(out), out / "log.jsonl", stop)
    assert stopped.returncode == status, stopped.stdout[-3000:]
    progress = torch.load(out / "resume.pt")["progress"]
    assert progress["epoch"] == 1 and (progress["batches_done"] > 0) == (stop == signal.SIGINT)
    resumed = subprocess.run([sys.executable, str(ROOT / "p2_train.py"), "--device", "cpu", "--resume", "--out",
                              str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert_same_tensors(tmp_path / "straight", out)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_real_recipes_fit_the_budget_at_real_size(method, tmp_path):
    """ViT-L/14 + GPT-2 small with random weights, built as the recipe says; the count read back from the file."""
    path = CONFIGS / f"{method}.yaml"
    config = load_config(str(path))
    encoder = load_image_encoder(config.model.encoder, pretrained=False)
    model = CaptionModel(config.model, encoder, Decoder(GPTConfig(dropout=config.model.decoder.dropout)))
    checkpoint = str(tmp_path / "model.pt")
    save_trainable(model, checkpoint)
    expected_training, expected_saved = stated_trainable_counts(path)
    assert count_trainable(model) == expected_training < MAX_TRAINABLE
    assert count_checkpoint_params(checkpoint) == expected_saved < MAX_TRAINABLE
    assert set(read_checkpoint(checkpoint)[1]) == set(trainable_state_dict(model))


@pytest.fixture(scope="session")
def toy_baseline(toy_world):
    return best_fixed_caption(str(toy_world))


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_toy_config_beats_the_image_blind_baseline(method, toy_world, toy_baseline, toy_run):
    """The README's demo run: each toy config through the CLI, as demo.sh runs it, then P3's grounding
    score of its checkpoint (one cross-attention layer in the toy configs)."""
    started = time.time()
    out = toy_run(method)
    summary = json.loads((out / "summary.json").read_text())
    best = summary["best"]
    print(f"\ntoy {method}: {summary['checkpoint_params']:,} parameters, {(time.time() - started) / 60:.1f} min, "
          f"CIDEr {best['CIDEr']:.3f} CLIPScore {best['CLIPScore']:.3f}; baseline CIDEr {toy_baseline['CIDEr']:.3f} "
          f"CLIPScore {toy_baseline['CLIPScore']:.3f}; curve {[(e['CIDEr'], e['train_loss']) for e in summary['epochs']]}")
    assert best["CIDEr"] >= 2 * toy_baseline["CIDEr"]
    assert best["CLIPScore"] > toy_baseline["CLIPScore"]
    grounding = subprocess.run([sys.executable, str(ROOT / "p3_attention.py"), "grounding", str(toy_world),
                                "--checkpoint", str(out / "best.pt"), "--out-dir", str(out / "grounding")],
                               cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert grounding.returncode == 0, grounding.stderr[-3000:]
    ratio = json.loads((out / "grounding" / "grounding.json").read_text())["table"][0]["ratio"]
    print(f"toy {method}: P3 grounding {ratio:.2f}x the box-area baseline")
    assert ratio >= 2.0  # the default layer's attention mass in the named object's box, vs uniform attention
    assert summary["checkpoint_params"] == stated_trainable_counts(CONFIGS / f"toy_{method}.yaml")[1]
    assert math.isclose(summary["best"]["CIDEr"], max(e["CIDEr"] for e in summary["epochs"]))
