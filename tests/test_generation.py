"""generation.py: cached == uncached, batched == one at a time, beam 1 == a plain greedy loop, beam search beats
greedy where it should, length penalty, end-token handling, max length, no-repeat n-grams.

Two kinds of model: the small toy world's trained tiny GPT-2 with random cross-attention/adapters (real captions of
varying length that end in 50256), and hand-made Markov models whose best sequences are known exactly."""
import math

import pytest
import torch

from hw3.p2.generation import DecodeConfig, banned_ngram_tokens, caption_images, clean_caption, generate
from tokenizer import EOT_ID, BPETokenizer

VOCAB = 50257


def image_tokens(n, seed=0):
    return torch.randn(n, 17, 128, generator=torch.Generator().manual_seed(seed))


def greedy_loop(model, tokens, max_length):
    """The plainest greedy decoding: full forward pass every step, argmax, stop at the end token."""
    captions = []
    for i in range(tokens.size(0)):
        ids = [EOT_ID]
        for _ in range(max_length):
            next_id = model(torch.tensor([ids]), tokens[i:i + 1])[0, -1].argmax().item()
            if next_id == EOT_ID:
                break
            ids.append(next_id)
        captions.append(ids[1:])
    return captions


def test_toy_model_captions_end_and_vary(toy_model):
    captions = generate(toy_model, image_tokens(6), DecodeConfig(beam_size=3, max_length=30))
    assert len(captions) == 6 and all(EOT_ID not in ids for ids in captions)
    assert sum(len(ids) < 30 for ids in captions) >= 3, "most captions should end before max_length"
    assert len({tuple(ids) for ids in captions}) >= 3, "different images should give different captions"


@pytest.mark.parametrize("beam_size, ngram", [(1, 0), (4, 2)])
def test_cached_equals_uncached(toy_model, beam_size, ngram):
    tokens = image_tokens(4, seed=1)
    cached = generate(toy_model, tokens, DecodeConfig(beam_size, 20, no_repeat_ngram_size=ngram))
    uncached = generate(toy_model, tokens, DecodeConfig(beam_size, 20, no_repeat_ngram_size=ngram, use_cache=False))
    assert cached == uncached


@pytest.mark.parametrize("beam_size", [1, 3])
def test_batched_equals_one_at_a_time(toy_model, beam_size):
    tokens = image_tokens(4, seed=2)
    config = DecodeConfig(beam_size, 20, length_penalty=0.7)
    batched = generate(toy_model, tokens, config)
    single = [generate(toy_model, tokens[i:i + 1], config)[0] for i in range(4)]
    assert batched == single


def test_beam_1_is_a_plain_greedy_loop(toy_model):
    tokens = image_tokens(4, seed=3)
    assert generate(toy_model, tokens, DecodeConfig(beam_size=1, max_length=25)) == greedy_loop(toy_model, tokens, 25)


def test_no_repeat_ngram_on_real_captions(toy_model):
    tokens = image_tokens(4, seed=4)
    plain = generate(toy_model, tokens, DecodeConfig(beam_size=2, max_length=25))
    for n in (1, 2, 3):
        for ids in generate(toy_model, tokens, DecodeConfig(beam_size=2, max_length=25, no_repeat_ngram_size=n)):
            ngrams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
            assert len(ngrams) == len(set(ngrams))
    assert any(len(set(ids)) < len(ids) for ids in plain), "the test needs captions with repeated tokens"


def test_banned_ngram_tokens():
    sequences = torch.tensor([[5, 6, 7, 5, 6], [1, 2, 3, 4, 5]])
    assert sorted(map(tuple, banned_ngram_tokens(sequences, 3).tolist())) == [(0, 7)]  # "5 6" was followed by 7
    assert sorted(map(tuple, banned_ngram_tokens(sequences, 2).tolist())) == [(0, 7)]  # "6" was followed by 7
    assert sorted(map(tuple, banned_ngram_tokens(sequences[1:], 1).tolist())) == [(0, t) for t in (1, 2, 3, 4, 5)]
    assert banned_ngram_tokens(sequences, 6).shape == (0, 2)


# ---- hand-made Markov models: the next token depends only on the last one -------------------------------------------

class MarkovModel:
    """next-token probabilities {token: {next token: p}}; every other token has probability 0. Start token 50256."""

    def __init__(self, table):
        self.log_probs = {}
        for token, nexts in table.items():
            row = torch.full((VOCAB,), float("-inf"))
            for next_token, p in nexts.items():
                row[next_token] = math.log(p)
            self.log_probs[token] = row

    def image_context(self, tokens):
        return [tokens]

    def decode_step(self, ids, context, past=None):
        rows = context[0].size(0) if isinstance(context, list) else context.size(0)  # cached: image_context's list
        assert rows == ids.size(0), "one context row per beam"
        logits = torch.stack([self.log_probs[token] for token in ids[:, -1].tolist()])[:, None]
        new_past = [ids[:, -1:] if past is None else torch.cat([past[0], ids[:, -1:]], 1)]
        return logits, new_past


