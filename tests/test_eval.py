"""`stepflash eval`: verdicts, pass@k, tool episodes, --predictions through the CLI, and a tiny checkpoint end to end."""

import json
import math

import pytest
import torch

from stepflash import cli
from stepflash.config import make_config
from stepflash.evaluation import (ENVS, Verdict, load_items, pass_at_k, run_episodes, score_code, score_episode,
                                  score_math, start_episode, summarize)
from stepflash.evaluation.harness import EvalArgs, evaluate
from stepflash.evaluation.scoring import k_values
from stepflash.tasks.tool_env import answer_mentions, state_mismatch
from stepflash.evaluation.tool_eval import replay


def xml_call(name, **arguments):
    params = "".join(f"<parameter={k}>\n{v if isinstance(v, str) else json.dumps(v)}\n</parameter>\n"
                     for k, v in arguments.items())
    return f"<tool_call>\n<function={name}>\n{params}</function>\n</tool_call>"


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


# ---- math ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("reference,completion", [
    ("\\frac{1}{2}", "\\boxed{0.5}"),
    ("1/2", "so \\boxed{\\frac{1}{2}}"),
    ("0.5", "Answer: 1/2"),
    ("\\{2, 3\\}", "\\boxed{\\{3, 2\\}}"),
    ("[-1, 3]", "\\boxed{[-1,3]}"),
    ("(4, \\infty)", "\\boxed{(4,\\infty)}"),
    ("5\\sqrt{2}", "\\boxed{\\sqrt{50}}"),
    ("12", "<think>maybe 11</think>The answer is 12."),
])
def test_math_equivalent(reference, completion):
    v = score_math({"problem": "?", "answer": reference}, completion)
    assert v.correct and v.score == 1.0 and v.reason == "correct"


@pytest.mark.parametrize("reference,completion", [
    ("\\frac{1}{2}", "\\boxed{0.51}"),
    ("\\{2, 3\\}", "\\boxed{\\{2\\}}"),
    ("[-1, 3]", "\\boxed{(-1,3]}"),
    ("(4, \\infty)", "\\boxed{[4,\\infty)}"),
    ("12", "<think>the answer is 12</think>The answer is 13."),
])
def test_math_not_equivalent(reference, completion):
    v = score_math({"problem": "?", "answer": reference}, completion)
    assert not v.correct and v.reason.startswith("wrong answer")


def test_math_no_answer():
    v = score_math({"problem": "?", "answer": "3"}, "I do not know")
    assert not v.correct and v.answer is None and v.reason.startswith("no answer")


# ---- code ---------------------------------------------------------------------------------------

SQUARE_IO = {"prompt": "square", "tests": [{"input": "3\n", "output": "9\n"}, {"input": "-4\n", "output": "16\n"}]}


