"""The FUSE wire protocol (``<linux/fuse.h>``, protocol 7.38) and the virtio-fs config space.

Every struct is a ``Layout``: named fields over one ``struct.Struct`` (little-endian, the
C layout of x86_64 and of every virtio-fs transport: virtio is little-endian), so a test
can compare each field's offset and the size with the kernel header. A request is the
``fuse_in_header`` then the opcode's arguments; a reply is the ``fuse_out_header`` then its
arguments, ``error`` a negative errno (then nothing follows).
"""

from __future__ import annotations

import struct
from enum import IntEnum

KERNEL_VERSION = 7
#: The minor version pyvduse speaks (and replies with; the kernel takes the lower of its own
#: and ours): 7.38, as in Linux 6.1's header.
KERNEL_MINOR_VERSION = 38
ROOT_ID = 1


class Opcode(IntEnum):
    """``enum fuse_opcode``."""

    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51


# FUSE_INIT flags (fuse_init_in/out.flags; bits 32-63 are flags2).
ASYNC_READ = 1 << 0
POSIX_LOCKS = 1 << 1
FILE_OPS = 1 << 2
ATOMIC_O_TRUNC = 1 << 3
EXPORT_SUPPORT = 1 << 4
BIG_WRITES = 1 << 5
DONT_MASK = 1 << 6
SPLICE_WRITE = 1 << 7
SPLICE_MOVE = 1 << 8
SPLICE_READ = 1 << 9
FLOCK_LOCKS = 1 << 10
HAS_IOCTL_DIR = 1 << 11
AUTO_INVAL_DATA = 1 << 12
DO_READDIRPLUS = 1 << 13
READDIRPLUS_AUTO = 1 << 14
ASYNC_DIO = 1 << 15
WRITEBACK_CACHE = 1 << 16
NO_OPEN_SUPPORT = 1 << 17
PARALLEL_DIROPS = 1 << 18
HANDLE_KILLPRIV = 1 << 19
POSIX_ACL = 1 << 20
ABORT_ERROR = 1 << 21
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
NO_OPENDIR_SUPPORT = 1 << 24
EXPLICIT_INVAL_DATA = 1 << 25
MAP_ALIGNMENT = 1 << 26
SUBMOUNTS = 1 << 27
HANDLE_KILLPRIV_V2 = 1 << 28
SETXATTR_EXT = 1 << 29
INIT_EXT = 1 << 30
INIT_RESERVED = 1 << 31
SECURITY_CTX = 1 << 32
HAS_INODE_DAX = 1 << 33

# fuse_setattr_in.valid
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_LOCKOWNER = 1 << 9
FATTR_CTIME = 1 << 10
FATTR_KILL_SUIDGID = 1 << 11

# fuse_open_out.open_flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NONSEEKABLE = 1 << 2
FOPEN_CACHE_DIR = 1 << 3
FOPEN_STREAM = 1 << 4
FOPEN_NOFLUSH = 1 << 5

# fuse_getattr_in.getattr_flags, fuse_fsync_in.fsync_flags, fuse_release_in.release_flags
GETATTR_FH = 1 << 0
FSYNC_FDATASYNC = 1 << 0
RELEASE_FLUSH = 1 << 0

# fuse_read_in.read_flags, fuse_write_in.write_flags
READ_LOCKOWNER = 1 << 1
WRITE_CACHE = 1 << 0
WRITE_LOCKOWNER = 1 << 1
WRITE_KILL_SUIDGID = 1 << 2

#: The smallest read buffer a daemon must accept from the kernel (FUSE_MIN_READ_BUFFER).
MIN_READ_BUFFER = 8192
#: fuse_dirent's fixed part: ino, off, namelen, type (FUSE_NAME_OFFSET).
NAME_OFFSET = 24
#: The size of a fuse_init_in before protocol 7.36 (INIT_EXT added flags2 and unused[11]).
INIT_IN_SIZE_COMPAT = 16


class Layout:
    """One C struct: field names over a little-endian ``struct.Struct`` format."""

    __slots__ = ("fields", "name", "offsets", "size", "st")

    def __init__(self, name: str, fields: list[tuple[str, str]]) -> None:
        self.name = name
        self.fields = [f for f, _ in fields]
        self.st = struct.Struct("<" + "".join(fmt for _, fmt in fields))
        self.size = self.st.size
        offsets: dict[str, int] = {}
        fmt = "<"
        for field, code in fields:
            offsets[field] = struct.calcsize(fmt)
            fmt += code
        self.offsets = offsets

    def unpack(self, data: bytes | bytearray | memoryview, offset: int = 0) -> tuple[int, ...]:
        """The field values, padding included (the caller checked ``len(data)``)."""
        return self.st.unpack_from(data, offset)

    def pack(self, *values: int) -> bytes:
        return self.st.pack(*values)

    def __repr__(self) -> str:
        return f"<Layout {self.name} {self.size} bytes>"


