"""The timm image encoders the candidate configs use, on the pinned timm (0.9.10), without any weights (docs/encoders.md):

- each configured name builds (random weights), with the activation its weights were trained with, the token layout
  and width the captioner is built for, the preprocessing of the weights' publisher, and the hub id and file the
  weights are published under. Fast tests build one block of each tower at its real width (the blocks are all
  alike); slow tests build the whole tower and count its parameters;
- the candidate configs: their encoder, PEFT kind and batch, and the trainable count in their header comment,
  counted on the captioner built on the real width with a random GPT-2 small;
- the timm path equals the OpenAI CLIP path on the same weights: the toy world's tiny CLIP converted by timm's own
  OpenAI-CLIP converter gives the same preprocessing, the same tokens (every layer) and the same training loss, and
  (slow) a trained toy captioner gives the same val captions through either;
- a pre-fetched encoder loads with the network unreachable: tiny random weights in the published format, saved in a
  temporary Hugging Face cache under the real hub id and file name.
"""
import dataclasses
import hashlib
import socket
from pathlib import Path

import huggingface_hub
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from clip.model import CLIP
from PIL import Image
from timm.layers.activations import GELUTanh, QuickGELU
from torchvision import transforms

from config_headers import stated_trainable_counts
from decoder import Decoder, GPTConfig
from hw3.common import download
from hw3.common.clip_models import CLIP_MEAN, CLIP_STD
from hw3.common.errors import UserError
from hw3.common.images import list_image_files, open_image
from hw3.p2.config import load_config
from hw3.p2.encoder import _timm_encoder, clip_vit_tokens, load_image_encoder
from hw3.p2.model import MAX_TRAINABLE, CaptionModel, count_trainable, load_decoder, trainable_state_dict
from hw3.p2.optim import adamw
from hw3.toy.world import ToyWorld
from tokenizer import IGNORE_INDEX, make_caption_batch

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
INCEPTION = (0.5, 0.5, 0.5)

# What each tower is, as verified against timm 0.9.10's source and open_clip's pretrained table (docs/encoders.md).
TOWERS = {
    "timm:vit_so400m_patch14_siglip_384.webli": dict(
        hub=("timm/ViT-SO400M-14-SigLIP-384", "open_clip_pytorch_model.bin"), raw_hub="timm/ViT-SO400M-14-SigLIP-384",
        act=GELUTanh, prefix=0, grid=(27, 27), width=1152, size=384, depth=27, heads=16, hidden=4304,
        mean=INCEPTION, std=INCEPTION, resize="squash", parameters=428_225_600),
    "timm:vit_huge_patch14_clip_quickgelu_378.dfn5b": dict(
        hub=("apple/DFN5B-CLIP-ViT-H-14-378", "open_clip_pytorch_model.bin"), raw_hub="apple/DFN5B-CLIP-ViT-H-14-378",
        act=QuickGELU, prefix=1, grid=(27, 27), width=1280, size=378, depth=32, heads=16, hidden=5120,
        mean=CLIP_MEAN, std=CLIP_STD, resize="squash", parameters=631_371_520),
    "timm:vit_large_patch14_clip_quickgelu_224.openai": dict(
        hub=("timm/vit_large_patch14_clip_224.openai", "pytorch_model.bin"),
        raw_hub="timm/vit_large_patch14_clip_quickgelu_224.openai",  # 0.9.10's auto-completed id: no such repo
        act=QuickGELU, prefix=1, grid=(16, 16), width=1024, size=224, depth=24, heads=16, hidden=4096,
        mean=CLIP_MEAN, std=CLIP_STD, resize="shortest", parameters=303_179_776),
    "timm:eva02_large_patch14_clip_336.merged2b": dict(
        hub=("timm/eva02_large_patch14_clip_336.merged2b_s6b_b61k", "open_clip_pytorch_model.bin"),
        raw_hub="timm/eva02_large_patch14_clip_336.merged2b_s6b_b61k",
        act=nn.SiLU, prefix=1, grid=(24, 24), width=1024, size=336, depth=24, heads=16, hidden=2730,
        mean=CLIP_MEAN, std=CLIP_STD, resize="shortest", parameters=303_645_632),
}
CANDIDATE_CONFIGS = {"siglip_adapter.yaml": "timm:vit_so400m_patch14_siglip_384.webli",
                     "dfn5b_adapter.yaml": "timm:vit_huge_patch14_clip_quickgelu_378.dfn5b"}


