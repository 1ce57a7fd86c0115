"""A backend of your own: a RAM disk that stores only the blocks written to, in a dict.

Serve it from the command line, no code of pyvduse's changed:

    pyvduse blk --name sparse0 --backend examples/sparse_ram.py:SparseRam \\
                --backend-arg size=1G --backend-arg block=4096

A 1 GiB disk then costs memory only for the data written (``allocated`` says how much);
discarded and zeroed blocks are dropped again. docs/writing-a-backend.md walks through it.
"""

from __future__ import annotations

from pyvduse import Backend


class SparseRam(Backend):
    """``size`` bytes of RAM, allocated ``block`` bytes at a time as they are written."""

    kind = "sparse-ram"

    def __init__(self, size: int, block: int = 4096) -> None:
        if size <= 0 or block <= 0 or size % block:
            raise ValueError(f"size {size} must be a positive multiple of block {block}")
        self._size = size
        self.block = block
        self.blocks: dict[int, bytearray] = {}  # block number -> its bytes

    @property
    def size(self) -> int:
        return self._size

    @property
    def allocated(self) -> int:
        """Bytes of RAM the disk's data takes."""
        return len(self.blocks) * self.block

    def _spans(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """(block number, offset in it, length) for each block ``[offset, offset+length)``
        touches."""
        spans = []
        while length > 0:
            n, at = divmod(offset, self.block)
            k = min(self.block - at, length)
            spans.append((n, at, k))
            offset += k
            length -= k
        return spans

    def readv(self, offset: int, bufs: list[memoryview]) -> None:
        for buf in bufs:
            pos = 0
            for n, at, k in self._spans(offset, len(buf)):
                data = self.blocks.get(n)
                buf[pos : pos + k] = data[at : at + k] if data is not None else bytes(k)
                pos += k
            offset += len(buf)

    def writev(self, offset: int, bufs: list[memoryview]) -> None:
        for buf in bufs:
            pos = 0
            for n, at, k in self._spans(offset, len(buf)):
                data = self.blocks.setdefault(n, bytearray(self.block))
                data[at : at + k] = buf[pos : pos + k]
                pos += k
            offset += len(buf)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        for n, at, k in self._spans(offset, length):
            if k == self.block:
                self.blocks.pop(n, None)  # a whole block: drop it, it reads as zeroes
            elif n in self.blocks:
                self.blocks[n][at : at + k] = bytes(k)
