"""The compiled record scanner (bufpool/tls/_cscan.c) against the pure-Python reference, in one
process: the same streams, chunkings and faults through both give the same records (fields,
offsets, bytes, view properties), the same counters, and the same errors with the same
messages, alerts, offsets, headers and good records.  Under BUFPOOL_NO_EXTENSIONS=1 both
sides are the reference (the comparison then checks the harness itself)."""

from __future__ import annotations

import gc
import os
import pickle
import random
import struct
import sys
from array import array
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bufpool
from bufpool.tls import MAX_CIPHERTEXT, RecordViewHeldError, TLSRecord, TLSRecordSplitter, _splitter
from bufpool.tls._records import CONTENT_TYPES, PyTLSRecord
from tests._tls_helpers import HELLO, real_tls_streams, rec

Reference = _splitter._ReferenceSplitter
POOL = bufpool.BufferPool(leak_detection="off")
SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def test_the_scanner_chosen_follows_the_environment() -> None:
    if os.environ.get("BUFPOOL_NO_EXTENSIONS", "") not in ("", "0"):
        assert _splitter.SCANNER == "python"
        assert TLSRecordSplitter._scan is TLSRecordSplitter._scan_py
    elif os.environ.get("BUFPOOL_REQUIRE_EXTENSIONS", "") not in ("", "0"):
        assert _splitter.SCANNER == "c"
        assert TLSRecordSplitter._scan is TLSRecordSplitter._scan_c
    assert Reference._scan is TLSRecordSplitter._scan_py


def describe_view(v: memoryview) -> tuple[Any, ...]:
    return (bytes(v), v.format, v.itemsize, v.ndim, v.shape, v.strides, v.readonly,
            v.c_contiguous, v.nbytes, type(v.obj).__name__)


def describe(r: TLSRecord) -> tuple[Any, ...]:
    # the reference hands out the pure-Python record class, the splitter the active type
    assert type(r) in (TLSRecord, PyTLSRecord)
    return (r.content_type, type(r.content_type), r.version, r.offset, r.length,
            describe_view(r.raw), describe_view(r.payload), r._lease is None, r._pool is POOL,
            repr(r))


def describe_error(e: BaseException) -> tuple[Any, ...]:
    return (type(e), str(e), getattr(e, "alert", None), getattr(e, "offset", None),
            getattr(e, "header", None),
            [describe(r) for r in getattr(e, "records", [])])


def drive(cls: type[TLSRecordSplitter], stream: bytes, plan: list[tuple[str, int]],
          **options: Any) -> list[Any]:
    """Feed ``stream`` by ``plan`` (("feed" | "ring" | "mv" | "bytearray", size) steps, then
    the rest by feed) and log everything observable."""
    s = cls(pool=POOL, **options)
    log: list[Any] = []
    pos = 0
    steps = [*plan, ("feed", len(stream))]
    try:
        for how, size in steps:
            if pos >= len(stream):
                break
            piece = stream[pos:pos + size]
            if how == "ring":
                buf = s.get_buffer(-1)
                n = min(len(buf), len(piece))
                buf[:n] = piece[:n]
                del buf
                out = s.buffer_updated(n)
                pos += n
            else:
                data: bytes | bytearray | memoryview = piece
                if how == "mv":
                    data = memoryview(b"\0" + piece)[1:]
                elif how == "bytearray":
                    data = bytearray(piece)
                out = s.feed(data)
                pos += len(piece)
            log.append((how, [describe(r) for r in out], s.buffered, s.offset, s.records,
                        s.joined, s.joined_bytes, s.tail_bytes))
        s.feed_eof()
        log.append(("eof", s.buffered, s.offset))
    except (ValueError, BufferError) as exc:  # TLSRecordError is a ValueError
        log.append(("error", describe_error(exc), s.buffered, s.records))
        for more in (lambda: s.feed(HELLO), s.feed_eof, lambda: s.get_buffer(10)):
            try:
                more()
            except (ValueError, BufferError) as again:
                log.append(("again", describe_error(again)))
    finally:
        s.close()
    return log


def same(stream: bytes, plan: list[tuple[str, int]], **options: Any) -> list[Any]:
    ref = drive(Reference, stream, plan, **options)
    got = drive(TLSRecordSplitter, stream, plan, **options)
    assert got == ref
    return got


def records(rnd: random.Random, n: int, sizes: tuple[int, ...]) -> bytes:
    out = [HELLO]
    for _ in range(n):
        size = rnd.choice(sizes)
        ct = 23 if size == 0 else rnd.choice((20, 21, 22, 23, 23, 23, 24))
        out.append(rec(ct, rnd.randbytes(size), rnd.choice((0x0301, 0x0303, 0x0303, 0x03FF))))
    return b"".join(out)


