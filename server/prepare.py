"""Check a request against the loaded model and the server's limits: prompt ids and a RequestPlan."""

from __future__ import annotations

from typing import Any

from clients.protocol import InfillGap, InfillText, SamplingParams
from server.errors import InvalidRequest
from tzd.hf.chat import ChatTemplateError
from tzd.sampling import Layout, RequestPlan, SamplingParamsError, plan
from tzd.tokenizer import TextTokenizer

__all__ = ["ChatPrompt", "InvalidRequest", "infill_layout", "prepare", "prompt_ids", "render_chat"]


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


def prompt_ids(tokenizer: TextTokenizer, prompt: str | list[int], vocab_size: int, field: str = "prompt") -> list[int]:
    """Tokenize a text prompt; check a token-id prompt (no id outside the vocabulary, no mask). `field`:
    the request field it came from (prompt, suffix, infill), for the error."""
    if isinstance(prompt, str):
        ids = tokenizer.encode_chat(prompt) if isinstance(prompt, ChatPrompt) else tokenizer.encode(prompt)
        if tokenizer.mask_id in ids:  # a tokenizer.json parses special tokens out of text
            raise InvalidRequest(field, f"{field}: the text holds the model's mask token, which a {field} cannot "
                                        "contain")
        return ids
    ids = list(prompt)
    if ids and max(ids) >= vocab_size:
        raise InvalidRequest(field, f"{field}: token id {max(ids)} is outside the vocabulary [0, {vocab_size})")
    if tokenizer.mask_id in ids:
        raise InvalidRequest(field, f"{field}: the mask id {tokenizer.mask_id} cannot appear in a {field}")
    return ids


def infill_layout(tokenizer: TextTokenizer, prompt: str | list[int] | None, suffix: str | list[int] | None,
                  parts: list[InfillText | InfillGap] | None, max_tokens: int, vocab_size: int
                  ) -> tuple[str | list[int] | list[int], Layout | None]:
    """(the prompt, its layout): a prompt and a suffix (one gap of max_tokens between them), or an
    infill's parts (each text part tokenized on its own, so that it stays verbatim); no layout otherwise."""
    if parts is not None:
        return Layout.of_parts([p.gap if isinstance(p, InfillGap) else prompt_ids(tokenizer, p.text, vocab_size,
                                                                                   "infill") for p in parts])
    if suffix is None:
        return prompt, None  # type: ignore[return-value]
    return prompt, Layout.gap(max_tokens, prompt_ids(tokenizer, suffix, vocab_size, "suffix"))  # type: ignore[return-value]


def prepare(tokenizer: TextTokenizer, prompt: str | list[int], params: SamplingParams, context: int,
            vocab_size: int, max_tokens_limit: int, min_prompt: int = 0,
            model_block: int | None = None, absolute_blocks: bool = False,
            layout: Layout | None = None, layout_field: str = "suffix", rule: str = "tzd"
            ) -> tuple[list[int], RequestPlan]:
    """The prompt's ids and the request's plan, or InvalidRequest naming the field and the limit.

    `min_prompt`: 1 for a model with shifted logits (its first generated token is read off the last
    prompt position). `model_block`: a block-causal model's block size (block_length must be it), `absolute_blocks` its
    blocks' alignment (tzd.sampling.plan). `layout`: an infill's canvas and suffix (infill_layout); errors
    about it name `layout_field` (suffix, or infill)."""
    if layout is not None and model_block is not None:
        raise InvalidRequest(layout_field, f"{layout_field}: this block-diffusion model attends causally across "
                                           "blocks, so it cannot see text after the canvas; infilling needs a "
                                           "bidirectional model")
    if layout is not None and layout_field == "infill" and layout.canvas_len > max_tokens_limit:
        raise InvalidRequest("infill", f"infill: the canvas (gaps and the text between them) is {layout.canvas_len} "
                                       f"positions; must be <= {max_tokens_limit} (this server's --max-tokens-limit)")
    ids = prompt_ids(tokenizer, prompt, vocab_size)  # an infill's prompt: ids checked already
    if len(ids) < min_prompt:
        field, what = ("infill", "text before its first gap") if layout_field == "infill" else ("prompt", "a prompt")
        raise InvalidRequest(field, f"{field}: this model predicts each token from the position before it, so "
                                    f"it needs {what} of at least one token")
    if len(ids) >= context:
        raise InvalidRequest("prompt", f"prompt: {len(ids)} tokens, but the model's context is {context} tokens "
                                       f"and prompt + max_tokens must fit in it (prompt <= {context - 1} tokens)")
    if params.max_tokens > max_tokens_limit and layout_field != "infill":  # an infill's gaps replace it
        raise InvalidRequest("max_tokens", f"max_tokens: must be <= {max_tokens_limit} (this server's "
                                           f"--max-tokens-limit), got {params.max_tokens}")
    try:
        return ids, plan(params, len(ids), context, model_block, absolute_blocks, layout, rule)
    except SamplingParamsError as e:
        field = layout_field if e.field in ("suffix", "infill") else e.field
        raise InvalidRequest(field, f"{field}: {str(e).partition(': ')[2]}") from None
