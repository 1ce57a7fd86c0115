"""Filesystems served over virtio-fs: the API users implement (``Filesystem``), the FUSE
session that speaks the protocol for them, and a passthrough of a host directory."""

from pyvduse.fs.api import (
    NOW,
    ROOT,
    Attr,
    Context,
    Created,
    DirEntry,
    Entry,
    Filesystem,
    Opened,
    SetAttr,
    StatFs,
)

__all__ = [
    "NOW",
    "ROOT",
    "Attr",
    "Context",
    "Created",
    "DirEntry",
    "Entry",
    "Filesystem",
    "Opened",
    "SetAttr",
    "StatFs",
]
