"""OpenAI-compatible request and response bodies (pydantic; no torch).

Unknown fields are accepted and ignored (logged at debug level), as OpenAI
clients send fields a server may not know. Known OpenAI features this server
does not have (echo, tools, penalties, ...) are refused with a 400 naming the
field rather than silently ignored. Diffusion knobs are extra body fields.

Types are strict: a boolean or a string is never a number, numbers must be
finite, and no string anywhere in a body (known field or not) may hold a lone
UTF-16 surrogate (``"\ud800"``: valid JSON, but not text any tokenizer or
UTF-8 writer can take); each is refused with the path of the offending value.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, model_validator

from sampler.params import MAX_LOGPROBS

# StrictFloat takes ints (JSON's 1 is a number) but not booleans or strings;
# every request model also sets allow_inf_nan=False (Python's json reads
# Infinity and NaN).
NonNegFloat = Annotated[StrictFloat, Field(ge=0)]
_REQUEST_CONFIG = ConfigDict(extra="allow", allow_inf_nan=False)


def _is_text(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _surrogate_path(value: Any) -> str | None:
    """The path (``messages[0].content``) of a string holding a lone
    surrogate, in values or keys, or None. One pass over the parsed body;
    paths are only spelled out for the value that fails."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        v, where = stack.pop()
        if isinstance(v, str):
            if not _is_text(v):
                return where or "body"
        elif isinstance(v, dict):
            for k, item in v.items():
                if isinstance(k, str) and not _is_text(k):
                    return where or "body"
                if isinstance(item, (str, dict, list)):
                    stack.append((item, f"{where}.{k}" if where else str(k)))
        elif isinstance(v, list):
            for i, item in enumerate(v):
                if isinstance(item, str) and not _is_text(item):
                    return f"{where}[{i}]"
                if isinstance(item, (dict, list)):
                    stack.append((item, f"{where}[{i}]"))
    return None


# Why a refused field is refused, where "not supported" would not help.
WHY_UNSUPPORTED = {
    "echo": "a diffusion model gives no per-token logprobs of the prompt; score a continuation given a context "
            "with POST /v1/loglikelihood (LLaDA's Monte Carlo likelihood bound) instead",
}


class RequestBody(BaseModel):
    """A request body: strict, finite, and valid Unicode throughout."""

    model_config = _REQUEST_CONFIG

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        where = _surrogate_path(data)
        if where is not None:
            raise ValueError(f"{where}: contains a lone UTF-16 surrogate, which is not valid Unicode text")
        return data


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class StreamOptions(BaseModel):
    model_config = _REQUEST_CONFIG
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = Field(
        False, description="vLLM extension: with include_usage, every chunk also carries the usage so far "
        "(completion_tokens: the final tokens of all choices streamed so far)")
    include_denoising: StrictBool = Field(
        False, description="llada-serve extension (streams only): before each step's content chunk, one "
        "`denoising.step` event per denoising step: {object, id, choice, step, block, num_blocks, block_range, "
        "gen_length, committed: [{position, token, text, confidence}]}, positions relative to the generated part, "
        "confidence the model's probability of the committed token. Off by default, so OpenAI clients never see it.")


