"""Structured output: a grammar-constrained sampling mask per row, through llguidance.

Library choice, by measurement (`benchmarks/grammar_mask.py`, numbers in benchmarks/RESULTS.md): at
the release's 128k vocabulary llguidance compiles a per-request grammar in milliseconds where xgrammar
0.2.8 takes about a second, their masks cost the same order per row and step, and llguidance is one Rust
wheel with no dependencies (xgrammar pulls triton, apache-tvm-ffi and transformers in at run time). It
also reads a tokenizer.json directly and offers rollback and draft-token masks, which MTP needs.

    compiler = GrammarCompiler(tokenizer, vocab_size, stop_ids)     # once per server (~1 s at 128k vocab)
    grammar = compiler.json_schema(schema, reasoning=True)          # per request; UserError if invalid
    m = compiler.matcher(grammar)                                   # per row (one per choice)
    m.fill_mask(bits[row])            # int32 bitmask of the allowed next tokens
    m.consume([tok])                  # after sampling; rollback(n) undoes the last n tokens
    masks_along_drafts(matchers, drafts, bits)   # a batch's masks at every verified position
    x = masked_logits(logits, bits)   # -inf where the mask forbids

Both per-request steps are cached (the last 64 grammars, each with a fresh matcher that rows copy), so
a repeated schema or tool list costs microseconds, not milliseconds.

Grammars (lark, the Step 3.5 chat format of SPEC section 8):
- a chat reply starts inside the think block (the generation prompt ends in `<think>\n`), so with
  `reasoning=True` any text up to `</think>` comes first and the constraint applies after it, as in
  vLLM's reasoning-aware structured output; `reasoning_max_chars` bounds it;
- `json_object` / `json_schema`: the body is JSON (llguidance's JSON Schema compiler);
- tool calls (`tool_choice` "required" or a named function): the body is one or more blocks
  `<tool_call>\n<function=NAME>\n<parameter=ARG>\nVALUE\n</parameter>\n...</function>\n</tool_call>`,
  parameters in the schema's property order, required ones present; a string-typed value is raw text
  (the template writes strings as they are), any other value is JSON for its sub-schema. Special
  tokens (`</think>`, `<tool_call>`) are matched as the tokenizer's single token when it has one.
After the body only a stop id (eos, end of turn) is allowed.

MTP speculation: the verifier's K + 1 distributions need the masks along the drafts
(`masks_along_drafts`: consume the drafts, fill, roll back); a draft the grammar refuses has p = 0 and
is rejected by the usual rule, so the output is exact. Drafts are not masked while they are drafted
(docs/server.md, Limits). The engine (`logits_process.RowLogits`) computes a batch's masks inline on
the CPU, or on an accelerator in a worker thread through llguidance's parallel executor while the
verify forward runs.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from stepflash.errors import UserError

THINK_END, CALL_START, CALL_END = "</think>", "<tool_call>", "</tool_call>"


def _llguidance():
    try:
        import llguidance
    except ImportError as e:  # a pinned dependency; only a broken install gets here
        raise UserError(f"structured output needs the llguidance package ({e})") from None
    return llguidance


@dataclass(frozen=True)
class Grammar:
    """A validated grammar in llguidance's serialized form, and what it was built for."""

    source: str
    kind: str  # "json_object", "json_schema", "tool_calls"