def markov_generate(table, n_images=1, **config):
    return generate(MarkovModel(table), torch.zeros(n_images, 1, 1), DecodeConfig(**config))


def sequence_log_prob(table, ids):
    tokens = [EOT_ID] + ids + [EOT_ID]
    return sum(math.log(table[a][b]) for a, b in zip(tokens, tokens[1:]))


A, B, C, D, E, F = 11, 12, 13, 14, 15, 16
# Greedy takes A (0.6) and then meets a three-way split; B (0.4) leads to F with 0.9: beam search finds B F.
GARDEN_PATH = {EOT_ID: {A: 0.6, B: 0.4}, A: {C: 0.34, D: 0.33, E: 0.33}, B: {F: 0.9, C: 0.1},
               C: {EOT_ID: 1.0}, D: {EOT_ID: 1.0}, E: {EOT_ID: 1.0}, F: {EOT_ID: 1.0}}


def test_beam_search_finds_a_better_sequence_than_greedy():
    greedy = markov_generate(GARDEN_PATH, beam_size=1)[0]
    for use_cache in (True, False):
        assert markov_generate(GARDEN_PATH, beam_size=1, use_cache=use_cache) == [[A, C]]
        assert markov_generate(GARDEN_PATH, n_images=3, beam_size=2, use_cache=use_cache) == [[B, F]] * 3
    assert sequence_log_prob(GARDEN_PATH, [B, F]) > sequence_log_prob(GARDEN_PATH, greedy)


# A ends at once; B C D ends later with a lower total but a higher mean log-probability.
SHORT_OR_LONG = {EOT_ID: {A: 0.55, B: 0.45}, A: {EOT_ID: 1.0}, B: {C: 1.0}, C: {D: 1.0}, D: {EOT_ID: 1.0}}


def test_length_penalty_and_finished_hypotheses():
    assert markov_generate(SHORT_OR_LONG, beam_size=2, length_penalty=0.0) == [[A]]  # raw sum: the short one
    assert markov_generate(SHORT_OR_LONG, beam_size=2, length_penalty=1.0) == [[B, C, D]]  # mean: the long one
    assert markov_generate(SHORT_OR_LONG, beam_size=1, length_penalty=1.0) == [[A]]  # greedy ends at A


def test_max_length_cuts_captions_without_an_end():
    forever = {EOT_ID: {A: 1.0}, A: {A: 0.7, B: 0.3}, B: {A: 1.0}}
    assert markov_generate(forever, beam_size=1, max_length=5) == [[A] * 5]
    assert markov_generate(forever, beam_size=3, max_length=4) == [[A] * 4]


def test_no_repeat_ngram_changes_the_search():
    loop = {EOT_ID: {A: 1.0}, A: {A: 0.6, B: 0.3, EOT_ID: 0.1}, B: {A: 0.6, EOT_ID: 0.4}}
    assert markov_generate(loop, beam_size=1, max_length=6) == [[A] * 6]
    # "A A" once, then B ("A A" banned), then A; after that A and B are both banned after A: the end token.
    assert markov_generate(loop, beam_size=1, max_length=6, no_repeat_ngram_size=2) == [[A, A, B, A]]
    # every token once: "A B" (0.3 * 0.4) beats "A" (0.1)
    assert markov_generate(loop, beam_size=3, max_length=6, no_repeat_ngram_size=1) == [[A, B]]


def test_block_size_is_checked(toy_model):
    with pytest.raises(ValueError, match="block_size"):
        generate(toy_model, image_tokens(1), DecodeConfig(beam_size=1, max_length=1024))
    with pytest.raises(ValueError):
        DecodeConfig(beam_size=0)


def test_clean_caption_and_caption_images(toy_model):
    assert clean_caption("  A red\n square<|endoftext|>  on  grass <|endoftext|>") == "A red square on grass"
    tokenizer = BPETokenizer()
    captions = caption_images(toy_model, image_tokens(2), DecodeConfig(beam_size=2, max_length=20), tokenizer)
    ids = generate(toy_model, image_tokens(2), DecodeConfig(beam_size=2, max_length=20))
    assert captions == [" ".join(tokenizer.decode(caption).split()) for caption in ids]
    assert all(caption and caption == caption.strip() for caption in captions)
