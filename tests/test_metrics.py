"""metrics.py: CIDEr-D equals pycocoevalcap's (the course's numbers); CLIPScore equals the course's computation."""
import math
import random
import warnings

import clip
import pytest
import torch
from pycocoevalcap.cider.cider import Cider

from hw3.p2 import metrics
from hw3.common.clip_models import load_clip
from scoring_fixtures import (CAPTIONS, caption_set, course_clip_scores, pycocoevalcap_cider,  # noqa: F401
                              tiny_clip_path)

# --- CIDEr-D -----------------------------------------------------------------------------------------------------


def test_cider_known_value_by_hand():
    # idf("a") = 0 (in both images' references), every other n-gram has idf log 2. Per image: unigram cosine 1,
    # bigram cosine 1/3 (only "a boy" / "a girl" shared), no shared 3- or 4-grams, equal lengths: 10 * (4/3) / 4.
    # language_evaluation's README shows the same example scoring CIDEr 3.333333333333333.
    predictions = {"0": "i am a boy", "1": "she is a girl"}
    references = {"0": ["am i a boy ?"], "1": ["is she a girl ?"]}
    corpus, per_image = metrics.cider_d(predictions, references, tokenizer="ptb")
    assert corpus == pytest.approx(10 / 3, abs=1e-12)
    assert per_image == pytest.approx({"0": 10 / 3, "1": 10 / 3}, abs=1e-12)


def test_cider_of_a_perfect_caption():
    # cosine 1 for every n-gram order the caption has: 10 with four words or more, 10 * 2/4 with two
    candidates = {"x": "red circle on the left", "y": "blue star"}
    corpus, per_image = metrics.cider_d_tokenized(candidates, {"x": ["red circle on the left"], "y": ["blue star"]})
    assert per_image == pytest.approx({"x": 10.0, "y": 5.0}, abs=1e-12) and corpus == pytest.approx(7.5)


def test_cider_penalises_length_and_clips_repeats():
    references = {"x": ["a red circle on the left"], "y": ["a blue star"], "z": ["a green cross"]}
    exact = metrics.cider_d_tokenized({"x": "a red circle on the left", "y": "b", "z": "c"}, references)[1]["x"]
    longer = metrics.cider_d_tokenized({"x": "a red circle on the left of it", "y": "b", "z": "c"}, references)[1]
    repeated = metrics.cider_d_tokenized({"x": "red red red red circle left", "y": "b", "z": "c"}, references)[1]
    once = metrics.cider_d_tokenized({"x": "red circle left", "y": "b", "z": "c"}, references)[1]
    assert longer["x"] < exact
    assert repeated["x"] < once["x"]


def random_caption_set(seed: int):
    rng = random.Random(seed)
    vocab = "a the man dog on of with red two is in sitting riding horse street next to".split()
    sentence = lambda shortest: " ".join(rng.choice(vocab) for _ in range(rng.randint(shortest, 16)))  # noqa: E731
    n_images = rng.choice([1, 2, 5, 30, 80])
    candidates = {f"img{i}": sentence(0) for i in range(n_images)}  # empty candidates too
    references = {f"img{i}": [sentence(1) for _ in range(rng.randint(1, 6))] for i in range(n_images)}
    return candidates, references


@pytest.mark.parametrize("seed", range(12))
def test_cider_equals_pycocoevalcap_on_random_sets(seed):
    candidates, references = random_caption_set(seed)
    ours, ours_per_image = metrics.cider_d_tokenized(candidates, references)
    theirs, theirs_per_image = Cider().compute_score(references, {k: [c] for k, c in candidates.items()})
    assert abs(ours - theirs) < 1e-9
    assert list(ours_per_image) == list(candidates)
    for ours_one, theirs_one in zip(ours_per_image.values(), theirs_per_image):
        assert abs(ours_one - theirs_one) < 1e-9


def test_cider_with_ptb_equals_pycocoevalcap_pipeline():
    predictions = {key: prediction for key, (_, prediction) in CAPTIONS.items()}
    references = {key: refs for key, (refs, _) in CAPTIONS.items()}
    ours, ours_per_image = metrics.cider_d(predictions, references, tokenizer="ptb")
    theirs, theirs_per_image = pycocoevalcap_cider(predictions, references)
    assert ours > 0.1 and abs(ours - theirs) < 1e-9
    assert all(abs(ours_per_image[k] - theirs_per_image[k]) < 1e-9 for k in predictions)
    assert ours_per_image["000005"] == 0.0  # the empty prediction


def test_missing_java_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    with pytest.raises(metrics.ScoringError, match="needs Java.*--tokenizer simple"):
        metrics.cider_d({"a": "a dog"}, {"a": ["a dog"]}, tokenizer="ptb")


def test_unknown_tokenizer_is_rejected():
    with pytest.raises(ValueError, match="unknown tokenizer"):
        metrics.cider_d({"a": "a dog"}, {"a": ["a dog"]}, tokenizer="nltk")


def test_simple_tokenizer_agrees_with_ptb_on_typical_captions():
    captions = {"c": ["A man, riding a horse.", "Don't stop the dog's ball (red)!", "A double-decker bus; city.",
                      "Two  dogs\tplay 'outside'", "The girls' kites, they're high", "A \"big\" cat: sleeping?", "3.5 apples and a t-shirt...", ""]}
    assert metrics.simple_tokenize(captions) == metrics.ptb_tokenize(captions)


# --- annotations and prediction checks ---------------------------------------------------------------------------


def test_load_references_groups_captions_by_image(caption_set):  # noqa: F811
    references, file_names = metrics.load_references(caption_set["annotations"])
    assert references == {key: refs for key, (refs, _) in CAPTIONS.items()}
    assert file_names == {key: f"{key}.jpg" for key in CAPTIONS}


