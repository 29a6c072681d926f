"""Hypothesis state machine: random acquire / retain / release / slice-and-hold / drop-view /
leak (drop a lease unreleased) sequences against a model.  Invariants: no two live owners
share a slot, every owner's bytes stay its own, stats add up (leaks included), and in_use
returns to 0."""

from __future__ import annotations

import gc

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, precondition, rule

import bufpool
from bufpool import BufferPool, LeakWarning, Lease, PoolExhausted


class PoolMachine(RuleBasedStateMachine):
    leases = Bundle("leases")

    def __init__(self) -> None:
        super().__init__()
        self.pool = BufferPool(
            classes=(16, 64, 256),
            initial_slots=1,
            max_bytes=6 * 256,
            on_exhausted="spill",
            leak_detection="paranoid",  # leaked leases warn, with their site
        )
        self.live: dict[int, tuple[Lease, int, bytes]] = {}  # key -> (lease, refs, stamp)
        self.held: list[tuple[memoryview, bytes]] = []  # stale views and the bytes they saw
        self.counter = 0
        self.next_key = 0
        self.exhausted = 0
        self.leaked = 0

    @rule(target=leases, size=st.integers(0, 300))
    def acquire(self, size: int) -> int:
        try:
            lease = self.pool.acquire(size)
        except PoolExhausted:  # "spill" found no slot in this class or a larger one
            self.exhausted += 1
            return -1
        self.counter = (self.counter + 1) % 251
        stamp = bytes([self.counter]) * size
        lease.view[:] = stamp
        self.next_key += 1
        self.live[self.next_key] = (lease, 1, stamp)
        return self.next_key

    @rule(key=leases)
    def retain(self, key: int) -> None:
        if key in self.live:
            lease, refs, stamp = self.live[key]
            lease.retain()
            self.live[key] = (lease, refs + 1, stamp)

    @rule(key=leases)
    def release(self, key: int) -> None:
        if key in self.live:
            lease, refs, stamp = self.live[key]
            lease.release()
            if refs == 1:
                del self.live[key]
            else:
                self.live[key] = (lease, refs - 1, stamp)

    @rule(key=leases, data=st.data())
    def slice_and_hold(self, key: int, data: st.DataObject) -> None:
        if key in self.live:
            lease, _, stamp = self.live[key]
            a = data.draw(st.integers(0, len(stamp)))
            b = data.draw(st.integers(a, len(stamp)))
            self.held.append((lease.view[a:b], stamp[a:b]))

    @rule(key=leases)
    def leak(self, key: int) -> None:
        """Drop every reference to a live lease without releasing it (retained or not)."""
        if key in self.live:
            lease, _, _ = self.live.pop(key)
            size = len(lease)
            del lease  # finalized now (no cycle): queued as a leak
            with pytest.warns(LeakWarning, match=f"a {size}-byte lease was garbage-collected"):
                assert bufpool.report_leaks() == 1
            self.leaked += 1

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def drop_view(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(self.held) - 1))
        self.held.pop(i)

    @rule()
    def reclaim(self) -> None:
        self.pool.reclaim()

    @invariant()
    def owners_keep_their_bytes(self) -> None:
        for lease, _, stamp in self.live.values():
            assert lease.tobytes() == stamp
        for view, seen in self.held:
            assert bytes(view) == seen  # a held view never sees a new owner's bytes

    @invariant()
    def no_two_owners_share_a_slot(self) -> None:
        slots = [id(lease.view.obj) for lease, _, _ in self.live.values() if lease.pooled]
        assert len(slots) == len(set(slots))

    @invariant()
    def stats_add_up(self) -> None:
        s = self.pool.stats()
        pooled = sum(1 for lease, _, _ in self.live.values() if lease.pooled)
        assert s.in_use == pooled
        assert s.heap_in_use == len(self.live) - pooled
        assert s.leaked == self.leaked
        for t in s.tiers:
            assert t.slots == t.free + t.in_use + t.quarantined
        assert s.reserved_bytes == sum(t.slots * t.slot_size for t in s.tiers)
        assert s.reserved_bytes <= s.max_bytes

    def teardown(self) -> None:
        for lease, refs, _ in list(self.live.values()):
            for _ in range(refs):
                lease.release()
        self.live.clear()
        self.held.clear()
        gc.collect()
        self.pool.reclaim()
        s = self.pool.stats()
        assert s.in_use == 0 and s.heap_in_use == 0 and s.quarantined == 0


PoolMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestPoolMachine = PoolMachine.TestCase
