"""Tokenizers. The offline default is the embedded byte-level tokenizer; others load from local files only.

There is no model hub here: a name that is not a local path fails at once with a message saying what to do.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar, Protocol

from reference.validation import ConfigError

__all__ = ["ByteTokenizer", "HFTokenizer", "Tokenizer", "load_tokenizer"]


class Tokenizer(Protocol):
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    mask_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """[TOK-1] UTF-8 bytes 0–255 are their own ids; specials follow: pad 256, bos 257, eos 258, mask 259."""

    vocab_size = 260
    pad_id, bos_id, eos_id, mask_id = 256, 257, 258, 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer read from a local `tokenizer.json`.

    Special ids are looked up by their usual spellings; a missing special gets a fresh id past the vocabulary
    (so `vocab_size` grows by one for each), which keeps every id a model sees in range.
    """

    SPELLINGS: ClassVar[dict[str, tuple[str, ...]]] = {
        "pad_id": ("<pad>", "[PAD]", "<|padding|>"),
        "bos_id": ("<s>", "<|im_start|>", "[CLS]", "<|endoftext|>"),
        "eos_id": ("</s>", "<|endoftext|>", "<|im_end|>", "[SEP]"),
        "mask_id": ("<mask>", "[MASK]"),
    }

    pad_id: int
    bos_id: int
    eos_id: int
    mask_id: int

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as _HF

        self._tok: Any = _HF.from_file(str(path))
        size = int(self._tok.get_vocab_size(with_added_tokens=True))
        for attr, spellings in self.SPELLINGS.items():
            found = next((self._tok.token_to_id(s) for s in spellings if self._tok.token_to_id(s) is not None), None)
            if found is None:
                found, size = size, size + 1
            setattr(self, attr, int(found))
        self.vocab_size = size

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode([int(i) for i in ids]))


@lru_cache(maxsize=8)
def load_tokenizer(name_or_path: str = "byte") -> Tokenizer:
    """`"byte"` → ByteTokenizer; a local `tokenizer.json` (or a folder holding one) → HFTokenizer."""
    if name_or_path == "byte":
        return ByteTokenizer()
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(
            f"tokenizer: {name_or_path!r} is neither 'byte' nor a local tokenizer.json; there is no model-hub "
            f"access here, so download the tokenizer.json elsewhere and pass its path (or use 'byte')")
    if importlib.util.find_spec("tokenizers") is None:
        raise ConfigError(f"tokenizer: loading {str(path)!r} needs the `tokenizers` package (pip install tokenizers)")
    return HFTokenizer(path)
