"""Tool items: multi-turn episodes of a policy against a simulated environment (tool_env.py), then the goal check.

An episode starts from the item's system + user turns. Each turn the policy writes one reply; its XML
tool calls are parsed with `stepflash.chat.parse_chat_output` (against the item's tool schemas), run
against the environment, and their results appended as `tool` messages for the next turn. A reply
without tool calls is the final answer and ends the episode; so do `max_turns` replies (default 8) and a
policy that gives no reply (a replayed prediction that ran out, a prompt that no longer fits the context). The item is solved when the
episode ended with a final answer and the goal holds (state subset and/or answer text).

The policy is any `respond(episodes) -> list[str | None]` (one reply per active episode, batched): the
harness passes one backed by the Engine, tests a scripted one, --predictions a replay of given replies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from stepflash.chat import THINK_END, parse_chat_output
from stepflash.evaluation.scoring import Verdict
from stepflash.tasks.tool_env import ToolEnv, answer_mentions, item_tools, make_env, state_mismatch

MAX_TURNS = 8
SYSTEM = ("You are an assistant that acts on a live system through the tools below. Carry out the user's request "
          "with as few tool calls as needed; check facts with the tools instead of guessing. When the request is "
          "done, or cannot be done, reply to the user without a tool call and say what happened.")


@dataclass
class Episode:
    item: dict
    env: ToolEnv
    tools: list[dict]
    messages: list[dict]  # OpenAI-style conversation so far (rendered with the chat template each turn)
    script: list[str] | None = None  # replies to replay (predictions) instead of asking a model
    replies: list[str] = field(default_factory=list)  # raw assistant replies, in order
    calls: list[dict] = field(default_factory=list)  # {"name", "arguments", "result"} of every tool call
    final_answer: str | None = None
    end: str | None = None  # "answered", "turn limit", "no reply"; None while running


def tool_messages(item: dict) -> list[dict]:
    return [{"role": "system", "content": item.get("system") or SYSTEM}, {"role": "user", "content": item["task"]}]


def start_episode(item: dict, script: list[str] | None = None) -> Episode:
    return Episode(item, make_env(item), item_tools(item), tool_messages(item), script)


def advance(ep: Episode, reply: str, max_turns: int) -> None:
    """Apply one assistant reply: run its tool calls, or take it as the final answer."""
    ep.replies.append(reply)
    # A reply that closes a think block starts inside it (the prompt opened it); others may open their own.
    parsed = parse_chat_output(reply, ep.tools, reasoning=THINK_END in reply)
    ep.messages.append({"role": "assistant", "content": parsed.content or "",
                        "reasoning_content": parsed.reasoning_content or "", "tool_calls": parsed.tool_calls})
    if not parsed.tool_calls:
        ep.final_answer, ep.end = (parsed.content or "").strip(), "answered"
        return
    for call in parsed.tool_calls:
        fn = call["function"]
        result = ep.env.call(fn["name"], fn["arguments"])
        ep.calls.append({"name": fn["name"], "arguments": fn["arguments"], "result": result})
        ep.messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})
    if len(ep.replies) >= max_turns:
        ep.end = "turn limit"


def run_episodes(episodes: list[Episode], respond: Callable[[list[Episode]], list[str | None]],
                 max_turns: int = MAX_TURNS) -> list[Episode]:
    """Step every unfinished episode with one batched `respond` call per turn until all have ended."""
    while active := [ep for ep in episodes if ep.end is None]:
        replies = respond(active)
        assert len(replies) == len(active), "respond must return one reply per active episode"
        for ep, reply in zip(active, replies):
            if reply is None:
                ep.end = "no reply"  # replayed predictions ran out, or the context is full
            else:
                advance(ep, reply, int(ep.item.get("max_turns", max_turns)))
    return episodes


def replay(episodes: list[Episode]) -> list[str | None]:
    """The policy of --predictions: each episode's next scripted reply (None when it has no more)."""
    return [ep.script[len(ep.replies)] if len(ep.replies) < len(ep.script) else None for ep in episodes]


def score_episode(ep: Episode) -> Verdict:
    goal = ep.item["goal"]
    details = {"turns": len(ep.replies), "end": ep.end, "calls": ep.calls, "final_state": ep.env.state}
    if ep.end != "answered":
        why = (f"turn limit of {len(ep.replies)} replies reached" if ep.end == "turn limit"
               else f"no reply for turn {len(ep.replies) + 1}")
        return Verdict(False, 0.0, None, f"no final answer: {why}", details)
    if "state" in goal and (diff := state_mismatch(goal["state"], ep.env.state)) is not None:
        return Verdict(False, 0.0, ep.final_answer, f"state differs: {diff}", details)
    if "answer" in goal and not answer_mentions(ep.final_answer, goal["answer"]):
        return Verdict(False, 0.0, ep.final_answer, f"wrong answer: the final reply does not mention "
                                                     f"{goal['answer']!r}", details)
    return Verdict(True, 1.0, ep.final_answer, f"correct: goal met in {len(ep.replies)} replies", details)
