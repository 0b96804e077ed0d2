"""Caption metrics with the course's numbers: CIDEr-D and CLIPScore (plus optional BLEU-4 / METEOR / ROUGE-L).

Used by p2_evaluate.py (the command-line scorer) and for validation during training:

    scorer = ClipScorer.load("ViT-B/32", device)          # load CLIP once, reuse across calls
    result = score_captions(predictions, "p2_data/val.json", "p2_data/images/val", clip_model=scorer)
    result["CIDEr"], result["CLIPScore"], result["per_image"]["<image name>"]

The course's scorer computes CIDEr-D with coco-caption (Stanford PTB tokenizer in Java, then `Cider`) and CLIPScore
as 2.5 * max(cos, 0) between CLIP ViT-B/32 embeddings of one image and its bare caption. CIDEr-D is implemented here
(tests check it against pycocoevalcap's `Cider` to 1e-9); tokenisation is pycocoevalcap's own PTBTokenizer, so a
missing Java is an error rather than a silently different number. Nothing here is on the grading path.
"""
import math
import os
import re
import shutil
import time
import warnings
from collections import Counter, defaultdict
from typing import Callable, Dict, Hashable, List, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from hw3.common.errors import UserError
from hw3.common.files import image_key
from hw3.common.images import ImageFiles, ImageReadError
from hw3.p2.captions import read_caption_file


class ScoringError(UserError):
    """A scorer that cannot run as asked (no Java, an unreadable image): reported to the user without a traceback."""


# -----------------------------------------------------------------------------
# annotations and predictions


def load_references(annotation_file: str) -> Tuple[Dict[str, List[str]], Dict[str, str]]:
    """Reads a COCO-style caption file (captions.read_caption_file). Returns ({image key: [reference captions]},
    {image key: file name}).

    Like the course's scorer, the images that count are those with at least one caption.
    """
    file_names, captions = read_caption_file(annotation_file)
    references = defaultdict(list)
    for image_id, image_captions in captions.items():
        references[image_key(file_names[image_id])].extend(image_captions)
    key_to_file = {image_key(name): name for name in file_names.values()}
    return dict(references), {key: key_to_file[key] for key in references}


def check_predictions(predictions, reference_keys, allow_subset: bool = False) -> None:
    """Raises ValueError unless `predictions` is {image key: caption string} covering exactly the reference images
    (or, with allow_subset, some of them). The message names the missing and unexpected keys."""
    if not isinstance(predictions, dict):
        raise ScoringError("predictions must be a JSON object {image name: caption}, got "
                           f"{type(predictions).__name__}")
    not_str = sorted(key for key, caption in predictions.items() if not isinstance(caption, str))
    if not_str:
        raise ScoringError(f"{len(not_str)} predictions are not strings, e.g. {not_str[:5]}")
    extra = sorted(set(predictions) - set(reference_keys))
    missing = [] if allow_subset else sorted(set(reference_keys) - set(predictions))
    if extra or missing:
        problems = []
        if missing:
            problems.append(f"{len(missing)} annotated images have no prediction, e.g. {missing[:5]}")
        if extra:
            problems.append(f"{len(extra)} predicted names are not annotated images, e.g. {extra[:5]}")
        raise ScoringError("prediction keys must equal the annotation's image names (file name minus .jpg): "
                           + "; ".join(problems))
    if not predictions:
        raise ScoringError("no predictions to score")


# -----------------------------------------------------------------------------
# tokenisation

# Characters the Java PTB tokenizer takes as line breaks (measured with pycocoevalcap's PTBTokenizer: "\n" is
# replaced by a space before Java sees it, U+0085 and U+001C are harmless). A caption holding one splits into two
# lines, so every later caption is paired with the wrong image's line and other images' CIDEr changes.
PTB_LINE_BREAKS = "\r\x0b\x0c\u2028\u2029"


