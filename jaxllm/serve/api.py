"""The OpenAI API's request bodies (pydantic), the chat template, and the JSON a response is made
of: what the HTTP layer (`jaxllm.serve.app`) checks and writes, kept apart from how it serves.

Unknown fields are ignored, as OpenAI's own server does; fields jaxllm cannot honour
(presence/frequency penalties other than 0, logit_bias, best_of other than n) are refused with a
400 rather than silently dropped. Beyond OpenAI's fields, `top_k`, `min_p`, `repetition_penalty`
and `ignore_eos` are accepted (as vLLM and sglang do).
"""
from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from jaxllm.decode import Sampling
from jaxllm.serve.engine import TOP_LOGPROBS, Params, TokenInfo


class BadRequest(Exception):
    """A request the server refuses: 400 (or `status`) with this one-line message."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def first_error(e: ValidationError) -> BadRequest:
    """A pydantic error as one line naming the field and what is allowed."""
    err = e.errors()[0]
    where = ".".join(str(part) for part in err["loc"] if not str(part).startswith("function-"))
    message = err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    shown = "" if err["type"] == "missing" or isinstance(value, dict) else f" (got {value!r:.60})"
    return BadRequest(f"{where}: {message}{shown}" if where else message, where or None)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class Common(BaseModel):
    """The fields completions and chat share."""
    model_config = ConfigDict(extra="ignore")
    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop strings")
        if any(not s for s in stops):
            raise ValueError("a stop string may not be empty")
        return stops

    @model_validator(mode="after")
    def _unsupported(self):
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0:
                raise ValueError(f"{name} is not supported (only 0); use repetition_penalty")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        return self

    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


Prompt = Union[str, list[str], list[int], list[list[int]]]


class CompletionRequest(Common):
    prompt: Prompt
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _checks(self):
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported (only equal to n)")
        if self.suffix:
            raise ValueError("suffix is not supported")
        return self

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise BadRequest("prompt is empty; give a string, a list of strings or token ids", "prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)

    def params(self, max_tokens: int) -> Params:
        return Params(max_tokens, self.sampling(), self.seed, tuple(self.stop or ()), self.n, self.logprobs, self.echo,
                      self.ignore_eos)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(Common):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS)

    def params(self, max_tokens: int, extra_stops: tuple[str, ...]) -> Params:
        want = (self.top_logprobs or 0) if self.logprobs else None
        return Params(max_tokens, self.sampling(), self.seed, tuple(self.stop or ()) + extra_stops, self.n, want, False,
                      self.ignore_eos)

    @property
    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ---------------------------------------------------------------------------------------------
# Chat templates: the model's own, or a plain one for models that bring none (every model jaxllm trains)

ROLE_NAMES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOP = "\nUser:"



class ChatTemplate:
    """A model's own chat template (a Hugging Face directory's tokenizer_config.json `chat_template`,
    Jinja), rendered and tokenized by transformers' `apply_chat_template` with the generation
    prompt added; its end of turn is the model's EOS, so no extra stop string is needed."""

    stops: tuple[str, ...] = ()

    def __init__(self, directory: str | Path):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(directory))

    @staticmethod
    def found(directory: str | Path) -> bool:
        import json

        path = Path(directory) / "tokenizer_config.json"
        try:
            return bool(json.loads(path.read_text()).get("chat_template"))
        except (OSError, ValueError, AttributeError):
            return False

    def __call__(self, messages: list[Message]) -> list[int]:
        """The rendered conversation as token ids (tokenized by transformers, so a template's own BOS
        is not doubled by the tokenizer's post-processor)."""
        out = self.tokenizer.apply_chat_template([{"role": m.role, "content": m.text()} for m in messages],
                                                 tokenize=True, add_generation_prompt=True)
        ids = out["input_ids"] if hasattr(out, "keys") else out
        return [int(i) for i in ids]


class PlainTemplate:
    """jaxllm's plain chat template, for models without one (`chat_prompt`)."""

    stops = (CHAT_STOP,)

    def __call__(self, messages: list[Message]) -> str:
        return chat_prompt(messages)


def chat_prompt(messages: list[Message]) -> str:
    """jaxllm's plain chat template (docs/serving.md): each message as `Role: content` on its own
    line(s), then `Assistant:` for the reply. Generation also stops at a new `User:` turn."""
    lines = [f"{ROLE_NAMES[m.role]}: {m.text()}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"


# ---------------------------------------------------------------------------------------------
# Responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(tokens: list[TokenInfo], offset: int) -> dict:
    """Completions' logprobs object (what lm-eval-harness reads): per token its text, logprob,
    top alternatives {text: logprob} and character offset."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for info in tokens:
        out["tokens"].append(info.text)
        out["token_logprobs"].append(info.logprob)
        out["top_logprobs"].append(None if info.logprob is None else dict(info.top))
        out["text_offset"].append(offset)
        offset += len(info.text)
    return out


def chat_logprobs(tokens: list[TokenInfo]) -> dict:
    def entry(text, lp):
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(i.text, i.logprob), "top_logprobs": [entry(t, lp) for t, lp in i.top]}
                        for i in tokens]}
