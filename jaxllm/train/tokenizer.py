"""Tokenizers: character level (seed 003's CharTokenizer, saved as JSON), byte-level BPE trained
with Hugging Face `tokenizers`, or any existing tokenizer.json. All three share `encode`,
`decode`, `vocab_size` and `save`, and never fail on text they have not seen: an unknown
character becomes the CharTokenizer's `unk` character; byte-level BPE covers every byte.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from jaxllm.files import atomic_write, read_text
from jaxllm.errors import DataError

UNK = "\ufffd"  # the replacement character stands in for every character outside the vocabulary
EOT = "<|endoftext|>"


class CharTokenizer:
    """One id per character of the corpus (sorted), plus `UNK` for any other character."""

    def __init__(self, chars: Iterable[str]):
        chars = sorted(set(chars) | {UNK})
        self.chars = chars
        self.codepoints = np.array([ord(c) for c in chars], np.uint32)  # sorted: ord order = str order
        self.unk_id = chars.index(UNK)

    @classmethod
    def train(cls, texts: Iterable[str]) -> "CharTokenizer":
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        return cls(seen)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)
        ids = np.searchsorted(self.codepoints, cps)
        ids = np.minimum(ids, len(self.chars) - 1)
        return np.where(self.codepoints[ids] == cps, ids, self.unk_id).astype(np.int32)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] if 0 <= int(i) < len(self.chars) else UNK for i in ids)

    def save(self, path: Path) -> None:
        atomic_write(path, json.dumps({"type": "char", "chars": self.chars}, ensure_ascii=False))


class HFTokenizer:
    """A Hugging Face `tokenizers.Tokenizer` (our byte-level BPE, or any tokenizer.json)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    @classmethod
    def train_bpe(cls, texts: Iterator[str], vocab_size: int) -> "HFTokenizer":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    @property
    def eot_id(self) -> int | None:
        """Appended after each document, when the vocabulary has it."""
        return self.tokenizer.token_to_id(EOT)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text).ids, np.int32)

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    def save(self, path: Path) -> None:
        atomic_write(path, self.tokenizer.to_str())


Tokenizer = CharTokenizer | HFTokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Our char JSON or any Hugging Face tokenizer.json."""
    text = read_text(path, "tokenizer file", "a tokenizer.json")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"tokenizer file {str(path)!r} is not JSON: {e}") from None
    if isinstance(data, dict) and data.get("type") == "char":
        return CharTokenizer(data["chars"])
    from tokenizers import Tokenizer as HF

    try:
        return HFTokenizer(HF.from_str(text))
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
        raise DataError(f"tokenizer file {str(path)!r} is not a tokenizers JSON: {str(e).splitlines()[0]}") from None


def build_tokenizer(kind: str, texts, bpe_vocab_size: int) -> Tokenizer:
    """The tokenizer train.tokenizer=`kind` names: 'char' (the corpus's characters) or 'bpe' (byte-level
    BPE of `bpe_vocab_size` tokens), each trained on `texts()`, a zero-argument callable that returns
    a fresh iterable of the corpus's strings (called once, only for these two); any other `kind` is
    the path of a tokenizer.json, loaded as it is (`bpe_vocab_size` unused)."""
    if kind == "char":
        return CharTokenizer.train(texts())
    if kind == "bpe":
        return HFTokenizer.train_bpe(texts(), bpe_vocab_size)
    return load_tokenizer(kind)