def images_with_ptb_line_breaks(predictions: Dict[str, str], references: Dict[str, List[str]]) -> List[str]:
    """The keys of the predicted images whose caption, or one of whose references, holds a PTB_LINE_BREAKS
    character."""
    def breaks(text: str) -> bool:
        return any(c in text for c in PTB_LINE_BREAKS)
    return sorted(key for key in predictions
                  if breaks(predictions[key]) or any(breaks(ref) for ref in references.get(key, [])))


def warn_of_ptb_line_breaks(predictions: Dict[str, str], references: Dict[str, List[str]]) -> None:
    """A loud warning naming the images whose captions shift the PTB tokenizer's lines. The score is left exactly
    as the course's scorer computes it (with the same flaw): nothing is changed, only said."""
    keys = images_with_ptb_line_breaks(predictions, references)
    if keys:
        warnings.warn(f"{len(keys)} images have a prediction or reference caption with a character the PTB "
                      "tokenizer (Java) takes as a line break (\\r, \\x0b, \\x0c, U+2028 or U+2029): its lines "
                      "shift, so the CIDEr of OTHER images changes too. The number is kept identical to the course "
                      f"scorer's, which has the same flaw; replace those characters by spaces to score fairly. "
                      f"Images: {keys[:20]}{' ...' if len(keys) > 20 else ''}", stacklevel=3)


def ptb_tokenize(captions: Dict[str, List[str]]) -> Dict[str, List[str]]:
    """coco-caption's tokenisation (Stanford PTBTokenizer through pycocoevalcap: lowercase, punctuation dropped)."""
    try:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError as error:
        raise ScoringError("CIDEr's PTB tokenizer comes from pycocoevalcap: pip install pycocoevalcap==1.2 "
                           "(requirements-dev.txt), or pass tokenizer='simple' for an approximation") from error
    if shutil.which("java") is None:
        raise ScoringError("CIDEr's PTB tokenizer (as in the course's scorer) needs Java, and no `java` is on PATH: "
                           "install a JRE (e.g. apt-get install default-jre-headless), or pass tokenizer='simple' "
                           "(--tokenizer simple) for a pure-Python approximation")
    tokenized = PTBTokenizer().tokenize({key: [{"caption": c} for c in caps] for key, caps in captions.items()})
    got = {key: len(tokenized.get(key, [])) for key in captions}
    if got != {key: len(caps) for key, caps in captions.items()}:
        raise ScoringError("the PTB tokenizer returned a different number of captions than it was given "
                           "(did `java` fail? run it by hand to see its error)")
    return tokenized


_SIMPLE_TOKENS = re.compile(r"\w+(?=n't\b)|n't\b|(?<=\w)'(?:s|re|ve|ll|d|m)\b|(?:[^\W\d_]\.){2,}|\d+(?::\d+)+|"
                            r"\w+(?:[-.]\w+)*|\S")  # clitics, abbreviations (u.s.), times (3:30), words
_PTB_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "{": "-lcb-", "}": "-rcb-"}
_PTB_DROPPED = {"''", "'", "``", "`", '"', ".", "?", "!", ",", ":", "-", "--", "...", ";"}


def simple_tokenize(captions: Dict[str, List[str]]) -> Dict[str, List[str]]:
    """A pure-Python APPROXIMATION of the PTB tokenisation, for machines without Java; scores may differ slightly
    from the course's. Lowercases, splits off punctuation and clitics (`don't` -> `do n't`), drops what PTB drops."""
    def tokenize(text: str) -> str:
        tokens = (_PTB_BRACKETS.get(t, t) for t in _SIMPLE_TOKENS.findall(text.lower()))
        return " ".join("can not" if t == "cannot" else t for t in tokens if t not in _PTB_DROPPED)
    return {key: [tokenize(c) for c in caps] for key, caps in captions.items()}


TOKENIZERS: Dict[str, Callable[[Dict[str, List[str]]], Dict[str, List[str]]]] = {
    "ptb": ptb_tokenize, "simple": simple_tokenize}


