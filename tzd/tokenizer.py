"""SentencePiece BPE tokenizer with identity normalization and byte fallback (lossless round trip)."""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import sentencepiece as spm

# Fixed layout of the special pieces: unk, bos, eos, pad, then the mask as a user-defined piece.
UNK_ID, BOS_ID, EOS_ID, PAD_ID, MASK_ID = 0, 1, 2, 3, 4
MASK_PIECE = "<mask>"
MIN_VOCAB_SIZE = 5 + 256 + 8  # specials + the 256 byte-fallback pieces + a few merges


@dataclass(frozen=True)
class SpecialIds:
    """TZD's fixed layout by default; a public checkpoint's own ids (None where it has none) otherwise."""

    mask: int = MASK_ID
    bos: int | None = BOS_ID
    eos: int | None = EOS_ID
    pad: int | None = PAD_ID
    unk: int | None = UNK_ID


class TextTokenizer(Protocol):
    """What the sampler and the server need of a tokenizer: TZD's SentencePiece one (below) or a public
    family's tokenizer.json (tzd.hf.tokenizer.HFTokenizer)."""

    special: SpecialIds
    chat: Any  # tzd.hf.chat.ChatTemplate, or None for a model without a chat template

    @property
    def vocab_size(self) -> int: ...
    @property
    def mask_id(self) -> int: ...
    @property
    def eos_ids(self) -> tuple[int, ...]: ...
    def encode(self, text: str) -> list[int]: ...
    def encode_chat(self, text: str) -> list[int]: ...  # a rendered chat prompt: no special tokens added
    def decode(self, ids: Iterable[int]) -> str: ...


class Tokenizer:
    """Wraps a SentencePiece model; `decode(encode(s)) == s` for any string."""

    def __init__(self, model_path: str | Path) -> None:
        self.path = Path(model_path)
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.special = SpecialIds()
        if self.sp.piece_to_id(MASK_PIECE) != MASK_ID:
            raise ValueError(f"{self.path}: not a TZD tokenizer (no {MASK_PIECE} piece at id {MASK_ID})")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def mask_id(self) -> int:
        return self.special.mask

    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Every id that ends a generation (one here; a public instruct model may have several)."""
        return (EOS_ID,)

    chat = None  # no chat template: TZD's own models are plain text models

    def encode_chat(self, text: str) -> list[int]:
        return self.encode(text)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text, out_type=int)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts, out_type=int)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])



def train_tokenizer(texts: Iterable[str], vocab_size: int, out_path: str | Path,
                    max_sentence_length: int = 8192) -> Tokenizer:
    """Train the BPE model on `texts` (one string per document) and write it to `out_path`."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"tokenizer.vocab_size={vocab_size} is too small: it must be >= {MIN_VOCAB_SIZE} "
                         "(5 special pieces + 256 byte pieces + merges)")
    # One line per sentence: SentencePiece trains on lines; newlines are restored through user symbols.
    lines = [ln for t in texts for ln in t.splitlines() if ln.strip()]
    model = io.BytesIO()
    try:
        _train_spm(lines, model, vocab_size, max_sentence_length)
    except RuntimeError as e:  # SentencePiece's own checks, e.g. fewer pieces than the corpus has characters
        msg = str(e).strip().splitlines()[-1].split("] ")[-1]
        raise ValueError(f"tokenizer.vocab_size={vocab_size}: {msg}") from None
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_bytes(model.getvalue())
    tmp.replace(out)
    return Tokenizer(out)


def _train_spm(lines: list[str], model: io.BytesIO, vocab_size: int, max_sentence_length: int) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        byte_fallback=True,
        character_coverage=0.9995,
        max_sentence_length=max_sentence_length,
        unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
        control_symbols=[MASK_PIECE],
        user_defined_symbols=["\n"],
        minloglevel=2,
        num_threads=2,
    )
