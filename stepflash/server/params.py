"""Request fields -> the engine's per-row SamplingParams, validated before a row enters the engine.

A feature the engine cannot provide is refused with a 400 naming the field, never silently ignored.
What the engine provides is read from the fields of its SamplingParams class, so when the engine gains
a field (the wiring of issue #12, see docs/server.md) the server passes it on with no change here:

    request field(s)                              SamplingParams field   value
    presence_penalty, frequency_penalty,          same names             floats (vLLM's meaning)
      repetition_penalty, min_tokens
    logit_bias                                    logit_bias             {token id: bias}
    tool_choice "none"                            banned_token_ids       (<tool_call> id,) - best effort
    ignore_eos                                    ignore_eos             bool: eos ids do not stop the row
    logprobs / top_logprobs (chat),               logprobs               None, or k >= 0 alternatives
      logprobs (completions)
    response_format json_*, tool_choice           grammar                a `structured.GrammarMatcher`,
      "required" / named                                                 one per row
    (server setting --logprobs-mode)              logprobs_mode          "raw" (vLLM's default) / "processed"

Values the engine cannot represent are mapped or refused here: a temperature in (0, 0.01) becomes
0.01 (vLLM's `_MAX_TEMP`: smaller ones overflow fp32 logits), top_k -1 or >= the vocabulary means off,
seeds are wrapped into [0, 2**63); the engine's own `SamplingParams.check` runs before submission.
"""

from __future__ import annotations

import dataclasses
import inspect
import threading
from typing import Any

from stepflash.chat import CALL_START
from stepflash.errors import UserError
from stepflash.inference.stop_strings import choice_seeds
from stepflash.server.errors import APIError
from stepflash.server.protocol import ChatCompletionRequest, SamplingFields

MIN_TEMPERATURE = 0.01

# SamplingParams field -> (default meaning "off", request field named in errors)
OPTIONAL_FEATURES = {
    "presence_penalty": (0.0, "presence_penalty"),
    "frequency_penalty": (0.0, "frequency_penalty"),
    "repetition_penalty": (1.0, "repetition_penalty"),
    "min_tokens": (0, "min_tokens"),
    "logit_bias": ({}, "logit_bias"),
    "ignore_eos": (False, "ignore_eos"),
    "logprobs": (None, "logprobs"),
}


def param_name(forced_tools: bool) -> str:
    return "tool_choice" if forced_tools else "response_format"


def engine_fields(make_params) -> set[str]:
    if dataclasses.is_dataclass(make_params):
        return {f.name for f in dataclasses.fields(make_params)}
    return set(inspect.signature(make_params).parameters)


class ParamsBuilder:
    def __init__(self, make_params, tokenizer, vocab_size: int, eos_ids: list[int], speculative_tokens: int = 0,
                 logprobs_mode: str = "raw"):
        self.make_params = make_params
        self.fields = engine_fields(make_params)
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.eos_ids = list(eos_ids)
        self.speculative_tokens = speculative_tokens
        self.logprobs_mode = logprobs_mode
        self._compiler = None
        self._lock = threading.Lock()

    def grammar_compiler(self):
        """Built on first use (about a second at a 128k vocabulary), in a request worker thread."""
        with self._lock:
            if self._compiler is None:
                from stepflash.inference.structured import GrammarCompiler

                self._compiler = GrammarCompiler(self.tokenizer, self.vocab_size, self.eos_ids)
            return self._compiler

    def stop_ids(self, req: SamplingFields) -> list[int]:
        """The ids that end a row: the request's own, plus eos / end of turn unless ignore_eos."""
        return sorted(set(req.stop_ids()) | (set() if req.ignore_eos else set(self.eos_ids)))

    def grammar(self, req: SamplingFields, tools: list[dict] | None, reasoning: bool):
        """The request's constraint as a compiled grammar, or None."""
        forced = isinstance(req, ChatCompletionRequest) and (req.tool_choice == "required" or req.forced_function())
        fmt = req.response_format.type if req.response_format else "text"
        if not forced and fmt == "text":
            return None
        if req.ignore_eos:  # a complete grammar allows only the stop ids, which ignore_eos would not stop on
            raise APIError(400, f"ignore_eos: cannot be combined with a constraining {param_name(forced)}",
                           param="ignore_eos")
        param = param_name(forced)
        if "grammar" not in self.fields:
            raise APIError(400, f"{param}: constrained decoding is not supported by this server's engine yet",
                           param=param, code="unsupported_parameter")
        try:
            compiler = self.grammar_compiler()
            if forced:
                return compiler.tool_calls(tools or [], name=req.forced_function(), parallel=req.parallel_tool_calls,
                                           reasoning=reasoning)
            if fmt == "json_object":
                return compiler.json_object(reasoning=reasoning)
            return compiler.json_schema(req.response_format.json_schema.schema_, reasoning=reasoning)
        except UserError as e:
            raise APIError(400, f"{param}: {e}", param=param) from None

    def build(self, req: SamplingFields, max_tokens: int, stop_ids: list[int], grammar=None) -> list[Any]:
        """The SamplingParams of the request's n rows (choice j samples with seed + j)."""
        extras = {"presence_penalty": req.presence_penalty, "frequency_penalty": req.frequency_penalty,
                  "repetition_penalty": req.repetition_penalty, "min_tokens": req.min_tokens,
                  "logit_bias": req.bias(), "ignore_eos": req.ignore_eos, "logprobs": req.top_logprobs_wanted()}
        for name, value in extras.items():
            default, param = OPTIONAL_FEATURES[name]
            if value != default and name not in self.fields:
                raise APIError(400, f"{param}: not supported by this server's engine yet", param=param,
                               code="unsupported_parameter")
        bad = [t for t in extras["logit_bias"] if t >= self.vocab_size]
        if bad:
            raise APIError(400, f"logit_bias: token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})",
                           param="logit_bias")
        kwargs = {k: v for k, v in extras.items() if k in self.fields and v != OPTIONAL_FEATURES[k][0]}
        if isinstance(req, ChatCompletionRequest) and req.tool_choice == "none" and "banned_token_ids" in self.fields:
            call_id = self.tokenizer.token_to_id(CALL_START)
            kwargs["banned_token_ids"] = () if call_id is None else (call_id,)
        if kwargs.get("logprobs") is not None and "logprobs_mode" in self.fields:
            kwargs["logprobs_mode"] = self.logprobs_mode
        temperature = 1.0 if req.temperature is None else req.temperature
        top_k = req.top_k or 0
        base = dict(max_new_tokens=max_tokens, temperature=MIN_TEMPERATURE if 0 < temperature < MIN_TEMPERATURE
                    else temperature, top_p=1.0 if req.top_p is None else req.top_p,
                    top_k=0 if top_k < 0 or top_k >= self.vocab_size else top_k, stop_token_ids=tuple(stop_ids),
                    speculative_tokens=self.speculative_tokens)
        rows = []
        for seed in choice_seeds(req.seed, req.n):
            row = dict(base, seed=seed, **kwargs)
            if grammar is not None:
                row["grammar"] = self.grammar_compiler().matcher(grammar)
            params = self.make_params(**row)
            self._engine_check(params)
            rows.append(params)
        return rows

    def _engine_check(self, params) -> None:
        check = getattr(params, "check", None)
        if check is None:
            return
        try:
            check(self.speculative_tokens, self.vocab_size)
        except UserError as e:  # the engine's own limits: refuse here, before the row enters the engine
            raise APIError(400, str(e)) from None
