"""The wire schema: the one definition of requests, responses and stream events (server and SDK share it).

Pure pydantic: importing this module never imports torch.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

MAX_STOP_STRINGS = 4
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs bound (OpenAI's); completions' logprobs stops at 5
MAX_COMPLETION_LOGPROBS = 5
VERY_UNLIKELY = -9999.0  # OpenAI's log-probability for a token too unlikely to represent (probability 0)
# stop's wire form: one string, a list of them, or null (the validators below turn it into a list)
STOP_SCHEMA = {"anyOf": [{"type": "string", "minLength": 1},
                         {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": MAX_STOP_STRINGS},
                         {"type": "null"}],
               "description": f"stop strings (at most {MAX_STOP_STRINGS}): the text ends before the first one"}


def off_only(*values: object) -> dict[str, object]:
    """The JSON schema of an OpenAI option this server accepts only when off: exactly `values`."""
    return {"enum": list(values)}


DEFAULT_BLOCK_LENGTH = 32  # LLaDA's; a block-diffusion model's own block replaces it (tzd.sampling.plan)


class SamplingParams(BaseModel):
    """How to denoise one request. Checks here need no model; `tzd.sampling.plan` adds the context checks."""

    # strict: a JSON string is not a number, nor 1.0 an int, so that the published schema is what is accepted
    model_config = ConfigDict(extra="forbid", strict=True)

    max_tokens: int = Field(64, ge=1, description="number of tokens to generate (the canvas length)")
    steps: int | None = Field(None, ge=1, description="denoising steps (upper bound with threshold or "
                                                      "entropy_bound); None = max_tokens")
    block_length: int | None = Field(None, ge=1, description="semi-autoregressive block length; None = "
                                     f"min({DEFAULT_BLOCK_LENGTH}, max_tokens), or a block-diffusion model's block")
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy")
    top_k: int = Field(0, ge=0, description="0 = off")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    remasking: Literal["low_confidence", "random"] = "low_confidence"
    threshold: float | None = Field(None, gt=0.0, le=1.0, description="confidence-threshold parallel decoding")
    entropy_bound: float | None = Field(
        None, gt=0.0, description="entropy-bounded parallel decoding (EB-Sampler): per step, commit the block's "
        "masked positions in confidence order while their summed entropy (nats) stays <= this bound, at least "
        "one; SGLang's default is 0.15. None = off; not with threshold (`steps` becomes an upper bound)")
    early_exit: bool = Field(True, description="end the request once an EOS is in its committed left part (the "
                             "rest of the canvas is EOS, not denoised); false denoises the whole canvas as "
                             "LLaDA's reference loop does (the same tokens, more forwards)")
    cache: Literal["none", "prefix", "dual"] = "none"
    cfg_scale: float = Field(0.0, ge=0.0, description="classifier-free guidance scale; 0 = off")
    seed: int | None = Field(None, ge=0, lt=2**63, description="None = random")
    priority: int = Field(0, ge=-(2**31), lt=2**31, description="the server's admission order: lower runs first, "
                                                                 "ties in arrival order (generate() ignores it)")
    stop: Annotated[list[str], WithJsonSchema(STOP_SCHEMA)] = Field(default_factory=list,
                                                                     max_length=MAX_STOP_STRINGS)
    top_logprobs: int = Field(0, ge=0, le=MAX_TOP_LOGPROBS, description="the most likely alternatives to report at "
                              "each generated position, read at the step it was committed (0 = none)")

    @field_validator("entropy_bound")
    @classmethod
    def _one_commit_rule(cls, v: float | None, info: ValidationInfo) -> float | None:
        if v is not None and info.data.get("threshold") is not None:
            raise ValueError("threshold and entropy_bound are alternative commit rules; give one of them")
        return v

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_string(cls, v: object) -> object:
        if v is None:
            return []
        return [v] if isinstance(v, str) else v

    @field_validator("stop")
    @classmethod
    def _non_empty_stop(cls, v: list[str]) -> list[str]:
        if any(s == "" for s in v):
            raise ValueError("stop strings must not be empty")
        return v

    def resolved_steps(self) -> int:
        return self.steps if self.steps is not None else self.max_tokens

    def resolved_block_length(self) -> int:
        return self.block_length if self.block_length is not None else min(DEFAULT_BLOCK_LENGTH, self.max_tokens)


# ---- shared pieces --------------------------------------------------------------------------------

FinishReason = Literal["length", "stop", "timeout"]  # timeout: past the request's deadline, the text so far
MASK_PLACEHOLDER = "_"  # how a still-masked position shows in a step event's `text` (one per position)
STEP_EVENT, DONE_EVENT, ERROR_EVENT = "step", "done", "error"  # the SSE event names of POST /generate
TokenId = Annotated[int, Field(ge=0)]
Timeout = Annotated[float | None, Field(gt=0, description="seconds this request may take from its arrival; past "
                                        "it, it ends with finish_reason \"timeout\" and the text so far (the "
                                        "server's --request-timeout, if shorter, wins)")]


def sampling_fields(model: BaseModel) -> SamplingParams:
    """The SamplingParams carried by a request model that extends it."""
    return SamplingParams.model_validate(model.model_dump(include=set(SamplingParams.model_fields)))


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ErrorDetail(BaseModel):
    message: str
    type: str  # invalid_request_error | authentication_error | rate_limit_error | server_error | ...
    param: str | None = None  # the offending request field
    code: str | None = None
    request_id: str | None = None  # the answer's X-Request-Id: quote it when reporting a problem


class ErrorBody(BaseModel):
    """Every error answer (OpenAI's shape), also the data of a stream's `error` event."""

    error: ErrorDetail


class ModelSize(BaseModel):
    """The served model's size (None while loading): all parameters, those one token uses (a mixture of
    experts skips the experts it is not routed to), and the routed experts per MoE layer and per token."""

    parameters: int | None = None
    active_parameters: int | None = None
    experts: int | None = None  # routed experts per MoE layer (None: a dense model)
    experts_per_token: int | None = None


class Health(ModelSize):
    """GET /health and GET /live: the replica's state, and the load a router or an autoscaler reads."""

    status: Literal["ok", "loading", "draining", "dead", "failed"]
    model: str | None = None
    running: int = 0  # requests in the running batch
    waiting: int = 0  # requests queued for a slot (tzd_requests_waiting)
    max_batch_size: int | None = None  # slots in the running batch (the server's --max-batch-size)
    max_num_batched_tokens: int | None = None  # columns one step may run (--max-num-batched-tokens; null: no budget)
    attention: Literal["bidirectional", "block_causal"] | None = None  # the served model's (None while loading)
    kv_cache_pages: int | None = None  # pages of the paged KV cache (None while loading)
    kv_cache_usage: float | None = None  # the fraction of them running requests hold
    # the weights' quantization: none, int8, int4-g64, fp8 (+head: head and embeddings too); None while loading
    quantization: str | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One turn of a conversation (OpenAI's shape); list content may hold text parts only."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def template_dict(self) -> dict[str, str]:
        """What a chat template reads: role and content as one string."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        out = {"role": self.role, "content": content}
        if self.name is not None:
            out["name"] = self.name
        return out


Messages = Annotated[list[ChatMessage], Field(min_length=1)]


# ---- POST /generate --------------------------------------------------------------------------------

class InfillText(BaseModel):
    """Fixed text of an infill, kept verbatim."""

    model_config = ConfigDict(extra="forbid", strict=True)

    text: str


class InfillGap(BaseModel):
    """A gap of an infill: `gap` positions the model fills (EOS it writes there is padding, removed)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    gap: int = Field(ge=1, description="positions to fill (an upper bound on the fill's tokens)")


def _infill_kind(v: object) -> str:
    """Which part a JSON object is: a gap if it has `gap`, else text (so that an error names one schema)."""
    return "gap" if (isinstance(v, dict) and "gap" in v) or isinstance(v, InfillGap) else "text"


InfillPart = Annotated[Annotated[InfillText, Tag("text")] | Annotated[InfillGap, Tag("gap")],
                       Discriminator(_infill_kind)]
Suffix = Annotated[str | list[TokenId] | None, Field(description=(
    "text (or token ids) after the generated canvas, which a bidirectional model sees while it fills the "
    "canvas of max_tokens between prompt and suffix; not part of the returned text. Block-causal models "
    "cannot see it (400)"))]


class GenerateRequest(SamplingParams):
    """POST /generate: a prompt (text or token ids), chat `messages` (rendered by the model's chat
    template) or an `infill` (text and gaps), the SamplingParams fields, and whether to stream."""

    messages: Messages | None = None  # before prompt: prompt's check below sees it
    infill: list[InfillPart] | None = Field(None, min_length=1, description=(
        "text segments and gaps, in order, e.g. [{\"text\": \"def f(\"}, {\"gap\": 8}, {\"text\": \"):\"}]: "
        "several gaps filled at once; instead of prompt (text before the first gap is the prompt, after "
        "the last the suffix) and of max_tokens (the gaps give the lengths)"))
    prompt: str | list[TokenId] | None = Field(None, validate_default=True)
    suffix: Suffix = None
    logprobs: bool = Field(False, description="return each generated token's log-probability at the step it "
                                              "was committed (and top_logprobs alternatives)")
    stream: bool = False
    timeout: Timeout = None

    @field_validator("infill")
    @classmethod
    def _has_a_gap(cls, v: list[InfillPart] | None) -> list[InfillPart] | None:
        if v is not None and not any(isinstance(p, InfillGap) for p in v):
            raise ValueError("needs at least one {\"gap\": n} part")
        return v

    @field_validator("prompt")
    @classmethod
    def _prompt_or_messages(cls, v: object, info: ValidationInfo) -> object:
        given = (["prompt"] if v is not None else []) + [k for k in ("messages", "infill")
                                                          if info.data.get(k) is not None]
        failed = not {"messages", "infill"} <= info.data.keys()  # one of them was given and is invalid
        if not given and not failed:
            raise ValueError("Field required (a prompt, chat messages, or an infill)")
        if len(given) > 1:
            raise ValueError(f"give exactly one of {' and '.join(given)} (a prompt, chat messages, or an infill)")
        return v

    @field_validator("suffix")
    @classmethod
    def _suffix_with_prompt(cls, v: object, info: ValidationInfo) -> object:
        if v in ("", []):
            return None
        if v is not None and info.data.get("prompt") is None:
            raise ValueError("give suffix with a prompt (an infill has its own trailing text)")
        return v

    def sampling_params(self) -> SamplingParams:
        return sampling_fields(self)


class Timings(BaseModel):
    """Seconds, measured by the server from the moment the request was accepted."""

    queue: float  # waiting for a slot in the running batch
    first_step: float | None = None  # until the first denoising step finished
    total: float


class GenerateResponse(BaseModel):
    """The answer of POST /generate, also the data of the stream's `done` event."""

    id: str
    object: Literal["generation"] = "generation"
    model: str
    text: str
    tokens: list[int]  # generated ids, cut at EOS / the stop string
    finish_reason: FinishReason
    usage: Usage
    steps: int  # denoising steps taken
    nfe: int  # forward passes (model evaluations) for this request
    seed: int  # the seed used (drawn when the request left it out): resend it to reproduce
    timings: Timings
    gaps: list[str] | None = None  # with suffix or infill: each gap's text (EOS padding removed), in order
    logprobs: list[TokenLogprob] | None = None  # with logprobs: one per token of `tokens`


class TopToken(BaseModel):
    id: int
    token: str
    logprob: float


class TokenLogprob(BaseModel):
    """A generated token's score, read at the step it was committed."""

    position: int  # canvas position, counted from the first generated token
    id: int
    token: str
    logprob: float  # log-probability under the model (un-tempered); VERY_UNLIKELY for probability 0
    top_logprobs: list[TopToken] = Field(default_factory=list)  # the top_logprobs most likely then, best first


class CommittedToken(BaseModel):
    position: int  # counted from the first generated token
    id: int
    text: str
    logprob: float | None = None  # its log-probability at this step (the confidence it was committed with)


class StepEvent(BaseModel):
    """The data of one `step` event: what one denoising step did to this request."""

    step: int  # 0-based index of this step
    steps: int  # planned steps (an upper bound with threshold decoding)
    committed: list[CommittedToken]
    masked: int  # positions still masked after this step
    text: str  # the whole partly denoised text, each masked position shown as MASK_PLACEHOLDER
    # seconds from the server accepting the request to its writing this event (None from older servers):
    # the server's own step cadence, to tell its delays from the network's or a proxy's
    elapsed: float | None = None


# ---- OpenAI-compatible /v1 -------------------------------------------------------------------------

class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False


def _unsupported(name: str, ok: bool) -> None:
    if not ok:
        raise ValueError(f"{name} is not supported by this server")


class CompletionRequest(SamplingParams):
    """POST /v1/completions: OpenAI's fields plus the diffusion fields of SamplingParams as extra body fields.

    max_tokens, temperature, top_p, stop and seed are SamplingParams' own fields (same names, same
    checks and defaults); OpenAI options without a diffusion meaning are accepted only when off.
    """

    model: str | None = None
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]] = Field(json_schema_extra={"minItems": 1})
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    timeout: Timeout = None
    user: str | None = None
    echo: bool = Field(False, json_schema_extra=off_only(False))
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS, description=(
        "return each token's log-probability at the step it was committed, and this many alternatives"))
    best_of: int | None = Field(None, description="only n (or null) is supported")
    suffix: Suffix = None
    logit_bias: dict[str, float] | None = Field(None, json_schema_extra=off_only(None, {}))
    frequency_penalty: float = Field(0.0, json_schema_extra=off_only(0))
    presence_penalty: float = Field(0.0, json_schema_extra=off_only(0))

    @field_validator("prompt")
    @classmethod
    def _non_empty_list(cls, v: object) -> object:
        if isinstance(v, list) and not v:
            raise ValueError("must be a string or a non-empty list")
        return v

    @field_validator("suffix")
    @classmethod
    def _empty_suffix_is_none(cls, v: object) -> object:
        return None if v in ("", []) else v

    @field_validator("echo", "logit_bias", "frequency_penalty", "presence_penalty")
    @classmethod
    def _off_only(cls, v: object, info: ValidationInfo) -> object:
        _unsupported(info.field_name, v in (None, False, 0, 0.0, "", {}))
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, v: int | None, info: ValidationInfo) -> int | None:
        _unsupported("best_of other than n", v is None or v == info.data.get("n", 1))
        return v

    def prompts(self) -> list[str | list[int]]:
        """The prompts of the request: a string, a token list, or a batch of either."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]

    def sampling_params(self) -> SamplingParams:
        p = sampling_fields(self)  # OpenAI's logprobs=N is the number of alternatives
        return p if self.logprobs is None else p.model_copy(update={"top_logprobs": self.logprobs})


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy completions logprobs: parallel lists, one entry per generated token."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None  # streamed: the whole list on the choice's last chunk
    finish_reason: FinishReason | None = None


class TextCompletion(BaseModel):
    """The answer of POST /v1/completions, and (text deltas, usage only on the last) each stream chunk."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(ModelSize):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tzd"
    max_model_len: int  # the context: prompt + max_tokens must fit
    # bidirectional (LLaDA, Dream) or block_causal (block diffusion: `cache` is then exact, and prompt
    # blocks are shared across requests); diffusion_block is a block-causal model's block length
    attention: Literal["bidirectional", "block_causal"] = "bidirectional"
    diffusion_block: int | None = None
    quantization: str = "none"  # of the weights: none, int8, int4-g64, fp8 (+head: head and embeddings too)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- OpenAI-compatible /v1/chat/completions --------------------------------------------------------

