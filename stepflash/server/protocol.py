"""Request and response shapes of the OpenAI-compatible API (pydantic models).

Requests are validated here so that every bad field becomes a 400 naming that field (see `app.py`).
Types are strict, as OpenAI's API defines them: a number is a JSON number (`"4"` and `true` are not
integers, `"yes"` is not a boolean), floats are finite, integers fit in an int64. Ranges follow
OpenAI's API where it has one and vLLM's `SamplingParams` where it extends it (top_k, min_tokens,
repetition_penalty, ignore_eos, stop_token_ids). Rules that join two fields (top_logprobs needs
logprobs, min_tokens <= max_tokens, a named tool_choice must be in tools) raise `InvalidParam`, which
names the field. Unknown fields are ignored, as OpenAI's SDKs send optional fields this server does
not implement. Bodies are parsed from bytes by `model_validate_json` (strings with a lone surrogate or
invalid UTF-8 are invalid JSON there). Responses are built as plain dicts in `completions.py`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_N = 16
MAX_STOP = 16
MAX_STOP_CHARS = 1024  # a stop string is matched against a held-back tail of this length per token
MAX_TOP_LOGPROBS = 20
MAX_TOOLS = 128
INT64_MAX = 2**63 - 1
FP32_TINY = 1.1754943508222875e-38  # the smallest normal float32: smaller top_p rounds to 0 in the engine

Int64 = Annotated[int, Field(ge=-INT64_MAX - 1, le=INT64_MAX)]
TokenId = Annotated[int, Field(ge=0, le=INT64_MAX)]


class InvalidParam(Exception):
    """A request whose fields contradict each other; `param` names the field to fix."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param, self.message = param, message


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class StreamOptions(_Request):
    include_usage: bool = False


class JsonSchemaFormat(_Request):
    name: str = Field("response", pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise InvalidParam("response_format", "response_format: type json_schema needs a json_schema object")
        return self


class SamplingFields(_Request):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=FP32_TINY, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=INT64_MAX, description="0 or -1: off")
    max_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    min_tokens: int = Field(0, ge=0, le=INT64_MAX)
    stop: str | list[str | TokenId] | None = None
    stop_token_ids: list[TokenId] | None = None  # vLLM's extension; ints in `stop` are accepted too
    seed: int | None = Field(None, ge=-INT64_MAX - 1, le=INT64_MAX)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=INT64_MAX)
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False
    response_format: ResponseFormat | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v):
        items = [v] if isinstance(v, str) else (v or [])
        if len(items) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(isinstance(s, str) and not s for s in items):
            raise ValueError("stop strings must not be empty")
        if any(isinstance(s, str) and len(s) > MAX_STOP_CHARS for s in items):
            raise ValueError(f"a stop string may have at most {MAX_STOP_CHARS} characters")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _check_bias(cls, v):
        for key, bias in (v or {}).items():
            if not re.fullmatch(r"\d{1,19}", key) or int(key) > INT64_MAX:
                raise ValueError(f"keys are token ids (non-negative integers as strings), got {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"the bias of token {key} must be in [-100, 100], got {bias}")
        return v

    def _check_common(self, max_tokens: int | None) -> None:
        if max_tokens is not None and self.min_tokens > max_tokens:
            raise InvalidParam("min_tokens", f"min_tokens: {self.min_tokens} is more than max_tokens ({max_tokens})")

    def stop_strings(self) -> list[str]:
        items = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return [s for s in items if isinstance(s, str)]

    def stop_ids(self) -> list[int]:
        items = [] if isinstance(self.stop, str) else (self.stop or [])
        return [s for s in items if isinstance(s, int)] + list(self.stop_token_ids or [])

    def bias(self) -> dict[int, float]:
        return {int(k): v for k, v in (self.logit_bias or {}).items()}

    def top_logprobs_wanted(self) -> int | None:
        """None: no logprobs; k >= 0: the sampled token's logprob and k alternatives."""
        raise NotImplementedError


class FunctionDef(_Request):
    name: str = Field(min_length=1, max_length=128, pattern=r"^[^<>\s]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Request):
    type: Literal["function"] = "function"
    function: FunctionDef


class FunctionCall(_Request):
    name: str
    arguments: str | dict[str, Any] | None = None


class ToolCall(_Request):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None  # vLLM's newer name for reasoning_content; the template reads either
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    max_completion_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _check(self):
        if self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidParam("top_logprobs", "top_logprobs: needs logprobs set to true")
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) < len(names):
            raise InvalidParam("tools", "tools: function names must be unique")
        if self.tool_choice == "required" and not names:
            raise InvalidParam("tool_choice", "tool_choice: 'required' needs at least one tool in tools")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise InvalidParam("tool_choice", f"tool_choice: function {self.tool_choice.function.name!r} is not "
                                              "in tools")
        if self.response_format and self.response_format.type != "text" and names and self.tool_choice in (
                None, "auto"):
            raise InvalidParam("response_format", "response_format: a JSON reply together with optional tool "
                                                  "calls is not supported; set tool_choice to 'none' or 'required'")
        self._check_common(self.max_tokens)
        return self

    def forced_function(self) -> str | None:
        return self.tool_choice.function.name if isinstance(self.tool_choice, NamedToolChoice) else None

    def top_logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("must not be empty")
        if isinstance(v, list) and any(isinstance(p, list) and not p for p in v):
            raise ValueError("token lists must not be empty")
        return v

    @model_validator(mode="after")
    def _check(self):
        self._check_common(self.max_tokens)
        return self

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a string or a list of token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(p, int) for p in self.prompt):
            return [list(self.prompt)]
        return list(self.prompt)

    def top_logprobs_wanted(self) -> int | None:
        return self.logprobs


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
