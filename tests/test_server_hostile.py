"""Hostile requests: each gets the status it deserves, names the field, and leaves the server answering
everyone else correctly.

Table-driven over the scripted engine of test_server.py (its replies are known exactly). The engine's
SamplingParams here has every field of issue #12 (`FullParams`), so requests reach it; a server over
the plain fields shows that a feature the engine lacks is a 400, never silently ignored. The last tests
serve the real tiny checkpoint: hostile rows sent with innocent ones must not change the innocent
outputs, which must equal the engine's solo runs.
"""

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field

import httpx
import openai
import pytest
from test_server import (KEY, MAX_LEN, TOK, WEATHER, LiveServer, Params, ScriptedEngine, StepOutput, _engine,
                         _offline, chat, checkpoint)  # noqa: F401  (checkpoint is a fixture)

from stepflash.errors import UserError
from stepflash.server import create_app
from stepflash.server.intake import PromptEncoder

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MSG = [{"role": "user", "content": "say ok"}]


@dataclass
class FullParams(Params):
    """The engine's SamplingParams as issue #12 extends it."""
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    logit_bias: dict = field(default_factory=dict)
    banned_token_ids: tuple = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    grammar: object = None


class PoisonEngine(ScriptedEngine):
    """A scripted engine with the per-row error path: a row whose prompt says "poison" fails inside
    step() after a few tokens; the engine drops it and reports the error on its StepOutput."""

    def step(self):
        outs = super().step()
        for i, out in enumerate(outs):
            if "poison" in self.prompts[out.request_id] and out.request_id in self.live:
                self.live.pop(out.request_id)
                outs[i] = PoisonOutput(out.request_id, [], [], True, None, "RuntimeError: NaN in row logits")
        return outs


@dataclass
class PoisonOutput(StepOutput):
    error: str | None = None


def serve(engine, sampling_params, **kw):
    kw = {"max_model_len": MAX_LEN, "vocab_size": TOK.get_vocab_size(), "eos_token_ids": [TOK.token_to_id("<|eos|>")],
          **kw}
    return LiveServer(create_app(engine, TOK, "tiny-test", sampling_params=sampling_params, **kw))


@pytest.fixture(scope="module")
def live():
    engine = PoisonEngine()
    server = serve(engine, FullParams, api_key=KEY, max_batch=4, max_queue=64, max_body_bytes=1 << 20,
                   max_prompt_tokens=1500)
    server.engine = engine
    yield server
    server.close()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0)


def post(url, path, body=None, raw=None, key=KEY):
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(url + path, content=content, headers=headers, timeout=30)


def chat_body(**kw):
    return {"model": "tiny-test", "messages": MSG, **kw}


def completion_body(**kw):
    return {"model": "tiny-test", "prompt": "Once upon", **kw}