def test_code_verdicts_io_and_asserts():
    right = score_code(SQUARE_IO, "```python\nprint(int(input()) ** 2)\n```")
    assert right.correct and right.details["tests_passed"] == [True, True]
    half = score_code(SQUARE_IO, "```python\nn = int(input())\nprint(9 if n == 3 else 0)\n```")
    assert not half.correct and half.score == 0.5
    assert half.reason == "wrong answer: 1/2 tests passed; test 1: expected '16', got '0'"
    assert half.details["test_verdicts"] == ["passed", "wrong answer: expected '16', got '0'"]
    item = {"prompt": "add", "tests": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 5"]}
    v = score_code(item, "```python\ndef add(a, b):\n    return a + b\n```")
    assert v.details["tests_passed"] == [True, True, False] and v.score == pytest.approx(2 / 3)
    assert v.details["test_verdicts"][2] == "wrong answer: assert add(2, 2) == 5: got 4"


def test_code_timeout_and_crash_say_why():
    item = dict(SQUARE_IO, timeout_s=0.5)
    hang = score_code(item, "```python\nwhile True:\n    pass\n```")
    crash = score_code(item, "```python\nraise SystemExit(1 / 0)\n```")
    for v in (hang, crash):
        assert not v.correct and v.score == 0.0 and v.details["tests_passed"] == [False, False]
    assert hang.reason.startswith("timeout: 0/2 tests passed") and hang.details["test_verdicts"] == ["timeout"] * 2
    assert crash.reason == "runtime error: 0/2 tests passed; test 0: ZeroDivisionError: division by zero"


def test_code_verdicts_reach_the_records_and_the_failure_histogram(tmp_path):
    data, preds, out = tmp_path / "d.jsonl", tmp_path / "p.jsonl", tmp_path / "out"
    data.write_text(json.dumps(SQUARE_IO) + "\n" + json.dumps(dict(SQUARE_IO, timeout_s=0.5)) + "\n")
    preds.write_text(json.dumps({"completion": "```python\nprint(0)\n```"}) + "\n"
                     + json.dumps({"completion": "```python\nwhile True:\n    pass\n```"}) + "\n")
    assert cli.main(["eval", "--task", "code", "--data", str(data), "--predictions", str(preds), "--out", str(out)]) == 0
    recs = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert recs[0]["test_verdicts"] == ["wrong answer: expected '9', got '0'", "wrong answer: expected '16', got '0'"]
    assert recs[1]["test_verdicts"] == ["timeout", "timeout"]
    assert json.loads((out / "results.json").read_text())["failures"] == {"wrong answer": 1, "timeout": 1}


# ---- pass@k -------------------------------------------------------------------------------------

def brute_pass_at_k(n, c, k):
    return 1 - math.comb(n - c, k) / math.comb(n, k)


@pytest.mark.parametrize("n,c,k,expected", [(1, 1, 1, 1.0), (1, 0, 1, 0.0), (4, 1, 1, 0.25), (4, 1, 2, 0.5),
                                            (5, 2, 2, 0.7), (10, 3, 5, 1 - 21 / 252), (3, 1, 3, 1.0)])
def test_pass_at_k_hand_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)
    assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k))


def test_summarize_pass_at_k():
    v = lambda ok: Verdict(ok, float(ok), None, "correct" if ok else "wrong answer: x")
    verdicts = [[v(True), v(False), v(False), v(False)], [v(False)] * 4, [v(True), v(True), v(False), v(True)]]
    s = summarize(verdicts)
    assert k_values(4) == [1, 2, 4] and k_values(6) == [1, 2, 4, 6]
    assert s["accuracy"] == pytest.approx(4 / 12) and s["pass@1"] == pytest.approx((0.25 + 0 + 0.75) / 3)
    assert s["pass@2"] == pytest.approx((0.5 + 0 + 1.0) / 3) and s["pass@4"] == pytest.approx(2 / 3)
    assert s["failures"] == {"wrong answer": 8} and s["items_solved"] == 2


# ---- tool episodes ------------------------------------------------------------------------------

TRANSFER = {"task": "Send 50 from alice to bob.", "env": "bank", "_line": 1,
            "goal": {"state": {"accounts": {"alice": {"balance": 70}, "bob": {"balance": 95}}}, "answer": "70"}}


def scripted(policy):
    """A batched responder from a per-episode function (episode -> reply)."""
    return lambda episodes: [policy(ep) for ep in episodes]


def test_tool_episode_passes():
    def policy(ep):
        if not ep.calls:
            return "<think>\ncheck first\n</think>\n" + xml_call("get_balance", account="alice")
        if len(ep.calls) == 1:
            assert json.loads(ep.messages[-1]["content"]) == {"account": "alice", "balance": 120}
            return xml_call("transfer", source="alice", target="bob", amount=50)
        return "</think>Done, alice now has 70."

    (ep,) = run_episodes([start_episode(TRANSFER)], scripted(policy))
    v = score_episode(ep)
    assert v.correct, v.reason
    assert ep.env.state["accounts"]["alice"]["balance"] == 70 and len(ep.replies) == 3
    assert [c["name"] for c in ep.calls] == ["get_balance", "transfer"]


@pytest.mark.parametrize("replies,reason", [
    ([xml_call("transfer", source="alice", target="bob", amount=5), "Done, alice now has 70."],
     "state differs: accounts.alice.balance: expected 70, got 115"),
    ([xml_call("transfer", source="alice", target="bob", amount=50), "All done."],
     "wrong answer: the final reply does not mention '70'"),
    ([xml_call("transfer", source="alice", target="bob", amount=500), "Done, alice now has 70."],
     "state differs: accounts.alice.balance: expected 70, got 120"),
    ([xml_call("get_balance", account="alice")] * 3, "no final answer: turn limit of 3 replies reached"),
    ([xml_call("get_balance", account="alice")], "no final answer: no reply for turn 2"),
])
def test_tool_episode_fails(replies, reason):
    (ep,) = run_episodes([start_episode(dict(TRANSFER, max_turns=3), replies)], replay)
    v = score_episode(ep)
    assert not v.correct and v.reason == reason