def _arr(name: str, n: int, code: str = "I") -> list[tuple[str, str]]:
    """``n`` fields ``name_0..`` standing for an array member (``uint32_t unused[n]``)."""
    return [(f"{name}_{i}", code) for i in range(n)]


IN_HEADER = Layout(
    "fuse_in_header",
    [
        ("len", "I"),
        ("opcode", "I"),
        ("unique", "Q"),
        ("nodeid", "Q"),
        ("uid", "I"),
        ("gid", "I"),
        ("pid", "I"),
        ("total_extlen", "H"),
        ("padding", "H"),
    ],
)
OUT_HEADER = Layout("fuse_out_header", [("len", "I"), ("error", "i"), ("unique", "Q")])

ATTR_FIELDS: list[tuple[str, str]] = [
    ("ino", "Q"),
    ("size", "Q"),
    ("blocks", "Q"),
    ("atime", "Q"),
    ("mtime", "Q"),
    ("ctime", "Q"),
    ("atimensec", "I"),
    ("mtimensec", "I"),
    ("ctimensec", "I"),
    ("mode", "I"),
    ("nlink", "I"),
    ("uid", "I"),
    ("gid", "I"),
    ("rdev", "I"),
    ("blksize", "I"),
    ("flags", "I"),
]
ATTR = Layout("fuse_attr", ATTR_FIELDS)
#: A ``struct fuse_attr attr`` member (its fields named as C spells them: ``attr.ino``).
EMBEDDED_ATTR = [(f"attr.{name}", code) for name, code in ATTR_FIELDS]
ENTRY_OUT = Layout(
    "fuse_entry_out",
    [
        ("nodeid", "Q"),
        ("generation", "Q"),
        ("entry_valid", "Q"),
        ("attr_valid", "Q"),
        ("entry_valid_nsec", "I"),
        ("attr_valid_nsec", "I"),
        *EMBEDDED_ATTR,
    ],
)
ATTR_OUT = Layout(
    "fuse_attr_out", [("attr_valid", "Q"), ("attr_valid_nsec", "I"), ("dummy", "I"), *EMBEDDED_ATTR]
)
INIT_IN = Layout(
    "fuse_init_in",
    [
        ("major", "I"),
        ("minor", "I"),
        ("max_readahead", "I"),
        ("flags", "I"),
        ("flags2", "I"),
        *_arr("unused", 11),
    ],
)
INIT_OUT = Layout(
    "fuse_init_out",
    [
        ("major", "I"),
        ("minor", "I"),
        ("max_readahead", "I"),
        ("flags", "I"),
        ("max_background", "H"),
        ("congestion_threshold", "H"),
        ("max_write", "I"),
        ("time_gran", "I"),
        ("max_pages", "H"),
        ("map_alignment", "H"),
        ("flags2", "I"),
        *_arr("unused", 7),
    ],
)
FORGET_IN = Layout("fuse_forget_in", [("nlookup", "Q")])
FORGET_ONE = Layout("fuse_forget_one", [("nodeid", "Q"), ("nlookup", "Q")])
BATCH_FORGET_IN = Layout("fuse_batch_forget_in", [("count", "I"), ("dummy", "I")])
GETATTR_IN = Layout("fuse_getattr_in", [("getattr_flags", "I"), ("dummy", "I"), ("fh", "Q")])
SETATTR_IN = Layout(
    "fuse_setattr_in",
    [
        ("valid", "I"),
        ("padding", "I"),
        ("fh", "Q"),
        ("size", "Q"),
        ("lock_owner", "Q"),
        ("atime", "Q"),
        ("mtime", "Q"),
        ("ctime", "Q"),
        ("atimensec", "I"),
        ("mtimensec", "I"),
        ("ctimensec", "I"),
        ("mode", "I"),
        ("unused4", "I"),
        ("uid", "I"),
        ("gid", "I"),
        ("unused5", "I"),
    ],
)
MKNOD_IN = Layout("fuse_mknod_in", [("mode", "I"), ("rdev", "I"), ("umask", "I"), ("padding", "I")])
MKDIR_IN = Layout("fuse_mkdir_in", [("mode", "I"), ("umask", "I")])
RENAME_IN = Layout("fuse_rename_in", [("newdir", "Q")])
RENAME2_IN = Layout("fuse_rename2_in", [("newdir", "Q"), ("flags", "I"), ("padding", "I")])
LINK_IN = Layout("fuse_link_in", [("oldnodeid", "Q")])
OPEN_IN = Layout("fuse_open_in", [("flags", "I"), ("open_flags", "I")])
CREATE_IN = Layout("fuse_create_in", [("flags", "I"), ("mode", "I"), ("umask", "I"), ("open_flags", "I")])
OPEN_OUT = Layout("fuse_open_out", [("fh", "Q"), ("open_flags", "I"), ("padding", "I")])
RELEASE_IN = Layout(
    "fuse_release_in", [("fh", "Q"), ("flags", "I"), ("release_flags", "I"), ("lock_owner", "Q")]
)
FLUSH_IN = Layout("fuse_flush_in", [("fh", "Q"), ("unused", "I"), ("padding", "I"), ("lock_owner", "Q")])
READ_IN = Layout(
    "fuse_read_in",
    [
        ("fh", "Q"),
        ("offset", "Q"),
        ("size", "I"),
        ("read_flags", "I"),
        ("lock_owner", "Q"),
        ("flags", "I"),
        ("padding", "I"),
    ],
)
WRITE_IN = Layout(
    "fuse_write_in",
    [
        ("fh", "Q"),
        ("offset", "Q"),
        ("size", "I"),
        ("write_flags", "I"),
        ("lock_owner", "Q"),
        ("flags", "I"),
        ("padding", "I"),
    ],
)
WRITE_OUT = Layout("fuse_write_out", [("size", "I"), ("padding", "I")])
KSTATFS = Layout(
    "fuse_kstatfs",
    [
        ("blocks", "Q"),
        ("bfree", "Q"),
        ("bavail", "Q"),
        ("files", "Q"),
        ("ffree", "Q"),
        ("bsize", "I"),
        ("namelen", "I"),
        ("frsize", "I"),
        ("padding", "I"),
        *_arr("spare", 6),
    ],
)
FSYNC_IN = Layout("fuse_fsync_in", [("fh", "Q"), ("fsync_flags", "I"), ("padding", "I")])
SETXATTR_IN = Layout(
    "fuse_setxattr_in", [("size", "I"), ("flags", "I"), ("setxattr_flags", "I"), ("padding", "I")]
)
#: fuse_setxattr_in without SETXATTR_EXT negotiated (FUSE_COMPAT_SETXATTR_IN_SIZE).
SETXATTR_IN_SIZE_COMPAT = 8
GETXATTR_IN = Layout("fuse_getxattr_in", [("size", "I"), ("padding", "I")])
GETXATTR_OUT = Layout("fuse_getxattr_out", [("size", "I"), ("padding", "I")])
ACCESS_IN = Layout("fuse_access_in", [("mask", "I"), ("padding", "I")])
INTERRUPT_IN = Layout("fuse_interrupt_in", [("unique", "Q")])
FALLOCATE_IN = Layout(
    "fuse_fallocate_in", [("fh", "Q"), ("offset", "Q"), ("length", "Q"), ("mode", "I"), ("padding", "I")]
)
LSEEK_IN = Layout("fuse_lseek_in", [("fh", "Q"), ("offset", "Q"), ("whence", "I"), ("padding", "I")])
LSEEK_OUT = Layout("fuse_lseek_out", [("offset", "Q")])
DIRENT = Layout("fuse_dirent", [("ino", "Q"), ("off", "Q"), ("namelen", "I"), ("type", "I")])