class DiffusionFields(RequestBody):
    """Sampling and diffusion fields shared by completions and chat."""

    model: str | None = None
    max_tokens: StrictInt | None = Field(None, description="canvas length after the prompt (gen_length)")
    temperature: NonNegFloat | None = None
    top_p: Annotated[StrictFloat, Field(gt=0, le=1)] | None = None
    top_k: Annotated[StrictInt, Field(ge=-1)] | None = Field(None, description="-1 or 0: no limit")
    n: Annotated[StrictInt, Field(ge=1, le=16)] = 1
    stop: str | list[str] | None = None
    seed: StrictInt | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # diffusion extras
    steps: StrictInt | None = Field(None, description="denoising steps over the canvas")
    block_length: StrictInt | None = Field(None, description="semi-autoregressive block size")
    remasking: str | None = Field(None, description="low_confidence | random | margin | entropy | threshold | factor | "
                                  "threshold_quota | origin | maskgit_plus | topk_margin")
    cfg_scale: NonNegFloat | None = Field(None, description="classifier-free guidance scale")
    decoding: str | None = Field(None, description="exact | prefix_cache | dual_cache")
    threshold: StrictFloat | None = Field(None, description="the threshold rule's confidence bar, in (0, 1]")
    factor: StrictFloat | None = Field(None, description="the factor rule's f (Fast-dLLM), > 0")
    # each family's own decoding (defaults: the model's, see GET /v1/models)
    schedule: str | None = Field(None, description="llada | llada2 | dream: whose step layout (default: the model's)")
    editing_threshold: StrictFloat | None = Field(
        None, description="llada2: LLaDA2.1 token editing, re-write decoded tokens above this confidence")
    max_post_steps: StrictInt | None = Field(None, description="llada2 editing: steps after a block has no mask")
    num_to_transfer: StrictInt | None = Field(None, description="llada2 editing: tokens a step commits at least")
    alg_temp: NonNegFloat | None = Field(None, description="dream: > 0 draws the positions to commit")
    eps: StrictFloat | None = Field(None, description="dream: the last timestep, in (0, 1)")
    ignore_eos: StrictBool = Field(
        False, description="vLLM extension: EOS/EoT are decoded as ordinary tokens; the answer is the whole "
        "canvas (max_tokens tokens, finish_reason length unless a stop string ends it first)")
    # OpenAI features refused with a clear error when used
    presence_penalty: StrictFloat | None = None
    frequency_penalty: StrictFloat | None = None
    logit_bias: dict[str, StrictFloat] | None = None

    @model_validator(mode="after")
    def _check_stop(self):
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > 4:
            raise ValueError(f"stop: at most 4 stop strings, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop: a stop string must not be empty")
        return self

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def unsupported(self) -> str | None:
        """The first OpenAI field that is set to something this server cannot do."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                return name
        if self.logit_bias:
            return "logit_bias"
        return None


class CompletionRequest(DiffusionFields):
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    add_special_tokens: StrictBool = Field(
        True, description="vLLM extension: add the tokenizer's special tokens (e.g. BOS) to text prompts")
    echo: StrictBool = False
    suffix: str | None = None
    best_of: StrictInt | None = None
    logprobs: StrictInt | None = Field(
        None, description=f"each returned token's logprob and this many likeliest alternatives (0 to {MAX_LOGPROBS}) "
        "at the denoising step that committed it")

    def num_logprobs(self) -> int | None:
        """Alternatives per token, or None when not asked (ValueError naming the field)."""
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs: must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        return self.logprobs

    def unsupported(self) -> str | None:
        if self.echo:
            return "echo"
        if self.suffix:
            return "suffix"
        if self.best_of not in (None, 1):
            return "best_of"
        return super().unsupported()


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = _REQUEST_CONFIG
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(DiffusionFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: StrictInt | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    logprobs: StrictBool | None = Field(
        None, description="return each answer token's logprob at the denoising step that committed it")
    top_logprobs: StrictInt | None = Field(
        None, description=f"with logprobs: this many likeliest alternatives per token, 0 to {MAX_LOGPROBS}")

    def num_logprobs(self) -> int | None:
        """Alternatives per token, or None when not asked (ValueError naming the field)."""
        if self.top_logprobs is not None:
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise ValueError(f"top_logprobs: must be an integer in [0, {MAX_LOGPROBS}], got {self.top_logprobs}")
            if not self.logprobs:
                raise ValueError("top_logprobs: needs logprobs set to true")
        return (self.top_logprobs or 0) if self.logprobs else None

    def unsupported(self) -> str | None:
        if self.tools:
            return "tools"
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            return "response_format"
        return super().unsupported()


class TokenizeRequest(RequestBody):
    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: StrictBool = Field(
        True, description="add the tokenizer's special tokens (e.g. BOS) to a prompt; messages always get "
        "those of the chat template")

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(RequestBody):
    model: str | None = None
    tokens: list[StrictInt]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
