"""Self-critical training (hw3/p2/scst.py): the reward is the scorer's CIDEr-D with the training references' document
frequencies, the baseline, the beam candidates, the loss, and an SCST stage through p2_train.py --init on the mini
world. The toy-world gain is the slow test at the end."""
import json
import os
import subprocess
import sys
from pathlib import Path

import clip
import pytest
import torch
from clip.model import CLIP

from caption_fixtures import make_mini_world
from hw3.p2.config import SCSTConfig, load_config
from hw3.p2.data import CaptionBatch
from hw3.common.clip_models import encode_text_trimmed
from hw3.p2.generation import DecodeConfig, beam_candidates, generate
from hw3.p2.metrics import cider_d_tokenized, score_captions, simple_tokenize
from hw3.p2.scst import END_WORD, CiderReward, SelfCritical, baseline_rewards, dangling_share
from p2_train import main
from tokenizer import EOT_ID, BPETokenizer

ROOT = Path(__file__).resolve().parent.parent
TOY_LORA, TOY_SCST = str(ROOT / "configs" / "toy_lora.yaml"), str(ROOT / "configs" / "toy_scst.yaml")

REFERENCES = [["A red circle on a noisy background.", "There is a red circle.", "a small red circle"],
              ["A blue square next to a green star.", "Blue square, green star."],
              ["Nothing but noise.", "An empty, noisy picture."]]
CANDIDATES = ["a red circle", "a blue square and a green star on a", "noise", "a red circle on a noisy background"]


def image_tokens(n, seed=0):
    return torch.randn(n, 17, 128, generator=torch.Generator().manual_seed(seed))


# ---- the reward ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("end_token", [False, True])
def test_reward_is_the_scorers_cider_d_with_the_training_document_frequencies(end_token):
    index = [0, 1, 2, 0]
    ours = CiderReward(REFERENCES, end_token=end_token)(CANDIDATES, index)
    refs = {i: simple_tokenize({"r": refs})["r"] for i, refs in enumerate(REFERENCES)}
    cands = simple_tokenize({"c": CANDIDATES})["c"]
    if end_token:
        refs = {i: [f"{r} {END_WORD}" for r in rs] for i, rs in refs.items()}
        cands = [f"{c} {END_WORD}" for c in cands]
    for candidate, i, reward in zip(cands, index, ours):
        # the metrics module's CIDEr-D over all three images: its idf is the training references' one
        others = {j: "x" for j in range(3) if j != i}
        expected = cider_d_tokenized({i: candidate, **others}, refs)[1][i]
        assert reward == pytest.approx(expected, abs=1e-9)
    assert ours[3] > ours[0] > 0  # more of the references' words, a better reward


def test_the_end_word_punishes_a_caption_cut_mid_phrase():
    plain, ended = CiderReward(REFERENCES, end_token=False), CiderReward(REFERENCES, end_token=True)
    whole, cut = "a blue square next to a green star", "a blue square next to a green star next to a"
    assert plain([whole], [1])[0] > plain([cut], [1])[0]
    margin = lambda reward: reward([whole], [1])[0] - reward([cut], [1])[0]  # noqa: E731
    assert margin(ended) > margin(plain)
    assert dangling_share({"x": cut, "y": whole, "z": "A star on the"}) == pytest.approx(2 / 3)


def test_baseline():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]], dtype=torch.float64)
    assert baseline_rewards(rewards).tolist() == [[2.5, 2.0, 1.5], [3.0, 3.0, 0.0]]
    advantage = rewards - baseline_rewards(rewards)
    assert advantage.sum(1).abs().max() < 1e-12  # the mean baseline is unbiased and centres each image's candidates


def test_scst_settings_are_checked():
    with pytest.raises(ValueError, match="samples"):
        SCSTConfig(samples=1)
    with pytest.raises(ValueError, match="clip_weight"):
        SCSTConfig(clip_weight=-1)
    with pytest.raises(ValueError, match="--init"):
        load_config(None, ["stage=scst"])


def test_trimmed_text_encoding_equals_clips_own_and_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = CLIP(32, 32, 1, 64, 8, 77, 49408, 64, 4, 2).eval()  # 2 text blocks, as a small stand-in for ViT-B/32's
    tokens = clip.tokenize(["a red circle", "there is a big blue square and a green star on a noisy background", ""])
    masks = [block.attn_mask for block in model.transformer.resblocks]
    with torch.no_grad():
        expected, trimmed = model.encode_text(tokens), encode_text_trimmed(model, tokens)
    assert torch.allclose(trimmed, expected, atol=1e-5), (trimmed - expected).abs().max()
    assert all(block.attn_mask is mask for block, mask in zip(model.transformer.resblocks, masks))
    trimmed_by_hand = encode_text_trimmed(model, tokens[:, :20])  # cut already: the same features
    assert torch.allclose(trimmed_by_hand, trimmed, atol=1e-6)


