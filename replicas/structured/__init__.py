"""Structured output: grammars (JSON schema, regex, choice, EBNF) enforced while decoding.

``params`` says what a request asks for; ``grammar`` compiles it (once per spec, cached, off
the engine thread when the caller can wait) into a per-request matcher; ``bitmask`` applies
the matchers' allowed-token masks to the logits of the constrained rows only.
"""

from kvmesh.replicas.structured.grammar import GrammarError, StructuredOutputCompiler
from kvmesh.replicas.structured.params import StructuredOutputsParams

__all__ = ["GrammarError", "StructuredOutputCompiler", "StructuredOutputsParams"]
