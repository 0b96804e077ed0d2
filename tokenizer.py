"""GPT-2 byte-level BPE tokenizer (the course's tokenizer: GPT-2 vocabulary, encoder.json + vocab.bpe).

Text -> "words" by GPT-2's regex -> each word's UTF-8 bytes shown as printable unicode characters (one per byte)
-> merged by the BPE ranks in vocab.bpe -> ids from encoder.json. Decoding runs the chain backwards.
The only special token is <|endoftext|> = 50256; in captioning it is both the start and the end token.
"""
import json
import os
from typing import AbstractSet, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import regex
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
EOT = "<|endoftext|>"
EOT_ID = 50256
IGNORE_INDEX = -100  # targets that the loss skips (torch.nn.functional.cross_entropy's default ignore_index)

# GPT-2's pre-tokenizer: contractions, letters, digits, other symbols, each optionally led by one space;
# runs of whitespace keep their last space for the next word (the `(?!\S)` look-ahead).
WORD_PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters.

    Printable Latin-1 bytes map to themselves; the rest (control characters, space, ...) are shifted to 256+, so
    that no BPE token contains whitespace or control characters (a space shows up as 'Ġ').
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    byte_to_char = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in byte_to_char:
            byte_to_char[b] = chr(256 + shifted)
            shifted += 1
    return byte_to_char


