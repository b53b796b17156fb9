"""Request bodies of the OpenAI-compatible API, their validation, and OpenAI-style error objects.

Why pydantic models in strict mode with unknown fields forbidden: a client that sends `"n": 2`,
`"temperature": "hot"` or a misspelt field should hear exactly what is wrong (400 with the field
named, as OpenAI answers), not get a silently different reply. Fields OpenAI defines but this
server does not implement are accepted only at their neutral value (`n` 1, penalties 0, no
logprobs), and rejected otherwise with a message saying so. `ignore_eos`, `top_k` and
`repetition_penalty` are extensions (as in vLLM and llama.cpp's server).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from smallmighty.engine.sampling import GenerationSettings

MAX_STOP_SEQUENCES = 4
MAX_CLASSIFY_TEXTS = 256


class ApiError(Exception):
    """An error the client gets as `{"error": {...}}` with HTTP `status`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


Stop = str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOP_SEQUENCES)] | None


class _Sampling(_Strict):
    """Fields shared by chat and text completions."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None
    # extensions
    ignore_eos: bool = False
    top_k: int = Field(default=0, ge=0)
    repetition_penalty: float = Field(default=1.0, gt=0, le=10)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError("only n=1 is supported")
        return value

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float) -> float:
        if value != 0:
            raise ValueError("is not supported (use repetition_penalty instead); leave it at 0")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, value: Any) -> Any:
        if value == "":
            raise ValueError("must not be empty")
        return value

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def settings(self, max_new_tokens: int) -> GenerationSettings:
        return GenerationSettings(max_new_tokens=max_new_tokens, temperature=self.temperature,
                                  top_k=self.top_k, top_p=self.top_p,
                                  repetition_penalty=self.repetition_penalty, stop=self.stops(),
                                  seed=self.seed)

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool) -> bool:
        if value:
            raise ValueError("is not supported")
        return value

    @model_validator(mode="after")
    def _one_limit(self) -> "ChatCompletionRequest":
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("give max_tokens or max_completion_tokens, not both")
        return self

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def chat(self) -> list[dict[str, str]]:
        """Messages as the chat template takes them ("developer" is OpenAI's new name for "system")."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in self.messages]


class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions
    echo: bool = False
    logprobs: None = None

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool) -> bool:
        if value:
            raise ValueError("is not supported")
        return value

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def token_limit(self) -> int | None:
        return self.max_tokens


class ClassifyRequest(_Strict):
    input: str | Annotated[list[str], Field(min_length=1, max_length=MAX_CLASSIFY_TEXTS)]
    model: str | None = None

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else self.input


def parse(model: type[BaseModel], data: Any) -> Any:
    """Validate `data` (decoded JSON) as `model`, or raise `ApiError` 400 naming the first bad field."""
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise validation_error(err) from None


def validation_error(err: ValidationError) -> ApiError:
    """The first problem of `err` as a 400, in words a client can act on."""
    first = err.errors(include_url=False)[0]
    location = [str(p) for p in first.get("loc", ()) if not str(p).startswith(("function-", "union["))]
    # pydantic names union members in the location ("str", "list[...]"): keep the field path only.
    path = ".".join(p for p in location if not p.startswith(("str", "list[", "int", "float", "bool", "none")))
    message = first.get("msg", "invalid value")
    if first.get("type") == "extra_forbidden":
        message = "unrecognized request argument (not supported by this server)"
    message = message.removeprefix("Value error, ")
    return ApiError(400, f"{path}: {message}" if path else message, param=path or None)
