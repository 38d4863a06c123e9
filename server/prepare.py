"""Check a request against the loaded model and the server's limits: prompt ids and a RequestPlan."""

from __future__ import annotations

from typing import Any

from clients.protocol import SamplingParams
from server.errors import InvalidRequest
from tzd.hf.chat import ChatTemplateError
from tzd.sampling import RequestPlan, SamplingParamsError, plan
from tzd.tokenizer import TextTokenizer

__all__ = ["ChatPrompt", "InvalidRequest", "prepare", "prompt_ids", "render_chat"]


class ChatPrompt(str):
    """A prompt rendered from `messages` by the model's chat template: encoded without added specials."""


def render_chat(tokenizer: TextTokenizer, messages: list[dict[str, Any]]) -> ChatPrompt:
    """The conversation through the model's chat template, or InvalidRequest naming `messages`."""
    if tokenizer.chat is None:
        raise InvalidRequest("messages", "messages: this model has no chat template (its tokenizer_config.json "
                                         "has no chat_template); send a plain `prompt` instead")
    try:
        return ChatPrompt(tokenizer.chat.render(messages, add_generation_prompt=True))
    except ChatTemplateError as e:
        raise InvalidRequest("messages", str(e)) from None


def prompt_ids(tokenizer: TextTokenizer, prompt: str | list[int], vocab_size: int) -> list[int]:
    """Tokenize a text prompt; check a token-id prompt (no id outside the vocabulary, no mask)."""
    if isinstance(prompt, str):
        ids = tokenizer.encode_chat(prompt) if isinstance(prompt, ChatPrompt) else tokenizer.encode(prompt)
        if tokenizer.mask_id in ids:  # a tokenizer.json parses special tokens out of text
            raise InvalidRequest("prompt", "prompt: the text holds the model's mask token, which a prompt cannot "
                                           "contain")
        return ids
    ids = list(prompt)
    if ids and max(ids) >= vocab_size:
        raise InvalidRequest("prompt", f"prompt: token id {max(ids)} is outside the vocabulary [0, {vocab_size})")
    if tokenizer.mask_id in ids:
        raise InvalidRequest("prompt", f"prompt: the mask id {tokenizer.mask_id} cannot appear in a prompt")
    return ids


def prepare(tokenizer: TextTokenizer, prompt: str | list[int], params: SamplingParams, context: int,
            vocab_size: int, max_tokens_limit: int, min_prompt: int = 0,
            model_block: int | None = None, absolute_blocks: bool = False) -> tuple[list[int], RequestPlan]:
    """The prompt's ids and the request's plan, or InvalidRequest naming the field and the limit.

    `min_prompt`: 1 for a model with shifted logits (its first generated token is read off the last
    prompt position). `model_block`: a block-causal model's block size (block_length must be it), `absolute_blocks` its
    blocks' alignment (tzd.sampling.plan)."""
    ids = prompt_ids(tokenizer, prompt, vocab_size)
    if len(ids) < min_prompt:
        raise InvalidRequest("prompt", "prompt: this model predicts each token from the position before it, "
                                       "so the prompt needs at least one token")
    if len(ids) >= context:
        raise InvalidRequest("prompt", f"prompt: {len(ids)} tokens, but the model's context is {context} tokens "
                                       f"and prompt + max_tokens must fit in it (prompt <= {context - 1} tokens)")
    if params.max_tokens > max_tokens_limit:
        raise InvalidRequest("max_tokens", f"max_tokens: must be <= {max_tokens_limit} (this server's "
                                           f"--max-tokens-limit), got {params.max_tokens}")
    try:
        return ids, plan(params, len(ids), context, model_block, absolute_blocks)
    except SamplingParamsError as e:
        raise InvalidRequest(e.field, str(e)) from None