def tokenize_for_scoring(predictions: Dict[str, str], references: Dict[str, List[str]], tokenizer: str = "ptb"
                         ) -> Tuple[Dict[str, str], Dict[str, List[str]]]:
    """Tokenises predictions and their references the way the course's scorer does (two tokenizer runs)."""
    if tokenizer not in TOKENIZERS:
        raise ScoringError(f"unknown tokenizer {tokenizer!r}: use one of {sorted(TOKENIZERS)}")
    tokenize = TOKENIZERS[tokenizer]
    # language_evaluation's CocoEvaluator renames its unknown token in the references before scoring
    refs = {key: [ref.replace("_UNK", "_UNKNOWN") for ref in references[key]] for key in predictions}
    candidates = tokenize({key: [caption] for key, caption in predictions.items()})
    return {key: candidates[key][0] for key in predictions}, tokenize(refs)


# -----------------------------------------------------------------------------
# CIDEr-D


def ngram_counts(sentence: str, n: int = 4) -> Counter:
    words = sentence.split()
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def _tfidf_vectors(counts: Counter, document_frequency: Counter, log_num_images: float, n: int):
    """One {n-gram: tf * idf} vector per n-gram order, their norms, and the length used by the length penalty."""
    vectors = [{} for _ in range(n)]
    for ngram, term_freq in counts.items():
        vectors[len(ngram) - 1][ngram] = term_freq * (log_num_images - math.log(max(1.0, document_frequency[ngram])))
    norms = [math.sqrt(sum(w * w for w in vector.values())) for vector in vectors]
    # coco-caption's "length" counts bigrams, not words; kept for identical numbers (it matters for 0-word captions)
    length = sum(term_freq for ngram, term_freq in counts.items() if len(ngram) == 2)
    return vectors, norms, length


class CiderD:
    """CIDEr-D of candidates against fixed, already tokenised references, as coco-caption computes it: tf-idf n-gram
    vectors (orders 1..n), the candidate's weights clipped at the reference's, a Gaussian length penalty (sigma), the
    mean over orders and references, times 10. The idf comes from the document frequencies of `references` (one
    document per image), computed once here, so the same object can score many candidates cheaply (SCST rewards)."""

    def __init__(self, references: Dict[Hashable, List[str]], n: int = 4, sigma: float = 6.0):
        if not references:
            raise ValueError("CIDEr-D needs the references of at least one image")
        self.n, self.sigma = n, sigma
        counts = {key: [ngram_counts(ref, n) for ref in refs] for key, refs in references.items()}
        self.document_frequency = Counter()
        for counts_per_ref in counts.values():
            self.document_frequency.update(set(ngram for ref_counts in counts_per_ref for ngram in ref_counts))
        self.log_num_images = math.log(float(len(references)))
        self.references = {key: [self.vectors(ref_counts) for ref_counts in counts_per_ref]
                           for key, counts_per_ref in counts.items()}

    def vectors(self, counts: Counter):
        return _tfidf_vectors(counts, self.document_frequency, self.log_num_images, self.n)

    def score(self, key: Hashable, candidate: str) -> float:
        """CIDEr-D of one tokenised candidate (words separated by spaces) against the references of image `key`."""
        n, sigma = self.n, self.sigma
        cand_vectors, cand_norms, cand_length = self.vectors(ngram_counts(candidate, n))
        total = np.zeros(n)
        for ref_vectors, ref_norms, ref_length in self.references[key]:
            penalty = math.exp(-((cand_length - ref_length) ** 2) / (2 * sigma ** 2))
            for order in range(n):
                ref_vector = ref_vectors[order]
                dot = sum(min(w, ref_vector.get(g, 0.0)) * ref_vector.get(g, 0.0)
                          for g, w in cand_vectors[order].items())
                if cand_norms[order] != 0 and ref_norms[order] != 0:
                    dot /= cand_norms[order] * ref_norms[order]
                total[order] += dot * penalty
        return float(np.mean(total) / len(self.references[key]) * 10.0)


