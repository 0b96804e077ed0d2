"""Training the toy world's stand-in "pretrained" models on CPU in minutes.

- `train_tiny_clip`: a CLIP ViT in OpenAI's layout (`clip.model.CLIP`), trained contrastively on toy images and
  captions; batches never hold two items showing the same objects, so there are no false negatives.
- `train_tiny_lm`: a small GPT-2 (decoder.py) trained on toy captions only, saved in the decoder_model.bin format.

Both models keep their real vocabularies (CLIP 49408, GPT-2 50257 tokens) but train only the embedding rows of the
tokens that occur (`SeenTokenEmbedding`): updating all rows every step would cost more than the rest of the model.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import clip
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from clip.model import CLIP
from tqdm import tqdm

from decoder import Decoder, GPTConfig
from hw3.common.clip_models import CLIP_MEAN, CLIP_STD, encode_text_trimmed
from hw3.p2.model import OutputVocabulary, vocabulary_rows
from hw3.p2.optim import adamw, warmup_cosine_scheduler
from tokenizer import EOT_ID, BPETokenizer, make_caption_batch


class SeenTokenEmbedding(nn.Module):
    """Stands in for an nn.Embedding during training, holding only the rows of `token_ids` as a parameter;
    `write_back` copies them into the full embedding."""

    def __init__(self, embedding: nn.Embedding, token_ids: torch.Tensor):
        super().__init__()
        token_ids = token_ids.long()
        self.weight = nn.Parameter(embedding.weight.detach()[token_ids].clone())
        self.register_buffer("token_ids", token_ids)
        self.register_buffer("index", vocabulary_rows(token_ids, embedding.num_embeddings))  # -1: never seen

    def rows(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = self.index[tokens.long()]
        if bool((rows < 0).any()):
            raise ValueError("a token outside the training vocabulary reached SeenTokenEmbedding")
        return rows

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.weight[self.rows(tokens)]

    @torch.no_grad()
    def write_back(self, embedding: nn.Embedding) -> nn.Embedding:
        embedding.weight[self.token_ids] = self.weight.to(embedding.weight)
        return embedding


class SeenTokenHead(nn.Module):
    """The output layer tied to a SeenTokenEmbedding: logits for its rows only (Decoder.forward reads `weight`)."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight


# ---------------------------------------------------------------------------------------------------- tiny CLIP
@dataclass
class ClipConfig:
    image_size: int = 96          # the p2 scenes' size: a 6 x 6 patch grid, fine enough for P3's grounding score
    patch_size: int = 16          # 16-px patches learnt shape reliably in a sweep where 8-px patches did not
    low_res_size: int = 64        # progressive resizing: all but the last `full_size_epochs` epochs train on
    full_size_epochs: int = 3     # 64-px images (4 x 4 patches, 2.1x cheaper), then the position embeddings grow
    vision_width: int = 128       # heads = width // 64, as clip.model.build_model infers
    vision_layers: int = 4
    text_width: int = 128
    text_layers: int = 3
    embed_dim: int = 128
    epochs: int = 10
    batch_size: int = 128         # scene batches; single-object batches hold each class once (50)
    lr: float = 7e-4
    weight_decay: float = 0.05
    warmup_steps: int = 100
    logit_scale_init: float = 40.0
    attribute_weight: float = 1.0  # the attribute-prompt terms (see train_tiny_clip)
    seed: int = 0


