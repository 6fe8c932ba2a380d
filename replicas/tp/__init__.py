"""Tensor parallelism: one model replica spread over several ranks.

The engine's process is rank 0: it schedules, runs its own model shard, and samples. Ranks
1..N-1 are Ray actors (``worker.py``) that wait for each step's inputs, broadcast as one packed
integer tensor (``messages.py``), and take part in the model's all-reduces (``comm.py``). The
sharded layers live in ``layers.py``; ``tp_engine.py`` holds ``TPEngine``, a drop-in ``LLMEngine``.
Importing this package does not import Ray; only starting workers does.
"""
