"""Filesystems served over virtio-fs: the API users implement (``Filesystem``), the FUSE
session that speaks the protocol for them (``FuseSession``), and a passthrough of a host
directory (``Passthrough``). This package is public, as ``pyvduse.testing`` is."""

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
from pyvduse.fs.passthrough import Passthrough
from pyvduse.fs.session import FuseSession

__all__ = [
    "NOW",
    "ROOT",
    "Attr",
    "Context",
    "Created",
    "DirEntry",
    "Entry",
    "Filesystem",
    "FuseSession",
    "Opened",
    "Passthrough",
    "SetAttr",
    "StatFs",
]
