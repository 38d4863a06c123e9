"""A Hugging Face `tokenizers` tokenizer (tokenizer.json) behind the interface of TZD's SentencePiece one."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as FastTokenizer

from tzd.hf.chat import ChatTemplate, template_source
from tzd.tokenizer import SpecialIds

TOKENIZER_JSON, TOKENIZER_CONFIG, CHAT_TEMPLATE_FILE = "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"


class HFTokenizer:
    """encode/decode like tzd.tokenizer.Tokenizer; special ids and the eos set as the checkpoint gives them.

    `encode` adds the tokenizer's own special tokens (a BOS where its post-processor has one), as
    completions do in transformers and vLLM; a rendered chat prompt already holds them, so
    `encode_chat` adds none. Decoding drops special tokens (end-of-turn, padding)."""

    def __init__(self, path: str | Path, special: SpecialIds, eos_ids: tuple[int, ...],
                 tokenizer_config: dict[str, Any]) -> None:
        self.path = Path(path)
        self.tk = FastTokenizer.from_file(str(self.path))
        self.special, self._eos_ids = special, eos_ids
        self._vocab_size = max(self.tk.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        template_file = self.path.parent / CHAT_TEMPLATE_FILE
        source = template_file.read_text() if template_file.is_file() else template_source(tokenizer_config)
        self.chat = ChatTemplate(source, tokenizer_config) if source else None

    @property
    def vocab_size(self) -> int:
        """One past the largest id (the published vocabularies leave gaps below their special tokens)."""
        return self._vocab_size

    @property
    def mask_id(self) -> int:
        return self.special.mask

    @property
    def eos_id(self) -> int | None:
        return self.special.eos

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return self._eos_ids

    def set_special(self, special: SpecialIds, eos_ids: tuple[int, ...]) -> None:
        """The ids the checkpoint's files name (resolved with this tokenizer's own token lookup)."""
        self.special, self._eos_ids = special, eos_ids

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=True).ids

    def encode_chat(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=True)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=True)

    def piece(self, token_id: int) -> str:
        return self.tk.id_to_token(int(token_id)) or ""

    def token_id(self, text: str) -> int | None:
        return self.tk.token_to_id(text)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path` ({} when the file is absent); ValueError naming the file when it is not one."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return value
