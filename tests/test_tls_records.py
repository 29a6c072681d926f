"""Record header validation, error details, refusal after error, bounded memory, lifetimes."""

from __future__ import annotations

import gc
import struct
from collections.abc import Callable

import pytest

import bufpool
from bufpool.tls import (
    MAX_CIPHERTEXT,
    MAX_CIPHERTEXT_TLS13,
    AlertDescription,
    ContentType,
    NotTLSError,
    RecordOverflowError,
    SplitterFailedError,
    SSLv2HelloError,
    TLSRecord,
    TLSRecordError,
    TLSRecordSplitter,
    TruncatedRecordError,
    UnexpectedRecordError,
    UnsupportedVersionError,
    alert_record,
)
from tests._tls_helpers import HELLO, rec


@pytest.fixture
def pool() -> bufpool.BufferPool:
    return bufpool.BufferPool()


def assert_clean(pool: bufpool.BufferPool) -> None:
    gc.collect()
    pool.reclaim()
    st = pool.stats()
    assert st.in_use == 0 and st.quarantined == 0, st


def test_records_come_out_whole_with_fields(pool: bufpool.BufferPool) -> None:
    s = TLSRecordSplitter(pool=pool)
    stream = HELLO + rec(20, b"\x01") + rec(23, b"abc") + rec(23, b"")
    out = s.feed(stream)
    assert [r.content_type for r in out] == [
        ContentType.handshake, ContentType.change_cipher_spec,
        ContentType.application_data, ContentType.application_data,
    ]
    assert [r.version for r in out] == [0x0301, 0x0303, 0x0303, 0x0303]
    assert [r.offset for r in out] == [0, 9, 15, 23]
    assert bytes(out[2].payload) == b"abc" and bytes(out[2].raw) == rec(23, b"abc")
    assert out[2].length == 3 and out[3].length == 0
    assert b"".join(bytes(r.raw) for r in out) == stream
    assert s.buffered == 0 and s.records == 4
    s.close()
    assert_clean(pool)


def test_partial_record_stays_buffered_until_complete(pool: bufpool.BufferPool) -> None:
    s = TLSRecordSplitter(pool=pool)
    body = bytes(range(200))
    stream = HELLO + rec(23, body)
    assert len(s.feed(stream[:3])) == 0 and s.buffered == 3
    assert [bytes(r.raw) for r in s.feed(stream[3:20])] == [HELLO]
    assert s.buffered == 20 - len(HELLO)
    out = s.feed(stream[20:])
    assert [bytes(r.payload) for r in out] == [body] and s.buffered == 0
    assert s.joined == 2  # both records crossed a seam between feeds: one counted copy each
    s.close()
    assert_clean(pool)


def test_record_inside_one_feed_is_a_view_of_the_input_without_copy(
    pool: bufpool.BufferPool,
) -> None:
    s = TLSRecordSplitter(pool=pool)
    data = bytearray(HELLO + rec(23, b"x" * 100))
    out = s.feed(data)
    assert out[1].raw.obj is data  # zero-copy: a view of what was fed
    assert s.joined == 0 and s.tail_bytes == 0
    s.close()


