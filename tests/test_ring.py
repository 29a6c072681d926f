"""RingBuffer: byte-exact behaviour against a bytearray model, wrap-around, growth, limits,
stale-view detection and pool accounting."""

from __future__ import annotations

import gc
import pickle

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import bufpool
from bufpool import BufferFull, BufferPool, RingBuffer


def wrapped_ring(capacity: int = 16, pool: BufferPool | None = None) -> RingBuffer:
    """A ring whose readable bytes straddle the end of its storage: b'0123456789'."""
    ring = RingBuffer(capacity, max_capacity=capacity, pool=pool)
    ring.write(b"x" * (capacity - 4) + b"0123")
    ring.consume(capacity - 4)
    ring.write(b"456789")
    assert len(ring.readable_views()) == 2
    return ring


class RingModel(RuleBasedStateMachine):
    """Every operation is mirrored on a bytearray; every byte is compared."""

    use_pool = False

    @initialize(
        capacity=st.sampled_from([1, 7, 16, 64, 100]),
        factor=st.sampled_from([1, 2, 4, 16]),
    )
    def setup(self, capacity: int, factor: int) -> None:
        self.pool = BufferPool(initial_slots=1) if self.use_pool else None
        self.ring = RingBuffer(capacity, max_capacity=capacity * factor, pool=self.pool)
        self.model = bytearray()
        self.counter = 0

    def fresh(self, n: int) -> bytes:
        out = bytes((self.counter + i) % 251 for i in range(n))
        self.counter += n
        return out

    @rule(n=st.integers(0, 300))
    def write(self, n: int) -> None:
        data = self.fresh(n)
        if len(self.model) + n > self.ring.max_capacity:
            with pytest.raises(BufferFull, match="max_capacity"):
                self.ring.write(data)
        else:
            self.ring.write(data)
            self.model += data

    @rule(fill=st.integers(0, 200), hint=st.sampled_from([-1, 0, 1, 65536]))
    def receive(self, fill: int, hint: int) -> None:
        if len(self.model) == self.ring.max_capacity:
            with pytest.raises(BufferFull, match="max_capacity"):
                self.ring.get_buffer(hint)
            return
        mv = self.ring.get_buffer(hint)
        assert len(mv) >= 1
        n = min(fill, len(mv))
        data = self.fresh(n)
        mv[:n] = data
        del mv
        self.ring.buffer_updated(n)
        self.model += data

    @rule(data=st.data())
    def receive_vectored(self, data: st.DataObject) -> None:
        if len(self.model) == self.ring.max_capacity:
            return
        views = self.ring.writable_views()
        assert 1 <= len(views) <= 2
        total = sum(len(v) for v in views)
        assert total == self.ring.free
        n = data.draw(st.integers(0, total))
        payload = self.fresh(n)
        pos = 0
        for v in views:
            k = min(len(v), n - pos)
            v[:k] = payload[pos : pos + k]
            pos += k
        del views
        self.ring.buffer_updated(n)
        self.model += payload

    @rule(data=st.data())
    def peek(self, data: st.DataObject) -> None:
        n = data.draw(st.integers(0, len(self.model)))
        copies = self.ring.copies
        view = self.ring.peek(n)
        assert bytes(view) == self.model[:n]
        if self.ring.copies > copies:
            assert self.ring.bytes_copied >= n

    @rule(data=st.data())
    def consume(self, data: st.DataObject) -> None:
        n = data.draw(st.integers(0, len(self.model)))
        self.ring.consume(n)
        del self.model[:n]

    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        n = data.draw(st.integers(0, len(self.model)))
        assert self.ring.read(n) == self.model[:n]
        del self.model[:n]

    @rule(size=st.integers(0, 120))
    def readinto(self, size: int) -> None:
        buf = bytearray(b"\xff" * size)
        got = self.ring.readinto(buf)
        assert got == min(size, len(self.model))
        assert buf[:got] == self.model[:got]
        assert buf[got:] == b"\xff" * (size - got)
        del self.model[:got]

    @rule(length_size=st.sampled_from([1, 2]), at=st.integers(0, 2))
    def peek_frame(self, length_size: int, at: int) -> None:
        header = at + length_size + 1
        model = self.model
        if len(model) < header:
            assert self.ring.peek_frame(header, at, length_size) is None
            return
        total = header + int.from_bytes(model[at : at + length_size], "big")
        if total > self.ring.max_capacity:
            with pytest.raises(BufferFull, match="exceeds max_capacity"):
                self.ring.peek_frame(header, at, length_size)
        elif total > len(model):
            assert self.ring.peek_frame(header, at, length_size) is None
        else:
            view = self.ring.peek_frame(header, at, length_size)
            assert view is not None and bytes(view) == model[:total]

    @precondition(lambda self: len(self.model) > 0)
    @rule(data=st.data())
    def find_existing(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(self.model) - 1))
        j = data.draw(st.integers(i, min(len(self.model), i + 8)))
        sub = bytes(self.model[i:j])
        start = data.draw(st.integers(-5, len(self.model) + 2))
        end = data.draw(st.none() | st.integers(-5, len(self.model) + 2))
        assert self.ring.find(sub, start, end) == self.model.find(sub, start, end)

    @rule(sub=st.binary(max_size=3), start=st.integers(-3, 400))
    def find_any(self, sub: bytes, start: int) -> None:
        assert self.ring.find(sub, start) == self.model.find(sub, start)

    @invariant()
    def same_bytes(self) -> None:
        ring = self.ring
        assert len(ring) == len(self.model)
        assert b"".join(ring.readable_views()) == self.model
        assert ring.free == ring.capacity - len(self.model)
        assert ring.capacity <= ring.max_capacity

    def teardown(self) -> None:
        self.ring.close()
        if self.pool is not None:
            gc.collect()
            stats = self.pool.stats()
            assert stats.in_use == 0
            assert stats.heap_in_use == 0


