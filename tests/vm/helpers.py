"""Running the pyvduse daemon and shell tools inside the test VM."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MiB = 1 << 20

#: What ``ctl status`` says of VDUSE on each test kernel: the API version the device speaks
#: and the VDUSE control features the kernel offers (measured: 7.3 reports API 1, 0x3).
KERNEL_VDUSE: dict[str, tuple[int, list[str]]] = {
    "6.12": (0, []),
    "7.3": (1, ["queue_ready", "suspend"]),
}


def kernel_series() -> str:
    """The running kernel's MAJOR.MINOR (the test VM's: 6.12 or 7.3)."""
    return ".".join(os.uname().release.split(".")[:2])


def expected_vduse() -> tuple[int, list[str]]:
    """``(vduse_api, vduse_features)`` that ``ctl status`` reports on this kernel."""
    return KERNEL_VDUSE[kernel_series()]


def sh(cmd: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run a shell command, returning its output; raise with the output on failure."""
    p = subprocess.run(cmd, shell=True, text=True, capture_output=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"`{cmd}` exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


class Daemon:
    """``pyvduse blk`` (or ``net``) as a child process, started and waited for like a user
    would."""

    def __init__(self, *args: str, name: str, ready_timeout: float = 120, command: str = "blk") -> None:
        self.name = name
        self.argv = [sys.executable, "-m", "pyvduse", "--log-level", "info", command, "--name", name, *args]
        self.log = Path(f"/tmp/pyvduse-{name}.log")
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=self.log.open("w"), text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # blocks until READY or exit
        if not line.startswith("READY "):
            self.proc.wait(timeout=ready_timeout)
            raise AssertionError(f"daemon did not become ready: {line!r}\n{self.stderr()}")
        fields = dict(kv.split("=", 1) for kv in line.split()[1:])
        assert fields["name"] == name
        self.dev = fields.get("dev", "")
        self.ifname = fields.get("ifname", "")
        self.ready_line = line

    def stderr(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the daemon did not stop in {timeout} s\n{self.stuck()}") from None

    def stuck(self) -> str:
        """What a daemon that does not stop is doing (the guest's /tmp is private, so say it
        here): every thread's Python stack (SIGUSR1), kernel stacks, the kernel log."""
        pid = self.proc.pid
        self.proc.send_signal(signal.SIGUSR1)
        time.sleep(3)
        kernel = sh(
            f"for t in /proc/{pid}/task/*; do echo $t; cat $t/stack; done; dmesg | tail -20", check=False
        ).stdout
        self.proc.kill()
        self.proc.wait()
        return f"daemon log:\n{self.stderr()[-6000:]}\nkernel:\n{kernel[-4000:]}"

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.stop()


def wait_gone(path: str, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not os.path.exists(path):
            return True
        time.sleep(0.1)
    return False


def make_image(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def ctl(name: str, *args: str, control: str | None = None) -> subprocess.CompletedProcess[str]:
    extra = ["--control", control] if control else []
    return subprocess.run(
        [sys.executable, "-m", "pyvduse", "ctl", name, *args, *extra],
        capture_output=True,
        text=True,
        timeout=120,
    )


def ctl_json(name: str, *args: str, control: str | None = None) -> dict[str, object]:
    p = ctl(name, *args, "--json", control=control)
    assert p.returncode == 0, p.stderr
    reply = json.loads(p.stdout)
    assert isinstance(reply, dict)
    return reply


class NullBlk:
    """A null_blk device made through configfs (the test VM loads null_blk with no device):
    with ``memory_backed`` it keeps what is written, with ``latency_us`` each request
    completes that long after it was submitted, as an SSD would."""

    ROOT = Path("/sys/kernel/config/nullb")

    def __init__(
        self,
        name: str,
        size_mb: int = 256,
        latency_us: int = 250,
        memory_backed: bool = True,
        queue_depth: int = 256,
    ) -> None:
        self.dir = self.ROOT / name
        if self.dir.exists():  # left by a test that failed half-way
            self.close()
        self.dir.mkdir()
        try:
            attrs = {
                "size": size_mb,
                "blocksize": 512,
                "memory_backed": int(memory_backed),
                "hw_queue_depth": queue_depth,
            }
            if latency_us:
                attrs.update(irqmode=2, completion_nsec=latency_us * 1000)
            for attr, value in attrs.items():
                (self.dir / attr).write_text(str(value))
            (self.dir / "power").write_text("1")
            # the disk is named after the configfs item (Linux 6.x), nullbN before that
            names = [name, f"nullb{(self.dir / 'index').read_text().strip()}"]
            deadline = time.monotonic() + 10
            while True:
                found = [n for n in names if os.path.exists(f"/dev/{n}")]
                if found:
                    self.dev = f"/dev/{found[0]}"
                    break
                assert time.monotonic() < deadline, f"none of {names} appeared in /dev"
                time.sleep(0.05)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        with contextlib.suppress(OSError):
            (self.dir / "power").write_text("0")
        self.dir.rmdir()

    def __enter__(self) -> NullBlk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Hangable:
    """A device-mapper linear device over ``dev`` whose I/O can be made to hang: while
    ``suspend`` holds, every new request waits (a dead NFS server, a stuck SAN)."""

    def __init__(self, name: str, dev: str) -> None:
        self.name = name
        sectors = int(sh(f"blockdev --getsz {dev}").stdout)
        sh(f"dmsetup create {name} --noudevsync --table '0 {sectors} linear {dev} 0'")
        self.dev = f"/dev/mapper/{name}"
        deadline = time.monotonic() + 10
        while not os.path.exists(self.dev):
            if time.monotonic() > deadline:  # no udev in the test VM: make the node
                sh(f"dmsetup mknodes {name}")
                break
            time.sleep(0.05)

    def suspend(self) -> None:
        sh(f"dmsetup suspend --noflush {self.name}")

    def resume(self) -> None:
        sh(f"dmsetup resume {self.name}")

    def close(self) -> None:
        sh(f"dmsetup resume {self.name}", check=False)
        sh(f"dmsetup remove --noudevsync {self.name}", check=False)

    def __enter__(self) -> Hangable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ctl_result(name: str, *args: str) -> dict[str, Any]:
    """The ``result`` of ``pyvduse ctl NAME ARGS --json`` (asserting it succeeded)."""
    reply = ctl_json(name, *args)
    result = reply.get("result")
    assert isinstance(result, dict), reply
    return result
