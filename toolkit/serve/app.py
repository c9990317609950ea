"""The FastAPI app: OpenAI's /v1/chat/completions, /v1/completions, /v1/models, and /health.

Handlers validate and tokenize on the event loop, hand a `Generation` to the Scheduler (the engine thread),
and read its steps from an asyncio queue: as server-sent events, or gathered into one response. A client
that disconnects cancels its job, which frees its sequence at the engine's next step.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..api import Model
from ..errors import UserError
from ..runtime.generate import PromptTooLongError
from ..runtime.request import Generation, Step
from .protocol import BadRequest, ResponseShape, error_body, parse
from .scheduler import Job, QueueFullError, Scheduler

DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there


class _Mailbox:
    """Hands the engine thread's steps to request queues on the event loop: one wake-up of the loop takes
    everything posted until it runs (a decode step posts one item per running stream) instead of one
    wake-up (a self-pipe write and a GIL hand-over) per item. Each queue gets its items in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, Step | Exception]] = []

    def post(self, queue: asyncio.Queue, item: Step | Exception) -> None:
        with self._lock:
            self._pending.append((queue, item))
            if len(self._pending) > 1:  # a delivery is already scheduled and will take this one too
                return
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop is closed (shutting down): nobody is left to read these
            with self._lock:
                self._pending.clear()
            raise

    def _deliver(self) -> None:
        with self._lock:
            items, self._pending = self._pending, []
        for queue, item in items:
            queue.put_nowait(item)


def _error(status: int, message: str, type_: str, param: str | None = None, code: str | None = None):
    return JSONResponse(error_body(message, type_, param, code), status_code=status)


def create_app(model: Model, scheduler: Scheduler, *, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="phi3 serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.model, app.state.scheduler = model, scheduler
    served = model.name
    mailbox: list[_Mailbox] = []  # the one for the loop serving requests (made on the first request)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), "invalid_request_error")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return _error(400, str(exc), "invalid_request_error")

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception):
        # a fault of ours: OpenAI's JSON shape for clients (their SDKs parse it), the traceback in our log
        return _error(500, f"internal error ({type(exc).__name__}: {exc})", "server_error")

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return _error(
                    401, "invalid or missing API key", "invalid_request_error", code="invalid_api_key"
                )
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        s = scheduler.stats
        return {
            "status": "ok",
            "model": served,
            "running": s.running,
            "prefilling": s.prefilling,
            "waiting": s.waiting,
            "free_pages": s.free_pages,
            "total_pages": s.total_pages,
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": served, "object": "model", "created": int(time.time()), "owned_by": "phi3-toolkit"}
        return {"object": "list", "data": [card]}

    async def completion(request: Request, chat: bool):
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return _error(400, f"the request body is not valid JSON ({e})", "invalid_request_error")
        try:
            req = parse(body, chat=chat)
            if req.model is not None and req.model != served:
                raise BadRequest(
                    f"model {req.model!r} is not served here; this server serves {served!r}",
                    param="model",
                    code="model_not_found",
                )
            options = model.options(**req.options_changes)
            if chat:
                ids = model.prompts.encode(req.messages or [], add_generation_prompt=True)
            elif isinstance(req.prompt, list):
                ids = list(req.prompt)
                if min(ids) < 0 or max(ids) >= model.source.config.vocab_size:
                    raise BadRequest("a prompt token id is outside the vocabulary", param="prompt")
            else:
                ids = model.prompt_ids(req.prompt or "", raw=True)
            gen = model.new_generation(ids, options)
        except PromptTooLongError as e:
            return _error(
                400,
                str(e),
                "invalid_request_error",
                "messages" if chat else "prompt",
                "context_length_exceeded",
            )
        except BadRequest as e:
            return _error(400, str(e), "invalid_request_error", e.param, e.code)
        except UserError as e:  # an OptionsError names its option
            return _error(400, str(e), "invalid_request_error", getattr(e, "param", None))
        loop = asyncio.get_running_loop()
        if not mailbox or mailbox[0].loop is not loop:
            mailbox[:] = [_Mailbox(loop)]
        box = mailbox[0]
        queue: asyncio.Queue[Step | Exception] = asyncio.Queue()
        try:
            job = scheduler.submit(gen, lambda item: box.post(queue, item))
        except QueueFullError as e:
            return _error(429, str(e), "server_busy", code="rate_limit_exceeded")
        shape = ResponseShape(chat=chat, model=served)
        if req.stream:
            events = _sse(shape, gen, job, queue, scheduler, req.include_usage)
            return StreamingResponse(
                events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        return await _gather(request, shape, gen, job, queue, scheduler)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await completion(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await completion(request, chat=False)

    return app


async def _gather(
    request: Request,
    shape: ResponseShape,
    gen: Generation,
    job: Job,
    queue: asyncio.Queue,
    scheduler: Scheduler,
):
    pieces: list[str] = []
    try:
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    scheduler.cancel(job)
                    return _error(499, "client disconnected", "invalid_request_error")
                continue
            if isinstance(item, Exception):
                return _error(503, f"generation failed: {item}", "server_error")
            pieces.append(item.text)
            if item.finish_reason:
                return JSONResponse(
                    shape.full("".join(pieces), item.finish_reason, len(gen.prompt), len(gen.tokens))
                )
    finally:
        if gen.finish_reason is None:
            scheduler.cancel(job)


def _sse_event(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _sse(
    shape: ResponseShape,
    gen: Generation,
    job: Job,
    queue: asyncio.Queue,
    scheduler: Scheduler,
    include_usage: bool,
) -> AsyncIterator[str]:
    try:
        if shape.chat:
            yield _sse_event(shape.chunk(None, first=True))
        while True:
            item = await queue.get()
            if isinstance(item, Exception):
                yield _sse_event(error_body(f"generation failed: {item}", "server_error"))
                break
            if item.text:
                yield _sse_event(shape.chunk(item.text))
            if item.finish_reason:
                yield _sse_event(shape.chunk(None, item.finish_reason))
                if include_usage:
                    yield _sse_event(shape.usage_chunk(len(gen.prompt), len(gen.tokens)))
                break
        yield "data: [DONE]\n\n"
    finally:
        # the client went away mid-stream (the generator is closed or cancelled): free the sequence
        if gen.finish_reason is None:
            scheduler.cancel(job)
