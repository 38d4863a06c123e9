"""Incremental detokenisation equals decoding the whole canvas, step after step (server.detokenize)."""

from __future__ import annotations

import numpy as np
import pytest

from server.detokenize import CanvasText, PrefixText, decode_canvas
from tests.server_utils import ROOT
from tzd.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(ROOT / "models" / "shakespeare-small" / "tokenizer.model")


def final_canvases(tok: Tokenizer, rng: np.random.Generator, n: int) -> list[np.ndarray]:
    """Random token ids over the whole vocabulary (byte-fallback pieces included), and real text with
    characters outside the training alphabet (they decode through byte pieces)."""
    ids = [i for i in range(tok.vocab_size) if i != tok.mask_id]
    text = tok.encode("Ô Roméo — où es-tu? «Ça» ñ 日本語 😀 and so, to bed.\n  Exeunt.")
    out = [rng.choice(ids, size=n) for _ in range(6)]
    out += [np.array((text * 3)[:n]), np.array(text[: n // 2] + rng.choice(ids, size=n - n // 2).tolist())]
    return [np.asarray(c, dtype=np.int64) for c in out]


class MetaspaceTokenizer:
    """A LLaMA-style tokenizer (tokenizers' BPE with byte fallback; the Metaspace decoder drops the
    leading space of a text's first word), trained here on a few lines: decode(a + b) != decode(a) +
    decode(b), so extending a run needs its context."""

    def __init__(self) -> None:
        from tokenizers import Tokenizer as HfTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tk = HfTokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
        tk.pre_tokenizer = pre_tokenizers.Metaspace()
        tk.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
        bytes_ = [f"<0x{b:02X}>" for b in range(256)]
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<mask>", *bytes_])
        tk.train_from_iterator(["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind",
                                "to suffer the slings and arrows of outrageous fortune"] * 20, trainer)
        self.tk, self.mask_id, self.vocab_size = tk, tk.token_to_id("<mask>"), tk.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=False)


@pytest.mark.parametrize("tokenizer", ["sentencepiece", "metaspace"])
@pytest.mark.parametrize("order", ["random", "blocks", "left_to_right"])
def test_incremental_text_equals_full_decode(tok: Tokenizer, tokenizer: str, order: str) -> None:
    if tokenizer == "metaspace":
        tok = MetaspaceTokenizer()  # type: ignore[assignment]
        assert tok.decode(tok.encode("to be")) != tok.decode(tok.encode("to")) + tok.decode(tok.encode(" be"))
    rng = np.random.default_rng({"random": 0, "blocks": 1, "left_to_right": 2}[order])
    m, n = tok.mask_id, 40
    for final in final_canvases(tok, rng, n):
        if order == "random":
            sequence = rng.permutation(n)
        elif order == "blocks":  # LLaDA: blocks left to right, any order inside a block
            sequence = np.concatenate([b + rng.permutation(8) for b in range(0, n, 8)])
        else:
            sequence = np.arange(n)
        canvas = np.full(n, m, dtype=np.int64)
        text, prefix = CanvasText(tok.decode, m), PrefixText(tok.decode)
        assert text.update(canvas) == "_" * n
        i = 0
        while i < n:
            k = int(rng.integers(1, 5))  # a step commits 1-4 positions
            canvas[sequence[i:i + k]] = final[sequence[i:i + k]]
            i += k
            assert text.update(canvas) == decode_canvas(tok.decode, canvas, m)
            first_mask = int(np.argmax(canvas == m)) if (canvas == m).any() else n
            assert prefix.update(canvas, first_mask) == tok.decode(canvas[:first_mask].tolist())
        assert text.update(canvas) == tok.decode(final.tolist())


def test_extension_decodes_only_the_new_tokens(tok: Tokenizer) -> None:
    """A prefix that grows by one token decodes a few tokens per step, not the whole prefix."""
    ids = np.array(tok.encode("To be, or not to be, that is the question: " * 8), dtype=np.int64)
    decoded: list[int] = []

    def counting_decode(part: list[int]) -> str:
        decoded.append(len(part))
        return tok.decode(part)

    prefix = PrefixText(counting_decode)
    for n in range(1, len(ids) + 1):
        assert prefix.update(ids, n) == tok.decode(ids[:n].tolist())
    assert max(decoded) <= 5 and sum(decoded) < 12 * len(ids)
