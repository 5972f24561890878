"""Issue #12 phase 2 end to end: the real tiny checkpoint behind `create_app`, driven with the `openai`
client. logprobs (chat and completions, streamed and not, with MTP drafts) against a full forward;
structured output and forced tool calls with random weights (only the grammar makes them valid);
tool_choice "none"; penalties, min_tokens and ignore_eos reach the engine.
"""

import json

import openai
import pytest
import torch
from test_server import TOK, LiveServer, _engine

from stepflash.chat import render_chat
from stepflash.server import create_app
from stepflash.server.logprobs import TokenBytes

pytestmark = pytest.mark.usefixtures("one_thread")
EOS = TOK.token_to_id("<|eos|>")
THINK_END = TOK.token_to_id("</think>")
CALL_START = TOK.token_to_id("<tool_call>")
CITY = {"type": "function", "function": {"name": "get_city", "parameters": {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 6}, "days": {"type": "integer", "minimum": 1, "maximum": 9}},
    "required": ["city", "days"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {
    "zone": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["zone"]}}}
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "ok": {"type": "boolean"}}, "required": ["n", "ok"],
          "additionalProperties": False}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """test_server's tiny checkpoint with a context long enough for the tool prompt."""
    from stepflash import Step35ForCausalLM, save_model
    from stepflash.config import tiny

    torch.manual_seed(0)
    model = Step35ForCausalLM(tiny().replace(vocab_size=TOK.get_vocab_size(), max_position_embeddings=2048))
    path = tmp_path_factory.mktemp("tiny-ckpt-2k")
    save_model(model, str(path))
    TOK.save(str(path / "tokenizer.json"))
    return path


@pytest.fixture(scope="module", params=[0, 3], ids=["plain", "mtp3"])
def served(request, checkpoint):
    from stepflash.inference.engine import SamplingParams

    engine = _engine(checkpoint, max_batch_size=4)
    server = LiveServer(create_app(engine, TOK, "tiny", sampling_params=SamplingParams,
                                   speculative_tokens=request.param))
    server.model = engine.model
    yield server
    server.close()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0)


