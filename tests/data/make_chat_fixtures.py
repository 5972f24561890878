"""Render tests/data/chat_template_fixtures.json with the OFFICIAL Step 3.5 Flash chat template.

Run once, by hand, with the official template file (it is not part of this repository):

    python tests/data/make_chat_fixtures.py /path/to/stepfun-ai-Step-3.5-Flash.jinja

The file used: llama.cpp `models/templates/stepfun-ai-Step-3.5-Flash.jinja`, added by llama.cpp PR #19635
(commit 3dadc88b589ca43b8fca0e1beb22d4b78a09b4dd), sha256 b18b99dff7261214c43e0402cba9f573e3240be6f9bb7ccaa54bb8df97e49dca,
a copy of the chat template in the release's tokenizer_config.json. It is rendered with transformers'
own renderer (`render_jinja_template`, the code behind `apply_chat_template`), after the two steps an
OpenAI server takes before templating: tool-call arguments sent as JSON strings are parsed to objects
(vLLM does this), and `developer` messages become `system` (llama.cpp does this; the official template
itself would drop them). Nothing from stepflash is imported, so the fixtures are independent of it.
"""

import hashlib
import json
import sys

OFFICIAL_SHA256 = "b18b99dff7261214c43e0402cba9f573e3240be6f9bb7ccaa54bb8df97e49dca"
BOS = "<|bos|>"

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city — 天気 <b>&</b>.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "City name"},
        "days": {"type": "integer"}, "metric": {"type": "boolean"},
        "units": {"type": "string", "enum": ["C", "F"]}}, "required": ["city"]}}}
WRITE = {"type": "function", "function": {
    "name": "write_file", "description": "Write a file.",
    "parameters": {"type": "object", "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
                   "required": ["path", "content"]}}}
RUN = {"type": "function", "function": {
    "name": "run", "parameters": {"type": "object", "properties": {
        "argv": {"type": "array", "items": {"type": "string"}}, "env": {"type": "object"},
        "timeout": {"type": "number"}, "retry": {"type": ["integer", "null"]}}}}}
TOOLS = [WEATHER, WRITE, RUN]


def call(name, args, id_="call_0"):
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": args}}


