"""Tool-call reward: does the reply make exactly the expected tool call?

The task carries the tool schemas it offered (`tools`) and the call it expects (`call`: {"name", "arguments"}).
The reply is parsed by the project's own parser, `stepflash.chat.parse_chat_output`, which the server and
the eval harness use too, so a call counts only as the Step 3.5 XML block
`<tool_call><function=NAME><parameter=ARG>VALUE</parameter></function></tool_call>` naming an offered
function; argument values are typed by that function's JSON schema before the comparison.

Score 1 when the reply holds exactly one call and it equals the expected one (same function, every argument
equal, none missing or extra); 0 otherwise: a wrong function, a wrong, missing or extra argument, a
block the parser cannot repair (it passes it through as plain text), no call, or more than one call.
A block the server would repair (a missing closing tag, say) counts as the call it is served as.
"""

from __future__ import annotations

import json

from stepflash.errors import UserError
from stepflash.tasks.rewards import task_field


def expected_call(prompt) -> tuple[list[dict], dict]:
    """(offered tool schemas, expected call) of a task; a task without them cannot be scored."""
    tools, call = task_field(prompt, "tools"), task_field(prompt, "call")
    if not tools or not isinstance(call, dict) or "name" not in call:
        raise UserError("a tool_call task needs 'tools' (the offered schemas) and 'call' ({\"name\", \"arguments\"})")
    return tools, call


def parsed_calls(completion: str, tools: list[dict]) -> list[dict]:
    """The well-formed calls of a reply as {"name", "arguments": dict}, in order."""
    from stepflash.chat import THINK_END, parse_chat_output

    # The generation prompt opens the think block, so a reply that closes it started inside it (as in tool_eval).
    parsed = parse_chat_output(completion, tools, reasoning=THINK_END in completion)
    calls = []
    for c in parsed.tool_calls:
        try:
            arguments = json.loads(c["function"]["arguments"])
        except (json.JSONDecodeError, TypeError):
            arguments = None
        calls.append({"name": c["function"]["name"], "arguments": arguments})
    return calls


def tool_call_reward(prompt, completion: str) -> float:
    tools, call = expected_call(prompt)
    calls = parsed_calls(completion, tools)
    if len(calls) != 1:
        return 0.0
    got = calls[0]
    return float(got["name"] == call["name"] and got["arguments"] == call.get("arguments", {}))