def one_block(name: str, **args):
    """The tower `name` with one block at its real width, random weights, built by hw3/p2/encoder.py."""
    return _timm_encoder(name, "cpu", pretrained=False, layer=-1, depth=1, **args)


def mlp_activation(block: nn.Module) -> nn.Module:
    return block.mlp.act  # timm's Mlp, and EVA's SwiGLU


def block_parameters(encoder) -> int:
    return sum(p.numel() for p in encoder.backbone.blocks[0].parameters())


# ---- each tower: architecture, activation, tokens, preprocessing, published weights --------------------------------

@pytest.mark.parametrize("name", TOWERS)
def test_tower_layout_activation_and_published_weights(name):
    tower = TOWERS[name]
    encoder = one_block(name)
    model = encoder.backbone
    assert type(mlp_activation(model.blocks[0])) is tower["act"], name  # the module the weights were trained with
    assert (encoder.n_prefix_tokens, encoder.grid, encoder.width, encoder.image_size) == \
        (tower["prefix"], tower["grid"], tower["width"], tower["size"])
    assert encoder.n_tokens == tower["prefix"] + tower["grid"][0] * tower["grid"][1]
    assert (model.blocks[0].attn.num_heads, model.blocks[0].mlp.fc2.in_features) == (tower["heads"], tower["hidden"])
    tokens = encoder(torch.randn(1, 3, tower["size"], tower["size"]))
    assert tokens.shape == (1, encoder.n_tokens, tower["width"]) and tokens.dtype == torch.float32

    # the published weights: timm's pretrained config, and what hw3_download.sh fetches
    assert model.pretrained_cfg["hf_hub_id"] == tower["raw_hub"]
    assert download.timm_weights_source(name[len("timm:"):]) == tower["hub"]
    notes = " ".join(model.pretrained_cfg.get("notes") or ())
    assert ("natively QuickGELU" in notes) == (tower["act"] is QuickGELU)

    # preprocessing: the pretrained config's size, mean/std and bicubic resize; the publisher's resize mode
    image = Image.fromarray(torch.randint(0, 256, (480, 640, 3), dtype=torch.uint8).numpy())
    size = tower["size"]
    expected = transforms.Compose([
        transforms.Resize((size, size) if tower["resize"] == "squash" else size,
                          interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(size), transforms.ToTensor(), transforms.Normalize(tower["mean"], tower["std"])])
    assert torch.equal(encoder.preprocess(image), expected(image))


def test_token_shape_without_building_the_tower(toy_world_small):
    from hw3.p2.encoder import encoder_token_shape
    for name, tower in TOWERS.items():
        assert encoder_token_shape(name)[:2] == (tower["prefix"] + tower["grid"][0] * tower["grid"][1], tower["width"])
    assert encoder_token_shape("ViT-L/14") == (257, 1024, 224)
    clip_path = str(ToyWorld(toy_world_small).clip)
    assert encoder_token_shape(clip_path) == encoder_token_shape(timm_name(clip_path)) == (37, 128, 96)


@pytest.mark.parametrize("name", TOWERS)
def test_whole_tower_parameter_count_from_one_block(name):
    """The whole tower's parameters = one-block model + (depth - 1) blocks; the slow test builds it to confirm."""
    encoder = one_block(name)
    total = sum(p.numel() for p in encoder.backbone.parameters()) + (TOWERS[name]["depth"] - 1) * block_parameters(
        encoder)
    assert total == TOWERS[name]["parameters"]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CANDIDATE_CONFIGS.values()))
