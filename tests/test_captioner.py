"""captioner.py + image_encoder.py: encoders, cross-attention, freezing, decoding API, parameter budget, checkpoints."""
import dataclasses
import hashlib

import clip
import pytest
import torch
from clip.model import CLIP
from PIL import Image

from decoder import Decoder, GPTConfig, course_state_dict, select_batch
from hw3.p2.checkpoint import (CheckpointError, count_checkpoint_params, load_captioner, load_trainable,
                               read_checkpoint, save_trainable, tensors_sha256)
from hw3.p2.encoder import clip_vit_tokens, load_image_encoder
from hw3.p2.model import (CaptionConfig, CaptionModel, build_caption_model, load_decoder, parameter_table,
                          trainable_state_dict)

TINY_GPT = GPTConfig(n_layer=3, n_head=4, n_embd=32, vocab_size=100, block_size=64)
RECIPES = {  # tiny versions of each PEFT method, cross-attention in a subset of the blocks
    "adapter": dict(peft=["adapter"], adapter_size=8),
    "prefix": dict(peft=["prefix"], prefix_length=3, prefix_hidden=16),
    "lora": dict(peft=["lora"], lora_rank=2, lora_targets=["attn.c_attn", "mlp.c_fc"]),
    "all": dict(peft=["adapter", "prefix", "lora"], adapter_size=8, prefix_length=2, lora_rank=2),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny CLIP state_dict (OpenAI layout) and a tiny decoder_model.bin (course format)."""
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    tiny_clip = CLIP(32, 32, 1, 64, 8, 77, 49408, 64, 1, 1)  # ViT: 32 px, patch 8 -> 4x4 grid, width 64
    torch.save(tiny_clip.state_dict(), str(folder / "clip.pt"))
    torch.save(course_state_dict(Decoder(TINY_GPT)), str(folder / "decoder_model.bin"))
    return str(folder / "clip.pt"), str(folder / "decoder_model.bin")


def tiny_config(clip_path, recipe="adapter", **overrides):
    values = dict(encoder=clip_path, decoder=TINY_GPT, context_width=48, cross_attn_layers=[1, 2],
                  cross_attn_width=32, cross_attn_heads=4, **RECIPES[recipe])
    values.update(overrides)
    return CaptionConfig(**values)


def randomise_trainable(model, seed=0):
    """Stands in for training: every trainable tensor gets non-zero random values."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn_like(param) * 0.05)


IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
IDS = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))


def test_clip_tokens_match_clips_own_forward_and_metadata(files):
    encoder = load_image_encoder(files[0])
    assert (encoder.grid, encoder.n_prefix_tokens, encoder.width, encoder.image_size) == ((4, 4), 1, 64, 32)
    tokens = encoder(IMAGES)
    assert tokens.shape == (2, 17, 64) and tokens.dtype == torch.float32 and not tokens.requires_grad
    visual = encoder.backbone
    with torch.no_grad():
        assert torch.allclose(tokens[:, 0] @ visual.proj, visual(IMAGES), atol=1e-5)
    assert encoder.preprocess(Image.new("L", (50, 40))).shape == (3, 32, 32)


def block_output_then_norm(blocks, index, norm, run):
    """Runs `run()` and returns norm(output of blocks[index]), caught by a forward hook."""
    caught = []
    handle = blocks[index].register_forward_hook(lambda module, inputs, output: caught.append(output))
    with torch.no_grad():
        run()
        handle.remove()
        return norm(caught[0])


