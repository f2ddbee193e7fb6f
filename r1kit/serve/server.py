"""`r1kit serve CKPT`: an OpenAI-compatible chat server with separate reasoning and a web chat.

    POST /v1/chat/completions   stream or not; temperature, top_p, max_tokens / max_completion_tokens,
                                stop, n, seed, stream_options.include_usage (+ top_k, ignore_eos)
    GET  /v1/models             the one model served
    GET  /health                liveness and load: rows running, waiting, capacity
    GET  /                      the web chat

The `<think>` block comes back as `reasoning_content` beside `content`, in messages and in
streamed deltas, as DeepSeek's API returns it. Concurrent requests share one continuously
batched engine (see scheduler.py); a `.gguf` file is served through llama.cpp, one request at a time.
"""
from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from r1kit.common import require
require("fastapi", "r1kit serve")  # one line naming the extra when it is missing
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from r1kit.engine import SamplingParams
from r1kit.serve.backends import BackendError, load_backend
from r1kit.serve.protocol import (APIError, ChatRequest, chunk, completion_body, delta_choice, error_body,
                                  parse_request, usage)
from r1kit.serve.scheduler import RequestFailed, Scheduler
from r1kit.serve.text import ChoiceText, Delta

log = logging.getLogger("r1kit.serve")
STATIC = Path(__file__).parent / "static"


def create_app(backend):
    """A FastAPI app serving `backend` (see backends.py); the scheduler runs while the app does."""
    sched = Scheduler(backend)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        sched.start()
        yield
        await sched.stop()

    app = FastAPI(title="r1kit", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.scheduler = sched
    page = (STATIC / "index.html").read_text()
    _add_error_handlers(app)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": backend.name, **sched.stats}

    def model_card() -> dict:
        return {"id": backend.name, "object": "model", "created": started, "owned_by": "r1kit",
                "max_model_len": backend.context_len}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != backend.name:
            raise _unknown_model(model_id)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = parse_request(await request.body())
        prompt, texts, params = _prepare(backend, req)
        handle = sched.submit(prompt, params)
        watcher = asyncio.create_task(_watch_disconnect(request, sched, handle))
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if req.stream:
            return StreamingResponse(_stream(sched, handle, watcher, req, rid, backend.name, texts, len(prompt)),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            reasons = await _collect(handle, texts)
        except RequestFailed as e:
            raise APIError(500, str(e), type="server_error") from None
        finally:
            watcher.cancel()
            sched.cancel(handle.id)
        if reasons is None:  # the client went away; nobody reads a response
            return Response(status_code=499)
        choices = [{"reasoning": t.reasoning, "content": t.content, "finish_reason": r} for t, r in zip(texts, reasons)]
        return completion_body(rid, backend.name, choices, _usage(texts, len(prompt)))

    return app


def _add_error_handlers(app) -> None:
    """Every error leaves as OpenAI's error object, whatever raised it."""
    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(_, e: HTTPException):  # unknown routes, wrong methods: same error shape
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(e.detail), kind), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, e: RequestValidationError):
        return JSONResponse(error_body(f"Invalid request: {e.errors()[0].get('msg', e)}", "invalid_request_error"),
                            status_code=400)

    @app.exception_handler(Exception)
    async def server_error(_, e: Exception):
        log.exception("unhandled error")
        return JSONResponse(error_body(f"internal error: {type(e).__name__}", "server_error"), status_code=500)


def _unknown_model(name: str) -> APIError:
    return APIError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")


def _prepare(backend, req: ChatRequest):
    """Validate against the model → (prompt ids, one ChoiceText per choice, one SamplingParams per choice)."""
    from r1kit.tokenizer import TokenizerError
    if req.model != backend.name:
        raise _unknown_model(req.model)
    try:
        prompt, in_reasoning = backend.prompt([m.as_chat() for m in req.messages])
    except (TokenizerError, ValueError, TypeError) as e:  # template rendering rejected the messages
        raise APIError(400, f"Invalid 'messages': {e}", param="messages") from None
    ctx, limit = backend.context_len, req.limit
    if len(prompt) + (limit or 1) > ctx:
        asked = f"{len(prompt) + limit} tokens ({len(prompt)} in the messages, {limit} in the completion)" \
            if limit else f"{len(prompt)} tokens in the messages and at least one more to generate"
        raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                            f"{asked}. Please reduce the length of the messages or completion.",
                       param="messages", code="context_length_exceeded")
    d = backend.defaults
    base = dict(max_new_tokens=limit or ctx - len(prompt), stop=req.stops, ignore_eos=req.ignore_eos,
                temperature=req.temperature if req.temperature is not None else d.get("temperature", 1.0),
                top_p=req.top_p if req.top_p is not None else d.get("top_p", 1.0),
                top_k=req.top_k if req.top_k is not None else int(d.get("top_k", 0)))
    # with a seed, choice i draws from seed + i: reproducible, yet the n choices differ
    params = [SamplingParams(**base, seed=None if req.seed is None else req.seed + i) for i in range(req.n)]
    texts = [ChoiceText(backend.decode, req.stops, in_reasoning) for _ in range(req.n)]
    return prompt, texts, params