class GrammarCompiler:
    """The tokenizer as the grammar library sees it, and grammar construction and validation.

    Requests repeat their schemas and tools, so the last `cache_size` grammars are kept, each with a
    fresh matcher that new rows copy: compiling and validating a grammar, and starting a matcher, cost
    ~1 ms each at a 331-token vocabulary (more at 128k), a copy ~1 µs. Thread-safe (requests are
    prepared in worker threads)."""

    cache_size = 64

    def __init__(self, tokenizer, vocab_size: int, stop_ids: list[int]):
        llg = _llguidance()
        self.vocab_size = vocab_size
        self.stop_ids = sorted(set(stop_ids))
        # A tokenizer.json string: byte-level BPE is decoded by the library; n_vocab pads to the model's
        # vocabulary (ids past the tokenizer's are never allowed).
        self.ll_tokenizer = llg.LLTokenizer(tokenizer.to_str(), n_vocab=vocab_size, eos_token=self.stop_ids)
        self._special = {t: tokenizer.token_to_id(t) for t in (THINK_END, CALL_START, CALL_END)}
        self._grammars: OrderedDict[str, Grammar] = OrderedDict()  # lark text -> validated grammar
        self._fresh: OrderedDict[str, object] = OrderedDict()  # grammar source -> an LLMatcher never advanced
        self._lock = threading.Lock()

    # ---- grammars -------------------------------------------------------------------------------
    def _tag(self, text: str) -> str:
        """A tag as a lark item: the tokenizer's single special token if it has one, else the text."""
        tid = self._special.get(text)
        return f"<[{tid}]>" if tid is not None else _literal(text)

    def _wrap(self, body_rules: str, reasoning: bool, reasoning_max_chars: int | None) -> str:
        if not reasoning:
            return "start: body\n" + body_rules
        # Bounded in characters, not tokens: llguidance cannot roll back through a max_tokens lexeme.
        length = "*" if reasoning_max_chars is None else f"{{0,{int(reasoning_max_chars)}}}"
        if self._special.get(THINK_END) is not None:
            # Free text, then the special token; the text may not spell `</think>` either (the chat
            # parser reads text, so that would end the reasoning early).
            think = (f"start: think {self._tag(THINK_END)} /\\n{{0,2}}/ body\nthink: THINK_TEXT\n"
                     f"THINK_TEXT: /(?s:.{length})/ & ~/(?s:.*)<\\/think>(?s:.*)/\n")
        else:  # `</think>` is text: a lazy lexeme ends at its first occurrence
            think = f"start: think /\\n{{0,2}}/ body\nthink[lazy]: /(?s:.{length})<\\/think>/\n"
        return think + body_rules

    def json_object(self, reasoning: bool = False, reasoning_max_chars: int | None = None) -> Grammar:
        return self.json_schema({"type": "object"}, reasoning, reasoning_max_chars, kind="json_object")

    def json_schema(self, schema: dict, reasoning: bool = False, reasoning_max_chars: int | None = None,
                    kind: str = "json_schema") -> Grammar:
        if not isinstance(schema, dict):
            raise UserError("the JSON schema must be an object")
        body = f"body: {_json_item(schema)}\n"
        return self._compile(self._wrap(body, reasoning, reasoning_max_chars), kind)

    def tool_calls(self, tools: list[dict], name: str | None = None, parallel: bool = True,
                   reasoning: bool = False, reasoning_max_chars: int | None = None) -> Grammar:
        """One call of function `name`, or (name None: tool_choice "required") one call of any of
        `tools`, or several if `parallel`. tools: OpenAI tool dicts ({"type": "function", "function": {...}})."""
        functions = [t.get("function", t) for t in tools]
        if name is not None:
            functions = [f for f in functions if f.get("name") == name]
            if not functions:
                raise UserError(f"tool_choice names function {name!r}, which is not in tools")
        if not functions:
            raise UserError("tool_choice 'required' needs at least one tool")
        rules, alternatives = [], []
        for i, fn in enumerate(functions):
            alternatives.append(f"fn{i}")
            rules += _function_rules(i, fn)
        call = (f"call: {self._tag(CALL_START)} \"\\n<function=\" ({' | '.join(alternatives)}) "
                f"\"</function>\\n\" {self._tag(CALL_END)}\n")
        repeat = "+" if parallel and name is None else ""
        body = f"body: call{repeat}\n" + call + "\n".join(rules) + "\n"
        return self._compile(self._wrap(body, reasoning, reasoning_max_chars), "tool_calls")

    def _compile(self, lark: str, kind: str) -> Grammar:
        grammar = self._cached(self._grammars, lark)
        if grammar is None or grammar.kind != kind:
            llg = _llguidance()
            source = llg.LLMatcher.grammar_from_lark(lark)
            is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(source, self.ll_tokenizer)
            if is_error:
                raise UserError(f"the {kind.replace('_', ' ')} grammar is not valid: {messages[0].splitlines()[0]}")
            grammar = self._keep(self._grammars, lark, Grammar(source, kind))
        return grammar

    def matcher(self, grammar: Grammar) -> "GrammarMatcher":
        fresh = self._cached(self._fresh, grammar.source)
        if fresh is None:
            fresh = _llguidance().LLMatcher(self.ll_tokenizer, grammar.source, log_level=0)
            if not fresh.is_error():
                self._keep(self._fresh, grammar.source, fresh)
        with self._lock:
            copy = fresh.deep_copy()
        return GrammarMatcher(copy, self.vocab_size, self.stop_ids)

    def _cached(self, cache: OrderedDict, key: str):
        with self._lock:
            value = cache.get(key)
            if value is not None:
                cache.move_to_end(key)
            return value

    def _keep(self, cache: OrderedDict, key: str, value):
        with self._lock:
            cache[key] = value
            while len(cache) > self.cache_size:
                cache.popitem(last=False)
        return value


