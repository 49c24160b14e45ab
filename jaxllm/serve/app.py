"""The HTTP side of `jaxllm serve`: a Starlette app (run by uvicorn) over an `Engine` thread.

Starlette because the server needs four routes, JSON, server-sent events and disconnect detection
and nothing else: it is the ASGI toolkit FastAPI is built on, without FastAPI's dependency
injection and OpenAPI layers (pydantic, which FastAPI would add for validation, we use directly:
`jaxllm.serve.api`). uvicorn is the ASGI server both recommend. docs/serving.md says more.

The event loop never runs the model: handlers validate, tokenize, `Engine.submit` and await the
engine's events, handed over with `loop.call_soon_threadsafe`. A streaming client that goes away
cancels its job (its slots are freed at the next step).
"""
from __future__ import annotations

import asyncio
import json
import logging

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from jaxllm.errors import DecodeError
from jaxllm.sample import encode_prompt
from jaxllm.serve import api
from jaxllm.serve.api import BadRequest, ChatRequest, CompletionRequest
from jaxllm.serve.engine import Engine, EngineFull, Event, Params

log = logging.getLogger("jaxllm.serve")


class Server:
    """The routes, bound to one engine and the name the model is served under."""

    def __init__(self, engine: Engine, model_name: str, chat_template=None):
        self.engine, self.model_name = engine, model_name
        self.template = chat_template or api.PlainTemplate()
        self.cfg, self.tokenizer = engine.cfg, engine.tokenizer

    # -- requests -> engine jobs ---------------------------------------------------------------

    async def body(self, request: Request, kind):
        try:
            data = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"the body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise BadRequest("the body must be a JSON object")
        try:
            req = kind.model_validate(data)
        except ValidationError as e:
            raise first_error(e) from None
        if req.model != self.model_name:
            raise BadRequest(f"model {req.model!r} does not exist; this server serves {self.model_name!r}",
                             "model", kind="invalid_request_error")
        return req

    def tokens(self, prompt: str | list[int], index: int = 0) -> list[int]:
        """A prompt's token ids, checked against the vocabulary and the context."""
        limit = self.cfg.max_seq_len
        if isinstance(prompt, str):
            if not prompt:
                raise BadRequest("the prompt is empty; a prompt needs at least one token", "prompt")
            try:
                ids = encode_prompt(self.tokenizer, prompt, index)
            except DecodeError as e:
                raise BadRequest(str(e), "prompt") from None
        else:
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
            if bad:
                raise BadRequest(f"prompt {index} has token id {bad[0]}; allowed: 0..{self.cfg.vocab_size - 1}",
                                 "prompt")
        if not ids:
            raise BadRequest(f"prompt {index} is empty; a prompt needs at least one token", "prompt")
        if len(ids) >= limit:
            raise BadRequest(f"prompt {index} is {len(ids)} tokens; this model's context is {limit} tokens, so a "
                             f"prompt may have at most {limit - 1}", "prompt")
        return ids

    def check_logprobs(self, wanted: bool, max_tokens: int) -> None:
        if wanted and max_tokens > 0 and self.engine.speculative is not None:
            raise BadRequest("logprobs of generated tokens are not available from a server decoding with "
                             "--speculative tidar; to score a prompt, ask with max_tokens 0 and echo", "logprobs")

    def max_tokens(self, requested: int | None, prompt: list[int]) -> int:
        """max_tokens, or the rest of the context when not given; generation also ends at the context."""
        room = self.cfg.max_seq_len - len(prompt)
        return room if requested is None else min(requested, room)

    def submit(self, prompt: list[int], params: Params, loop, queue: asyncio.Queue, offset: int):
        def callback(event: Event) -> None:
            event.index += offset
            loop.call_soon_threadsafe(queue.put_nowait, event)
        try:
            return self.engine.submit(prompt, params, callback)
        except EngineFull as e:
            raise BadRequest(str(e), status=429, kind="rate_limit_error") from None

    async def run(self, jobs_in: list[tuple[list[int], Params]]):
        """Submit prompts (choices numbered prompt-major, as OpenAI does) and yield their events."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        jobs = []
        try:
            offset = 0
            for prompt, params in jobs_in:
                jobs.append(self.submit(prompt, params, loop, queue, offset))
                offset += params.n
            finished = 0
            while finished < offset:
                event = await queue.get()
                if event.error:
                    raise RuntimeError(event.error)
                finished += event.finish is not None
                yield event
        finally:  # done, failed, or the client went away: free the slots
            for job in jobs:
                job.cancel()

    def usage(self, jobs_in, generated: int) -> dict:
        """Prompt tokens (each prompt once: its n choices share it) and generated tokens."""
        return api.usage(sum(len(p) for p, _ in jobs_in), generated)

    # -- routes --------------------------------------------------------------------------------

    async def completions(self, request: Request):
        req = await self.body(request, CompletionRequest)
        jobs = []
        for i, prompt in enumerate(req.prompts()):
            ids = self.tokens(prompt, i)
            jobs.append((ids, req.params(self.max_tokens(req.max_tokens, ids))))
            self.check_logprobs(req.logprobs is not None, jobs[-1][1].max_tokens)
        rid, created = api.new_id("cmpl"), api.now()

        def chunk(choices, usage=None):
            out = {"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                   "choices": choices}
            return {**out, "usage": usage} if usage is not None else out

        want = req.logprobs
        offsets = {}

        def choice(event: Event) -> dict:
            lp = None
            if want is not None:
                lp = api.completion_logprobs(event.tokens, offsets.get(event.index, 0))
                offsets[event.index] = offsets.get(event.index, 0) + sum(len(t.text) for t in event.tokens)
            return {"index": event.index, "text": event.text, "logprobs": lp, "finish_reason": event.finish}

        if req.stream:
            return self.stream(jobs, choice, chunk, req.include_usage)
        texts = {}
        generated = 0
        async for event in self.run(jobs):
            generated += 0 if event.prompt else len(event.tokens)
            c = choice(event)
            done = texts.setdefault(event.index, {"index": event.index, "text": "", "logprobs": None,
                                                  "finish_reason": None})
            done["text"] += c["text"]
            if want is not None:
                merged = done["logprobs"] or {k: [] for k in c["logprobs"]}
                done["logprobs"] = {k: merged[k] + c["logprobs"][k] for k in merged}
            done["finish_reason"] = c["finish_reason"] or done["finish_reason"]
        return JSONResponse(chunk([texts[i] for i in sorted(texts)], self.usage(jobs, generated)))

    async def chat(self, request: Request):
        req = await self.body(request, ChatRequest)
        ids = self.tokens(self.template(req.messages))
        jobs = [(ids, req.params(self.max_tokens(req.requested_tokens, ids), self.template.stops))]
        self.check_logprobs(req.logprobs, jobs[0][1].max_tokens)
        rid, created = api.new_id("chatcmpl"), api.now()

        def chunk(choices, usage=None):
            out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                   "choices": choices}
            return {**out, "usage": usage} if usage is not None else out

        started = set()

        def choice(event: Event) -> dict:
            delta = {"content": event.text}
            if event.index not in started:
                started.add(event.index)
                delta = {"role": "assistant", **delta}
            lp = api.chat_logprobs(event.tokens) if req.logprobs else None
            return {"index": event.index, "delta": delta, "logprobs": lp, "finish_reason": event.finish}

        if req.stream:
            return self.stream(jobs, choice, chunk, req.include_usage)
        out = {}
        generated = 0
        async for event in self.run(jobs):
            generated += len(event.tokens)
            c = out.setdefault(event.index, {"index": event.index, "message": {"role": "assistant", "content": ""},
                                             "logprobs": {"content": []} if req.logprobs else None,
                                             "finish_reason": None})
            c["message"]["content"] += event.text
            if req.logprobs:
                c["logprobs"]["content"] += api.chat_logprobs(event.tokens)["content"]
            c["finish_reason"] = event.finish or c["finish_reason"]
        body = {"id": rid, "object": "chat.completion", "created": created, "model": self.model_name,
                "choices": [out[i] for i in sorted(out)],
                "usage": self.usage(jobs, generated)}
        return JSONResponse(body)

    def stream(self, jobs, choice, chunk, include_usage: bool) -> StreamingResponse:
        """Server-sent events: a chunk per event (the last of each choice with its finish_reason),
        the usage chunk when asked, then `data: [DONE]`. Errors after the headers are sent go out
        as an error event."""
        async def events():
            generated = 0
            try:
                async for event in self.run(jobs):
                    generated += 0 if event.prompt else len(event.tokens)
                    yield f"data: {json.dumps(chunk([choice(event)]))}\n\n"
                if include_usage:
                    yield f"data: {json.dumps(chunk([], self.usage(jobs, generated)))}\n\n"
            except BadRequest as e:  # the queue filled between the check below and the submit
                yield f"data: {json.dumps(api.error_body(e.message, e.kind, e.param))}\n\n"
            except RuntimeError as e:
                yield f"data: {json.dumps(api.error_body(str(e), 'server_error'))}\n\n"
            yield "data: [DONE]\n\n"

        # the engine rejects a full queue at submit: check before the 200 goes out
        if self.engine.waiting.qsize() + sum(p.n for _, p in jobs) > self.engine.max_waiting:
            raise BadRequest(f"the server is busy: {self.engine.waiting.qsize()} sequences are waiting for "
                             f"{self.engine.n_slots} slots; retry later", status=429, kind="rate_limit_error")
        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def models(self, request: Request):
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": 0, "owned_by": "jaxllm",
             "max_model_len": self.cfg.max_seq_len}]})

    async def health(self, request: Request):
        if self.engine.error is not None:
            return JSONResponse({"status": "error", "error": str(self.engine.error)}, status_code=503)
        body = {"status": "ok", "slots": self.engine.n_slots, "busy": self.engine.busy_slots,
                "waiting": self.engine.waiting.qsize()}
        if self.engine.speculative is not None:
            body["tokens_per_forward"] = self.engine.tokens_per_forward
        return JSONResponse(body)


def first_error(e: ValidationError) -> BadRequest:
    return api.first_error(e)


async def _bad_request(request: Request, e: BadRequest):
    return JSONResponse(api.error_body(e.message, e.kind, e.param), status_code=e.status)


async def _http_error(request: Request, e: HTTPException):
    kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    message = f"{request.method} {request.url.path}: {e.detail}"
    return JSONResponse(api.error_body(message, kind), status_code=e.status_code)


async def _server_error(request: Request, e: Exception):
    log.exception("internal error on %s", request.url.path)
    first = str(e).splitlines()[0] if str(e) else ""
    return JSONResponse(api.error_body(f"internal error: {type(e).__name__}: {first}", "server_error"),
                        status_code=500)


def make_app(engine: Engine, model_name: str, chat_template=None) -> Starlette:
    """The app; `chat_template` renders chat messages (default: jaxllm's plain template)."""
    server = Server(engine, model_name, chat_template)
    routes = [Route("/v1/completions", server.completions, methods=["POST"]),
              Route("/v1/chat/completions", server.chat, methods=["POST"]),
              Route("/v1/models", server.models, methods=["GET"]),
              Route("/health", server.health, methods=["GET"])]
    return Starlette(routes=routes, exception_handlers={BadRequest: _bad_request, HTTPException: _http_error,
                                                        Exception: _server_error})