@pytest.mark.parametrize(
    ("stream", "error", "alert", "offset"),
    [
        (HELLO + rec(25, b"x"), UnexpectedRecordError, "unexpected_message", 9),
        (HELLO + rec(19, b"x"), UnexpectedRecordError, "unexpected_message", 9),
        (HELLO + rec(23, b"x", 0x0203), UnsupportedVersionError, "protocol_version", 9),
        (HELLO + rec(23, b"x", 0x0403), UnsupportedVersionError, "protocol_version", 9),
        (HELLO + struct.pack(">BHH", 23, 0x0303, MAX_CIPHERTEXT + 1), RecordOverflowError,
         "record_overflow", 9),
        (HELLO + rec(22, b""), UnexpectedRecordError, "unexpected_message", 9),
        (HELLO + rec(21, b""), UnexpectedRecordError, "unexpected_message", 9),
        (HELLO + rec(20, b""), UnexpectedRecordError, "unexpected_message", 9),
        (rec(23, b"x"), UnexpectedRecordError, "unexpected_message", 0),
        (rec(20, b"\x01"), UnexpectedRecordError, "unexpected_message", 0),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", NotTLSError, "unexpected_message", 0),
        (b"\x80\x2e\x01\x00\x02", SSLv2HelloError, "protocol_version", 0),
    ],
)
def test_each_rule_raises_its_error_with_alert_offset_and_header(
    pool: bufpool.BufferPool, stream: bytes, error: type[TLSRecordError], alert: str,
    offset: int,
) -> None:
    s = TLSRecordSplitter(pool=pool)
    with pytest.raises(error) as info:
        s.feed(stream)
    exc = info.value
    assert exc.alert is AlertDescription[alert]
    assert exc.offset == offset
    assert exc.header == stream[offset:offset + 5]
    assert f"offset {offset}" in str(exc) and alert in str(exc)
    s.close()
    assert_clean(pool)


def test_limits_are_exact(pool: bufpool.BufferPool) -> None:
    ok = HELLO + struct.pack(">BHH", 23, 0x0303, MAX_CIPHERTEXT) + bytes(MAX_CIPHERTEXT)
    s = TLSRecordSplitter(pool=pool)
    assert s.feed(ok)[1].length == MAX_CIPHERTEXT
    s.close()
    strict = TLSRecordSplitter(pool=pool, tls13_only=True)
    assert strict.max_payload == MAX_CIPHERTEXT_TLS13
    with pytest.raises(RecordOverflowError, match="exceeds the limit of 16640 bytes"):
        strict.feed(HELLO + struct.pack(">BHH", 23, 0x0303, MAX_CIPHERTEXT_TLS13 + 1))
    strict.close()
    s2 = TLSRecordSplitter(pool=pool, tls13_only=True)
    at = HELLO + struct.pack(">BHH", 23, 0x0303, MAX_CIPHERTEXT_TLS13)
    assert s2.feed(at) and s2.buffered == 5
    s2.close()
    assert_clean(pool)


def test_not_tls_says_what_it_looks_like(pool: bufpool.BufferPool) -> None:
    for data, what in [
        (b"POST /x HTTP/1.1\r\n", "HTTP request (POST)"),
        (b"SSH-2.0-OpenSSH\r\n", "SSH banner"),
        (b"hello there\n", "plaintext"),
        (b"PRI * HTTP/2.0\r\n", "HTTP request (PRI)"),
    ]:
        s = TLSRecordSplitter(pool=pool)
        with pytest.raises(NotTLSError) as info:
            s.feed(data)
        assert what in info.value.looks_like and what in str(info.value)
        s.close()
    # one byte is enough to refuse: nothing waits for a full header
    s = TLSRecordSplitter(pool=pool)
    with pytest.raises(NotTLSError):
        s.feed(b"G")
    s.close()


def test_mid_stream_skips_first_record_rule(pool: bufpool.BufferPool) -> None:
    s = TLSRecordSplitter(pool=pool, mid_stream=True)
    assert s.feed(rec(23, b"abc"))[0].content_type is ContentType.application_data
    s.close()


def test_garbage_detected_in_a_partial_header_at_any_split(pool: bufpool.BufferPool) -> None:
    bad = HELLO + rec(23, b"x", 0x0703)
    for cut in range(len(HELLO) + 1, len(HELLO) + 5):
        s = TLSRecordSplitter(pool=pool)
        if cut >= len(HELLO) + 2:  # the bad major byte is in the first piece: refused at once
            with pytest.raises(UnsupportedVersionError) as info:
                s.feed(bad[:cut])
            assert info.value.header == bad[len(HELLO):cut]
            assert [bytes(r.raw) for r in info.value.records] == [HELLO]  # type: ignore[attr-defined]
        else:
            assert len(s.feed(bad[:cut])) == 1  # one byte, 0x17, is a fine content type
            with pytest.raises(UnsupportedVersionError) as info:
                s.feed(bad[cut:])
        assert info.value.offset == len(HELLO)
        s.close()


