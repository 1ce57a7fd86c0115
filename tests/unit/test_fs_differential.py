"""Random operations through the FUSE session on a passthrough, and the same operations on
a reference directory with os calls: after every step both trees are the same (names,
types, contents, modes), and every operation fails or succeeds alike on both."""

from __future__ import annotations

import os
import random
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyvduse.abi import fuse
from pyvduse.fs import ROOT
from pyvduse.fs.passthrough import Passthrough
from pyvduse.fs.session import FuseSession
from pyvduse.testing.fuse_client import Driver

NAMES = [b"a", b"b", b"c", b"d"]
OPS = ["create", "write", "truncate", "mkdir", "unlink", "rmdir", "rename", "chmod", "link"]


def snapshot(root: Path) -> dict[str, tuple[int, bytes | None]]:
    out: dict[str, tuple[int, bytes | None]] = {}
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            p = Path(dirpath, n)
            st = p.lstat()
            data = p.read_bytes() if stat.S_ISREG(st.st_mode) else None
            out[str(p.relative_to(root))] = (st.st_mode, data)
    return out


def directories(root: Path) -> list[list[bytes]]:
    """Every directory below ``root`` (itself too), as name components."""
    out: list[list[bytes]] = [[]]
    for dirpath, dirs, _ in os.walk(root):
        for n in dirs:
            out.append([os.fsencode(c) for c in Path(dirpath, n).relative_to(root).parts])
    return out


def resolve(d: Driver, parts: list[bytes]) -> int:
    ino = ROOT
    for p in parts:
        ino = int(d.lookup(ino, p)[0])
    return ino


def setattr_body(valid: int, size: int = 0, mode: int = 0) -> bytes:
    return fuse.SETATTR_IN.pack(valid, 0, 0, size, 0, 0, 0, 0, 0, 0, 0, mode, 0, 0, 0, 0)


@dataclass
class Op:
    kind: str
    parent: list[bytes]
    name: bytes
    target: list[bytes]
    tname: bytes
    off: int
    size: int
    data: bytes
    mode: int

    def path(self, root: Path) -> Path:
        return root.joinpath(*[p.decode() for p in self.parent], self.name.decode())

    def tpath(self, root: Path) -> Path:
        return root.joinpath(*[p.decode() for p in self.target], self.tname.decode())


def served(d: Driver, op: Op) -> None:
    pino = resolve(d, op.parent)
    k = op.kind
    if k == "create":
        ino, fh = d.create(pino, op.name, 0o100644, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        d.release(ino, fh)
    elif k == "mkdir":
        d.mkdir(pino, op.name, 0o755)
    elif k == "unlink":
        d.unlink(pino, op.name)
    elif k == "rmdir":
        d.call(fuse.Opcode.RMDIR, pino, op.name + b"\0")
    elif k == "rename":
        d.rename(pino, op.name, resolve(d, op.target), op.tname)
    else:
        ino = int(d.lookup(pino, op.name)[0])
        if k == "write":
            fh = d.open(ino, os.O_WRONLY)
            d.write(ino, fh, op.off, op.data)
            d.release(ino, fh)
        elif k == "truncate":
            d.call(fuse.Opcode.SETATTR, ino, setattr_body(fuse.FATTR_SIZE, size=op.size))
        elif k == "chmod":
            d.call(fuse.Opcode.SETATTR, ino, setattr_body(fuse.FATTR_MODE, mode=op.mode))
        elif k == "link":
            d.call(fuse.Opcode.LINK, resolve(d, op.target), fuse.LINK_IN.pack(ino) + op.tname + b"\0")


def reference(ref: Path, op: Op) -> None:
    path, k = op.path(ref), op.kind
    if k == "create":
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    elif k == "write":
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, op.data, op.off)
        finally:
            os.close(fd)
    elif k == "truncate":
        os.truncate(path, op.size)
    elif k == "mkdir":
        os.mkdir(path, 0o755)
    elif k == "unlink":
        os.unlink(path)
    elif k == "rmdir":
        os.rmdir(path)
    elif k == "rename":
        os.rename(path, op.tpath(ref))
    elif k == "chmod":
        os.chmod(path, op.mode)
    elif k == "link":
        os.link(path, op.tpath(ref))


def errno_of(fn: object, *args: object) -> int:
    try:
        fn(*args)  # type: ignore[operator]
    except OSError as e:  # FuseError is one
        return e.errno or 0
    return 0


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_operations_match_a_reference(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    root, ref = tmp_path / "served", tmp_path / "ref"
    root.mkdir()
    ref.mkdir()
    fs = Passthrough(root)
    d = Driver(FuseSession(fs))
    d.init()
    done: dict[str, int] = {}
    for step in range(1000):
        dirs = directories(ref)
        op = Op(
            rng.choice(OPS),
            rng.choice(dirs),
            rng.choice(NAMES),
            rng.choice(dirs),
            rng.choice(NAMES),
            rng.randrange(0, 20000),
            rng.randrange(0, 30000),
            rng.randbytes(rng.randrange(1, 9000)),
            rng.choice([0o644, 0o600, 0o755]),
        )
        if op.kind in ("rename", "link") and op.target[: len(op.parent) + 1] == [*op.parent, op.name]:
            continue  # into itself
        if op.kind in ("write", "truncate", "link") and op.path(ref).is_dir():
            continue  # the passthrough opens regular files only (EPERM, where os says EISDIR)
        got, want = errno_of(served, d, op), errno_of(reference, ref, op)
        assert got == want, (step, op.kind, got, want)
        if not want:
            done[op.kind] = done.get(op.kind, 0) + 1
        assert snapshot(root) == snapshot(ref), (step, op.kind)
    fs.close()
    assert sum(done.values()) > 150 and len(done) == len(OPS), done  # every kind succeeded, often