def _function_rules(i: int, fn: dict) -> list[str]:
    name = fn.get("name")
    if not isinstance(name, str) or not name or any(c in name for c in "<>\n\""):
        raise UserError(f"tool function name {name!r} cannot be used in a tool call")
    params = fn.get("parameters") or {}
    properties = params.get("properties") or {}
    if not isinstance(properties, dict):
        raise UserError(f"function {name!r}: parameters.properties must be an object")
    required = set(params.get("required") or [])
    items = []
    for j, (arg, schema) in enumerate(properties.items()):
        if not isinstance(arg, str) or not arg or any(c in arg for c in "<>\n\""):
            raise UserError(f"function {name!r}: parameter name {arg!r} cannot be used in a tool call")
        items.append(f"p{i}_{j}" + ("" if arg in required else "?"))
    rules = [f"fn{i}: {_literal(name + '>' + chr(10))} {' '.join(items)}"]
    for j, (arg, schema) in enumerate(properties.items()):
        rules.append(f"p{i}_{j}: {_literal(f'<parameter={arg}>' + chr(10))} {_value(schema, f'{i}_{j}', rules)}")
    return rules


_CLOSE = '"\\n</parameter>\\n"'


def _value(schema, key: str, rules: list[str]) -> str:
    """A parameter's value and its closing tag as a lark item: raw text for a plain string, JSON for
    anything else. Raw text is a lazy lexeme that ends at the first closing tag and never contains
    `</parameter>` (the chat parser ends a value at the first one); a greedy one would run past it."""
    if not isinstance(schema, dict):
        return f"{_json_item({})} {_CLOSE}"
    if schema.get("type") == "string" and not any(k in schema for k in ("enum", "const", "pattern", "format")):
        lo, hi = int(schema.get("minLength") or 0), schema.get("maxLength")
        hi = "" if hi is None else int(hi)
        rules += [f"v{key}[lazy]: VALUE{key}", f"VALUE{key}: TEXT{key} {_CLOSE}",
                  f"TEXT{key}: /(?s:.{{{lo},{hi}}})/ & ~/(?s:.*)<\\/parameter>(?s:.*)/"]
        return f"v{key}"
    if schema.get("type") == "string" and isinstance(schema.get("enum"), list):
        return "(" + " | ".join(_literal(str(v)) for v in schema["enum"]) + f") {_CLOSE}"
    return f"{_json_item(schema)} {_CLOSE}"


def _literal(text: str) -> str:
    """A lark string literal (JSON escaping is lark's: \\n, \\", \\\\)."""
    return json.dumps(text, ensure_ascii=False)


# JSON as `json.dumps` writes it: one space after ',' and ':', no other whitespace (free whitespace lets
# a model pad forever, and is not what models are trained on). A schema's own "x-guidance" wins.
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _json_item(schema: dict) -> str:
    schema = {**schema, "x-guidance": {**_JSON_STYLE, **(schema.get("x-guidance") or {})}}
    return f"%json {json.dumps(schema, ensure_ascii=False)}"


