"""Sans-IO: where one HTTP/1.1 request head ends in a read, for the zero-copy receive path.

``scan_head(buf, nbytes)`` answers the receive path's common read (``_fastpath``): one whole
request head, followed by nothing or by the start of its own body.  It returns the index just
after the head's ``CRLF CRLF`` when:

* every line of the head ends in CRLF (no bare LF: aiohttp's parser judges those), and
* no bytes follow the head, or its first ``Content-Length:`` line (name matched
  case-insensitively, at a line start) holds 1-18 ASCII digits between optional spaces and
  tabs, whose value is at least the count of bytes that follow (so no second request starts
  in this read);

and -1 otherwise: no whole head yet, or a shape the general path (``ZeroCopyProtocol._feed``)
handles.  It only routes: aiohttp's parser still parses and validates the head (a duplicate or
malformed Content-Length is its 400, as without bufpool).

Cost: O(head bytes), no allocation in the compiled twin (``bufpool/aiohttp/_chead.c``, chosen
at import by the rules of ``bufpool._impl``); ``SCANNER`` tells which one runs.
"""

from __future__ import annotations

from typing import Final, Literal

from .._impl import load_extension

__all__ = ["SCANNER", "scan_head", "scan_head_py"]

_CL: Final = b"\r\ncontent-length:"
_MAX_DIGITS: Final = 18


def scan_head_py(buf: bytes | bytearray | memoryview, nbytes: int, /) -> int:
    """The pure-Python ``scan_head`` (the reference the compiled twin is tested against)."""
    if not 0 <= nbytes <= len(buf):
        raise ValueError(f"nbytes must be within 0..{len(buf)}, got {nbytes}")
    data = bytes(buf[:nbytes]) if type(buf) is memoryview else buf
    end = data.find(b"\r\n\r\n", 0, nbytes)
    if end < 0:
        return -1
    end += 4
    head = bytes(data[:end])
    if head.count(b"\n") != head.count(b"\r\n"):
        return -1
    if nbytes > end:
        at = head.lower().find(_CL)
        if at < 0:
            return -1
        stop = head.find(b"\r", at + len(_CL))
        value = head[at + len(_CL) : stop].strip(b" \t")
        if not value or len(value) > _MAX_DIGITS or not value.isdigit():
            return -1
        if int(value) < nbytes - end:
            return -1
    return end


_chead = load_extension("bufpool.aiohttp._chead")

#: "c" when the compiled scanner runs, "python" otherwise.
SCANNER: Final[Literal["c", "python"]] = "python" if _chead is None else "c"
scan_head = scan_head_py if _chead is None else _chead.scan_head