def test_whole_candidate_tower_builds_with_random_weights(name):
    encoder = load_image_encoder(name, pretrained=False)
    assert len(encoder.backbone.blocks) == TOWERS[name]["depth"]
    assert sum(p.numel() for p in encoder.backbone.parameters()) == TOWERS[name]["parameters"]
    assert all(type(mlp_activation(block)) is TOWERS[name]["act"] for block in encoder.backbone.blocks)
    assert (encoder.n_tokens, encoder.width) == (TOWERS[name]["prefix"] + 27 * 27, TOWERS[name]["width"])


def test_plain_gelu_variant_of_quickgelu_weights_warns():
    with pytest.warns(UserWarning, match="trained with QuickGELU"):
        encoder = one_block("timm:vit_huge_patch14_clip_378.dfn5b")
    assert type(mlp_activation(encoder.backbone.blocks[0])) is nn.GELU  # what timm builds for that name
    assert download.timm_weights_source("vit_huge_patch14_clip_378.dfn5b") == TOWERS[
        "timm:vit_huge_patch14_clip_quickgelu_378.dfn5b"]["hub"]  # the same weights


def test_unknown_timm_weights_are_a_user_error():
    with pytest.raises(UserError, match="no Hugging Face weights|Invalid pretrained tag"):
        download.timm_weights_source("vit_huge_patch14_clip_quickgelu_378.nosuchtag")


# ---- the candidate configs ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config_name", CANDIDATE_CONFIGS)
def test_candidate_config_trainable_count_and_layout(config_name):
    """The captioner of the config on its tower's real token width (one block: the new modules see only the
    width) and a random GPT-2 small: the count in the header comment, under the limit."""
    path = CONFIGS / config_name
    config = load_config(str(path))
    name = CANDIDATE_CONFIGS[config_name]
    assert config.model.encoder == name and config.model.encoder_layer == -1
    assert config.model.peft == ["adapter"] and config.cache_features and config.amp
    encoder = one_block(name)
    tower = TOWERS[name]
    text = path.read_text()
    tokens = tower["prefix"] + tower["grid"][0] * tower["grid"][1]
    assert f"{tokens} tokens" in text and f"width {tower['width']}" in text
    torch.manual_seed(0)
    model = CaptionModel(config.model, encoder, Decoder(GPTConfig(dropout=config.model.decoder.dropout)))
    saved = sum(t.numel() for t in trainable_state_dict(model).values())
    assert (count_trainable(model), saved) == stated_trainable_counts(path)
    assert max(count_trainable(model), saved) < MAX_TRAINABLE


# ---- the timm path equals the OpenAI CLIP path on the same weights -----------------------------------------------

def timm_name(clip_path, quickgelu=True) -> str:
    kind = "clip_quickgelu" if quickgelu else "clip"
    return f"timm:vit_base_patch16_{kind}_224.openai@{clip_path}"


# Both paths compute in float32 from the same weights (the file's fp16 values) with the same operations in another
# order (nn.MultiheadAttention vs timm's fused-qkv attention, the same LayerNorm and QuickGELU), so they differ only by
# rounding: float32's unit roundoff is 6e-8, the tokens (after the final LayerNorm) reach |x| ~ 4, and a few hundred
# roundings compound to the measured 2e-6 at most (small and full toy world, layers -1, -2, -3). 2e-5 leaves a 10x
# margin; plain GELU in place of QuickGELU moves the same tokens by 1.3e-2 to 6.4e-2 (1000x the bound), so the
# bound separates a faithful conversion from the public solutions' mistake with room to spare.
TOKEN_TOLERANCE = 2e-5


@pytest.fixture(scope="module")
def toy_images(toy_world_small):
    paths = list_image_files(ToyWorld(toy_world_small).layout.p2_images("val"))[:4]
    return [open_image(path) for path in paths]


