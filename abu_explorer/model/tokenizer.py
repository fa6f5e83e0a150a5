"""A compact word-level tokenizer built from the training captions.

open_clip's BPE vocabulary has 49k entries: an embedding table far larger than the rest of our tiny
text tower. The embedded model only ever sees emoji names, so a vocabulary of the caption words (plus
punctuation tokens) is enough. Unknown words map to ``<unk>``; ``unknown_words`` lets the UI say which
words of a prompt the model does not know. Prompts longer than the context are refused, not truncated.
"""
from __future__ import annotations

import re
import unicodedata

import torch

PAD, SOT, EOT, UNK = "<pad>", "<sot>", "<eot>", "<unk>"
SPECIALS = [PAD, SOT, EOT, UNK]  # ids 0..3; open_clip config uses pad_id=0, eos_id=2
_TOKEN_RE = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")
MAX_CHARS = 1000  # longer text is refused before it is split (the context holds a few words anyway)


class PromptError(ValueError):
    """A prompt the model cannot take (empty, too long, or holding control characters)."""


def check_text(text) -> None:
    """What every backend refuses before tokenizing: not text, too long to read, control characters."""
    if not isinstance(text, str):
        raise PromptError(f"the prompt must be text, got {type(text).__name__}")
    if len(text) > MAX_CHARS:
        raise PromptError(f"the prompt has {len(text):,} characters; at most {MAX_CHARS} are read")
    if any(unicodedata.category(ch) == "Cc" and ch not in "\t\n\r" for ch in text):
        raise PromptError("the prompt holds control characters; type plain words")


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    return text.replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"').replace("\u201d", '"')


def split_words(text: str) -> list[str]:
    return _TOKEN_RE.findall(normalize(text))


class WordTokenizer:
    def __init__(self, vocab: list[str], context_length: int, added: tuple[str, ...] = ()):
        if vocab[: len(SPECIALS)] != SPECIALS:
            raise ValueError(f"vocabulary must start with {SPECIALS}")
        if any(t not in vocab or t != normalize(t) for t in added):
            raise ValueError(f"added tokens {added} must be lower-case entries of the vocabulary")
        self.added = tuple(added)  # multi-character tokens kept whole (a customized model's modifier)
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.context_length = context_length

    @classmethod
    def from_captions(cls, captions: list[str], context_length: int) -> WordTokenizer:
        words = sorted({w for c in captions for w in split_words(c)})
        tok = cls(SPECIALS + words, context_length)
        longest = max((len(split_words(c)) for c in captions), default=0)
        if longest + 2 > context_length:
            raise ValueError(f"a caption has {longest} tokens; context_length {context_length} must be >= {longest + 2}")
        return tok

    def __len__(self) -> int:
        return len(self.vocab)

    @property
    def max_words(self) -> int:
        return self.context_length - 2

    def words(self, text: str) -> list[str]:
        """The tokens of ``text``: words and punctuation, and each added token (``<new1>``) whole."""
        if not self.added:
            return split_words(text)
        pattern = "(" + "|".join(re.escape(t) for t in self.added) + ")"
        return [w for i, part in enumerate(re.split(pattern, normalize(text)))
                for w in ([part] if i % 2 else split_words(part))]

    def unknown_words(self, text: str) -> list[str]:
        return [w for w in self.words(text) if w not in self.index]

    def encode(self, text: str, allow_empty: bool = True) -> list[int]:
        check_text(text)
        words = self.words(text)
        if not words and not allow_empty:
            raise PromptError("the prompt is empty")
        if len(words) > self.max_words:
            raise PromptError(
                f"the prompt has {len(words)} tokens; this model takes at most {self.max_words} "
                f"(words and punctuation count separately)"
            )
        ids = [self.index[SOT]] + [self.index.get(w, self.index[UNK]) for w in words] + [self.index[EOT]]
        return ids + [self.index[PAD]] * (self.context_length - len(ids))

    def __call__(self, texts: list[str] | str) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        return torch.tensor([self.encode(t) for t in texts], dtype=torch.long)

    def with_token(self, token: str) -> WordTokenizer:
        """A copy that also knows ``token`` (id ``len(self)``), read whole wherever it appears."""
        if token in self.index:
            raise ValueError(f"{token!r} is already a word of the vocabulary")
        return WordTokenizer(self.vocab + [token], self.context_length, self.added + (token,))

    def to_dict(self) -> dict:
        d = {"type": "word", "context_length": self.context_length, "vocab": self.vocab}
        return {**d, "added": list(self.added)} if self.added else d

    @classmethod
    def from_dict(cls, d: dict) -> WordTokenizer:
        if d.get("type") != "word":
            raise ValueError(f"unknown tokenizer type {d.get('type')!r}")
        return cls(d["vocab"], d["context_length"], tuple(d.get("added", ())))