def build_tiny_clip(config: ClipConfig, image_size: Optional[int] = None) -> CLIP:
    return CLIP(config.embed_dim, image_size or config.image_size, config.vision_layers, config.vision_width,
                config.patch_size, 77, 49408, config.text_width, config.text_width // 64, config.text_layers)


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [N, 3, S, S] -> uint8 [N, 3, size, size] (antialiased bicubic), in chunks to bound memory."""
    if images.shape[-1] == size:
        return images
    return torch.cat([F.interpolate(chunk.float(), size=(size, size), mode="bicubic", antialias=True,
                                    align_corners=False).round().clamp(0, 255).to(torch.uint8)
                      for chunk in images.split(1000)])


def grow_position_embedding(model: CLIP, image_size: int) -> nn.Parameter:
    """Sets the ViT's input size to `image_size`: the patch position embeddings are interpolated (bicubic) onto
    the larger grid, the CLS one is kept. Returns the new parameter (optimizers must be told)."""
    visual = model.visual
    old = visual.positional_embedding.detach()
    old_grid, new_grid = int(math.isqrt(len(old) - 1)), image_size // visual.conv1.kernel_size[0]
    patches = old[1:].t().reshape(1, -1, old_grid, old_grid)
    patches = F.interpolate(patches, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    visual.positional_embedding = nn.Parameter(torch.cat([old[:1], patches.reshape(-1, new_grid ** 2).t()]))
    visual.input_resolution = image_size
    return visual.positional_embedding


def tokenize_short(captions: Sequence[str]) -> torch.Tensor:
    tokens = clip.tokenize(list(captions), truncate=True)
    return tokens[:, : int((tokens != 0).sum(1).max())]


def normalise_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> CLIP-normalised float, as clip_models.clip_transform does after resizing."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def unique_key_batches(keys: Sequence[Hashable], batch_size: int, rng: random.Random) -> List[List[int]]:
    """Shuffled batches in which no two items share a key (e.g. the set of objects in the image)."""
    remaining = list(range(len(keys)))
    rng.shuffle(remaining)
    batches = []
    while remaining:
        batch, taken, rest = [], set(), []
        for i in remaining:
            if len(batch) < batch_size and keys[i] not in taken:
                batch.append(i)
                taken.add(keys[i])
            else:
                rest.append(i)
        batches.append(batch)
        remaining = rest
    return [batch for batch in batches if len(batch) > 1]


def epoch_batches(keys: Sequence[Hashable], groups: Sequence[int], batch_size: int, rng: random.Random
                  ) -> List[List[int]]:
    """Unique-key batches built within each group (e.g. single objects, scenes), then shuffled together."""
    batches = []
    for group in sorted(set(groups)):
        members = [i for i, g in enumerate(groups) if g == group]
        batches += [[members[j] for j in batch] for batch in
                    unique_key_batches([keys[i] for i in members], batch_size, rng)]
    rng.shuffle(batches)
    return batches


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE over normalised features; item i's image and text are the positives."""
    logits = scale * image_features @ text_features.t()
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


@torch.no_grad()
def zero_shot_accuracy(model: CLIP, images: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str],
                       template: str = "a photo of a {}.") -> float:
    """Top-1 accuracy of uint8 images [N, 3, S, S] against the prompts `template.format(class_name)`."""
    was_training = model.training
    model.eval()
    device = model.positional_embedding.device
    tokens = tokenize_short([template.format(c) for c in class_names]).to(device)
    text = F.normalize(encode_text_trimmed(model, tokens), dim=-1)
    correct = 0
    images = resize_images(images, model.visual.input_resolution)
    for start in range(0, len(images), 500):
        image = F.normalize(model.encode_image(normalise_images(images[start:start + 500]).to(device)), dim=-1)
        correct += int(((image @ text.t()).argmax(1).cpu() == labels[start:start + 500]).sum())
    model.train(was_training)
    return correct / len(images)