# ---- the candidates -----------------------------------------------------------------------------------------------

def test_an_output_vocabulary_searches_only_its_tokens(toy_model):
    words = torch.tensor(sorted(set(BPETokenizer().encode(" ".join(sum(REFERENCES, [])))) | {EOT_ID}))
    tokens = image_tokens(4)
    full = beam_candidates(toy_model, tokens, DecodeConfig(beam_size=3, max_length=12))
    toy_model.restrict_output(words)
    try:
        restricted = beam_candidates(toy_model, tokens, DecodeConfig(beam_size=3, max_length=12))
        with torch.no_grad():
            logits = toy_model(torch.tensor([[EOT_ID, words[0].item()]]), tokens[:1])
        assert logits.shape[-1] == len(words)
    finally:
        toy_model.output_vocabulary = None
    found = {t for per_image in restricted for ids in per_image for t in ids}
    assert found and found <= set(words.tolist())
    assert any(t not in set(words.tolist()) for per_image in full for ids in per_image for t in ids)


def test_beam_candidates_are_the_searchs_hypotheses_k_per_image(toy_model):
    tokens = image_tokens(3)
    objective = SelfCritical(SCSTConfig(samples=3), DecodeConfig(length_penalty=0.5), REFERENCES, BPETokenizer())
    rows = objective.candidates(toy_model, tokens)
    hypotheses = beam_candidates(toy_model, tokens, DecodeConfig(beam_size=3, length_penalty=0.5))
    assert len(rows) == 9 and all(0 < len(h) <= 3 for h in hypotheses)
    for image, found in enumerate(hypotheses):
        assert rows[3 * image:3 * image + len(found)] == found  # best first, as hw3_2.sh's search ranks them
        assert rows[3 * image + 3 - 1] in found
    assert rows[0] == generate(toy_model, tokens[:1], DecodeConfig(beam_size=3, length_penalty=0.5))[0]


# ---- the loss -----------------------------------------------------------------------------------------------------

def test_loss_raises_the_better_captions_probability(toy_model):
    """The whole objective runs and gives gradients; a few SGD steps on the policy loss of fixed captions raise the
    log-probability of those with a positive advantage, and by more than that of those with a negative one."""
    tokens = image_tokens(2)
    objective = SelfCritical(SCSTConfig(samples=4), DecodeConfig(max_length=30), REFERENCES[:2], BPETokenizer())
    batch = CaptionBatch(tokens, torch.zeros(2, 1), torch.zeros(2, 1), torch.tensor([0, 1]))
    trainable = [p for p in toy_model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in trainable]

    def log_probs(drawn):  # per caption: the sum of its tokens' log-probabilities, the end token included
        with torch.no_grad():
            return torch.stack([-objective.policy_loss(toy_model, tokens[i // 4:i // 4 + 1], [ids], [True],
                                                       torch.ones(1)) * (len(ids) + 1)
                                for i, ids in enumerate(drawn)])
    try:
        loss, stats = objective(toy_model, batch)
        assert 0 < stats["sample_ended"] <= 1 and stats["reward"] == stats["sample_cider"]  # no CLIPScore part
        loss.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)

        texts = ["a red circle on a noisy background", "nothing but noise", "there is a red circle", "an empty picture",
                 "a blue square next to a green star", "nothing but noise", "blue square, green star", "an empty picture"]
        drawn = [BPETokenizer().encode(text) for text in texts]  # fixed captions, each image's better ones first
        advantage = torch.tensor([1.0, -1.0] * 4)
        before = log_probs(drawn)
        optimizer = torch.optim.SGD(trainable, lr=0.05)
        for _ in range(5):
            optimizer.zero_grad()
            objective.policy_loss(toy_model, tokens.repeat_interleave(4, 0), drawn, [True] * 8, advantage).backward()
            optimizer.step()
        change = log_probs(drawn) - before
        assert change[advantage > 0].min() > 0 and change[advantage > 0].mean() > change[advantage < 0].mean() + 1, change
    finally:
        with torch.no_grad():
            for p, value in zip(trainable, saved):
                p.copy_(value)
                p.grad = None
        toy_model.eval()


# ---- the stage through p2_train.py --------------------------------------------------------------------------------

