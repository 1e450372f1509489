"""OpenAI's Completions API on the wire: the request as a checked record, the response and stream chunks
as JSON, the error body. Pure: nothing here awaits or knows the engine (openai_serving.py does).

Field names and shapes follow OpenAI's API reference for `POST /v1/completions` (the legacy Completions
API). A "token" is one character here: max_tokens, usage and logprobs count characters.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.responses import JSONResponse, Response

from serve.errors import InvalidArgument

MAX_STOPS = 4  # OpenAI's limit on `stop`
MAX_LOGPROBS = 5  # OpenAI's limit on `logprobs`
DEFAULT_MAX_TOKENS = 16  # OpenAI's default

# Parameters the model cannot honour: accepted at their neutral values (LangChain and others send them by
# default), refused otherwise, naming the parameter.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (None, 0),
    "presence_penalty": (None, 0),
    "best_of": (None, 1),
    "logit_bias": (None, {}),
    "suffix": (None, ""),
}
KNOWN = frozenset({"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream",
                   "stream_options", "logprobs", "n", "echo", "user", *NEUTRAL})

# The error `type` OpenAI's clients map to their exception classes, by HTTP status.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 503: "server_error"}
ERROR_CODES = {401: "invalid_api_key", 429: "rate_limit_exceeded", 503: "service_unavailable"}


@dataclass(frozen=True)
class CompletionRequest:
    model: str
    prompt: str
    max_tokens: int
    temperature: float | None
    top_p: float | None
    top_k: int
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    logprobs: int | None  # None: no logprobs object at all
    echo: bool


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, int | float)) and not isinstance(value, bool)


def _int(body: Mapping[str, Any], name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value):
        raise InvalidArgument(f"{name} must be an integer, got {json.dumps(value)}", name)
    if value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f">= {low}"
        raise InvalidArgument(f"{name} must be {bounds}, got {value}", name)
    return int(value)


def _number(body: Mapping[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_number(value) or not math.isfinite(value):
        raise InvalidArgument(f"{name} must be a number, got {json.dumps(value)}", name)
    return float(value)


def _bool(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidArgument(f"{name} must be true or false, got {json.dumps(value)}", name)
    return value


def parse_json(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or InvalidArgument saying why not."""
    try:
        parsed = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidArgument(f"the request body is not valid JSON: {error}") from None
    except RecursionError:
        raise InvalidArgument("the request body is not valid JSON: nested too deeply") from None
    if not isinstance(parsed, dict):
        raise InvalidArgument("the request body must be a JSON object")
    return parsed


