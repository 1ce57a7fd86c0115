"""How the queue loops trade CPU, interrupts and latency: one value object, set from the
command line (``--data-path``, ``--poll-us``, ``--publish-us``) and read by the runtime."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pyvduse.runtime.executors import DEFAULT_IO_THREADS, Aio

__all__ = ["DEFAULT_TUNING", "Aio", "DataPath", "QueueTuning"]


class DataPath(enum.Enum):
    """Which engine serves the queues: the user's ``--data-path``."""

    AUTO = "auto"  # the native loop where it can, Python elsewhere
    NATIVE = "native"  # the native loop or refuse to start
    PYTHON = "python"  # the reference engine only


#: A request that took this long (µs) is published at once, with those finished before it,
#: not at the end of its round: a round of long requests (128 KiB reads: ~400 µs each under
#: emulation) would otherwise leave the driver idle until the last one, then the device idle
#: while the driver catches up. Short requests go out together, one interrupt per round,
#: because under emulation an interrupt costs the guest more than a 4 KiB request costs us.
PUBLISH_AFTER_US = 150
#: However short the requests, a round holds none back longer than this (µs).
HOLD_MAX_US = 1000
#: The largest --poll-us / --publish-us (one second).
MAX_US = 1_000_000


@dataclass(frozen=True)
class QueueTuning:
    """Knobs of the queue workers; the defaults suit both the real kernel and the model."""

    #: Who serves the queues: the native loop where it can (AUTO), or always Python.
    data_path: DataPath = DataPath.AUTO
    #: Native queues: when a ring runs empty, watch it this long before sleeping.
    poll_us: int = 0
    #: Publish a round's completions (and maybe interrupt) after a request this long.
    publish_us: int = PUBLISH_AFTER_US
    #: Run each queue's worker thread on the CPUs its interrupts are handled on (when the
    #: transport can tell), so the daemon and the driver's completion work share them and
    #: leave the other CPUs to the application; False: wherever the scheduler puts it.
    workers_on_irq_cpus: bool = False
    #: How blocking backend calls run (``--aio``): the native loop's io_uring, a thread
    #: pool, or inline (one request at a time).
    aio: Aio = Aio.IO_URING
    #: Threads of the pool for ``Aio.THREADS`` (shared by the device's queues).
    io_threads: int = DEFAULT_IO_THREADS

    def __post_init__(self) -> None:
        for name in ("poll_us", "publish_us"):
            value = getattr(self, name)
            if not 0 <= value <= MAX_US:
                raise ValueError(f"{name} {value} must be 0 to {MAX_US}")

    @property
    def python_aio(self) -> Aio:
        """What the Python engine does for ``aio``: it has no io_uring, so threads."""
        return Aio.THREADS if self.aio is Aio.IO_URING else self.aio

    @property
    def hold_us(self) -> int:
        """The longest a round holds a finished request back: never less than publish_us,
        so ``--publish-us 1000000`` still means once per round."""
        return max(self.publish_us, HOLD_MAX_US)


#: The knobs a queue runs with unless told otherwise.
DEFAULT_TUNING = QueueTuning()
