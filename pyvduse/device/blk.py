"""virtio-blk: the block device model (virtio 1.2 section 5.2).

Requests are parsed from the chain's byte streams, not from descriptor boundaries, so any
layout the driver chooses works: the 16-byte header at the start of the readable bytes, the
status in the last writable byte, data in between. Every sector range is checked against the
capacity before the backend is touched.
"""

from __future__ import annotations

import array
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from pyvduse.abi import virtio_blk as vb
from pyvduse.abi.virtio import (
    F_RING_EVENT_IDX,
    F_RING_INDIRECT_DESC,
    F_RING_PACKED,
    DeviceId,
    bit,
)
from pyvduse.backend.base import Backend
from pyvduse.device.base import REQUIRED_FEATURES, DeviceSpec, VirtioDevice
from pyvduse.ratelimit import RateLimitedLogger
from pyvduse.ring.chain import Chain
from pyvduse.ring.iovec import gather, slice_segments, total

log = logging.getLogger(__name__)
bad_request_log = RateLimitedLogger(log)

_OUTHDR = vb.OUTHDR
_SEG = vb.DISCARD_SEGMENT
OK, IOERR, UNSUPP = vb.ReqStatus.OK, vb.ReqStatus.IOERR, vb.ReqStatus.UNSUPP
T_IN, T_OUT, T_FLUSH, T_GET_ID = vb.ReqType.IN, vb.ReqType.OUT, vb.ReqType.FLUSH, vb.ReqType.GET_ID
T_DISCARD, T_WRITE_ZEROES = vb.ReqType.DISCARD, vb.ReqType.WRITE_ZEROES

MAX_DISCARD_SECTORS = 1 << 22  # 2 GiB per segment
MAX_DISCARD_SEG = 32


class BlkConfigError(ValueError):
    """The options cannot describe a valid virtio-blk device."""


@dataclass
class BlkOptions:
    """What the user can choose about a block device."""

    readonly: bool = False
    block_size: int = 512
    serial: str = ""
    num_queues: int = 1
    queue_size: int = 256
    packed: bool = False
    discard: bool = True
    write_zeroes: bool = True
    extra_features: int = 0


@dataclass
class BlkStats:
    """Request counters of one queue (kept cheap: plain integer adds by its worker only)."""

    by_type: dict[int, int] = field(default_factory=dict)
    errors: int = 0  # requests completed with a status other than OK
    bad_chains: int = 0  # malformed requests (no header, no status byte, bad chain)
    bytes_read: int = 0
    bytes_written: int = 0

    def add(self, other: BlkStats) -> None:
        for rtype, n in list(other.by_type.items()):
            self.by_type[rtype] = self.by_type.get(rtype, 0) + n
        self.errors += other.errors
        self.bad_chains += other.bad_chains
        self.bytes_read += other.bytes_read
        self.bytes_written += other.bytes_written