@pytest.mark.parametrize("layer", [-1, -3])
def test_timm_path_equals_the_openai_clip_path(toy_world_small, toy_images, layer):
    clip_path = str(ToyWorld(toy_world_small).clip)
    openai = load_image_encoder(clip_path, layer=layer)
    converted = load_image_encoder(timm_name(clip_path), layer=layer)
    assert (converted.grid, converted.n_prefix_tokens, converted.width, converted.image_size, converted.n_tokens) \
        == (openai.grid, openai.n_prefix_tokens, openai.width, openai.image_size, openai.n_tokens)
    for image in toy_images:  # the same pixels: both resize the short side (bicubic), centre-crop, normalise
        assert torch.equal(converted.preprocess(image), openai.preprocess(image))
    images = torch.stack([openai.preprocess(image) for image in toy_images])
    difference = (converted(images) - openai(images)).abs().max().item()
    assert difference < TOKEN_TOLERANCE, difference

    with pytest.warns(UserWarning, match="trained with QuickGELU"):  # the public solutions' mistake
        gelu = load_image_encoder(timm_name(clip_path, quickgelu=False), layer=layer)
    assert (gelu(images) - openai(images)).abs().max().item() > 100 * TOKEN_TOLERANCE


def test_timm_path_gives_the_same_training_loss(toy_world_small, toy_images):
    """One training step (cross-entropy as training.caption_loss computes it, AdamW) on each path from the same
    initial weights: the same loss before and after the step."""
    world = ToyWorld(toy_world_small)
    clip_path, decoder_path = str(world.clip), str(world.decoder)
    config = load_config(str(CONFIGS / "toy_adapter.yaml")).model
    input_ids, targets = make_caption_batch([[64, 2266, 6616, 13], [32, 4171, 9197], [64, 1263], [464, 3797, 318]])
    losses = {}
    for path, name in (("openai", clip_path), ("timm", timm_name(clip_path))):
        encoder = load_image_encoder(name, layer=config.encoder_layer)
        decoder = load_decoder(decoder_path)
        torch.manual_seed(0)
        model = CaptionModel(dataclasses.replace(config, encoder=name, decoder=decoder.config), encoder, decoder)
        with torch.no_grad():  # trained-looking new weights: the image matters to the loss
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(torch.randn_like(param) * 0.05)
        model.train()
        optimizer = adamw(model.named_parameters(), 1e-3, 0.01)
        images = torch.stack([encoder.preprocess(image) for image in toy_images])
        run = []
        for _ in range(2):
            logits = model(input_ids, model.encode_images(images))
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
            run.append(loss.item())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        losses[path] = run
    assert losses["timm"] == pytest.approx(losses["openai"], rel=1e-5, abs=1e-6), losses
    assert losses["openai"][1] < losses["openai"][0]  # the step did train


@pytest.mark.slow
def test_toy_world_p2_numbers_are_the_same_through_timm(toy_world, toy_run):
    """A trained toy captioner (configs/toy_lora.yaml on the full toy world, as demo.sh trains it) captions the val
    images through each path: the same captions (greedy and hw3_2.sh's beam 3), so the same CIDEr and CLIPScore."""
    from hw3.p2.checkpoint import load_captioner
    from hw3.p2.generation import DecodeConfig
    from hw3.p2.inference import caption_files
    world = ToyWorld(toy_world)
    checkpoint = str(toy_run("lora") / "best.pt")
    paths = list_image_files(world.layout.p2_images("val"))[:100]
    for decode in (DecodeConfig(beam_size=1), DecodeConfig()):
        captions = [caption_files(load_captioner(checkpoint, str(world.decoder), encoder=encoder), paths, decode,
                                  50, 0, "cpu")[0] for encoder in (str(world.clip), timm_name(world.clip))]
        assert captions[0] == captions[1]


# ---- a pre-fetched encoder loads with the network unreachable -----------------------------------------------------

