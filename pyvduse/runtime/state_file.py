"""The per-device state file: identity plus one in-flight log per queue, memory-mapped.

It lives under ``/run/pyvduse/NAME/state`` by default (``--state-dir``). Writes to the shared
mapping reach the page cache at once, so they survive the daemon being killed; they are not
meant to survive a reboot (nor does the VDUSE device). The identity (backend, size, features,
queue geometry) makes a restart with a different configuration fail clearly instead of
replaying one disk's log onto another.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pyvduse.ring.inflight import InflightLog, log_size
from pyvduse.ring.inflight_packed import packed_log_size

MAGIC = b"PYVDUSE-STATE-2\n"  # 2: packed logs keep requests by buffer id (any order)
MAGIC_FAMILY = b"PYVDUSE-STATE-"
HEADER_SIZE = 4096
DEFAULT_STATE_DIR = Path("/run/pyvduse")


class IdentityMismatch(Exception):
    """The state file belongs to a device configured differently."""

    def __init__(self, diffs: dict[str, tuple[Any, Any]]) -> None:
        self.diffs = diffs
        what = ", ".join(f"{k} was {a!r}, now {b!r}" for k, (a, b) in sorted(diffs.items()))
        super().__init__(what)


class StateFile:
    """Opens or creates the state file of one device."""

    def __init__(self, path: Path, identity: dict[str, Any], num_queues: int, queue_size: int) -> None:
        self.path = path
        self.identity = identity
        self.num_queues = num_queues
        self.queue_size = queue_size
        self._stride = -(-max(log_size(queue_size), packed_log_size(queue_size)) // 64) * 64
        size = HEADER_SIZE + self._stride * num_queues
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            self.existed = os.fstat(fd).st_size >= HEADER_SIZE
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED)
        finally:
            os.close(fd)
        self.mem = memoryview(self._map)

    @classmethod
    def for_device(
        cls, name: str, state_dir: Path, identity: dict[str, Any], num_queues: int, queue_size: int
    ) -> StateFile:
        return cls(state_dir / name / "state", identity, num_queues, queue_size)

    def stored_identity(self) -> dict[str, Any] | None:
        return _parse_identity(bytes(self.mem[:HEADER_SIZE]))

    @staticmethod
    def peek_identity(path: Path) -> dict[str, Any] | None:
        """The identity a state file holds, read without opening it for use (None: no file,
        or none in it)."""
        try:
            with open(path, "rb") as f:
                return _parse_identity(f.read(HEADER_SIZE))
        except (OSError, IdentityMismatch):
            return None

    def check_identity(self) -> None:
        """Raise IdentityMismatch if the file describes another configuration."""
        stored = self.stored_identity()
        if stored is None:
            return
        diffs = {k: (stored.get(k), v) for k, v in self.identity.items() if stored.get(k) != v}
        if diffs:
            raise IdentityMismatch(diffs)

    def write_identity(self) -> None:
        raw = json.dumps(self.identity, sort_keys=True).encode()
        if len(MAGIC) + 4 + len(raw) > HEADER_SIZE:
            raise ValueError("identity too large")
        self.mem[:HEADER_SIZE] = bytes(HEADER_SIZE)
        self.mem[len(MAGIC) : len(MAGIC) + 4] = len(raw).to_bytes(4, "little")
        self.mem[len(MAGIC) + 4 : len(MAGIC) + 4 + len(raw)] = raw
        self.mem[: len(MAGIC)] = MAGIC

    def region(self, queue: int, num: int) -> memoryview:
        """The bytes of ``queue``'s log (ring size ``num`` as the driver chose it)."""
        if not 0 <= queue < self.num_queues or num > self.queue_size:
            raise ValueError("queue outside the state file")
        start = HEADER_SIZE + self._stride * queue
        return self.mem[start : start + self._stride]

    def log(self, queue: int, num: int) -> InflightLog:
        """The split-ring in-flight log of ``queue``."""
        return InflightLog(self.region(queue, num), num)

    @property
    def irq_masks_path(self) -> Path:
        return self.path.with_name("irq-masks.json")

    def load_irq_masks(self) -> dict[int, list[int]]:
        """Each queue's interrupt CPUs as the driver set them, kept by an earlier daemon of
        the device ({}: none, or not readable as such)."""
        try:
            raw = json.loads(self.irq_masks_path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(raw, dict):
            return {}
        masks: dict[int, list[int]] = {}
        for key, cpus in raw.items():
            if (
                isinstance(key, str)
                and key.isdigit()
                and isinstance(cpus, list)
                and cpus
                and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in cpus)
            ):
                masks[int(key)] = sorted(set(cpus))
        return masks

    def save_irq_masks(self, masks: Mapping[int, list[int]]) -> None:
        """Keep the driver's masks for a daemon that resumes the device (written whole, then
        renamed, so a kill leaves the old file or the new one)."""
        tmp = self.irq_masks_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({str(q): sorted(cpus) for q, cpus in masks.items()}))
        os.replace(tmp, self.irq_masks_path)

    def remove(self) -> None:
        """The device is gone for good (clean shutdown): nothing to recover."""
        self.close()
        for extra in (self.irq_masks_path, self.irq_masks_path.with_suffix(".tmp")):
            with contextlib.suppress(OSError):
                extra.unlink()
        with contextlib.suppress(OSError):
            self.path.unlink()
            self.path.parent.rmdir()

    def close(self) -> None:
        # Logs still referenced by a worker being torn down keep the mapping until collected.
        with contextlib.suppress(BufferError, ValueError):
            self.mem.release()
            self._map.close()


def _parse_identity(header: bytes) -> dict[str, Any] | None:
    magic = header[: len(MAGIC)]
    if magic != MAGIC:
        if magic.startswith(MAGIC_FAMILY):  # another pyvduse's layout: do not guess
            raise IdentityMismatch(
                {"state file format": (magic.decode(errors="replace").strip(), MAGIC.decode().strip())}
            )
        return None
    n = int.from_bytes(header[len(MAGIC) : len(MAGIC) + 4], "little")
    raw = header[len(MAGIC) + 4 : len(MAGIC) + 4 + n]
    try:
        stored = json.loads(raw)
    except ValueError:
        return None
    return stored if isinstance(stored, dict) else None
