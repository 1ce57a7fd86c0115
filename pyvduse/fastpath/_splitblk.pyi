# Types of the C extension (_splitblk.c and the files it names; _splitblk_uring is the same
# engine built with io_uring, _splitblk_full with io_uring and libnbd, with the same
# interface).
from collections.abc import Sequence
from typing import Any

from pyvduse.fastpath.config import EngineConfig

RUN_STOPPED: int
RUN_DEFER: int
RUN_NBD_LOST: int
BACKEND_NULL: int
BACKEND_FD: int
BACKEND_MEMORY: int
BACKEND_NBD: int
BACKEND_TAP: int
DEV_BLK: int
DEV_NET_RX: int
DEV_NET_TX: int
AIO_SYNC: int
AIO_URING: int
AIO_NBD: int
HAS_URING: int  # 1 in _splitblk_uring and _splitblk_full, 0 in _splitblk
HAS_NBD: int  # 1 in _splitblk_full

class Engine:
    #: monotonic ns when the oldest request in flight was taken, 0 when none is
    started: int
    #: AIO_NBD for an NBD engine, AIO_URING when its requests go to io_uring, else AIO_SYNC
    aio: int
    #: NBD requests waiting for a connection (see set_nbd, fail_parked)
    parked: int
    # Everything the engine is built from, in groups (ring, device, storage, interrupts,
    # tuning, test): see config.py for each field. A missing or mistyped attribute is a
    # TypeError naming it, a value out of range a ValueError; AIO_URING is a ValueError in
    # a build without liburing and OSError(errno) when the kernel refuses io_uring
    # (io_uring_disabled, seccomp); BACKEND_NBD a ValueError without libnbd.
    #
    # The file backend (storage.kind BACKEND_FD): with tuning.aio AIO_URING, reads, writes
    # and flushes go to io_uring, up to num in flight, completed out of order. With
    # storage.direct (O_DIRECT), requests whose buffers are not multiples of dio_align
    # (address and length) are copied through aligned buffers of the engine; ones at an
    # offset or of a length not aligned go to Python (RUN_DEFER). A transfer between the
    # file and driver memory that fails with EFAULT (memory the kernel cannot pin: VDUSE's
    # bounce pages, for a FUSE file in direct-I/O mode or O_DIRECT) is redone through a
    # buffer and the engine copies every request from then on (counters: efaults,
    # bounce_all). The in-flight map (ring.inflight): byte [head] is 1 while head is taken
    # and not completed (set at take, cleared at push); a head offered while its byte is 1
    # is left to Python.
    #
    # A virtio-net queue (device.kind DEV_NET_RX or DEV_NET_TX, storage.kind BACKEND_TAP):
    # see splitblk_net.c. Frames are served inline; a receive buffer is taken only when a
    # frame fills it, so none is ever in flight between two calls.
    def __init__(self, config: EngineConfig, /) -> None: ...
    # Serves until stopped (RUN_STOPPED), the next chain is for Python (RUN_DEFER) or the NBD
    # connection was lost with requests parked on it (RUN_NBD_LOST); any may leave requests
    # in flight (in io_uring, at the NBD server); everything pushed is published first. On the
    # main thread, a signal handler that raises while it waits (Ctrl-C, a test's timeout)
    # ends it as a stop does, and it raises that; so does wait_idle().
    def run(self, kick_fd: int, stop_fd: int) -> int: ...
    def request_stop(self) -> None: ...
    def request_pause(self) -> None: ...
    def resume(self) -> None: ...
    # Raises RuntimeError while requests are in flight (wait_idle or abandon first).
    def close(self) -> None: ...
    # Also with requests in flight (when run() is not running): the old regions' buffers are
    # kept until every request taken before the call has completed.
    def set_regions(self, regions: Sequence[tuple[int, int, Any, bool]]) -> None: ...
    # (last_avail, used_idx, signalled, log_seq, avail_seen): avail_seen is avail->idx as
    # the engine last read it (it reads it again only once it has taken that far)
    def position(self) -> tuple[int, int, int, int, int]: ...
    # Also before wait_idle() when Python moved the ring meanwhile: completions are pushed
    # at the used index the engine holds. avail_seen: as position() gives it (the ring the
    # engine takes over from); without it, or one more than num ahead of last_avail,
    # avail->idx is read again before anything is taken.
    def set_position(
        self, last_avail: int, used_idx: int, signalled: int, avail_seen: int = ..., /
    ) -> None: ...
    # Keys: started, completed, latency_ns (sum of the per-request latencies), latency (64
    # log2 buckets of µs, take to push), by_type, errors, bytes_read, bytes_written,
    # in_flight, depth_hist (64 buckets: at each take, bit_length(requests in flight then)),
    # taken (requests taken so far), oldest_taken (the take number, 1-based, of the oldest
    # request in flight; 0: none), bounced (requests copied through the engine's buffers),
    # efaults (direct transfers redone through a buffer after EFAULT), bounce_all (1: every
    # request is copied now), inline (io_uring requests served inline with RWF_NOWAIT),
    # budget_sleeps (times the budget was spent and the loop waited for a kick), net (a
    # virtio-net queue's frames: packets and bytes of frame data moved, drops, errors of
    # the TAP's reads and writes).
    def counters(self) -> dict[str, Any]: ...
    # Requests taken and not yet completed.
    def in_flight(self) -> int: ...
    # When run() is not running: reap completions (pushing and publishing them, interrupt
    # included) until none is in flight or timeout_ns passed; returns how many still are.
    def wait_idle(self, timeout_ns: int, /) -> int: ...
    # When run() is not running: from now on the engine writes neither driver memory nor the
    # log nor the in-flight map and never interrupts; what still completes is dropped
    # (wait_idle counts it down); it asks the kernel to cancel what it can. run() refuses.
    def abandon(self) -> None: ...
    # The requests in flight now complete with IOERR whatever the backend returns.
    def poison_in_flight(self) -> None: ...
    # When run() is not running: a new NBD connection (an NBD object, or None); the
    # parked requests are sent on it. Completions are pushed and published: take the
    # engine's position into the ring afterwards.
    def set_nbd(self, handle: Any, /) -> None: ...
    # When run() is not running: the parked NBD requests fail with IOERR (published).
    def fail_parked(self) -> None: ...
