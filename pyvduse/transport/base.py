"""The one interface between a device runtime and whatever plays the kernel's half.

A transport owns the control path: it creates the device from its ``DeviceSpec``, answers the
driver's status changes by calling a ``DeviceEvents`` (the runtime), and gives the runtime
what the data path needs: driver memory, one kick fd per queue, a way to interrupt the
driver and a way to change config space. The real kernel (``/dev/vduse``) and the in-process
model implement it alike, so devices never know which one they run on.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Protocol

from pyvduse.ring.memory import GuestMemory


@dataclass(frozen=True)
class QueueSetup:
    """A virtqueue as the driver configured it (VDUSE_VQ_GET_INFO)."""

    index: int
    num: int
    desc_addr: int
    driver_addr: int
    device_addr: int
    ready: bool
    avail_index: int = 0  # split: where the device resumes taking requests
    # packed: (last_avail_counter, last_avail_idx, last_used_counter, last_used_idx)
    packed_state: tuple[int, int, int, int] = (1, 0, 1, 0)


class DeviceEvents(Protocol):
    """Called by a transport's control thread; each call returns when it is done."""

    def features_ok(self, features: int) -> bool:
        """The driver set FEATURES_OK: accept (True) or refuse these features."""
        ...

    def driver_ok(self, features: int, queues: list[QueueSetup], resume: bool = False) -> None:
        """The driver set DRIVER_OK: start serving the ready queues.

        ``resume``: the driver set it long ago and a new daemon takes over where a dead one
        stopped (the in-flight log says where).
        """
        ...

    def reset(self) -> None:
        """Status 0: stop every queue and forget all ring state before returning."""
        ...

    def queue_state(self, index: int) -> tuple[int, ...]:
        """Where queue ``index`` stands: ``(avail_index,)`` split or the packed 4-tuple."""
        ...


class Transport(ABC):
    """The kernel half of a device as the runtime sees it."""

    @property
    @abstractmethod
    def memory(self) -> GuestMemory:
        """Driver memory; valid between DRIVER_OK and the next reset."""

    @abstractmethod
    def kick_fd(self, index: int) -> int:
        """An eventfd that becomes readable when the driver kicks queue ``index``."""

    @abstractmethod
    def notify(self, index: int) -> None:
        """Send a used-buffer notification (interrupt) for queue ``index``."""

    def reply_timeout(self) -> float | None:
        """How long the kernel waits for the answer to a control message (seconds), when
        known: a reset or an unmap must be answered within it even while requests hang."""
        return None

    def interrupt_cpus(self, index: int) -> list[int] | None:
        """The CPUs queue ``index``'s interrupts are handled on, when the transport can
        tell (for ``status``); None when it cannot."""
        return None

    def irq_follow(self, index: int) -> tuple[str, list[int]] | None:
        """``(file, cpus)``: the data path writes its own CPU to the file when it runs on one
        of ``cpus``, so that queue ``index``'s interrupts follow it (``--irq-cpus follow``);
        None: they stay where they were put."""
        return None

    def irq_ioctl(self, index: int) -> tuple[int, int] | None:
        """``(fd, request)``: an ioctl taking the u32 queue index that interrupts the
        driver, for a native data path to call without Python; None: use ``notify``."""
        return None

    @abstractmethod
    def set_config(self, offset: int, data: bytes) -> None:
        """Change config space and raise the config-change interrupt."""

    @abstractmethod
    def close(self) -> None:
        """Stop serving: reset the device's runtime, detach and remove what was created."""
