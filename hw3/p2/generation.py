"""Caption decoding: batched beam search over B images x K beams with the decoder's key/value cache.

    config = DecodeConfig()                               # the defaults: every CLI and the notebook start here
    token_ids = generate(model, image_tokens, config)     # List[List[int]]: one caption per image, no 50256s
    captions = caption_images(model, image_tokens, config, tokenizer)

For self-critical training (hw3/p2/scst.py), `beam_candidates` returns each image's finished beam hypotheses.
A model with an output vocabulary (CaptionModel.restrict_output) is searched over that vocabulary.

How the search runs:
- Every caption starts from the single token 50256 and ends at the next 50256 (the course's convention).
- The image keys/values of every cross-attention are computed once per image (`model.image_context`) and repeated
  for the image's K beams. Beams never move between images, so they need no reordering per step, only when an
  image is done and its rows leave the batch.
- Each step feeds only the newest token of each beam; the self-attention cache follows the surviving beams
  (`decoder.select_batch`). `use_cache=False` caches nothing: every step runs the whole sequence and recomputes the
  image keys/values from the image tokens, like a plain `model(ids, image_tokens)` loop (tests, benchmark).
- A hypothesis scores the sum of its token log-probabilities. Finished hypotheses (ended by 50256) are ranked by
  length-normalised score, score / length ** length_penalty (length = generated tokens, the end token included;
  0 = raw sum, 1 = mean log-probability), as Hugging Face's beam search does, not GNMT's ((5 + length) / 6) ** a.
- As in Hugging Face's BeamSearchScorer: of the 2K best candidates of an image, an end token among the first K
  finishes a hypothesis, the best K others continue. An image is done once it holds K finished hypotheses and its
  best running beam, normalised at its current length, cannot beat the worst of them (with length_penalty > 0
  this is the usual heuristic, not a proof); done images leave the batch. After max_length steps the beams still
  running count as finished (captions of max_length tokens without an end token).
- no_repeat_ngram_size n > 0: a token that would repeat an n-gram of the caption so far is banned.
- beam_size 1 is greedy decoding: the argmax at every step, stopping at the first end token.
- On CUDA the decoder runs under fp16 autocast; scores are accumulated in float32.
"""
import argparse
from contextlib import nullcontext
from dataclasses import dataclass, fields
from typing import List, NamedTuple, Optional, Tuple

import torch

from decoder import select_batch
from hw3.common.errors import UserError
from tokenizer import EOT, EOT_ID


@dataclass
class DecodeConfig:
    """How captions are decoded. These defaults are THE decode defaults: hw3_2.sh, P3, the notebook and validation
    during training all take theirs from here (beam 3; bench/p2_decode_sweep.py measures other settings)."""
    beam_size: int = 3
    max_length: int = 30  # decoding steps: at most this many tokens per caption, an end token included
    length_penalty: float = 1.0  # exponent of the length normalisation of finished hypotheses
    no_repeat_ngram_size: int = 0  # 0 = off
    use_cache: bool = True  # False: recompute everything at every step (same captions, much slower)

    def __post_init__(self):
        if self.beam_size < 1 or self.max_length < 1 or self.no_repeat_ngram_size < 0:
            raise UserError(f"bad decoding settings (beam size and max length >= 1, no-repeat n-gram size >= 0): "
                            f"{self}")


_DECODE_HELP = {"beam_size": "beam size (1 = greedy)",
                "max_length": "most tokens per caption, the end token included",
                "length_penalty": "finished captions are ranked by log-prob / length ** this (0 = raw log-prob)",
                "no_repeat_ngram_size": "forbid repeating any n-gram of this size (0 = off)"}


def add_decode_options(parser: argparse.ArgumentParser) -> None:
    """--beam-size, --max-length, --length-penalty, --no-repeat-ngram-size, defaulting to DecodeConfig's."""
    default = DecodeConfig()
    for name, help_text in _DECODE_HELP.items():
        value = getattr(default, name)
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value,
                            help=f"{help_text} (default: {value})")


