"""The OpenAI-compatible routes: request -> CharRNNService -> response, streamed as server-sent events or
whole. Validation and wire shapes are openai_protocol.py's; auth, admission, errors and the log line are
calls.py's. A completion runs on the model current as it starts, to its end (serve/service/models.py).

Same model, same request, same seed: the same text as gRPC Generate with the same prompt, max_chars,
temperature, top_k, top_p and seed, since both start the same engine stream; only the stop sequence's
handling differs (OpenAI's: not part of the text).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from serve.api.http.calls import HttpCall, Reply
from serve.api.http.openai_protocol import (
    DONE,
    Char,
    Completion,
    CompletionRequest,
    StopHold,
    completion_request,
    logprobs_object,
    parse_json,
    usage,
)
from serve.engine.protocol import Finish
from serve.engine.stream import Stream
from serve.errors import NotFound
from serve.service.charrnn import CharRNNService
from serve.service.models import ModelSlot

SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]  # nginx: do not buffer this response (proxy_buffering off for it)
FINISH = {Finish.LENGTH: "length", Finish.STOP: "stop"}


class OpenAIServing:
    def __init__(self, models: ModelSlot, model_name: str) -> None:
        self.models = models
        self.model_name = model_name
        self.created = int(time.time())  # GET /v1/models' `created`: when this server loaded its model

    def _check_model(self, name: str) -> None:
        if name != self.model_name:
            raise NotFound(f"The model {name!r} does not exist: this server serves {self.model_name!r}", "model")

    async def models_list(self, request: Request, call: HttpCall, reply: Reply) -> None:
        await reply.respond(JSONResponse({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "charrnn",
             "version": self.models.current.version}]}))  # an extra field: which repository version serves

    async def chat(self, request: Request, call: HttpCall, reply: Reply) -> None:
        raise NotFound(f"this server has no chat completions: {self.model_name!r} is a character-level model that "
                       "completes text and has no chat template; use POST /v1/completions with a prompt")

    async def completions(self, request: Request, call: HttpCall, reply: Reply) -> None:
        with self.models.use() as model:
            service = model.charrnn
            req = completion_request(parse_json(call.body), service.max_chars)
            self._check_model(req.model)
            completion = Completion(self.model_name, "fp_" + service.spec.sha256[:12])
            echoed = await _echo(service, req)
            stream = None
            if req.max_tokens:
                # A stop with a character the model cannot write can never end the text: left out (Generate
                # refuses it, but OpenAI's clients send their stops to any model).
                req = dataclasses.replace(req, stop=tuple(s for s in req.stop if service.knows(s)))
                stream = service.generate(req.prompt, req.max_tokens, req.temperature, req.top_k, req.top_p,
                                          req.seed, req.stop, alternatives=req.logprobs or 0)
            try:
                if req.stream:
                    await _stream(service, req, completion, echoed, stream, call, reply)
                else:
                    await _whole(service, req, completion, echoed, stream, call, reply)
            finally:
                if stream is not None:
                    stream.close()


async def _echo(service: CharRNNService, req: CompletionRequest) -> list[Char]:
    """The prompt's characters as the returned text begins with them (echo), scored when logprobs asks."""
    if not req.echo:
        return []
    if req.logprobs is None:
        service.encode(req.prompt, "prompt")  # the same check Generate makes, for max_tokens 0
        return [Char(c, None, None) for c in req.prompt]
    scored = await service.score(req.prompt, req.logprobs)
    return [Char(c, lp, top) for c, lp, top in zip(req.prompt, scored.logprobs, scored.alternatives, strict=True)]


def _char(vocab: tuple[str, ...], stream: Stream, token: int, logprob: float, logprobs: int | None) -> Char:
    if logprobs is None:
        return Char(vocab[token], logprob, None)
    top: list[tuple[str, float]] = []
    if stream.alternatives is not None:
        ids, lps = stream.alternatives.popleft()
        top = [(vocab[i], lp) for i, lp in zip(ids, lps, strict=True)]
    return Char(vocab[token], logprob, top)


async def _whole(service: CharRNNService, req: CompletionRequest, completion: Completion, echoed: list[Char],
                 stream: Stream | None, call: HttpCall, reply: Reply) -> None:
    chars, finish, produced = list(echoed), Finish.LENGTH, 0
    if stream is not None:
        hold, vocab = StopHold(req.stop), service.vocab
        async for token, logprob, end in stream:
            produced += 1
            chars += hold.feed(_char(vocab, stream, token, logprob, req.logprobs))
            if end:
                chars += hold.end(end is Finish.STOP)
                finish = end
    logprobs = logprobs_object(chars, 0) if req.logprobs is not None else None
    body = completion.whole("".join(c.text for c in chars), FINISH[finish], logprobs,
                            usage(len(req.prompt), produced))
    await reply.respond(JSONResponse(body))


async def _stream(service: CharRNNService, req: CompletionRequest, completion: Completion, echoed: list[Char],
                  stream: Stream | None, call: HttpCall, reply: Reply) -> None:
    """One event per character, sent as soon as the engine hands it over: whatever is ready when the loop
    looks is written in one go, so a consumer that falls behind catches up in fewer writes, never later."""
    logprobs, usage_null = req.logprobs, req.include_usage
    offset = 0

    def event(chars: list[Char], finish: str | None = None) -> bytes:
        nonlocal offset
        text = "".join(c.text for c in chars)
        lp: dict[str, Any] | None = logprobs_object(chars, offset) if logprobs is not None else None
        offset += len(text)
        return completion.chunk(text, lp, finish, usage_null)

    await reply.start(200, SSE_HEADERS)
    tail = [completion.usage_chunk(usage(len(req.prompt), 0)) if usage_null else b"", DONE]
    if stream is None:  # echo with max_tokens 0: the prompt, scored, and nothing generated
        await reply.body(b"".join((event(echoed, "length"), *tail)), more=False)
        return
    pending = [event(echoed)] if echoed else []
    hold, vocab, produced, sent = StopHold(req.stop), service.vocab, 0, 0
    while True:
        item = stream.pop()  # per character: no coroutine unless the engine is behind
        if item is None:
            if pending:
                await reply.body(b"".join(pending))
                if sent and call.first_message is None:
                    call.first()
                pending.clear()
            await stream.wait()
            continue
        token, logprob, end = item
        produced += 1
        ready = hold.feed(_char(vocab, stream, token, logprob, logprobs))
        if end:
            ready += hold.end(end is Finish.STOP)
            last = ready.pop() if ready else None
            pending += [event([c]) for c in ready]
            pending.append(event([last] if last is not None else [], FINISH[end]))
            sent += len(ready) + (last is not None)
            if usage_null:
                tail[0] = completion.usage_chunk(usage(len(req.prompt), produced))
            call.sent = sent
            if call.first_message is None:
                call.first()
            await reply.body(b"".join((*pending, *tail)), more=False)
            return
        pending += [event([c]) for c in ready]
        sent += len(ready)
        call.sent = sent