NESTED = "[" * 5000 + "]" * 5000
HOSTILE = [  # (path, body or raw bytes, status, param)
    (CHAT, chat_body(top_k=18446744073709551616), 400, "top_k"),
    (CHAT, chat_body(top_k=-2), 400, "top_k"),
    (CHAT, chat_body(top_p=1e-320), 400, "top_p"),
    (CHAT, chat_body(top_p=0), 400, "top_p"),
    (CHAT, chat_body(top_p=1.5), 400, "top_p"),
    (CHAT, b'{"model": "tiny-test", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400,
     "temperature"),
    (CHAT, b'{"model": "tiny-test", "messages": [{"role": "user", "content": "x"}], "temperature": 1e400}', 400,
     "temperature"),
    (CHAT, chat_body(temperature=-0.5), 400, "temperature"),
    (CHAT, chat_body(temperature="0.5"), 400, "temperature"),
    (CHAT, chat_body(max_tokens="4"), 400, "max_tokens"),
    (CHAT, chat_body(max_tokens=True), 400, "max_tokens"),
    (CHAT, chat_body(max_tokens=4.0), 400, "max_tokens"),
    (CHAT, chat_body(max_tokens=2 ** 63), 400, "max_tokens"),
    (CHAT, chat_body(max_completion_tokens=-1), 400, "max_completion_tokens"),
    (CHAT, chat_body(stream="yes"), 400, "stream"),
    (CHAT, chat_body(stream=1), 400, "stream"),
    (CHAT, chat_body(n=True), 400, "n"),
    (CHAT, chat_body(n=17), 400, "n"),
    (CHAT, chat_body(seed=2 ** 63), 400, "seed"),
    (CHAT, chat_body(seed="1"), 400, "seed"),
    (CHAT, chat_body(presence_penalty=2.5), 400, "presence_penalty"),
    (CHAT, chat_body(frequency_penalty=-3), 400, "frequency_penalty"),
    (CHAT, chat_body(repetition_penalty=0), 400, "repetition_penalty"),
    (CHAT, chat_body(logit_bias={"abc": 1}), 400, "logit_bias"),
    (CHAT, chat_body(logit_bias={"5": 101}), 400, "logit_bias"),
    (CHAT, chat_body(logit_bias={"99999": 1}), 400, "logit_bias"),
    (CHAT, chat_body(min_tokens=10, max_tokens=5), 400, "min_tokens"),
    (CHAT, chat_body(logprobs="true"), 400, "logprobs"),
    (CHAT, chat_body(logprobs=True, top_logprobs=21), 400, "top_logprobs"),
    (CHAT, chat_body(top_logprobs=2), 400, "top_logprobs"),
    (CHAT, chat_body(stop=["a" * 2000]), 400, "stop"),
    (CHAT, chat_body(stop=[True]), 400, "stop"),
    (CHAT, chat_body(stop_token_ids=[-1]), 400, "stop_token_ids"),
    (CHAT, chat_body(stop_token_ids=[2 ** 64]), 400, "stop_token_ids"),
    (CHAT, chat_body(ignore_eos="yes"), 400, "ignore_eos"),
    (CHAT, b'{"model": "tiny-test", "messages": [{"role": "user", "content": "a\\udfffb"}]}', 400, None),
    (CHAT, b'{"model": "tiny-test", "messages": [{"role": "user", "content": "a\xff\xfeb"}]}', 400, None),
    (CHAT, chat_body(messages=[{"role": "user", "content": 5}]), 400, "messages"),
    (CHAT, chat_body(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), 400,
     "tool_choice"),
    (CHAT, chat_body(tool_choice="required"), 400, "tool_choice"),
    (CHAT, chat_body(tools=[WEATHER], tool_choice="sometimes"), 400, "tool_choice"),
    (CHAT, chat_body(tools=[WEATHER, WEATHER]), 400, "tools"),
    (CHAT, chat_body(response_format={"type": "json_schema"}), 400, "response_format"),
    (CHAT, chat_body(response_format={"type": "xml"}), 400, "response_format"),
    (CHAT, chat_body(response_format={"type": "json_object"}, tools=[WEATHER]), 400, "response_format"),
    (CHAT, chat_body(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "no-such-type"}}}}}), 400,
     "response_format"),
    (CHAT, (b'{"model": "tiny-test", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", '
            b'"function": {"name": "f", "parameters": {"a": ' + NESTED.encode() + b'}}}]}'), 400, None),
    (CHAT, b'[1, 2]', 400, None),
    (CHAT, chat_body(messages=[{"role": "user", "content": "x " * 1600}]), 400, "messages"),  # > max_prompt_tokens
    (CHAT, chat_body(messages=[{"role": "user", "content": "x" * (2 << 20)}]), 413, None),  # > max_body_bytes
    (COMPLETIONS, completion_body(prompt="a\udfffb"), 400, None),  # json.dumps writes the lone surrogate escaped
    (COMPLETIONS, completion_body(logprobs=21), 400, "logprobs"),
    (COMPLETIONS, completion_body(logprobs=True), 400, "logprobs"),
    (COMPLETIONS, completion_body(prompt=[1, 2 ** 64]), 400, "prompt"),
    (COMPLETIONS, completion_body(prompt=[[1] * 1600]), 400, "prompt"),  # token ids past max_prompt_tokens
    (COMPLETIONS, completion_body(echo="true"), 400, "echo"),
    (COMPLETIONS, completion_body(top_k=2 ** 63), 400, "top_k"),
]


