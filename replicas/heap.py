"""Keeping Python's cyclic garbage collector off a serving process's long-lived objects.

A Serve replica holds hundreds of thousands of objects from start-up on (the model's modules,
the tokenizer, Ray's and Serve's own state): 446,000 in a SmolLM2 replica. Python's oldest
generation is collected when enough objects have survived the younger ones, and a
full collection walks every tracked object: measured at 157 ms in a replica's event-loop
thread under load (`bench/serve_vs_vllm.py`, AMX box), during which neither the loop nor the
engine thread (they share the GIL) makes progress: one request's TTFT or one inter-token gap
gets it all. Moving what exists after start-up into the permanent generation
(``gc.freeze()``) leaves later full collections the objects made since: the same collection
then took 0.5 ms. Reference counting still frees frozen objects that become garbage; only
cycles among them wait. vLLM freezes its engine process's start-up heap for the same reason.

Only for processes kvmesh owns (Serve replicas, the ingress): an offline ``LLM`` lives in the
user's process, whose heap is not ours to freeze.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """Collect what start-up left as garbage, then freeze the rest; returns how many objects
    were frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