def cider_d_tokenized(candidates: Dict[str, str], references: Dict[str, List[str]], n: int = 4, sigma: float = 6.0
                      ) -> Tuple[float, Dict[str, float]]:
    """CIDEr-D (CiderD) of already tokenised captions with the idf taken over the references of the images scored
    here, as coco-caption does. Returns (mean over images, {image key: score}), in the order of `candidates`."""
    keys = list(candidates)
    cider = CiderD({key: references[key] for key in keys}, n, sigma)
    scores = {key: cider.score(key, candidates[key]) for key in keys}
    return float(np.mean([scores[key] for key in keys])), scores


def cider_d(predictions: Dict[str, str], references: Dict[str, List[str]], tokenizer: str = "ptb"
            ) -> Tuple[float, Dict[str, float]]:
    """The course's CIDEr (raw scale, e.g. 0.96) of {image key: caption} against {image key: [captions]}.
    The idf comes from the references of the predicted images, so a subset scores differently from the full set."""
    candidates, refs = tokenize_for_scoring(predictions, references, tokenizer)
    return cider_d_tokenized(candidates, refs)


# -----------------------------------------------------------------------------
# CLIPScore


def read_image_like_course(path: str) -> Image.Image:
    """How the course's scorer reads an image: `Image.open(path).convert("RGB")`, no EXIF rotation. Kept apart from
    hw3.common.images.open_image on purpose: the score must be the course's even where our reader differs (16-bit
    or transparent images)."""
    return Image.open(path).convert("RGB")


class ClipScorer:
    """CLIPScore = 2.5 * max(cos(image embedding, caption embedding), 0), as the course computes it: one image per
    forward pass (batching changes the numbers in the last bits), CLIP's own preprocessing, the bare caption,
    fp16 weights on GPU. Captions over CLIP's 77 tokens are truncated with a warning (the course's scorer crashes)."""

    def __init__(self, model, preprocess: Callable, device="cpu", name: str = "custom"):
        self.model, self.preprocess, self.device, self.name = model, preprocess, torch.device(device), name

    @classmethod
    def load(cls, name_or_path: str = "ViT-B/32", device=None) -> "ClipScorer":
        from hw3.common.clip_models import load_clip
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            model, preprocess = load_clip(name_or_path, device)
        except (OSError, UserError) as error:  # a missing or malformed file, or no internet for a first download
            raise ScoringError(f"cannot load CLIP {name_or_path!r} ({error}); OpenAI models download to "
                               "~/.cache/clip on first use") from error
        return cls(model, preprocess, device, name=name_or_path)

    def tokenize(self, caption: str) -> Tuple[torch.Tensor, bool]:
        """CLIP token ids [1, context_length] of the caption, and whether it had to be truncated."""
        import clip
        try:
            return clip.tokenize([caption], context_length=self.model.context_length), False
        except RuntimeError:  # "Input ... is too long for context length"
            return clip.tokenize([caption], context_length=self.model.context_length, truncate=True), True

    @torch.no_grad()
    def score(self, image: torch.Tensor, caption: str) -> float:
        """CLIPScore of one preprocessed image [3, H, W] (or [1, 3, H, W]) and one caption."""
        tokens, _ = self.tokenize(caption)
        image_features = self.model.encode_image(image.reshape(1, *image.shape[-3:]).to(self.device))
        text_features = self.model.encode_text(tokens.to(self.device))
        cos = F.cosine_similarity(image_features, text_features).item()
        return 2.5 * max(cos, 0)

    def __call__(self, captions: Dict[str, str], image_paths: Dict[str, str], num_workers: int = 0,
                 progress: bool = True) -> Dict[str, float]:
        """{image key: CLIPScore} for {image key: caption}, reading each image from image_paths[key]."""
        keys = list(captions)
        missing = [image_paths[key] for key in keys if not os.path.isfile(image_paths[key])]
        if missing:
            raise FileNotFoundError(f"{len(missing)} images not found, e.g. {missing[:3]}")
        truncated = [key for key in keys if self.tokenize(captions[key])[1]]
        if truncated:
            warnings.warn(f"{len(truncated)} captions are longer than CLIP's {self.model.context_length} tokens and "
                          f"were truncated for CLIPScore, e.g. {truncated[:3]}")
        images = torch.utils.data.DataLoader(
            ImageFiles([image_paths[key] for key in keys], self.preprocess, reader=read_image_like_course),
            batch_size=1, num_workers=num_workers)
        bar = tqdm(zip(keys, images), total=len(keys), desc=f"CLIPScore ({self.name})", disable=not progress)
        try:
            return {key: self.score(image, captions[key]) for key, image in bar}
        except ImageReadError as error:  # the scorer cannot score a set with an unreadable image
            raise ScoringError(str(error)) from error