@pytest.mark.parametrize("path, body, status, param", HOSTILE,
                         ids=[f"{i}-{'chat' if h[0] == CHAT else 'completions'}-{h[3]}" for i, h in enumerate(HOSTILE)])
def test_hostile_request_then_the_server_still_answers(live, client, path, body, status, param):
    r = post(live.url, path, raw=body if isinstance(body, bytes) else None, body=None if isinstance(body, bytes) else
             body)
    err = r.json()["error"]
    assert r.status_code == status, (r.status_code, err)
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param and err["message"].startswith(param), err
    assert chat(client, "say ok").choices[0].message.content == "Reply ok héllo 東京 ✓"


def test_valid_edge_values_are_accepted_and_reach_the_engine(live, client):
    r = chat(client, "say edge", temperature=0.001, top_p=1e-30, seed=-1, n=2, max_tokens=100, presence_penalty=-2,
             frequency_penalty=2, logit_bias={"5": -100}, extra_body={
                 "top_k": 2 ** 63 - 1, "repetition_penalty": 1.3, "min_tokens": 3, "ignore_eos": True,
                 "stop_token_ids": [TOK.token_to_id("<tool_response>")]})
    assert r.choices[0].message.content == "Reply edge héllo 東京 ✓"
    rows = [live.engine.params[rid] for rid, p in live.engine.prompts.items() if "say edge" in p]
    p = rows[0]
    assert (p.temperature, p.top_p, p.top_k) == (0.01, 1e-30, 0)  # vLLM's temperature floor; top_k >= vocab: off
    assert [r.seed for r in rows] == [2 ** 63 - 1, 0]  # seed + j wrapped into [0, 2**63)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.min_tokens) == (-2, 2, 1.3, 3)
    assert p.logit_bias == {5: -100} and p.ignore_eos  # ignore_eos: only the request's own stop ids
    assert p.stop_token_ids == (TOK.token_to_id("<tool_response>"),)


def test_tool_choice_none_bans_the_tool_call_token(live, client):
    client.chat.completions.create(model="tiny-test", messages=[{"role": "user", "content": "say none"}],
                                   tools=[WEATHER], tool_choice="none")
    p = [live.engine.params[rid] for rid, pr in live.engine.prompts.items() if "say none" in pr][0]
    assert p.banned_token_ids == (TOK.token_to_id("<tool_call>"),)


def test_structured_requests_get_a_grammar_matcher_per_row(live, client):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    chat(client, "say struct", n=2, response_format={"type": "json_schema", "json_schema": {"name": "s",
                                                                                            "schema": schema}})
    named = {"type": "function", "function": {"name": "get_weather"}}
    client.chat.completions.create(model="tiny-test", messages=[{"role": "user", "content": "say forced"}],
                                   tools=[WEATHER], tool_choice=named)
    rows = [live.engine.params[rid] for rid, p in live.engine.prompts.items() if "say struct" in p]
    assert len(rows) == 2 and rows[0].grammar is not rows[1].grammar  # one matcher state per row
    forced = [live.engine.params[rid] for rid, p in live.engine.prompts.items() if "say forced" in p][0]
    # The forced call's grammar accepts exactly the XML tool call the chat parser reads (after the reasoning).
    call = ("ok</think>\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
            "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>")
    ids = TOK.encode(call, add_special_tokens=False).ids
    assert forced.grammar.validate(ids) == len(ids)
    assert rows[0].grammar.validate(TOK.encode("ok</think>[1]", add_special_tokens=False).ids) < 4


