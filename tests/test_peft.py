"""peft.py: adapters and LoRA start as the identity, prefixes collapse exactly, loralib's merge on eval stays correct."""
import loralib as lora
import pytest
import torch

from decoder import Decoder, GPTConfig
from hw3.p2.peft import Adapter, PrefixTuning, add_adapters, add_lora

CONFIG = GPTConfig(n_layer=2, n_head=4, n_embd=32, vocab_size=100, block_size=64)


def plain_decoder(seed=0):
    torch.manual_seed(seed)
    return Decoder(CONFIG).eval()


def randomise_new_parameters(decoder, names=("lora_", "adapter")):
    """Stands in for training: gives the new (zero-initialised) tensors non-zero values."""
    with torch.no_grad():
        for name, param in decoder.named_parameters():
            if any(part in name for part in names):
                param.copy_(torch.randn_like(param) * 0.1)


def logits(decoder, ids, **kwargs):
    with torch.no_grad():
        return decoder(ids, **kwargs)[0]


IDS = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(1))


def test_adapter_starts_as_identity_and_learns():
    decoder = plain_decoder()
    before = logits(decoder, IDS)
    add_adapters(decoder, bottleneck=8, placement=("mlp",))
    assert decoder.transformer.h[0].attn_adapter is None and decoder.transformer.h[1].mlp_adapter is not None
    assert torch.equal(logits(decoder, IDS), before)
    randomise_new_parameters(decoder)
    assert not torch.allclose(logits(decoder, IDS), before)
    with pytest.raises(ValueError, match="placement"):
        add_adapters(decoder, 8, placement=("ffn",))
    y = torch.randn(3, 32)
    assert torch.equal(Adapter(32, 4)(y), y)


def test_prefix_collapse_is_exact():
    decoder = plain_decoder()
    prefix = PrefixTuning(CONFIG, length=3, hidden=16)
    kv = prefix()
    assert len(kv) == CONFIG.n_layer and kv[0][0].shape == (1, 4, 3, 8)
    with_mlp = logits(decoder, IDS, prefix_kv=prefix())
    assert not torch.allclose(with_mlp, logits(decoder, IDS))
    saved = prefix.collapsed().detach().clone()
    prefix.collapse()
    assert not prefix.reparameterised and [n for n, _ in prefix.named_parameters()] == ["prefixes"]
    assert torch.equal(prefix.prefixes, saved)
    assert torch.allclose(logits(decoder, IDS, prefix_kv=prefix()), with_mlp, atol=1e-6)


def test_lora_replaces_projections_in_place():
    decoder = plain_decoder()
    before = logits(decoder, IDS)
    add_lora(decoder, rank=2, alpha=4, targets=("attn.c_attn", "mlp.c_fc"), qkv="qv")
    block = decoder.transformer.h[0]
    assert isinstance(block.attn.c_attn, lora.MergedLinear) and block.attn.c_attn.enable_lora == [True, False, True]
    assert isinstance(block.mlp.c_fc, lora.Linear) and type(block.mlp.c_proj) is torch.nn.Linear
    assert torch.allclose(logits(decoder, IDS), before, atol=1e-6)  # B = 0, in eval mode
    decoder.train()
    assert torch.allclose(logits(decoder, IDS), before, atol=1e-6)  # and in train mode
    with pytest.raises(ValueError, match="targets"):
        add_lora(decoder, 2, 4, targets=("attn.q",))


def test_lora_never_changes_the_frozen_weight_and_loads_in_eval_mode():
    decoder = plain_decoder()
    add_lora(decoder, rank=2, alpha=4, targets=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    frozen = {k: v.clone() for k, v in decoder.state_dict().items() if "lora_" not in k}
    decoder.train()
    randomise_new_parameters(decoder)
    trained = {k: v.clone() for k, v in decoder.state_dict().items() if "lora_" in k}
    train_logits = logits(decoder, IDS)  # train mode, dropout 0
    for _ in range(3):  # eval/train switches leave every frozen weight bit for bit as it was (no merging)
        decoder.eval()
        assert torch.allclose(logits(decoder, IDS), train_logits, atol=1e-6)
        decoder.train()
    assert not decoder.transformer.h[0].attn.c_attn.merged
    assert all(torch.equal(decoder.state_dict()[k], v) for k, v in frozen.items())
    fresh = plain_decoder()  # loading trained LoRA tensors into a model in eval mode
    add_lora(fresh, rank=2, alpha=4, targets=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    fresh.eval()
    fresh.load_state_dict(trained, strict=False)
    assert torch.allclose(logits(fresh, IDS), train_logits, atol=1e-6)
