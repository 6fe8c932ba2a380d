"""The offline API: ``LLM(...).generate(prompts, params)``, as vLLM users know it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvmesh.replicas.engine_args import EngineArgs
from kvmesh.replicas.llm_engine import LLMEngine, Prompt
from kvmesh.replicas.outputs import RequestOutput
from kvmesh.replicas.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        from kvmesh.replicas.async_engine import build_engine

        self.engine: LLMEngine = build_engine(EngineArgs(model=model, **kwargs))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in the prompts' order."""
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        params = self._params_list(sampling_params, len(prompts))
        # Check everything first so a bad prompt leaves nothing half-submitted.
        inputs = self.engine.input_processor
        tokenized = [inputs.tokenize(p) for p in prompts]
        self._validate(tokenized, params)
        return self._run(tokenized, params)

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (or a list of them), offering
        ``tools`` (OpenAI's shape) to the model; ``kvmesh.replicas.tool_calls.parse`` finds
        the calls in the output."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        params = self._params_list(sampling_params, len(conversations))
        inputs = self.engine.input_processor
        tokenized = [(None, inputs.encode_chat(c, tools)[1]) for c in conversations]
        self._validate(tokenized, params)
        return self._run(tokenized, params)

    def _validate(self, tokenized, params: list[SamplingParams]) -> None:
        """Check every request (and compile its grammar) before any is submitted."""
        for (_, ids), sp in zip(tokenized, params, strict=True):
            self.engine.input_processor.validate(ids, sp)
            if sp.structured_outputs is not None:
                self.engine.structured.compile(sp.structured_outputs)

    def stats(self) -> dict[str, Any]:
        return self.engine.stats()

    def shutdown(self) -> None:
        """Release tensor-parallel workers now (they also go when the LLM is collected)."""
        self.engine.shutdown()

    @staticmethod
    def _params_list(sp, n: int) -> list[SamplingParams]:
        if sp is None:
            return [SamplingParams()] * n
        if isinstance(sp, SamplingParams):
            return [sp] * n
        if len(sp) != n:
            raise ValueError(f"got {len(sp)} sampling_params for {n} prompts")
        return list(sp)

    def _run(self, tokenized, params) -> list[RequestOutput]:
        ids = []
        for (text, token_ids), sp in zip(tokenized, params, strict=True):
            ids.append(self.engine.add_request(text, sp, prompt_token_ids=token_ids))
        done: dict[str, RequestOutput] = {}
        try:
            while len(done) < len(ids):
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                if not self.engine.has_unfinished_requests() and len(done) < len(ids):
                    raise RuntimeError("engine went idle with requests unfinished")
        except BaseException:
            for rid in ids:
                if rid not in done:
                    self.engine.abort_request(rid)
            raise
        return [done[i] for i in ids]