RingModel.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestRingAgainstModel = RingModel.TestCase


class PooledRingModel(RingModel):
    use_pool = True


PooledRingModel.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestPooledRingAgainstModel = PooledRingModel.TestCase


def test_write_wraps_around_the_end() -> None:
    ring = wrapped_ring(16)
    assert ring.capacity == 16 and ring.grows == 0
    a, b = ring.readable_views()
    assert bytes(a) == b"0123" and bytes(b) == b"456789"
    assert ring.read(10) == b"0123456789"


def test_peek_across_the_wrap_is_a_counted_copy_and_contiguous_peek_is_not() -> None:
    ring = wrapped_ring(16)
    assert bytes(ring.peek(4)) == b"0123"
    assert ring.copies == 0
    assert bytes(ring.peek(7)) == b"0123456"
    assert (ring.copies, ring.bytes_copied) == (1, 7)
    ring.consume(4)
    assert bytes(ring.peek(6)) == b"456789"
    assert ring.copies == 1


def test_find_matches_straddling_the_wrap() -> None:
    ring = wrapped_ring(16)
    assert ring.find(b"345") == 3  # bytes 3 | 4 5 sit on both sides of the wrap
    assert ring.find(b"23456") == 2
    assert ring.find(b"3", 4) == -1
    assert ring.find(b"9") == 9
    assert ring.find(b"89", 0, 9) == -1
    assert ring.find(ord("5")) == 5
    assert ring.copies == 0  # find never linearizes


def test_peek_frame_extracts_length_prefixed_frames_across_the_wrap() -> None:
    ring = RingBuffer(16, max_capacity=16)
    ring.write(b"x" * 13)
    ring.consume(13)
    ring.write(b"\x17\x03\x03\x00\x02ab\x17\x03")  # 2nd header's length straddles the wrap
    first = ring.peek_frame(5, 3, 2)
    assert first is not None and bytes(first) == b"\x17\x03\x03\x00\x02ab"
    ring.consume(len(first))
    assert ring.peek_frame(5, 3, 2) is None  # incomplete header
    ring.write(b"\x03\x00\x01")
    assert ring.peek_frame(5, 3, 2) is None  # header complete, payload not yet
    ring.write(b"z")
    second = ring.peek_frame(5, 3, 2)
    assert second is not None and bytes(second) == b"\x17\x03\x03\x00\x01z"
    ring.consume(len(second))
    ring.write(b"\x00\x00\x00\x06abcd")  # a length that counts its own 4 bytes
    third = ring.peek_frame(4, 0, 4, adjust=-4)
    assert third is not None and bytes(third) == b"\x00\x00\x00\x06ab"


