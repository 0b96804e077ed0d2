"""Prompt templates and class names for zero-shot CLIP classification (problem 1).

A template holds `{}` where the class name goes (CLIP's own convention); `{object}` as written in the assignment is
accepted too. A template *set* is ensembled the way the CLIP paper does it: every (template, class name) text is
embedded and L2-normalised, the texts of one class are averaged, and the mean is normalised again.

The sets are the CLIP authors' published ones (github.com/openai/CLIP: data/prompts.md for CIFAR-10/100,
notebooks/Prompt_Engineering_for_ImageNet.ipynb for ImageNet); nothing here was chosen on the homework's val set.
"""
import re
from typing import Dict, List, Sequence, Tuple

# The three prompts the report must compare (hw3/report.py reads them here too), and CLIP's default single prompt.
REQUIRED_PROMPTS = ("This is a photo of {}", "This is not a photo of {}", "No {}, no score.")
PHOTO_PROMPT = "a photo of a {}."

# CLIP paper, CIFAR-10 and CIFAR-100 (the homework's 50 classes are CIFAR-100 classes).
CIFAR_TEMPLATES = (
    "a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.",
    "a low contrast photo of a {}.", "a high contrast photo of a {}.", "a bad photo of a {}.",
    "a good photo of a {}.", "a photo of a small {}.", "a photo of a big {}.",
    "a photo of the {}.", "a blurry photo of the {}.", "a black and white photo of the {}.",
    "a low contrast photo of the {}.", "a high contrast photo of the {}.", "a bad photo of the {}.",
    "a good photo of the {}.", "a photo of the small {}.", "a photo of the big {}.",
)

# CLIP paper, ImageNet: the 80 templates of the prompt-engineering notebook.
IMAGENET_TEMPLATES = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
)

# The 7-template subset the same notebook selected (on ImageNet) as the best small ensemble.
IMAGENET_SELECTED_TEMPLATES = (
    "itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
    "a {} in a video game.", "art of the {}.", "a photo of the small {}.",
)


def _union(*template_sets: Sequence[str]) -> Tuple[str, ...]:
    return tuple(dict.fromkeys(t for templates in template_sets for t in templates))


TEMPLATE_SETS: Dict[str, Tuple[str, ...]] = {
    "photo": (PHOTO_PROMPT,),
    "cifar18": CIFAR_TEMPLATES,
    "imagenet7": IMAGENET_SELECTED_TEMPLATES,
    "imagenet80": IMAGENET_TEMPLATES,
    "cifar18+imagenet80": _union(CIFAR_TEMPLATES, IMAGENET_TEMPLATES),
}
ENSEMBLE_SETS = ("imagenet7", "cifar18", "imagenet80", "cifar18+imagenet80")

# Extra names for CIFAR-100 class names that are ambiguous or rare as plain English words (a "ray" of light, a
# "plain" adjective, a "can" verb). Written from the word meanings alone, before and without looking at val
# results; the class's own name always stays in the list. Off by default (`--synonyms`).
CIFAR_SYNONYMS: Dict[str, Tuple[str, ...]] = {
    "aquarium fish": ("aquarium fish", "small colorful fish"),
    "can": ("can", "tin can", "soda can"),
    "cattle": ("cattle", "cow"),
    "flatfish": ("flatfish", "flounder"),
    "mouse": ("mouse", "mouse, a small rodent"),
    "plain": ("plain", "grassland plain", "flat open grassland"),
    "possum": ("possum", "opossum"),
    "ray": ("ray", "stingray", "manta ray"),
    "seal": ("seal", "seal, a marine mammal"),
    "streetcar": ("streetcar", "tram"),
    "sweet pepper": ("sweet pepper", "bell pepper"),
    "tank": ("tank", "military tank"),
    "television": ("television", "TV"),
    "worm": ("worm", "earthworm"),
}


def normalize_template(template: str) -> str:
    """`{object}` (the assignment's spelling) -> `{}`; a template must name the class exactly once."""
    template = template.replace("{object}", "{}")
    if template.count("{}") != 1 or re.search(r"{[^}]", template):
        raise ValueError(f"a prompt template needs exactly one '{{}}' or '{{object}}' placeholder: {template!r}")
    return template


def shown_template(template: str) -> str:
    """A template as the assignment writes it, `{}` -> `{object}`: how accuracy.csv and the report name a prompt."""
    return template.replace("{}", "{object}")


def resolve_templates(spec: str) -> Tuple[str, ...]:
    """A set name from TEMPLATE_SETS, or one literal template such as 'a photo of a {object}.'."""
    if spec in TEMPLATE_SETS:
        return TEMPLATE_SETS[spec]
    if "{" not in spec:
        raise ValueError(f"unknown template set {spec!r}: use one of {sorted(TEMPLATE_SETS)} or a template with "
                         "'{object}' in it")
    return (normalize_template(spec),)


def clean_class_name(name: str) -> str:
    """'sweet_pepper' -> 'sweet pepper': underscores and runs of whitespace become single spaces."""
    return " ".join(name.replace("_", " ").split())


def class_names(labels: Sequence[str], synonyms: bool = False) -> List[Tuple[str, ...]]:
    """The name(s) each class is prompted with, in label order."""
    names = [clean_class_name(label) for label in labels]
    if not synonyms:
        return [(name,) for name in names]
    return [CIFAR_SYNONYMS.get(name.lower(), (name,)) for name in names]


def prompts_for_class(names: Sequence[str], templates: Sequence[str]) -> List[str]:
    return [template.format(name) for name in names for template in templates]
