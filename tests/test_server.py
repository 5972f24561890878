"""The OpenAI-compatible server, live on a loopback port, driven with the official `openai` client.

Most tests use `ScriptedEngine`: it implements the Engine's continuous-batching interface and emits,
for each request, a reply chosen from the prompt text, a few tokens per step (as MTP speculation
would), so every client knows exactly which text it must get back. The last tests serve a real tiny
checkpoint through `stepflash.inference.engine.Engine` and compare with the engine called directly.
"""

import asyncio
import json
import re
import socket
import threading
import time
from dataclasses import dataclass

import httpx
import openai
import pytest
import uvicorn
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from stepflash.chat import parse_chat_output, render_chat
from stepflash.server import create_app

SPECIAL = ["<|bos|>", "<|eos|>", "<|pad|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>",
           "</tool_call>", "<tool_response>", "</tool_response>"]
KEY = "sk-test"
MAX_LEN = 2000
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"}}}}}
TOOL_REPLY = ("The user wants weather.\n</think>\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n"
              "</parameter>\n<parameter=days>\n3\n</parameter>\n<parameter=metric>\ntrue\n</parameter>\n</function>\n"
              "</tool_call>")


def make_tokenizer(vocab_size=320) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = "The quick brown fox jumps over the lazy dog. Weather in Paris: sunny, 23 degrees. Reply number 17. "
    tok.train_from_iterator([text * 20, "héllo wörld 東京 ✓ " * 10], trainer)
    return tok


TOK = make_tokenizer()
IM_END = TOK.token_to_id("<|im_end|>")


def reply_for(prompt: str) -> str:
    """The scripted model: what it answers to a prompt."""
    if "badxml" in prompt:
        return "hm</think>\n<tool_call>\n<function=get_weather>\noops\n</function>\n</tool_call>"
    if "the weather in" in prompt:
        return TOOL_REPLY
    if m := re.search(r"say (\w+)", prompt):
        return f"Thinking about {m.group(1)}.\n</think>\nReply {m.group(1)} héllo 東京 ✓"
    if "forever" in prompt:
        return "la " * 3000
    if "Once upon" in prompt:
        return " a time there was a fox. The end."
    return "ok</think>fine"


@dataclass
class StepOutput:
    request_id: int
    new_token_ids: list
    new_logprobs: list
    finished: bool
    finish_reason: str | None


@dataclass
class Params:  # the fields of stepflash.inference.engine.SamplingParams
    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple = ()
    speculative_tokens: int = 0


class ScriptedEngine:
    """add_request / step / abort / has_unfinished over scripted replies; 1, 2 or 3 tokens per step."""

    def __init__(self, step_delay=0.002, chunk_cycle=(1, 2, 3)):
        self.step_delay, self.chunk_cycle = step_delay, chunk_cycle
        self.live, self.aborted, self.prompts, self.params = {}, [], {}, {}
        self.max_running, self.steps, self._next = 0, 0, 0
        self.frozen = threading.Event()  # while set, step() emits nothing: requests stay where they are

    def add_request(self, prompt_ids, params):
        prompt = TOK.decode(prompt_ids, skip_special_tokens=False)
        if "explode" in prompt:
            raise ValueError("scripted refusal")
        rid, self._next = self._next, self._next + 1
        self.prompts[rid], self.params[rid] = prompt, params
        self.live[rid] = [TOK.encode(reply_for(prompt), add_special_tokens=False).ids + [IM_END], 0]
        return rid

    def step(self):
        time.sleep(self.step_delay)
        if self.frozen.is_set():
            return []
        self.steps += 1
        self.max_running = max(self.max_running, len(self.live))
        outs = []
        for rid, (ids, pos) in list(self.live.items()):
            p = self.params[rid]
            k = self.chunk_cycle[(self.steps + rid) % len(self.chunk_cycle)]
            new, reason = [], None
            for t in ids[pos:pos + k]:
                new.append(t)
                if t in p.stop_token_ids:
                    reason = "stop"
                    break
                if pos + len(new) >= p.max_new_tokens:
                    reason = "length"
                    break
            self.live[rid][1] = pos + len(new)
            if reason or self.live[rid][1] >= len(ids):
                del self.live[rid]
            outs.append(StepOutput(rid, new, [-0.5] * len(new), rid not in self.live, reason or "stop"))
        return outs

    def abort(self, rid):
        self.aborted.append(rid)
        self.live.pop(rid, None)

    def has_unfinished(self):
        return bool(self.live)