class GrammarMatcher:
    """One row's grammar state: masks, consumption, rollback (a thin layer over llguidance.LLMatcher)."""

    def __init__(self, ll_matcher, vocab_size: int, stop_ids=()):
        self._m = ll_matcher
        self.vocab_size = vocab_size
        self.stop_ids = frozenset(stop_ids)  # the tokenizer's eos ids, as the grammar library knows them
        self.words = (vocab_size + 31) // 32  # int32 words per mask
        if ll_matcher.is_error():
            raise UserError(f"the grammar could not be started: {ll_matcher.get_error()}")

    def fill_mask(self, out: torch.Tensor) -> None:
        """Write the allowed next tokens into out [words] int32 (CPU, contiguous): bit t%32 of word t//32."""
        assert out.dtype == torch.int32 and out.is_contiguous() and not out.is_cuda
        self._m.unsafe_compute_mask_ptr(out.data_ptr(), self.words * 4)

    def consume(self, token_ids: list[int]) -> bool:
        """Advance by accepted tokens; False if one is not allowed (the matcher is then in error)."""
        return self._m.consume_tokens(list(token_ids))

    def rollback(self, n: int) -> None:
        if n > 0 and not self._m.rollback(n):
            raise RuntimeError(f"grammar rollback of {n} tokens failed: {self._m.get_error()}")

    def reset(self) -> None:
        """Back to the start of the grammar (rolls back every consumed token)."""
        self._m.reset()

    def masks_along_drafts(self, drafts: list[int], out: torch.Tensor) -> int:
        """Masks for verifying `drafts`: out[t] (t = 0..len(drafts)) is the mask after drafts[:t]. Stops
        after the first draft the grammar refuses (such a draft has p = 0 and is rejected anyway) and
        after a stop id (the row ends there): later positions keep what `out` held. Leaves the state
        unchanged; returns how many masks it wrote."""
        if not drafts:  # the common case (a row not drafting this step): one mask
            self.fill_mask(out[0])
            return 1
        valid = self._m.validate_tokens(list(drafts))  # consuming a refused token would poison the matcher
        consumed = 0
        for t in range(valid + 1):
            self.fill_mask(out[t])
            if t == valid or drafts[t] in self.stop_ids:  # a consumed stop id cannot be rolled back
                break
            if not self._m.consume_token(drafts[t]):
                raise RuntimeError(f"grammar matcher refused a validated draft: {self._m.get_error()}")
            consumed += 1
        self.rollback(consumed)
        return t + 1

    def validate(self, token_ids: list[int]) -> int:
        """How many of token_ids, in order, the grammar allows from here (the state does not change)."""
        return self._m.validate_tokens(list(token_ids))

    @property
    def is_stopped(self) -> bool:
        """Nothing but a stop id may follow (the grammar is complete and cannot continue)."""
        return self._m.is_stopped()

    @property
    def is_accepting(self) -> bool:
        """The text so far is complete: a stop id is allowed now (more may be too)."""
        return self._m.is_accepting()

    @property
    def error(self) -> str:
        return self._m.get_error() if self._m.is_error() else ""


_EXECUTOR = None


def _executor():
    """llguidance's thread pool for batched masks (one per process; its calls release the GIL)."""
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = _llguidance().LLExecutor()
    return _EXECUTOR


def masks_along_drafts(matchers: list, drafts: list[list[int]], out: torch.Tensor, parallel: bool = False) -> None:
    """Every row's masks for verifying its drafts: out [n, T, words] int32 (CPU, contiguous, T > every
    len(drafts[i])); out[i] as `matchers[i].masks_along_drafts(drafts[i], out[i])` writes it (positions
    it leaves keep what `out` held). parallel: the GrammarMatchers in one call to llguidance's thread
    pool, which releases the GIL (for overlapping the masks with a forward on an accelerator); on a
    CPU that is busy with the forward's threads the pool's threads wait for a core (~0.25-0.5 ms for
    a batch of 8 at a 331-token vocabulary, against ~0.1 ms one row after the other here)."""
    n, T, words = out.shape
    assert out.dtype == torch.int32 and out.is_contiguous() and not out.is_cuda
    plain, drafted = [], []  # llguidance's draft call refuses an empty draft list
    for i, (m, d) in enumerate(zip(matchers, drafts)):
        assert len(d) < T, f"row {i} has {len(d)} drafts and {T} mask positions"
        if not parallel or not isinstance(m, GrammarMatcher):  # tests poison a row with a stand-in
            m.masks_along_drafts(d, out[i])
        elif d:
            drafted.append((m._m, i * T, list(d)))
        else:
            plain.append((m._m, i * T))
    if plain:
        _executor().unsafe_compute_mask_ptr(plain, out.data_ptr(), words * 4, n * T)
    if drafted:
        _executor().unsafe_compute_mask_ptr_with_draft_token(drafted, out.data_ptr(), words * 4, n * T)


_SHIFTS: dict = {}  # device -> arange(32) int32


def bitmask_to_bool(bits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 bitmask [..., words] -> bool [..., vocab_size] (allowed = True)."""
    shifts = _SHIFTS.get(bits.device)
    if shifts is None:
        shifts = _SHIFTS[bits.device] = torch.arange(32, dtype=torch.int32, device=bits.device)
    unpacked = (bits[..., :, None] >> shifts) & 1  # [..., words, 32]
    return unpacked.reshape(*bits.shape[:-1], -1)[..., :vocab_size].bool()


def masked_logits(logits: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """A new fp32 tensor: logits [..., V] where the bitmask [..., words] allows a token, -inf elsewhere."""
    allowed = bitmask_to_bool(bits.to(logits.device), logits.shape[-1])
    return torch.where(allowed, logits.float(), float("-inf"))