def test_check_predictions_names_missing_and_extra_keys():
    references = {"a": ["x"], "b": ["y"], "c": ["z"]}
    with pytest.raises(ValueError, match=r"1 annotated images have no prediction, e.g. \['c'\].*1 predicted names "
                                         r"are not annotated images, e.g. \['zz'\]"):
        metrics.check_predictions({"a": "1", "b": "2", "zz": "3"}, references)
    with pytest.raises(ValueError, match="not strings"):
        metrics.check_predictions({"a": "1", "b": 2, "c": "3"}, references)
    with pytest.raises(ValueError, match="JSON object"):
        metrics.check_predictions(["a"], references)
    metrics.check_predictions({"a": "1"}, references, allow_subset=True)


# --- CLIPScore ---------------------------------------------------------------------------------------------------


class FixedEmbeddings(torch.nn.Module):
    """Stands in for CLIP: the image and text embeddings are given, so the score's formula can be checked."""
    context_length = 77

    def __init__(self, image_embedding, text_embedding):
        super().__init__()
        self.image_embedding, self.text_embedding = torch.tensor([image_embedding]), torch.tensor([text_embedding])

    def encode_image(self, image):
        return self.image_embedding

    def encode_text(self, tokens):
        return self.text_embedding


@pytest.mark.parametrize("image_embedding,text_embedding,expected", [
    ([1.0, 0.0], [3.0, 4.0], 2.5 * 0.6),
    ([1.0, 1.0], [2.0, 2.0], 2.5),
    ([1.0, 0.0], [-3.0, 4.0], 0.0),  # negative cosine clamps to 0
])
def test_clip_score_formula(image_embedding, text_embedding, expected):
    scorer = metrics.ClipScorer(FixedEmbeddings(image_embedding, text_embedding), preprocess=None)
    assert scorer.score(torch.zeros(3, 8, 8), "a caption") == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_clip_scores_equal_the_course_computation(tiny_clip_path, caption_set, num_workers):  # noqa: F811
    model, preprocess = load_clip(tiny_clip_path)
    predictions = dict(caption_set["predictions"], **{"000005": "a cat on a laptop"})
    expected = course_clip_scores(model, preprocess, predictions, caption_set["images"])
    scorer = metrics.ClipScorer(model, preprocess, name="tiny")
    paths = {key: f"{caption_set['images']}/{key}.jpg" for key in predictions}
    assert scorer(predictions, paths, num_workers=num_workers, progress=False) == expected  # exactly the same
    assert len(set(expected.values())) == len(expected) and min(expected.values()) > 0


def test_long_caption_is_truncated_with_a_warning(tiny_clip_path, caption_set):  # noqa: F811
    model, preprocess = load_clip(tiny_clip_path)
    scorer = metrics.ClipScorer(model, preprocess)
    long_caption = " ".join(["a red bus on a street"] * 30)
    with pytest.raises(RuntimeError):
        clip.tokenize([long_caption])  # what crashes the course's scorer
    with pytest.warns(UserWarning, match="1 captions are longer than CLIP's 77 tokens"):
        scores = scorer({"000004": long_caption}, {"000004": f"{caption_set['images']}/000004.jpg"}, progress=False)
    tokens = clip.tokenize([long_caption], truncate=True)
    image = preprocess(metrics.Image.open(f"{caption_set['images']}/000004.jpg").convert("RGB")).unsqueeze(0)
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(model.encode_image(image), model.encode_text(tokens)).item()
    assert scores["000004"] == 2.5 * max(cos, 0)


def test_unreadable_image_is_named(tmp_path, tiny_clip_path):  # noqa: F811
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    scorer = metrics.ClipScorer(*load_clip(tiny_clip_path))
    with pytest.raises(metrics.ScoringError, match="broken.jpg"):
        scorer({"broken": "a dog"}, {"broken": str(tmp_path / "broken.jpg")}, progress=False)


# --- everything at once ------------------------------------------------------------------------------------------


def test_score_captions_reuses_a_loaded_scorer(tiny_clip_path, caption_set):  # noqa: F811
    scorer = metrics.ClipScorer.load(tiny_clip_path, device="cpu")
    predictions = caption_set["predictions"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no truncation warnings for these captions
        result = metrics.score_captions(predictions, caption_set["annotations"], caption_set["images"],
                                        clip_model=scorer, progress=False)
    cider, cider_per_image = pycocoevalcap_cider(predictions, {k: refs for k, (refs, _) in CAPTIONS.items()})
    clip_scores = course_clip_scores(scorer.model, scorer.preprocess, predictions, caption_set["images"])
    assert abs(result["CIDEr"] - cider) < 1e-9
    assert result["CLIPScore"] == sum(clip_scores.values()) / len(clip_scores)
    assert result["per_image"]["000002"] == {"file_name": "000002.jpg", "caption": predictions["000002"],
                                             "CIDEr": pytest.approx(cider_per_image["000002"], abs=1e-9),
                                             "CLIPScore": clip_scores["000002"]}


def test_score_captions_on_a_subset_without_clip(caption_set):  # noqa: F811
    subset = {key: caption_set["predictions"][key] for key in ["000001", "000002", "000004"]}
    result = metrics.score_captions(subset, caption_set["annotations"], caption_set["images"], clip_model=None,
                                    allow_subset=True)
    expected, _ = pycocoevalcap_cider(subset, {k: refs for k, (refs, _) in CAPTIONS.items()})
    assert result["CLIPScore"] is None and math.isclose(result["CIDEr"], expected, abs_tol=1e-9)
    with pytest.raises(ValueError, match="have no prediction"):
        metrics.score_captions(subset, caption_set["annotations"], caption_set["images"], clip_model=None)
