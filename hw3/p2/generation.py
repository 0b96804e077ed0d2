"""Caption decoding: batched beam search over B images x K beams with the decoder's key/value cache.

    config = DecodeConfig()                               # the defaults: every CLI and the notebook start here
    token_ids = generate(model, image_tokens, config)     # List[List[int]]: one caption per image, no 50256s
    captions = caption_images(model, image_tokens, config, tokenizer)

For self-critical training (hw3/p2/scst.py): `sample` draws captions token by token (multinomial, KV cache) and
`beam_candidates` returns each image's finished beam hypotheses, both optionally over a vocabulary subset.

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
from typing import List, Optional, Tuple

import torch

from decoder import select_batch
from hw3.common.errors import UserError
from tokenizer import EOT, EOT_ID


@dataclass
class DecodeConfig:
    """How captions are decoded. These defaults are THE decode defaults: hw3_2.sh, P3, the notebook and validation
    during training all take theirs from here (beam 3: on the toy world beam 5 gained 0.01 CIDEr for 1.6x time)."""
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
def beam_candidates(model, image_tokens: torch.Tensor, config: DecodeConfig, vocabulary=None) -> List[List[List[int]]]:
    """Per image, its finished hypotheses (at most beam_size, best first), token ids without the start/end 50256.
    `vocabulary` (optim.VocabularySubset): search over its tokens only (self-critical training's candidates)."""
    return [[tokens for _, tokens in image_beams.finished]
            for image_beams in beam_search(model, image_tokens, config, vocabulary)]


def beam_search(model, image_tokens: torch.Tensor, config: DecodeConfig, vocabulary=None) -> List[ImageBeams]:
    """The search behind generate and beam_candidates (the module docstring says how it runs)."""
    device = image_tokens.device
    B, K = image_tokens.size(0), config.beam_size
    if B == 0:
        return []
    if vocabulary is not None and config.no_repeat_ngram_size:
        raise UserError("no_repeat_ngram_size works on the full vocabulary, not a vocabulary subset")
    token_ids = vocabulary.token_ids.tolist() if vocabulary is not None else None
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
    past = None
    context = beam_context(active)

    for step in range(1, config.max_length + 1):
        with autocast_for(device), vocabulary.head(model.decoder) if vocabulary is not None else nullcontext():
            if config.use_cache:
                logits, past = model.decode_step(sequences[:, -1:], context, past)
            else:
                logits, _ = model.decode_step(sequences, context)
        log_probs = torch.log_softmax(logits[:, -1].float(), dim=-1)  # [R, V]
        if config.no_repeat_ngram_size:
            banned = banned_ngram_tokens(sequences[:, 1:], config.no_repeat_ngram_size)
            log_probs[banned[:, 0], banned[:, 1]] = float("-inf")
        vocab = log_probs.size(-1)
        candidates = (scores[:, None] + log_probs).view(len(active), K * vocab)
        top_scores, top_index = candidates.topk(min(2 * K, K * vocab), dim=1)
        top_scores_list, top_index_list = top_scores.tolist(), top_index.tolist()
        generated = sequences[:, 1:].tolist()

        keep_rows, keep_tokens, keep_scores, still_active = [], [], [], []
        for slot, image in enumerate(active):
            running = []
            for rank, (score, index) in enumerate(zip(top_scores_list[slot], top_index_list[slot])):
                beam, token = divmod(index, vocab)
                if token_ids is not None:  # a row of the vocabulary subset -> its token id
                    token = token_ids[token]
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
            still_active.append(image)
            for row, token, score in running:
                keep_rows.append(row)
                keep_tokens.append(token)
                keep_scores.append(score)
        if not still_active:
            break
        if len(still_active) < len(active):  # done images leave the batch
            context = beam_context(still_active)
        active = still_active
        rows = torch.tensor(keep_rows, device=device)
        sequences = torch.cat([sequences.index_select(0, rows),
                               torch.tensor(keep_tokens, device=device)[:, None]], dim=1)
        scores = torch.tensor(keep_scores, device=device)
        if past is not None:
            past = select_batch(past, rows)
    return beams


def clean_caption(text: str) -> str:
    """Special tokens stripped, whitespace normalised."""
    return " ".join(text.replace(EOT, " ").split())


def caption_images(model, image_tokens: torch.Tensor, config: DecodeConfig, tokenizer) -> List[str]:
    """generate + decode + clean_caption."""
    return [clean_caption(tokenizer.decode(ids)) for ids in generate(model, image_tokens, config)]


@torch.no_grad()
def sample(model, image_tokens: torch.Tensor, samples: int, max_length: int, temperature: float = 1.0,
           vocabulary=None, generator: Optional[torch.Generator] = None) -> Tuple[List[List[int]], List[bool]]:
    """`samples` captions per image drawn token by token from the model (multinomial at `temperature`; 0 = argmax,
    i.e. greedy), with the key/value cache, for self-critical training. Rows are [image][sample], B * samples of
    them. Returns each caption's token ids (without the start and end 50256) and whether it ended with the end token
    (False: it ran to max_length). `vocabulary` (optim.VocabularySubset): draw only from its tokens."""
    device = image_tokens.device
    rows = image_tokens.size(0) * samples
    with autocast_for(device):
        context = select_batch(model.image_context(image_tokens),
                               torch.arange(image_tokens.size(0), device=device).repeat_interleave(samples))
    tokens = torch.full((rows, 1), EOT_ID, dtype=torch.long, device=device)
    ended = torch.zeros(rows, dtype=torch.bool, device=device)
    past, drawn = None, []
    with vocabulary.head(model.decoder) if vocabulary is not None else nullcontext():
        for _ in range(max_length):
            with autocast_for(device):
                logits, past = model.decode_step(tokens, context, past)
            logits = logits[:, -1].float()
            if temperature > 0:
                choice = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=generator)[:, 0]
            else:
                choice = logits.argmax(-1)
            tokens = vocabulary.token_ids[choice][:, None] if vocabulary is not None else choice[:, None]
            drawn.append(tokens[:, 0])
            ended |= tokens[:, 0] == EOT_ID
            if bool(ended.all()):
                break
    drawn = torch.stack(drawn, dim=1).tolist()  # [rows, steps]
    captions = [row[:row.index(EOT_ID)] if EOT_ID in row else row for row in drawn]
    return captions, [EOT_ID in row for row in drawn]