# -----------------------------------------------------------------------------
# other coco-caption metrics (optional; BLEU and ROUGE-L are Python, METEOR is Java)


def coco_metrics(candidates: Dict[str, str], references: Dict[str, List[str]]) -> Dict[str, float]:
    """BLEU-4, METEOR and ROUGE-L from pycocoevalcap, on captions tokenised by `tokenize_for_scoring`."""
    import contextlib
    import io

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    if shutil.which("java") is None:
        raise ScoringError("METEOR is a Java program and no `java` is on PATH: install a JRE")
    gts = {key: references[key] for key in candidates}
    res = {key: [caption] for key, caption in candidates.items()}
    with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its internals
        bleu, _ = Bleu(4).compute_score(gts, res)
    meteor, _ = Meteor().compute_score(gts, res)
    rouge, _ = Rouge().compute_score(gts, res)
    return {"BLEU-4": float(bleu[3]), "METEOR": float(meteor), "ROUGE-L": float(rouge)}


# -----------------------------------------------------------------------------
# everything at once


def score_captions(predictions: Dict[str, str], annotation_file: str, images_root: str,
                   clip_model: Union[str, ClipScorer, None] = "ViT-B/32", device=None, tokenizer: str = "ptb",
                   allow_subset: bool = False, extra_metrics: bool = False, num_workers: int = 0,
                   progress: bool = True) -> dict:
    """Scores {image key: caption} against a COCO-style annotation file, like the course's p2_evaluate.py.

    clip_model: a CLIP name or state_dict path (loaded here), an already loaded ClipScorer (reuse it across calls),
    or None to skip CLIPScore. allow_subset: score only the predicted images (the CIDEr idf then comes from their
    references only, so the number is not comparable with a full-set CIDEr). Returns {"CIDEr", "CLIPScore",
    "num_images", "tokenizer", "clip_model", "seconds", "per_image": {key: {file_name, caption, CIDEr, CLIPScore}}}
    plus BLEU-4 / METEOR / ROUGE-L with extra_metrics.
    """
    references, file_names = load_references(annotation_file)
    check_predictions(predictions, references, allow_subset)
    warn_of_ptb_line_breaks(predictions, references)
    start = time.time()
    candidates, tokenized_refs = tokenize_for_scoring(predictions, references, tokenizer)
    cider, cider_per_image = cider_d_tokenized(candidates, tokenized_refs)
    result = {"CIDEr": cider, "CLIPScore": None, "num_images": len(predictions), "tokenizer": tokenizer,
              "clip_model": None}
    if extra_metrics:
        result.update(coco_metrics(candidates, tokenized_refs))
    clip_per_image = {}
    if clip_model is not None:
        scorer = clip_model if isinstance(clip_model, ClipScorer) else ClipScorer.load(clip_model, device)
        image_paths = {key: os.path.join(images_root, file_names[key]) for key in predictions}
        clip_per_image = scorer(predictions, image_paths, num_workers=num_workers, progress=progress)
        # a running sum in prediction order, as the course's scorer averages
        total = 0.0
        for key in predictions:
            total += clip_per_image[key]
        result.update(CLIPScore=total / len(predictions), clip_model=scorer.name)
    result["seconds"] = time.time() - start
    result["per_image"] = {key: {"file_name": file_names[key], "caption": caption, "CIDEr": cider_per_image[key],
                                 "CLIPScore": clip_per_image.get(key)} for key, caption in predictions.items()}
    return result