def plan_for(rnd: random.Random, modes: tuple[str, ...]) -> list[tuple[str, int]]:
    return [(rnd.choice(modes), rnd.choice((1, 2, 4, 5, 6, 99, 300, 4000, 65536, 70000)))
            for _ in range(rnd.randrange(1, 40))]


@pytest.mark.parametrize("modes", [("feed",), ("ring",), ("feed", "ring", "mv", "bytearray")])
def test_same_records_on_good_streams(modes: tuple[str, ...]) -> None:
    for seed in range(40):
        rnd = random.Random(seed)
        stream = records(rnd, rnd.randrange(1, 300),
                         (0, 1, 100, 200, 300, 1000, 4000, 16384, MAX_CIPHERTEXT))
        log = same(stream, plan_for(rnd, modes))
        assert log[-1][0] == "eof"


@pytest.mark.parametrize(
    ("fault", "name", "name_tls13"),
    [
        (rec(23, b"x", 0x0203), "UnsupportedVersionError", None),  # major byte 2
        (rec(99, b"x"), "UnexpectedRecordError", None),  # content type
        (rec(22, b""), "UnexpectedRecordError", None),  # empty handshake
        (struct.pack(">BHH", 23, 0x0303, MAX_CIPHERTEXT + 1), "RecordOverflowError", None),
        (struct.pack(">BHH", 23, 0x0303, 16641), "TruncatedRecordError", "RecordOverflowError"),
        (rec(23, bytes(16641)), None, "RecordOverflowError"),  # complete: the C loop sees it
        (rec(23, bytes(MAX_CIPHERTEXT)), None, "RecordOverflowError"),
        (rec(23, bytes(16640)), None, None),
        (b"GET / HTTP/1.1\r\n", "UnexpectedRecordError", None),  # plaintext after the start
        (rec(23, b"abcdef")[:8], "TruncatedRecordError", None),
    ],
)
@pytest.mark.parametrize("tls13_only", [False, True])
def test_same_errors_wherever_the_fault_lands(
    fault: bytes, name: str | None, name_tls13: str | None, tls13_only: bool,
) -> None:
    rnd = random.Random(len(fault))
    good = records(rnd, 50, (100, 200, 300))
    stream = good + fault + (b"" if name == "TruncatedRecordError" else rec(23, b"after"))
    expected = [e for e in [name_tls13 or name if tls13_only else name] if e]
    for cut in [*range(len(good) - 6, len(good) + 7), 1, 5, 100, 4096]:
        for how in ("feed", "ring"):
            log = same(stream, [(how, cut), (how, 3), (how, 70000)], tls13_only=tls13_only)
            errors = [entry[1][0].__name__ for entry in log if entry[0] == "error"]
            assert errors == expected
    for how in ("feed", "ring"):  # the fault as the stream's very first record
        same(fault + good, [(how, 3), (how, 5000)], mid_stream=True, tls13_only=tls13_only)


@pytest.mark.parametrize(
    "start",
    [b"GET / HTTP/1.1\r\n\r\n", b"SSH-2.0-x\r\n", b"\x80\x2e\x01\x03\x01", rec(23, b"abc"),
     rec(20, b"\x01"), b"\x16\x02\x00\x00\x04abcd", b"\x16", b"\x16\x03", b"\x16\x03\x01\x00"],
)
def test_same_judgement_of_the_stream_start(start: bytes) -> None:
    for cut in range(1, len(start) + 2):
        for how in ("feed", "ring"):
            same(start + HELLO, [(how, cut)])
    same(start, [("feed", 100)], mid_stream=True)


