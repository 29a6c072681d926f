"""Where a chunked request body ends, for the zero-copy receive path's hand-back.

Sans-IO: bytes in, "the message ends at index i" out.  ``_fastpath`` feeds a chunked request
to aiohttp's parser and returns to the fast path after it only where this scanner found the
end; being stricter than llhttp (anything unusual raises ValueError, and the connection then
stays on aiohttp's parser), an end it finds is the end llhttp finds.
"""

from __future__ import annotations

__all__ = ["ChunkScanner"]


class ChunkScanner:
    """Finds where a chunked message ends, for plainly framed bodies only.

    Accepts hex sizes (1-16 digits) each ended by CRLF, data, CRLF, and a last ``0`` chunk
    followed directly by CRLF.  Anything else -- extensions, trailers, whitespace, bare LF --
    raises ValueError: the connection then stays on aiohttp's parser.  Being stricter than
    llhttp, where it finds an end llhttp finds the same one.  O(bytes); keeps at most one
    size line (18 bytes).
    """

    __slots__ = ("left", "line", "state")

    SKIP, SIZE, DATA, DATA_END, LAST = range(5)

    def __init__(self, head: int) -> None:
        self.state = self.SKIP
        self.left = head  # head bytes to pass over first
        self.line = bytearray()

    def scan(self, buf: bytes | bytearray, i: int, n: int) -> tuple[int, bool]:
        """Consume ``buf[i:n]``; returns (index after what belongs to the message, done)."""
        while i < n:
            state = self.state
            if state == self.SKIP or state == self.DATA:
                k = min(self.left, n - i)
                i += k
                self.left -= k
                if not self.left:
                    self.state = self.SIZE if state == self.SKIP else self.DATA_END
                    self.left = 2
            elif state == self.SIZE:
                j = buf.find(b"\n", i, n)
                stop = n if j < 0 else j + 1
                self.line += buf[i:stop]
                i = stop
                if len(self.line) > 18:
                    raise ValueError("chunk size line too long")
                if j < 0:
                    continue
                line = bytes(self.line)
                self.line.clear()
                digits = line[:-2]
                if (
                    not line.endswith(b"\r\n")
                    or not digits
                    or digits.strip(b"0123456789abcdefABCDEF")
                ):
                    raise ValueError("not a plain chunk size line")
                size = int(digits, 16)
                self.state = self.DATA if size else self.LAST
                self.left = size if size else 2
            else:  # DATA_END or LAST: exactly CRLF
                if buf[i] != b"\r\n"[2 - self.left]:
                    raise ValueError("chunk not ended by CRLF")
                i += 1
                self.left -= 1
                if not self.left:
                    if state == self.LAST:
                        return i, True
                    self.state = self.SIZE
        return n, False
