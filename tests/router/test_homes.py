"""The prefix-home memory: which replica each block key was last routed to."""

from __future__ import annotations

import pytest

from kvmesh.router.routing.homes import PrefixHomes

K = [bytes([i]) for i in range(10)]


def test_a_prompt_is_home_where_its_blocks_were_last_sent():
    homes = PrefixHomes(max_blocks=100)
    assert homes.home_blocks(K[:4]) == {}
    homes.record("a", K[:4])
    assert homes.home_blocks(K[:6]) == {"a": 4}  # the walk stops at the first unknown block
    # A later turn of the conversation went to "b": the shared start moves with it.
    homes.record("b", K[:6])
    assert homes.home_blocks(K[:6]) == {"b": 6}
    # Another conversation of the tenant (same first 2 blocks) went back to "a".
    homes.record("a", K[:2])
    assert homes.home_blocks(K[:6]) == {"a": 2, "b": 6}


def test_least_recently_routed_blocks_are_forgotten_first():
    homes = PrefixHomes(max_blocks=4)
    homes.record("a", K[:3])
    homes.record("b", K[5:7])  # 5 keys: K[0] goes
    assert len(homes) == 4
    assert homes.home_blocks(K[:3]) == {}
    assert homes.home_blocks(K[1:3]) == {"a": 2}
    homes.record("a", K[1:2])  # refreshed: K[2] is now the oldest
    homes.record("c", K[8:9])
    assert homes.home_blocks(K[1:3]) == {"a": 1}


def test_a_replica_that_left_is_home_to_nothing():
    homes = PrefixHomes(max_blocks=100)
    homes.record("a", K[:3])
    homes.record("b", K[3:5])
    homes.forget_replica("a")
    assert homes.home_blocks(K[:5]) == {}
    assert homes.home_blocks(K[3:5]) == {"b": 2}
    with pytest.raises(ValueError, match="max_blocks"):
        PrefixHomes(0)
