"""A failed TLSRecordSplitter dropped without close(), its error's traceback making a reference
cycle with it, is collected by the cyclic GC without crashing the interpreter (both cores).

Before the fix, pull() cut records from ``memoryview(PickleBuffer(ring_view))``: the ring view
was a memoryview with an export, and when the GC cleared it inside such a cycle CPython
3.11 and 3.12 segfaulted as soon as the export ended (3.13.0 did not).  Run in a
subprocess: a crash kills it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import gc, struct
    from bufpool.tls import TLSRecordError, TLSRecordSplitter

    def rec(ct, payload):
        return struct.pack(">BHH", ct, 0x0303, len(payload)) + payload

    class Conn:  # a user's connection object holding its splitter
        pass

    # good records, then a header no TLS stream starts with: pull() fails after handing out two
    # records (kept on the error), and the caught error's traceback reaches back to the splitter
    data = rec(23, b"A" * 100) * 2 + b"\\x00\\x00\\x00\\x00\\x00"
    for i in range(20):
        conn = Conn()
        conn.me = conn
        conn.splitter = TLSRecordSplitter(mid_stream=True)
        buf = conn.splitter.get_buffer(-1)
        buf[:len(data)] = data
        del buf
        try:
            conn.splitter.buffer_updated(len(data))
        except TLSRecordError as exc:
            conn.error = exc
            assert len(exc.records) == 2
        del conn
        gc.collect()
    # and once more with the records' views read and kept by the user
    conn = Conn()
    conn.me = conn
    conn.splitter = TLSRecordSplitter(mid_stream=True)
    buf = conn.splitter.get_buffer(-1)
    buf[:len(data)] = data
    del buf
    try:
        conn.splitter.buffer_updated(len(data))
    except TLSRecordError as exc:
        conn.payloads = [r.payload[1:] for r in exc.records]
        conn.error = exc
    del conn
    gc.collect()
    print("survived")
""")


@pytest.mark.parametrize("core", ["compiled", "python"])
def test_failed_splitter_dropped_in_a_cycle_is_collected_without_a_crash(core: str) -> None:
    env = dict(os.environ)
    env.pop("BUFPOOL_NO_EXTENSIONS", None)
    if core == "python":
        env["BUFPOOL_NO_EXTENSIONS"] = "1"
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "survived" in done.stdout, (done.returncode, done.stderr)
