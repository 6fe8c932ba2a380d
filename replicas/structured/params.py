"""What a request's output must follow, named as vLLM names it (``structured_outputs``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

MAX_CHOICES = 1024
MAX_SPEC_CHARS = 256 * 1024
"""A schema, regex or grammar larger than this is refused before it is compiled."""


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Exactly one of ``json`` (a JSON schema, as a dict or its JSON text), ``regex``,
    ``choice`` (the output is one of these strings), ``grammar`` (EBNF, GBNF-style) or
    ``json_object`` (any JSON object)."""

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: tuple[str, ...] | list[str] | None = None
    grammar: str | None = None
    json_object: bool = False
    disable_any_whitespace: bool = False
    """Compact JSON (``{"a":1}``) instead of the default layout (``{"a": 1}``); neither lets
    free whitespace in between tokens."""

    def __post_init__(self) -> None:
        given = [
            name
            for name in ("json", "regex", "choice", "grammar")
            if getattr(self, name) is not None
        ] + (["json_object"] if self.json_object else [])
        if len(given) != 1:
            raise ValueError(
                "structured_outputs needs exactly one of json, regex, choice, grammar or "
                f"json_object, got {given or 'none'}"
            )
        if self.choice is not None:
            choices = tuple(self.choice)
            if not choices or len(choices) > MAX_CHOICES:
                raise ValueError(f"choice needs 1 to {MAX_CHOICES} strings, got {len(choices)}")
            if not all(isinstance(c, str) and c for c in choices):
                raise ValueError("choice must be a list of non-empty strings")
            object.__setattr__(self, "choice", choices)
        if isinstance(self.json, str):
            try:
                parsed = json.loads(self.json)
            except ValueError as exc:
                raise ValueError(f"json: the schema is not valid JSON ({exc})") from None
            object.__setattr__(self, "json", parsed)
        if self.json is not None and not isinstance(self.json, dict | bool):
            raise ValueError("json: a JSON schema must be an object")
        if len(self.key()[1]) > MAX_SPEC_CHARS:
            raise ValueError(f"structured_outputs: the {given[0]} is over {MAX_SPEC_CHARS} chars")

    @property
    def kind(self) -> str:
        if self.json is not None:
            return "json"
        if self.regex is not None:
            return "regex"
        if self.choice is not None:
            return "choice"
        if self.grammar is not None:
            return "grammar"
        return "json_object"

    def key(self) -> tuple[str, str, bool]:
        """A canonical, hashable name of this spec: the compiled-grammar cache's key."""
        kind = self.kind
        if kind == "json":
            text = json.dumps(self.json, sort_keys=True, separators=(",", ":"))
        elif kind == "choice":
            text = json.dumps(self.choice, ensure_ascii=False)
        elif kind == "json_object":
            text = ""
        else:
            text = getattr(self, kind)
        return kind, text, self.disable_any_whitespace

    def __hash__(self) -> int:
        return hash(self.key())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StructuredOutputsParams) and self.key() == other.key()
