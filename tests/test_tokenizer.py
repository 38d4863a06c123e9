"""Tokenizer: lossless round trip, special ids, the mask is never produced from text."""

from __future__ import annotations

import pytest

from tzd.tokenizer import EOS_ID, MASK_ID, Tokenizer, train_tokenizer

CORPUS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 20,
    "ROMEO.\nBut, soft! what light through yonder window breaks?\n" * 20,
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return train_tokenizer(CORPUS, 320, tmp_path_factory.mktemp("tok") / "tokenizer.model")


@pytest.mark.parametrize("text", [
    "", " ", "  two leading spaces", "trailing  \n", "\n\n\nnewlines\r\nand CRLF", "tabs\tand\t\tmore",
    "naïve café — Æsir, 東京, emoji 🙂🎭", "<mask> is text, not the mask", "ALL CAPS!!! ???", "a" * 500,
])
def test_round_trip(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


def test_special_ids_and_mask_never_from_text(tok: Tokenizer) -> None:
    assert tok.mask_id == MASK_ID and tok.eos_id == EOS_ID
    assert tok.sp.id_to_piece(MASK_ID) == "<mask>"
    assert MASK_ID not in tok.encode("<mask> <mask>")
    assert tok.vocab_size == 320


def test_vocab_too_small(tmp_path) -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(CORPUS, 100, tmp_path / "t.model")
