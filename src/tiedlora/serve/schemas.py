"""The OpenAI API's shapes as this server speaks them: request bodies (pydantic), responses and
streamed chunks, and errors with the field and the fix."""

from __future__ import annotations

import json
import time
import uuid

from pydantic import BaseModel


class Options(BaseModel):
    """What /v1/completions and /v1/chat/completions share; OpenAI's names and defaults."""

    model: str
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    stop: str | list[str] | None = None
    stream: bool = False
    seed: int | None = None


class CompletionBody(Options):
    prompt: str


class Message(BaseModel):
    role: str
    content: str


class ChatBody(Options):
    messages: list[Message]


class AdapterBody(BaseModel):
    name: str
    path: str


class ApiError(Exception):
    """A request that cannot be served: its HTTP status, a message naming the input and the fix, the field."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def error_body(status: int, message: str, param: str | None = None) -> dict:
    """OpenAI's error shape."""
    kind = {404: "not_found_error", 409: "conflict_error", 500: "server_error"}.get(status, "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "tiedlora"}


class Reply:
    """One completion's response, whole or as server-sent chunks, for the text or the chat endpoint."""

    def __init__(self, model: str, chat: bool, prompt_tokens: int):
        self.model, self.chat, self.prompt_tokens = model, chat, prompt_tokens
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.kind = "chat.completion" if chat else "text_completion"

    def choice(self, text: str, finish: str | None, delta: bool) -> dict:
        if not self.chat:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {
            "index": 0,
            "delta" if delta else "message": {"role": "assistant", "content": text},
            "finish_reason": finish,
        }

    def usage(self, completion: int) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }

    def whole(self, text: str, finish: str, completion: int) -> dict:
        return {
            "id": self.id,
            "object": self.kind,
            "created": self.created,
            "model": self.model,
            "choices": [self.choice(text, finish, False)],
            "usage": self.usage(completion),
        }

    def chunk(self, text: str, finish: str | None = None, completion: int | None = None) -> str:
        data = {
            "id": self.id,
            "object": self.kind + (".chunk" if self.chat else ""),
            "created": self.created,
            "model": self.model,
            "choices": [self.choice(text, finish, True)],
        }
        if completion is not None:
            data["usage"] = self.usage(completion)
        return sse(data)


def sse(data) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(data)}\n\n"
