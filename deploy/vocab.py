"""The diagnosis vocabulary: a word-level tokenizer shared by training and the device.

It is built once from the training split's diagnosis sentences, saved with the dataset, and then used
unchanged by training, export and the on-device decoder (the device turns token ids back into text).
Torch-free on purpose: it is part of the deployment contract.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from deploy.errors import UserError
from deploy.fileio import atomic_write_text

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3

# Words, numbers with a decimal point or a unit ("0.7", "2.5"), and punctuation as separate tokens.
_TOKEN_RE = re.compile(r"[a-z0-9]+(?:[.\-/][a-z0-9]+)*|[^\sa-z0-9]")
_NO_SPACE_BEFORE = {".", ",", ";", ":", ")", "%"}


class VocabularyError(UserError):
    """A vocabulary file or contract entry that cannot be used; the message names the file and the fix."""


def tokenize(text: str) -> list[str]:
    """Lower-case word/number/punctuation tokens of a diagnosis sentence."""
    return _TOKEN_RE.findall(text.lower())


def detokenize(tokens: Iterable[str]) -> str:
    """Join tokens back into a sentence (no space before closing punctuation)."""
    out = ""
    for tok in tokens:
        if out and tok not in _NO_SPACE_BEFORE and not out.endswith("("):
            out += " "
        out += tok
    return out


@dataclass
class Vocabulary:
    """Token list (index = id) plus the maximum generated length (tokens including <eos>)."""

    tokens: list[str]
    max_len: int = 24
    min_freq: int = 1
    _index: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if tuple(self.tokens[: len(SPECIALS)]) != SPECIALS:
            raise VocabularyError(f"vocabulary must start with the special tokens {SPECIALS}, got {self.tokens[:4]}")
        if not all(isinstance(t, str) for t in self.tokens):
            raise VocabularyError("vocabulary tokens must all be strings")
        if len(set(self.tokens)) != len(self.tokens):
            raise VocabularyError("vocabulary has duplicate tokens")
        if self.max_len < 2:
            raise VocabularyError(f"max_len must be >= 2 (one word and <eos>), got {self.max_len}")
        self._index = {t: i for i, t in enumerate(self.tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def build(cls, texts: Iterable[str], min_freq: int = 1, max_len: int = 24) -> Vocabulary:
        """Build from (training-split) sentences; words seen fewer than `min_freq` times map to <unk>.

        `max_len` is a cap: the vocabulary's own max_len is the longest sentence's token count plus
        <eos>, when that is shorter. The decoder runs exactly max_len steps for every image (a static
        graph), so steps no training sentence needs would be paid for on every device call.
        """
        sentences = [tokenize(text) for text in texts if text]
        counts = Counter(tok for tokens in sentences for tok in tokens)
        # Sorted by frequency then alphabetically so the same texts always give the same ids.
        words = sorted((w for w, c in counts.items() if c >= min_freq), key=lambda w: (-counts[w], w))
        longest = max((len(tokens) for tokens in sentences), default=1)
        return cls(tokens=[*SPECIALS, *words], max_len=max(2, min(max_len, longest + 1)), min_freq=min_freq)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` followed by <eos>, truncated to `max_len` (no <bos>, no padding)."""
        ids = [self._index.get(tok, UNK_ID) for tok in tokenize(text)][: self.max_len - 1]
        return [*ids, EOS_ID]

    def encode_padded(self, text: str) -> list[int]:
        """`encode` padded with <pad> to exactly `max_len` ids (the decoder's training target)."""
        ids = self.encode(text)
        return ids + [PAD_ID] * (self.max_len - len(ids))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of generated ids: stops at the first <eos>, skips <pad>/<bos>."""
        words: list[str] = []
        for i in ids:
            i = int(i)
            if i == EOS_ID:
                break
            if i in (PAD_ID, BOS_ID):
                continue
            words.append(self.tokens[i] if 0 <= i < len(self.tokens) else UNK)
        return detokenize(words)

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "max_len": self.max_len, "min_freq": self.min_freq}

    @classmethod
    def from_dict(cls, data: dict) -> Vocabulary:
        if not isinstance(data, dict):
            raise VocabularyError(f"expected a JSON object with tokens and max_len, got {type(data).__name__}")
        unknown = set(data) - {"tokens", "max_len", "min_freq"}
        if unknown:
            raise VocabularyError(f"unknown vocabulary keys {sorted(unknown)}")
        if not isinstance(data.get("tokens"), list):
            raise VocabularyError("'tokens' must be a list of strings")
        try:
            return cls(tokens=list(data["tokens"]), max_len=int(data["max_len"]),
                       min_freq=int(data.get("min_freq", 1)))
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, VocabularyError):
                raise
            raise VocabularyError(f"bad vocabulary entry ({type(exc).__name__}: {exc})") from exc

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        """Read vocab.json; VocabularyError naming the file and the fix when it is unusable."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:  # JSON, UTF-8 and VocabularyError are ValueErrors
            raise VocabularyError(f"{path}: not a valid vocabulary file ({exc}); rebuild it from the train split "
                                  "with `python -m train.data.validate DATASET --build-vocab` (or `make data`)") from exc
