"""Fixtures for the scorer's tests: a tiny random CLIP and a few images with captions, no toy world needed.

Imported by tests/test_metrics.py and tests/test_p2_evaluate.py (`from scoring_fixtures import ...`).
"""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from clip.model import CLIP
from PIL import Image

# key -> (reference captions, a prediction); punctuation, case and clitics exercise the PTB tokenizer
CAPTIONS = {
    "000001": (["A man riding a horse on a beach.", "A person rides a brown horse near the sea!",
                "Someone's riding a horse, by the water."], "A man rides a horse on the beach."),
    "000002": (["Two dogs play with a red ball.", "Dogs playing in the grass (with a ball).",
                "Two brown dogs chase a ball", "The dogs don't stop running"], "two dogs playing with a ball"),
    "000003": (["A plate of food with broccoli.", "A white plate with meat and vegetables on it."],
               "A plate of food on a table"),
    "000004": (["A red double-decker bus on a city street.", "A bus drives down the road.",
                "A large red bus parked by the curb.", "A bus in the city.", "Red bus, city street."],
               "a red bus driving down a street"),
    "000005": (["A cat sleeping on a laptop keyboard.", "A cat lies on a computer."], ""),
    "000006": (["A kitchen with a stove and a fridge.", "An empty kitchen; white cabinets."],
               "a kitchen kitchen kitchen with a stove"),
}


def tiny_clip_model(seed: int = 0) -> CLIP:
    torch.manual_seed(seed)
    return CLIP(embed_dim=64, image_resolution=64, vision_layers=2, vision_width=128, vision_patch_size=8,
                context_length=77, vocab_size=49408, transformer_width=128, transformer_heads=2, transformer_layers=2)


@pytest.fixture(scope="session")
def tiny_clip_path(tmp_path_factory):
    """A random CLIP state_dict in OpenAI's layout (what hw3.common.clip_models.load_clip reads). A shared final LayerNorm bias
    and projection give image and text embeddings a common direction, so cosines are positive and differ
    (about 0.4 to 0.5) instead of clamping to 0."""
    state_dict = tiny_clip_model().state_dict()
    shared_bias = torch.randn(128, generator=torch.Generator().manual_seed(1))
    state_dict["text_projection"] = state_dict["visual.proj"].clone()
    state_dict["ln_final.bias"], state_dict["visual.ln_post.bias"] = shared_bias.clone(), shared_bias.clone()
    path = tmp_path_factory.mktemp("clip") / "clip.pt"
    torch.save(state_dict, path)
    return str(path)


@pytest.fixture(scope="session")
def caption_set(tmp_path_factory):
    """A course-layout caption set: images/{key}.jpg of varied sizes and modes, annotations.json, predictions."""
    root = tmp_path_factory.mktemp("captions")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    annotations = {"images": [], "annotations": []}
    for image_id, (key, (refs, _)) in enumerate(CAPTIONS.items()):
        height, width = [(80, 120), (120, 80), (64, 64), (100, 100), (90, 150), (70, 70)][image_id]
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        if key == "000003":
            image = image.convert("L")  # a greyscale JPEG, as some COCO images are
        image.save(root / "images" / f"{key}.jpg")
        annotations["images"].append({"file_name": f"{key}.jpg", "id": 100 + image_id})
        for ref in refs:
            annotations["annotations"].append({"caption": ref, "id": len(annotations["annotations"]),
                                               "image_id": 100 + image_id})
    (root / "annotations.json").write_text(json.dumps(annotations))
    predictions = {key: prediction for key, (_, prediction) in CAPTIONS.items()}
    (root / "pred.json").write_text(json.dumps(predictions))
    return {"root": root, "images": str(root / "images"), "annotations": str(root / "annotations.json"),
            "pred_file": str(root / "pred.json"), "predictions": predictions}


def course_clip_scores(model, preprocess, predictions, images_root):
    """CLIPScore computed the way the course's scorer does it, one image at a time (the test oracle)."""
    import clip
    scores = {}
    for key, caption in predictions.items():
        image = preprocess(Image.open(f"{images_root}/{key}.jpg").convert("RGB")).unsqueeze(0)
        with torch.no_grad():
            image_features = model.encode_image(image)
            text_features = model.encode_text(clip.tokenize([caption]))
        scores[key] = 2.5 * max(F.cosine_similarity(image_features, text_features).item(), 0)
    return scores


def pycocoevalcap_cider(predictions, references):
    """The course's CIDEr pipeline through pycocoevalcap: PTB tokenizer, then Cider. Returns (mean, per-image)."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({key: [{"caption": c} for c in references[key]] for key in predictions})
    res = tokenizer.tokenize({key: [{"caption": c}] for key, c in predictions.items()})
    score, scores = Cider().compute_score(gts, res)
    return score, dict(zip(gts.keys(), scores))
