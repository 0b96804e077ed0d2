"""decoder.py against Hugging Face GPT-2 (a test oracle only) with the same weights, saved as fake decoder_model.bin."""
import pytest
import torch

from decoder import Decoder, GPTConfig, course_state_dict, load_course_weights, select_batch
from hw3.p2.model import load_decoder

transformers = pytest.importorskip("transformers")

SMALL = dict(n_layer=2, n_head=4, n_embd=32, vocab_size=100, block_size=64)
GPT2_SMALL = dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024)


def hf_gpt2(sizes, seed=0):
    """A randomly initialised HF GPT2LMHeadModel (eval, fp32) and its transformer's state_dict in the course's
    format, mask buffers included as the course's older transformers saved them."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=sizes["n_layer"], n_head=sizes["n_head"], n_embd=sizes["n_embd"],
                                     vocab_size=sizes["vocab_size"], n_positions=sizes["block_size"])
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # HF zero-inits biases and sets LayerNorms to 1/0: randomise so every tensor matters
        for name, param in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                param.add_(torch.randn_like(param) * 0.1)
    state_dict = model.transformer.state_dict()
    for i in range(sizes["n_layer"]):
        state_dict.setdefault(f"h.{i}.attn.bias", torch.ones(1, 1, sizes["block_size"], sizes["block_size"]).tril())
        state_dict.setdefault(f"h.{i}.attn.masked_bias", torch.tensor(-1e4))
    return model, state_dict


def right_padded_batch(vocab_size, lengths, seed=1):
    torch.manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(0, vocab_size, (len(lengths), T))
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
        ids[row, length:] = vocab_size - 1  # the pad token (50256 at real size)
    return ids, mask


@pytest.mark.parametrize("sizes", [SMALL, pytest.param(GPT2_SMALL, marks=pytest.mark.slow)], ids=["small", "gpt2"])
def test_logits_equal_hf_on_padded_batch(tmp_path, sizes):
    hf, state_dict = hf_gpt2(sizes)
    path = str(tmp_path / "decoder_model.bin")
    torch.save(state_dict, path)
    decoder = load_decoder(path, n_head=sizes["n_head"]).eval()  # n_head is not in the file
    assert decoder.config == GPTConfig(**sizes)
    ids, mask = right_padded_batch(sizes["vocab_size"], [7, 3, 5])
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits
        logits, _ = decoder(ids, attention_mask=mask)
    real = mask.bool()
    assert (logits[real] - expected[real]).abs().max().item() < 1e-4


def test_load_report_and_tied_head(tmp_path):
    _, state_dict = hf_gpt2(SMALL)
    state_dict["extra.weight"] = torch.zeros(3)
    decoder = Decoder(GPTConfig(**SMALL))
    report = load_course_weights(decoder, state_dict)
    assert len(report.loaded) == 2 + 12 * SMALL["n_layer"] + 2
    assert sorted(report.ignored) == sorted([f"h.{i}.attn.{b}" for i in range(2) for b in ("bias", "masked_bias")])
    assert report.unexpected == ["extra.weight"]
    assert torch.equal(decoder.lm_head.weight, state_dict["wte.weight"])
    assert torch.equal(decoder.transformer.h[1].mlp.c_fc.weight, state_dict["h.1.mlp.c_fc.weight"].t())


def test_missing_key_is_named_and_shape_mismatch_raises():
    _, state_dict = hf_gpt2(SMALL)
    del state_dict["h.1.ln_2.bias"]
    with pytest.raises(KeyError, match=r"h\.1\.ln_2\.bias"):
        load_course_weights(Decoder(GPTConfig(**SMALL)), state_dict)
    _, state_dict = hf_gpt2(SMALL)
    state_dict["h.0.mlp.c_proj.bias"] = torch.zeros(5)
    with pytest.raises(ValueError, match=r"h\.0\.mlp\.c_proj\.bias"):
        load_course_weights(Decoder(GPTConfig(**SMALL)), state_dict)


def test_incremental_decoding_equals_full_forward():
    torch.manual_seed(0)
    decoder = Decoder(GPTConfig(**SMALL)).eval()
    ids, mask = right_padded_batch(SMALL["vocab_size"], [9, 9, 9])
    with torch.no_grad():
        full, _ = decoder(ids)
        logits, past = decoder(ids[:, :4])
        steps = [logits]
        for t in range(4, 9):
            logits, past = decoder(ids[:, t:t + 1], past=past)
            steps.append(logits)
    assert (torch.cat(steps, dim=1) - full).abs().max().item() < 1e-5
    assert past[0][0].shape == (3, SMALL["n_head"], 9, SMALL["n_embd"] // SMALL["n_head"])


def test_left_padded_incremental_decoding_matches_unpadded_rows():
    """Batched generation with left padding: each row's logits equal that row decoded alone."""
    torch.manual_seed(0)
    decoder = Decoder(GPTConfig(**SMALL)).eval()
    rows = [torch.randint(0, 99, (n,)) for n in (5, 2)]
    continuation = torch.randint(0, 99, (2, 3))
    ids = torch.full((2, 5), 99)
    mask = torch.zeros(2, 5, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, 5 - len(row):], mask[r, 5 - len(row):] = row, 1
    with torch.no_grad():
        logits, past = decoder(ids, attention_mask=mask)
        last = [logits[:, -1]]
        for t in range(3):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
            logits, past = decoder(continuation[:, t:t + 1], past=past, attention_mask=mask)
            last.append(logits[:, -1])
        for r, row in enumerate(rows):
            alone, _ = decoder(torch.cat([row, continuation[r]])[None])
            got = torch.stack([step[r] for step in last])
            assert (got - alone[0, len(row) - 1:]).abs().max().item() < 1e-5