def train_tiny_clip(images: torch.Tensor, captions: List[List[str]], keys: List[Hashable], groups: List[int],
                    config: ClipConfig, attributes: Optional[List[Optional[Tuple[str, str]]]] = None,
                    evaluate: Optional[Callable[[CLIP], Dict[str, float]]] = None, extra_prompts: Sequence[str] = (),
                    device: str = "cpu") -> Tuple[CLIP, List[dict]]:
    """Contrastive training. `images` uint8 [N, 3, S, S]; `captions[i]` the captions of image i (one drawn per visit);
    `keys[i]` what it shows (no two equal keys in a batch, so no false negatives); `groups[i]` its kind (a batch
    holds one kind). `attributes[i]`: (colour, shape) of a single-object image, else None. `extra_prompts`: texts
    that `evaluate` encodes besides the captions (their tokens must be known while training).

    Batches whose items all have attributes add attribute-prompt terms: each image must also pick its shape among
    "a {shape}." and its colour among "a {colour} shape." (image-to-text InfoNCE; these prompts are true captions of
    the image and no prompt set holds a duplicate). Progressive resizing: the first epochs see the images shrunk to
    `config.low_res_size`, the last `config.full_size_epochs` see them as given (`config.image_size`).
    Returns (model in eval mode, history: one record per epoch, with `evaluate`'s results at the last epoch of each
    resolution).
    """
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    texts = sorted({c for caps in captions for c in caps})
    position = {text: i for i, text in enumerate(texts)}
    caption_ids = [[position[c] for c in caps] for caps in captions]
    all_tokens = clip.tokenize(texts, truncate=True)
    attributes = attributes or [None] * len(images)
    colours = sorted({a[0] for a in attributes if a})
    shapes = sorted({a[1] for a in attributes if a})
    attribute_tokens = [tokenize_short([f"a {colour} shape." for colour in colours]),
                        tokenize_short([f"a {shape}." for shape in shapes])]
    attribute_labels = torch.tensor([[colours.index(a[0]), shapes.index(a[1])] if a else [-1, -1]
                                     for a in attributes])

    low_res_epochs = max(0, config.epochs - config.full_size_epochs)
    model = build_tiny_clip(config, config.low_res_size if low_res_epochs else None).float().train()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(config.logit_scale_init))
    seen = torch.unique(torch.cat([all_tokens.flatten(), clip.tokenize(list(extra_prompts) or [""]).flatten()] +
                                  [t.flatten() for t in attribute_tokens]))
    full_embedding, model.token_embedding = model.token_embedding, SeenTokenEmbedding(model.token_embedding, seen)
    model.to(device)
    attribute_tokens = [t.to(device) for t in attribute_tokens]
    optimizer = adamw(model.named_parameters(), config.lr, config.weight_decay, betas=(0.9, 0.98),
                      no_decay=lambda name, p: p.ndim < 2 or "embedding" in name)
    total = len(epoch_batches(keys, groups, config.batch_size, random.Random(0))) * config.epochs
    scheduler = warmup_cosine_scheduler(optimizer, config.warmup_steps, total)
    history, start = [], time.time()
    epoch_images = resize_images(images, model.visual.input_resolution)
    for epoch in range(config.epochs):
        if model.visual.input_resolution != config.image_size and epoch == low_res_epochs:
            old_embedding = model.visual.positional_embedding
            new_embedding = grow_position_embedding(model, config.image_size)
            for group in optimizer.param_groups:
                group["params"] = [new_embedding if p is old_embedding else p for p in group["params"]]
            optimizer.state.pop(old_embedding, None)  # its Adam moments restart at the new shape
            epoch_images = images
        losses = []
        for batch in tqdm(epoch_batches(keys, groups, config.batch_size, rng), leave=False,
                          desc=f"tiny CLIP epoch {epoch + 1}/{config.epochs}"):
            tokens = all_tokens[[rng.choice(caption_ids[i]) for i in batch]]
            tokens = tokens[:, : int((tokens != 0).sum(1).max())].to(device)
            image_features = F.normalize(model.encode_image(normalise_images(epoch_images[batch]).to(device)), dim=-1)
            text_features = F.normalize(encode_text_trimmed(model, tokens), dim=-1)
            scale = model.logit_scale.exp().clamp(max=100)
            loss = contrastive_loss(image_features, text_features, scale)
            labels = attribute_labels[batch].to(device)
            if config.attribute_weight and bool((labels >= 0).all()):
                for which, prompt_tokens in enumerate(attribute_tokens):
                    prompts = F.normalize(encode_text_trimmed(model, prompt_tokens), dim=-1)
                    loss = loss + config.attribute_weight * F.cross_entropy(
                        scale * image_features @ prompts.t(), labels[:, which])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        record = {"epoch": epoch + 1, "image_size": model.visual.input_resolution,
                  "loss": round(float(np.mean(losses)), 4), "seconds": round(time.time() - start, 1)}
        if evaluate and epoch + 1 in (low_res_epochs, config.epochs):  # each resolution's last epoch: ~3 s each
            record.update(evaluate(model))
        history.append(record)
        print("tiny CLIP " + " ".join(f"{k}={v}" for k, v in record.items()), flush=True)
    model.token_embedding = model.token_embedding.write_back(full_embedding.to(device))
    return model.eval(), history