def _usage(texts: list[ChoiceText], prompt_len: int) -> dict:
    return usage(prompt_len, sum(t.n_tokens for t in texts), sum(t.reasoning_tokens for t in texts))


async def _watch_disconnect(request, sched: Scheduler, handle) -> None:
    """Free the request's slots as soon as its client is gone (polled: a disconnect is only
    noticed by reading from the connection)."""
    while not handle.done:
        if await request.is_disconnected():
            log.info("client went away; cancelling %s", handle.id)
            sched.cancel(handle.id)
            return
        await asyncio.sleep(0.1)


async def _collect(handle, texts: list[ChoiceText]) -> list[str] | None:
    """Run a request to the end → finish reason per choice, or None when it was cancelled."""
    reasons: list[str | None] = [None] * len(texts)
    async for index, token, reason in handle.events():
        texts[index].push(token)
        if reason is not None:
            texts[index].finish()
            reasons[index] = reason
    return None if None in reasons else reasons


async def _stream(sched, handle, watcher, req: ChatRequest, rid: str, model: str, texts, prompt_len: int):
    """Server-sent events: a role chunk per choice, text deltas, a finish chunk per choice,
    the usage chunk when asked for, then [DONE]."""
    created, with_usage = int(time.time()), bool(req.stream_options and req.stream_options.include_usage)
    try:
        yield chunk(rid, model, created, [delta_choice(i, {"role": "assistant", "content": ""})
                                          for i in range(len(texts))], with_usage=with_usage)
        async for batch in handle.batches():
            out = ""
            for index, (d, reason) in _merge(batch, texts).items():
                delta = {k: v for k, v in (("reasoning_content", d.reasoning), ("content", d.content)) if v}
                if delta:
                    out += chunk(rid, model, created, [delta_choice(index, delta)], with_usage=with_usage)
                if reason is not None:
                    out += chunk(rid, model, created, [delta_choice(index, {}, reason)], with_usage=with_usage)
            if out:
                yield out
        if handle.cancelled:
            return  # the client is gone
        if with_usage:
            yield chunk(rid, model, created, [], _usage(texts, prompt_len), with_usage=True)
        yield "data: [DONE]\n\n"
    except RequestFailed as e:
        yield f"data: {json.dumps(error_body(str(e), 'server_error'))}\n\n"
    finally:
        watcher.cancel()
        sched.cancel(handle.id)


def _merge(batch, texts: list[ChoiceText]) -> dict[int, tuple[Delta, str | None]]:
    """Tokens that arrived together → per choice: the text they add and the finish reason."""
    out: dict[int, tuple[Delta, str | None]] = {}
    for index, token, reason in batch:
        d, _ = out.setdefault(index, (Delta(), None))
        parts = [texts[index].push(token)] + ([texts[index].finish()] if reason is not None else [])
        for p in parts:
            d.reasoning, d.content = d.reasoning + p.reasoning, d.content + p.content
        out[index] = (d, reason)
    return out


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def add_args(p) -> None:
    p.add_argument("ckpt", help="checkpoint directory (r1kit or Hugging Face format), or a .gguf file "
                                "(served by llama.cpp, one request at a time; needs llama-cpp-python)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--max-batch", type=int, default=16,
                   help="sequences decoded together; more requests wait for a free slot")
    p.add_argument("--max-len", type=int, default=None,
                   help="context length: prompt + completion tokens (default: the model's, at most 4096; "
                        "the KV cache holds max-batch × max-len tokens)")
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients send (default: the checkpoint's directory or file name)")
    p.add_argument("--device", default="auto", help="auto (cuda → mps → cpu), cpu, cuda, cuda:1 …")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the model (default: torch's)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="uvicorn's log level (default info)")


def main(args) -> int:
    import uvicorn
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    try:
        backend = load_backend(args.ckpt, name=args.served_model_name, max_batch=args.max_batch,
                               max_len=args.max_len, device=args.device, dtype=args.dtype, threads=args.threads)
    except BackendError as e:
        print(f"r1kit serve: error: {e}", file=sys.stderr)
        return 2
    if backend.concurrent:
        how = f"r1kit engine, up to {backend.capacity} sequences at once, KV cache {backend.kv_cache_bytes() / 2**20:.1f} MiB"
    else:
        how = "llama.cpp, one request at a time"
    print(f"serving '{backend.name}' ({how}; context {backend.context_len} tokens)\n"
          f"  API  http://{args.host}:{args.port}/v1   web chat  http://{args.host}:{args.port}/", flush=True)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(message)s")
    uvicorn.run(create_app(backend), host=args.host, port=args.port, log_level=args.log_level)
    return 0