def test_tool_env_errors_are_results():
    env = ENVS["bank"]()
    assert "insufficient funds" in env.call("transfer", {"source": "bob", "target": "alice", "amount": 46})
    assert "frozen" in env.call("transfer", '{"source": "alice", "target": "carol", "amount": 1}')
    assert "missing" in env.call("transfer", {"source": "alice"})
    assert "unknown tool" in env.call("rm_rf", {})
    assert env.state == ENVS["bank"].DEFAULT_STATE  # nothing changed
    assert state_mismatch({"a": {"b": None}}, {"a": {"c": 1}}) is None
    assert state_mismatch({"a": {"b": None}}, {"a": {"b": 1}}) == "a.b: expected absent, got 1"
    assert answer_mentions("It costs 150.", "150") and not answer_mentions("It costs 1500.", "150")


def test_builtin_tool_items_pass_with_reference_calls():
    items = load_items("tool")
    assert len(items) >= 10 and {i["env"] for i in items} == set(ENVS)
    episodes = [start_episode(it, [xml_call(c["name"], **c["arguments"]) for c in it["reference_calls"]]
                              + [it["reference_answer"]]) for it in items]
    run_episodes(episodes, replay)
    assert [score_episode(ep).reason.split(":")[0] for ep in episodes] == ["correct"] * len(items)
    # and doing nothing fails every item
    idle = run_episodes([start_episode(it, ["I am done."]) for it in items], replay)
    assert not any(score_episode(ep).correct for ep in idle)


def test_builtin_math_and_code_items_load():
    math_items, code_items = load_items("math"), load_items("code")
    assert len(math_items) >= 10 and len(code_items) >= 10
    assert all(score_math(it, f"\\boxed{{{it['answer']}}}").correct for it in math_items)
    it = code_items[5]  # assert-style tests
    assert score_code(it, f"```python\n{it['solution']}```").correct


@pytest.mark.slow
def test_builtin_code_items_pass_with_reference_solutions():
    for it in load_items("code"):
        assert score_code(it, f"```python\n{it['solution']}```").correct, it["prompt"]


# ---- the CLI with --predictions -----------------------------------------------------------------

