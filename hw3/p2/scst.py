"""Self-critical sequence training (SCST, Rennie et al. 2017): after cross-entropy, train on the metric itself.

For each training image the model's beam search gives `samples` candidate captions (its K best finished hypotheses,
with hw3_2.sh's length penalty); each gets a reward, CIDEr-D against that image's references plus clip_weight *
CLIPScore; the loss raises the log-probability of the captions that beat the baseline and lowers that of the others:

    loss = -mean over tokens of (reward - baseline) * log p(token)

The baseline is the mean reward of the image's other candidates (Luo 2020, "A better variant of self-critical
sequence training"): no extra decoding. The search runs in eval mode without gradient; the log-probabilities come
from one teacher-forced pass over the candidates in training mode (the usual two-pass form: same numbers without
dropout, and only one pass keeps activations for backward).

The reward's CIDEr-D is the scorer's own (metrics.CiderD) with the document frequencies of all training
references, computed once, on a pure-Python tokenisation (metrics.simple_tokenize: no Java per step). With
`end_token`, both the candidate and the references get an end-of-caption word, so a caption cut after "on a"
matches no reference's ending: without it SCST learns to stop on dangling words, which CIDEr-D does not punish.
"""
import dataclasses
from contextlib import nullcontext
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from hw3.common.clip_models import encode_text_trimmed
from hw3.common.images import ImageFiles
from hw3.p2.config import SCSTConfig
from hw3.p2.data import CaptionBatch
from hw3.p2.generation import DecodeConfig, autocast_for, beam_candidates, clean_caption
from hw3.p2.metrics import CiderD, ClipScorer, read_image_like_course, simple_tokenize
from hw3.p2.model import CaptionModel
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
    caption (encode_text_trimmed: the text tower's cost falls with the positions it runs)."""

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


def baseline_rewards(rewards: torch.Tensor) -> torch.Tensor:
    """The baseline [B, K] of candidate rewards [B, K]: the mean of the image's other K - 1 candidates."""
    K = rewards.size(1)
    return (rewards.sum(1, keepdim=True) - rewards) / (K - 1)


class SelfCritical:
    """The SCST objective: `loss, stats = objective(model, batch)`, like training.CrossEntropy (`model`: the
    captioner, or its DistributedDataParallel wrapper; `batch`: images or cached tokens, references by
    `batch.image_index`). stats: the candidates' mean reward, their mean CIDEr-D (the reward without CLIPScore),
    and the share that ended with the end token."""

    def __init__(self, config: SCSTConfig, decode: DecodeConfig, references: Sequence[Sequence[str]],
                 tokenizer: BPETokenizer, clip_reward: Optional[ClipReward] = None, amp: bool = False):
        self.config, self.tokenizer, self.amp = config, tokenizer, amp
        self.max_length = config.max_length or decode.max_length
        # the K best hypotheses of the beam search hw3_2.sh runs (its length penalty)
        self.beams = dataclasses.replace(decode, beam_size=config.samples, max_length=self.max_length,
                                         no_repeat_ngram_size=0)
        self.cider = CiderReward(references, config.end_token)
        self.clip = clip_reward if config.clip_weight > 0 else None

    def rewards(self, token_ids: Sequence[Sequence[int]], image_index: Sequence[int]
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(reward, CIDEr-D) of each caption, float64 tensors."""
        captions = [clean_caption(self.tokenizer.decode(ids)) for ids in token_ids]
        cider = torch.tensor(self.cider(captions, image_index), dtype=torch.float64)
        if self.clip is None:
            return cider, cider
        return cider + self.config.clip_weight * torch.tensor(self.clip(captions, image_index), dtype=torch.float64), \
            cider

    def __call__(self, model: nn.Module, batch: CaptionBatch) -> Tuple[torch.Tensor, Dict[str, float]]:
        K = self.config.samples
        captioner: CaptionModel = getattr(model, "module", model)  # under DDP, the wrapped captioner
        tokens = captioner.image_tokens(batch.images)
        index = batch.image_index.tolist()
        captioner.eval()
        drawn = self.candidates(captioner, tokens)
        captioner.train()
        ended = [len(ids) < self.max_length for ids in drawn]  # max_length tokens: cut, no end token chosen
        rewards, cider = self.rewards(drawn, [i for i in index for _ in range(K)])
        advantage = (rewards.view(-1, K) - baseline_rewards(rewards.view(-1, K))).view(-1)
        loss = self.policy_loss(model, tokens.repeat_interleave(K, dim=0), drawn, ended, advantage)
        return loss, {"reward": float(rewards.mean()), "sample_cider": float(cider.mean()),
                      "sample_ended": sum(ended) / len(ended)}

    def candidates(self, captioner: CaptionModel, tokens: torch.Tensor) -> List[List[int]]:
        """K captions per image, rows [image][candidate]: the beam search's hypotheses (an image with fewer than K
        repeats its best)."""
        K = self.config.samples
        per_image = beam_candidates(captioner, tokens, self.beams)
        return [ids for hypotheses in per_image for ids in (hypotheses + [hypotheses[0]] * K)[:K]]

    def policy_loss(self, model: nn.Module, tokens: torch.Tensor, drawn: Sequence[Sequence[int]],
                    ended: Sequence[bool], advantage: torch.Tensor) -> torch.Tensor:
        """-mean over tokens of advantage * log p(token) for the candidates (one per row of the image tokens
        [R, N, D]), from one teacher-forced pass; a caption's end token counts when it chose one."""
        device = tokens.device
        input_ids, targets = make_caption_batch(drawn)
        for row, done in enumerate(ended):  # a caption cut at max_length never chose the end token
            if not done:
                targets[row, len(drawn[row])] = IGNORE_INDEX
        input_ids, targets = input_ids.to(device), targets.to(device)
        with autocast_for(device) if self.amp else nullcontext():
            logits = model(input_ids, tokens)
        targets = getattr(model, "module", model).output_targets(targets)
        mask = targets != IGNORE_INDEX
        log_probs = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        weights = advantage.to(device, torch.float32)[:, None] * mask
        return -(weights * log_probs).sum() / mask.sum().clamp(min=1)


DANGLING_WORDS = ("a", "an", "the", "with", "and", "of", "on", "in")


def dangling_share(captions: Dict[str, str], words: Sequence[str] = DANGLING_WORDS) -> float:
    """The share of captions whose last word (PTB-style tokens) is one of `words`: a caption cut mid-phrase."""
    last = [text.split()[-1] if text else "" for text in simple_tokenize({"c": list(captions.values())})["c"]]
    return sum(word in words for word in last) / max(1, len(last))
