"""OpenAI-compatible HTTP API over the batching engine (FastAPI), plus the chat page at `/`.

Routes: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (SSE
streaming with `data: [DONE]`), GET /metrics, GET / (chat page). Every error is a 4xx/5xx with
OpenAI's body shape {"error": {"message", "type", "param", "code"}}; a client that goes away
cancels its request, which frees its batch slot at the engine's next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from levante.errors import LevanteError
from levante.infer.batch import Delta, Engine
from levante.infer.engine import SamplingParams
from levante.tokenizer.chat import check_messages, render_chat


@dataclass
class Limits:
    max_prompt_tokens: int | None = None  # None: the context length minus one
    max_tokens: int = 1024  # the most new tokens one request may ask for
    max_body_bytes: int = 1 << 20
    max_concurrent: int = 128  # requests being generated or waiting; more get 429


class APIError(StarletteHTTPException):  # an HTTPException, so FastAPI's body reading passes it through
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(status, message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def error_response(status: int, message: str, kind: str = "invalid_request_error", param=None, code=None):
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


Stop = str | list[str] | None


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (user, ...)
    model: str | None = None
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # extension (vLLM does the same)
    repetition_penalty: float = Field(1.0, gt=0)  # extension
    n: int = Field(1, ge=1, le=16)
    stop: Stop = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None


class CompletionBody(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)


class ChatBody(_Sampling):
    messages: list[dict]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class Gate:
    """ASGI middleware in front of every route: the API key (all routes but /health) and the body size
    (over `limit` bytes gets 413). Plain ASGI, so handlers still see a client's disconnect."""

    def __init__(self, app, limit: int, api_key: str | None, counters: dict):
        self.app, self.limit, self.api_key, self.counters = app, limit, api_key, counters

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        self.counters["http_requests"] += 1
        headers = dict(scope.get("headers") or [])
        if self.api_key is not None and scope["path"] != "/health":
            given = headers.get(b"authorization", b"").decode("latin-1")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not token:  # the chat page passes the key in its URL (a browser cannot set the header)
                query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
                token = query.get("key", [""])[0]
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                self.counters["rejected"] += 1
                resp = error_response(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                      "authentication_error", code="invalid_api_key")
                return await resp(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            self.counters["rejected"] += 1
            return await error_response(413, f"request body over {self.limit} bytes")(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise APIError(413, f"request body over {self.limit} bytes")
            return message

        await self.app(scope, counted, send)


def create_app(engine: Engine, model_name: str, api_key: str | None = None, limits: Limits | None = None) -> FastAPI:
    limits = limits or Limits()
    tok = engine.tokenizer
    context = engine.max_len
    max_prompt = min(limits.max_prompt_tokens or context - 1, context - 1)
    app = FastAPI(title="Levante", docs_url=None, redoc_url=None, openapi_url=None)
    counters = {"http_requests": 0, "rejected": 0, "in_flight": 0, "completion_tokens": 0, "prompt_tokens": 0}
    app.add_middleware(Gate, limit=limits.max_body_bytes, api_key=api_key, counters=counters)
    started = time.time()

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        counters["rejected"] += 1
        return error_response(e.status, e.message, e.kind, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, e: RequestValidationError):
        counters["rejected"] += 1
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "json_invalid":
            return error_response(400, "the request body is not valid JSON", code="invalid_json")
        return error_response(400, f"{where or 'body'}: {first.get('msg', 'invalid')}", param=where or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), "invalid_request_error" if e.status_code < 500 else
                              "server_error")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(started),
                                            "owned_by": "levante", "max_model_len": context}]}

    @app.get("/metrics")
    async def metrics():
        m = engine.metrics()
        return {**counters, "queue_length": m["waiting"], "running": m["running"], "engine": m,
                "uptime_s": time.time() - started}

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return resources.files("levante.infer").joinpath("static/chat.html").read_text(encoding="utf-8")

    def sampling(body: _Sampling, n_prompt: int, default_max: int | None) -> SamplingParams:
        if n_prompt > max_prompt:
            raise APIError(400, f"the prompt has {n_prompt} tokens; this server takes at most {max_prompt}",
                           "prompt", "context_length_exceeded")
        room = min(context - n_prompt - (1 if engine.speculative else 0), limits.max_tokens)
        max_tokens = body.max_tokens if not isinstance(body, ChatBody) or body.max_completion_tokens is None \
            else body.max_completion_tokens
        if max_tokens is None:
            max_tokens = min(default_max, room) if default_max is not None else room
        if max_tokens < 0:
            raise APIError(400, f"max_tokens must be >= 0, got {max_tokens}", "max_tokens")
        if max_tokens > room:
            raise APIError(400, f"max_tokens {max_tokens} is over the limit for this prompt ({room}: "
                           f"context {context}, prompt {n_prompt}, server cap {limits.max_tokens})",
                           "max_tokens", "context_length_exceeded")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise APIError(400, "stop must be up to 4 non-empty strings", "stop")
        return SamplingParams(max_new_tokens=max_tokens, temperature=body.temperature, top_k=body.top_k,
                              top_p=body.top_p, seed=body.seed, repetition_penalty=body.repetition_penalty,
                              stop=tuple(stop))

    def admit(k: int):
        if counters["in_flight"] + k > limits.max_concurrent:
            raise APIError(429, f"the server is busy ({limits.max_concurrent} requests in flight); retry later",
                           kind="rate_limit_error", code="too_many_requests")

    def start(ids, params: SamplingParams, stop_ids, logprobs, emit):
        if params.max_new_tokens == 0:  # nothing to generate (echo-only scoring)
            emit(Delta("", [], "length"))
            return None
        try:
            return engine.submit(ids, params, stop_ids=stop_ids, logprobs=logprobs, on_delta=emit)
        except LevanteError as e:
            raise APIError(400, str(e)) from None

    async def run_all(http: Request, jobs, streaming: bool):
        """Start every (ids, params, stop_ids, logprobs) job; yield (index, Delta) as they arrive."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        reqs = []
        counters["in_flight"] += len(jobs)
        try:
            for i, job in enumerate(jobs):
                reqs.append(start(*job, lambda d, i=i: loop.call_soon_threadsafe(queue.put_nowait, (i, d))))
            pending, checked = len(jobs), time.monotonic()
            while pending:
                # A streaming response is cancelled by the server when its client leaves; a plain
                # one must look for itself now and then.
                if not streaming and time.monotonic() - checked > 0.25:
                    checked = time.monotonic()
                    if await http.is_disconnected():
                        return
                try:
                    i, delta = await asyncio.wait_for(queue.get(), timeout=0.25)
                except TimeoutError:
                    continue
                pending -= delta.finish_reason is not None
                yield i, delta
        finally:
            counters["in_flight"] -= len(jobs)
            for r in reqs:
                if r is not None and r.finish_reason is None:
                    r.cancel()  # the client left: free the slot

    def usage(prompt: int, completion: int) -> dict:
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def token_logprobs(entries, offset: int):
        """OpenAI completions `logprobs` for (id, logprob, {id: logprob}) entries (None for the first prompt token)."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for tid, lp, top in entries:
            piece = tok.decode([tid], skip_special_tokens=False)
            out["tokens"].append(piece)
            out["text_offset"].append(offset)
            offset += len(piece)
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append(None if top is None else
                                       {tok.decode([t], skip_special_tokens=False): v for t, v in top.items()})
        return out

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: Request):
        prompts = body.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise APIError(400, "prompt is empty", "prompt")
        ids_list = []
        for p in prompts:
            ids = tok.encode_prompt(p) if isinstance(p, str) else list(p)
            if not ids or any(not 0 <= i < engine.cfg.vocab_size for i in ids):
                raise APIError(400, "prompt token ids must be non-empty and within the vocabulary", "prompt")
            ids_list.append(ids)
        if body.echo and body.stream:
            raise APIError(400, "echo is not supported with stream", "echo")
        jobs = []
        for ids in ids_list:
            params = sampling(body, len(ids), 16)
            for c in range(body.n):
                if params.seed is not None:
                    params = SamplingParams(**{**params.__dict__, "seed": params.seed + c})
                jobs.append((ids, params, {tok.eos_id}, body.logprobs))
        admit(len(jobs))
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": model_name}
        n_prompt = sum(len(j[0]) for j in jobs)

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            async def events():
                generated = 0
                async for i, d in run_all(http, jobs, streaming=True):
                    generated += len(d.token_ids)
                    choice = {"index": i, "text": d.text, "logprobs": None, "finish_reason": _finish(d)}
                    if body.logprobs is not None and d.logprobs:
                        choice["logprobs"] = token_logprobs(d.logprobs, 0)
                    yield sse({**head, "choices": [choice]})
                counters["completion_tokens"] += generated
                if include_usage:
                    yield sse({**head, "choices": [], "usage": usage(n_prompt, generated)})
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        texts = [""] * len(jobs)
        out_ids: list[list[int]] = [[] for _ in jobs]
        lps: list[list] = [[] for _ in jobs]
        finish = [None] * len(jobs)
        async for i, d in run_all(http, jobs, streaming=False):
            texts[i] += d.text
            out_ids[i] += d.token_ids
            lps[i] += d.logprobs
            finish[i] = _finish(d)
        choices = []
        for i, (ids, _, _, _) in enumerate(jobs):
            choice = {"index": i, "text": texts[i], "logprobs": None, "finish_reason": finish[i]}
            if body.echo:
                choice["text"] = tok.decode(ids) + texts[i]
            if body.logprobs is not None:
                entries = lps[i]
                if body.echo:
                    entries = await asyncio.to_thread(engine.prompt_logprobs, ids, max(body.logprobs, 1)) + entries
                choice["logprobs"] = token_logprobs(entries, 0)
            choices.append(choice)
        generated = sum(map(len, out_ids))
        counters["completion_tokens"] += generated
        return {**head, "choices": choices, "usage": usage(n_prompt, generated)}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, http: Request):
        try:
            messages = check_messages(body.messages)
        except LevanteError as e:
            raise APIError(400, str(e), "messages") from None
        ids = render_chat(tok, messages)
        params = sampling(body, len(ids), None)
        top = (body.top_logprobs or 0) if body.logprobs else None
        jobs = [(ids, params if params.seed is None else SamplingParams(**{**params.__dict__, "seed": params.seed + c}),
                 {tok.end_id, tok.eos_id}, top) for c in range(body.n)]
        admit(len(jobs))
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": created, "model": model_name}
        n_prompt = len(ids) * len(jobs)

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            async def events():
                chunk = {**head, "object": "chat.completion.chunk"}
                for c in range(len(jobs)):
                    yield sse({**chunk, "choices": [{"index": c, "delta": {"role": "assistant", "content": ""},
                                                     "logprobs": None, "finish_reason": None}]})
                generated = 0
                async for i, d in run_all(http, jobs, streaming=True):
                    generated += len(d.token_ids)
                    delta = {"content": d.text} if d.text else {}
                    yield sse({**chunk, "choices": [{"index": i, "delta": delta, "logprobs": None,
                                                     "finish_reason": _finish(d)}]})
                counters["completion_tokens"] += generated
                if include_usage:
                    yield sse({**chunk, "choices": [], "usage": usage(n_prompt, generated)})
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        texts, counts, finish = [""] * len(jobs), [0] * len(jobs), [None] * len(jobs)
        lps: list[list] = [[] for _ in jobs]
        async for i, d in run_all(http, jobs, streaming=False):
            texts[i] += d.text
            counts[i] += len(d.token_ids)
            finish[i] = _finish(d)
            lps[i] += d.logprobs
        choices = []
        for i in range(len(jobs)):
            choice = {"index": i, "message": {"role": "assistant", "content": texts[i]}, "logprobs": None,
                      "finish_reason": finish[i]}
            if body.logprobs:
                choice["logprobs"] = {"content": [
                    {"token": tok.decode([t], skip_special_tokens=False), "logprob": lp,
                     "top_logprobs": [{"token": tok.decode([k], skip_special_tokens=False), "logprob": v}
                                      for k, v in top.items()][: body.top_logprobs or 0]}
                    for t, lp, top in lps[i]]}
            choices.append(choice)
        counters["completion_tokens"] += sum(counts)
        return {**head, "object": "chat.completion", "choices": choices, "usage": usage(n_prompt, sum(counts))}

    return app


def _finish(d: Delta) -> str | None:
    if d.finish_reason in ("cancelled", "error"):
        return "error" if d.finish_reason == "error" else "abort"
    return d.finish_reason