class LiveServer:
    """uvicorn in a thread on a free loopback port."""

    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = "http://127.0.0.1:%d" % self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.01)

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def serve(engine, **kw):
    kw.setdefault("max_model_len", MAX_LEN)
    kw.setdefault("vocab_size", TOK.get_vocab_size())
    kw.setdefault("eos_token_ids", [TOK.token_to_id("<|eos|>")])
    return LiveServer(create_app(engine, TOK, "tiny-test", sampling_params=Params, **kw))


@pytest.fixture(scope="module")
def live():
    engine = ScriptedEngine()
    server = serve(engine, api_key=KEY, max_batch=8, max_queue=64)
    server.engine = engine
    yield server
    server.close()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0)


def chat(client, text, **kw):
    return client.chat.completions.create(model="tiny-test", messages=[{"role": "user", "content": text}], **kw)


def n_tokens(text):
    return len(TOK.encode(text, add_special_tokens=False).ids)


# ---- happy paths --------------------------------------------------------------------------------

def test_models_and_health(live, client):
    assert [m.id for m in client.models.list().data] == ["tiny-test"]
    assert httpx.get(live.url + "/health").json() == {"status": "ok"}


def test_chat_splits_reasoning_and_counts_usage(live, client):
    r = chat(client, "please say alpha")
    msg = r.choices[0].message
    assert msg.reasoning_content == "Thinking about alpha."
    assert msg.content == "Reply alpha héllo 東京 ✓"
    assert r.choices[0].finish_reason == "stop" and not msg.tool_calls
    prompt = render_chat([{"role": "user", "content": "please say alpha"}])
    assert r.usage.prompt_tokens == n_tokens(prompt)
    assert r.usage.completion_tokens == n_tokens(reply_for("say alpha")) + 1  # + <|im_end|>
    assert prompt in live.engine.prompts.values()  # the engine saw exactly the rendered template


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])  # vLLM's newer name is accepted too
def test_history_reasoning_reaches_the_prompt(live, client, field):
    history = [{"role": "user", "content": "please say alpha"},
               {"role": "assistant", "content": "Reply alpha", field: "I thought hard."},
               {"role": "tool", "content": "42", "tool_call_id": "c1"}]
    client.chat.completions.create(model="tiny-test", messages=history, max_tokens=5)
    prompt = render_chat([{**m, "reasoning_content": m.pop("reasoning")} if "reasoning" in m else m
                          for m in [dict(m) for m in history]])
    assert "I thought hard." in prompt and prompt in live.engine.prompts.values()


