"""OpenAI-compatible request and response bodies (pydantic; no torch).

Unknown fields are accepted and ignored (logged at debug level), as OpenAI
clients send fields a server may not know. Known OpenAI features this server
does not have (logprobs, echo, tools, ...) are refused with a 400 naming the
field rather than silently ignored. Diffusion knobs are extra body fields.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator

NonNegFloat = Annotated[float, Field(ge=0)]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: StrictBool = False
    include_denoising: StrictBool = Field(
        False, description="llada-serve extension (streams only): before each step's content chunk, one "
        "`denoising.step` event per denoising step: {object, id, choice, step, block, num_blocks, block_range, "
        "gen_length, committed: [{position, token, text, confidence}]}, positions relative to the generated part, "
        "confidence the model's probability of the committed token. Off by default, so OpenAI clients never see it.")


class DiffusionFields(BaseModel):
    """Sampling and diffusion fields shared by completions and chat."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: StrictInt | None = Field(None, description="canvas length after the prompt (gen_length)")
    temperature: NonNegFloat | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = Field(None, description="-1 or 0: no limit")
    n: Annotated[StrictInt, Field(ge=1, le=16)] = 1
    stop: str | list[str] | None = None
    seed: StrictInt | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # diffusion extras
    steps: StrictInt | None = Field(None, description="denoising steps over the canvas")
    block_length: StrictInt | None = Field(None, description="semi-autoregressive block size")
    remasking: str | None = Field(None, description="low_confidence | random | margin | entropy | threshold | factor")
    cfg_scale: NonNegFloat | None = Field(None, description="classifier-free guidance scale")
    decoding: str | None = Field(None, description="exact | prefix_cache | dual_cache")
    threshold: float | None = Field(None, description="the threshold rule's confidence bar, in (0, 1]")
    factor: float | None = Field(None, description="the factor rule's f (Fast-dLLM), > 0")
    # OpenAI features refused with a clear error when used
    logprobs: Any = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    @model_validator(mode="after")
    def _check_stop(self):
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop: at most 4 non-empty strings")
        return self

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def unsupported(self) -> str | None:
        """The first OpenAI field that is set to something this server cannot do."""
        if self.logprobs not in (None, False, 0):
            return "logprobs"
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                return name
        if self.logit_bias:
            return "logit_bias"
        return None


class CompletionRequest(DiffusionFields):
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    echo: StrictBool = False
    suffix: str | None = None
    best_of: StrictInt | None = None

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
    model_config = ConfigDict(extra="allow")
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
    top_logprobs: StrictInt | None = None

    def unsupported(self) -> str | None:
        if self.tools:
            return "tools"
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            return "response_format"
        if self.top_logprobs:
            return "top_logprobs"
        return super().unsupported()


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    tokens: list[StrictInt]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
