"""Network plumbing for the VM tests and the benchmark: namespaces, transfers, iperf3.

A transfer sends deterministic pseudo-random bytes over one TCP connection and compares the
sha256 both ends computed; it is plain Python (``python3 net_tools.py send|receive``), so
it runs in any namespace with ``ip netns exec``.
"""

from __future__ import annotations

import hashlib
import json
import random
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
CHUNK = 1 << 20


def sh(cmd: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(cmd, shell=True, text=True, capture_output=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"`{cmd}` exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def in_ns(ns: str | None, cmd: str) -> str:
    return f"ip netns exec {ns} {cmd}" if ns else cmd


def move_to_namespace(ifname: str, ns: str, address: str, mtu: int | None = None) -> None:
    """Put ``ifname`` in a new namespace ``ns`` with ``address`` (like 10.0.0.2/24), up."""
    sh(f"ip netns del {ns}", check=False)
    sh(f"ip netns add {ns}")
    sh(f"ip link set {ifname} netns {ns}")
    sh(in_ns(ns, f"ip addr add {address} dev {ifname}"))
    if mtu:
        sh(in_ns(ns, f"ip link set {ifname} mtu {mtu}"))
    sh(in_ns(ns, f"ip link set {ifname} up"))
    sh(in_ns(ns, "ip link set lo up"))


def address_here(ifname: str, address: str, mtu: int | None = None) -> None:
    sh(f"ip addr flush dev {ifname}")
    sh(f"ip addr add {address} dev {ifname}")
    if mtu:
        sh(f"ip link set {ifname} mtu {mtu}")
    sh(f"ip link set {ifname} up")


def ping(
    target: str, ns: str | None = None, count: int = 3, size: int | None = None, timeout: int = 3
) -> bool:
    opts = f"-c {count} -W {timeout} -i 0.3"
    if size is not None:
        opts += f" -M do -s {size}"
    return sh(in_ns(ns, f"ping {opts} {target}"), check=False).returncode == 0


def wait_ping(target: str, ns: str | None = None, seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if ping(target, ns, count=1, timeout=1):
            return True
    return False


class Transfer:
    """One TCP transfer of ``size`` bytes from here to ``address`` in namespace ``ns``."""

    def __init__(
        self, address: str, size: int, ns: str, port: int = 5099, seed: int = 18, rate: int = 0
    ) -> None:
        py = sys.executable
        self.receiver = subprocess.Popen(
            in_ns(ns, f"{py} {HERE} receive {port}").split(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.receiver.stdout is not None
        assert self.receiver.stdout.readline().strip() == "LISTENING"
        self.sender = subprocess.Popen(
            [py, str(HERE), "send", address, str(port), str(size), str(seed), str(rate)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # connected before anything else happens to the device (a loaded guest takes seconds
        # to start Python): the tests mean "in the middle of a transfer"
        assert self.sender.stdout is not None and self.sender.stderr is not None
        if self.sender.stdout.readline().strip() != "CONNECTED":
            self.sender.wait()
            raise AssertionError(f"the sender did not connect: {self.sender.stderr.read()[-2000:]}")

    def ended(self) -> str | None:
        """None while the sender runs; else how it ended (its exit code and stderr's tail)."""
        if self.sender.poll() is None:
            return None
        assert self.sender.stderr is not None and self.receiver.stderr is not None
        receiver = "running" if self.receiver.poll() is None else self.receiver.stderr.read()[-1000:]
        return (
            f"sender exited {self.sender.returncode}: {self.sender.stderr.read()[-2000:]}\n"
            f"receiver: {receiver}"
        )

    def wait(self, timeout: float) -> tuple[str, str, float]:
        """(sent sha256, received sha256, seconds the sender took)."""
        try:
            out, err = self.sender.communicate(timeout=timeout)
            got, _ = self.receiver.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.sender.kill()
            self.receiver.kill()
            raise AssertionError(f"the transfer did not finish in {timeout} s") from None
        assert self.sender.returncode == 0, f"sender exited {self.sender.returncode}: {err[-2000:]}"
        sent = json.loads(out)
        return sent["sha256"], got.strip(), sent["seconds"]


def iperf3(address: str, ns: str, *args: str, seconds: int = 3) -> dict[str, Any]:
    """One iperf3 run from here to a server started in ``ns`` for it; its JSON."""
    sh(in_ns(ns, "iperf3 -s -D -1"))
    time.sleep(0.5)
    p = sh(f"iperf3 -c {address} -t {seconds} -J {' '.join(args)}", check=False, timeout=seconds + 60)
    result: dict[str, Any] = json.loads(p.stdout)
    assert "error" not in result, result["error"]
    return result


def _send(address: str, port: int, size: int, seed: int, rate: int) -> None:
    """Send ``size`` bytes, at most ``rate`` bytes per second if not 0."""
    rng = random.Random(seed)
    h = hashlib.sha256()
    t = time.monotonic()
    with socket.create_connection((address, port), timeout=600) as s:
        print("CONNECTED", flush=True)
        left = size
        while left:
            chunk = rng.randbytes(min(CHUNK, left))
            h.update(chunk)
            s.sendall(chunk)
            left -= len(chunk)
            if rate:
                ahead = (size - left) / rate - (time.monotonic() - t)
                if ahead > 0:
                    time.sleep(ahead)
        s.shutdown(socket.SHUT_WR)
        s.recv(1)  # the receiver closes once it has everything
    print(json.dumps({"sha256": h.hexdigest(), "seconds": time.monotonic() - t}))


def _receive(port: int) -> None:
    h = hashlib.sha256()
    with socket.create_server(("", port), reuse_port=False) as srv:
        print("LISTENING", flush=True)
        conn, _ = srv.accept()
        with conn:
            buf = bytearray(CHUNK)
            while True:
                n = conn.recv_into(buf)
                if not n:
                    break
                h.update(memoryview(buf)[:n])
    print(h.hexdigest(), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "send":
        _send(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
    else:
        _receive(int(sys.argv[2]))
