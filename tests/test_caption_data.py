"""hw3/p2/data.py: annotations, tokenised batches with the course's input/target shift, datasets, the frozen-feature
cache."""
import json

import numpy as np
import pytest
import torch

from caption_fixtures import make_mini_world
from hw3.common.errors import UserError
from hw3.common.images import ImageFiles
from hw3.p2.data import (CaptionDataset, FeatureCache, caption_vocabulary, collate_captions, feature_cache,
                         image_batches, read_split, tokenize_captions)
from hw3.p2.encoder import load_image_encoder
from tokenizer import EOT_ID, IGNORE_INDEX, BPETokenizer


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_mini_world(tmp_path_factory.mktemp("mini"))


@pytest.fixture(scope="module")
def train_split(world):
    data = world / "hw3_data" / "p2_data"
    return read_split(str(data / "train.json"), str(data / "images" / "train"))


@pytest.fixture(scope="module")
def encoder(world):
    return load_image_encoder(str(world / "clip.pt"))


def test_read_split_keeps_captioned_images_in_order(tmp_path, world):
    data = world / "hw3_data" / "p2_data"
    annotations = json.loads((data / "train.json").read_text())
    annotations["images"].append({"file_name": "no_caption.jpg", "id": 7})  # no captions: not an image to train on
    path = tmp_path / "train.json"
    path.write_text(json.dumps(annotations))
    split = read_split(str(path), str(data / "images" / "train"))
    assert split.keys == [f"{i:06d}" for i in range(12)]
    assert split.captions[1] == ["A green square.", "There is a green square on a dark background."]
    assert split.paths[0] == str(data / "images" / "train" / "000000.jpg")


def test_read_split_errors_name_the_problem(tmp_path, world):
    data = world / "hw3_data" / "p2_data"
    annotations = json.loads((data / "train.json").read_text())
    annotations["annotations"].append({"caption": "x", "id": 1, "image_id": 12345})
    (tmp_path / "bad.json").write_text(json.dumps(annotations))
    with pytest.raises(UserError, match="unknown image_id 12345"):
        read_split(str(tmp_path / "bad.json"), str(data / "images" / "train"))
    with pytest.raises(UserError, match="12 images"):
        read_split(str(data / "train.json"), str(tmp_path))
    (tmp_path / "not.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="not a course caption file"):
        read_split(str(tmp_path / "not.json"), str(tmp_path))


def test_batches_follow_the_grader_shift(train_split):
    captions = tokenize_captions(train_split, BPETokenizer(), max_len=3)
    assert captions[0][0] == BPETokenizer().encode("A red square.")[:3]
    images = [torch.zeros(17, 8) for _ in captions]
    data = CaptionDataset(images, captions)
    batch = collate_captions([data[0], data[3]])
    first = captions[0][0]
    assert batch.input_ids[0].tolist()[:len(first) + 2] == [EOT_ID] + first + [EOT_ID]
    assert batch.targets[0].tolist()[:len(first) + 1] == first + [EOT_ID]
    assert batch.targets[0, len(first) + 1:].eq(IGNORE_INDEX).all() and batch.targets.shape == (2, 5)
    assert batch.images.shape == (2, 17, 8) and batch.image_index.tolist() == [0, 1]


def test_epoch_items_all_captions_or_one_random_caption_per_image(train_split):
    captions = tokenize_captions(train_split, BPETokenizer(), max_len=40)
    images = list(range(len(captions)))
    pairs = CaptionDataset(images, captions, per_image=False)
    assert len(pairs) == 24 and [pairs[i][2] for i in range(4)] == [0, 0, 1, 1]
    per_image = CaptionDataset(images, captions, per_image=True, seed=0)
    assert len(per_image) == 12
    draws = []
    for epoch in range(6):
        per_image.set_epoch(epoch)
        draws.append(tuple(tuple(per_image[i][1]) for i in range(12)))
        per_image.set_epoch(epoch)
        assert draws[-1] == tuple(tuple(per_image[i][1]) for i in range(12))  # deterministic per epoch
    assert len(set(draws)) > 1  # but a different caption choice across epochs
    assert all(per_image[i][0] == i for i in range(12))
    with pytest.raises(ValueError, match="12 images but captions for 3"):
        CaptionDataset(images, captions[:3])


def test_caption_vocabulary(train_split):
    captions = tokenize_captions(train_split, BPETokenizer(), max_len=40)
    vocabulary = caption_vocabulary(captions, extra=[EOT_ID])
    expected = {t for caps in captions for tokens in caps for t in tokens} | {EOT_ID}
    assert vocabulary.tolist() == sorted(expected)


def test_feature_cache_holds_the_encoder_tokens_and_is_reused(tmp_path, train_split, encoder, monkeypatch):
    cache = feature_cache(encoder, train_split.paths, str(tmp_path), batch_size=5)
    images = torch.stack([ImageFiles(train_split.paths, encoder.preprocess)[i] for i in range(12)])
    expected = encoder(images)
    assert len(cache) == 12 and cache[3].dtype == torch.float16 and cache[3].shape == (17, 64)
    assert torch.allclose(torch.stack([cache[i] for i in range(12)]).float(), expected, atol=2e-3, rtol=1e-3)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 3 and files[0].endswith(".json") and files[1].endswith(".npy")  # no partial file left
    assert files[2] == files[1] + ".lock"  # what two runs caching the same images at once wait on
    assert isinstance(np.load(tmp_path / files[1], mmap_mode="r"), np.memmap)

    def no_encoding(*args, **kwargs):
        raise AssertionError("the cache should have been reused")
    monkeypatch.setattr(type(encoder), "forward", no_encoding)
    again = feature_cache(encoder, train_split.paths, str(tmp_path))
    assert again.path == cache.path and torch.equal(again[5], cache[5])
    with pytest.raises(AssertionError, match="reused"):  # other images: another cache file
        feature_cache(encoder, train_split.paths[:4], str(tmp_path))


def test_image_batches_in_order_with_a_limit(tmp_path, train_split, encoder):
    cache = FeatureCache(feature_cache(encoder, train_split.paths, str(tmp_path)).path)
    batches = list(image_batches(cache, batch_size=5, limit=7))
    assert [len(b) for b in batches] == [5, 2]
    assert torch.equal(batches[1][0], cache[5])
