"""Every Step 3.5 parser case of vLLM, SGLang and llama.cpp (ported as data in chat_peer_cases.py, source
cited per case), each run on the whole reply, one character at a time, at every two-way split, and in the
peer's own chunks. Streamed runs must also follow OpenAI's incremental form: a call's id and name first
with empty arguments, then argument pieces that join into the final arguments."""

import json
from collections import Counter

import pytest
from chat_peer_cases import CASES, TOOLS

from stepflash.chat import ChatStreamParser, collect, openai_deltas, opens_reasoning

RUN = [c for c in CASES if "na" not in c]


def feed(case, pieces) -> list[list]:
    """Events per piece (the last entry: finish())."""
    parser = ChatStreamParser(TOOLS[case["tools"]], case.get("think", True))
    return [parser.feed(p) for p in pieces] + [parser.finish()]


def feedings(case):
    text = case["text"]
    yield "whole", [text]
    yield "one char at a time", list(text)
    for i in range(len(text) + 1):
        yield f"split at {i}", [text[:i], text[i:]]
    if "chunks" in case:
        yield "the peer's chunks", case["chunks"]


def check_reply(case, reply, how):
    calls = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in reply.tool_calls]
    if "reasoning" in case:
        assert reply.reasoning_content == case["reasoning"], how
    if "content" in case:
        assert reply.content == case["content"], how
    if "calls" in case:
        assert calls == [tuple(c) for c in case["calls"]], how
    if "call_names" in case:
        assert [name for name, _ in calls] == case["call_names"], how
    at = 0
    for part in case.get("content_contains", []):
        at = (reply.content or "").find(part, at)
        assert at >= 0, f"{how}: {part!r} missing or out of order in {reply.content!r}"


def check_deltas(deltas, reply, how):
    """OpenAI's incremental tool_calls: header (id, type, name, arguments "") once, then argument pieces."""
    seen: dict[int, str] = {}
    for d in deltas:
        for tc in d.get("tool_calls", []):
            i, fn = tc["index"], tc["function"]
            if "id" in tc:
                assert i not in seen and i == len(seen), how
                assert tc["type"] == "function" and fn["name"] and fn["arguments"] == "", how
                seen[i] = ""
            else:
                assert i in seen and "name" not in fn, how
                seen[i] += fn["arguments"]
    assert [seen[i] for i in sorted(seen)] == [c["function"]["arguments"] for c in reply.tool_calls], how


@pytest.mark.parametrize("case", RUN, ids=[f"{c['suite']}:{c['id']}" for c in RUN])
def test_peer_case(case):
    if "prompt_opens_reasoning" in case:  # vLLM's is_reasoning_end on a prompt: does it leave reasoning open?
        assert opens_reasoning(case["text"]) is case["prompt_opens_reasoning"]
        return
    for how, pieces in feedings(case):
        per_piece = feed(case, pieces)
        reply = collect([e for events in per_piece for e in events])
        check_reply(case, reply, how)
        check_deltas([d for events in per_piece for d in openai_deltas(events)], reply, how)


def test_vllm_incremental_streaming_sends_header_then_argument_pieces():
    """vLLM's test_extract_tool_calls_streaming_incremental, with its per-chunk assertions, fed per character."""
    (case,) = [c for c in CASES if c.get("incremental")]
    chunks = [openai_deltas(events) for events in feed(case, list(case["text"]))]
    deltas = [d for chunk in chunks for d in chunk]
    assert len(deltas) > 3 and "content" in deltas[0]
    header = next(d["tool_calls"][0] for d in deltas if "tool_calls" in d)
    assert header["id"] and header["type"] == "function"
    assert header["function"] == {"name": "get_current_weather", "arguments": ""}
    pieces = [d["tool_calls"][0]["function"]["arguments"] for d in deltas if "tool_calls" in d][1:]
    assert len(pieces) > 1 and json.loads("".join(pieces)) == {"city": "Dallas", "state": "TX"}


def peer_table() -> dict[str, Counter]:
    table = {}
    for c in CASES:
        kind = "not applicable" if "na" in c else "documented deviation" if "deviation" in c else "passed"
        table.setdefault(c["suite"], Counter())[kind] += 1
    return table


def test_docs_table_matches_the_cases():
    """docs/chat_format.md states the per-suite counts; they must match the cases run here."""
    import os

    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "chat_format.md"), encoding="utf-8").read()
    for suite, counts in peer_table().items():
        row = f"| {suite} | {sum(counts.values())} | {counts['passed']} | {counts['documented deviation']} | " \
              f"{counts['not applicable']} |"
        assert row in doc, f"docs/chat_format.md lacks the row {row!r}"