def full_logprobs(model, prompt: list[int], output: list[int]) -> torch.Tensor:
    """log-softmax of the model's logits at each output position, one forward without cache [n, V]."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + output]))[0, len(prompt) - 1: -1]
    return torch.log_softmax(logits.float(), -1)


def ids_of(tokens: list[str]) -> list[int]:
    return [TOK.token_to_id(t) if TOK.token_to_id(t) is not None else TOK.encode(t, add_special_tokens=False).ids[0]
            for t in tokens]


def test_completion_logprobs_equal_a_full_forward(served, client):
    prompt = TOK.encode("The quick brown", add_special_tokens=False).ids
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0, logprobs=3,
                                  stop=None, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    out = ref_greedy(served.model, prompt, 8)
    ref = full_logprobs(served.model, prompt, out)
    assert lp.tokens == [TokenBytes(TOK).text(t) for t in out]
    # The reply's own tokens: their logprobs (raw, vLLM's default) and the top 3 of each position.
    torch.testing.assert_close(torch.tensor(lp.token_logprobs), ref.max(-1).values, atol=1e-4, rtol=1e-4)
    for row, top in zip(ref, lp.top_logprobs):  # keys are token texts: two may coincide (U+FFFD)
        want = row.topk(3).values.tolist()
        assert top and all(min(abs(v - w) for w in want) < 1e-4 for v in top.values())
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    # Streamed: the same logprobs, chunk by chunk.
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0, logprobs=3,
                                            stream=True, extra_body={"ignore_eos": True}))
    streamed = [v for c in chunks if c.choices and c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    assert streamed == lp.token_logprobs


def test_chat_logprobs_streamed_and_not(served, client):
    messages = [{"role": "user", "content": "hi"}]
    prompt = TOK.encode(render_chat(messages), add_special_tokens=False).ids
    kw = dict(model="tiny", messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2,
              extra_body={"ignore_eos": True})
    r = client.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    out = ref_greedy(served.model, prompt, 6)
    assert [c.bytes for c in content] == [list(TokenBytes(TOK)(t)) for t in out]
    assert all(len(c.top_logprobs) == 2 for c in content)
    ref = full_logprobs(served.model, prompt, out)
    torch.testing.assert_close(torch.tensor([c.logprob for c in content]), ref.max(-1).values, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.tensor([[t.logprob for t in c.top_logprobs] for c in content]),
                               ref.topk(2, -1).values, atol=1e-4, rtol=1e-4)
    chunks = list(client.chat.completions.create(**kw, stream=True))
    streamed = [item.logprob for c in chunks if c.choices and c.choices[0].logprobs
                for item in c.choices[0].logprobs.content]
    assert streamed == [c.logprob for c in content]


def ref_greedy(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_is_valid_with_random_weights(client, temperature):
    fmt = {"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA}}
    r = client.completions.create(model="tiny", prompt="Weather in", max_tokens=60, temperature=temperature, seed=1,
                                  n=2, extra_body={"response_format": fmt})
    for c in r.choices:
        value = json.loads(c.text)
        assert c.finish_reason == "stop" and set(value) == {"n", "ok"} and 0 <= value["n"] <= 99
    plain = client.completions.create(model="tiny", prompt="Weather in", max_tokens=20, temperature=temperature,
                                      seed=1)
    with pytest.raises(ValueError):  # negative control: the same request without the constraint
        json.loads(plain.choices[0].text)
    obj = client.completions.create(model="tiny", prompt="Weather in", max_tokens=60, temperature=0,
                                    extra_body={"response_format": {"type": "json_object"}})
    assert obj.choices[0].finish_reason == "length" or isinstance(json.loads(obj.choices[0].text), dict)


def chat_tools(client, tool_choice, tools=(CITY,), bias=None, **kw):
    # Random weights never end the reasoning by themselves: a bias on `</think>` does; the grammar does the rest.
    return client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "weather?"}], tools=list(tools), tool_choice=tool_choice,
        max_tokens=kw.pop("max_tokens", 250), temperature=0, logit_bias=bias or {str(THINK_END): 100}, **kw)


def test_forced_tool_calls_are_well_formed_calls(client):
    r = chat_tools(client, {"type": "function", "function": {"name": "get_city"}})
    calls = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and len(calls) == 1, r.choices[0].message
    args = json.loads(calls[0].function.arguments)
    assert calls[0].function.name == "get_city" and len(args["city"]) <= 6 and 1 <= args["days"] <= 9
    r = chat_tools(client, "required", tools=(CITY, CLOCK), parallel_tool_calls=False)
    calls = r.choices[0].message.tool_calls
    assert calls and calls[0].function.name in ("get_city", "get_time"), r.choices[0].message
    # Negative control: without a forcing tool_choice the model does not call.
    assert not chat_tools(client, "auto").choices[0].message.tool_calls


def test_tool_choice_none_suppresses_calls(client):
    bias = {str(THINK_END): 100, str(CALL_START): 100}
    def text(r):
        m = r.choices[0].message
        return (m.content or "") + (getattr(m, "reasoning_content", None) or "")

    assert "<tool_call>" in text(chat_tools(client, "auto", bias=bias, max_tokens=4))  # negative control
    none = chat_tools(client, "none", bias=bias, max_tokens=4)
    assert "<tool_call>" not in text(none) and not none.choices[0].message.tool_calls


def test_penalties_min_tokens_and_ignore_eos_reach_the_engine(served, client):
    prompt = TOK.encode("The quick", add_special_tokens=False).ids
    kw = dict(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    plain = client.completions.create(**kw, extra_body={"ignore_eos": True})
    penal = client.completions.create(**kw, presence_penalty=1.5, frequency_penalty=1.0,
                                      extra_body={"repetition_penalty": 2.0, "ignore_eos": True})
    assert penal.usage.completion_tokens == 12 == plain.usage.completion_tokens
    from stepflash.inference.engine import Engine, SamplingParams  # the engine called directly, same settings

    direct = Engine(served.model, max_batch_size=1)
    direct.add_request(prompt, SamplingParams(max_new_tokens=12, presence_penalty=1.5, frequency_penalty=1.0,
                                              repetition_penalty=2.0, ignore_eos=True, logit_bias={40: 5.0}))
    ids = [t for _ in range(12) if direct.has_unfinished() for out in direct.step() for t in out.new_token_ids]
    biased = client.completions.create(**kw, presence_penalty=1.5, frequency_penalty=1.0, logit_bias={"40": 5.0},
                                       extra_body={"repetition_penalty": 2.0, "ignore_eos": True})
    assert biased.choices[0].text == TOK.decode(ids, skip_special_tokens=False) != plain.choices[0].text
    # The first greedy token as a stop token ends the reply at once; min_tokens holds it off.
    first = TOK.encode(plain.choices[0].text, add_special_tokens=False).ids[0]
    stopped = client.completions.create(**kw, extra_body={"stop_token_ids": [first]})
    assert stopped.usage.completion_tokens == 1
    held = client.completions.create(**kw, extra_body={"stop_token_ids": [first], "min_tokens": 5})
    assert held.usage.completion_tokens >= 5


# ---- hostile but valid requests reach the real engine: each gets its status, the next innocent one is unchanged

COMPLETE = "/v1/completions"
ENGINE_HOSTILE = [  # (request body, expected status, a check on the reply)
    (dict(presence_penalty=-2, frequency_penalty=-2, repetition_penalty=9e18, temperature=2, top_k=1), 200, None),
    (dict(logit_bias={str(i): -100 for i in range(300)}, temperature=1.0, seed=3), 200, None),
    (dict(logit_bias={str(EOS): 100}, min_tokens=8, max_tokens=8), 200,
     lambda r: r["usage"]["completion_tokens"] == 8),
    (dict(n=16, logprobs=20, top_k=1, temperature=2.0, seed=2 ** 63 - 1), 200,
     lambda r: len(r["choices"]) == 16 and all(t for c in r["choices"] for t in c["logprobs"]["top_logprobs"])),
    (dict(response_format={"type": "json_object"}, ignore_eos=True), 400, None),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": []}}}), 400, None),
    (dict(response_format={"type": "json_object"}, logit_bias={str(i): 100 for i in range(300)}, max_tokens=30,
          logprobs=5, temperature=1.0, seed=0), 200, lambda r: "\ufffd" not in r["choices"][0]["text"][:1]),
    (dict(stop=["e", "a", "o", " "], max_tokens=16, temperature=1.5, seed=7), 200, None),
]


@pytest.mark.parametrize("body, status, check", ENGINE_HOSTILE, ids=[str(i) for i in range(len(ENGINE_HOSTILE))])
def test_hostile_valid_requests_through_the_real_engine(served, client, body, status, check):
    import httpx

    innocent = dict(model="tiny", prompt="The quick", max_tokens=8, temperature=0)
    want = httpx.post(served.url + COMPLETE, json=innocent, timeout=60).json()["choices"][0]["text"]
    r = httpx.post(served.url + COMPLETE, json={"model": "tiny", "prompt": "Weather in", "max_tokens": 8, **body},
                   timeout=60)
    assert r.status_code == status, r.text
    if check is not None:
        assert check(r.json()), r.json()
    assert httpx.post(served.url + COMPLETE, json=innocent, timeout=60).json()["choices"][0]["text"] == want