def test_beam_reorder_and_prefix_slot():
    torch.manual_seed(0)
    decoder = Decoder(GPTConfig(**SMALL)).eval()
    ids = torch.randint(0, 99, (2, 4))
    with torch.no_grad():
        _, past = decoder(ids)
        index = torch.tensor([1, 1, 0])
        reordered, _ = decoder(ids[index, -1:] * 0, past=select_batch(past, index))
        direct, _ = decoder(torch.cat([ids[index], ids[index, -1:] * 0], dim=1))
        assert (reordered[:, -1] - direct[:, -1]).abs().max().item() < 1e-5
        # prefixes: attended by every query, never stored in the cache
        H, d = SMALL["n_head"], SMALL["n_embd"] // SMALL["n_head"]
        prefix = [(torch.zeros(1, H, 3, d), torch.randn(1, H, 3, d)) for _ in range(SMALL["n_layer"])]
        plain, _ = decoder(ids)
        with_prefix, present = decoder(ids, prefix_kv=prefix)
        assert not torch.allclose(plain, with_prefix)  # the prefix is attended to
        assert present[0][0].shape[2] == 4  # and not part of the cache


def test_course_state_dict_round_trip(tmp_path):
    hf, state_dict = hf_gpt2(SMALL)
    decoder = Decoder(GPTConfig(**SMALL))
    load_course_weights(decoder, state_dict)
    saved = course_state_dict(decoder, mask_buffers=True)
    assert set(saved) == set(state_dict)
    for key, tensor in saved.items():
        if not key.endswith(("attn.bias", "masked_bias")):
            assert torch.equal(tensor, state_dict[key]), key
    path = str(tmp_path / "decoder_model.bin")
    torch.save(course_state_dict(decoder), path)
    again = load_decoder(path, n_head=SMALL["n_head"]).eval()
    ids = torch.randint(0, 99, (2, 6))
    with torch.no_grad():
        assert torch.equal(again(ids)[0], decoder.eval()(ids)[0])
        assert (again(ids)[0] - hf(ids).logits).abs().max().item() < 1e-4