def decode_config_from_args(args: argparse.Namespace) -> DecodeConfig:
    return DecodeConfig(**{f.name: getattr(args, f.name) for f in fields(DecodeConfig) if hasattr(args, f.name)})


def banned_ngram_tokens(sequences: torch.Tensor, n: int) -> torch.Tensor:
    """(row, token) pairs [M, 2]: the tokens that would repeat an n-gram already in their row of `sequences` [R, L]."""
    R, L = sequences.shape
    if n < 1 or L < n:
        return sequences.new_zeros(0, 2)
    windows = sequences.unfold(1, n, 1)  # [R, L - n + 1, n]
    if n == 1:
        match = torch.ones(windows.shape[:2], dtype=torch.bool, device=sequences.device)
    else:
        match = (windows[:, :, :-1] == sequences[:, None, L - n + 1:]).all(-1)  # [R, L - n + 1]
    rows, starts = match.nonzero(as_tuple=True)
    return torch.stack([rows, windows[rows, starts, -1]], dim=1)


def length_normalised(score: float, length: int, length_penalty: float) -> float:
    return score / (max(length, 1) ** length_penalty)


class ImageBeams:
    """The finished hypotheses of one image: at most K, ranked by length-normalised score."""

    def __init__(self, config: DecodeConfig):
        self.config = config
        self.finished: List[Tuple[float, List[int]]] = []  # (normalised score, tokens without the end token)

    def add(self, tokens: List[int], score: float, length: int):
        normalised = length_normalised(score, length, self.config.length_penalty)
        if len(self.finished) < self.config.beam_size or normalised > self.finished[-1][0]:
            self.finished.append((normalised, tokens))
            self.finished.sort(key=lambda item: -item[0])
            del self.finished[self.config.beam_size:]

    def can_stop(self, best_running_score: float, length: int) -> bool:
        if len(self.finished) < self.config.beam_size:
            return False
        return self.finished[-1][0] >= length_normalised(best_running_score, length, self.config.length_penalty)

    def best(self) -> List[int]:
        return self.finished[0][1]


def autocast_for(device: torch.device):
    """fp16 autocast on CUDA; nothing elsewhere."""
    return torch.cuda.amp.autocast(dtype=torch.float16) if device.type == "cuda" else nullcontext()


@torch.no_grad()
def generate(model, image_tokens: torch.Tensor, config: DecodeConfig) -> List[List[int]]:
    """Token ids of the best caption per image (without the start/end 50256) for image tokens [B, N, D]."""
    return [image_beams.best() for image_beams in beam_search(model, image_tokens, config)]


@torch.no_grad()
def beam_candidates(model, image_tokens: torch.Tensor, config: DecodeConfig) -> List[List[List[int]]]:
    """Per image, its finished hypotheses (at most beam_size, best first), token ids without the start/end 50256."""
    return [[tokens for _, tokens in image_beams.finished]
            for image_beams in beam_search(model, image_tokens, config)]


class Expansion(NamedTuple):
    """The beams that go on after one step: rows of the previous batch, their new tokens and scores."""
    rows: List[int]
    tokens: List[int]
    scores: List[float]
    active: List[int]  # the images still searching, in row order


