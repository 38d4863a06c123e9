"""Check a request against the loaded model and the server's limits: prompt ids and a RequestPlan."""

from __future__ import annotations

from clients.protocol import SamplingParams
from server.errors import InvalidRequest
from tzd.sampling import RequestPlan, SamplingParamsError, plan
from tzd.tokenizer import Tokenizer

__all__ = ["InvalidRequest", "prepare", "prompt_ids"]


def prompt_ids(tokenizer: Tokenizer, prompt: str | list[int], vocab_size: int) -> list[int]:
    """Tokenize a text prompt; check a token-id prompt (no id outside the vocabulary, no mask)."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    ids = list(prompt)
    if ids and max(ids) >= vocab_size:
        raise InvalidRequest("prompt", f"prompt: token id {max(ids)} is outside the vocabulary [0, {vocab_size})")
    if tokenizer.mask_id in ids:
        raise InvalidRequest("prompt", f"prompt: the mask id {tokenizer.mask_id} cannot appear in a prompt")
    return ids


def prepare(tokenizer: Tokenizer, prompt: str | list[int], params: SamplingParams, context: int,
            vocab_size: int, max_tokens_limit: int) -> tuple[list[int], RequestPlan]:
    """The prompt's ids and the request's plan, or InvalidRequest naming the field and the limit."""
    ids = prompt_ids(tokenizer, prompt, vocab_size)
    if len(ids) >= context:
        raise InvalidRequest("prompt", f"prompt: {len(ids)} tokens, but the model's context is {context} tokens "
                                       f"and prompt + max_tokens must fit in it (prompt <= {context - 1} tokens)")
    if params.max_tokens > max_tokens_limit:
        raise InvalidRequest("max_tokens", f"max_tokens: must be <= {max_tokens_limit} (this server's "
                                           f"--max-tokens-limit), got {params.max_tokens}")
    try:
        return ids, plan(params, len(ids), context)
    except SamplingParamsError as e:
        raise InvalidRequest(e.field, str(e)) from None
