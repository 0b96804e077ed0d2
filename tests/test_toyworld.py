"""The toy world: course layouts and formats, truthful boxes and captions, held-out pairs, determinism, the cache, and
the tiny models (CLIP zero-shot accuracy and LM perplexity on the full world are `slow`)."""
import hashlib
import json
import math
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hw3.common.errors import UserError
from hw3.common.files import sha256_file
from hw3.p2.model import load_decoder
from hw3.toy import models as toy_models
from hw3.toy import world as toyworld
from hw3.toy.scenes import CLASSES, COLOURS, HELD_OUT, SHAPES

ROOT = Path(__file__).resolve().parent.parent
P3_NAMES = ["bike.jpg", "girl.jpg", "sheep.jpg", "ski.jpg", "umbrella.jpg"]
PAIR = re.compile(r"\b(%s) (%s)\b" % ("|".join(COLOURS), "|".join(SHAPES)))
RELATION = re.compile(r"\b(%s) (%s) (?:is )?(to the left of|to the right of|above|below) an? (?:\w+ )?(%s) (%s)\b"
                      % ("|".join(COLOURS), "|".join(SHAPES), "|".join(COLOURS), "|".join(SHAPES)))


def load(path: Path):
    return json.loads(path.read_text())


def tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return digest.hexdigest()


def captions_by_file(p2: Path, split: str):
    info = load(p2 / f"{split}.json")
    names = {image["id"]: image["file_name"] for image in info["images"]}
    captions = {}
    for item in info["annotations"]:
        captions.setdefault(names[item["image_id"]], []).append(item["caption"])
    return captions


# ---------------------------------------------------------------------------------------------------- layout
def test_p1_layout(toy_world_small):
    p1 = toy_world_small / "hw3_data" / "p1_data"
    id2label = load(p1 / "id2label.json")
    assert id2label == {str(i): label for i, label in enumerate(CLASSES)} and len(id2label) == 50
    assert all(len(label.split()) == 2 for label in id2label.values())
    names = sorted(path.name for path in (p1 / "val").iterdir())
    assert len(names) == 50 * 4
    assert all(re.fullmatch(r"(\d+)_(\d+)\.png", name) and name.split("_")[0] in id2label for name in names)
    image = Image.open(p1 / "val" / names[0])
    assert image.format == "PNG" and image.mode == "RGB" and image.size == (64, 64)


def test_p2_annotation_format(toy_world_small):
    p2 = toy_world_small / "hw3_data" / "p2_data"
    caption_ids = set()
    for split, count in (("train", 400), ("val", 50)):
        info = load(p2 / f"{split}.json")
        assert set(info) == {"info", "licenses", "annotations", "images"}
        assert all(set(image) == {"file_name", "id"} for image in info["images"])
        assert all(set(item) == {"caption", "id", "image_id"} for item in info["annotations"])
        files = sorted(path.name for path in (p2 / "images" / split).iterdir())
        assert sorted(image["file_name"] for image in info["images"]) == files and len(files) == count
        assert all(image["id"] == int(image["file_name"][:-4]) for image in info["images"])
        coco_style = [name for name in files if re.fullmatch(r"0\d{11}\.jpg", name)]
        assert 0 < len(coco_style) < len(files) and all(re.fullmatch(r"\d+\.jpg", name) for name in files)
        per_image = captions_by_file(p2, split)
        assert set(per_image) == set(files)
        assert all(len(set(caps)) == 5 and all(c.strip() for c in caps) for caps in per_image.values())
        ids = [item["id"] for item in info["annotations"]]
        assert len(set(ids)) == len(ids) and not caption_ids & set(ids)
        caption_ids |= set(ids)
        image = Image.open(p2 / "images" / split / files[0])
        assert image.format == "JPEG" and image.mode == "RGB"


def test_p3_images(toy_world_small):
    folder = toy_world_small / "hw3_data" / "p3_data" / "images"
    assert sorted(path.name for path in folder.iterdir()) == P3_NAMES
    sizes = [Image.open(folder / name).size for name in P3_NAMES]
    assert all(width != height for width, height in sizes)  # like the course's photos, not square


