"""Pin pyvduse.abi.fuse to the kernel's <linux/fuse.h> and <linux/virtio_fs.h> on this
machine (linux-libc-dev): every struct's size and every field's offset, every opcode and
flag the header defines."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pyvduse.abi import fuse
from tests.unit.c_header import c_values

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")

#: Array members, spelled as numbered fields (unused_3) in Python.
ARRAYS = ("unused", "spare")

FLAG_NAMES = [
    "ASYNC_READ",
    "POSIX_LOCKS",
    "FILE_OPS",
    "ATOMIC_O_TRUNC",
    "EXPORT_SUPPORT",
    "BIG_WRITES",
    "DONT_MASK",
    "SPLICE_WRITE",
    "SPLICE_MOVE",
    "SPLICE_READ",
    "FLOCK_LOCKS",
    "HAS_IOCTL_DIR",
    "AUTO_INVAL_DATA",
    "DO_READDIRPLUS",
    "READDIRPLUS_AUTO",
    "ASYNC_DIO",
    "WRITEBACK_CACHE",
    "NO_OPEN_SUPPORT",
    "PARALLEL_DIROPS",
    "HANDLE_KILLPRIV",
    "POSIX_ACL",
    "ABORT_ERROR",
    "MAX_PAGES",
    "CACHE_SYMLINKS",
    "NO_OPENDIR_SUPPORT",
    "EXPLICIT_INVAL_DATA",
    "MAP_ALIGNMENT",
    "SUBMOUNTS",
    "HANDLE_KILLPRIV_V2",
    "SETXATTR_EXT",
    "INIT_EXT",
    "INIT_RESERVED",
    "SECURITY_CTX",
    "HAS_INODE_DAX",
    "FATTR_MODE",
    "FATTR_UID",
    "FATTR_GID",
    "FATTR_SIZE",
    "FATTR_ATIME",
    "FATTR_MTIME",
    "FATTR_FH",
    "FATTR_ATIME_NOW",
    "FATTR_MTIME_NOW",
    "FATTR_LOCKOWNER",
    "FATTR_CTIME",
    "FATTR_KILL_SUIDGID",
    "FOPEN_DIRECT_IO",
    "FOPEN_KEEP_CACHE",
    "FOPEN_NONSEEKABLE",
    "FOPEN_CACHE_DIR",
    "FOPEN_STREAM",
    "FOPEN_NOFLUSH",
    "GETATTR_FH",
    "FSYNC_FDATASYNC",
    "RELEASE_FLUSH",
    "READ_LOCKOWNER",
    "WRITE_CACHE",
    "WRITE_LOCKOWNER",
    "WRITE_KILL_SUIDGID",
    "MIN_READ_BUFFER",
    "NAME_OFFSET",
    "ROOT_ID",
    "KERNEL_VERSION",
    "KERNEL_MINOR_VERSION",
]


def c_name(name: str) -> str:
    """The header's name of a constant: FATTR_ and FOPEN_ ones have no FUSE_ prefix."""
    return name if name.startswith(("FATTR_", "FOPEN_")) else f"FUSE_{name}"


def c_field(field: str) -> str:
    """``unused_3`` -> ``unused[3]`` (array members), else the name itself."""
    base, _, index = field.rpartition("_")
    if base in ARRAYS and index.isdigit():
        return f"{base}[{index}]"
    return field


def test_layouts_match_the_header(tmp_path: Path) -> None:
    exprs = []
    for name, layout in fuse.LAYOUTS.items():
        exprs.append(f"sizeof(struct {name})")
        exprs += [f"offsetof(struct {name}, {c_field(f)})" for f in layout.fields]
    values = c_values(tmp_path, "linux/fuse.h", exprs, [])
    for name, layout in fuse.LAYOUTS.items():
        assert values[f"sizeof(struct {name})"] == layout.size, name
        for f in layout.fields:
            assert values[f"offsetof(struct {name}, {c_field(f)})"] == layout.offsets[f], (name, f)


def test_opcodes_and_flags_match_the_header(tmp_path: Path) -> None:
    opcodes = [f"FUSE_{op.name}" for op in fuse.Opcode]
    flags = [c_name(n) for n in FLAG_NAMES]
    values = c_values(tmp_path, "linux/fuse.h", opcodes, flags)
    for op in fuse.Opcode:
        assert values[f"FUSE_{op.name}"] == op.value, op
    for n in FLAG_NAMES:
        assert c_name(n) in values, n  # every one we define is in the 7.38 header
        value = values[c_name(n)]
        if value < 0:  # (1 << 31) is a negative int in C
            value &= 0xFFFFFFFF
        assert value == getattr(fuse, n), n


def test_compat_sizes_match_the_header(tmp_path: Path) -> None:
    values = c_values(
        tmp_path,
        "linux/fuse.h",
        ["offsetof(struct fuse_init_in, flags2)"],
        ["FUSE_COMPAT_SETXATTR_IN_SIZE", "FUSE_COMPAT_INIT_OUT_SIZE"],
    )
    assert values["offsetof(struct fuse_init_in, flags2)"] == fuse.INIT_IN_SIZE_COMPAT
    if "FUSE_COMPAT_SETXATTR_IN_SIZE" in values:
        assert values["FUSE_COMPAT_SETXATTR_IN_SIZE"] == fuse.SETXATTR_IN_SIZE_COMPAT


def test_dirent_size() -> None:
    assert [fuse.dirent_size(n) for n in (0, 1, 8, 9)] == [24, 32, 32, 40]


def test_virtio_fs_config_matches_the_header(tmp_path: Path) -> None:
    values = c_values(
        tmp_path,
        "linux/virtio_fs.h",
        [
            "sizeof(struct virtio_fs_config)",
            "offsetof(struct virtio_fs_config, num_request_queues)",
            "sizeof(((struct virtio_fs_config *)0)->tag)",
        ],
        [],
    )
    assert values["sizeof(struct virtio_fs_config)"] == fuse.FS_CONFIG_SIZE == 40
    assert values["offsetof(struct virtio_fs_config, num_request_queues)"] == fuse.TAG_SIZE
    assert values["sizeof(((struct virtio_fs_config *)0)->tag)"] == fuse.TAG_SIZE
    raw = fuse.fs_config("myfs", 2)
    assert raw[:4] == b"myfs" and raw[4:36] == bytes(32) and raw[36:] == (2).to_bytes(4, "little")
    with pytest.raises(ValueError):
        fuse.fs_config("x" * 37, 1)
    with pytest.raises(ValueError):
        fuse.fs_config("", 1)