def test_scst_stage_through_the_cli(tmp_path, capsys):
    mini = make_mini_world(tmp_path / "mini")
    common = ["--set", f"cache_dir={tmp_path / 'cache'}", "cider_tokenizer=simple", "batch_size=4", "log_every=1",
              "model.encoder_layer=-1"]
    xe = tmp_path / "xe"
    assert main(["--config", TOY_LORA, "--toy-world", str(mini), "--out", str(xe), "--epochs", "1",
                 *common]) == 0
    scst = tmp_path / "scst"
    assert main(["--init", str(xe), "--config", TOY_SCST, "--out", str(scst), "--epochs", "2",
                 "--set", "scst.samples=3", "scst.max_length=8"]) == 0
    summary = json.loads((scst / "summary.json").read_text())
    assert summary["stage"] == "scst" and summary["init"] == str(xe / "best.pt")
    assert summary["method"] == "lora" and str(mini) in summary["data"]  # from the --init run's config
    assert [set(e) >= {"reward", "sample_cider", "sample_ended", "CIDEr"} for e in summary["epochs"]] == [True] * 2
    records = [json.loads(line) for line in (scst / "log.jsonl").read_text().splitlines()]
    assert all("reward" in r for r in records if r["type"] == "train")
    assert (scst / "curves.png").is_file() and (scst / "best.pt").is_file()
    # the same command again: a finished run of the same config, nothing to do
    assert main(["--init", str(xe), "--config", TOY_SCST, "--out", str(scst), "--epochs", "2",
                 "--set", "scst.samples=3", "scst.max_length=8"]) == 0
    assert "nothing to do" in capsys.readouterr().out

    # a cross-entropy run saved before the stage existed (no stage/init/scst fields) is still the same run, and so
    # is one saved with other (unused) scst values
    state = torch.load(str(xe / "resume.pt"))
    for key in ("stage", "init", "scst"):
        del state["config"][key]
    torch.save(state, str(xe / "resume.pt"))
    for overrides in ([], ["scst.samples=7"]):
        assert main(["--config", TOY_LORA, "--toy-world", str(mini), "--out", str(xe), "--epochs", "1", *common,
                     *overrides]) == 0
        assert "nothing to do" in capsys.readouterr().out
    with pytest.raises(ValueError, match="another config"):  # in the stage itself they count
        main(["--init", str(xe), "--config", TOY_SCST, "--out", str(scst), "--epochs", "2",
              "--set", "scst.samples=2", "scst.max_length=8"])


# ---- slow: the gain on the toy world ------------------------------------------------------------------------------

def hw3_2_scores(toy_world, run_dir):
    """hw3_2.sh's captions of the toy val images with the run's best checkpoint, scored as p2_evaluate.py does."""
    p2 = toy_world / "hw3_data" / "p2_data"
    out = run_dir / "hw3_2_val.json"
    command = ["bash", "hw3_2.sh", str(p2 / "images" / "val"), str(out), str(toy_world / "decoder_model.bin"),
               "--checkpoint", str(run_dir / "best.pt"), "--encoder", str(toy_world / "clip.pt")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900,
                            env=dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}"))  # python3
    assert result.returncode == 0, result.stderr[-3000:]
    predictions = json.loads(out.read_text())
    scores = score_captions(predictions, str(p2 / "val.json"), str(p2 / "images" / "val"),
                            clip_model=str(toy_world / "clip.pt"), progress=False)
    return scores, predictions


@pytest.mark.slow
def test_scst_raises_the_cider_of_the_toy_run_it_starts_from(toy_world, toy_run, tmp_path):
    """configs/toy_scst.yaml over the toy LoRA run, both judged through hw3_2.sh (default decoding) like the grader on
    the same val images: the stage's best checkpoint (picked among its own epochs, never the start) scores a higher
    CIDEr than the checkpoint it started from. No margin: a stage that learns nothing (lr 0: every epoch equals the
    start) or the wrong thing fails; the size of the gain, measured on two seeds and two methods, is
    bench/p2_scst_gains.py's (docs/training.md)."""
    xe = toy_run("lora")
    scst = tmp_path / "lora_scst"
    command = [sys.executable, str(ROOT / "p2_train.py"), "--init", str(xe), "--config", TOY_SCST, "--out", str(scst)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    before, before_captions = hw3_2_scores(toy_world, xe)
    after, after_captions = hw3_2_scores(toy_world, scst)
    print(f"\ntoy lora, hw3_2.sh: XE CIDEr {before['CIDEr']:.3f} CLIPScore {before['CLIPScore']:.3f}; SCST CIDEr "
          f"{after['CIDEr']:.3f} CLIPScore {after['CLIPScore']:.3f}; dangling ends "
          f"{dangling_share(before_captions):.1%} -> {dangling_share(after_captions):.1%}")
    assert after["CIDEr"] > before["CIDEr"]
    assert after["CLIPScore"] >= before["CLIPScore"]  # the reward mixes CLIPScore in (scst.clip_weight)
    assert dangling_share(after_captions) <= dangling_share(before_captions)