class ResponseFormat(BaseModel):
    type: Literal["text"]  # plain text only: no JSON mode or schemas


class ChatCompletionRequest(SamplingParams):
    """POST /v1/chat/completions: OpenAI's fields plus the diffusion fields of SamplingParams as extra body
    fields. `max_completion_tokens` is OpenAI's newer name for max_tokens; options without a diffusion
    meaning are accepted only when off."""

    model: str | None = None
    messages: Messages
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens")
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    timeout: Timeout = None
    user: str | None = None
    logprobs: bool | None = Field(False, description="return each token's log-probability at the step it was "
                                                     "committed")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="alternatives per token "
                                     "(needs logprobs)")
    logit_bias: dict[str, float] | None = Field(None, json_schema_extra=off_only(None, {}))
    frequency_penalty: float = Field(0.0, json_schema_extra=off_only(0))
    presence_penalty: float = Field(0.0, json_schema_extra=off_only(0))
    tools: list[dict] | None = Field(None, json_schema_extra=off_only(None, []))
    tool_choice: str | None = Field(None, json_schema_extra=off_only(None, "none"))
    response_format: ResponseFormat | None = None

    @model_validator(mode="before")
    @classmethod
    def _max_completion_tokens(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("max_completion_tokens") is not None:
            given = data.get("max_tokens")
            if given is not None and given != data["max_completion_tokens"]:
                raise ValueError("max_tokens and max_completion_tokens differ; give one of them")
            data = {**data, "max_tokens": data["max_completion_tokens"]}
        return data

    @field_validator("logit_bias", "frequency_penalty", "presence_penalty", "tools", "tool_choice")
    @classmethod
    def _off_only(cls, v: object, info: ValidationInfo) -> object:
        _unsupported(info.field_name, v in (None, False, 0, 0.0, {}, [], "none"))
        return v

    def sampling_params(self) -> SamplingParams:
        return SamplingParams.model_validate({**self.model_dump(include=set(SamplingParams.model_fields)),
                                              "top_logprobs": self.top_logprobs or 0})


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    """The answer of POST /v1/chat/completions."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None  # the whole list on the choice's last chunk
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    """One `data:` chunk of a streamed chat completion: the committed left-to-right text as it grows."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