def test_peek_frame_rejects_frames_that_can_never_fit_and_keeps_the_data() -> None:
    ring = RingBuffer(64, max_capacity=1024)
    ring.write(b"\x17\x03\x03\x40\x00abc")  # claims 16384 bytes of payload
    with pytest.raises(BufferFull, match=r"frame of 16389 bytes .* max_capacity=1024"):
        ring.peek_frame(5, 3, 2)
    assert len(ring) == 8
    ring.clear()
    ring.write(b"\x00\x00\x00\x01")
    with pytest.raises(ValueError, match="under the 4-byte header"):
        ring.peek_frame(4, 0, 4, adjust=-4)
    assert len(ring) == 4


def test_peek_frame_refuses_a_length_field_outside_the_header() -> None:
    """The length field must lie inside the header: otherwise it would be read from bytes
    that are not buffered yet (stale storage) once the header alone has arrived."""
    ring = RingBuffer(16, max_capacity=16)
    ring.write(b"\xff" * 16)  # leave old bytes in the storage
    ring.consume(16)
    ring.write(b"\x00\x00")  # a 2-byte header is buffered; storage after it holds 0xff
    for header, at, size in ((2, 1, 2), (2, 2, 1), (4, -1, 2), (4, 0, 0)):
        with pytest.raises(ValueError, match="length field"):
            ring.peek_frame(header, at, size)
    assert ring.read() == b"\x00\x00"


def test_grows_by_doubling_only_when_the_data_does_not_fit() -> None:
    ring = RingBuffer(16, max_capacity=256)
    ring.write(b"a" * 16)
    assert ring.capacity == 16
    ring.write(b"b")
    assert (ring.capacity, ring.grows) == (32, 1)
    ring.write(b"c" * 100)
    assert ring.capacity == 128
    assert ring.read() == b"a" * 16 + b"b" + b"c" * 100


def test_get_buffer_grows_only_when_completely_full() -> None:
    ring = RingBuffer(16, max_capacity=64)
    ring.write(b"01234567abcd")
    ring.consume(8)  # 4 readable bytes at [8, 12); free: 4 after them, 8 before them
    mv = ring.get_buffer(65536)
    assert len(mv) == 4 and ring.capacity == 16  # the sizehint does not force growth
    mv[:2] = b"ef"
    ring.buffer_updated(2)
    assert len(ring.get_buffer(-1)) == 2
    ring.buffer_updated(0)
    ring.write(b"ABCDEFGHIJ")
    assert ring.free == 0
    assert len(ring.get_buffer(-1)) == 16 and ring.capacity == 32


def test_buffer_full_at_max_capacity_loses_nothing() -> None:
    ring = wrapped_ring(16)
    ring.write(b"abcdef")
    before = bytes(ring.peek(16))
    with pytest.raises(BufferFull, match="max_capacity=16 bytes"):
        ring.write(b"!")
    with pytest.raises(BufferFull, match="max_capacity=16"):
        ring.get_buffer(-1)
    with pytest.raises(BufferFull):
        ring.writable_views()
    assert isinstance(BufferFull("x"), bufpool.BufPoolError)
    assert bytes(ring.peek(16)) == before == b"0123456789abcdef"
    ring.consume(1)
    ring.write(b"!")
    assert ring.read() == b"123456789abcdef!"


def test_peek_view_is_released_by_the_next_consume() -> None:
    ring = RingBuffer(64)
    ring.write(b"hello world")
    view = ring.peek(5)
    assert bytes(view) == b"hello"
    ring.consume(5)
    with pytest.raises(ValueError, match="released"):
        bytes(view)


def test_peek_view_is_released_by_the_next_peek() -> None:
    ring = RingBuffer(64)
    ring.write(b"hello world")
    first = ring.peek(5)
    second = ring.peek(11)
    with pytest.raises(ValueError):
        first[0]
    assert bytes(second) == b"hello world"


def test_peek_view_with_a_live_export_is_left_alone() -> None:
    ring = RingBuffer(64)
    ring.write(b"hello world")
    view = ring.peek(5)
    held = pickle.PickleBuffer(view)  # holds a buffer export of the view (like a C library)
    ring.consume(5)  # must not raise BufferError
    assert bytes(view) == b"hello"  # still usable: the exporter keeps it alive
    del held