def test_encoder_layer_takes_the_tokens_of_an_earlier_block(tmp_path):
    torch.manual_seed(0)
    three_blocks = CLIP(32, 32, 3, 64, 8, 77, 49408, 64, 1, 1)
    torch.save(three_blocks.state_dict(), str(tmp_path / "clip.pt"))
    last = load_image_encoder(str(tmp_path / "clip.pt"))
    visual = last.backbone
    for layer, index in [(-2, 1), (0, 0), (2, 2)]:
        encoder = load_image_encoder(str(tmp_path / "clip.pt"), layer=layer)
        expected = block_output_then_norm(visual.transformer.resblocks, index, visual.ln_post,
                                          lambda: visual(IMAGES)).permute(1, 0, 2)  # CLIP's blocks are [L, B, D]
        assert torch.allclose(encoder(IMAGES), expected, atol=1e-5), layer
    assert not torch.allclose(load_image_encoder(str(tmp_path / "clip.pt"), layer=-2)(IMAGES), last(IMAGES))
    with pytest.raises(ValueError, match="encoder layer 3 out of range for 3 blocks"):
        load_image_encoder(str(tmp_path / "clip.pt"), layer=3)

    with pytest.warns(UserWarning):
        vit = load_image_encoder("timm:vit_tiny_patch16_224", pretrained=False, layer=-3)
    images = torch.randn(1, 3, 224, 224)
    expected = block_output_then_norm(vit.backbone.blocks, 9, vit.backbone.norm,
                                      lambda: vit.backbone.forward_features(images))
    assert torch.allclose(vit(images), expected, atol=1e-5)


def test_clip_names_load_through_clip_load(monkeypatch):
    """A pretrained OpenAI name goes through `clip.load` (mocked here: no downloads), not a file lookup."""
    built = CLIP(32, 32, 1, 64, 8, 77, 49408, 64, 1, 1)
    monkeypatch.setattr(clip, "load", lambda name, device="cpu", jit=False: (built, None))
    encoder = load_image_encoder("ViT-B/32")
    assert encoder.backbone is built.visual


def test_timm_encoder_tokens_and_metadata():
    with pytest.warns(UserWarning, match="no pretrained tag"):
        encoder = load_image_encoder("timm:vit_tiny_patch16_224", pretrained=False)
    assert (encoder.grid, encoder.n_prefix_tokens, encoder.width, encoder.image_size) == ((14, 14), 1, 192, 224)
    assert encoder(torch.randn(1, 3, 224, 224)).shape == (1, 197, 192)
    assert encoder.preprocess(Image.new("RGB", (300, 250))).shape == (3, 224, 224)
    with pytest.raises(ValueError, match="unknown image encoder"):
        load_image_encoder("ViT-Q")


@pytest.mark.parametrize("recipe", ["adapter", "lora"])
def test_new_model_computes_the_plain_language_model(files, recipe):
    model = build_caption_model(tiny_config(files[0], recipe), files[1]).eval()
    plain = load_decoder(files[1], n_head=TINY_GPT.n_head).eval()
    with torch.no_grad():
        assert torch.allclose(model(IDS, model.encode_images(IMAGES)), plain(IDS)[0], atol=1e-6)


def test_only_new_modules_train_and_get_gradients(files):
    model = build_caption_model(tiny_config(files[0], "all"), files[1]).train()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert not any(name.startswith("encoder.") for name in trainable)
    assert model.decoder.lm_head.weight is model.decoder.transformer.wte.weight
    assert not model.decoder.transformer.wte.weight.requires_grad and not model.decoder.lm_head.weight.requires_grad
    assert all(any(part in name for part in ("cross_attn", "adapter", "lora_", "prefix", "image_"))
               for name in trainable)
    assert model.decoder.transformer.h[0].cross_attn is None and model.decoder.transformer.h[1].cross_attn is not None
    assert not model.encoder.training  # the frozen encoder stays in eval mode
    model(IDS, model.encode_images(IMAGES)).sum().backward()
    assert model.decoder.transformer.h[2].cross_attn.out_proj.weight.grad.abs().sum() > 0
    assert model.prefix.prefixes.grad.abs().sum() > 0
    assert "cross_attn.q_proj" in parameter_table(model)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_cached_decoding_with_precomputed_image_context(files, recipe):
    model = build_caption_model(tiny_config(files[0], recipe), files[1])
    randomise_trainable(model)
    model.eval()
    tokens = model.encode_images(IMAGES)
    with torch.no_grad():
        full = model(IDS, tokens)
        context = model.image_context(tokens)  # once per image
        assert context[0] is None and context[1][0].shape == (2, 4, 17, 8)
        logits, past = model.decode_step(IDS[:, :3], context)
        steps = [logits]
        for t in range(3, IDS.shape[1]):
            logits, past = model.decode_step(IDS[:, t:t + 1], context, past)
            steps.append(logits)
        assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
        beams = torch.tensor([1, 1, 0])  # beam search: repeat/reorder the image context and the cache
        logits, _ = model.decode_step(IDS[beams, -1:], select_batch(context, beams), select_batch(past[:], beams))
        assert torch.allclose(logits[:, -1], model(torch.cat([IDS[beams], IDS[beams, -1:]], 1), tokens[beams])[:, -1],
                              atol=1e-5)


