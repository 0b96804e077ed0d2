"""Self-critical sequence training (SCST, Rennie et al. 2017): after cross-entropy, train on the metric itself.

For each training image the model draws `samples` captions (generation.sample, multinomial with the key/value
cache); each gets a reward, CIDEr-D against that image's references (plus, optionally, clip_weight * CLIPScore);
the loss raises the log-probability of the captions that beat a baseline and lowers that of the others:

    loss = -mean over tokens of (reward - baseline) * log p(token)

Baselines (`scst.baseline`): "mean", the mean reward of the image's other samples (Luo 2020, "A better variant of
self-critical sequence training"), needs no extra decoding; "greedy", the reward of the image's greedy caption
(Rennie et al.). The sampling runs in eval mode without gradient; the log-probabilities come from one
teacher-forced pass over the drawn captions in training mode (the usual two-pass form: same numbers without
dropout, and only one pass keeps activations for backward).

The reward's CIDEr-D is the scorer's own (metrics.CiderD) with the document frequencies of all training
references, computed once, on a pure-Python tokenisation (metrics.simple_tokenize: no Java per step). With
`end_token`, both the candidate and the references get an end-of-caption word, so a caption cut after "on a"
matches no reference's ending: without it SCST learns to stop on dangling words, which CIDEr-D does not punish.
"""
import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from hw3.common.images import ImageFiles
from hw3.p2.config import SCSTConfig
from hw3.p2.data import CaptionBatch
from hw3.p2.generation import DecodeConfig, autocast_for, beam_candidates, clean_caption, sample
from hw3.p2.metrics import CiderD, ClipScorer, read_image_like_course, simple_tokenize
from hw3.p2.model import CaptionModel
from hw3.p2.optim import VocabularySubset
from tokenizer import IGNORE_INDEX, BPETokenizer, make_caption_batch

END_WORD = "<eos>"  # the end-of-caption word of the reward (PTB-style tokens never contain "<")


def reward_tokens(captions: Sequence[str], end_token: bool) -> List[str]:
    """The reward's tokenisation of captions: metrics.simple_tokenize, plus END_WORD when `end_token`."""
    tokenized = simple_tokenize({"captions": list(captions)})["captions"]
    return [f"{text} {END_WORD}".strip() if end_token else text for text in tokenized]


class CiderReward:
    """CIDEr-D of captions against the references of training images, the idf from all of them (computed once)."""

    def __init__(self, references: Sequence[Sequence[str]], end_token: bool = True):
        self.end_token = end_token
        self.cider = CiderD({index: reward_tokens(refs, end_token) for index, refs in enumerate(references)})

    def __call__(self, captions: Sequence[str], image_index: Sequence[int]) -> List[float]:
        return [self.cider.score(index, text)
                for index, text in zip(image_index, reward_tokens(captions, self.end_token))]


class ClipReward:
    """The course's CLIPScore, 2.5 * max(cos, 0), of captions and training images: the image embeddings are computed
    once (the scorer's own reader and preprocessing), the captions' per call, in one batch, trimmed to its longest
    caption (encode_text_trimmed: in a toy SCST step of 32 images x 5 candidates, under cProfile, the reward's CLIP
    part took 0.29 s of the step's 0.59 at all 77 positions, 0.10 s of 0.40 trimmed)."""

    def __init__(self, scorer: ClipScorer, image_paths: Sequence[str], batch_size: int = 64):
        self.scorer = scorer
        loader = torch.utils.data.DataLoader(ImageFiles(image_paths, scorer.preprocess, reader=read_image_like_course),
                                             batch_size=batch_size)
        with torch.no_grad():
            self.images = torch.cat([F.normalize(scorer.model.encode_image(images.to(scorer.device)).float(), dim=-1)
                                     for images in loader])

    @torch.no_grad()
    def __call__(self, captions: Sequence[str], image_index: Sequence[int]) -> List[float]:
        tokens = torch.cat([self.scorer.tokenize(caption)[0] for caption in captions]).to(self.scorer.device)
        text = F.normalize(encode_text_trimmed(self.scorer.model, tokens).float(), dim=-1)
        cos = (text * self.images[torch.as_tensor(list(image_index), device=self.images.device)]).sum(-1)
        return (2.5 * cos.clamp(min=0)).tolist()