def test_streaming_chat_matches_non_streaming(client):
    chunks = list(chat(client, "say beta", stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert (reasoning, content) == ("Thinking about beta.", "Reply beta héllo 東京 ✓")
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == n_tokens(reply_for("say beta")) + 1


def test_completions_plain_streamed_n_and_batch(client):
    r = client.completions.create(model="tiny-test", prompt="Once upon", max_tokens=50)
    assert r.choices[0].text == " a time there was a fox. The end." and r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == n_tokens("Once upon")
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny-test", prompt="Once upon", max_tokens=50, stream=True))
    assert streamed == r.choices[0].text
    r = client.completions.create(model="tiny-test", prompt=["Once upon", "say gamma"], n=2, max_tokens=5)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    full = [reply_for("Once upon")] * 2 + [reply_for("say gamma")] * 2
    for c, want in zip(r.choices, full):  # max_tokens=5: the first 5 tokens of each script
        assert c.finish_reason == "length"
        assert c.text == TOK.decode(TOK.encode(want, add_special_tokens=False).ids[:5], skip_special_tokens=False)
    ids = TOK.encode("Once upon", add_special_tokens=False).ids
    r = client.completions.create(model="tiny-test", prompt=ids, max_tokens=50, echo=True)
    assert r.choices[0].text == "Once upon a time there was a fox. The end."


def test_tool_calls_parsed_and_typed(live, client):
    msgs = [{"role": "user", "content": "what is the weather in Paris?"}]
    r = client.chat.completions.create(model="tiny-test", messages=msgs, tools=[WEATHER])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.reasoning_content == "The user wants weather."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 3, "metric": True}
    seen = [p for p in live.engine.prompts.values() if "Paris?" in p][-1]
    assert "<tools>\n" + json.dumps(WEATHER) in seen  # tools rendered into the system turn

    chunks = list(client.chat.completions.create(model="tiny-test", messages=msgs, tools=[WEATHER], stream=True))
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    # OpenAI's incremental form: id, type and name first (empty arguments), then the arguments in pieces.
    assert calls[0].id.startswith("call_") and calls[0].function.name == "get_weather"
    assert calls[0].function.arguments == "" and all(tc.index == 0 and not tc.id for tc in calls[1:])
    assert len(calls) > 2 and json.loads("".join(tc.function.arguments for tc in calls)) == {
        "city": "Paris", "days": 3, "metric": True}
    assert not any(c.choices[0].delta.content for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # Without tools in the request, the same XML is plain content.
    r = client.chat.completions.create(model="tiny-test", messages=msgs)
    assert r.choices[0].message.content.startswith("<tool_call>") and not r.choices[0].message.tool_calls


def test_malformed_tool_xml_comes_back_as_content(client):
    r = client.chat.completions.create(model="tiny-test", messages=[{"role": "user", "content": "badxml"}],
                                       tools=[WEATHER])
    assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls
    assert r.choices[0].message.content == "<tool_call>\n<function=get_weather>\noops\n</function>\n</tool_call>"


def test_stop_strings_trim_and_abort(live, client):
    r = chat(client, "say delta", stop=["héllo"])
    assert r.choices[0].message.content == "Reply delta " and r.choices[0].finish_reason == "stop"  # verbatim
    chunks = list(chat(client, "say delta", stop=["héllo", "nope"], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Reply delta "
    r = client.completions.create(model="tiny-test", prompt="forever", max_tokens=300, stop=["la la la"])
    assert r.choices[0].text == "" and r.choices[0].finish_reason == "stop"
    time.sleep(0.1)
    assert not live.engine.live  # the engine stopped generating for the stopped request


def test_max_tokens_and_stop_token_ids(client):
    r = chat(client, "say eps", max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    space_la = TOK.encode("la", add_special_tokens=False).ids[0]
    r = client.completions.create(model="tiny-test", prompt="forever", max_tokens=300, stop=[space_la])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == ""


def test_sampling_params_reach_the_engine(live, client):
    chat(client, "say zeta", temperature=0.7, top_p=0.9, extra_body={"top_k": 5}, seed=11, n=2, max_tokens=30)
    rids = [rid for rid, p in live.engine.prompts.items() if "say zeta" in p]
    params = [live.engine.params[rid] for rid in rids]
    assert [p.seed for p in params] == [11, 12]
    assert all((p.temperature, p.top_p, p.top_k, p.max_new_tokens) == (0.7, 0.9, 5, 30) for p in params)
    assert IM_END in params[0].stop_token_ids and TOK.token_to_id("<|eos|>") in params[0].stop_token_ids


# ---- concurrency ---------------------------------------------------------------------------------

def test_32_concurrent_streams_each_get_their_own_text(live):
    async def one(client, i):
        stream = await client.chat.completions.create(
            model="tiny-test", messages=[{"role": "user", "content": f"say w{i}"}], stream=True)
        content, reasoning = "", ""
        async for chunk in stream:
            if chunk.choices:
                content += chunk.choices[0].delta.content or ""
                reasoning += getattr(chunk.choices[0].delta, "reasoning_content", None) or ""
        return reasoning, content

    async def main():
        client = openai.AsyncOpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0)
        return await asyncio.gather(*(one(client, i) for i in range(32)))

    live.engine.max_running = 0
    results = asyncio.run(main())
    assert results == [(f"Thinking about w{i}.", f"Reply w{i} héllo 東京 ✓") for i in range(32)]
    assert live.engine.max_running == 8  # requests joined a full running batch


def test_client_disconnect_aborts_generation(live):
    engine = live.engine
    body = {"model": "tiny-test", "prompt": "forever", "max_tokens": 300, "stream": True}
    with httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {KEY}"}) as http:
        with http.stream("POST", "/v1/completions", json=body) as resp:
            next(resp.iter_lines())
        before = len(engine.aborted)
        _wait(lambda: len(engine.aborted) > before and not engine.live)
        try:  # a non-streaming request whose client gives up
            http.post("/v1/completions", json={**body, "stream": False}, timeout=0.3)
        except httpx.ReadTimeout:
            pass
        _wait(lambda: len(engine.aborted) > before + 1 and not engine.live)
    assert re.search(r'stepflash_requests_total\{status="aborted"\} [1-9]', httpx.get(live.url + "/metrics").text)


def _wait(cond, timeout=5.0):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


# ---- errors ---------------------------------------------------------------------------------------

def _post(live, path, body, key=KEY, raw=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        headers["Content-Type"] = "application/json"
    r = httpx.post(live.url + path, json=None if raw is not None else body, content=raw, headers=headers)
    err = r.json().get("error")
    assert err is not None and set(err) == {"message", "type", "param", "code"}, r.text
    return r.status_code, err


@pytest.mark.parametrize("body, param", [
    ({"model": "tiny-test", "messages": [{"role": "user", "content": "x"}], "temperature": 5}, "temperature"),
    ({"model": "tiny-test", "messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p"),
    ({"model": "tiny-test", "messages": [{"role": "user", "content": "x"}], "n": 0}, "n"),
    ({"model": "tiny-test", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"model": "tiny-test", "messages": [{"role": "user", "content": "x"}], "stop": [""]}, "stop"),
    ({"model": "tiny-test", "messages": [{"role": "user", "content": "x"}], "stop": [99999]}, "stop"),
    ({"model": "tiny-test", "messages": []}, "messages"),
    ({"model": "tiny-test"}, "messages"),
    ({"model": "tiny-test", "messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ({"model": "tiny-test", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
    ({"model": "tiny-test", "messages": [{"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": "{not json"}}]}]}, "messages"),
    ({"model": "tiny-test", "messages": [{"role": "user", "content": "x " * 2000}]}, "messages"),
    ({"model": "tiny-test", "messages": [{"role": "user", "content": "x"}], "max_tokens": MAX_LEN}, "max_tokens"),
])
def test_bad_chat_requests_are_400_naming_the_field(live, body, param):
    status, err = _post(live, "/v1/chat/completions", body)
    assert status == 400 and err["param"] == param and err["type"] == "invalid_request_error"
    assert err["message"].startswith(param)


@pytest.mark.parametrize("body, param", [
    ({"model": "tiny-test", "prompt": [1, 5000]}, "prompt"),
    ({"model": "tiny-test", "prompt": ""}, "prompt"),
    ({"model": "tiny-test", "prompt": []}, "prompt"),
    ({"model": "tiny-test", "prompt": "x", "max_tokens": MAX_LEN}, "max_tokens"),
])
def test_bad_completion_requests_are_400(live, body, param):
    status, err = _post(live, "/v1/completions", body)
    assert (status, err["param"]) == (400, param)


def test_invalid_json_auth_model_and_route_errors(live, client):
    status, err = _post(live, "/v1/chat/completions", None, raw=b'{"model": "tiny-test", "messages": [')
    assert status == 400 and "JSON" in err["message"]
    status, err = _post(live, "/v1/chat/completions", None, raw=b'[1, 2]')
    assert status == 400
    good = {"model": "tiny-test", "messages": [{"role": "user", "content": "x"}]}
    assert _post(live, "/v1/chat/completions", good, key=None)[0] == 401
    assert _post(live, "/v1/chat/completions", good, key="sk-wrong")[0] == 401
    status, err = _post(live, "/v1/chat/completions", {**good, "model": "gpt-9"})
    assert (status, err["param"], err["code"]) == (404, "model", "model_not_found")
    assert _post(live, "/v1/nothing", good)[0] == 404
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=live.url + "/v1", api_key="bad", max_retries=0).models.list()
    # An engine that refuses one request fails that request only.
    status, err = _post(live, "/v1/chat/completions", {**good, "messages": [{"role": "user", "content": "explode"}]})
    assert status == 500 and err["type"] == "server_error"
    assert chat(client, "say after").choices[0].message.content == "Reply after héllo 東京 ✓"


def test_queue_full_is_429_and_metrics():
    engine = ScriptedEngine(step_delay=0.01, chunk_cycle=(3,))
    engine.frozen.set()  # the first request must still be running when /metrics is read, however slow the machine
    server = serve(engine, max_batch=1, max_queue=1)
    try:
        body = {"model": "tiny-test", "prompt": "forever", "max_tokens": 200, "stream": True}
        with httpx.Client(base_url=server.url) as http:
            with http.stream("POST", "/v1/completions", json=body) as first:
                with http.stream("POST", "/v1/completions", json=body) as second:
                    assert first.status_code == second.status_code == 200
                    r = http.post("/v1/completions", json=body)
                    assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
                    text = http.get("/metrics").text
                    assert "stepflash_queue_depth 1" in text and "stepflash_running_requests 1" in text
                    engine.frozen.clear()
        _wait(lambda: not engine.live)
        # Accepted draft tokens: chunks of 3 tokens per step -> 2 accepted, except a shorter last chunk.
        httpx.post(server.url + "/v1/completions", json={"model": "tiny-test", "prompt": "Once upon", "max_tokens": 9})
        text = httpx.get(server.url + "/metrics").text
        assert re.search(r'stepflash_rejected_requests_total\{code="429"\} 1', text)
        assert re.search(r"stepflash_generation_tokens_total \d+", text)
        mean = float(re.search(r"^stepflash_mean_accepted_draft_tokens (\S+)$", text, re.M).group(1))
        assert 1.9 < mean <= 2.0
    finally:
        server.close()


# ---- a real tiny checkpoint through the real engine ---------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    pytest.importorskip("stepflash.inference.engine")
    import torch

    from stepflash import Step35ForCausalLM, save_model
    from stepflash.config import tiny

    torch.manual_seed(0)
    model = Step35ForCausalLM(tiny().replace(vocab_size=TOK.get_vocab_size()))
    path = tmp_path_factory.mktemp("tiny-ckpt")
    save_model(model, str(path))
    TOK.save(str(path / "tokenizer.json"))
    return path


def _engine(path, **kw):
    from stepflash import load_model
    from stepflash.inference.engine import Engine

    return Engine(load_model(str(path)), **kw)


@pytest.fixture(scope="module")
def real(checkpoint):
    from stepflash.inference.engine import SamplingParams

    server = LiveServer(create_app(_engine(checkpoint, max_batch_size=2), TOK, "tiny", sampling_params=SamplingParams))
    yield server
    server.close()


_OFFLINE = {}


def _offline(path, prompts, max_new_tokens, **kw):
    """The engine called directly, one request at a time: text as the server must return it (end-of-turn
    tokens not shown)."""
    engine = _OFFLINE.get(path) or _OFFLINE.setdefault(path, _engine(path, max_batch_size=1))
    results = engine.generate(prompts, max_new_tokens, stop_token_ids=[IM_END], **kw)
    hidden = {IM_END, TOK.token_to_id("<|eos|>")}
    return [TOK.decode([t for t in r.token_ids if t not in hidden], skip_special_tokens=False) for r in results]


def test_real_engine_matches_offline_generation(real, checkpoint):
    client = openai.OpenAI(base_url=real.url + "/v1", api_key="none", max_retries=0)
    prompts = ["The quick brown", "Weather in Paris", "héllo"]
    want = [_offline(checkpoint, [TOK.encode(p, add_special_tokens=False).ids], 8)[0] for p in prompts]

    async def main():
        aclient = openai.AsyncOpenAI(base_url=real.url + "/v1", api_key="none", max_retries=0)
        return await asyncio.gather(*(aclient.completions.create(model="tiny", prompt=p, max_tokens=8, temperature=0)
                                      for p in prompts))

    got = [r.choices[0].text for r in asyncio.run(main())]  # 3 requests, batch of 2: one joins mid-flight
    assert got == want
    assert "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=prompts[0], max_tokens=8, temperature=0, stream=True)) == want[0]
    # Chat: the engine gets the rendered template's tokens; the reply is split as the parser says.
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                       temperature=0)
    prompt_ids = TOK.encode(render_chat([{"role": "user", "content": "hi"}]), add_special_tokens=False).ids
    expected = parse_chat_output(_offline(checkpoint, [prompt_ids], 8)[0])
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert (r.choices[0].message.reasoning_content, r.choices[0].message.content) == (
        expected.reasoning_content, expected.content)


def test_real_engine_seeded_sampling_is_reproducible(real, checkpoint):
    client = openai.OpenAI(base_url=real.url + "/v1", api_key="none", max_retries=0)
    ids = TOK.encode("The quick", add_special_tokens=False).ids

    def sample(seed):
        return client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=1.0, seed=seed,
                                         n=2).choices

    a, b = sample(3), sample(3)
    assert [c.text for c in a] == [c.text for c in b]
    # Choice j samples with seed + j, as the engine does for prompt j.
    assert [c.text for c in a] == _offline(checkpoint, [ids, ids], 6, temperature=1.0, seed=3)
    assert [c.text for c in sample(4)] != [c.text for c in a]


@pytest.mark.slow
def test_serve_verb_end_to_end(checkpoint, tmp_path):
    import subprocess
    import sys

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, "-m", "stepflash.cli", "serve", str(checkpoint), "--port", str(port),
                             "--api-key", "k", "--max-batch", "2", "--mtp", "3"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait(lambda: _healthy(port) or proc.poll() is not None, timeout=60)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        assert client.models.list().data[0].id == checkpoint.name
        r = client.completions.create(model=checkpoint.name, prompt="The quick brown", max_tokens=8, temperature=0)
        # MTP drafting (random heads here) must not change greedy output.
        assert r.choices[0].text == _offline(checkpoint, [TOK.encode("The quick brown", add_special_tokens=False).ids],
                                             8)[0]
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert re.search(r"^stepflash_accepted_draft_tokens_count [1-9]", metrics, re.M)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    from stepflash.cli import main

    assert main(["serve", str(tmp_path / "missing")]) == 2


def _healthy(port):
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
