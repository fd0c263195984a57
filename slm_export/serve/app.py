"""The HTTP API (Starlette): OpenAI's completions endpoint, streamed or not, over the scheduler.

Routes: ``POST /v1/completions``; ``POST /v1/chat/completions`` (an error: the model is no
chat model); ``GET /v1/models``; ``GET /health`` (200 once warmed up, 503 while draining);
``GET /metrics`` (Prometheus); ``GET /v1/info`` (what serves: model, backend, variant,
device); ``GET /`` (the playground page). Every failure is an OpenAI-style error body with a
4xx status (a 5xx only for a generation that broke inside the backend), never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from slm_export.serve.protocol import ApiError, Completion, Limits, parse_completion
from slm_export.serve.scheduler import Draining, Job, QueueFull, Scheduler, threadsafe_emitter


@dataclass(frozen=True)
class Settings:
    limits: Limits
    info: dict  # GET /v1/info: model, backend, variant, device, ...
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    request_timeout_s: float = 300.0


def error(e: ApiError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def create_app(scheduler: Scheduler, settings: Settings) -> Starlette:
    """The Starlette app serving ``scheduler``'s backend under ``settings``."""
    api = Api(scheduler, settings)
    routes = [Route("/v1/completions", api.completions, methods=["POST"]),
              Route("/v1/chat/completions", api.chat, methods=["POST"]),
              Route("/v1/models", api.models, methods=["GET"]),
              Route("/health", api.health, methods=["GET"]),
              Route("/v1/info", api.info, methods=["GET"]),
              Route("/metrics", api.metrics, methods=["GET"]),
              Route("/", api.playground, methods=["GET"])]
    return Starlette(routes=routes, exception_handlers={404: api.not_found, 405: api.not_found})


class Api:
    """The route handlers over one scheduler."""

    def __init__(self, scheduler: Scheduler, settings: Settings):
        self.scheduler, self.settings = scheduler, settings

    def _authorized(self, request: Request) -> bool:
        if self.settings.api_key is None:
            return True
        given = request.headers.get("authorization", "")
        return secrets.compare_digest(given.encode(), f"Bearer {self.settings.api_key}".encode())

    async def completions(self, request: Request) -> Response:
        scheduler, settings = self.scheduler, self.settings
        if not self._authorized(request):
            return error(ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)", None,
                                  "invalid_api_key", "authentication_error"))
        try:
            completion = parse_completion(await _json_body(request, settings.max_body_bytes),
                                          settings.limits)
        except ApiError as e:
            scheduler.metrics.requests.labels(outcome="invalid").inc()
            return error(e)
        queue: asyncio.Queue = asyncio.Queue()
        job = Job(prompts=completion.prompts, max_tokens=completion.max_tokens,
                  sampling=completion.sampling, seed=completion.seed, stop=completion.stop,
                  deadline=time.monotonic() + settings.request_timeout_s,
                  emit=threadsafe_emitter(asyncio.get_running_loop(), queue))
        try:
            scheduler.submit(job)
        except QueueFull as e:
            scheduler.metrics.requests.labels(outcome="rejected").inc()
            return error(ApiError(429, f"the server is busy: {e}; retry later", None, "queue_full",
                                  "rate_limit_error"), headers={"Retry-After": "1"})
        except Draining as e:
            return error(ApiError(503, str(e), None, "shutting_down", "server_error"),
                         headers={"Retry-After": "5"})
        meta = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion",
                "created": int(time.time()), "model": settings.limits.model}
        if completion.stream:
            return StreamingResponse(_stream(job, queue, completion, meta),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            return await _whole(request, queue, completion, meta)
        finally:
            job.cancel()  # a client gone before the answer frees its rows; else a no-op

    async def chat(self, request: Request) -> Response:
        return error(ApiError(400, "this model is not a chat model: use POST /v1/completions with "
                              "a 'prompt'", None, "not_a_chat_model"))

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{
            "id": self.settings.limits.model, "object": "model",
            "created": self.settings.info.get("created", 0), "owned_by": "slm-export"}]})

    async def health(self, request: Request) -> Response:
        if self.scheduler.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok", "running_rows": self.scheduler.rows})

    async def info(self, request: Request) -> Response:
        return JSONResponse({**self.settings.info, "max_batch": self.scheduler.max_batch,
                             "max_tokens": self.settings.limits.max_tokens})

    async def metrics(self, request: Request) -> Response:
        return Response(self.scheduler.metrics.render(), media_type=self.scheduler.metrics.content_type)

    async def playground(self, request: Request) -> Response:
        page = resources.files("slm_export.serve").joinpath("static/playground.html").read_text()
        return Response(page, media_type="text/html; charset=utf-8")

    async def not_found(self, request: Request, exc) -> Response:
        status = getattr(exc, "status_code", 404)
        what = "no such route" if status == 404 else "method not allowed"
        return error(ApiError(status, f"{what}: {request.method} {request.url.path}", None,
                              "not_found" if status == 404 else "method_not_allowed"))


async def _json_body(request: Request, limit: int):
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is larger than {limit} bytes", None, "body_too_large")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the request body is larger than {limit} bytes", None, "body_too_large")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})", None, "invalid_json") from None


def _choice(index: int, text: str, finish: str | None) -> dict:
    return {"text": text, "index": index, "logprobs": None, "finish_reason": finish}


async def _stream(job: Job, queue: asyncio.Queue, c: Completion, meta: dict) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``; a client
    that leaves cancels the job (its rows leave the batch at the next step)."""
    try:
        if c.echo:
            for i, text in enumerate(c.prompt_texts):
                yield _event({**meta, "choices": [_choice(i, text or "", None)]})
        while True:
            event = await queue.get()
            if event[0] == "text":
                yield _event({**meta, "choices": [_choice(event[1], event[2], None)]})
            elif event[0] == "finish":
                yield _event({**meta, "choices": [_choice(event[1], "", event[2])]})
            elif event[0] == "error":
                yield _event(_failure(event).body())
                break
            else:
                if c.include_usage:
                    yield _event({**meta, "choices": [], "usage": event[1]})
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()  # no-op once every row has ended


def _failure(event: tuple) -> ApiError:
    """An ("error", message, status) event as the error it answers with."""
    _, message, status = event
    return ApiError(status, message, None, "shutting_down" if status == 503 else "generation_failed",
                    "server_error")


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def _whole(request: Request, queue: asyncio.Queue, c: Completion, meta: dict) -> Response:
    texts = {i: [(t or "") if c.echo else ""] for i, t in enumerate(c.prompt_texts)}
    finish: dict[int, str] = {}
    while True:
        try:
            event = await asyncio.wait_for(queue.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                return Response(status_code=499)  # nobody reads it: the rows are freed
            continue
        if event[0] == "text":
            texts[event[1]].append(event[2])
        elif event[0] == "finish":
            finish[event[1]] = event[2]
        elif event[0] == "error":
            return error(_failure(event))
        else:
            choices = [_choice(i, "".join(texts[i]), finish.get(i, "length")) for i in sorted(texts)]
            return JSONResponse({**meta, "choices": choices, "usage": event[1]})
