"""The peers' Step 3.5 parser test cases, ported as data (inputs and the outputs each peer asserts).

Sources (each case names its test function; the text is the peer's model output, verbatim):
- vllm_tool: vllm-project/vllm `tests/tool_parsers/test_step3p5_tool_parser.py` at 0847a95f.
- vllm_reasoning: vllm-project/vllm `tests/reasoning/test_step3p5_reasoning_parser.py` at 265c9667.
- sglang: sgl-project/sglang `test/registered/unit/function_call/test_step3p5_detector.py` at df758f47.
- llama_cpp: ggml-org/llama.cpp `tests/test-chat.cpp`, the Step-3.5-Flash blocks at 92f7da00 (added by
  PR #19635, in `test_template_output_peg_parsers`) and at d5b780a6 (the rewritten block, `peg_tester`).

A case: `text` (the reply), `tools` (a key of TOOLS), `think` (True when the prompt opened `<think>`,
as Step 3.5's generation prompt does; vLLM's tool parser and SGLang's detector only ever see the text
after the reasoning, so their cases run with False), and what the peer asserts: exact `reasoning`,
`content` (None: none) and `calls` [(name, arguments)], `content_contains` (in order), or `call_names`.
Keys a peer does not assert are absent. `chunks`: the peer's own streaming split, run besides ours.
`deviation`: stepflash deliberately answers otherwise (the values given are stepflash's; docs/chat_format.md
says why). `na`: the assertion tests an API stepflash does not have.
"""

VLLM_TOOLS = [
    {"type": "function", "function": {"name": "get_current_weather", "description": "Get the current weather",
                                      "parameters": {"type": "object", "properties": {
                                          "city": {"type": "string", "description": "The city name"},
                                          "state": {"type": "string", "description": "The state code"},
                                          "unit": {"type": "string", "enum": ["fahrenheit", "celsius"]}},
                                          "required": ["city", "state"]}}},
    {"type": "function", "function": {"name": "calculate_area", "description": "Calculate area of a shape",
                                      "parameters": {"type": "object", "properties": {
                                          "shape": {"type": "string"}, "dimensions": {"type": "object"},
                                          "precision": {"type": "integer"}}}}},
]
VLLM_TYPES = [{"type": "function", "function": {"name": "test_types", "parameters": {"type": "object", "properties": {
    "int_param": {"type": "integer"}, "float_param": {"type": "float"}, "bool_param": {"type": "boolean"},
    "str_param": {"type": "string"}, "obj_param": {"type": "object"}}}}}]