def test_attention_maps_are_recorded(files):
    model = build_caption_model(tiny_config(files[0], "adapter"), files[1]).eval()
    tokens = model.encode_images(IMAGES)
    with torch.no_grad():
        model(IDS, tokens)
        assert model.attention_maps() == {}
        model.record_attention(True)
        model(IDS, tokens)
    maps = model.attention_maps()
    assert sorted(maps) == [1, 2] and maps[2].shape == (2, 4, 7, 17)
    assert torch.allclose(maps[2].sum(-1), torch.ones(2, 4, 7))


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_checkpoint_round_trip_holds_only_trainable_tensors(files, tmp_path, recipe):
    model = build_caption_model(tiny_config(files[0], recipe), files[1])
    randomise_trainable(model)
    model.eval()  # saving in eval mode: LoRA weights are merged, only lora_A/B are saved
    path = str(tmp_path / "sub" / "model.pt")
    count = save_trainable(model, path)
    saved = trainable_state_dict(model)
    assert count == count_checkpoint_params(path) == sum(t.numel() for t in saved.values())
    raw = torch.load(path, map_location="cpu")  # the course's format: a plain dict of tensors, nothing else
    assert type(raw) is dict and set(raw) == set(saved) and all(type(t) is torch.Tensor for t in raw.values())
    assert (tmp_path / "sub" / "model.config.json").is_file()
    if recipe in ("prefix", "all"):
        assert "prefix.prefixes" in saved and not any("prefix.mlp" in key for key in saved)
    tokens = model.encode_images(IMAGES)
    loaded = load_captioner(path, files[1])
    with torch.no_grad():
        assert torch.allclose(loaded(IDS, tokens), model(IDS, tokens), atol=1e-5)
    assert loaded.config == model.config
    if recipe == "prefix":  # a resumable file keeps the prefix MLP
        save_trainable(model, path, collapse_prefix=False)
        resumed = build_caption_model(model.config, files[1])
        load_trainable(resumed, read_checkpoint(path)[1])
        assert resumed.prefix.reparameterised
        with torch.no_grad():
            assert torch.allclose(resumed.eval()(IDS, tokens), model(IDS, tokens), atol=1e-5)


def test_the_tensors_digest_ignores_the_config_and_sees_every_value(files, tmp_path):
    """numbers.json's checkpoint digest: the same weights with the encoder at another path digest alike."""
    model = build_caption_model(tiny_config(files[0], "adapter"), files[1]).eval()
    randomise_trainable(model)
    save_trainable(model, str(tmp_path / "a.pt"))
    model.config = dataclasses.replace(model.config, encoder="/elsewhere/clip.pt")
    save_trainable(model, str(tmp_path / "b.pt"))
    assert (tmp_path / "a.config.json").read_bytes() != (tmp_path / "b.config.json").read_bytes()
    assert tensors_sha256(str(tmp_path / "a.pt")) == tensors_sha256(str(tmp_path / "b.pt"))
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).view(-1)[0] += 1e-3
    save_trainable(model, str(tmp_path / "c.pt"))
    assert tensors_sha256(str(tmp_path / "c.pt")) != tensors_sha256(str(tmp_path / "a.pt"))


