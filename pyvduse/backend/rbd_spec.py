"""What a user names for ``--rbd`` (``POOL/IMAGE[@SNAP]``) and the Ceph options pyvduse sets
unless told otherwise; apart from ``rbd.py`` so that the command line reads them without
loading ctypes and librbd."""

from __future__ import annotations

from dataclasses import dataclass

#: Options set before the user's (which override them): how long a request waits for an
#: OSD (and a monitor command for the monitor) before failing, and how long connecting
#: waits for the monitors. An OSD or monitor restart takes seconds: these leave a wide margin.
DEFAULT_OPTIONS = {
    "rados_osd_op_timeout": "60",
    "rados_mon_op_timeout": "60",
    "client_mount_timeout": "30",
}


@dataclass(frozen=True)
class RbdImage:
    """``POOL/IMAGE[@SNAP]``."""

    pool: str
    image: str
    snap: str | None = None

    @classmethod
    def parse(cls, text: str) -> RbdImage:
        spec, at, snap = text.partition("@")
        pool, slash, image = spec.partition("/")
        if not slash or not pool or not image or "/" in image or (at and not snap):
            raise ValueError(f"{text!r} is not POOL/IMAGE or POOL/IMAGE@SNAP")
        return cls(pool, image, snap if at else None)

    def __str__(self) -> str:
        return f"{self.pool}/{self.image}" + (f"@{self.snap}" if self.snap else "")


__all__ = ["DEFAULT_OPTIONS", "RbdImage"]