def encode_text_trimmed(model, tokens: torch.Tensor) -> torch.Tensor:
    """`model.encode_text(tokens)` of an OpenAI CLIP model (tokens [B, context], padded with 0), run only up to the
    longest caption's end token: the text tower's causal mask keeps each caption's end-token feature blind to the
    padding after it, so the features are the same (to float rounding: 1.2e-6 at most on 160 toy captions, whose
    longest needs 23 of the 77 positions) for a fraction of the cost; a test compares the two. During the call
    each text block's `attn_mask` is swapped for its top-left corner; the originals are put back."""
    length = int(tokens.argmax(dim=-1).max()) + 1  # the end token has the largest id, as encode_text assumes
    tokens = tokens[:, :length]
    blocks = list(model.transformer.resblocks)
    masks = [block.attn_mask for block in blocks]
    try:
        for block, mask in zip(blocks, masks):
            block.attn_mask = mask[:length, :length]
        x = model.token_embedding(tokens).type(model.dtype) + model.positional_embedding[:length].type(model.dtype)
        x = model.ln_final(model.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)).type(model.dtype)
        return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ model.text_projection
    finally:
        for block, mask in zip(blocks, masks):
            block.attn_mask = mask


def baseline_rewards(rewards: torch.Tensor, greedy: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The baseline [B, K] of sample rewards [B, K]: the greedy caption's reward [B] when given, else the mean of the
    image's other K - 1 samples."""
    if greedy is not None:
        return greedy[:, None].expand_as(rewards)
    K = rewards.size(1)
    return (rewards.sum(1, keepdim=True) - rewards) / (K - 1)


@dataclass
class SCSTStats:
    reward: float  # mean reward of the candidate captions
    cider: float  # their mean CIDEr-D (the reward without the CLIPScore part)
    ended: float  # share of candidates that ended with the end token


class SelfCritical:
    """The SCST objective: `loss(captioner, batch, ...)` in place of the cross-entropy."""

    def __init__(self, config: SCSTConfig, decode: DecodeConfig, references: Sequence[Sequence[str]],
                 tokenizer: BPETokenizer, clip_reward: Optional[ClipReward] = None,
                 vocabulary: Optional[VocabularySubset] = None, seed: int = 0, device: torch.device = None):
        self.config, self.tokenizer, self.vocabulary = config, tokenizer, vocabulary
        self.max_length = config.max_length or decode.max_length
        # candidates: beam, the K best hypotheses of the beam search hw3_2.sh runs (its length penalty)
        self.beams = dataclasses.replace(decode, beam_size=config.samples, max_length=self.max_length,
                                         no_repeat_ngram_size=0)
        self.cider = CiderReward(references, config.end_token)
        self.clip = clip_reward if config.clip_weight > 0 else None
        self.generator = torch.Generator(device=device or "cpu")
        self.generator.manual_seed(seed)

    def rewards(self, token_ids: Sequence[Sequence[int]], image_index: Sequence[int]
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(reward, CIDEr-D) of each caption, float64 tensors."""
        captions = [clean_caption(self.tokenizer.decode(ids)) for ids in token_ids]
        cider = torch.tensor(self.cider(captions, image_index), dtype=torch.float64)
        if self.clip is None:
            return cider, cider
        return cider + self.config.clip_weight * torch.tensor(self.clip(captions, image_index), dtype=torch.float64), \
            cider

    def loss(self, captioner: CaptionModel, batch: CaptionBatch, encode: bool, amp: bool, device: torch.device,
             forward: Optional[nn.Module] = None) -> Tuple[torch.Tensor, SCSTStats]:
        """The SCST loss of one batch of images (`batch.images`: images, or cached tokens when not `encode`; the
        references come by `batch.image_index`). `forward`: what runs the decoder (DDP wrapper or the captioner)."""
        config, K = self.config, self.config.samples
        images = batch.images.to(device, non_blocking=True)
        index = batch.image_index.tolist()
        with torch.no_grad():
            tokens = captioner.encode_images(images) if encode else images.float()
        captioner.eval()
        drawn = self.candidates(captioner, tokens)
        ended = [len(ids) < self.max_length for ids in drawn]  # max_length tokens: cut, no end token chosen
        greedy = None
        if config.baseline == "greedy":
            greedy_ids, _ = sample(captioner, tokens, 1, self.max_length, 0.0, self.vocabulary)
            greedy = self.rewards(greedy_ids, index)[0]
        captioner.train()
        per_sample = [i for i in index for _ in range(K)]
        rewards, cider = self.rewards(drawn, per_sample)
        advantage = (rewards.view(-1, K) - baseline_rewards(rewards.view(-1, K), greedy)).view(-1)
        loss = self.policy_loss(captioner, tokens.repeat_interleave(K, dim=0), drawn, ended, advantage, amp, device,
                                forward)
        return loss, SCSTStats(float(rewards.mean()), float(cider.mean()), sum(ended) / len(ended))

    def candidates(self, captioner: CaptionModel, tokens: torch.Tensor) -> List[List[int]]:
        """K captions per image, rows [image][candidate]: drawn (scst.candidates: sample) or the beam search's
        hypotheses (beam; an image with fewer than K repeats its best)."""
        K = self.config.samples
        if self.config.candidates == "sample":
            return sample(captioner, tokens, K, self.max_length, self.config.temperature, self.vocabulary,
                          self.generator)[0]
        per_image = beam_candidates(captioner, tokens, self.beams, self.vocabulary)
        return [ids for hypotheses in per_image for ids in (hypotheses + [hypotheses[0]] * K)[:K]]

    def policy_loss(self, captioner: CaptionModel, tokens: torch.Tensor, drawn: Sequence[Sequence[int]],
                    ended: Sequence[bool], advantage: torch.Tensor, amp: bool, device: torch.device,
                    forward: Optional[nn.Module] = None) -> torch.Tensor:
        """-mean over tokens of advantage * log p(token) for the drawn captions (one per row of the image tokens
        [R, N, D]), from one teacher-forced pass; a caption's end token counts when it drew one."""
        input_ids, targets = make_caption_batch(drawn)
        for row, done in enumerate(ended):  # a caption cut at max_length never chose the end token
            if not done:
                targets[row, len(drawn[row])] = IGNORE_INDEX
        input_ids, targets = input_ids.to(device), targets.to(device)
        vocabulary = self.vocabulary
        with autocast_for(device) if amp else nullcontext(), \
                vocabulary.head(captioner.decoder) if vocabulary else nullcontext():
            logits = (forward or captioner)(input_ids, tokens)
        if vocabulary:
            targets = vocabulary.targets(targets)
        mask = targets != IGNORE_INDEX
        log_probs = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        weights = advantage.to(device, torch.float32)[:, None] * mask
        return -(weights * log_probs).sum() / mask.sum().clamp(min=1)


DANGLING_WORDS = ("a", "an", "the", "with", "and", "of", "on", "in")


def dangling_share(captions: Dict[str, str], words: Sequence[str] = DANGLING_WORDS) -> float:
    """The share of captions whose last word (PTB-style tokens) is one of `words`: a caption cut mid-phrase."""
    last = [text.split()[-1] if text else "" for text in simple_tokenize({"c": list(captions.values())})["c"]]
    return sum(word in words for word in last) / max(1, len(last))