def test_predictions_through_cli(tmp_path, capsys):
    data = write_jsonl(tmp_path / "m.jsonl", [{"problem": "1/2?", "answer": "\\frac{1}{2}"},
                                              {"problem": "2+2?", "answer": "4"}])
    preds = write_jsonl(tmp_path / "p.jsonl", [{"completions": ["\\boxed{0.5}", "\\boxed{1/3}", "1/2"]},
                                               {"completions": ["5", "five", "\\boxed{5}"]}])
    out = tmp_path / "out"
    assert cli.main(["eval", "--task", "math", "--data", data, "--predictions", preds, "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["items"] == 2 and results["samples"] == 6 and results["correct"] == 2
    assert results["pass@1"] == pytest.approx((2 / 3 + 0) / 2)
    assert results["pass@2"] == pytest.approx((brute_pass_at_k(3, 2, 2) + 0) / 2)
    assert results["pass@3"] == pytest.approx(0.5)
    recs = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert [r["num_correct"] for r in recs] == [2, 0]
    assert recs[0]["answer"] == "0.5" and recs[0]["correct"] and recs[1]["reason"].startswith("wrong answer")
    assert "pass@2" in capsys.readouterr().out


def test_tool_predictions_through_cli(tmp_path):
    preds = write_jsonl(tmp_path / "p.jsonl", [
        {"completion": [xml_call("kv_get", key="color"), "It is blue."]},
        {"completion": "I set it."}])
    out = tmp_path / "out"
    assert cli.main(["eval", "--task", "tool", "--limit", "2", "--predictions", preds, "--out", str(out)]) == 0
    recs = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in recs] == [True, False]
    assert recs[0]["calls"][0]["result"] == '{"key": "color", "value": "blue"}'
    assert recs[1]["reason"].startswith("state differs: store.size")


@pytest.mark.parametrize("make_args,message", [
    (lambda p: ["--task", "poetry", "--predictions", p("p")], "unknown task 'poetry'"),
    (lambda p: ["--task", "math", "--data", p("missing.jsonl"), "--predictions", p("p")], "does not exist"),
    (lambda p: ["--task", "math", "--data", p("bad"), "--predictions", p("p")], "bad.jsonl:2: not valid JSON"),
    (lambda p: ["--task", "math", "--data", p("d"), "--predictions", p("short")], "1 predictions for 2 items"),
    (lambda p: ["--task", "code", "--data", p("d"), "--predictions", p("p")], "needs prompt, tests"),
    (lambda p: ["--task", "math"], "give a CHECKPOINT"),
])
def test_bad_input_is_one_line(tmp_path, capsys, make_args, message):
    write_jsonl(tmp_path / "d.jsonl", [{"problem": "a", "answer": "1"}, {"problem": "b", "answer": "2"}])
    write_jsonl(tmp_path / "bad.jsonl", [{"problem": "a", "answer": "1"}, "{not json"])
    write_jsonl(tmp_path / "p.jsonl", [{"completion": "1"}, {"completion": "2"}])
    write_jsonl(tmp_path / "short.jsonl", [{"completion": "1"}])
    path = lambda name: str(tmp_path / (name if "." in name else name + ".jsonl"))
    assert cli.main(["eval", *make_args(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


# ---- a tiny checkpoint end to end ---------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from stepflash.checkpoint import save_model
    from stepflash.model import Step35ForCausalLM
    from stepflash.tokenizer import train_tokenizer

    path = str(tmp_path_factory.mktemp("ckpt"))
    corpus = ["What is 2 + 2? The answer is \\boxed{4}.", "def add(a, b):\n    return a + b\n"] * 20
    tok = train_tokenizer(corpus, vocab_size=300, out_path=path)
    cfg = make_config(4, 64, full_heads=4, sliding_heads=8, kv_heads=2, head_dim=16, window=8, vocab=320,
                      inter=96, experts=8, top_k=2, moe_inter=32, max_pos=2048, rope_original=32)
    torch.manual_seed(0)
    save_model(Step35ForCausalLM(cfg), path)
    return path, tok


def test_tiny_checkpoint_math_end_to_end(tiny_checkpoint, tmp_path):
    from stepflash.chat import ChatTemplate
    from stepflash.checkpoint import load_model
    from stepflash.evaluation.math_eval import math_messages
    from stepflash.inference.engine import Engine

    path, tok = tiny_checkpoint
    out = tmp_path / "out"
    assert cli.main(["eval", path, "--task", "math", "--limit", "2", "--samples", "2", "--max-new-tokens", "6",
                     "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    recs = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert results["items"] == 2 and results["samples"] == 4 and len(recs) == 2 and "pass@2" in results
    assert results["correct"] == sum(r["num_correct"] for r in recs)
    assert results["timing"]["generated_tokens"] > 0
    # greedy: every sample equals the engine's output on the independently rendered prompt of its item
    items = load_items("math")[:2]
    template = ChatTemplate.from_checkpoint(path)
    prompts = [tok.encode(template.render(math_messages(it)), add_special_tokens=False).ids for it in items]
    stop = [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|eos|>"), 1]
    for rec, res in zip(recs, Engine(load_model(path)).generate(prompts, 6, stop_token_ids=stop)):
        ids = res.token_ids[:-1] if res.finish_reason == "stop" else res.token_ids
        expected = tok.decode(ids, skip_special_tokens=False)
        assert [s["completion"] for s in rec["samples"]] == [expected, expected]
        assert rec["prompt"] in template.render(math_messages(items[rec["index"]]))


def test_tiny_checkpoint_tool_with_mtp(tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint
    args = EvalArgs(checkpoint=path, task="tool", limit=2, max_new_tokens=4, max_turns=2, mtp=2,
                    out=str(tmp_path / "o"))
    items, verdicts, timing = evaluate(args)
    assert len(items) == 2 and all(len(v) == 1 for v in verdicts)
    for (v,) in verdicts:  # a random model answers (one reply) or keeps calling tools until the limit
        assert 1 <= v.details["turns"] <= 2 and isinstance(v.details["completion"], list)