@pytest.fixture(scope="module")
def real_streams(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    return real_tls_streams(tmp_path_factory.mktemp("scannercerts"), c2s=20000, s2c=70000)


@SETTINGS
@given(st.integers(0, 3), st.lists(st.tuples(st.integers(0, 100_000), st.integers(0, 255)),
                                   max_size=4),
       st.integers(0, 2**32), st.sampled_from([("feed",), ("ring",), ("feed", "ring", "mv")]))
def test_same_on_real_and_mutated_openssl_streams(
    real_streams: list[bytes], which: int, flips: list[tuple[int, int]], seed: int,
    modes: tuple[str, ...],
) -> None:
    data = bytearray(real_streams[which])
    for at, value in flips:
        data[at % len(data)] = value
    same(bytes(data), plan_for(random.Random(seed), modes), mid_stream=bool(which % 2))


@SETTINGS
@given(st.binary(max_size=2000), st.integers(0, 2**32), st.booleans())
def test_same_on_random_bytes(data: bytes, seed: int, mid_stream: bool) -> None:
    same(HELLO + data, plan_for(random.Random(seed), ("feed", "ring")), mid_stream=mid_stream)
    same(data, plan_for(random.Random(seed), ("feed", "ring")), mid_stream=mid_stream)


def test_same_for_unusual_inputs() -> None:
    stream = HELLO + rec(23, b"abc") + rec(23, b"defg")  # 26 bytes: even, and 2 x 13
    spread = bytearray(2 * len(stream))
    spread[::2] = stream
    for data in (memoryview(spread)[::2], array("H", stream), memoryview(stream).cast("c"),
                 memoryview(bytearray(stream)).toreadonly(),
                 memoryview(stream).cast("B", (2, 13))):
        logs = []
        for cls in (Reference, TLSRecordSplitter):
            s = cls(pool=POOL)
            try:
                logs.append([describe(r) for r in s.feed(data)])  # type: ignore[arg-type]
            except (TypeError, ValueError, BufferError) as exc:
                logs.append([describe_error(exc)])
            finally:
                s.close()
        assert logs[0] == logs[1]


def test_same_lifetimes_and_held_view_reports() -> None:
    for cls in (Reference, TLSRecordSplitter):
        s = cls(pool=POOL)
        out = s.feed(HELLO + rec(23, b"abc"))
        raw, payload = out[1].raw, out[1].payload
        s.feed(b"")
        with pytest.raises(ValueError, match="released"):
            bytes(raw)
        with pytest.raises(ValueError, match="released"):
            bytes(payload)
        stream = rec(23, b"ring")
        buf = s.get_buffer(-1)
        buf[:len(stream)] = stream
        del buf
        (r,) = s.buffer_updated(len(stream))
        holder = pickle.PickleBuffer(r.payload)
        with pytest.raises(RecordViewHeldError, match="1 record view"):
            s.get_buffer(-1)
        holder.release()
        buf = s.get_buffer(-1)
        buf[:len(stream)] = stream
        del buf
        (r,) = s.buffer_updated(len(stream))
        derived = r.raw[1:]
        with pytest.raises(RecordViewHeldError, match="derived"):
            s.expire()
        del derived, r, out, raw, payload
        s.close()


def test_compiled_scan_leaks_no_references() -> None:
    pool = bufpool.BufferPool(leak_detection="off")
    rnd = random.Random(5)
    stream = records(rnd, 400, (100, 200, 300, 5000))
    chunks = [stream[i:i + 65536] for i in range(0, len(stream), 65536)]

    def run() -> None:
        s = TLSRecordSplitter(pool=pool)
        for c in chunks:
            for r in s.feed(c):
                r.payload  # noqa: B018  (makes the lazy payload view)
        buf = s.get_buffer(-1)
        buf[:len(HELLO)] = rec(23, b"x" * 4)
        del buf
        s.buffer_updated(len(HELLO))
        s.close()

    run()
    gc.collect()
    objects = len(gc.get_objects())
    refs = (sys.getrefcount(pool), sys.getrefcount(TLSRecord),
            sys.getrefcount(CONTENT_TYPES[23]))
    for _ in range(30):
        run()
    gc.collect()
    assert (sys.getrefcount(pool), sys.getrefcount(TLSRecord),
            sys.getrefcount(CONTENT_TYPES[23])) == refs
    assert abs(len(gc.get_objects()) - objects) < 50
    gc.collect()
    pool.reclaim()
    assert pool.stats().in_use == 0


def test_views_never_read_before_expiry_fail_the_same_way() -> None:
    """The compiled record makes its views on first read: one that nobody read before the
    next call must fail like the reference's released views (raw is a released view,
    payload/length/detach raise ValueError, repr says stale), on both input paths."""
    stream = HELLO + rec(23, b"abc") + rec(23, b"")
    seen = []
    for cls in (Reference, TLSRecordSplitter):
        s = cls(pool=POOL)
        fed = s.feed(stream)
        buf = s.get_buffer(-1)
        buf[:len(stream) - len(HELLO)] = stream[len(HELLO):]
        del buf
        pulled = s.buffer_updated(len(stream) - len(HELLO))
        s.expire()
        for r in (*fed, *pulled):
            raw = r.raw
            with pytest.raises(ValueError, match="released"):
                bytes(raw)
            with pytest.raises(ValueError, match="released"):
                r.payload  # noqa: B018
            with pytest.raises(ValueError, match="released"):
                r.length  # noqa: B018
            with pytest.raises(ValueError, match="released"):
                r.detach()
            seen.append((cls.__name__ != "TLSRecordSplitter", repr(r), r.offset, r.version,
                         r.content_type, r._lease is None))
        del fed, pulled, r, raw
        s.close()
    half = len(seen) // 2
    assert [x[1:] for x in seen[:half]] == [x[1:] for x in seen[half:]]
    assert all("stale" in x[1] for x in seen)


def test_a_record_read_once_keeps_its_views() -> None:
    for cls in (Reference, TLSRecordSplitter):
        s = cls(pool=POOL)
        (_, r) = s.feed(HELLO + rec(23, b"abcd"))
        assert r.raw is r.raw and r.payload is r.payload  # made once, the same view after
        assert r.payload.obj is r.raw.obj
        assert r._payload is r.payload
        s.close()
