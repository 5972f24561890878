"""The two generation endpoints: /v1/completions (raw text) and /v1/chat/completions (Step 3.5 chat).

A request becomes one engine request per choice (`n` times each prompt). Each choice has its own
`TextStream` (decoding, stop strings) and, for chat, its own `ChatStreamParser` (reasoning, content,
tool calls). The same event loop serves both the streaming (SSE) and the one-shot response; the
only difference is whether deltas are sent as they come or folded into one body. Streamed tool calls
take OpenAI's incremental form, as vLLM sends them (`stepflash.chat.stream`): the call's id and name
first, then its arguments in pieces; finish_reason is "tool_calls" when a reply that ended by itself
made calls.

Choices made where OpenAI's API says nothing about this model:
- stop strings are matched on the whole generated text, reasoning included (as vLLM does);
- choice j of a request with `seed` samples with seed + j, so n > 1 gives n different samples;
- `tool_choice` "none" drops the tools from the prompt and skips tool-call parsing; "required" or a
  named function is enforced by a grammar (`server/params.py`; a 400 where the engine has no
  constrained decoding);
- prompt_tokens in `usage` counts each prompt once, completion_tokens every generated token of every
  choice, including the end-of-turn token that stopped it.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from stepflash.chat import (ChatFormatError, ChatStreamParser, ChatTemplate, ParsedReply, collect, finish_reason,
                            openai_deltas, opens_reasoning)
from stepflash.server.errors import APIError
from stepflash.server.logprobs import TokenBytes, chat_logprobs, completion_logprobs
from stepflash.server.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from stepflash.server.runner import EngineRunner, QueueFull
from stepflash.server.textstream import TextStream


@dataclass
class Choice:
    """The state of one generated sequence."""

    index: int
    stream: TextStream
    parser: ChatStreamParser | None = None  # chat only
    reply: ParsedReply = field(default_factory=lambda: ParsedReply(None, None))
    text: str = ""  # completions: all released text
    tokens: int = 0
    finish_reason: str | None = None
    # logprobs (requests that ask): every shown token's id, logprob and top alternatives
    lp_ids: list[int] = field(default_factory=list)
    lp_values: list[float] = field(default_factory=list)
    lp_tops: list = field(default_factory=list)
    piece: tuple | None = None  # the newest event's (ids, logprobs, tops), shown tokens only
    offset: int = 0  # completions: characters before the newest piece (text_offset)

    def add_logprobs(self, ids: list[int], logprobs: list[float], tops) -> None:
        hidden = self.stream.hidden_ids  # end-of-turn tokens are not shown in the text, nor here
        keep = [i for i, t in enumerate(ids) if t not in hidden]
        tops = tops or [[] for _ in ids]
        self.piece = ([ids[i] for i in keep], [logprobs[i] for i in keep], [tops[i] for i in keep])
        self.lp_ids += self.piece[0]
        self.lp_values += self.piece[1]
        self.lp_tops += self.piece[2]


@dataclass
class Service:
    runner: EngineRunner
    tokenizer: Any  # tokenizers.Tokenizer
    model_name: str
    template: ChatTemplate
    max_model_len: int
    vocab_size: int
    eos_ids: list[int]
    params: Any  # server.params.ParamsBuilder: request fields -> the engine's SamplingParams
    encoder: Any  # server.intake.PromptEncoder: text -> ids within the prompt limit
    _token_bytes: Any = None

    @property
    def token_bytes(self) -> TokenBytes:
        if self._token_bytes is None:
            self._token_bytes = TokenBytes(self.tokenizer)
        return self._token_bytes

    def chat_logprobs(self, choice: "Choice", whole: bool = True) -> dict:
        ids, lps, tops = (choice.lp_ids, choice.lp_values, choice.lp_tops) if whole else choice.piece
        return chat_logprobs(self.token_bytes, ids, lps, tops)

    def completion_logprobs(self, choice: "Choice", k: int, whole: bool = True) -> dict:
        ids, lps, tops = (choice.lp_ids, choice.lp_values, choice.lp_tops) if whole else choice.piece
        out = completion_logprobs(self.token_bytes, ids, lps, tops, choice.offset)
        if not whole:
            choice.offset = (out["text_offset"][-1] + len(self.token_bytes.text(ids[-1]))) if ids else choice.offset
        return out

    # ---- request -> engine requests --------------------------------------------------------------
    def encode(self, text: str, param: str = "prompt") -> list[int]:
        return self.encoder(text, param)

    def _check_ids(self, ids: list[int], param: str) -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise APIError(400, f"{param}: token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})",
                           param=param)

    def _engine_requests(self, req: SamplingFields, prompts: list[list[int]], param: str, default_max: int | None,
                         grammar=None):
        self._check_ids(req.stop_ids(), "stop")
        stop_ids = self.params.stop_ids(req)
        out = []
        for ids in prompts:
            if not ids:
                raise APIError(400, f"{param}: the prompt is empty", param=param)
            self._check_ids(ids, param)
            if len(ids) > self.encoder.max_tokens:  # token-id prompts skip the encoder's check
                raise APIError(400, f"{param}: the prompt has {len(ids)} tokens; this server accepts at most "
                                    f"{self.encoder.max_tokens}", param=param, code="context_length_exceeded")
            room = self.max_model_len - len(ids)
            if room < 1:
                raise APIError(400, f"{param}: the prompt has {len(ids)} tokens, the context length is "
                                    f"{self.max_model_len}", param=param, code="context_length_exceeded")
            max_tokens = req.max_tokens or min(default_max or room, room)
            if max_tokens > room:
                raise APIError(400, f"max_tokens: the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) "
                                    f"exceeds the context length ({self.max_model_len})", param="max_tokens",
                               code="context_length_exceeded")
            out += [(ids, params) for params in self.params.build(req, max_tokens, stop_ids, grammar)]
        return out, sorted(set(stop_ids) | set(self.eos_ids))  # hidden in the text even with ignore_eos

    def _chat_prompt(self, req: ChatCompletionRequest) -> tuple[list[int], list[dict] | None, bool]:
        use_tools = req.tools if req.tools and req.tool_choice != "none" else None
        tools = [t.model_dump(exclude_none=True) for t in use_tools] if use_tools else None
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        try:
            prompt = self.template.render(messages, tools)
        except ChatFormatError as e:
            raise APIError(400, str(e), param="messages") from None
        return self.encode(prompt, "messages"), tools, opens_reasoning(prompt)

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    # ---- generation ----------------------------------------------------------------------------
    async def _run(self, handles, choices: list[Choice], request=None) -> AsyncIterator[tuple[Choice, str]]:
        """Yield (choice, released text) as tokens arrive; set each choice's finish_reason.
        With `request` (one-shot responses), a client that disconnects aborts everything at once."""
        queue, pending = handles[0].events, len(handles)
        watcher = asyncio.create_task(_watch_disconnect(request, queue)) if request is not None else None
        try:
            while pending:
                index, kind, *payload = await queue.get()
                if kind == "disconnect":
                    return
                choice = choices[index]
                if choice.finish_reason is not None:
                    continue
                choice.piece = None
                if kind == "tokens":
                    choice.tokens += len(payload[0])
                    if len(payload) > 2 and payload[2] is not None:
                        choice.add_logprobs(*payload)
                    text = choice.stream.push(payload[0])
                    if choice.stream.stopped:  # a stop string: end this choice now
                        self.runner.cancel(handles[index], status="ok")
                        choice.finish_reason = "stop"
                        pending -= 1
                elif kind == "finish":
                    text, choice.finish_reason = choice.stream.finish(), payload[0]
                    pending -= 1
                else:
                    raise APIError(500, payload[0], type="server_error")
                yield choice, text
        finally:
            if watcher is not None:
                watcher.cancel()
            for handle in handles:
                self.runner.cancel(handle)  # no-op for finished ones

    def _submit(self, engine_requests):
        try:
            return self.runner.submit_many(engine_requests)
        except QueueFull as e:
            raise APIError(429, str(e), type="rate_limit_error", code="queue_full") from None

    # ---- /v1/chat/completions ------------------------------------------------------------------
    def prepare_chat(self, req: ChatCompletionRequest):
        """Render, tokenize and validate (in a request worker thread; nothing touches the engine)."""
        self.check_model(req.model)
        ids, tools, reasoning = self._chat_prompt(req)
        grammar = self.params.grammar(req, tools, reasoning)
        engine_requests, stop_ids = self._engine_requests(req, [ids], "messages", None, grammar)
        choices = [Choice(i, TextStream(self.tokenizer, req.stop_strings(), stop_ids), ChatStreamParser(tools, reasoning))
                   for i in range(len(engine_requests))]
        return engine_requests, choices, len(ids)

    def start_chat(self, req: ChatCompletionRequest, prepared=None):
        engine_requests, choices, prompt_tokens = prepared or self.prepare_chat(req)
        return self._submit(engine_requests), choices, prompt_tokens

    async def chat(self, req: ChatCompletionRequest, request, started=None) -> dict:
        handles, choices, prompt_tokens = started or self.start_chat(req)
        async for choice, text in self._run(handles, choices, request):
            collect(choice.parser.feed(text), choice.reply)
            if choice.finish_reason is not None:
                collect(choice.parser.finish(), choice.reply)
        lp = req.top_logprobs_wanted() is not None
        return {"id": _id("chatcmpl"), "object": "chat.completion", "created": int(time.time()),
                "model": self.model_name,
                "choices": [_chat_choice(c, self.chat_logprobs(c) if lp else None) for c in choices],
                "usage": _usage(prompt_tokens, choices)}

    async def chat_stream(self, req: ChatCompletionRequest, started) -> AsyncIterator[str]:
        handles, choices, prompt_tokens = started
        head = {"id": _id("chatcmpl"), "object": "chat.completion.chunk", "created": int(time.time()),
                "model": self.model_name}
        for c in choices:
            yield _sse({**head, "choices": [{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                             "finish_reason": None}]})
        try:
            async for choice, text in self._run(handles, choices):
                events = choice.parser.feed(text)
                if choice.finish_reason is not None:
                    events += choice.parser.finish()
                deltas = openai_deltas(events)
                logprobs = self.chat_logprobs(choice, whole=False) if choice.piece and choice.piece[0] else None
                if logprobs and not deltas:  # tokens whose text is held back still show their logprobs
                    deltas = [{}]
                for delta in deltas:
                    item = {"index": choice.index, "delta": delta, "finish_reason": None}
                    if logprobs:
                        item["logprobs"], logprobs = logprobs, None
                    yield _sse({**head, "choices": [item]})
                if choice.finish_reason is not None:
                    yield _sse({**head, "choices": [{"index": choice.index, "delta": {},
                                                     "finish_reason": _chat_finish(choice)}]})
        except APIError as e:
            yield _sse(e.body())
        if req.stream_options and req.stream_options.include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(prompt_tokens, choices)})
        yield "data: [DONE]\n\n"

    # ---- /v1/completions -----------------------------------------------------------------------
    def prepare_completion(self, req: CompletionRequest):
        """Tokenize and validate (in a request worker thread; nothing touches the engine)."""
        self.check_model(req.model)
        prompts = [self.encode(p) if isinstance(p, str) else p for p in req.prompts()]
        grammar = self.params.grammar(req, None, False)
        engine_requests, stop_ids = self._engine_requests(req, prompts, "prompt", 16, grammar)
        choices = [Choice(i, TextStream(self.tokenizer, req.stop_strings(), stop_ids))
                   for i in range(len(engine_requests))]
        if req.echo:
            for c, (ids, _) in zip(choices, engine_requests):
                c.text = self.tokenizer.decode(ids, skip_special_tokens=False)
        return engine_requests, choices, sum(len(p) for p in prompts)

    def start_completion(self, req: CompletionRequest, prepared=None):
        engine_requests, choices, prompt_tokens = prepared or self.prepare_completion(req)
        return self._submit(engine_requests), choices, prompt_tokens

    async def completion(self, req: CompletionRequest, request, started=None) -> dict:
        handles, choices, prompt_tokens = started or self.start_completion(req)
        for c in choices:
            c.offset = len(c.text)  # echo: offsets count the prompt's characters too
        async for choice, text in self._run(handles, choices, request):
            choice.text += text
        k = req.top_logprobs_wanted()
        return {"id": _id("cmpl"), "object": "text_completion", "created": int(time.time()),
                "model": self.model_name, "usage": _usage(prompt_tokens, choices),
                "choices": [{"index": c.index, "text": c.text, "finish_reason": c.finish_reason,
                             "logprobs": None if k is None else self.completion_logprobs(c, k)} for c in choices]}

    async def completion_stream(self, req: CompletionRequest, started) -> AsyncIterator[str]:
        handles, choices, prompt_tokens = started
        head = {"id": _id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": self.model_name}
        k = req.top_logprobs_wanted()
        for c in choices:
            c.offset = len(c.text)
            if c.text:  # echo
                yield _sse({**head, "choices": [{"index": c.index, "text": c.text, "logprobs": None,
                                                 "finish_reason": None}]})
        try:
            async for choice, text in self._run(handles, choices):
                logprobs = None
                if k is not None and choice.piece and choice.piece[0]:
                    logprobs = self.completion_logprobs(choice, k, whole=False)
                if text or logprobs or choice.finish_reason is not None:
                    yield _sse({**head, "choices": [{"index": choice.index, "text": text, "logprobs": logprobs,
                                                     "finish_reason": choice.finish_reason}]})
        except APIError as e:
            yield _sse(e.body())
        if req.stream_options and req.stream_options.include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(prompt_tokens, choices)})
        yield "data: [DONE]\n\n"


# ---- helpers ------------------------------------------------------------------------------------

async def _watch_disconnect(request, queue: asyncio.Queue) -> None:
    """Wait for the client to hang up (the body has been read, so the next ASGI message is the
    disconnect) and tell the generation loop."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            queue.put_nowait((-1, "disconnect"))
            return


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(prompt_tokens: int, choices: list[Choice]) -> dict:
    completion = sum(c.tokens for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def _chat_finish(choice: Choice) -> str:
    return finish_reason(choice.finish_reason, choice.parser.num_calls)


def _chat_choice(choice: Choice, logprobs: dict | None = None) -> dict:
    reply = choice.reply
    message = {"role": "assistant", "content": reply.content, "reasoning_content": reply.reasoning_content}
    if reply.tool_calls:
        message["tool_calls"] = reply.tool_calls
    return {"index": choice.index, "message": message, "logprobs": logprobs, "finish_reason": _chat_finish(choice)}