SGLANG_TOOLS = [
    {"type": "function", "function": {"name": "bash", "parameters": {"type": "object", "properties": {
        "command": {"type": "string"}, "items": {"type": "array"}, "options": {"type": "object"},
        "timeout": {"type": "integer"}}}}},
    {"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "state": {"type": "string"}}}}},
]


def _llama_tool(name, props, required=()):
    return {"type": "function", "function": {"name": name, "parameters": {
        "type": "object", "properties": props, "required": list(required)}}}


LLAMA_TOOLS = [
    _llama_tool("special_function", {"arg1": {"type": "integer", "description": "The arg."}}, ["arg1"]),
    _llama_tool("special_function_with_opt", {"arg1": {"type": "integer"}, "arg2": {"type": "integer"}}, ["arg1"]),
    _llama_tool("python", {"code": {"type": "string", "description": "Python code to execute."}}, ["code"]),
    _llama_tool("magic", {"name": {"type": "string"}, "ref": {"type": "string"}}, ["name", "ref"]),
    _llama_tool("magic_int", {"ref": {"type": "integer"}, "name": {"type": "string"}}, ["ref"]),
    _llama_tool("string_param", {"text": {"type": "string", "description": "A text parameter"}}),
    _llama_tool("quoted_unquoted", {"quoted": {"type": "string"}, "unquoted": {"type": "string"}},
                ["quoted", "unquoted"]),
    _llama_tool("amount", {"orig": {"type": "number"}}, ["orig"]),
    _llama_tool("imaginary_number", {"number": {"type": "object", "properties": {
        "real": {"type": "number"}, "imaginary": {"type": "number"}}, "required": ["real", "imaginary"]}}, ["number"]),
]
TOOLS = {"vllm": VLLM_TOOLS, "vllm_types": VLLM_TYPES, "sglang": SGLANG_TOOLS, "llama": LLAMA_TOOLS, "none": None}

# ---- vLLM tool parser ------------------------------------------------------------------------------
DALLAS = ("<tool_call>\n<function=get_current_weather>\n<parameter=city>\nDallas\n</parameter>\n<parameter=state>\n"
          "TX\n</parameter>\n<parameter=unit>\nfahrenheit\n</parameter>\n</function>\n</tool_call>")
ORLANDO = DALLAS.replace("Dallas", "Orlando").replace("TX", "FL")
RECTANGLE = ("<tool_call>\n<function=calculate_area>\n<parameter=shape>\nrectangle\n</parameter>\n<parameter=dimensions>"
             "\n{\"width\": 10, \n \"height\": 20}\n</parameter>\n<parameter=precision>\n2\n</parameter>\n</function>\n"
             "</tool_call>")
CIRCLE = ("<tool_call>\n<function=calculate_area>\n<parameter=shape>\ncircle\n</parameter>\n<parameter=dimensions>\n"
          "{\"radius\": 15.5}\n</parameter>\n<parameter=precision>\n3\n</parameter>\n</function>\n</tool_call>")
MIXED = ("hello<tool_call>\n<function=get_current_weather>\n<parameter=city>\nDallas\n</parameter>\n<parameter=state>\n"
         "TX\n</parameter>\n</function>\n</tool_call>hi<tool_call>\n<function=calculate_area>\n<parameter=shape>\n"
         "rectangle\n</parameter>\n<parameter=dimensions>\n{\"width\": 10, \"height\": 5}\n</parameter>\n</function>\n"
         "</tool_call>")
MISSING_CLOSE = ("Let me check the weather for you:\n<tool_call>\n<function=get_current_weather>\n<parameter=city>\n"
                 "Dallas\n<parameter=state>\nTX\n</parameter>\n<parameter=unit>\nfahrenheit\n</parameter>\n</function>\n"
                 "</tool_call>")
W_DALLAS = {"city": "Dallas", "state": "TX", "unit": "fahrenheit"}
RECT = ("calculate_area", {"shape": "rectangle", "dimensions": {"width": 10, "height": 5}})
MIXED_CALLS = [("get_current_weather", {"city": "Dallas", "state": "TX"}), RECT]
BOUNDARY_CHUNKS = ["<tool_call>\n<function=get_current_weather>\n<parameter=city>\nSys", "\n</parameter>\n</function>\n",
                   "</tool_call><tool_call>\n<", "function=calculate_area>\n<parameter=shape>\nrectangle",
                   "</parameter>\n</function>\n</tool_call>"]
MTP_CHUNKS = ["<tool_call>\n<function=get_current_weather>\n<parameter=city>\n",
              "Dallas\n</parameter>\n<parameter=state>\nTX", "\n</parameter>\n<parameter=unit>\nfahrenheit\n</parameter>",
              "\n</function>\n</tool_call>"]
MTP_STEP_CHUNKS = [DALLAS[:DALLAS.index("\n</parameter>\n<parameter=unit>")],
                   DALLAS[DALLAS.index("\n</parameter>\n<parameter=unit>"):] + "\n" + ORLANDO.replace("fahrenheit", "celsius")]


def _v(id_, text, tools="vllm", **expect):
    return {"suite": "vllm_tool", "id": id_, "text": text, "tools": tools, "think": False, **expect}


VLLM_TOOL_CASES = [
    _v("test_extract_tool_calls_no_tools", "This is a test response without any tool calls", calls=[],
       content="This is a test response without any tool calls"),
    _v("test_extract_tool_calls[single_tool]", DALLAS, calls=[("get_current_weather", W_DALLAS)], content=None),
    _v("test_extract_tool_calls[single_tool_with_content]", "Sure! Let me check the weather for you." + DALLAS,
       calls=[("get_current_weather", W_DALLAS)], content="Sure! Let me check the weather for you."),
    _v("test_extract_tool_calls[single_tool_multiline_param]", RECTANGLE, content=None, calls=[
        ("calculate_area", {"shape": "rectangle", "dimensions": {"width": 10, "height": 20}, "precision": 2})]),
    _v("test_extract_tool_calls[parallel_tools]", DALLAS + "\n" + ORLANDO, content=None, calls=[
        ("get_current_weather", W_DALLAS), ("get_current_weather", {**W_DALLAS, "city": "Orlando", "state": "FL"})]),
    _v("test_extract_tool_calls[tool_with_typed_params]", "Let me calculate that area for you." + CIRCLE,
       content="Let me calculate that area for you.",
       calls=[("calculate_area", {"shape": "circle", "dimensions": {"radius": 15.5}, "precision": 3})]),
    _v("test_extract_tool_calls_fallback_no_tags", "<function=get_current_weather>\n<parameter=city>\nDallas\n"
       "</parameter>\n<parameter=state>\nTX\n</parameter>\n</function>", call_names=["get_current_weather"]),
    _v("test_extract_tool_calls_type_conversion", "<tool_call>\n<function=test_types>\n<parameter=int_param>\n42\n"
       "</parameter>\n<parameter=float_param>\n3.14\n</parameter>\n<parameter=bool_param>\ntrue\n</parameter>\n"
       "<parameter=str_param>\nhello world\n</parameter>\n<parameter=obj_param>\n{\"key\": \"value\"}\n</parameter>\n"
       "</function>\n</tool_call>", tools="vllm_types", calls=[("test_types", {
           "int_param": 42, "float_param": 3.14, "bool_param": True, "str_param": "hello world",
           "obj_param": {"key": "value"}})]),
    _v("test_extract_tool_calls_streaming[no_tools]", "This is a test without tools", calls=[],
       content="This is a test without tools"),
    _v("test_extract_tool_calls_streaming[single_tool]", DALLAS, calls=[("get_current_weather", W_DALLAS)],
       content=None),
    _v("test_extract_tool_calls_streaming[single_tool_with_content]", "Sure! Let me check the weather for you." + DALLAS,
       calls=[("get_current_weather", W_DALLAS)], content="Sure! Let me check the weather for you."),
    _v("test_extract_tool_calls_streaming[single_tool_multiline_param]", RECTANGLE, content=None, calls=[
        ("calculate_area", {"shape": "rectangle", "dimensions": {"width": 10, "height": 20}, "precision": 2})]),
    _v("test_extract_tool_calls_streaming[parallel_tools]", DALLAS + "\n" + ORLANDO.replace("fahrenheit", "celsius"),
       content=None, calls=[("get_current_weather", W_DALLAS),
                            ("get_current_weather", {"city": "Orlando", "state": "FL", "unit": "celsius"})]),
    _v("test_extract_tool_calls_streaming[tool_with_typed_params]", "Let me calculate that area for you." + CIRCLE,
       content="Let me calculate that area for you.",
       calls=[("calculate_area", {"shape": "circle", "dimensions": {"radius": 15.5}, "precision": 3})]),
    _v("test_extract_tool_calls_missing_closing_parameter_tag", MISSING_CLOSE,
       content_contains=["Let me check the weather for you:"], calls=[("get_current_weather", W_DALLAS)]),
    _v("test_extract_tool_calls_streaming_missing_closing_tag", MISSING_CLOSE,
       content_contains=["Let me check the weather for you:"], calls=[("get_current_weather", W_DALLAS)]),
    _v("test_extract_tool_calls_streaming_incremental", "I'll check the weather.<tool_call>\n<function="
       "get_current_weather>\n<parameter=city>\nDallas\n</parameter>\n<parameter=state>\nTX\n</parameter>\n</function>\n"
       "</tool_call>", calls=[("get_current_weather", {"city": "Dallas", "state": "TX"})], incremental=True),
    _v("test_extract_tool_calls_complex_type_with_single_quote", "<tool_call>\n<function=test_types>\n"
       "<parameter=obj_param>\n{'key': 'value'}\n</parameter>\n</function>\n</tool_call>", tools="vllm_types",
       calls=[("test_types", {"obj_param": {"key": "value"}})]),
    _v("test_extract_tool_calls_streaming_mixed_content_and_multiple_tool_calls", MIXED,
       content_contains=["hello", "hi"], calls=MIXED_CALLS),
    _v("test_extract_tool_calls_non_streaming_mixed_content_and_multiple_tool_calls", MIXED,
       content_contains=["hello", "hi"], calls=MIXED_CALLS),
    _v("test_extract_tool_calls_streaming_full_input_mixed_content_and_multiple_tool_calls", MIXED,
       content_contains=["hello", "hi"], calls=MIXED_CALLS, chunks=[MIXED]),
    _v("test_extract_tool_calls_streaming_multiple_tool_calls_no_content_between", MIXED.replace("hi<", "<"),
       content_contains=["hello"], calls=MIXED_CALLS),
    _v("test_extract_tool_calls_streaming_multi_token_chunk_boundary", "".join(BOUNDARY_CHUNKS),
       call_names=["get_current_weather", "calculate_area"], chunks=BOUNDARY_CHUNKS),
    _v("test_extract_tool_calls_non_streaming_multiple_tool_calls_no_content_between", MIXED.replace("hi<", "<"),
       content_contains=["hello"], calls=MIXED_CALLS),
    _v("test_streaming_mtp_variable_chunks", "".join(MTP_CHUNKS), calls=[("get_current_weather", W_DALLAS)],
       chunks=MTP_CHUNKS),
    _v("test_streaming_multi_token_per_step", "".join(MTP_STEP_CHUNKS), chunks=MTP_STEP_CHUNKS, calls=[
        ("get_current_weather", W_DALLAS), ("get_current_weather", {"city": "Orlando", "state": "FL", "unit": "celsius"})]),
]


# ---- vLLM reasoning parser ---------------------------------------------------------------------------
def _r(id_, text, reasoning, content, think=True):
    return {"suite": "vllm_reasoning", "id": id_, "text": text, "tools": "none", "think": think,
            "reasoning": reasoning, "content": content}


_R = "This is a reasoning section"
_T = "This is the rest"
VLLM_REASONING_CASES = [_r(f"test_reasoning[{i}]", t, r, c) for i, t, r, c in [
    ("simple_reasoning", f"{_R}</think>{_T}", _R, _T),
    ("simple_reasoning_streaming", f"{_R}</think>{_T}", _R, _T),
    ("complete_reasoning", f"{_R}</think>", _R, None),
    ("complete_reasoning_streaming", f"{_R}</think>", _R, None),
    ("no_content_token", "This is content", "This is content", None),
    ("no_reasoning_token_streaming", _R, _R, None),
    ("multiple_lines", f"This\nThat</think>{_T}\nThat", "This\nThat", f"{_T}\nThat"),
    ("multiple_lines_streaming", f"This\nThat</think>{_T}\nThat", "This\nThat", f"{_T}\nThat"),
    ("shortest", f"</think>{_T}", None, _T),
    ("shortest_streaming", f"</think>{_T}", None, _T),
    ("reasoning_with_think", f"<think>{_R}</think>{_T}", _R, _T),
    ("reasoning_with_think_streaming", f"<think>{_R}</think>{_T}", _R, _T),
    ("complete_reasoning_with_think", f"<think>{_R}</think>", _R, None),
    ("complete_reasoning_with_think_streaming", f"<think>{_R}</think>", _R, None),
    ("multiple_lines_with_think", f"<think>This\nThat</think>{_T}\nThat", "This\nThat", f"{_T}\nThat"),
    ("multiple_lines_with_think_streaming", f"<think>This\nThat</think>{_T}\nThat", "This\nThat", f"{_T}\nThat"),
    ("shortest_with_think", f"</think>{_T}", None, _T),
    ("shortest_with_think_streaming", f"</think>{_T}", None, _T),
    ("think_no_end", f"<think>{_R}", _R, None),
    ("think_no_end_streaming", f"<think>{_R}", _R, None),
    ("empty", "", None, None),
    ("empty_streaming", "", None, None),
    ("new_line_streaming", f"\n<think>{_R}\n</think>\n{_T}", f"\n{_R}", _T),
    ("new_line_streaming_complex_content", f"\n This is a \n reasoning section\n\n\n</think>\n\n{_T}",
     "\n This is a \n reasoning section\n\n", f"\n{_T}"),
]] + [
    # Its expected content keeps the newline before <think>: a reply to a prompt that did not open the block.
    _r("test_reasoning[new_line]", f"\n<think>{_R}</think>\n{_T}", _R, f"\n{_T}", think=False),
    {"suite": "vllm_reasoning", "id": "test_reasoning[multi_turn_prompt_content]", "tools": "none",
     "text": "<think> This is last turn's reasoning section </think> hello <think>", "prompt_opens_reasoning": True,
     "note": "asserts only is_reasoning_end(prompt ids) == False; stepflash asks opens_reasoning(prompt)"},
] + [_r(f"test_step3p5_preserves_prefix_before_think[{t!r}]", t, r, c, think=False) for t, r, c in [
    # The whole test is about replies that write text before opening <think>: prompts that did not open it.
    ("\nIntro<think>reasoning</think>\nAnswer", "reasoning", "\nIntroAnswer"),
    ("<think>calc</think>\nAnswer", "calc", "Answer"),
    ("<think>reasoning\n</think>\nAnswer", "reasoning", "Answer"),
    ("before<think>still thinking", "still thinking", "before"),
    ("before<think>still thinking\n", "still thinking", "before"),
    ("Intro\n<think>reasoning</think>\nAnswer", "reasoning", "Intro\nAnswer"),
    ("Intro<think>reasoning</think>Answer", "reasoning", "IntroAnswer"),
    ("Intro<think>reasoning</think>\n", "reasoning", "Intro"),
    ("<think>reasoning</think>\n\nAnswer", "reasoning", "\nAnswer"),
]] + [
    {"suite": "vllm_reasoning", "id": "test_step3p5_streaming_drops_leading_newline", "tools": "none", "think": True,
     "text": "<think>calc</think>\nAnswer", "content": "Answer"},
]

# ---- SGLang detector -----------------------------------------------------------------------------------
_PWD = "<tool_call><function=bash><parameter=command>pwd</parameter></function></tool_call>"
_PARIS = "<tool_call><function=weather><parameter=city>Paris</parameter></function></tool_call>"
_BASH_PWD = ("bash", {"command": "pwd"})


def _s(id_, text, content="?", calls=None, **extra):
    case = {"suite": "sglang", "id": id_, "text": text, "tools": "sglang", "think": False}
    if content != "?":  # SGLang's normal_text; "" is no content
        case["content"] = content or None
    if calls is not None:
        case["calls"] = calls
    return {**case, **extra}


SGLANG_CASES = [
    {"suite": "sglang", "id": "test_registry_isolated_from_qwen3_coder", "na": "SGLang's parser registry"},
    _s("test_canonical_xml_matches_qwen_parser", "prefix<tool_call><function=bash><parameter=command>pwd</parameter>"
       "<parameter=timeout>5</parameter></function></tool_call>", "prefix", [("bash", {"command": "pwd", "timeout": 5})]),
    *[_s(f"test_missing_equals_in_known_function_tag[{tag}]",
         f"<tool_call>{tag}<parameter=command>pwd</parameter></function></tool_call>", "", [_BASH_PWD])
      for tag in ("<function bash>", "<functionbash>")],
    _s("test_missing_right_angle_in_function_and_parameter_tags",
       "<tool_call><function=bash\n<parameter=command\npwd</parameter></function></tool_call>", "", [_BASH_PWD]),
    _s("test_duplicate_parameter_prefix_is_repaired_when_boundary_is_known",
       "<tool_call><function=bash><parameter=parameter=command\npwd</parameter></function></tool_call>", "", [_BASH_PWD]),
    _s("test_missing_outer_tool_call_wrapper", "<function=bash><parameter=command>pwd</parameter></function>", "",
       [_BASH_PWD]),
    _s("test_missing_parameter_close_before_next_parameter", "<tool_call><function=weather><parameter=city>Dallas"
       "<parameter=state>TX</parameter></function></tool_call>", "", [("weather", {"city": "Dallas", "state": "TX"})]),
    _s("test_tool_close_repairs_open_parameter_and_function",
       "<tool_call><function=bash><parameter=command>pwd</tool_call>", "", [_BASH_PWD]),
    _s("test_adjacent_calls_in_one_mtp_chunk", _PWD + _PARIS, "", [_BASH_PWD, ("weather", {"city": "Paris"})]),
    _s("test_interleaved_text_is_preserved_in_both_modes", f"hello{_PWD}between{_PARIS}bye", "hellobetweenbye",
       [_BASH_PWD, ("weather", {"city": "Paris"})]),
    _s("test_python_literal_container_parameters_remain_supported", "<tool_call><function=bash><parameter=options>"
       "{'check': True}</parameter><parameter=items>[1, 2]</parameter></function></tool_call>", "",
       [("bash", {"options": {"check": True}, "items": [1, 2]})]),
    _s("test_unknown_malformed_function_is_not_repaired", "<tool_call><function unknown><parameter=command>pwd"
       "</parameter></function></tool_call>", "<tool_call><function unknown><parameter=command>pwd</parameter>"
       "</function></tool_call>", [], deviation="SGLang's stream drops the block (normal text ''); stepflash keeps it "
       "as content. The non-stream assertion (no calls) holds."),
    _s("test_bare_unknown_function_is_preserved_as_text",
       "prefix<function=unknown><parameter=command>pwd</parameter></function>suffix",
       "prefix<function=unknown><parameter=command>pwd</parameter></function>suffix", []),
    _s("test_xml_like_prose_does_not_block_a_later_real_call",
       "intro<functions>x</functions><function_name>y</function_name>" + _PWD,
       "intro<functions>x</functions><function_name>y</function_name>", [_BASH_PWD]),
    *[_s(f"test_partial_function_words_are_plain_stream_content[{t}]", t, t, [])
      for t in ("This uses <functionality in prose", "This uses <functionbashful in prose",
                "This uses <function unknown in prose", "This discusses <parameterization forever")],
    _s("test_unmatched_closing_tags_are_preserved_as_text", "a</function>b</parameter>c</tool_call>d",
       "a</function>b</parameter>c</tool_call>d", []),
    _s("test_private_use_text_has_no_special_meaning", "prefix\ue000step3p5-literal-lt\ue001suffix",
       "prefix\ue000step3p5-literal-lt\ue001suffix", []),
    _s("test_literal_and_parser_segments_do_not_reorder_text", "a<</function>b" + _PWD, "a<</function>b", [_BASH_PWD]),
    _s("test_non_stream_closes_confirmed_call_at_eos", "<tool_call><function=bash><parameter=command>pwd", "",
       [_BASH_PWD]),
    *[_s(f"test_non_stream_does_not_invent_call_from_partial_opening_tag[{t}]", t, t, [])
      for t in ("<tool_call><function=bash", "<tool_call><function=bash><parameter=command")],
    _s("test_non_stream_partial_second_call_keeps_completed_first_call", _PWD + "<tool_call><function=weather",
       "<tool_call><function=weather", [_BASH_PWD]),
    *[_s(f"test_redundant_close_after_synthetic_wrapper_is_consumed[{sep!r}]",
         f"<function=bash><parameter=command>pwd</parameter></function>{sep}</tool_call>", "", [_BASH_PWD])
      for sep in ("", "\n", "\n  ")],
    _s("test_whitespace_after_synthetic_wrapper_is_preserved_without_close", "<function=bash></function>\n", "\n",
       call_names=["bash"]),
    _s("test_non_stream_conversion_error_falls_back_to_text", "<tool_call><function=bash><parameter=options>{1, 2}"
       "</parameter></function></tool_call>", "", [("bash", {"options": "{1, 2}"})],
       deviation="SGLang's non-stream path turns the whole call into text (no calls); stepflash keeps the call with "
       "the value as written, as vLLM does, because a streamed call's name cannot be taken back."),
    *[_s(f"test_function_like_text_inside_parameter_is_not_repaired[{v}]",
         f"<tool_call><function=bash><parameter=command>printf '{v}'</parameter></function></tool_call>", "",
         [("bash", {"command": f"printf '{v}'"})]) for v in ("&lt;function bash&gt;", "<function bash>")],
    _s("test_tool_call_start_text_inside_parameter_is_not_repaired", "<tool_call><function=bash><parameter=command>"
       "printf '<tool_call>'</parameter></function></tool_call>", "", [("bash", {"command": "printf '<tool_call>'"})]),
    _s("test_qwen_parser_does_not_gain_step_repair",
       "<tool_call><function bash><parameter=command>pwd</parameter></function></tool_call>", call_names=["bash"]),
    {"suite": "sglang", "id": "test_structural_tag_contract_is_inherited", "na": "SGLang's structural-tag API"},
]

# ---- llama.cpp -----------------------------------------------------------------------------------------
_HELLO = "Hello, world!\nWhat's up?"
_SF = "<tool_call>\n<function=special_function>\n<parameter=arg1>\n1\n</parameter>\n</function>\n</tool_call>"
_SFO = ("<tool_call>\n<function=special_function_with_opt>\n<parameter=arg1>\n1\n</parameter>\n<parameter=arg2>\n2\n"
        "</parameter>\n</function>\n</tool_call>")
_CODE = "def hello():\n    print(\"Hello, world!\")\n\nhello()"
_PAR = [("special_function", {"arg1": 1}), ("special_function_with_opt", {"arg1": 1, "arg2": 2})]


def _l(at, id_, text, reasoning=None, content=None, calls=()):
    return {"suite": "llama_cpp", "id": f"{at}:{id_}", "text": text, "tools": "llama", "think": True,
            "reasoning": reasoning, "content": content, "calls": list(calls)}


def _call(name, params):
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params)
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