# ---------------------------------------------------------------------------------------------------- truthfulness
def test_boxes_cover_every_image_and_lie_on_their_objects(toy_world_small):
    boxes = load(toy_world_small / "boxes.json")
    assert boxes["generator_version"] == toyworld.GENERATOR_VERSION and boxes["held_out_pairs"] == HELD_OUT
    folders = {"p1_val": "p1_data/val", "p2_train": "p2_data/images/train", "p2_val": "p2_data/images/val",
               "p3": "p3_data/images"}
    palette = np.array(list(COLOURS.values()), dtype=float)
    hits = total = 0
    for split, folder in folders.items():
        files = sorted(path.name for path in (toy_world_small / "hw3_data" / folder).iterdir())
        assert sorted(boxes["splits"][split]) == files
        for name in files[:60]:
            record = boxes["splits"][split][name]
            pixels = np.asarray(Image.open(toy_world_small / "hw3_data" / folder / name).convert("RGB"), dtype=float)
            assert pixels.shape[:2] == (record["height"], record["width"])
            for obj in record["objects"]:
                x0, y0, x1, y1 = obj["box"]
                assert 0 <= x0 < x1 <= record["width"] and 0 <= y0 < y1 <= record["height"]
                assert f"{obj['colour']} {obj['shape']}" in CLASSES and obj["size"] in ("small", "large")
                cx, cy = (x0 + x1) // 2, (y0 + y1) // 2  # every shape covers its box centre
                colour = np.median(pixels[cy - 1:cy + 2, cx - 1:cx + 2].reshape(-1, 3), axis=0)
                nearest = list(COLOURS)[int(np.argmin(((palette - colour) ** 2).sum(1)))]
                hits += nearest == obj["colour"]
                total += 1
    assert hits >= 0.97 * total, f"only {hits}/{total} box centres show their object's colour"


def test_captions_mention_only_objects_present_with_true_relations(toy_world_small):
    boxes = load(toy_world_small / "boxes.json")["splits"]
    p2 = toy_world_small / "hw3_data" / "p2_data"
    relations = 0
    for split in ("train", "val"):
        for name, captions in captions_by_file(p2, split).items():
            objects = {f"{o['colour']} {o['shape']}": o for o in boxes[f"p2_{split}"][name]["objects"]}
            for caption in captions:
                mentioned = {" ".join(pair) for pair in PAIR.findall(caption.lower())}
                assert mentioned and mentioned <= set(objects), (caption, sorted(objects))
                for c1, s1, relation, c2, s2 in RELATION.findall(caption.lower()):
                    a, b = objects[f"{c1} {s1}"]["box"], objects[f"{c2} {s2}"]["box"]
                    dx, dy = (a[0] + a[2] - b[0] - b[2]) / 2, (a[1] + a[3] - b[1] - b[3]) / 2
                    expected = {"to the left of": dx < 0 and abs(dx) > abs(dy),
                                "to the right of": dx > 0 and abs(dx) > abs(dy),
                                "above": dy < 0 and abs(dy) > abs(dx), "below": dy > 0 and abs(dy) > abs(dx)}
                    assert expected[relation], (caption, a, b)
                    relations += 1
    assert relations > 100


def test_held_out_pairs_never_in_train_but_in_val(toy_world_small):
    boxes = load(toy_world_small / "boxes.json")["splits"]
    p2 = toy_world_small / "hw3_data" / "p2_data"
    assert len(HELD_OUT) == 5 and {label.split()[0] for label in HELD_OUT} <= set(COLOURS)
    train_labels = {f"{o['colour']} {o['shape']}" for r in boxes["p2_train"].values() for o in r["objects"]}
    assert not train_labels & set(HELD_OUT) and len(train_labels) == 45
    train_text = " ".join(a["caption"].lower() for a in load(p2 / "train.json")["annotations"])
    assert not {" ".join(pair) for pair in PAIR.findall(train_text)} & set(HELD_OUT)
    val_labels = {f"{o['colour']} {o['shape']}" for r in boxes["p2_val"].values() for o in r["objects"]}
    assert val_labels & set(HELD_OUT)


# ------------------------------------------------------------------------------------------------ determinism, cache
def test_dataset_is_deterministic_from_the_seed(tmp_path):
    config = toyworld.WorldConfig.make(small=True, seed=3)
    toyworld.write_dataset(tmp_path / "a", config)
    toyworld.write_dataset(tmp_path / "b", config)
    toyworld.write_dataset(tmp_path / "c", toyworld.WorldConfig.make(small=True, seed=4))
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    assert tree_digest(tmp_path / "a") != tree_digest(tmp_path / "c")


