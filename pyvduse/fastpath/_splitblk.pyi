# Types of the C extension (_splitblk.c).
from collections.abc import Callable, Sequence
from typing import Any

RUN_STOPPED: int
RUN_DEFER: int
BACKEND_NULL: int
BACKEND_FD: int
BACKEND_MEMORY: int

class Engine:
    started: int
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
    ) -> None: ...
    def run(self, kick_fd: int, stop_fd: int) -> int: ...
    def request_stop(self) -> None: ...
    def close(self) -> None: ...
    def set_regions(self, regions: Sequence[tuple[int, int, Any, bool]]) -> None: ...
    def position(self) -> tuple[int, int, int, int]: ...
    def set_position(self, last_avail: int, used_idx: int, signalled: int, /) -> None: ...
    def counters(self) -> dict[str, Any]: ...