def test_refuses_input_after_error_and_keeps_the_first_error(pool: bufpool.BufferPool) -> None:
    s = TLSRecordSplitter(pool=pool)
    good = HELLO + rec(23, b"ok")
    with pytest.raises(UnexpectedRecordError) as info:
        s.feed(good + rec(99, b"zz"))
    first = info.value
    assert [bytes(r.raw) for r in first.records] == [HELLO, rec(23, b"ok")]  # type: ignore[attr-defined]
    assert s.failed is first
    for more in (rec(23, b"fine"), b"", HELLO):
        with pytest.raises(SplitterFailedError) as again:
            s.feed(more)
        assert again.value.cause is first and again.value.alert is first.alert
        assert again.value.offset == first.offset and again.value.header == first.header
    with pytest.raises(SplitterFailedError):
        s.get_buffer(100)
    s.close()
    assert_clean(pool)


def test_truncated_stream_at_eof(pool: bufpool.BufferPool) -> None:
    s = TLSRecordSplitter(pool=pool)
    s.feed(HELLO + rec(23, b"abcdef")[:7])
    with pytest.raises(TruncatedRecordError) as info:
        s.feed_eof()
    assert info.value.offset == len(HELLO) and info.value.header == rec(23, b"abcdef")[:5]
    assert info.value.alert is AlertDescription.decode_error
    s.close()
    clean = TLSRecordSplitter(pool=pool)
    clean.feed(HELLO)
    clean.feed_eof()  # a stream ending on a record boundary is fine
    clean.close()


