"""The scheduler's rules, on hand-made clusters and on random ones (hypothesis)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ferry.cluster.scheduler import (
    MIB,
    Ledger,
    NodeView,
    Order,
    VMDemand,
    evacuation_order,
    makespan_s,
    observed_bytes_per_s,
    pick_target,
    place,
)


def node(name: str, free_mib: int = 1024, *, vms: int = 0, max_vms: int = 8,
         incoming: int = 0, max_incoming: int = 2, ok: bool = True) -> NodeView:
    return NodeView(name, 4096 * MIB, (4096 - free_mib) * MIB, vms, max_vms, max_incoming,
                    incoming, ok)


def test_place_picks_the_node_with_the_most_memory_left() -> None:
    nodes = [node("a", 512), node("b", 2048), node("c", 1024)]
    assert place(nodes, 256 * MIB) == nodes[1]


def test_never_a_cordoned_noticed_or_dead_node_nor_a_full_one() -> None:
    nodes = [node("a", 4000, ok=False), node("b", 100), node("c", 2000, vms=8)]
    assert place(nodes, 256 * MIB) is None
    assert pick_target(nodes, VMDemand("v", 256 * MIB)) is None


def test_an_evacuation_target_needs_a_free_incoming_slot() -> None:
    nodes = [node("a", 4000, incoming=2), node("b", 300)]
    assert pick_target(nodes, VMDemand("v", 256 * MIB)) == nodes[1]
    assert place(nodes, 256 * MIB) == nodes[0]  # a package run is no migration


def test_excluded_targets_are_skipped() -> None:
    nodes = [node("a", 4000), node("b", 300)]
    assert pick_target(nodes, VMDemand("v", 256 * MIB), exclude={"a"}) == nodes[1]


def test_one_nodes_vms_spread_over_the_targets() -> None:
    nodes = [node("t1", 1024), node("t2", 1024), node("t3", 1024)]
    ledger = Ledger()
    picked = []
    for i in range(3):
        vm = VMDemand(f"v{i}", 256 * MIB)
        t = pick_target(ledger.apply(nodes), vm)
        assert t is not None
        ledger.reserve(vm, t.name)
        picked.append(t.name)
    assert sorted(picked) == ["t1", "t2", "t3"]


def test_largest_first_when_all_fit_smallest_first_when_not() -> None:
    vms = [VMDemand("s", 128 * MIB), VMDemand("l", 1024 * MIB), VMDemand("m", 256 * MIB)]
    order, got = evacuation_order(vms, window_s=60, lanes=2, bytes_per_s=100 * MIB)
    assert order is Order.LARGEST_FIRST
    assert [v.vm for v in got] == ["l", "m", "s"]
    order, got = evacuation_order(vms, window_s=5, lanes=2, bytes_per_s=100 * MIB)
    assert order is Order.SMALLEST_FIRST
    assert [v.vm for v in got] == ["s", "m", "l"]


def test_makespan_is_list_scheduling() -> None:
    assert makespan_s([3, 3, 2, 2, 2], 2) == 7
    assert makespan_s([], 4) == 0


nodes_st = st.lists(
    st.builds(NodeView, name=st.text("abcdefgh", min_size=1, max_size=3),
              memory_bytes=st.integers(0, 16).map(lambda n: n * 256 * MIB),
              memory_used_bytes=st.integers(0, 16).map(lambda n: n * 128 * MIB),
              vms=st.integers(0, 5), max_vms=st.integers(0, 6),
              max_incoming=st.integers(1, 3), incoming=st.integers(0, 3),
              schedulable=st.booleans()),
    max_size=6, unique_by=lambda n: n.name)
vms_st = st.lists(st.integers(1, 8).map(lambda n: n * 128 * MIB), max_size=12)


@settings(max_examples=300, deadline=None)
@given(nodes_st, vms_st)
def test_an_evacuation_plan_never_overcommits_a_target(nodes: list[NodeView],
                                                       sizes: list[int]) -> None:
    """Booking VMs one after another (all in flight at once): every pick is schedulable,
    within memory, VM slots and incoming slots, counting the earlier bookings; and a VM
    is refused only when no node could take it."""
    ledger = Ledger()
    booked: dict[str, list[int]] = {}
    for i, size in enumerate(sizes):
        vm = VMDemand(f"v{i}", size)
        view = ledger.apply(nodes)
        t = pick_target(view, vm)
        if t is None:
            assert not any(n.can_receive(size) for n in view)
            continue
        assert t.schedulable
        ledger.reserve(vm, t.name)
        booked.setdefault(t.name, []).append(size)
    for n in nodes:
        mine = booked.get(n.name, [])
        if mine:
            assert n.schedulable
            assert n.memory_used_bytes + sum(mine) <= n.memory_bytes
            assert n.vms + len(mine) <= n.max_vms
            assert n.incoming + len(mine) <= n.max_incoming


@settings(max_examples=200, deadline=None)
@given(vms_st, st.floats(0, 120), st.integers(1, 4))
def test_the_order_is_a_permutation_sorted_by_memory(sizes: list[int], window: float,
                                                     lanes: int) -> None:
    vms = [VMDemand(f"v{i}", s) for i, s in enumerate(sizes)]
    order, got = evacuation_order(vms, window_s=window, lanes=lanes, bytes_per_s=100 * MIB)
    assert sorted(v.vm for v in got) == sorted(v.vm for v in vms)
    mem = [v.memory_bytes for v in got]
    assert mem == sorted(mem, reverse=order is Order.LARGEST_FIRST)


def test_the_pace_is_the_median_of_past_migrations() -> None:
    assert observed_bytes_per_s([], default=7.0) == 7.0
    assert observed_bytes_per_s([(100, 1.0), (0, 1.0), (100, 0.0)], default=7.0) == 100.0
    assert observed_bytes_per_s([(100, 1.0), (300, 1.0), (10_000, 1.0)],
                                default=7.0) == 300.0
