"""The OpenAI wire format, without HTTP: request bodies checked into a ChatRequest, answers and stream
chunks shaped as OpenAI's, errors as OpenAI's error JSON, and the text of a continuation assembled
token by token with stop strings cut off (openai_app.py serves them).

Field semantics follow OpenAI's API reference: temperature defaults to 1 (sampling; send 0 for
greedy), top_p to 1, max_tokens (alias max_completion_tokens) to what the engine has room for,
`stop` is one string or a list of them (the text is cut before the first one found, finish_reason
"stop"), n must be 1. Unknown fields are ignored, as OpenAI-compatible servers do, so clients that
send newer fields keep working.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..chat import message_parts, message_text
from ..decoding import SamplingOptions
from ..errors import EnginekitError

ERROR_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 408: "timeout", 413: "invalid_request_error",
               499: "client_disconnect", 503: "server_overloaded", 504: "timeout", 500: "server_error"}
MAX_STOP_STRINGS = 16


class ApiError(EnginekitError):
    """An answer other than 200; `param` names the offending field, `code` OpenAI's error code."""

    def __init__(self, message: str, status: int = 400, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


def error_body(message: str, status: int, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error JSON: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


@dataclass
class ChatRequest:
    """A checked /v1/chat/completions (messages) or /v1/completions (prompt) body."""

    model: str
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    image_urls: list[str] = field(default_factory=list)  # VLM chats: the image_url parts' URLs, in order
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False

    def options(self, default_max_tokens: int, *, add_special_tokens: bool) -> SamplingOptions:
        return SamplingOptions(max_new_tokens=self.max_tokens or default_max_tokens, temperature=self.temperature,
                               top_p=self.top_p, seed=self.seed, add_special_tokens=add_special_tokens)


def _bad(name: str, expected: str, value: Any, todo: str = "") -> ApiError:
    found = repr(value)[:100] if not isinstance(value, (dict, list)) else type(value).__name__
    return ApiError(f"Expected '{name}' to be {expected}, found {found} ({type(value).__name__}). "
                    f"{todo or f'Send {name} as {expected}, or leave it out for the default.'}", 400, param=name)


def _number(body: Mapping[str, Any], name: str, default: float, low: float, high: float, span: str) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise _bad(name, f"a number in {span}", value)
    return float(value)


def _integer(body: Mapping[str, Any], name: str, low: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _bad(name, f"an integer >= {low}", value)
    return value


def _flag(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(name, "true or false", value)
    return value


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > MAX_STOP_STRINGS:
        raise _bad("stop", f"a string or a list of at most {MAX_STOP_STRINGS} strings", value)
    return [s for s in stops if s]


def _messages(value: Any, vision: bool = False, urls: list[str] | None = None) -> list[dict[str, Any]]:
    """The checked messages; vision (a VLM bundle): list contents keep their parts for the template, with
    {"type": "image"} where an image_url part was, whose URL goes to `urls`."""
    if value is None:
        raise ApiError("Expected 'messages' (a list of {\"role\", \"content\"} objects) in a chat completion request, "
                       "found none. Send the conversation as messages, or a plain prompt to /v1/completions.",
                       400, param="messages")
    if not isinstance(value, list) or not value:
        raise _bad("messages", "a non-empty list of {\"role\", \"content\"} objects", value)
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise _bad(where, "an object with a string 'role' and a 'content'", m)
        content = m.get("content")
        try:
            if content is None and m["role"] == "assistant":
                text: Any = ""
            elif vision:
                text, found = message_parts(content, f"{where}.content")
                if urls is not None:
                    urls.extend(found)
            else:
                text = message_text(content, f"{where}.content")
        except EnginekitError as exc:
            raise ApiError(str(exc), 400, param=f"{where}.content") from None
        out.append({"role": m["role"], "content": text})
    return out


def parse_request(body: Any, chat: bool, vision: bool = False) -> ChatRequest:
    """The checked request (ApiError 400 with one paragraph for the first wrong field); vision: the served
    bundle is a VLM, whose chat messages may hold image_url parts."""
    if not isinstance(body, Mapping):
        raise ApiError(f"Expected the request body to be a JSON object, found {type(body).__name__}. Send "
                       "{\"model\": ..., " + ("\"messages\"" if chat else "\"prompt\"") + ": ...}.", 400)
    model = body.get("model")
    if not isinstance(model, str):
        raise _bad("model", "the served model's name (a string; GET /v1/models lists it)", model,
                   "Send the model name that GET /v1/models lists.")
    n = _integer(body, "n", 1)
    if n not in (None, 1):
        raise ApiError(f"Expected 'n' to be 1 (one choice per request, all this server generates), found {n}. "
                       "Send n=1 (or leave it out), and send several requests for several choices.", 400, param="n")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, Mapping):
        raise _bad("stream_options", "an object such as {\"include_usage\": true}", options)
    max_tokens = _integer(body, "max_completion_tokens", 1) if chat else None
    request = ChatRequest(
        model=model, max_tokens=_integer(body, "max_tokens", 1) or max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0, "[0, 2] (0: greedy)"),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, "(0, 1]"), seed=_integer(body, "seed", -(1 << 63)),
        stop=_stop(body.get("stop")), stream=_flag(body, "stream"),
        include_usage=_flag(options or {}, "include_usage"),
    )
    if request.top_p == 0.0:
        raise _bad("top_p", "a number in (0, 1]", 0)
    if request.seed is not None and request.seed < 0:  # numpy's generators take non-negative seeds only
        request.seed &= (1 << 64) - 1
    if chat:
        request.messages = _messages(body.get("messages"), vision, request.image_urls)
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise _bad("prompt", "one string", prompt, "Send one prompt string per request.")
        request.prompt = prompt
    return request


class TextAssembler:
    """A continuation's text as its tokens arrive: decodes the whole continuation each time, holds back
    a trailing partial UTF-8 character (U+FFFD) and any tail that could begin a stop string, and stops
    at the first stop string (the text is cut before it). push() and finish() return the new text."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str]):
        self.decode, self.stops = decode, list(stop)
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped = False  # a stop string was found: no more tokens are taken

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        self.text = text
        hits = [i for i in (text.find(s, self.sent) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self.text = text[:min(hits)]
            return self._emit(len(self.text))
        return self._emit(len(text) - self._held(text))

    def finish(self) -> str:
        """The rest of the text once generation has ended (nothing more is held back)."""
        if not self.stopped and self.ids:
            self.text = self.decode(self.ids)
        return self._emit(len(self.text))

    def _held(self, text: str) -> int:
        """Length of the longest tail of `text` (past what was sent) that starts some stop string."""
        longest = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text) - self.sent), longest, -1):
                if text.endswith(s[:k]):
                    longest = k
                    break
        return longest

    def _emit(self, end: int) -> str:
        piece = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece


@dataclass
class Reply:
    """What one request's answer carries around: ids, the model name, the endpoint kind."""

    model: str
    chat: bool
    prompt_tokens: int
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))

    def usage(self, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def full(self, text: str, finish_reason: str, completion_tokens: int) -> dict[str, Any]:
        """The non-streaming answer: chat.completion or text_completion."""
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {"id": self._id(), "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice],
                "usage": self.usage(completion_tokens)}

    def chunk(self, text: str | None, finish_reason: str | None = None, *, role: bool = False,
              usage: dict[str, int] | None = None, include_usage: bool = False) -> dict[str, Any]:
        """One stream chunk: chat.completion.chunk (a delta) or text_completion (a text piece);
        usage given: the final usage chunk, whose choices are empty."""
        if usage is not None:
            choices: list[dict[str, Any]] = []
        elif self.chat:
            delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
            choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
        else:
            choices = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}]
        out = {"id": self._id(), "object": "chat.completion.chunk" if self.chat else "text_completion",
               "created": self.created, "model": self.model, "choices": choices}
        if include_usage or usage is not None:  # OpenAI sends "usage": null on every chunk but the last
            out["usage"] = usage
        return out

    def _id(self) -> str:
        return ("chatcmpl-" if self.chat else "cmpl-") + self.id


__all__ = ["ApiError", "ChatRequest", "Reply", "TextAssembler", "error_body", "parse_request"]