def test_truncated_stream_at_eof_keeps_its_header_on_the_ring_path(
    pool: bufpool.BufferPool,
) -> None:
    """feed_eof() right after buffer_updated() (records not yet expired, their bytes still in
    the ring ahead of the pending ones), also when the pending header wraps the ring's end."""
    tail = rec(23, b"abcdef")
    for cut in range(1, len(tail)):
        s = TLSRecordSplitter(pool=pool)
        stream = HELLO + tail[:cut]
        buf = s.get_buffer(-1)
        buf[:len(stream)] = stream
        del buf
        assert len(s.buffer_updated(len(stream))) == 1
        with pytest.raises(TruncatedRecordError) as info:
            s.feed_eof()
        assert info.value.offset == len(HELLO) and info.value.header == tail[:min(cut, 5)]
        s.close()
    # pending header split by the wrap point of a ring filled by someone else
    cap = 40000
    room = cap - len(HELLO) - 3 * 5 - 2  # three records leave 2 bytes before the ring's end
    filler = b"".join(rec(23, bytes(n)) for n in (room // 3, room // 3, room - 2 * (room // 3)))
    for cut in range(1, len(tail)):
        s = TLSRecordSplitter(pool=pool, ring_capacity=cap)
        buf = s.get_buffer(-1)
        assert len(buf) == cap
        buf[:len(HELLO) + len(filler)] = HELLO + filler
        del buf
        assert len(s.buffer_updated(len(HELLO) + len(filler))) == 4
        buf = s.get_buffer(-1)  # expires the records: the ring is empty again at offset 39998
        k = min(cut, 2)
        buf[:k] = tail[:k]
        del buf
        assert s.buffer_updated(k) == []
        if cut > 2:
            buf = s.get_buffer(-1)  # after the wrap
            buf[:cut - 2] = tail[2:cut]
            del buf
            assert s.buffer_updated(cut - 2) == []
        with pytest.raises(TruncatedRecordError) as info:
            s.feed_eof()
        assert info.value.offset == cap - 2 and info.value.header == tail[:min(cut, 5)], cut
        s.close()
    assert_clean(pool)


def test_pending_bytes_stay_bounded_whatever_the_input(pool: bufpool.BufferPool) -> None:
    s = TLSRecordSplitter(pool=pool)
    big = struct.pack(">BHH", 23, 0x0303, MAX_CIPHERTEXT) + bytes(MAX_CIPHERTEXT)
    stream = HELLO + big * 20
    most = 0
    for i in range(0, len(stream), 7001):
        s.feed(stream[i:i + 7001])
        most = max(most, s.buffered)
    assert most <= 5 + MAX_CIPHERTEXT - 1
    assert s.buffered == 0 and s.records == 21
    s.close()
    assert_clean(pool)


def test_stale_record_views_fail_loudly_after_next_feed(pool: bufpool.BufferPool) -> None:
    s = TLSRecordSplitter(pool=pool)
    first = s.feed(HELLO + rec(23, b"abc"))
    kept = first[1]
    raw, payload = kept.raw, kept.payload
    assert bytes(payload) == b"abc"
    s.feed(rec(23, b"next"))
    with pytest.raises(ValueError, match="released"):
        bytes(raw)
    with pytest.raises(ValueError, match="released"):
        payload[0]
    with pytest.raises(ValueError, match="released"):
        kept.detach()
    assert "stale" in repr(kept)
    s.close()


def test_stale_joined_record_fails_and_its_lease_goes_back(pool: bufpool.BufferPool) -> None:
    s = TLSRecordSplitter(pool=pool)
    stream = HELLO + rec(23, b"z" * 3000)
    s.feed(stream[:100])
    (joined,) = s.feed(stream[100:])
    assert s.joined == 1 and pool.stats().in_use >= 2  # ring + join lease
    raw = joined.raw
    s.feed(b"")
    with pytest.raises(ValueError):
        raw[0]
    s.close()
    assert_clean(pool)


def test_detach_copies_into_a_pooled_lease_that_outlives_the_feed(
    pool: bufpool.BufferPool,
) -> None:
    s = TLSRecordSplitter(pool=pool)
    full = struct.pack(">BHH", 23, 0x0303, MAX_CIPHERTEXT) + bytes(range(256)) * 72
    out = s.feed(HELLO + full)
    kept = out[1].detach()
    s.feed(rec(23, b"later"))
    assert kept.lease.pooled and kept.lease.capacity == 18437  # the 16 KiB class's slot
    assert bytes(kept.raw) == full and kept.content_type is ContentType.application_data
    assert bytes(kept.payload) == full[5:]
    kept.release()
    # a joined record is handed over without a second copy
    s.feed(full[:10])
    (j,) = s.feed(full[10:])
    with j.detach() as d2:
        assert bytes(d2.raw) == full
    s.close()
    assert_clean(pool)


def test_held_export_of_a_ring_record_view_is_reported(pool: bufpool.BufferPool) -> None:
    """Records parsed in place from the ring (get_buffer/buffer_updated) alias memory the
    splitter reuses: a live export of one (as uvloop's write queue holds) is reported."""
    import pickle

    from bufpool.tls import RecordViewHeldError

    s = TLSRecordSplitter(pool=pool)
    stream = HELLO + rec(23, b"abc")
    buf = s.get_buffer(-1)
    buf[:len(stream)] = stream
    del buf
    out = s.buffer_updated(len(stream))
    holder = pickle.PickleBuffer(out[1].raw)  # holds a buffer export
    try:
        with pytest.raises(RecordViewHeldError, match="detach"):
            s.get_buffer(-1)
    finally:
        holder.release()
        s.close()
    del out  # the record whose release was refused still references the ring's slot
    assert_clean(pool)


@pytest.mark.parametrize(
    "derive",
    [
        lambda r: memoryview(r.raw),  # what a 3.12+ selector transport keeps after a partial send
        lambda r: r.raw[3:],
        lambda r: r.payload[1:],
        lambda r: memoryview(r.payload)[:2],
    ],
    ids=["memoryview(raw)", "raw[3:]", "payload[1:]", "memoryview(payload)[:2]"],
)
def test_live_view_derived_from_a_ring_record_is_reported(
    pool: bufpool.BufferPool, derive: Callable[[TLSRecord], memoryview],
) -> None:
    """A slice or memoryview() of a record view shares no export with the record, so
    releasing the record succeeds; the splitter still notices it and refuses silently
    reusing ring memory under it."""
    from bufpool.tls import RecordViewHeldError

    s = TLSRecordSplitter(pool=pool)
    stream = HELLO + rec(23, b"secret-A")
    buf = s.get_buffer(-1)
    buf[:len(stream)] = stream
    del buf
    out = s.buffer_updated(len(stream))
    kept = derive(out[1])
    del out
    with pytest.raises(RecordViewHeldError, match=r"derived .* detach"):
        s.get_buffer(-1)
    assert bytes(kept) in stream  # still readable: it was not released under the caller
    # the next records work as before; a second error is not raised for the same view
    more = rec(23, b"OTHER-BB")
    buf = s.get_buffer(-1)
    buf[:len(more)] = more
    del buf
    assert [bytes(r.raw) for r in s.buffer_updated(len(more))] == [more]
    s.get_buffer(-1)
    del kept
    s.close()
    assert_clean(pool)


def _through_ring(
    s: TLSRecordSplitter, stream: bytes, each: Callable[[TLSRecord], None], step: int = 9000
) -> None:
    """Write ``stream`` into the splitter's ring (get_buffer/buffer_updated, at most ``step``
    bytes at a time) and call ``each`` on every record, before the next write."""
    pos = 0
    while pos < len(stream):
        buf = s.get_buffer(-1)
        n = min(len(buf), len(stream) - pos, step)
        buf[:n] = stream[pos:pos + n]
        del buf  # our own view of the ring would keep its slot quarantined
        pos += n
        for r in s.buffer_updated(n):
            each(r)


def test_derived_views_released_in_time_and_feed_records_are_not_an_error(
    pool: bufpool.BufferPool,
) -> None:
    s = TLSRecordSplitter(pool=pool, ring_capacity=40000)
    payloads = [bytes([i % 251]) * (100 + 997 * i % 15000) for i in range(60)]
    stream = HELLO + b"".join(rec(23, p) for p in payloads)
    got: list[bytes] = []

    def keep(r: TLSRecord) -> None:  # ring wraps and joins happen; derived views die in time
        view = memoryview(r.raw)[5:]
        got.append(bytes(r.raw[:5]) + bytes(view))
        del view

    _through_ring(s, stream, keep)
    assert b"".join(got) == stream and s.joined >= 1
    s.close()
    f = TLSRecordSplitter(pool=pool)
    kept = memoryview(f.feed(HELLO + rec(23, b"abc"))[1].raw)  # a view of our own input
    f.feed(rec(23, b"x"))  # no RecordViewHeldError
    assert bytes(kept) == rec(23, b"abc")
    f.close()
    del kept
    assert_clean(pool)


def test_held_export_of_memory_the_splitter_does_not_reuse_is_not_an_error(
    pool: bufpool.BufferPool,
) -> None:
    """feed() records are views of the caller's bytes or of a joined lease (which the pool
    quarantines while exported): holding an export of them is safe, so no error."""
    import pickle

    s = TLSRecordSplitter(pool=pool)
    stream = HELLO + rec(23, b"j" * 3000)
    s.feed(stream[:100])
    (joined,) = s.feed(stream[100:])
    assert s.joined == 1
    held_joined = pickle.PickleBuffer(joined.raw)
    (view_rec,) = s.feed(rec(23, b"abc"))
    held_view = pickle.PickleBuffer(view_rec.raw)
    assert s.feed(rec(23, b"more"))[0].length == 4  # no RecordViewHeldError
    assert bytes(held_joined) == stream[len(HELLO):]  # the join lease is not reused under it
    assert bytes(held_view) == rec(23, b"abc")
    held_joined.release()
    held_view.release()
    del held_joined, held_view, joined, view_rec
    s.close()
    assert_clean(pool)


def test_buffer_protocol_path_parses_in_place_and_joins_at_wrap(
    pool: bufpool.BufferPool,
) -> None:
    s = TLSRecordSplitter(pool=pool, ring_capacity=40000)
    payloads = [bytes([i % 251]) * (1000 + 997 * i % 15000) for i in range(60)]
    stream = HELLO + b"".join(rec(23, p) for p in payloads)
    got: list[bytes] = []
    _through_ring(s, stream, lambda r: got.append(bytes(r.raw)))
    assert b"".join(got) == stream
    assert s.joined >= 1  # some records wrapped the ring's end
    assert s.joined < len(got) // 2
    s.close()
    assert_clean(pool)


def test_alert_record_bytes() -> None:
    assert alert_record(AlertDescription.unrecognized_name) == b"\x15\x03\x03\x00\x02\x02\x70"
    assert alert_record(0, fatal=False) == b"\x15\x03\x03\x00\x02\x01\x00"


def test_framer_splits_into_pooled_records(pool: bufpool.BufferPool) -> None:
    from bufpool.tls import RecordFramer

    f = RecordFramer(pool=pool)
    data = bytes(range(256)) * 200  # 51200 bytes
    with f.frame(data) as chain:
        assert [len(v) - 5 for v in chain.views()] == [16384, 16384, 16384, 2048]
        s = TLSRecordSplitter(pool=pool, mid_stream=True)
        out = s.feed(chain.tobytes())
        assert b"".join(bytes(r.payload) for r in out) == data
        s.close()
    assert len(f.frame(b"")) == 0
    limited = RecordFramer(pool=pool, record_size_limit=1000)
    with limited.frame(bytes(2500)) as chain:
        assert [len(v) - 5 for v in chain.views()] == [1000, 1000, 500]
    t13 = RecordFramer(pool=pool, record_size_limit=1000, tls13=True)
    assert t13.max_fragment == 999
    with pytest.raises(ValueError, match="record_size_limit"):
        RecordFramer(pool=pool, record_size_limit=63)
    assert_clean(pool)


def test_framer_clamps_a_record_size_limit_above_the_protocol_maximum(
    pool: bufpool.BufferPool,
) -> None:
    """RFC 8449 section 4: a value larger than the protocol maximum is allowed and means the
    maximum (2^14, or 2^14 + 1 in TLS 1.3 where the limit counts the inner content type)."""
    from bufpool.tls import RecordFramer

    for limit, tls13 in ((16385, False), (16385, True), (16386, True), (65535, False),
                         (65535, True)):
        f = RecordFramer(pool=pool, record_size_limit=limit, tls13=tls13)
        assert f.max_fragment == 16384, (limit, tls13)
        with f.frame(bytes(20000)) as chain:
            assert [len(v) - 5 for v in chain.views()] == [16384, 3616]
    assert RecordFramer(pool=pool, record_size_limit=64).max_fragment == 64
    with pytest.raises(ValueError, match="at least 64 bytes"):
        RecordFramer(pool=pool, record_size_limit=63, tls13=True)
    assert_clean(pool)


def test_framer_dynamic_sizing_grows_then_boosts(pool: bufpool.BufferPool) -> None:
    from bufpool.tls import RecordFramer

    f = RecordFramer(pool=pool, dynamic=True)
    plan = f.plan(300_000)
    seg = 1208 - 5
    assert plan[:4] == [seg, 2 * seg, 3 * seg, 4 * seg]
    assert max(plan) == 16384
    sent = 0
    for n in plan:
        if sent >= 128 * 1024:
            assert n == 16384 or n == plan[-1]
        sent += n
    assert sum(plan) == 300_000
    with f.frame(bytes(5000)) as chain:
        assert [len(v) - 5 for v in chain.views()] == [seg, 2 * seg, 5000 - 3 * seg]
    assert f.records_sent == 3 and f.bytes_sent == 5000
    many = RecordFramer(pool=pool, dynamic=True, record_size_limit=64)
    many.records_sent = 1000
    assert many.next_fragment_size() == 64
    assert_clean(pool)
