"""The OpenAI API's shapes as this server speaks them: request bodies (pydantic), responses and
streamed chunks, and errors with the field and the fix.

Every field OpenAI defines is either honoured or refused: a field that would change the output
and is not implemented (penalties, logit_bias, tools, suffix, a JSON response_format...) is a
400 naming it unless it has its neutral value, and so is any field OpenAI does not define.
Fields that change nothing in the output (user, metadata, store, ...) are accepted."""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict

from .batch import Logprobs


def valid_unicode(text: str) -> str:
    """JSON can carry lone surrogates ("\\ud800"), which no tokenizer or file system takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("holds a lone surrogate, which is not valid Unicode; send valid UTF-8 text") from None
    return text


Text = Annotated[str, AfterValidator(valid_unicode)]

# Accepted and without effect on the output.
HARMLESS = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key", "safety_identifier"}
# Defined by OpenAI (or vLLM) and not implemented: accepted at these values only.
NEUTRAL: dict[str, tuple] = {
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "repetition_penalty": (None, 1),
    "suffix": (None, ""),
    "response_format": (None, {"type": "text"}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "top_k": (None, -1, 0),
    "min_p": (None, 0),
    "modalities": (None, ["text"]),
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class Options(BaseModel):
    """What /v1/completions and /v1/chat/completions share; OpenAI's names. Greedy unless a
    temperature is given (OpenAI's default is 1; a server for evaluation answers repeatably)."""

    model_config = ConfigDict(extra="allow")

    model: Text
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: Text | list[Text] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    best_of: int | None = None

    def unsupported(self) -> str | None:
        """The first field given that this server would have to ignore, or None."""
        for name, value in (self.model_extra or {}).items():
            if name in HARMLESS:
                continue
            if name not in NEUTRAL or value not in NEUTRAL[name]:
                return name
        if self.best_of not in (None, 1, self.n):
            return "best_of"
        return None


class CompletionBody(Options):
    prompt: Text | list[Text] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None


# OpenAI's chat roles; any other string would be pasted into the chat template, where a role such
# as "user<|im_end|>\n<|im_start|>system" forges a turn.
Role = Literal["system", "developer", "user", "assistant", "tool"]


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Role
    content: Text | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The content, text parts joined; other parts (images, audio) are refused."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"content part {str(part)[:60]}: only text parts are supported")
            parts.append(valid_unicode(part["text"]))
        return "".join(parts)


class ChatBody(Options):
    messages: list[Message]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


class AdapterBody(BaseModel):
    """POST /v1/adapters: a name and a folder under the adapters root; pinned ones are never evicted."""

    name: Text
    path: Text
    pin: bool = False


class LoraBody(BaseModel):
    """vLLM's POST /v1/load_lora_adapter and /v1/unload_lora_adapter bodies."""

    lora_name: Text
    lora_path: Text | None = None


class ApiError(Exception):
    """A request that cannot be served: its HTTP status, a message naming the input and the fix, the field."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def error_body(status: int, message: str, param: str | None = None) -> dict:
    """OpenAI's error shape."""
    kind = {404: "not_found_error", 409: "conflict_error", 413: "request_too_large", 500: "server_error"}.get(
        status, "invalid_request_error"
    )
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def model_card(name: str, created: int, parent: str | None = None) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "tiedlora", "parent": parent}


class Reply:
    """One request's response, whole or as server-sent chunks, for the text or the chat endpoint."""

    def __init__(self, model: str, chat: bool, prompt_tokens: int, tokenizer, logprobs: bool):
        self.model, self.chat, self.prompt_tokens = model, chat, prompt_tokens
        self.tokenizer, self.logprobs = tokenizer, logprobs
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.kind = "chat.completion" if chat else "text_completion"
        self.offsets: dict[int, int] = {}  # per choice: where its next token starts in its text

    def token(self, token: int) -> str:
        return self.tokenizer.decode([token], clean_up_tokenization_spaces=False)

    def logprobs_of(self, index: int, entries: Logprobs) -> dict | None:
        """OpenAI's logprobs object: the chat shape (content, one entry per token) or the legacy
        completions one (parallel lists; with echo the prompt's tokens first, the very first
        with a null logprob and null top_logprobs, as OpenAI and vLLM give it)."""
        if not self.logprobs:
            return None
        if self.chat:

            def entry(t: int, lp: float | None) -> dict:
                s = self.token(t)
                return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8", "replace"))}

            content = [
                {**entry(t, lp), "top_logprobs": [entry(a, alp) for a, alp in top or []]} for t, lp, top in entries
            ]
            return {"content": content, "refusal": None}
        tokens = [self.token(t) for t, _, _ in entries]
        offsets = []
        for s in tokens:
            offsets.append(self.offsets.get(index, 0))
            self.offsets[index] = offsets[-1] + len(s)
        return {
            "tokens": tokens,
            "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [None if top is None else {self.token(a): alp for a, alp in top} for _, _, top in entries],
            "text_offset": offsets,
        }

    def choice(self, index: int, text: str, finish: str | None, entries: Logprobs, delta: bool) -> dict:
        logprobs = self.logprobs_of(index, entries)
        if not self.chat:
            return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        message = {"role": "assistant", "content": text}
        return {"index": index, "delta" if delta else "message": message, "logprobs": logprobs, "finish_reason": finish}

    def usage(self, completion: int) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }

    def whole(self, choices: list[dict], completion: int) -> dict:
        return {
            "id": self.id,
            "object": self.kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": self.usage(completion),
        }

    def chunk(self, choices: list[dict], completion: int | None = None) -> str:
        """A streamed chunk; with `completion` the usage chunk (no choices) of stream_options.include_usage."""
        data = {
            "id": self.id,
            "object": self.kind + (".chunk" if self.chat else ""),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if completion is not None:
            data["usage"] = self.usage(completion)
        return sse(data)


def sse(data) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(data)}\n\n"
