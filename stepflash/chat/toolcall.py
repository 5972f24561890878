"""The tool-call XML of Step 3.5, read the forgiving way.

The format is

    <tool_call>
    <function=NAME>
    <parameter=ARG>
    value
    </parameter>
    </function>
    </tool_call>

and the model sometimes gets it wrong. What is repaired (the repairs SGLang's and vLLM's Step 3.5
parsers make, each only where the boundary is certain):
- `<function NAME>` and `<functionNAME>` (missing `=`) when NAME is one of the request's tools;
- a function or parameter tag missing its `>`: the name then ends at the newline (or the next `<`) and
  must be a known function / a parameter of the function's schema;
- `<parameter=parameter=ARG...` (a doubled prefix);
- a missing `</parameter>`: the value ends at the next known `<parameter=...>` tag, `</function>` or
  `</tool_call>`; missing `</function>` and `</tool_call>` likewise; a call cut off by the end of the
  reply is closed there, once its function tag and one parameter tag (or a closing tag) are complete;
- `<function=NAME>` without the `<tool_call>` wrapper (NAME must be a known tool, the tag well formed),
  and a stray `</tool_call>` right after such a bare call's `</function>`.

Every function here looks at text that may still grow: a result of NEED_MORE means "cannot tell yet";
at the end of the reply the caller treats it as NO.
"""

from __future__ import annotations

CALL_START, CALL_END = "<tool_call>", "</tool_call>"
FUNCTION_OPEN, FUNCTION_END = "<function", "</function>"
BARE_START = "<function="
PARAM_OPEN, PARAM_END = "<parameter=", "</parameter>"
CLOSING = (PARAM_END, FUNCTION_END, CALL_END)
MAX_NAME = 256  # a tag name longer than this is text, so nothing is held back for long

NO, NEED_MORE, OK = "no", "need_more", "ok"


def is_partial(text: str, tag: str) -> bool:
    """`text` is a proper prefix of `tag` (it may still become the tag)."""
    return len(text) < len(tag) and tag.startswith(text)


def held_suffix(text: str, tags) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `tags`."""
    for n in range(min(max((len(t) for t in tags), default=1) - 1, len(text)), 0, -1):
        tail = text[-n:]
        if any(is_partial(tail, t) for t in tags):
            return n
    return 0


def _name_end(s: str, start: int, stops: str = ">\n<") -> int:
    """Index of the first of `stops` in the MAX_NAME characters from `start` (-1: none there). The window
    keeps a value with thousands of `<` (HTML, say) linear to scan."""
    ends = [i for i in (s.find(c, start, start + MAX_NAME + 1) for c in stops) if i >= 0]
    return min(ends) if ends else -1


def function_tag(s: str, pos: int, functions, repair: bool) -> tuple[str, str | None, int]:
    """(status, name, end) of a function tag at `pos`; `end` is just past it."""
    rest = s[pos:]
    if is_partial(rest, FUNCTION_OPEN):
        return NEED_MORE, None, pos
    if not rest.startswith(FUNCTION_OPEN):
        return NO, None, pos
    p = pos + len(FUNCTION_OPEN)
    if p == len(s):
        return NEED_MORE, None, pos
    if s[p] == "=":
        e = _name_end(s, p + 1)
        if e < 0:
            return (NO if len(s) - p > MAX_NAME else NEED_MORE), None, pos
        name = s[p + 1:e].strip()
        if name not in functions:
            return NO, None, pos
        if s[e] == ">":
            return OK, name, e + 1
        if repair:  # `<function=NAME\n` or `<function=NAME<...`: the `>` is missing
            return OK, name, e + 1 if s[e] == "\n" else e
        return NO, None, pos
    if not repair or not (s[p].isspace() or s[p].isalpha() or s[p] == "_"):
        return NO, None, pos
    # `<function NAME>` / `<functionNAME>`: the `=` is missing.
    e = _name_end(s, p, "><")
    if e < 0:
        return (NO if len(s) - p > MAX_NAME else NEED_MORE), None, pos
    name = s[p:e].strip()
    if s[e] != ">" or name not in functions:
        return NO, None, pos
    return OK, name, e + 1


def param_tag(s: str, pos: int, known) -> tuple[str, str | None, int]:
    """(status, name, end) of a parameter tag at `pos`. A well-formed tag may name anything; a repaired one
    (no `>`) must name a parameter `known(name)` accepts."""
    rest = s[pos:]
    if is_partial(rest, PARAM_OPEN):
        return NEED_MORE, None, pos
    if not rest.startswith(PARAM_OPEN):
        return NO, None, pos
    p = pos + len(PARAM_OPEN)
    if is_partial(s[p:], "parameter=") and p < len(s):
        return NEED_MORE, None, pos
    if s.startswith("parameter=", p):  # `<parameter=parameter=NAME`
        p += len("parameter=")
    e = _name_end(s, p)
    if e < 0:
        return (NO if len(s) - p > MAX_NAME else NEED_MORE), None, pos
    name = s[p:e].strip()
    if not name:
        return NO, None, pos
    if s[e] == ">":
        return OK, name, e + 1
    if known(name):
        return OK, name, e + 1 if s[e] == "\n" else e
    return NO, None, pos


def skip_space(s: str, pos: int) -> int:
    while pos < len(s) and s[pos].isspace():
        pos += 1
    return pos


def call_head(s: str, functions: dict, wrapped: bool) -> tuple[str, str | None, int]:
    """Is `s` (starting with `<tool_call>`, or with `<function=` when not `wrapped`) the head of a real
    call? OK once the function tag names a known tool and is followed (after whitespace) by a complete
    parameter tag or closing tag: (OK, name, end of the function tag). Anything else before that: NO."""
    pos = skip_space(s, len(CALL_START)) if wrapped else 0
    if pos == len(s):
        return NEED_MORE, None, 0
    status, name, end = function_tag(s, pos, functions, repair=wrapped)
    if status != OK:
        return status, None, 0
    props = functions[name].get("properties") if isinstance(functions[name], dict) else None
    at = skip_space(s, end)
    rest = s[at:]
    if any(rest.startswith(t) for t in (FUNCTION_END, CALL_END)):
        return OK, name, end
    tag, _, _ = param_tag(s, at, lambda n: not props or n in props)
    if tag == OK:
        return OK, name, end
    if tag == NEED_MORE or any(is_partial(rest, t) for t in (FUNCTION_END, CALL_END)) or not rest:
        return NEED_MORE, None, 0
    return NO, None, 0


def value_end(s: str, start: int, known) -> tuple[int, int]:
    """Where a parameter value in `s[start:]` ends: (index of the terminator, -1) when one is there, else
    (-1, index from which the text must be held back because a terminator may still begin there)."""
    i = s.find("<", start)
    while i >= 0:
        rest = s[i:]
        if any(rest.startswith(t) for t in CLOSING):
            return i, -1
        if any(is_partial(rest, t) for t in CLOSING):
            return -1, i
        status, name, _ = param_tag(s, i, known)
        if status == OK and known(name):  # a value may hold text like <parameter=x> for unknown x
            return i, -1
        if status == NEED_MORE:
            return -1, i
        i = s.find("<", i + 1)
    return -1, len(s)