class BlkDevice(VirtioDevice):
    """A virtio-blk device serving a ``Backend``."""

    def __init__(self, backend: Backend, options: BlkOptions | None = None) -> None:
        super().__init__()
        self.backend = backend
        self.options = opts = options or BlkOptions()
        if opts.block_size not in (512, 1024, 2048, 4096):
            raise BlkConfigError(f"block size {opts.block_size} must be 512, 1024, 2048 or 4096")
        if backend.size <= 0 or backend.size % opts.block_size:
            raise BlkConfigError(
                f"size {backend.size} is not a positive multiple of the block size "
                f"{opts.block_size}"
            )
        if not 1 <= opts.num_queues <= 64:
            raise BlkConfigError(f"queue count {opts.num_queues} must be 1 to 64")
        qs = opts.queue_size
        if not (2 <= qs <= 32768 and qs & (qs - 1) == 0):
            raise BlkConfigError(f"queue size {qs} must be a power of two from 2 to 32768")
        if len(opts.serial.encode()) > vb.ID_BYTES:
            raise BlkConfigError(f"serial is longer than {vb.ID_BYTES} bytes")
        self.serial = opts.serial.encode().ljust(vb.ID_BYTES, b"\0")
        #: The capacity in one 8-byte cell, so a native data path reads it as it changes.
        self.capacity_cell = array.array("Q", [backend.size])
        #: One ``BlkStats`` per queue, written only by that queue's worker (no lock).
        self.queue_stats = [BlkStats() for _ in range(opts.num_queues)]
        #: Per queue, the counters of an engine serving it outside Python (see fastpath).
        self.stats_sources: dict[int, Callable[[], BlkStats]] = {}

    @property
    def capacity_bytes(self) -> int:
        return self.capacity_cell[0]

    @capacity_bytes.setter
    def capacity_bytes(self, value: int) -> None:
        self.capacity_cell[0] = value

    def queue_snapshot(self, queue: int) -> BlkStats:
        """The counters of one queue, including those of a native engine serving it."""
        out = BlkStats()
        out.add(self.queue_stats[queue])
        source = self.stats_sources.get(queue)
        if source is not None:
            out.add(source())
        return out

    @property
    def stats(self) -> BlkStats:
        """All queues' counters added up (a snapshot)."""
        out = BlkStats()
        for i in range(len(self.queue_stats)):
            out.add(self.queue_snapshot(i))
        return out

    # -- identity -----------------------------------------------------------------------

    def offered_features(self) -> int:
        o = self.options
        f = REQUIRED_FEATURES | bit(F_RING_EVENT_IDX) | bit(F_RING_INDIRECT_DESC)
        f |= bit(vb.F_SEG_MAX) | bit(vb.F_BLK_SIZE) | bit(vb.F_TOPOLOGY) | bit(vb.F_FLUSH)
        if o.packed:
            f |= bit(F_RING_PACKED)
        if o.num_queues > 1:
            f |= bit(vb.F_MQ)
        if o.readonly:
            f |= bit(vb.F_RO)
        else:
            if o.discard:
                f |= bit(vb.F_DISCARD)
            if o.write_zeroes:
                f |= bit(vb.F_WRITE_ZEROES)
        return f | o.extra_features

    def config(self) -> vb.BlkConfig:
        o = self.options
        lbs = o.block_size // vb.SECTOR_SIZE
        return vb.BlkConfig(
            capacity=self.capacity_bytes // vb.SECTOR_SIZE,
            seg_max=max(o.queue_size - 2, 1),
            blk_size=o.block_size,
            min_io_size=1,
            opt_io_size=0,
            num_queues=o.num_queues,
            max_discard_sectors=MAX_DISCARD_SECTORS,
            max_discard_seg=MAX_DISCARD_SEG,
            discard_sector_alignment=lbs,
            max_write_zeroes_sectors=MAX_DISCARD_SECTORS,
            max_write_zeroes_seg=MAX_DISCARD_SEG,
            write_zeroes_may_unmap=1,
        )

    def spec(self) -> DeviceSpec:
        return DeviceSpec(
            device_id=DeviceId.BLOCK,
            features=self.offered_features(),
            config=self.config().pack(),
            num_queues=self.options.num_queues,
            queue_size=self.options.queue_size,
        )

    def set_capacity(self, size_bytes: int) -> None:
        """Change the capacity seen by the driver (config update + config interrupt).

        Safe while queues run: requests are range-checked against ``capacity_bytes``, which
        changes in one store; when shrinking, the caller frees the storage only after this.
        """
        if size_bytes <= 0 or size_bytes % self.options.block_size:
            raise BlkConfigError(f"size {size_bytes} is not a multiple of the block size "
                                 f"{self.options.block_size}")
        self.capacity_bytes = size_bytes
        self.update_config(vb.CAPACITY_OFFSET, (size_bytes // vb.SECTOR_SIZE).to_bytes(8, "little"))

    # -- requests -----------------------------------------------------------------------

    def handle(self, queue: int, chain: Chain) -> int:
        st = self.queue_stats[queue]
        writable = chain.writable
        readable = chain.readable
        if chain.error is not None:
            st.bad_chains += 1
            bad_request_log.warning("queue %d: bad request %d: %s", queue, chain.head, chain.error)
            return 0
        if not writable or not readable or (len(readable[0]) < _OUTHDR.size
                                            and total(readable) < _OUTHDR.size):
            st.bad_chains += 1
            bad_request_log.warning("queue %d: request %d has no header or no status byte", queue,
                                    chain.head)
            return 0
        last = writable[-1]
        status_byte = last[len(last) - 1 :]
        in_len = (len(last) - 1) if len(writable) == 1 else total(writable) - 1
        rtype, _prio, sector = _OUTHDR.unpack(gather(readable, 0, _OUTHDR.size))
        rtype &= ~vb.T_BARRIER
        counts = st.by_type
        counts[rtype] = counts.get(rtype, 0) + 1
        try:
            status, written = self._dispatch(rtype, sector, readable, writable, in_len, st)
        except OSError as e:
            bad_request_log.warning("queue %d: request type %d at sector %d failed: %s", queue,
                                    rtype, sector, e)
            status, written = IOERR, 0
        except Exception:  # a bug must fail one request, not the queue
            log.exception("queue %d: request type %d failed unexpectedly", queue, rtype)
            status, written = IOERR, 0
        if status:
            st.errors += 1
        status_byte[0] = status
        return written + 1

    def _dispatch(
        self, rtype: int, sector: int, readable: list[memoryview], writable: list[memoryview],
        in_len: int, st: BlkStats,
    ) -> tuple[int, int]:
        if rtype == T_IN:
            offset = sector << vb.SECTOR_SHIFT
            if not self._in_range(offset, in_len):
                return IOERR, 0
            if in_len:
                self.backend.readv(offset, slice_segments(writable, 0, in_len))
            st.bytes_read += in_len
            return OK, in_len
        if rtype == T_OUT:
            if self.options.readonly:
                return IOERR, 0
            offset = sector << vb.SECTOR_SHIFT
            out_len = total(readable) - _OUTHDR.size
            if not self._in_range(offset, out_len):
                return IOERR, 0
            if out_len:
                self.backend.writev(offset, slice_segments(readable, _OUTHDR.size,
                                                           _OUTHDR.size + out_len))
            st.bytes_written += out_len
            return OK, 0
        if rtype == T_FLUSH:
            if not self.options.readonly:
                self.backend.flush()
            return OK, 0
        if rtype == T_GET_ID:
            n = min(in_len, vb.ID_BYTES)
            if n:
                pos = 0
                for seg in slice_segments(writable, 0, n):
                    seg[:] = self.serial[pos : pos + len(seg)]
                    pos += len(seg)
            return OK, n
        if rtype in (T_DISCARD, T_WRITE_ZEROES):
            return self._discard_or_zero(rtype, readable), 0
        return UNSUPP, 0

    def _in_range(self, offset: int, length: int) -> bool:
        return length >= 0 and offset + length <= self.capacity_bytes

    def _discard_or_zero(self, rtype: int, readable: list[memoryview]) -> int:
        if self.options.readonly:
            return IOERR
        feature = vb.F_DISCARD if rtype == T_DISCARD else vb.F_WRITE_ZEROES
        negotiated = self.features or self.spec().features  # unit tests may skip negotiation
        if not negotiated >> feature & 1:
            return UNSUPP
        payload = gather(readable, _OUTHDR.size, total(readable) - _OUTHDR.size)
        nseg, rest = divmod(len(payload), _SEG.size)
        if nseg == 0 or rest or nseg > MAX_DISCARD_SEG:
            return IOERR
        segments = [_SEG.unpack_from(payload, i * _SEG.size) for i in range(nseg)]
        for sector, num, flags in segments:
            offset, length = sector << vb.SECTOR_SHIFT, num << vb.SECTOR_SHIFT
            if num > MAX_DISCARD_SECTORS or not self._in_range(offset, length):
                return IOERR
            if rtype == T_DISCARD and flags:
                return UNSUPP  # no flags are defined for discard
            if rtype == T_WRITE_ZEROES and flags & ~vb.WRITE_ZEROES_FLAG_UNMAP:
                return UNSUPP
        for sector, num, flags in segments:
            offset, length = sector << vb.SECTOR_SHIFT, num << vb.SECTOR_SHIFT
            if rtype == T_DISCARD:
                self.backend.discard(offset, length)
            else:
                self.backend.write_zeroes(offset, length,
                                          bool(flags & vb.WRITE_ZEROES_FLAG_UNMAP))
        return OK