def test_buffer_updated_without_get_buffer_fails_loudly() -> None:
    ring = RingBuffer(64)
    with pytest.raises(RuntimeError, match="without a current get_buffer"):
        ring.buffer_updated(1)
    mv = ring.get_buffer()
    mv[:3] = b"abc"
    ring.buffer_updated(3)
    with pytest.raises(RuntimeError):
        ring.buffer_updated(3)  # committed twice
    mv = ring.get_buffer()
    with pytest.raises(ValueError, match="had 61 bytes"):
        ring.buffer_updated(62)
    ring.write(b"d")  # a mutating call between get_buffer and buffer_updated
    with pytest.raises(RuntimeError):
        ring.buffer_updated(1)
    assert ring.read() == b"abcd"


def test_bad_counts_name_the_fault() -> None:
    ring = RingBuffer(64)
    ring.write(b"abc")
    with pytest.raises(ValueError, match=r"peek\(4\): 3 bytes buffered"):
        ring.peek(4)
    with pytest.raises(ValueError, match=r"consume\(-1\)"):
        ring.consume(-1)
    with pytest.raises(ValueError, match="capacity"):
        RingBuffer(0)
    with pytest.raises(ValueError, match="max_capacity"):
        RingBuffer(64, max_capacity=32)
    assert ring.read() == b"abc"


def test_closed_ring_refuses_work() -> None:
    ring = RingBuffer(64)
    ring.write(b"abc")
    ring.close()
    ring.close()
    assert ring.closed and len(ring) == 0 and ring.capacity == 0
    with pytest.raises(ValueError, match="closed"):
        ring.write(b"x")
    with pytest.raises(ValueError, match="closed"):
        ring.peek(1)


def test_pool_backed_ring_is_counted_in_pool_stats_and_released_on_close() -> None:
    pool = BufferPool()
    with RingBuffer(4096, max_capacity=1 << 20, pool=pool) as ring:
        stats = pool.stats()
        assert stats.in_use == 1
        assert [t.in_use for t in stats.tiers if t.size == 4096] == [1]
        ring.write(bytes(range(256)) * 20)  # 5120 bytes: grows to 8192 -> 16 KiB class
        assert ring.capacity == 8192
        stats = pool.stats()
        assert stats.in_use == 1
        assert [t.in_use for t in stats.tiers if t.size == 16384] == [1]
        ring.write(b"z" * 120_000)  # above the largest class: a counted heap lease
        assert pool.stats().heap_in_use == 1
        assert pool.stats().oversize >= 1
        ring.consume(5000)
        assert ring.read(120) == (bytes(range(256)) * 20)[5000:] + b"z" * 0
    gc.collect()
    stats = pool.stats()
    assert stats.in_use == 0 and stats.heap_in_use == 0 and stats.quarantined == 0


def test_pool_backed_linearizing_peek_uses_a_pool_scratch_lease() -> None:
    pool = BufferPool()
    ring = wrapped_ring(1024, pool=pool)
    assert bytes(ring.peek(10)) == b"0123456789"
    assert ring.copies == 1
    assert pool.stats().in_use == 2  # storage + scratch
    ring.close()
    gc.collect()
    assert pool.stats().in_use == 0


def test_growth_failure_from_the_pool_keeps_the_data() -> None:
    pool = BufferPool(on_exhausted="raise")
    ring = RingBuffer(65536, max_capacity=1 << 20, pool=pool)
    ring.write(b"q" * 65536)
    with pytest.raises(bufpool.RequestTooLarge):
        ring.write(b"!")
    assert len(ring) == 65536 and ring.capacity == 65536
    assert ring.read(4) == b"qqqq"
    ring.close()


def test_stale_peek_after_growth_keeps_old_bytes_and_slot_is_quarantined() -> None:
    pool = BufferPool()
    ring = RingBuffer(64, max_capacity=1024, pool=pool)
    ring.write(b"a" * 64)
    kept = memoryview(ring.peek(10))  # a user keeps a view past its lifetime
    ring.write(b"b" * 64)  # growth moves the data and releases the old slot
    assert bytes(kept) == b"a" * 10  # never aliases the slot's next owner
    assert pool.stats().quarantined == 1
    del kept
    gc.collect()
    pool.reclaim()
    assert pool.stats().quarantined == 0
    ring.close()