#: Every layout, by its C name (the header test walks this).
LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        IN_HEADER,
        OUT_HEADER,
        ATTR,
        ENTRY_OUT,
        ATTR_OUT,
        INIT_IN,
        INIT_OUT,
        FORGET_IN,
        FORGET_ONE,
        BATCH_FORGET_IN,
        GETATTR_IN,
        SETATTR_IN,
        MKNOD_IN,
        MKDIR_IN,
        RENAME_IN,
        RENAME2_IN,
        LINK_IN,
        OPEN_IN,
        CREATE_IN,
        OPEN_OUT,
        RELEASE_IN,
        FLUSH_IN,
        READ_IN,
        WRITE_IN,
        WRITE_OUT,
        KSTATFS,
        FSYNC_IN,
        SETXATTR_IN,
        GETXATTR_IN,
        GETXATTR_OUT,
        ACCESS_IN,
        INTERRUPT_IN,
        FALLOCATE_IN,
        LSEEK_IN,
        LSEEK_OUT,
        DIRENT,
    )
}


def dirent_size(namelen: int) -> int:
    """FUSE_DIRENT_SIZE: a fuse_dirent with its name, padded to 8 bytes."""
    return (NAME_OFFSET + namelen + 7) & ~7


# --------------------------------------------------------------------------------------
# virtio-fs (device id 26): config space and queues
# --------------------------------------------------------------------------------------

#: ``struct virtio_fs_config`` (packed): tag[36], le32 num_request_queues.
FS_CONFIG = struct.Struct("<36sI")
FS_CONFIG_SIZE = FS_CONFIG.size  # 40
TAG_SIZE = 36
#: VIRTIO_FS_F_NOTIFICATION (a notification queue; not offered).
F_NOTIFICATION = 0
#: Queue 0 is the high-priority queue (FORGET, INTERRUPT); request queues follow.
HIPRIO_QUEUE = 0


def fs_config(tag: str, num_request_queues: int) -> bytes:
    """The config space of a virtio-fs device (the tag UTF-8, padded with NULs)."""
    raw = tag.encode()
    if not 0 < len(raw) <= TAG_SIZE:
        raise ValueError(f"a virtio-fs tag is 1 to {TAG_SIZE} bytes of UTF-8, not {len(raw)}")
    return FS_CONFIG.pack(raw, num_request_queues)
