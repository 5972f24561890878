"""From bytes on the wire to a validated request, off the event loop and within limits.

The event loop only reads the body (refusing more than `max_body_bytes` with a 413, by the
Content-Length header or while reading a chunked body). Everything that grows with the request runs
in a small thread pool (`RequestWorkers`): JSON parsing and validation, chat rendering, tokenization,
grammar compilation. Tokenization goes through `PromptEncoder`, which
- refuses a prompt that cannot fit in `max_prompt_tokens` before tokenizing it: a byte-level BPE
  token covers at most `longest_token_bytes` bytes, so a text of B bytes has at least
  B / longest_token_bytes tokens;
- counts the tokens of a long text in chunks (cut before a space, where pre-tokenizers cut too) and
  stops as soon as the count is clearly over the limit, without building the ids of a huge text;
- uses `encode_batch`, which releases the GIL (`encode` does not), so `/health` and every other
  request keep being answered while a large prompt is tokenized.
"""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pydantic import ValidationError

from stepflash.server.errors import APIError
from stepflash.server.protocol import InvalidParam

COUNT_CHUNK_CHARS = 1 << 16


@dataclass
class RequestLimits:
    max_body_bytes: int = 32 << 20
    max_prompt_tokens: int | None = None  # None: the model's context length


async def read_body(request, max_bytes: int) -> bytes:
    """The request body, or a 413 as soon as it is known to be longer than max_bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(max_bytes: int) -> APIError:
    return APIError(413, f"the request body is larger than the server's limit of {max_bytes} bytes",
                    code="request_too_large")


def parse_request(body: bytes, model_cls):
    """Validate a JSON body as `model_cls`; every failure is a 400 naming the field."""
    try:
        return model_cls.model_validate_json(body)
    except ValidationError as e:
        raise validation_error(e.errors()) from None
    except InvalidParam as e:
        raise APIError(400, e.message, param=e.param) from None


def validation_error(errors: list[dict]) -> APIError:
    err = errors[0]
    loc = [str(x) for x in err.get("loc", ())]
    loc = loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc
    if err.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON (or has undecodable text): "
                             f"{err.get('ctx', {}).get('error', err['msg'])}")
    if not loc:
        return APIError(400, f"the request body must be a JSON object: {err['msg']}")
    # Union members show up as extra path parts ("str", "list[...]"); the first part is the field.
    path = ".".join(p for p in loc if not any(c in p for c in "[]()")
                    and p not in ("str", "int", "float", "bool", "constrained-int"))
    return APIError(400, f"{path or loc[0]}: {err['msg']}", param=loc[0])


class RequestWorkers:
    """A bounded thread pool for request preparation: large requests queue here instead of occupying
    the event loop, and at most `max_pending` requests are being read or prepared at once (beyond, 429
    before the body is read, so a flood of large bodies cannot fill the memory)."""

    def __init__(self, threads: int = 2, max_pending: int = 64):
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="stepflash-request")
        self.max_pending = max_pending
        self.pending = 0  # touched on the event loop only

    @contextlib.contextmanager
    def slot(self):
        if self.pending >= self.max_pending:
            raise APIError(429, f"the server is busy preparing {self.pending} requests; retry later",
                           type="rate_limit_error", code="queue_full")
        self.pending += 1
        try:
            yield
        finally:
            self.pending -= 1

    async def run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class PromptEncoder:
    """text -> token ids, refusing texts longer than `max_tokens` as early and as cheaply as possible."""

    def __init__(self, tokenizer, max_tokens: int):
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        # Bytes per token at most; the UTF-8 length of a vocabulary string is never shorter than the bytes
        # it stands for (byte-level and byte-fallback spellings are longer), so the bound stays safe.
        self.longest_token_bytes = max(len(t.encode("utf-8")) for t in tokenizer.get_vocab(with_added_tokens=True))

    def __call__(self, text: str, param: str) -> list[int]:
        nbytes = len(text.encode("utf-8"))
        least = -(-nbytes // self.longest_token_bytes)
        if least > self.max_tokens:
            raise self._too_long(param, least, "at least ")
        if nbytes > self.max_tokens and len(text) > 2 * COUNT_CHUNK_CHARS:  # a token has >= 1 byte: else it fits
            self._count_in_chunks(text, param)
        ids = self.tokenizer.encode_batch([text], add_special_tokens=False)[0].ids
        if len(ids) > self.max_tokens:
            raise self._too_long(param, len(ids), "")
        return ids

    def _count_in_chunks(self, text: str, param: str) -> None:
        """Stop early when the text is clearly over the limit (cuts may shift a token per chunk)."""
        total, chunks = 0, 0
        for batch in _batches(_chunks(text, COUNT_CHUNK_CHARS), 8):
            total += sum(len(e) for e in self.tokenizer.encode_batch(batch, add_special_tokens=False))
            chunks += len(batch)
            if total > self.max_tokens + 4 * chunks:
                raise self._too_long(param, total - 4 * chunks, "at least ")

    def _too_long(self, param: str, n: int, qualifier: str) -> APIError:
        return APIError(400, f"{param}: the prompt has {qualifier}{n} tokens; this server accepts at most "
                             f"{self.max_tokens}", param=param, code="context_length_exceeded")


def _chunks(text: str, size: int):
    start = 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            cut = text.rfind(" ", start + 1, end)
            end = cut if cut > start else end
        yield text[start:end]
        start = end


def _batches(items, size: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