LLAMA_CPP_CASES = [
    _l("92f7da00", "basic message with reasoning", f"I'm\nthinking\n</think>\n{_HELLO}", "I'm\nthinking", _HELLO),
    _l("92f7da00", "basic message without thinking content", f"</think>\n{_HELLO}", None, _HELLO),
    _l("92f7da00", "tool call without thinking content", "</think>\n" + _SF, calls=[("special_function", {"arg1": 1})]),
    _l("92f7da00", "tool call with thinking", "I'm\nthinking\n</think>\n" + _SF, "I'm\nthinking",
       calls=[("special_function", {"arg1": 1})]),
    _l("92f7da00", "parallel tool calls with thinking", "I'm\nthinking\n</think>\n" + _SF + "\n" + _SFO,
       "I'm\nthinking", calls=_PAR),
    _l("92f7da00", "parallel tool calls without thinking content", "</think>\n" + _SF + "\n" + _SFO, calls=_PAR),
    _l("92f7da00", "tool call with code string parameter", "</think>\n" + _call("python", [("code", _CODE)]),
       calls=[("python", {"code": _CODE})]),
    _l("92f7da00", "string parameter and no closing </parameter> tag",
       f"</think>\n<tool_call>\n<function=python>\n<parameter=code>\n{_CODE}\n</function>\n</tool_call>",
       calls=[("python", {"code": _CODE})]),
    _l("92f7da00", "response format (JSON schema with thinking)", "I need to output the invoice details in JSON\n"
       "</think>\n{\"amount\": 123.45, \"date\": \"2025-12-03\"}", "I need to output the invoice details in JSON",
       "{\"amount\": 123.45, \"date\": \"2025-12-03\"}"),
    _l("d5b780a6", "I was thinking", "I was thinking</think>\nNow I'm not.", "I was thinking", "Now I'm not."),
    _l("d5b780a6", "numeric-looking string values stay strings", "Let me call the magic tool\n</think>\n" +
       _call("magic", [("name", "fooBar"), ("ref", "5123123")]), "Let me call the magic tool",
       calls=[("magic", {"name": "fooBar", "ref": "5123123"})]),
    _l("d5b780a6", "numbers when the schema says number", "Let me call the special function\n</think>\n" +
       _call("special_function", [("arg1", "42555916")]), "Let me call the special function",
       calls=[("special_function", {"arg1": 42555916})]),
    _l("d5b780a6", "special_function_with_opt", "Let me call the special function with opt\n</think>\n" +
       _call("special_function_with_opt", [("arg1", "42555916")]), "Let me call the special function with opt",
       calls=[("special_function_with_opt", {"arg1": 42555916})]),
    _l("d5b780a6", "magic_int", "Let me call the magic_int function\n</think>\n" +
       _call("magic_int", [("ref", "42555916"), ("name", "baz")]), "Let me call the magic_int function",
       calls=[("magic_int", {"ref": 42555916, "name": "baz"})]),
    _l("d5b780a6", "string_param with empty text", "Call string_param with empty text\n</think>\n" +
       _call("string_param", [("text", "")]), "Call string_param with empty text", calls=[("string_param", {"text": ""})]),
    _l("d5b780a6", "simple quoted unquoted", "Test simple quoted unquoted\n</think>\n" +
       _call("quoted_unquoted", [("quoted", "\"foo\""), ("unquoted", "foo")]), "Test simple quoted unquoted",
       calls=[("quoted_unquoted", {"quoted": "\"foo\"", "unquoted": "foo"})]),
    _l("d5b780a6", "complex quoted unquoted", "Test complex quoted unquoted\n</think>\n" +
       _call("quoted_unquoted", [("quoted", "\"printf(\\\"foo\\\");\""), ("unquoted", "printf(\"foo\");")]),
       "Test complex quoted unquoted",
       calls=[("quoted_unquoted", {"quoted": "\"printf(\\\"foo\\\");\"", "unquoted": "printf(\"foo\");"})]),
    _l("d5b780a6", "negative number", "Test negative number\n</think>\n" + _call("magic_int", [("ref", "-14")]),
       "Test negative number", calls=[("magic_int", {"ref": -14})]),
    _l("d5b780a6", "decimal number", "Test decimal number\n</think>\n" + _call("amount", [("orig", "3.14")]),
       "Test decimal number", calls=[("amount", {"orig": 3.14})]),
    _l("d5b780a6", "imaginary number", "Test imaginary number\n</think>\n" +
       _call("imaginary_number", [("number", "{ \"real\": 3.14, \"imaginary\": 2.71 }")]), "Test imaginary number",
       calls=[("imaginary_number", {"number": {"real": 3.14, "imaginary": 2.71}})]),
]

CASES = VLLM_TOOL_CASES + VLLM_REASONING_CASES + SGLANG_CASES + LLAMA_CPP_CASES
