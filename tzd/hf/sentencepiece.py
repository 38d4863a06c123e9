"""TZD's SentencePiece BPE model as a Hugging Face tokenizer.json, for checkpoints exported to a family layout.

TZD trains SentencePiece with identity normalisation, no dummy prefix, whitespace kept as `▁`,
digits split, byte fallback, `\\n` as a user-defined piece and five control pieces. The same rules
in `tokenizers`: spaces become `▁`, words split before each `▁` and between digits, BPE merges
ranked by the merged piece's score (SentencePiece merges the best-scored pair first), bytes as
<0xNN> pieces, and the control pieces and `\\n` as added tokens.
"""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as FastTokenizer

SPACE = "\u2581"


def bpe_merges(sp: spm.SentencePieceProcessor) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges ranked as SentencePiece applies them) of a BPE model."""
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = []
    for piece, i in vocab.items():
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((vocab[piece], vocab[left], vocab[right], left, right))
    merges.sort()
    return vocab, [(left, right) for *_, left, right in merges]


def tokenizer_json(model_file: str | Path) -> FastTokenizer:
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    vocab, merges = bpe_merges(sp)
    unk = sp.id_to_piece(sp.unk_id())
    tk = FastTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    tk.normalizer = normalizers.Replace(" ", SPACE)
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(f"{SPACE}+"), behavior="merged_with_next"),
        pre_tokenizers.Digits(individual_digits=True)])
    tk.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    control = [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)]
    user = [sp.id_to_piece(i) for i in range(sp.get_piece_size())
            if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))
            and sp.id_to_piece(i) == "\n"]
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    return tk