class BPETokenizer:
    """GPT-2 tokenizer. `encode` memoizes every word it has merged, so repeated words cost one dict lookup
    (the cache grows with the number of distinct words: about 20k entries for 53k captions)."""

    def __init__(self, encoder_file: str = os.path.join(HERE, "encoder.json"),
                 vocab_file: str = os.path.join(HERE, "vocab.bpe")):
        with open(encoder_file, encoding="utf-8") as f:
            self.encoder: Dict[str, int] = json.load(f)
        self.decoder = {i: token for token, i in self.encoder.items()}
        with open(vocab_file, encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split(" ")) for line in lines[1:] if line]  # line 0 is "#version: 0.2"
        self.bpe_ranks: Dict[Tuple[str, str], int] = {pair: rank for rank, pair in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.special_tokens = {EOT: self.encoder[EOT]}
        self.vocab_size = len(self.encoder)
        self.cache: Dict[str, List[int]] = {}  # word (as matched by WORD_PATTERN) -> its ids

    def bpe(self, word: str) -> List[str]:
        """Merge the characters of one byte-mapped word, lowest-ranked pair first, until no known pair is left."""
        parts = list(word)
        while len(parts) > 1:
            pairs = set(zip(parts, parts[1:]))
            best = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if best not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def encode_ordinary(self, text: str) -> List[int]:
        """Encode text with no special-token handling: '<|endoftext|>' becomes plain characters."""
        ids: List[int] = []
        for word in WORD_PATTERN.findall(text):
            word_ids = self.cache.get(word)
            if word_ids is None:
                mapped = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
                word_ids = [self.encoder[token] for token in self.bpe(mapped)]
                self.cache[word] = word_ids
            ids.extend(word_ids)
        return ids

    def encode(self, text: str, allowed_special: Union[str, AbstractSet[str]] = frozenset()) -> List[int]:
        """Text -> ids. '<|endoftext|>' in `text` becomes 50256 only if allowed
        (allowed_special={'<|endoftext|>'} or "all"); otherwise a ValueError is raised, as tiktoken does."""
        if allowed_special == "all":
            allowed = set(self.special_tokens)
        else:
            allowed = set(allowed_special)
            unknown = allowed - set(self.special_tokens)
            if unknown:
                raise ValueError(f"unknown special tokens {sorted(unknown)}; this tokenizer only has {EOT!r}")
        disallowed = [token for token in self.special_tokens if token not in allowed and token in text]
        if disallowed:
            token = disallowed[0]
            raise ValueError(
                f"text contains the special token {token!r}, which is not allowed. Pass allowed_special={{{token!r}}} "
                f"(or 'all') to encode it as id {self.special_tokens[token]}, or use encode_ordinary() to encode it "
                f"as plain text.")
        if not allowed:
            return self.encode_ordinary(text)
        # Split around the allowed special tokens; the capture group keeps them in the list.
        splitter = "(" + "|".join(regex.escape(token) for token in sorted(allowed)) + ")"
        ids: List[int] = []
        for piece in regex.split(splitter, text):
            if piece in allowed:
                ids.append(self.special_tokens[piece])
            elif piece:
                ids.extend(self.encode_ordinary(piece))
        return ids

    def encode_batch(self, texts: Iterable[str],
                     allowed_special: Union[str, AbstractSet[str]] = frozenset()) -> List[List[int]]:
        return [self.encode(text, allowed_special) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text. 50256 decodes to '<|endoftext|>'. Byte sequences that are not valid UTF-8 (possible when a
        caption is cut mid-character) become U+FFFD instead of raising."""
        tokens = []
        for i in ids:
            token = self.decoder.get(int(i))
            if token is None:
                raise ValueError(f"token id {int(i)} is outside the vocabulary (0..{self.vocab_size - 1})")
            tokens.append(token)
        data = bytes(self.byte_decoder[c] for c in "".join(tokens))
        return data.decode("utf-8", errors="replace")


def make_caption_batch(token_lists: Sequence[Sequence[int]],
                       max_len: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forcing batch for captioning: (input_ids, targets), both LongTensor [B, K], K = longest N + 2.

    For caption tokens t1..tN (first cut to max_len tokens when max_len is given):
        input  = [50256, t1, ..., tN, 50256, 50256 (pad) ...]
        target = [t1, ..., tN, 50256, -100, -100 (pad) ...]
    so position j predicts input token j+1, the end token 50256 is learnt after tN, and the last real input position
    (the end token itself) has target -100 like the padding. `targets != -100` marks the positions that matter.

    >>> inputs, targets = make_caption_batch([[64, 9592], [64]])
    >>> inputs.tolist()
    [[50256, 64, 9592, 50256], [50256, 64, 50256, 50256]]
    >>> targets.tolist()
    [[64, 9592, 50256, -100], [64, 50256, -100, -100]]
    """
    if max_len is not None and max_len < 0:
        raise ValueError(f"max_len must be >= 0, got {max_len}")
    captions = [list(tokens)[:max_len] if max_len is not None else list(tokens) for tokens in token_lists]
    if not captions:
        raise ValueError("make_caption_batch needs at least one caption")
    width = max(len(tokens) for tokens in captions) + 2
    input_ids = torch.full((len(captions), width), EOT_ID, dtype=torch.long)
    targets = torch.full((len(captions), width), IGNORE_INDEX, dtype=torch.long)
    for row, tokens in enumerate(captions):
        n = len(tokens)
        input_ids[row, 1:n + 1] = torch.tensor(tokens, dtype=torch.long)
        targets[row, :n] = torch.tensor(tokens, dtype=torch.long)
        targets[row, n] = EOT_ID
    return input_ids, targets


def main():
    import argparse
    import time

    parser = argparse.ArgumentParser(description="GPT-2 BPE: print the ids of some text, or time encoding the captions "
                                                 "of an annotation file (train.json layout).")
    parser.add_argument("text", nargs="*", help="text to encode ('<|endoftext|>' allowed)")
    parser.add_argument("--time-captions", metavar="JSON",
                        help='annotation file {"annotations": [{"caption": ...}, ...]}: time encoding all its captions')
    args = parser.parse_args()
    if not args.text and not args.time_captions:
        parser.error("give some text or --time-captions JSON")
    tokenizer = BPETokenizer()
    for text in args.text:
        ids = tokenizer.encode(text, allowed_special="all")
        print(ids)
        print([tokenizer.decoder[i] for i in ids])
    if args.time_captions:
        with open(args.time_captions, encoding="utf-8") as f:
            captions = [item["caption"] for item in json.load(f)["annotations"]]
        start = time.perf_counter()
        token_lists = tokenizer.encode_batch(captions)
        seconds = time.perf_counter() - start
        print(f"{len(captions)} captions -> {sum(map(len, token_lists))} tokens in {seconds:.2f}s "
              f"({len(tokenizer.cache)} distinct words merged)")


if __name__ == "__main__":
    main()
