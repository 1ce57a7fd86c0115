# Types of the C extension (_splitblk.c and the files it names; _splitblk_uring is the same
# engine built with io_uring, _splitblk_full with io_uring and libnbd, with the same
# interface).
from collections.abc import Callable, Sequence
from typing import Any

RUN_STOPPED: int
RUN_DEFER: int
RUN_NBD_LOST: int
BACKEND_NULL: int
BACKEND_FD: int
BACKEND_MEMORY: int
BACKEND_NBD: int
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
    def __init__(
        self,
        regions: Sequence[tuple[int, int, Any, bool]],
        num: int,
        desc: int,
        avail: int,
        used: int,
        event_idx: bool,
        indirect: bool,
        last_avail: int,
        used_idx: int,
        signalled: int,
        capacity: Any,
        readonly: bool,
        serial: bytes,
        backend: int,
        fd: int = ...,
        memory: Any = ...,
        log: Any = ...,
        irq_fd: int = ...,
        irq_request: int = ...,
        irq_index: int = ...,
        notify: Callable[[int], object] | None = ...,
        on_error: Callable[[int, int, int], object] | None = ...,
        poll_ns: int = ...,
        publish_ns: int = ...,
        hold_ns: int = ...,
        affinity_fd: int = ...,
        follow_mask: int = ...,
        # AIO_SYNC (default) or AIO_URING: the file backend's IN/OUT/FLUSH on io_uring, up to
        # num in flight, completed out of order. ValueError in a build without liburing;
        # OSError(errno) when the kernel refuses io_uring (io_uring_disabled, seccomp).
        aio: int = ...,
        # the fd was opened with O_DIRECT: requests whose buffers are not multiples of
        # dio_align (address and length) are copied through aligned buffers of the engine;
        # ones at an offset or of a length not aligned go to Python (RUN_DEFER). A direct
        # transfer into driver memory that fails with EFAULT is redone through a buffer and
        # the engine copies every request from then on (counters: efaults, bounce_all).
        direct: bool = ...,
        # copy every request of the file backend through the engine's buffers from the start
        bounce: bool = ...,
        dio_align: int = ...,  # a power of two up to 1 MiB; default 512
        # writable, num bytes, shared with the Python ring: byte [head] is 1 while head is
        # taken and not completed (set at take, cleared at push); a head offered while its
        # byte is 1 is left to Python. Without it the engine keeps its own.
        inflight: Any = ...,
        # test-only: requests whose sector & test_gate_mask != 0 are linked behind a
        # one-byte read of test_gate_fd (a pipe), so they start only once the test writes a
        # byte per request there: completions out of order, deterministically.
        test_gate_fd: int = ...,
        test_gate_mask: int = ...,
        # test-only: the next N direct transfers into driver memory complete as if the
        # kernel had failed them with EFAULT
        test_efault: int = ...,
        nowait: bool = ...,
        # backend=BACKEND_NBD with aio=AIO_NBD (only in _splitblk_full): a libnbd handle
        # ready for commands (the binding's NBD object, kept alive by the engine, or its
        # capsule; None: no connection yet), whose socket the engine alone polls; reads,
        # writes and flushes become its asynchronous commands. nbd_fua: writes carry FUA;
        # reads and writes over nbd_max bytes go to Python (RUN_DEFER).
        nbd: Any = ...,
        nbd_fua: bool = ...,
        nbd_max: int = ...,
        # requests taken (or left to Python) between two kicks; 0: 4 * num (ring/budget.py)
        budget: int = ...,
        # test-only: each io_uring request is waited for as soon as it is submitted, so
        # requests complete in the order they were taken (the differential tests)
        test_serial: bool = ...,
    ) -> None: ...
    # Serves until stopped (RUN_STOPPED), the next chain is for Python (RUN_DEFER) or the NBD
    # connection was lost with requests parked on it (RUN_NBD_LOST); any may leave requests
    # in flight (in io_uring, at the NBD server); everything pushed is published first.
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
    def set_position(self, last_avail: int, used_idx: int, signalled: int,
                     avail_seen: int = ..., /) -> None: ...
    # Keys: started, completed, latency_ns (sum of the per-request latencies), latency (64
    # log2 buckets of µs, take to push), by_type, errors, bytes_read, bytes_written,
    # in_flight, depth_hist (64 buckets: at each take, bit_length(requests in flight then)),
    # taken (requests taken so far), oldest_taken (the take number, 1-based, of the oldest
    # request in flight; 0: none), bounced (requests copied through the engine's buffers),
    # efaults (direct transfers redone through a buffer after EFAULT), bounce_all (1: every
    # request is copied now), inline (io_uring requests served inline with RWF_NOWAIT),
    # budget_sleeps (times the budget was spent and the loop waited for a kick).
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