def beam_search(model, image_tokens: torch.Tensor, config: DecodeConfig) -> List[ImageBeams]:
    """The search behind generate and beam_candidates (the module docstring says how it runs)."""
    device = image_tokens.device
    B, K = image_tokens.size(0), config.beam_size
    if B == 0:
        return []
    token_ids = model.output_token_ids() if hasattr(model, "output_token_ids") else None
    if token_ids is not None and config.no_repeat_ngram_size:
        raise UserError("no_repeat_ngram_size works on the full vocabulary, not an output vocabulary subset")
    block_size = model.decoder.config.block_size if hasattr(model, "decoder") else None
    if block_size is not None and config.max_length + 1 > block_size:
        raise UserError(f"max_length {config.max_length} + the start token exceeds block_size {block_size}")
    with autocast_for(device):  # the image keys/values, once per image (uncached: the tokens, recomputed each step)
        per_image = model.image_context(image_tokens) if config.use_cache else image_tokens

    def beam_context(images: List[int]):  # per image -> per row of the batch: [image][beam]
        return select_batch(per_image, torch.tensor(images, device=device).repeat_interleave(K))

    beams = [ImageBeams(config) for _ in range(B)]
    active = list(range(B))  # images still searching; rows of the batch are [active image][beam]
    sequences = torch.full((B * K, 1), EOT_ID, dtype=torch.long, device=device)  # start token + generated
    scores = torch.zeros(B, K, device=device)
    scores[:, 1:] = float("-inf")  # all beams start identical: only the first one may expand at step 1
    scores = scores.view(-1)
    past, context = None, beam_context(active)
    for step in range(1, config.max_length + 1):
        with autocast_for(device):
            if config.use_cache:
                logits, past = model.decode_step(sequences[:, -1:], context, past)
            else:
                logits, _ = model.decode_step(sequences, context)
        log_probs = torch.log_softmax(logits[:, -1].float(), dim=-1)  # [R, V]
        if config.no_repeat_ngram_size:
            banned = banned_ngram_tokens(sequences[:, 1:], config.no_repeat_ngram_size)
            log_probs[banned[:, 0], banned[:, 1]] = float("-inf")
        kept = expand(beams, active, sequences, scores, log_probs, step, config, token_ids)
        if not kept.active:
            break
        if len(kept.active) < len(active):  # done images leave the batch
            context = beam_context(kept.active)
        active = kept.active
        rows = torch.tensor(kept.rows, device=device)
        sequences = torch.cat([sequences.index_select(0, rows), torch.tensor(kept.tokens, device=device)[:, None]], 1)
        scores = torch.tensor(kept.scores, device=device)
        if past is not None:
            past = select_batch(past, rows)
    return beams


def expand(beams: List[ImageBeams], active: List[int], sequences: torch.Tensor, scores: torch.Tensor,
           log_probs: torch.Tensor, step: int, config: DecodeConfig, token_ids: Optional[torch.Tensor]) -> Expansion:
    """One step of the search: each active image's 2K best continuations finish hypotheses (end token among the
    first K) or continue (the best K others); images that are done drop out. `token_ids`: the token of each
    log_probs column (None: the column is the token id)."""
    K, vocab = config.beam_size, log_probs.size(-1)
    candidates = (scores[:, None] + log_probs).view(len(active), K * vocab)
    top_scores, top_index = candidates.topk(min(2 * K, K * vocab), dim=1)
    top_scores_list, top_index_list = top_scores.tolist(), top_index.tolist()
    generated = sequences[:, 1:].tolist()
    ids = token_ids.tolist() if token_ids is not None else None
    kept = Expansion([], [], [], [])
    for slot, image in enumerate(active):
        running = []
        for rank, (score, index) in enumerate(zip(top_scores_list[slot], top_index_list[slot])):
            beam, token = divmod(index, vocab)
            if ids is not None:
                token = ids[token]
            row = slot * K + beam
            if score == float("-inf"):
                break
            if token == EOT_ID:
                if rank < K:
                    beams[image].add(generated[row], score, step)
            else:
                running.append((row, token, score))
                if len(running) == K:
                    break
        if step == config.max_length or not running:
            for row, token, score in running:
                beams[image].add(generated[row] + [token], score, step)
            continue
        if beams[image].can_stop(running[0][2], step):
            continue
        while len(running) < K:  # fewer than K live candidates (tiny vocabularies): pad with dead beams
            running.append((running[0][0], running[0][1], float("-inf")))
        kept.active.append(image)
        for row, token, score in running:
            kept.rows.append(row)
            kept.tokens.append(token)
            kept.scores.append(score)
    return kept


def clean_caption(text: str) -> str:
    """Special tokens stripped, whitespace normalised."""
    return " ".join(text.replace(EOT, " ").split())


def caption_images(model, image_tokens: torch.Tensor, config: DecodeConfig, tokenizer) -> List[str]:
    """generate + decode + clean_caption."""
    return [clean_caption(tokenizer.decode(ids)) for ids in generate(model, image_tokens, config)]