def completion_request(body: Mapping[str, Any], max_chars: int) -> CompletionRequest:
    """The checked request; InvalidArgument (400) naming the parameter for anything the server cannot do."""
    unknown = sorted(set(body) - KNOWN)
    if unknown:
        raise InvalidArgument(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0])
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidArgument("model is required: the name GET /v1/models lists", "model")
    if "prompt" not in body:
        raise InvalidArgument("prompt is required", "prompt")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # a list of one prompt, as some clients always send
    if isinstance(prompt, list):
        raise InvalidArgument("prompt must be one string: this server completes one prompt per request (send a "
                              "request per prompt; lists of several prompts and token arrays are not supported)",
                              "prompt")
    if not isinstance(prompt, str):
        raise InvalidArgument(f"prompt must be a string, got {json.dumps(prompt)}", "prompt")
    for name, neutral in NEUTRAL.items():
        if name in body and body[name] not in neutral:
            raise InvalidArgument(f"{name} is not supported by this model (a character-level RNN); send "
                                  f"{json.dumps(neutral[-1])} or leave it out", name)
    n = _int(body, "n", 1)
    if n not in (None, 1):
        raise InvalidArgument(f"n must be 1: this server returns one choice per request, got {n}", "n")
    echo = _bool(body, "echo")
    max_tokens = _int(body, "max_tokens", 0, max_chars)
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS
    if max_tokens == 0 and not echo:
        raise InvalidArgument("max_tokens must be at least 1 (0 only with echo, to score the prompt)", "max_tokens")
    temperature = _number(body, "temperature")
    if temperature is not None and temperature < 0:
        raise InvalidArgument(f"temperature must be >= 0, got {temperature:g}", "temperature")
    top_p = _number(body, "top_p")
    if top_p is not None and not 0 < top_p <= 1:
        raise InvalidArgument(f"top_p must be in (0, 1], got {top_p:g}", "top_p")
    top_k = _int(body, "top_k", -1)
    seed = _int(body, "seed", 0, 2**64 - 1)
    stop = body.get("stop")
    stops: tuple[str, ...] = ()
    if isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    elif stop is not None:
        raise InvalidArgument(f"stop must be a string or a list of strings, got {json.dumps(stop)}", "stop")
    if len(stops) > MAX_STOPS:
        raise InvalidArgument(f"stop has {len(stops)} strings, the limit is {MAX_STOPS}", "stop")
    if any(not s for s in stops):
        raise InvalidArgument("stop strings must not be empty", "stop")
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise InvalidArgument("stream_options is only allowed with stream: true", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise InvalidArgument("stream_options takes one field, include_usage (true or false)", "stream_options")
        include_usage = _bool(options, "include_usage")
    logprobs = _int(body, "logprobs", 0, MAX_LOGPROBS)
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise InvalidArgument("user must be a string", "user")
    return CompletionRequest(model, prompt, max_tokens, temperature, top_p, max(top_k or 0, 0), seed, stops,
                             stream, include_usage, logprobs, echo)


def completion_id() -> str:
    return "cmpl-" + secrets.token_hex(12)


@dataclass(frozen=True)
class Char:
    """One character of the returned text with what logprobs reports of it."""

    text: str
    logprob: float | None
    top: Sequence[tuple[str, float]] | None  # the most likely characters at its position, with theirs


def logprobs_object(chars: Sequence[Char], offset: int) -> dict[str, Any]:
    """OpenAI's legacy logprobs: tokens, token_logprobs, top_logprobs, text_offset (from `offset`). A
    top_logprobs entry holds the most likely characters and always the chosen one, as OpenAI's does."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []
    for c in chars:
        tokens.append(c.text)
        token_logprobs.append(c.logprob)
        if c.top is None:
            top_logprobs.append(None)
        else:
            entry = dict(c.top)
            if c.text not in entry and c.logprob is not None:
                entry[c.text] = c.logprob
            top_logprobs.append(entry)
        text_offset.append(offset)
        offset += len(c.text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": text_offset}


class Completion:
    """The response envelope of one completion: its id, creation time, model and fingerprint."""

    def __init__(self, model: str, fingerprint: str) -> None:
        self.id = completion_id()
        self.created = int(time.time())
        self.model = model
        self.fingerprint = fingerprint
        head = json.dumps({"id": self.id, "object": "text_completion", "created": self.created, "model": model,
                           "system_fingerprint": fingerprint})
        # Every stream chunk starts the same way: precomputed once, so a character costs a few concatenations.
        self._chunk_head = b"data: " + head[:-1].encode() + b', "choices": [{"index": 0, "text": '

    def whole(self, text: str, finish: str, logprobs: dict[str, Any] | None, usage: dict[str, int]) -> dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint,
                "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}],
                "usage": usage}

    def chunk(self, text: str, logprobs: dict[str, Any] | None = None, finish: str | None = None,
              usage_null: bool = False) -> bytes:
        """One server-sent event: `data: {chunk}` and a blank line."""
        tail = b'}]' + (b', "usage": null' if usage_null else b"") + b"}\n\n"
        return b"".join((self._chunk_head, json.dumps(text).encode(), b', "logprobs": ',
                         json.dumps(logprobs).encode() if logprobs is not None else b"null",
                         b', "finish_reason": ', json.dumps(finish).encode(), tail))

    def usage_chunk(self, usage: dict[str, int]) -> bytes:
        return b"data: " + json.dumps({"id": self.id, "object": "text_completion", "created": self.created,
                                       "model": self.model, "system_fingerprint": self.fingerprint,
                                       "choices": [], "usage": usage}).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


def usage(prompt_chars: int, completion_chars: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_chars, "completion_tokens": completion_chars,
            "total_tokens": prompt_chars + completion_chars}


class StopHold:
    """OpenAI's stop semantics over a character stream: the stop sequence is not part of the text, so the
    characters that may begin one are held back until it is clear whether they do, and no longer.

    feed() takes each generated character and returns those now safe to send; end(stopped) returns what is
    left: everything, or (when the engine ended the stream on a stop) all but the stop sequence.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.held: list[Char] = []
        self._text = ""

    def feed(self, char: Char) -> list[Char]:
        if not self.stops:
            return [char]
        self.held.append(char)
        self._text += char.text
        keep = self._may_begin_stop(self._text)
        if keep == len(self.held):
            return []
        out = self.held[:len(self.held) - keep]
        self.held = self.held[len(self.held) - keep:]
        self._text = self._text[len(self._text) - keep:] if keep else ""
        return out

    def end(self, stopped: bool) -> list[Char]:
        held, text = self.held, self._text
        self.held, self._text = [], ""
        if stopped:
            # the stop that ended the stream ends the text; the longest such began first
            matched = max((len(s) for s in self.stops if text.endswith(s)), default=0)
            return held[:len(held) - matched]
        return held

    def _may_begin_stop(self, text: str) -> int:
        """The length of the longest suffix of text that is a prefix of some stop (or a whole stop)."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop), len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best


class OpenAIErrors:
    """Errors as OpenAI sends them: {"error": {"message", "type", "param", "code"}}."""

    @staticmethod
    def body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
        code = "model_not_found" if status == 404 and param == "model" else ERROR_CODES.get(status)
        return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                          "param": param, "code": code}}

    def response(self, status: int, message: str, param: str | None) -> Response:
        return JSONResponse(self.body(status, message, param), status_code=status)

    def event(self, status: int, message: str) -> bytes:
        return b"data: " + json.dumps(self.body(status, message)).encode() + b"\n\n" + DONE