def clip_state_dict(model: CLIP) -> Dict[str, torch.Tensor]:
    """fp16 state_dict in OpenAI's layout, as the released checkpoints are; `clip.model.build_model` accepts it."""
    return {k: v.detach().cpu().half() if v.is_floating_point() else v.cpu() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------------- tiny LM
@dataclass
class LMConfig:
    n_layer: int = 2
    n_embd: int = 128             # n_head = n_embd // 64, what GPTConfig.from_state_dict infers
    epochs: int = 2
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    seed: int = 0


UNSEEN_TOKEN_LOGIT = -40.0  # the logit of every token absent from the training captions, in every context


def pin_constant_dim(decoder) -> None:
    """Final hidden dimension 0 is the constant 1 (ln_f weight 0, bias 1), so wte[:, 0] acts as a per-token bias."""
    with torch.no_grad():
        decoder.transformer.ln_f.weight[0] = 0.0
        decoder.transformer.ln_f.bias[0] = 1.0


@torch.no_grad()
def caption_nll(decoder, token_lists: List[List[int]], batch_size: int = 256) -> Tuple[float, int]:
    """Summed negative log-likelihood (nats) of captions, each as [EOT, tokens, EOT], and the number of targets."""
    total, count = 0.0, 0
    for start in range(0, len(token_lists), batch_size):
        input_ids, targets = make_caption_batch(token_lists[start:start + batch_size])
        logits, _ = decoder(input_ids, use_cache=False)
        total += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
        count += int((targets != -100).sum())
    return total, count


def unigram_perplexity(train_tokens: List[List[int]], val_tokens: List[List[int]], eot_id: int) -> float:
    """Perplexity of a unigram model of the train tokens (+ one end token per caption), add-one smoothed over the
    tokens seen in training (a kinder baseline than smoothing over the whole vocabulary)."""
    counts: Dict[int, int] = {}
    for tokens in train_tokens:
        for t in list(tokens) + [eot_id]:
            counts[t] = counts.get(t, 0) + 1
    total = sum(counts.values()) + len(counts)
    nll = [-math.log((counts.get(t, 0) + 1) / total) for tokens in val_tokens for t in list(tokens) + [eot_id]]
    return math.exp(float(np.mean(nll)))


def train_tiny_lm(train_captions: List[str], config: LMConfig, val_captions: Optional[List[str]] = None):
    """A small GPT-2 (decoder.py, vocab 50257, n_head = n_embd // 64) trained on captions alone.

    Training computes logits for the tokens seen in the train captions only. Afterwards every unseen token's
    embedding is UNSEEN_TOKEN_LOGIT on the constant final dimension (see `pin_constant_dim`) and 0 elsewhere, so the
    saved model's full-vocabulary softmax equals the trained one up to ~50000 * e^-40 of mass, in every context and
    under PEFT too (ln_f stays frozen). Returns (decoder in eval mode, metrics: perplexities and samples).
    """
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    tokenizer = BPETokenizer()
    train_tokens = [tokenizer.encode(c) for c in train_captions]
    seen = torch.tensor(sorted({t for tokens in train_tokens for t in tokens} | {EOT_ID}))
    decoder = Decoder(GPTConfig(n_layer=config.n_layer, n_head=config.n_embd // 64, n_embd=config.n_embd)).train()
    full_wte, full_head = decoder.transformer.wte, decoder.lm_head
    decoder.transformer.wte = SeenTokenEmbedding(full_wte, seen)
    decoder.lm_head = SeenTokenHead(decoder.transformer.wte.weight)  # tied to the trained rows
    vocabulary = OutputVocabulary(seen, decoder.config.vocab_size)
    pin_constant_dim(decoder)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = warmup_cosine_scheduler(optimizer, config.warmup_steps,
                                        math.ceil(len(train_tokens) / config.batch_size) * config.epochs)
    order = list(range(len(train_tokens)))
    for epoch in range(config.epochs):
        rng.shuffle(order)
        losses = []
        for start in tqdm(range(0, len(order), config.batch_size), desc=f"tiny LM epoch {epoch + 1}", leave=False):
            input_ids, targets = make_caption_batch([train_tokens[i] for i in order[start:start + config.batch_size]])
            logits, _ = decoder(input_ids, use_cache=False)
            loss = F.cross_entropy(logits.flatten(0, 1), vocabulary.targets(targets).flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            pin_constant_dim(decoder)
            losses.append(loss.item())
        print(f"tiny LM epoch={epoch + 1} train_loss={np.mean(losses):.4f}", flush=True)
    with torch.no_grad():
        full_wte.weight.zero_()
        full_wte.weight[:, 0] = UNSEEN_TOKEN_LOGIT
    decoder.transformer.wte = decoder.transformer.wte.write_back(full_wte)
    decoder.lm_head = full_head  # still tied to full_wte.weight
    decoder.eval()
    metrics = {"seen_tokens": len(seen), "train_captions": len(train_captions)}
    if val_captions:
        val_tokens = [tokenizer.encode(c) for c in val_captions]
        nll, count = caption_nll(decoder, val_tokens)
        metrics["val_perplexity"] = math.exp(nll / count)
        metrics["unigram_val_perplexity"] = unigram_perplexity(train_tokens, val_tokens, EOT_ID)
    metrics["samples"] = [tokenizer.decode(tokens) for tokens in sample_captions(decoder, 5, seed=config.seed)]
    return decoder, metrics


@torch.no_grad()
def sample_captions(decoder, n: int, seed: int = 0, max_tokens: int = 40) -> List[List[int]]:
    """Token lists sampled from the LM at temperature 1, each started after and stopped at <|endoftext|>."""
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(n):
        tokens, past = [EOT_ID], None
        for _ in range(max_tokens):
            logits, past = decoder(torch.tensor([tokens[-1:]]), past=past)
            token = int(torch.multinomial(F.softmax(logits[0, -1], dim=-1), 1, generator=generator))
            if token == EOT_ID:
                break
            tokens.append(token)
        samples.append(tokens[1:])
    return samples
