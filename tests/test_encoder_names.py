"""The encoder name's grammar (hw3/common/encoder_names.py) and its readers: every name spells back exactly, a timm
name's FILE is everything after the first "@" (a path may hold "@" and "."), and the feature cache's key, the encoder
loader, the resume check, the downloads, the preflight and the report all read the same file from one name."""
import os
import shutil
from pathlib import Path

import clip
import pytest
from timm.models._registry import split_model_name_tag

from hw3.common import download
from hw3.common.encoder_names import EncoderName, parse_encoder_name, timm_encoder
from hw3.common.errors import UserError
from hw3.common.files import sha256_file
from hw3.common.manifest import Backbone
from hw3.p2 import data, encoder as encoder_module
from hw3.p2.encoder import load_image_encoder
from hw3.pipeline.inputs import model_source
from hw3.pipeline.preflight import FAIL, check_model
from hw3.report import encoder_name
from hw3.toy.world import ToyWorld

TOY_TIMM = "vit_base_patch16_clip_quickgelu_224"  # the toy world's tiny CLIP through timm (docs/encoders.md)
NAMES = {
    "ViT-L/14": EncoderName("clip", "ViT-L/14"),
    "ViT-L/14@336px": EncoderName("clip", "ViT-L/14@336px"),  # a CLIP name's "@" is never a file
    "timm:vit_so400m_patch14_siglip_384.webli": EncoderName("timm", "vit_so400m_patch14_siglip_384", "webli"),
    "timm:vit_large_patch14_clip_224": EncoderName("timm", "vit_large_patch14_clip_224"),
    f"timm:{TOY_TIMM}.openai@/runs/w@2/clip.v1.pt": EncoderName("timm", TOY_TIMM, "openai", "/runs/w@2/clip.v1.pt"),
    "timm:vit_base_patch16_224@weights.v2/a@b.pt": EncoderName("timm", "vit_base_patch16_224", "", "weights.v2/a@b.pt"),
    "/data/toyworld.v1/clip.pt": EncoderName("file", file="/data/toyworld.v1/clip.pt"),
    "runs/best@epoch3.v2.pt": EncoderName("file", file="runs/best@epoch3.v2.pt"),
    "clip.pt": EncoderName("file", file="clip.pt"),
}


@pytest.mark.parametrize("text", NAMES)
def test_names_parse_and_spell_back_exactly(text):
    name = parse_encoder_name(text)
    assert name == NAMES[text]
    assert name.text == str(name) == text
    assert parse_encoder_name(NAMES[text].text) == NAMES[text]


@pytest.mark.parametrize("text", clip.available_models())
def test_every_clip_name_is_a_clip_name(text):
    assert parse_encoder_name(text) == EncoderName("clip", text)


@pytest.mark.parametrize("text", [text for text in NAMES if text.startswith("timm:")])
def test_the_timm_model_name_splits_as_timm_splits_it(text):
    name = parse_encoder_name(text)
    assert split_model_name_tag(name.timm_model) == (name.model, name.tag)
    assert timm_encoder(name.timm_model, name.file) == name


@pytest.mark.parametrize("text", ["timm:", "timm:.openai", "timm:vit_base_patch16_224.", "timm:vit_base.openai@",
                                  "timm:@clip.pt"])
def test_a_malformed_timm_name_is_refused(text):
    with pytest.raises(UserError, match="timm"):
        parse_encoder_name(text)


def test_a_kind_outside_the_grammar_is_refused():
    with pytest.raises(ValueError, match="kind"):
        EncoderName("open_clip", "ViT-H-14")


# ---- the readers agree on the file ----------------------------------------------------------------------------------

# (name, the file it names): the feature cache's key spells that file absolute and adds its size and mtime. The
# decoys are what splitting at the last "@" would take for the file instead.
FILE_NAMES = [(f"timm:{TOY_TIMM}.openai@w@2/clip.v1.pt", "w@2/clip.v1.pt"),
              ("timm:vit_base_patch16_224@a@b.pt", "a@b.pt"),
              ("w@2/clip.v1.pt", "w@2/clip.v1.pt"),
              ("clip.v1.pt", "clip.v1.pt")]
DECOYS = ["2/clip.v1.pt", "b.pt"]


@pytest.fixture
def weight_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for index, path in enumerate([file for _, file in FILE_NAMES] + DECOYS):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(b"w" * (100 + index))  # each its own size
    return tmp_path