def test_the_tensors_digest_is_the_committed_definition(tmp_path):
    """sorted names, then per tensor "name:dtype:shape:" and its raw bytes: the digests in demo_numbers.json."""
    tensors = {"b": torch.arange(3, dtype=torch.float32), "a": torch.ones(2, 2, dtype=torch.float16)}
    torch.save(tensors, str(tmp_path / "t.pt"))
    expected = hashlib.sha256(b"a:torch.float16:[2, 2]:" + tensors["a"].numpy().tobytes()
                              + b"b:torch.float32:[3]:" + tensors["b"].numpy().tobytes()).hexdigest()
    assert tensors_sha256(str(tmp_path / "t.pt")) == expected


def test_bad_checkpoints_fail_naming_the_keys(files, tmp_path):
    model = build_caption_model(tiny_config(files[0], "adapter"), files[1])
    path = str(tmp_path / "model.pt")
    save_trainable(model, path)
    tensors = torch.load(path)

    def rewrite(changed):
        torch.save(changed, path)

    rewrite({k: v for k, v in tensors.items() if k != "image_ln.bias"})
    with pytest.raises(ValueError, match=r"lacks trained tensors: \['image_ln.bias'\]"):
        load_captioner(path, files[1])
    rewrite(dict(tensors, **{"decoder.transformer.h.1.ln_2.weight_extra": torch.zeros(3)}))
    with pytest.raises(ValueError, match="unknown tensors.*ln_2.weight_extra"):
        load_captioner(path, files[1])
    rewrite(dict(tensors, **{"image_ln.bias": torch.zeros(5)}))
    with pytest.raises(ValueError, match="wrong shape.*image_ln.bias"):
        load_captioner(path, files[1])
    rewrite(dict(tensors, **{"decoder.transformer.h.1.ln_2.weight_extra": torch.zeros(3),
                             "image_ln.bias": torch.zeros(5)}))
    with pytest.raises(ValueError, match="(?s)unknown tensors.*weight_extra.*wrong shape.*image_ln.bias"):
        load_captioner(path, files[1])  # every problem at once
    rewrite(tensors)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model.pt is not a captioner checkpoint .*PyTorch cannot load it"):
        load_captioner(path, files[1])


def test_config_json_round_trip_and_validation(files):
    config = tiny_config(files[0], "all")
    assert CaptionConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="unknown PEFT kinds"):
        CaptionConfig.from_dict(dict(dataclasses.asdict(config), peft=["ia3"]))
    with pytest.raises(ValueError, match="unknown CaptionConfig fields"):
        CaptionConfig.from_dict({"encoder": "ViT-B/32", "lora_rnak": 4})


# ---- real size: ViT-L/14 (width 1024, 257 tokens) + GPT-2 small, random weights -----------------------------------
# (The real recipes' counts under the budget, built from configs/{adapter,prefix,lora}.yaml: tests/test_p2_train.py.)
@pytest.fixture(scope="module")
def vit_l14():
    return load_image_encoder("ViT-L/14", pretrained=False)


@pytest.mark.slow
def test_real_size_encoders(vit_l14):
    assert (vit_l14.grid, vit_l14.n_prefix_tokens, vit_l14.width, vit_l14.n_tokens) == ((16, 16), 1, 1024, 257)
    assert vit_l14(torch.randn(1, 3, 224, 224)).shape == (1, 257, 1024)
    timm_l14 = load_image_encoder("timm:vit_large_patch14_clip_quickgelu_224.openai", pretrained=False)
    assert (timm_l14.grid, timm_l14.n_prefix_tokens, timm_l14.width, timm_l14.image_size) == ((16, 16), 1, 1024, 224)
    assert timm_l14.preprocess.transforms[1].transforms[0].size == 224  # CLIP's resize: crop_pct 1.0
    with pytest.warns(UserWarning, match="QuickGELU"):
        load_image_encoder("timm:vit_base_patch32_clip_224.openai", pretrained=False)
    assert load_image_encoder("ViT-L/14@336px", pretrained=False).n_tokens == 577


@pytest.mark.slow
def test_real_size_over_budget_fails(vit_l14):
    with pytest.raises(ValueError, match="limit is < 35,000,000"):
        CaptionModel(CaptionConfig(encoder="ViT-L/14", cross_attn_width=1024, cross_attn_heads=16, peft=["adapter"]),
                     vit_l14, Decoder(GPTConfig()))