def hub_cache_file(cache: Path, hub_id: str, filename: str, data: bytes) -> Path:
    """`data` as `filename` of `hub_id` in the Hugging Face cache layout: blobs/<sha256>, snapshots/<commit>/<file>
    linked to it, refs/main naming the commit."""
    repo = cache / ("models--" + hub_id.replace("/", "--"))
    commit = hashlib.sha1(hub_id.encode()).hexdigest()
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True)
    blob.write_bytes(data)
    snapshot = repo / "snapshots" / commit / filename
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to(Path("..") / ".." / "blobs" / blob.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """A temporary Hugging Face cache, and no network: any socket connection or hub download raises."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    attempts = []

    def unreachable(*args, **kwargs):
        attempts.append(args)
        raise OSError("network unreachable (test)")
    monkeypatch.setattr(socket.socket, "connect", unreachable)
    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    return cache, attempts


TINY = dict(embed_dim=64, depth=1, num_heads=1)  # a real tower's layout (patch grid, prefix tokens), tiny width


def tiny_dfn5b_file() -> dict:
    """open_clip's DFN5B file format (OpenAI CLIP layout, text tower included), tiny: 378 px, patch 14, width 64."""
    torch.manual_seed(0)
    return CLIP(32, 378, 1, 64, 14, 77, 49408, 64, 1, 1).state_dict()


def test_prefetched_dfn5b_loads_offline(offline):
    cache, attempts = offline
    name = "timm:vit_huge_patch14_clip_quickgelu_378.dfn5b"
    hub_id, filename = TOWERS[name]["hub"]
    state_dict = tiny_dfn5b_file()
    buffer = Path(cache.parent / "file.bin")
    torch.save(state_dict, str(buffer))
    hub_cache_file(cache, hub_id, filename, buffer.read_bytes())

    assert download.cached_timm_weights(name[len("timm:"):]).endswith(filename)
    encoder = _timm_encoder(name, "cpu", pretrained=True, layer=-1, **TINY)
    assert attempts == []  # nothing tried to reach the network
    # the weights arrived: the same tokens as OpenAI CLIP's own forward on the same file
    visual = CLIP(32, 378, 1, 64, 14, 77, 49408, 64, 1, 1)
    visual.load_state_dict(state_dict)
    images = torch.randn(1, 3, 378, 378)
    with torch.no_grad():
        expected = clip_vit_tokens(visual.visual.eval(), images)
    assert (encoder(images) - expected).abs().max().item() < TOKEN_TOLERANCE


def test_prefetched_siglip_safetensors_loads_offline(offline):
    """SigLIP's open_clip file holds timm's own keys under visual.trunk.; timm prefers the safetensors alternative."""
    from safetensors.torch import save_file
    cache, attempts = offline
    name = "timm:vit_so400m_patch14_siglip_384.webli"
    hub_id, filename = TOWERS[name]["hub"]
    torch.manual_seed(0)
    trunk = timm.create_model("vit_so400m_patch14_siglip_384", num_classes=0, act_layer="gelu_tanh", **TINY)
    tensors = {f"visual.trunk.{key}": value.contiguous() for key, value in trunk.state_dict().items()}
    tensors.update({"text.token_embedding.weight": torch.zeros(8, 64), "logit_scale": torch.zeros(1)})
    buffer = Path(cache.parent / "file.safetensors")
    save_file(tensors, str(buffer))
    safe_name = download.timm_weights_candidates(filename)[0]
    assert safe_name == "open_clip_model.safetensors"
    hub_cache_file(cache, hub_id, safe_name, buffer.read_bytes())

    encoder = _timm_encoder(name, "cpu", pretrained=True, layer=-1, **TINY)
    assert attempts == []
    images = torch.randn(1, 3, 384, 384)
    with torch.no_grad():
        assert torch.allclose(encoder(images), trunk.eval().forward_features(images), atol=1e-6)


def test_missing_weights_offline_name_the_download_script(offline):
    cache, attempts = offline
    with pytest.raises(UserError, match="hw3_download.sh"):
        _timm_encoder("timm:vit_huge_patch14_clip_quickgelu_378.dfn5b", "cpu", pretrained=True, layer=-1, **TINY)
    assert attempts  # it tried the hub (which the test made unreachable)


def test_weights_that_do_not_fit_are_reported(offline):
    cache, _ = offline
    name = "timm:vit_huge_patch14_clip_quickgelu_378.dfn5b"
    hub_id, filename = TOWERS[name]["hub"]
    state_dict = tiny_dfn5b_file()
    del state_dict["visual.ln_post.weight"]
    buffer = Path(cache.parent / "file.bin")
    torch.save(state_dict, str(buffer))
    hub_cache_file(cache, hub_id, filename, buffer.read_bytes())
    with pytest.raises(UserError, match=r"missing: \['norm.weight'\]"):
        _timm_encoder(name, "cpu", pretrained=True, layer=-1, **TINY)
