"""How the queue loops trade CPU, interrupts and latency: one value object, set from the
command line (``--data-path``, ``--poll-us``, ``--publish-us``) and read by the runtime."""

from __future__ import annotations

from dataclasses import dataclass

from pyvduse.fastpath.engine import DataPath

#: A round of requests publishes its completions once they are this old (µs), not only at
#: its end: a round of long requests (128 KiB reads: ~400 µs each under emulation) would
#: otherwise leave the driver idle until the last one, then the device idle while the
#: driver catches up. Short requests still go out together, one interrupt per round.
PUBLISH_AFTER_US = 30
#: The largest --poll-us / --publish-us (one second).
MAX_US = 1_000_000


@dataclass(frozen=True)
class QueueTuning:
    """Knobs of the queue workers; the defaults suit both the real kernel and the model."""

    #: Who serves the queues: the native loop where it can (AUTO), or always Python.
    data_path: DataPath = DataPath.AUTO
    #: Native queues: when a ring runs empty, watch it this long before sleeping.
    poll_us: int = 0
    #: Publish a round's completions (and maybe interrupt) once the oldest is this old.
    publish_us: int = PUBLISH_AFTER_US

    def __post_init__(self) -> None:
        for name in ("poll_us", "publish_us"):
            value = getattr(self, name)
            if not 0 <= value <= MAX_US:
                raise ValueError(f"{name} {value} must be 0 to {MAX_US}")