@pytest.mark.parametrize("name, file", FILE_NAMES)
def test_the_cache_key_names_the_file_after_the_first_at(weight_files, name, file):
    stat = os.stat(file)
    expected = f"{name[:-len(file)]}{weight_files / file}:{stat.st_size}:{stat.st_mtime_ns}"
    assert data.feature_cache_description(name, -1, 96, [])["encoder"] == expected


def test_the_cache_key_and_the_loader_read_the_same_file(toy_world_small, tmp_path, monkeypatch):
    """The loader reads `toy@v1/clip.v2.pt`; the cache key must change when that file changes, not when
    `v1/clip.v2.pt` (what a split at the last "@" names) does."""
    monkeypatch.chdir(tmp_path)
    weights, decoy = Path("toy@v1/clip.v2.pt"), Path("v1/clip.v2.pt")
    for path in (weights, decoy):
        path.parent.mkdir()
        shutil.copy(ToyWorld(toy_world_small).clip, path)
    name = f"timm:{TOY_TIMM}.openai@{weights}"
    read = []
    reader = encoder_module.load_state_dict_file
    monkeypatch.setattr(encoder_module, "load_state_dict_file",
                        lambda path, what: read.append(path) or reader(path, what))
    loaded = load_image_encoder(name)
    assert read == [str(weights)] and loaded.name == name

    def key():
        return data.feature_cache_path(str(tmp_path), name, -1, loaded.image_size, ["a.jpg"])
    before = key()
    os.utime(decoy, ns=(1, 1))
    assert key() == before
    os.utime(weights, ns=(1, 1))
    assert key() != before
    from hw3.p2.training import encoder_fingerprint  # the resume check's reading of the name
    assert encoder_fingerprint(name) == {"name": name, "sha256": sha256_file(weights)}


@pytest.mark.parametrize("text, backbone", [
    ("ViT-L/14", Backbone("clip", "ViT-L/14")), ("ViT-L/14@336px", Backbone("clip", "ViT-L/14@336px")),
    ("timm:vit_so400m_patch14_siglip_384.webli", Backbone("timm", "vit_so400m_patch14_siglip_384.webli")),
    ("timm:vit_large_patch14_clip_224", Backbone("timm", "vit_large_patch14_clip_224")),
    (f"timm:{TOY_TIMM}.openai@/runs/w@2/clip.v1.pt", None), ("runs/best@epoch3.v2.pt", None)])
def test_downloads_fetch_only_named_weights(text, backbone):
    assert download.encoder_backbone(text) == backbone


def test_the_preload_verifies_the_timm_name_it_fetched(monkeypatch):
    monkeypatch.setattr(download, "timm_weights_file", lambda model_name: "/cache/weights.bin")
    verified = []
    assert download.preload_backbone(Backbone("timm", "vit_so400m_patch14_siglip_384.webli"), verified.append) == \
        download.OK
    assert verified == ["timm:vit_so400m_patch14_siglip_384.webli"]


@pytest.mark.parametrize("text, short", [
    ("timm:vit_so400m_patch14_siglip_384.webli", "vit_so400m.webli"), ("timm:vit_large_patch14_clip_224", "vit_large"),
    (f"timm:{TOY_TIMM}.openai@/runs/w@2/clip.v1.pt", "vit_base.openai"),
    ("timm:vit_base_patch16_224@weights.v2/a@b.pt", "vit_base"),  # the path's dot is not a tag
    ("ViT-L/14@336px", "ViT-L/14@336px"), ("/data/toy@v1.2/clip.pt", "clip.pt"), (None, "-")])
def test_the_report_names_the_encoder_short(text, short):
    assert encoder_name({"encoder": text}) == short


def test_commands_keep_names_and_spell_files_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for text in ("ViT-L/14@336px", "timm:vit_base_patch16_224@weights.v2/a@b.pt"):
        assert model_source(text) == text
    assert model_source("runs/best@epoch3.v2.pt") == str(tmp_path / "runs/best@epoch3.v2.pt")


def test_the_preflight_fails_a_malformed_name_in_one_finding():
    finding = check_model("P2 encoder (layer -1)", "timm:vit_base.openai@", load_image_encoder)
    assert finding.level == FAIL and "nothing after '@'" in finding.text