def conversations():
    """(name, messages, tools, add_generation_prompt) for every shape the format has."""
    U = {"role": "user", "content": "What's the weather in Paris?"}
    yield "user_only", [U], None, True
    yield "user_only_no_generation_prompt", [U], None, False
    yield "system_user", [{"role": "system", "content": "You are terse."}, U], None, True
    yield "several_systems_and_observation", [
        {"role": "system", "content": "First system."}, U, {"role": "assistant", "content": "Sunny."},
        {"role": "system", "content": "Second system."},
        {"role": "system", "name": "observation", "content": "An observation."},
        {"role": "user", "content": "Thanks"}], None, True
    yield "multi_turn_reasoning_content", [
        {"role": "system", "content": "Think first."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "reasoning_content": "Add them.", "content": "4"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "reasoning_content": "Again add.\n", "content": "\n6 "}], None, False
    yield "multi_turn_generation_prompt_drops_old_reasoning", [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "reasoning_content": "Add them.", "content": "4"},
        {"role": "user", "content": "3+3?"}], None, True
    yield "reasoning_inside_content", [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "<think>\nplan\n\n</think>\n\nHello there"}], None, False
    yield "reasoning_content_with_think_in_content", [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "reasoning_content": "given", "content": "a</think>b"}], None, False
    yield "empty_reasoning_after_query_keeps_empty_think_block", [
        {"role": "user", "content": "hi"}, {"role": "assistant", "reasoning_content": "", "content": "Hello"}], None, False
    yield "tools_with_system", [{"role": "system", "content": "Use tools."}, U], TOOLS, True
    yield "tools_without_system", [U], [WEATHER], True
    yield "tools_empty_system", [{"role": "system", "content": ""}, U], [RUN], True
    yield "tool_call_argument_types", [
        U, {"role": "assistant", "reasoning_content": "Call everything.", "content": "Let me check.",
            "tool_calls": [
                call("get_weather", {"city": "Paris", "days": 3, "metric": True, "units": None}),
                call("run", {"argv": ["ls", "-l", "dir with space"], "env": {"LANG": "ja_JP", "n": 1, "x": None},
                             "timeout": 1.5, "retry": False, "big": 12345678901234567890, "tiny": 1e-05,
                             "nested": {"a": [1, {"b": "東京"}]}, "empty_list": [], "empty_obj": {}}, "call_1"),
                call("write_file", {"path": "a.py", "content": "def f():\n    return '<tag>'\n\n"}, "call_2")]},
        {"role": "tool", "tool_call_id": "call_0", "content": "sunny, 23C"},
        {"role": "tool", "tool_call_id": "call_1", "content": "total 0"},
        {"role": "tool", "tool_call_id": "call_2", "content": "written"}], TOOLS, True
    yield "arguments_as_json_string", [
        U, {"role": "assistant", "content": None, "tool_calls": [
            call("get_weather", json.dumps({"city": "Paris", "days": 2, "metric": False}))]},
        {"role": "tool", "content": "rain"}], [WEATHER], True
    yield "tool_call_without_arguments", [
        U, {"role": "assistant", "content": "", "tool_calls": [call("run", {})]},
        {"role": "tool", "content": "ok"}], [RUN], True
    yield "user_message_carrying_tool_response", [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "reasoning_content": "Need the tool.", "content": "",
         "tool_calls": [call("get_weather", {"city": "Oslo"})]},
        {"role": "user", "content": "<tool_response>snow</tool_response>"},
        {"role": "assistant", "reasoning_content": "It snows.", "content": "Snow in Oslo."}], [WEATHER], False
    yield "user_message_with_tool_response_inside_text", [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "reasoning_content": "Need the tool.", "content": "",
         "tool_calls": [call("get_weather", {"city": "Oslo"})]},
        {"role": "user", "content": "Here: <tool_response>snow</tool_response>"}], [WEATHER], True
    yield "content_as_text_parts", [
        {"role": "system", "content": [{"type": "text", "text": "Sys "}, {"type": "text", "text": "prompt."}]},
        {"role": "user", "content": [{"type": "text", "text": "Part one. "}, {"type": "text", "text": "Part two."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Answer."}]},
        {"role": "user", "content": [{"type": "text", "text": "More"}]}], None, True
    yield "tool_result_as_text_parts", [
        U, {"role": "assistant", "content": "", "tool_calls": [call("get_weather", {"city": "Paris"})]},
        {"role": "tool", "content": [{"type": "text", "text": "sun"}, {"type": "text", "text": "ny"}]}], [WEATHER], True
    yield "developer_role", [{"role": "developer", "content": "Dev rules."}, U,
                             {"role": "assistant", "content": "OK"},
                             {"role": "developer", "content": "Later dev note."},
                             {"role": "user", "content": "Go"}], None, True
    yield "developer_role_with_tools", [{"role": "developer", "content": "Dev rules."}, U], [WEATHER], True
    yield "whitespace_and_unicode_kept", [
        {"role": "system", "content": "  padded system  \n"},
        {"role": "user", "content": "\n東京の天気は？ 🌧\n"},
        {"role": "assistant", "content": "  spaced answer \n\n"},
        {"role": "user", "content": "tab\there"}], None, True
    yield "parallel_calls_then_final_answer", [
        {"role": "user", "content": "Compare Paris and Rome."},
        {"role": "assistant", "reasoning_content": "Two calls.", "content": "",
         "tool_calls": [call("get_weather", {"city": "Paris"}), call("get_weather", {"city": "Rome"}, "call_1")]},
        {"role": "tool", "tool_call_id": "call_0", "content": "20C"},
        {"role": "tool", "tool_call_id": "call_1", "content": "25C"},
        {"role": "assistant", "reasoning_content": "Rome is warmer.", "content": "Rome is warmer."}], [WEATHER], False


def agent_loop():
    """Six assistant turns of one agent task with interleaved thinking: the raw text the model writes each
    turn (cut from the official rendering) and the prompt the official template builds before each turn."""
    messages = [{"role": "system", "content": "You are a coding agent."},
                {"role": "user", "content": "Create hello.py, run it, and tell me the weather in Paris."}]
    turns = [
        ("I should write the file first.", "", [call("write_file", {"path": "hello.py",
                                                                     "content": "print('hello')\n"}, "c1")], ["ok"]),
        ("Now run it.", "Running it.", [call("run", {"argv": ["python", "hello.py"], "timeout": 10}, "c2")], ["hello"]),
        ("It printed hello. Weather next,\nfor two cities to compare.", "",
         [call("get_weather", {"city": "Paris", "days": 1}, "c3"), call("get_weather", {"city": "Lyon"}, "c4")],
         ["sunny", "cloudy"]),
        ("Check the env too.", "", [call("run", {"argv": ["env"], "env": {"A": "1"}}, "c5")], ["A=1"]),
        ("One more: list files.", "", [call("run", {"argv": ["ls"]}, "c6")], ["hello.py"]),
        ("All done; summarise.", "hello.py prints hello; Paris is sunny, Lyon cloudy.", [], []),
    ]
    prompts, raws = [], []
    for reasoning, content, calls, results in turns:
        prompt = render(messages, TOOLS, True)
        msg = {"role": "assistant", "reasoning_content": reasoning, "content": content}
        if calls:
            msg["tool_calls"] = calls
        full = render(messages + [msg], TOOLS, False)
        assert full.startswith(prompt) and full.endswith("<|im_end|>\n")  # interleaved thinking: a pure extension
        raws.append(full[len(prompt):-len("<|im_end|>\n")])
        prompts.append(prompt)
        messages = messages + [msg] + [{"role": "tool", "tool_call_id": c["id"], "content": r}
                                       for c, r in zip(calls, results)]
    return {"system": messages[0]["content"], "user": messages[1]["content"], "tools": TOOLS,
            "turns": [{"raw": raw, "tool_results": t[3]} for raw, t in zip(raws, turns)], "prompts": prompts}


TEMPLATE = None


def server_preprocess(messages):
    """What an OpenAI server does before templating (see the module docstring)."""
    out = []
    for m in messages:
        m = dict(m)
        if m["role"] == "developer":
            m["role"] = "system"
        if m.get("tool_calls"):
            m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])
                                                  if isinstance(c["function"]["arguments"], str)
                                                  else c["function"]["arguments"]}} for c in m["tool_calls"]]
        out.append(m)
    return out