def test_a_row_failing_in_the_engine_fails_alone(live, client):
    async def main():
        aclient = openai.AsyncOpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0)
        innocent = [aclient.chat.completions.create(model="tiny-test",
                                                    messages=[{"role": "user", "content": f"say i{k}"}])
                    for k in range(5)]
        poisoned = aclient.chat.completions.create(model="tiny-test", messages=[{"role": "user", "content": "poison"}])
        return await asyncio.gather(poisoned, *innocent, return_exceptions=True)

    poisoned, *innocent = asyncio.run(main())
    assert isinstance(poisoned, openai.InternalServerError)
    assert [r.choices[0].message.content for r in innocent] == [f"Reply i{k} héllo 東京 ✓" for k in range(5)]
    with httpx.stream("POST", live.url + CHAT, json=chat_body(messages=[{"role": "user", "content": "poison"}],
                                                              stream=True),
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert events[-1]["error"]["type"] == "server_error"
    metrics = httpx.get(live.url + "/metrics").text
    assert 'stepflash_requests_total{status="error"} 2.0' in metrics


def test_unsupported_features_are_refused_not_ignored():
    server = serve(ScriptedEngine(), Params)  # the engine's fields before issue #12's wiring
    try:
        for body, param in [(chat_body(presence_penalty=0.5), "presence_penalty"),
                            (chat_body(min_tokens=2), "min_tokens"),
                            (chat_body(logprobs=True), "logprobs"), (chat_body(ignore_eos=True), "ignore_eos"),
                            (chat_body(response_format={"type": "json_object"}), "response_format"),
                            (chat_body(tools=[WEATHER], tool_choice="required"), "tool_choice"),
                            (completion_body(logprobs=0), "logprobs")]:
            r = post(server.url, CHAT if "messages" in body else COMPLETIONS, body)
            assert (r.status_code, r.json()["error"]["param"], r.json()["error"]["code"]) == (
                400, param, "unsupported_parameter")
        # Defaults and "off" values need nothing from the engine.
        r = post(server.url, CHAT, chat_body(presence_penalty=0, logprobs=False, response_format={"type": "text"},
                                             tools=[WEATHER], tool_choice="none"))
        assert r.status_code == 200
    finally:
        server.close()


def test_requests_being_prepared_are_bounded():
    """max_batch + max_queue requests may be read and prepared at once; one more is a 429 at once."""
    server = serve(ScriptedEngine(), Params, max_batch=1, max_queue=0)
    service = server.server.config.app.state.service
    release, entered = threading.Event(), threading.Event()
    prepare = service.prepare_completion

    def slow_prepare(req):
        entered.set()
        release.wait(10)
        return prepare(req)

    service.prepare_completion = slow_prepare
    try:
        first = {}
        worker = threading.Thread(
            target=lambda: first.setdefault("r", post(server.url, COMPLETIONS, completion_body())))
        worker.start()
        assert entered.wait(10)
        r = post(server.url, COMPLETIONS, completion_body())
        assert (r.status_code, r.json()["error"]["code"]) == (429, "queue_full")
        assert httpx.get(server.url + "/health").status_code == 200
        release.set()
        worker.join(10)
        assert first["r"].status_code == 200 and first["r"].json()["choices"][0]["text"]
    finally:
        release.set()
        server.close()


def test_metrics_gauges_are_true_at_idle(live, client):
    chat(client, "say idle")
    time.sleep(0.05)
    text = httpx.get(live.url + "/metrics").text
    assert "stepflash_running_requests 0.0" in text and "stepflash_queue_depth 0.0" in text
    assert text.startswith("# HELP") and "# TYPE stepflash_requests_total counter" in text


def test_an_empty_api_key_is_refused(capsys, monkeypatch, tmp_path):
    with pytest.raises(UserError, match="empty"):
        create_app(ScriptedEngine(), TOK, "tiny-test", api_key="", sampling_params=Params, max_model_len=MAX_LEN,
                   vocab_size=TOK.get_vocab_size(), eos_token_ids=[1])
    from stepflash.cli import main

    for argv, env in ((["--api-key", ""], None), (["--api-key", "  "], None), ([], "")):
        if env is not None:
            monkeypatch.setenv("STEPFLASH_API_KEY", env)
        assert main(["serve", str(tmp_path), *argv]) == 2  # refused before anything is loaded
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "api-key" in err and "empty" in err, err


def test_prompt_encoder_refuses_early_and_counts_exactly():
    enc = PromptEncoder(TOK, 50)
    text = "The quick brown fox. " * 3
    assert enc(text, "prompt") == TOK.encode(text, add_special_tokens=False).ids
    with pytest.raises(Exception, match="at least"):  # the byte bound: no tokenization at all
        enc("x" * (50 * enc.longest_token_bytes + 1), "prompt")
    with pytest.raises(Exception, match="has 6[0-9] tokens"):  # exact count just over the limit
        enc("x " * 33, "prompt")

    class Recording:  # the tokenizer, recording the texts it is asked to encode
        def __init__(self):
            self.texts = []

        def __getattr__(self, name):
            return getattr(TOK, name)

        def encode_batch(self, texts, add_special_tokens):
            self.texts += texts
            return TOK.encode_batch(texts, add_special_tokens=add_special_tokens)

    tok = Recording()
    enc = PromptEncoder(tok, 200_000)
    text = "x " * 1_000_000  # passes the byte bound (125k tokens at least), has 1M
    with pytest.raises(Exception, match="at least"):
        enc(text, "prompt")
    assert max(len(t) for t in tok.texts) <= 1 << 16 and sum(map(len, tok.texts)) < len(text) / 2  # stopped early


@pytest.mark.slow
def test_health_answers_while_a_10mb_request_is_processed():
    engine = ScriptedEngine()
    server = serve(engine, Params, max_model_len=2_000_000, max_body_bytes=16 << 20, max_prompt_tokens=1_000_000)
    try:
        body = chat_body(messages=[{"role": "user", "content": "x " * 5_000_000}])  # 10 MB, ~5M tokens
        result = {}
        big = threading.Thread(target=lambda: result.setdefault("r", post(server.url, CHAT, body)))
        big.start()
        worst, polls = 0.0, 0
        while big.is_alive():
            t0 = time.perf_counter()
            assert httpx.get(server.url + "/health", timeout=5).status_code == 200
            worst, polls = max(worst, time.perf_counter() - t0), polls + 1
            time.sleep(0.02)
        big.join()
        assert result["r"].status_code == 400 and result["r"].json()["error"]["code"] == "context_length_exceeded"
        assert polls >= 5 and worst < 0.5, (polls, worst)
    finally:
        server.close()


# ---- the real engine -------------------------------------------------------------------------------

def test_hostile_rows_do_not_change_innocent_ones(checkpoint):  # noqa: F811
    from stepflash.inference.engine import SamplingParams

    server = LiveServer(create_app(_engine(checkpoint, max_batch_size=4), TOK, "tiny", sampling_params=SamplingParams))
    try:
        prompts = ["The quick brown", "Weather in Paris", "héllo"]
        want = [_offline(checkpoint, [TOK.encode(p, add_special_tokens=False).ids], 8)[0] for p in prompts]
        hostile = ['"top_k": 18446744073709551616', '"top_p": 1e-320', '"max_tokens": "4"', '"temperature": 1e400',
                   '"n": 2, "seed": 9223372036854775808', '"prompt": "a\\udfffb"']

        async def main():
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
                calls = []
                for i in range(max(len(prompts), len(hostile))):
                    if i < len(hostile):
                        raw = '{"model": "tiny", "prompt": "Weather", "max_tokens": 8, ' + hostile[i] + "}"
                        calls.append(http.post(COMPLETIONS, content=raw.encode(),
                                               headers={"Content-Type": "application/json"}))
                    if i < len(prompts):
                        calls.append(http.post(COMPLETIONS, json={"model": "tiny", "prompt": prompts[i],
                                                                  "max_tokens": 8, "temperature": 0}))
                return await asyncio.gather(*calls)

        replies = asyncio.run(main())
        statuses = [r.status_code for r in replies]
        got = [r.json()["choices"][0]["text"] for r in replies if r.status_code == 200]
        assert statuses.count(400) == len(hostile) and got == want
    finally:
        server.close()
