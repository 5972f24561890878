"""`stepflash serve`: an OpenAI-compatible HTTP server over the batched engine.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with SSE streaming
ending in `data: [DONE]`), GET /health, GET /metrics (Prometheus text). `create_app` takes any object
with the Engine's continuous-batching methods (add_request / step / abort), so tests can drive the
HTTP layer with a scripted engine; `run` loads a checkpoint and serves it with uvicorn.

Every error a client can cause is answered in OpenAI's shape {"error": {message, type, param, code}}:
bad JSON or parameters 400 (naming the field), prompt + max_tokens over the context 400, wrong or
missing key 401, unknown model 404, full queue 429. Anything unexpected is a 500 with a generic
message: internal details and other requests' text never reach a client.
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
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from stepflash.chat import ChatTemplate, resolve_chat_template
from stepflash.errors import UserError
from stepflash.server.completions import APIError, Service
from stepflash.server.metrics import Metrics
from stepflash.server.protocol import ChatCompletionRequest, CompletionRequest
from stepflash.server.runner import EngineRunner

log = logging.getLogger("stepflash.server")

# Stop tokens for every request besides the model's eos ids, looked up by string (ids differ per tokenizer).
END_TOKENS = ("<|im_end|>", "<|eos|>")


def create_app(engine, tokenizer, model_name: str, *, chat_template: ChatTemplate | None = None,
               max_model_len: int | None = None, vocab_size: int | None = None, eos_token_ids=None,
               api_key: str | None = None, max_batch: int | None = None, max_queue: int = 64,
               speculative_tokens: int = 0, sampling_params=None):
    """Build the FastAPI app. `engine` needs add_request/step/abort; `tokenizer` is a `tokenizers.Tokenizer`.
    Values left None come from `engine.model.config` (context length, vocabulary, eos ids)."""
    if sampling_params is None:
        from stepflash.inference.engine import SamplingParams as sampling_params
    cfg = getattr(getattr(engine, "model", None), "config", None)
    eos = list(eos_token_ids if eos_token_ids is not None else (cfg.eos_token_ids if cfg else []))
    eos += [i for t in END_TOKENS if (i := tokenizer.token_to_id(t)) is not None and i not in eos]
    metrics = Metrics()
    runner = EngineRunner(engine, max_batch or getattr(engine, "max_batch_size", 8), max_queue, metrics)
    service = Service(
        runner=runner, tokenizer=tokenizer, model_name=model_name, template=chat_template or ChatTemplate(),
        max_model_len=max_model_len or (cfg.max_position_embeddings if cfg else 4096),
        vocab_size=vocab_size or (cfg.vocab_size if cfg else tokenizer.get_vocab_size()),
        eos_ids=eos, make_params=sampling_params, speculative_tokens=speculative_tokens)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        runner.start()
        yield
        runner.stop()

    app = FastAPI(title="stepflash", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service, app.state.metrics = service, metrics

    def error(e: APIError) -> JSONResponse:
        if e.status in (400, 401, 404, 429):
            metrics.request_rejected(e.status)
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error(e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        return error(_validation_to_api_error(e))

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
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=auth)
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "stepflash", "max_model_len": service.max_model_len}]}

    sse_headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        if body.stream:
            started = service.start_chat(body)
            return StreamingResponse(service.chat_stream(body, started), media_type="text/event-stream",
                                     headers=sse_headers)
        return await service.chat(body, request)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest, request: Request):
        if body.stream:
            started = service.start_completion(body)
            return StreamingResponse(service.completion_stream(body, started), media_type="text/event-stream",
                                     headers=sse_headers)
        return await service.completion(body, request)

    return app


def _validation_to_api_error(e) -> APIError:
    err = e.errors()[0]
    loc = [str(x) for x in err.get("loc", ())]
    loc = loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc
    if err.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}")
    if not loc:
        return APIError(400, f"the request body must be a JSON object: {err['msg']}")
    # Union members show up as extra path parts ("str", "list[...]"); the first part is the field.
    path = ".".join(p for p in loc if not any(c in p for c in "[]") and p not in ("str", "int", "float", "bool"))
    return APIError(400, f"{path or loc[0]}: {err['msg']}", param=loc[0])


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


def run(args: ServeArgs) -> int:
    import torch
    import uvicorn

    from stepflash.checkpoint import load_model
    from stepflash.inference.engine import Engine
    from stepflash.tokenizer import load_tokenizer

    if not os.path.isdir(args.checkpoint):
        raise UserError(f"checkpoint directory {args.checkpoint!r} does not exist")
    for name, low in (("mtp", 0), ("max_batch", 1), ("max_queue", 0), ("port", 0)):
        if getattr(args, name) < low:
            raise UserError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
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
                     api_key=args.api_key or os.environ.get("STEPFLASH_API_KEY") or None,
                     max_batch=args.max_batch, max_queue=args.max_queue, speculative_tokens=mtp)
    logging.basicConfig(level=logging.INFO)
    log.info("serving %s on http://%s:%d/v1 (batch %d, queue %d, mtp %d)", args.checkpoint, args.host, args.port,
             args.max_batch, args.max_queue, mtp)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0



def _dir_name(path: str) -> str:
    return os.path.basename(os.path.normpath(os.path.abspath(path)))
