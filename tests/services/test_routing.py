"""The gateway's routing policies (services.routing), with exact expectations: no
sockets, no clocks, replicas' health and load set by hand."""

from __future__ import annotations

import pytest

from tessera.scheduler.block_hash import extend_block_hashes
from tessera.services.routing import Load, Router, RoutingPolicy, prefix_hashes

B = 4  # block size
SYSTEM = list(range(100, 112))  # three full blocks shared by a "conversation"


def router(n: int = 3, policy: RoutingPolicy = RoutingPolicy.CACHE_AWARE,
           threshold: int = 2) -> Router:
    r = Router(n, policy, block_size=B, load_threshold=threshold)
    for i in range(n):
        r.set_health(i, True)
    return r


def test_prefix_hashes_are_the_schedulers_block_hashes():
    tokens = list(range(1, 40))
    expected: list[bytes] = []
    extend_block_hashes(expected, tokens, B, "tenant")
    assert prefix_hashes(tokens, B, "tenant") == expected
    assert len(expected) == 9  # full blocks only
    assert prefix_hashes(tokens, B, max_blocks=2) == prefix_hashes(tokens[:8], B)


def test_same_prefix_goes_to_the_same_replica():
    r = router()
    first = r.choose(SYSTEM + [1, 2, 3])
    assert first == 0  # nothing matches: the least loaded, lowest index
    r.replicas[0].num_open = 1
    # other prompts spread by load while the first prompt's prefix stays on replica 0
    assert r.choose([7] * 12) == 1
    r.replicas[1].num_open = 1
    assert r.choose(SYSTEM + [9, 9, 9, 9, 5]) == 0
    assert r.choose(SYSTEM[:8] + [42] * 8) == 0  # two of three blocks match still
    assert r.choose([1, 2, 3]) == 2  # no full block: the least loaded


def test_longest_match_wins():
    r = router()
    r.replicas[0].remember(prefix_hashes(SYSTEM[:4], B))  # one block
    r.replicas[1].remember(prefix_hashes(SYSTEM, B))  # all three
    assert r.choose(SYSTEM + [0] * 4) == 1


def test_overload_threshold_sends_it_elsewhere():
    r = router(threshold=2)
    assert r.choose(SYSTEM) == 0
    r.replicas[0].load = Load(num_running=3, num_waiting=0)  # least is 0: 3 > 0 + 2
    assert r.choose(SYSTEM) == 1
    r2 = router(threshold=2)
    assert r2.choose(SYSTEM) == 0
    r2.replicas[0].load = Load(num_running=2)  # 2 > 0 + 2 is false: affinity holds
    assert r2.choose(SYSTEM) == 0
    # the gateway's own open sequences count when above the (stale) report
    r2.replicas[0].num_open = 5
    assert r2.choose(SYSTEM) == 1


def test_dead_replica_is_excluded_and_forgotten():
    r = router()
    assert r.choose(SYSTEM) == 0
    r.set_health(0, False)
    assert r.choose(SYSTEM) == 1  # the prefix's replica is gone
    assert r.choose(SYSTEM) == 1  # and the prefix now lives on replica 1
    r.set_health(0, True)
    assert not r.replicas[0].hashes  # its cache died with it
    assert r.choose(SYSTEM) == 1
    for i in range(3):
        r.set_health(i, False)
    assert r.choose(SYSTEM) is None
    assert r.choose(SYSTEM, exclude=[1]) is None


def test_a_recovering_replica_is_used_only_when_none_serves():
    r = router(2)
    r.set_health(0, False, reachable=True)  # answers, waits for its executor
    assert r.choose(SYSTEM) == 1
    r.set_health(1, False)
    assert r.choose(SYSTEM) == 0
    assert r.choose(SYSTEM, exclude=[0]) is None


def test_salts_route_independently():
    r = router()
    assert r.choose(SYSTEM, cache_salt="a") == 0
    r.replicas[0].num_open = 1
    # the same tokens under another salt share no block: the least loaded
    assert r.choose(SYSTEM, cache_salt="b") == 1
    r.replicas[1].num_open = 1
    assert r.choose(SYSTEM) == 2  # nor does the unsalted namespace
    r.replicas[2].num_open = 1
    assert [r.choose(SYSTEM, cache_salt=s) for s in ("a", "b", "")] == [0, 1, 2]


def test_least_loaded_counts_sequences_then_waiting_tokens():
    r = router(3, RoutingPolicy.LEAST_LOADED)
    r.replicas[0].load = Load(num_running=2, num_waiting=0, num_waiting_tokens=0)
    r.replicas[1].load = Load(num_running=1, num_waiting=1, num_waiting_tokens=500)
    r.replicas[2].load = Load(num_running=1, num_waiting=1, num_waiting_tokens=20)
    assert r.choose(SYSTEM) == 0  # the same sequences; no tokens waiting
    r.replicas[0].num_open = 3
    assert r.choose(SYSTEM) == 2
    assert r.choose(SYSTEM) == 2  # least_loaded keeps no affinity of its own


def test_round_robin_takes_serving_replicas_in_turn():
    r = router(3, RoutingPolicy.ROUND_ROBIN)
    assert [r.choose(SYSTEM) for _ in range(4)] == [0, 1, 2, 0]
    r.set_health(1, False)
    assert [r.choose(SYSTEM) for _ in range(4)] == [0, 2, 0, 2]


def test_the_table_keeps_at_most_capacity_hashes_lru():
    r = router(2)
    r.replicas[0].capacity = 3
    a, b = [1] * 8, [2] * 8  # two blocks each
    assert r.choose(a) == 0
    r.replicas[1].num_open = 5  # keep unmatched prompts on replica 0
    assert r.choose(b) == 0
    assert len(r.replicas[0].hashes) == 3  # a's first block went first
    assert r.replicas[0].matched_blocks(prefix_hashes(b, B)) == 2
    assert r.replicas[0].matched_blocks(prefix_hashes(a, B)) == 0  # chain broken at its root


def test_policy_names():
    assert RoutingPolicy.parse("least_loaded") is RoutingPolicy.LEAST_LOADED
    with pytest.raises(ValueError, match="cache_aware, least_loaded, round_robin"):
        RoutingPolicy.parse("random")