def render(messages, tools, add_generation_prompt):
    from transformers.utils.chat_template_utils import render_jinja_template

    text, _ = render_jinja_template([server_preprocess(messages)], tools=tools, chat_template=TEMPLATE,
                                    add_generation_prompt=add_generation_prompt, bos_token=BOS, eos_token="<|im_end|>")
    return text[0]


def main(path):
    global TEMPLATE
    import transformers

    raw = open(path, "rb").read()
    digest = hashlib.sha256(raw).hexdigest()
    assert digest == OFFICIAL_SHA256, f"{path}: sha256 {digest} is not the official template's"
    TEMPLATE = raw.decode("utf-8")
    cases = [{"name": name, "messages": msgs, "tools": tools, "add_generation_prompt": gen,
              "expected": render(msgs, tools, gen)} for name, msgs, tools, gen in conversations()]
    out = {"source": "llama.cpp models/templates/stepfun-ai-Step-3.5-Flash.jinja (PR #19635, commit "
                     "3dadc88b589ca43b8fca0e1beb22d4b78a09b4dd), the release's chat template",
           "sha256": digest, "renderer": f"transformers {transformers.__version__} render_jinja_template",
           "bos_token": BOS, "preprocessing": "JSON-string arguments parsed; developer -> system",
           "cases": cases, "agent_loop": agent_loop()}
    dst = __file__.replace("make_chat_fixtures.py", "chat_template_fixtures.json")
    with open(dst, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"{len(cases)} conversations + {len(out['agent_loop']['prompts'])} agent-loop prompts -> {dst}")


if __name__ == "__main__":
    main(sys.argv[1])
