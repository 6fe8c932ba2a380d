"""A serving process's start-up heap leaves the cyclic collector's reach (``replicas/heap.py``)."""

from __future__ import annotations

import gc
import weakref

from kvmesh.replicas.heap import freeze_startup_heap


def test_startup_objects_are_frozen_and_later_ones_are_not():
    startup = [object() for _ in range(3)]  # a container the collector tracks
    try:
        frozen = freeze_startup_heap()
        assert frozen == gc.get_freeze_count() > 0
        later = [object()]
        tracked = {id(o) for o in gc.get_objects()}
        assert id(startup) not in tracked  # a full collection no longer walks it
        assert id(later) in tracked
    finally:
        gc.unfreeze()  # the test process's heap is not a replica's


def test_garbage_left_by_startup_is_collected_not_frozen():
    class Cycle:
        pass

    a, b = Cycle(), Cycle()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    del a, b
    try:
        freeze_startup_heap()
        assert gone() is None  # freed before the freeze, not kept forever by it
    finally:
        gc.unfreeze()
