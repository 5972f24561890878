"""`stepflash serve`: an OpenAI-compatible HTTP server over the batched engine.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with SSE streaming
ending in `data: [DONE]`), GET /health, GET /metrics (Prometheus text). `create_app` takes any object
with the Engine's continuous-batching methods (add_request / step / abort), so tests can drive the
HTTP layer with a scripted engine; `run` loads a checkpoint and serves it with uvicorn.

Every error a client can cause is answered in OpenAI's shape {"error": {message, type, param, code}}:
bad JSON or parameters 400 (naming the field), prompt + max_tokens over the context 400, wrong or
missing key 401, unknown model 404, body over the limit 413, full queue 429. Anything unexpected is a
500 with a generic message: internal details and other requests' text never reach a client.

The event loop only reads bodies and streams answers; parsing, chat rendering, tokenization and
grammar compilation run in request worker threads (`intake.py`), so one huge request never delays
another client or `/health`. What the server promises is written down in docs/server.md.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import time
from dataclasses import dataclass, field

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from stepflash.chat import ChatTemplate, resolve_chat_template
from stepflash.errors import UserError
from stepflash.server.completions import Service
from stepflash.server.errors import APIError
from stepflash.server.intake import PromptEncoder, RequestWorkers, parse_request, read_body, validation_error
from stepflash.server.metrics import CONTENT_TYPE, Metrics
from stepflash.server.params import ParamsBuilder
from stepflash.server.protocol import ChatCompletionRequest, CompletionRequest
from stepflash.server.runner import EngineRunner

log = logging.getLogger("stepflash.server")

# Stop tokens for every request besides the model's eos ids, looked up by string (ids differ per tokenizer).
END_TOKENS = ("<|im_end|>", "<|eos|>")


def create_app(engine, tokenizer, model_name: str, *, chat_template: ChatTemplate | None = None,
               max_model_len: int | None = None, vocab_size: int | None = None, eos_token_ids=None,
               api_key: str | None = None, max_batch: int | None = None, max_queue: int = 64,
               speculative_tokens: int = 0, sampling_params=None, max_body_bytes: int = 32 << 20,
               max_prompt_tokens: int | None = None, request_workers: int = 2, logprobs_mode: str = "raw"):
    """Build the FastAPI app. `engine` needs add_request/step/abort; `tokenizer` is a `tokenizers.Tokenizer`.
    Values left None come from `engine.model.config` (context length, vocabulary, eos ids).
    max_prompt_tokens: longest prompt accepted (default: the context length). logprobs_mode: what
    returned logprobs are, "raw" (log-softmax of the model's logits, vLLM's default) or "processed" (the
    distribution each token was drawn from: after the grammar mask, penalties, temperature, top-k/top-p)."""
    if api_key is not None and not api_key.strip():
        raise UserError("the API key is empty; give a key, or none at all to serve without authentication")
    if sampling_params is None:
        from stepflash.inference.engine import SamplingParams as sampling_params
    cfg = getattr(getattr(engine, "model", None), "config", None)
    eos = list(eos_token_ids if eos_token_ids is not None else (cfg.eos_token_ids if cfg else []))
    eos += [i for t in END_TOKENS if (i := tokenizer.token_to_id(t)) is not None and i not in eos]
    metrics = Metrics()
    max_batch = max_batch or getattr(engine, "max_batch_size", 8)
    runner = EngineRunner(engine, max_batch, max_queue, metrics)
    context = max_model_len or (cfg.max_position_embeddings if cfg else 4096)
    vocab = vocab_size or (cfg.vocab_size if cfg else tokenizer.get_vocab_size())
    service = Service(
        runner=runner, tokenizer=tokenizer, model_name=model_name, template=chat_template or ChatTemplate(),
        max_model_len=context, vocab_size=vocab, eos_ids=eos,
        params=ParamsBuilder(sampling_params, tokenizer, vocab, eos, speculative_tokens, logprobs_mode),
        encoder=PromptEncoder(tokenizer, min(max_prompt_tokens or context, context)))
    workers = RequestWorkers(request_workers, max_pending=max_batch + max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        runner.start()
        yield
        runner.stop()
        workers.close()

    app = FastAPI(title="stepflash", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service, app.state.metrics = service, metrics

    def error(e: APIError) -> JSONResponse:
        if e.status in (400, 401, 404, 413, 429):
            metrics.request_rejected(e.status)
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error(e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        return error(validation_error(e.errors()))

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(e.status_code, str(e.detail), type=kind).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal_error(request, e: Exception):
        log.exception("unhandled error")
        return JSONResponse(APIError(500, "internal server error", type="server_error").body(), status_code=500)

    async def check_key(request: Request):
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer KEY')",
                           type="authentication_error", code="invalid_api_key")

    auth = [Depends(check_key)]

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def get_metrics():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", dependencies=auth)
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "stepflash", "max_model_len": service.max_model_len}]}

    sse_headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

    def prepare(body: bytes, model_cls, prepare_fn):
        """Runs in a request worker: parse, validate, render, tokenize, compile the grammar."""
        req = parse_request(body, model_cls)
        return req, prepare_fn(req)

    async def generate(request: Request, model_cls, prepare_fn, start_fn, stream_fn, respond_fn):
        with workers.slot():
            body = await read_body(request, max_body_bytes)
            req, prepared = await workers.run(prepare, body, model_cls, prepare_fn)
        started = start_fn(req, prepared)
        if req.stream:
            return StreamingResponse(stream_fn(req, started), media_type="text/event-stream", headers=sse_headers)
        return await respond_fn(req, request, started)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(request: Request):
        return await generate(request, ChatCompletionRequest, service.prepare_chat, service.start_chat,
                              service.chat_stream, service.chat)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: Request):
        return await generate(request, CompletionRequest, service.prepare_completion, service.start_completion,
                              service.completion_stream, service.completion)

    return app


@dataclass
class ServeArgs:
    """Serve a checkpoint over an OpenAI-compatible HTTP API."""

    checkpoint: str = field(metadata={"positional": True, "help": "checkpoint directory (config.json, safetensors, "
                                                                    "tokenizer.json)"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on (loopback by default)"})
    port: int = field(default=8000, metadata={"help": "TCP port"})
    api_key: str | None = field(default=None, metadata={"help": "require 'Authorization: Bearer KEY' on /v1 "
                                                                "(default: $STEPFLASH_API_KEY, else no key)"})
    mtp: int = field(default=3, metadata={"help": "draft tokens per step from the MTP modules (0: off)"})
    max_batch: int = field(default=8, metadata={"help": "requests decoded together"})
    max_queue: int = field(default=64, metadata={"help": "requests waiting beyond the batch before 429"})
    model_name: str | None = field(default=None, metadata={"help": "name clients use (default: directory name)"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:1, ... (auto: cuda if available)"})
    dtype: str | None = field(default=None, metadata={"help": "float32, bfloat16, float16 (default: checkpoint's)"})
    compile: bool = field(default=False, metadata={"help": "decode with torch.compile (CUDA graphs on GPU); the "
                                                           "first requests wait for the compilation"})
    chat_template: str = field(default="auto", metadata={
        "help": "auto (the checkpoint's tokenizer_config.json template, else built-in), builtin, or a .jinja file"})
    max_body_mb: float = field(default=32.0, metadata={"help": "largest request body accepted, in MiB (413 beyond)"})
    max_prompt_tokens: int | None = field(default=None, metadata={
        "help": "longest prompt accepted, in tokens (default: the model's context length; 400 beyond)"})
    logprobs_mode: str = field(default="raw", metadata={
        "help": "returned logprobs: raw (log-softmax of the model's logits, vLLM's default) or processed (the "
                "distribution each token was drawn from)"})


def run(args: ServeArgs) -> int:
    import torch
    import uvicorn

    from stepflash.checkpoint import load_model
    from stepflash.inference.engine import Engine
    from stepflash.tokenizer import load_tokenizer

    if args.logprobs_mode not in ("raw", "processed"):
        raise UserError(f"--logprobs-mode must be raw or processed, not {args.logprobs_mode!r}")
    for name, low in (("mtp", 0), ("max_batch", 1), ("max_queue", 0), ("port", 0), ("max_body_mb", 0.001),
                      ("max_prompt_tokens", 1)):
        if getattr(args, name) is not None and getattr(args, name) < low:
            raise UserError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    api_key = args.api_key if args.api_key is not None else os.environ.get("STEPFLASH_API_KEY")
    if api_key is not None and not api_key.strip():
        raise UserError("--api-key (or $STEPFLASH_API_KEY) is empty; give a key, or set neither to serve without one")
    # flags first (cheap, and each says what is wrong with it), then the checkpoint on disk
    if not os.path.isfile(os.path.join(args.checkpoint, "config.json")):
        what = "does not exist" if not os.path.exists(args.checkpoint) else (
            "is a file" if not os.path.isdir(args.checkpoint) else "has no config.json")
        raise UserError(f"no checkpoint at {args.checkpoint!r}: it {what} (expected a directory with config.json)")
    dtypes = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if args.dtype not in dtypes:
        raise UserError(f"--dtype must be one of float32, bfloat16, float16, not {args.dtype!r}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    tokenizer = load_tokenizer(args.checkpoint)
    model = load_model(args.checkpoint, dtype=dtypes[args.dtype], device=device).eval()
    mtp = min(args.mtp, model.config.num_nextn_predict_layers)
    if mtp < args.mtp:
        log.warning("--mtp %d: the checkpoint has %d MTP modules; drafting %d tokens", args.mtp, mtp, mtp)
    engine = Engine(model, max_batch_size=args.max_batch, device=device, compile=args.compile)
    app = create_app(engine, tokenizer, args.model_name or _dir_name(args.checkpoint),
                     chat_template=resolve_chat_template(args.chat_template, args.checkpoint),
                     api_key=api_key, max_batch=args.max_batch, max_queue=args.max_queue, speculative_tokens=mtp,
                     max_body_bytes=int(args.max_body_mb * (1 << 20)), max_prompt_tokens=args.max_prompt_tokens,
                     logprobs_mode=args.logprobs_mode)
    logging.basicConfig(level=logging.INFO)
    log.info("serving %s on http://%s:%d/v1 (batch %d, queue %d, mtp %d)", args.checkpoint, args.host, args.port,
             args.max_batch, args.max_queue, mtp)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0



def _dir_name(path: str) -> str:
    return os.path.basename(os.path.normpath(os.path.abspath(path)))
