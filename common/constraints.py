"""Structured-output constraints: what a request's output must match, and the check that
turns a bad one into a client error before the request reaches the engine.

A ``Constraint`` is one of: a JSON schema (as JSON text), any JSON object, a regular
expression, a choice among strings, or a grammar (Lark, or GBNF/EBNF as llama.cpp
writes it). It travels as it was given (never as a compiled form) in the request, the
step plan and their protobufs; whoever needs the compiled form derives it here.

The engine behind it is llguidance (``to_grammar`` and ``check``), kept to this module
and ``executor/grammar.py``. Why llguidance rather than xgrammar: it imports no torch, so
the gateway (torch-free by rule) can compile and check a constraint itself, with the
same library that enforces it; it has no ahead-of-time token-mask compile (masks are
computed lazily per step under a fuel limit), so there is no compile step a hostile
schema can stall; and it needs no transformers at run time.

Limits, so that a hostile constraint is a fast client error, never a stalled server:

- ``MAX_CONSTRAINT_BYTES`` on the constraint's text (a 1 MB schema is refused unread);
- ``MAX_JSON_DEPTH`` on a schema's nesting, checked without recursion;
- ``COMPILE_TIMEOUT_S`` on the compile-and-check, which runs in a worker thread (the
  library drops the GIL) so a caller never waits past it; llguidance's own parser limits
  bound the work per step afterwards.

Checked results are cached (LRU, keyed by the constraint), errors included.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
MAX_CONSTRAINT_BYTES = 64 * 1024
MAX_JSON_DEPTH = 64
MAX_CHOICES = 1024
COMPILE_TIMEOUT_S = 5.0
CACHE_SIZE = 512

ANY_JSON_OBJECT = '{"type": "object"}'
# JSON is written without free whitespace (one space after ':' and ','): a small model let
# free would loop on newlines until max_tokens, and every output stays parseable anyway.
JSON_OPTIONS = {"whitespace_flexible": False}


@dataclass(slots=True, frozen=True)
class Constraint:
    """What the output must match. ``spec``: the schema's JSON text (json_schema), empty
    (json_object), the regex, the grammar's text, or for ``choice`` a JSON list of the
    strings (so that every kind is one string on every wire)."""

    kind: str
    spec: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(
                f"constraint kind must be one of {', '.join(KINDS)}, got {self.kind!r}"
            )

    @staticmethod
    def choice(options: list[str] | tuple[str, ...]) -> Constraint:
        if not options or not all(isinstance(o, str) for o in options):
            raise ValueError("choice must be a non-empty list of strings")
        if len(options) > MAX_CHOICES:
            raise ValueError(f"choice takes at most {MAX_CHOICES} strings, got {len(options)}")
        return Constraint("choice", json.dumps(list(options)))

    @staticmethod
    def json_schema(schema: str | dict) -> Constraint:
        return Constraint("json_schema", schema if isinstance(schema, str) else json.dumps(schema))


class ConstraintError(ValueError):
    """The constraint is invalid, too large, or too slow to compile: the client's error."""


def _json_depth(value: object) -> int:
    """Nesting depth of a parsed JSON value, iteratively (a deep one must not recurse)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > MAX_JSON_DEPTH:
            return depth
        children = item.values() if isinstance(item, dict) else item
        if not isinstance(item, dict | list):
            children = ()
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _parse_schema(text: str) -> object:
    try:
        schema = json.loads(text)
    except RecursionError as e:
        raise ConstraintError(f"json_schema nests deeper than {MAX_JSON_DEPTH} levels") from e
    except ValueError as e:
        raise ConstraintError(f"json_schema is not valid JSON: {e}") from e
    if not isinstance(schema, dict | bool):
        raise ConstraintError("json_schema must be a JSON object")
    if _json_depth(schema) > MAX_JSON_DEPTH:
        raise ConstraintError(f"json_schema nests deeper than {MAX_JSON_DEPTH} levels")
    return schema


def to_grammar(constraint: Constraint) -> str:
    """The llguidance grammar (its JSON form) of ``constraint``; ConstraintError if the
    text cannot be read. Cheap: the grammar is only translated, not checked."""
    import llguidance

    size = len(constraint.spec.encode())
    if size > MAX_CONSTRAINT_BYTES:
        raise ConstraintError(
            f"{constraint.kind} is {size} bytes; at most {MAX_CONSTRAINT_BYTES} are accepted"
        )
    kind, spec = constraint.kind, constraint.spec
    try:
        if kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema(ANY_JSON_OBJECT, JSON_OPTIONS)
        if kind == "json_schema":
            _parse_schema(spec)
            return llguidance.LLMatcher.grammar_from_json_schema(spec, JSON_OPTIONS)
        if kind == "choice":
            options = json.loads(spec)
            if not isinstance(options, list) or not options:
                raise ConstraintError("choice must be a non-empty list of strings")
            Constraint.choice(options)  # the same checks as a caller's
            return llguidance.grammar_from("choice", options)
        if kind == "regex":
            if not spec:
                raise ConstraintError("regex must not be empty")
            return llguidance.grammar_from("regex", spec)
        if not spec.strip():
            raise ConstraintError("grammar must not be empty")
        return llguidance.grammar_from("grammar", spec)
    except ConstraintError:
        raise
    except (ValueError, TypeError, RecursionError) as e:
        raise ConstraintError(f"invalid {kind}: {e}") from e


def _compile_and_check(constraint: Constraint) -> str:
    import llguidance

    grammar = to_grammar(constraint)
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise ConstraintError(f"invalid {constraint.kind}: {error.strip()}")
    return grammar


class ConstraintChecker:
    """Compiles and checks constraints off the caller's thread, with a time limit and an
    LRU cache of results (a grammar's text, or its ConstraintError)."""

    def __init__(
        self, timeout_s: float = COMPILE_TIMEOUT_S, cache_size: int = CACHE_SIZE, workers: int = 2
    ) -> None:
        self.timeout_s = timeout_s
        self.cache_size = cache_size
        self._cache: OrderedDict[Constraint, str | ConstraintError] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="constraint")

    def check(self, constraint: Constraint) -> str:
        """The constraint's grammar; ConstraintError if it is invalid, too large, or its
        check outlives the time limit (the worker finishes on its own; its result is
        then cached, so a retry answers at once)."""
        with self._lock:
            cached = self._cache.get(constraint)
            if cached is not None:
                self._cache.move_to_end(constraint)
        if cached is None:
            future = self._pool.submit(self._run, constraint)
            try:
                cached = future.result(timeout=self.timeout_s)
            except FutureTimeout:
                raise ConstraintError(
                    f"{constraint.kind} took longer than {self.timeout_s:g} s to compile"
                ) from None
        if isinstance(cached, ConstraintError):
            raise cached
        return cached

    def _run(self, constraint: Constraint) -> str | ConstraintError:
        try:
            result: str | ConstraintError = _compile_and_check(constraint)
        except ConstraintError as e:
            result = e
        with self._lock:
            self._cache[constraint] = result
            self._cache.move_to_end(constraint)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return result

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


_default: ConstraintChecker | None = None
_default_lock = threading.Lock()


def check(constraint: Constraint) -> str:
    """``ConstraintChecker.check`` on the process's shared checker."""
    global _default
    with _default_lock:
        if _default is None:
            _default = ConstraintChecker()
    return _default.check(constraint)