def test_cache_hit_is_fast_and_the_cli_prints_the_version(toy_world_small):
    manifest = load(toy_world_small / "toyworld.json")
    start = time.time()
    assert toyworld.build_toy_world(toy_world_small, small=True, seed=0) == toy_world_small
    assert time.time() - start < 2
    assert load(toy_world_small / "toyworld.json") == manifest
    result = subprocess.run([sys.executable, str(ROOT / "toyworld.py"), str(toy_world_small), "--small"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert toyworld.GENERATOR_VERSION in result.stdout and str(toy_world_small / "clip.pt") in result.stdout


def test_refuses_a_folder_that_is_not_a_toy_world(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        toyworld.build_toy_world(tmp_path, small=True)
    result = subprocess.run([sys.executable, str(ROOT / "toyworld.py"), str(tmp_path), "--small"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("toyworld.py: error: ") and "not empty" in result.stderr
    assert "Traceback" not in result.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_concurrent_builds_share_one_complete_world(tmp_path):
    command = [sys.executable, "-c", "import sys; from hw3.toy.world import build_toy_world; build_toy_world(sys.argv[1], small=True, seed=1)",
               str(tmp_path / "world")]
    processes = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    assert all(process.wait(timeout=900) == 0 for process in processes)
    assert load(tmp_path / "world" / "toyworld.json")["settings"]["seed"] == 1
    assert sorted(path.name for path in tmp_path.iterdir() if not path.name.endswith(".lock")) == ["world"]


@pytest.mark.slow
def test_two_builds_at_once_give_byte_identical_models(tmp_path):
    """The weights depend on the seed alone, not on the load (two builds share the cores) or the folder."""
    command = [sys.executable, "-c", "import sys; from hw3.toy.world import build_toy_world; "
                                     "build_toy_world(sys.argv[1], small=True, seed=2)"]
    processes = [subprocess.Popen(command + [str(tmp_path / name)], cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE) for name in ("a", "b")]
    assert all(process.wait(timeout=900) == 0 for process in processes)
    for name in ("clip.pt", "decoder_model.bin", "boxes.json"):
        assert sha256_file(tmp_path / "a" / name) == sha256_file(tmp_path / "b" / name), name


# ---------------------------------------------------------------------------------------------------- the models
def test_unique_key_batches_cover_everything_without_repeated_keys():
    keys = [i % 7 for i in range(100)] + [f"scene {i}" for i in range(50)]
    batches = toy_models.unique_key_batches(keys, 16, random.Random(0))
    assert sorted(i for batch in batches for i in batch) == list(range(150))
    assert all(len({keys[i] for i in batch}) == len(batch) <= 16 for batch in batches)


def test_short_tokens_encode_as_clips_own():
    """The toy CLIP trains on tokens cut to the batch's longest caption (tokenize_short), through the library's
    trimmed text tower: the features of CLIP's own 77-token encode_text."""
    model = toy_models.build_tiny_clip(toy_models.ClipConfig(text_layers=2, vision_layers=1)).eval()
    captions = ["a photo of a red star.", "A big blue circle to the left of a small white cross."]
    import clip
    with torch.no_grad():
        full = model.encode_text(clip.tokenize(captions))
        short = toy_models.encode_text_trimmed(model, toy_models.tokenize_short(captions))
    assert torch.allclose(full, short, atol=1e-5)


def test_grow_position_embedding_interpolates_the_patches_and_keeps_cls():
    model = toy_models.build_tiny_clip(toy_models.ClipConfig(vision_layers=1, text_layers=1), image_size=64)
    with torch.no_grad():
        model.visual.positional_embedding[1:] = torch.arange(4.0).repeat(4)[:, None]  # each patch's column
        model.visual.positional_embedding[0] = -7.0
    toy_models.grow_position_embedding(model, 96)
    embedding = model.visual.positional_embedding.detach()
    assert embedding.shape == (37, 128) and model.visual.input_resolution == 96 and bool((embedding[0] == -7).all())
    columns = embedding[1:, 0].reshape(6, 6)
    assert torch.allclose(columns, columns[:1].expand(6, 6))  # still constant down each column
    assert bool((columns[0, 1:] > columns[0, :-1]).all())  # and increasing left to right
    assert model.encode_image(torch.zeros(1, 3, 96, 96)).shape == (1, 128)


def test_progressive_resizing_trains_small_first_and_saves_the_full_size_model():
    torch.manual_seed(0)
    images = (torch.rand(24, 3, 96, 96) * 255).to(torch.uint8)
    captions = [[f"a red circle number {i}."] for i in range(24)]
    config = toy_models.ClipConfig(epochs=3, full_size_epochs=1, batch_size=8, warmup_steps=2, vision_layers=1,
                                   text_layers=1)
    embeddings = []  # the position embedding when `evaluate` runs: after each resolution's last epoch

    def evaluate(model):
        embeddings.append(model.visual.positional_embedding.detach().clone())
        return {}
    model, history = toy_models.train_tiny_clip(images, captions, list(range(24)), [0] * 24, config,
                                                [("red", "circle")] * 24, evaluate)
    assert [record["image_size"] for record in history] == [64, 64, 96]
    assert [len(embedding) for embedding in embeddings] == [17, 37]
    assert toy_models.clip_state_dict(model)["visual.positional_embedding"].shape == (37, 128)
    grown = toy_models.build_tiny_clip(config, image_size=64)
    with torch.no_grad():
        grown.visual.positional_embedding.copy_(embeddings[0])
    toy_models.grow_position_embedding(grown, 96)
    assert not torch.allclose(grown.visual.positional_embedding, embeddings[1])  # the grown one kept training


def test_clip_checkpoint_loads_as_openai_clip(toy_world_small):
    from hw3.common.clip_models import load_clip
    state_dict = torch.load(toy_world_small / "clip.pt", map_location="cpu")
    assert state_dict["visual.conv1.weight"].dtype == torch.float16 and "visual.proj" in state_dict
    assert state_dict["token_embedding.weight"].shape[0] == 49408 and state_dict["positional_embedding"].shape[0] == 77
    model, preprocess = load_clip(str(toy_world_small / "clip.pt"))
    image = Image.open(next((toy_world_small / "hw3_data" / "p1_data" / "val").iterdir()))
    assert model.visual.input_resolution == 96 and preprocess(image).shape == (3, 96, 96)
    with torch.no_grad():
        assert model.encode_image(preprocess(image)[None]).shape == (1, 128)


def test_decoder_file_has_the_course_format(toy_world_small):
    from decoder import Decoder, GPTConfig, gpt2_parameter_names
    state_dict = torch.load(toy_world_small / "decoder_model.bin", map_location="cpu")
    config = GPTConfig.from_state_dict(state_dict)
    assert (config.vocab_size, config.block_size, config.n_head) == (50257, 1024, config.n_embd // 64)
    assert list(state_dict) == gpt2_parameter_names(config)
    assert state_dict["h.0.attn.c_attn.weight"].shape == (config.n_embd, 3 * config.n_embd)  # Conv1D [in, out]
    decoder = load_decoder(str(toy_world_small / "decoder_model.bin")).eval()
    from tokenizer import BPETokenizer
    with torch.no_grad():
        logits, _ = decoder(torch.tensor([BPETokenizer().encode("A big red")]))
    unseen = logits[0, -1] == toy_models.UNSEEN_TOKEN_LOGIT
    assert 49000 < int(unseen.sum()) < 50257 - 20  # the toy vocabulary is all that can be said
    assert BPETokenizer().decode([int(logits[0, -1].argmax())]).strip() in SHAPES


@pytest.mark.slow
def test_tiny_clip_zero_shot_accuracy_on_p1_val(toy_world):
    """The real P1 path: PNG files through CLIP's preprocess, clip.tokenize'd prompts, encode_text at 77 tokens."""
    import clip
    from hw3.common.clip_models import load_clip
    model, preprocess = load_clip(str(toy_world / "clip.pt"))
    p1 = toy_world / "hw3_data" / "p1_data"
    labels = load(p1 / "id2label.json")
    paths = sorted((p1 / "val").iterdir())
    assert len(paths) == 2500
    with torch.no_grad():
        text = model.encode_text(clip.tokenize([f"a photo of a {labels[str(i)]}." for i in range(50)]))
        text = text / text.norm(dim=-1, keepdim=True)
        correct = 0
        for start in range(0, len(paths), 500):
            batch = paths[start:start + 500]
            image = model.encode_image(torch.stack([preprocess(Image.open(p)) for p in batch]))
            predicted = (image / image.norm(dim=-1, keepdim=True) @ text.t()).argmax(1)
            correct += sum(int(p) == int(path.name.split("_")[0]) for p, path in zip(predicted, batch))
    accuracy = correct / len(paths)
    assert accuracy >= 0.80, f"tiny CLIP zero-shot accuracy {accuracy:.3f} < 0.80"
    assert abs(accuracy - load(toy_world / "toyworld.json")["clip"]["history"][-1]["p1_val_acc"]) < 0.02


@pytest.mark.slow
def test_tiny_lm_perplexity_far_below_unigram_and_samples_read_like_captions(toy_world):
    from tokenizer import BPETokenizer
    tokenizer = BPETokenizer()
    p2 = toy_world / "hw3_data" / "p2_data"
    train = [tokenizer.encode(a["caption"]) for a in load(p2 / "train.json")["annotations"]]
    val = [tokenizer.encode(a["caption"]) for a in load(p2 / "val.json")["annotations"]]
    decoder = load_decoder(str(toy_world / "decoder_model.bin")).eval()
    nll, count = toy_models.caption_nll(decoder, val)
    perplexity, unigram = math.exp(nll / count), toy_models.unigram_perplexity(train, val, 50256)
    assert perplexity < unigram / 4, (perplexity, unigram)
    words = {w for a in load(p2 / "train.json")["annotations"] for w in a["caption"].lower().split()}
    samples = [tokenizer.decode(t) for t in toy_models.sample_captions(decoder, 20, seed=1)]
    fluent = [s for s in samples if set(s.lower().split()) <= words and PAIR.search(s.lower())]
    assert len(fluent) >= 16, samples
