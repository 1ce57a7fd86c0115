"""virtio-net on the real kernel: Linux's virtio_net drives a pyvduse device whose frames go
to a TAP. The VDUSE interface lives in namespace ``nsA`` (10.18.0.2), the TAP stays in the
daemon's namespace (10.18.0.1), so every frame between them crosses the device.

Sizes are scaled to the emulated guest (TCG) and CI's budget: the TCP transfer is
``PYVDUSE_NET_TRANSFER_MB`` MiB (default 48; the issue's 1 GiB is
``PYVDUSE_NET_TRANSFER_MB=1024``) and the kill -9 test kills ``PYVDUSE_NET_KILLS`` times
(default 2; the issue's 10 with ``PYVDUSE_NET_KILLS=10``), the transfer through the kills
paced at 2 MiB/s so that it runs across all of them. The host's environment does not
reach the guest; run the long forms in it:

    python3 -m pyvduse testvm -- env PYVDUSE_NET_TRANSFER_MB=1024 PYVDUSE_NET_KILLS=10 \
        python3 -m pytest tests/vm/test_net_e2e.py -k "sha256 or kill9"
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvduse.fastpath import engine as native
from tests.vm.helpers import Daemon, MiB, ctl, ctl_result
from tests.vm.net_tools import (
    Transfer,
    address_here,
    iperf3,
    move_to_namespace,
    ping,
    sh,
    wait_ping,
)

pytestmark = pytest.mark.vm

NS = "nsA"
HERE, THERE = "10.18.0.1", "10.18.0.2"
TRANSFER = int(os.environ.get("PYVDUSE_NET_TRANSFER_MB", "48")) * MiB
KILLS = int(os.environ.get("PYVDUSE_NET_KILLS", "2"))
ARGS = ("--tap", "tap18", "--mtu", "9000")


def bring_up(d: Daemon) -> None:
    assert d.ifname and d.ifname != "-", d.ready_line
    move_to_namespace(d.ifname, NS, f"{THERE}/24")
    address_here("tap18", f"{HERE}/24")
    assert wait_ping(THERE), f"no ping through the device\n{d.stderr()[-3000:]}"


@pytest.fixture(scope="module")
def net() -> Iterator[list[Daemon]]:
    """One device for the module; a test that restarts the daemon replaces it in the list."""
    d = Daemon(*ARGS, name="net0", command="net")
    holder = [d]
    try:
        bring_up(d)
        yield holder
    finally:
        holder[0].stop()
        sh(f"ip netns del {NS}", check=False)
    assert not os.path.exists("/sys/class/net/tap18"), "the TAP we created was left behind"
    assert not os.path.exists("/dev/vduse/net0")


def test_ping_both_ways_and_jumbo_frames(net: list[Daemon]) -> None:
    assert ping(THERE) and ping(HERE, ns=NS)
    mtu = sh(f"ip netns exec {NS} cat /sys/class/net/{net[0].ifname}/mtu").stdout.strip()
    assert mtu == "9000"  # from the device's config space (VIRTIO_NET_F_MTU)
    assert ping(THERE, size=8972) and ping(HERE, ns=NS, size=8972)  # 9000-byte packets


def test_tcp_transfer_sha256(net: list[Daemon]) -> None:
    sent, got, seconds = Transfer(THERE, TRANSFER, NS).wait(timeout=1800)
    assert sent == got
    # on the host's pytest output via the guest's JUnit (a message on success is not kept)
    print(f"{TRANSFER / MiB:.0f} MiB in {seconds:.1f} s ({TRANSFER * 8 / seconds / 1e6:.0f} Mbit/s)")


def test_iperf3_tcp_and_udp(net: list[Daemon]) -> None:
    tcp = iperf3(THERE, NS)
    assert tcp["end"]["sum_received"]["bytes"] > 1 * MiB
    rev = iperf3(THERE, NS, "-R")  # the device's receive side
    assert rev["end"]["sum_received"]["bytes"] > 1 * MiB
    # a rate the Python engine keeps up with on a loaded emulated machine (the benchmark
    # measures how much it can take)
    udp = iperf3(THERE, NS, "-u", "-b", "4M", "-l", "1400")
    s = udp["end"]["sum"]
    assert s["packets"] - s["lost_packets"] > 500 and s["lost_percent"] < 25, s
    stats = ctl_result("net0", "stats")
    rx, tx = stats["queues"]
    assert rx["packets"] > 1000 and tx["packets"] > 1000 and rx["bad_requests"] == 0


def test_link_down_and_up(net: list[Daemon]) -> None:
    ifname = net[0].ifname
    before = ctl_result("net0", "stats")["total"]["drops"]
    p = ctl("net0", "link", "down")
    assert p.returncode == 0 and "link down" in p.stdout, p.stderr
    deadline = time.monotonic() + 10
    while "NO-CARRIER" not in sh(f"ip netns exec {NS} ip link show {ifname}").stdout:
        assert time.monotonic() < deadline, "the driver's carrier did not go down"
        time.sleep(0.2)
    assert "NO-CARRIER" in sh("ip link show tap18").stdout  # the TAP's carrier follows
    assert not ping(THERE, count=2, timeout=1)
    assert ctl_result("net0", "status")["link"] == "down"
    assert ctl("net0", "link", "up").returncode == 0
    assert wait_ping(THERE, seconds=20) and ping(HERE, ns=NS)
    assert "NO-CARRIER" not in sh(f"ip netns exec {NS} ip link show {ifname}").stdout
    assert ctl_result("net0", "stats")["total"]["drops"] >= before


def test_status(net: list[Daemon]) -> None:
    p = ctl("net0", "status")
    assert p.returncode == 0, p.stderr
    assert "virtio-net" in p.stdout and "link      up" in p.stdout and "TAP tap18" in p.stdout
    s = ctl_result("net0", "status")
    assert {"STATUS", "MAC", "MTU", "GUEST_TSO4", "HOST_TSO4"} <= set(s["feature_names"])
    assert "MRG_RXBUF" not in s["feature_names"]  # --mrg-rxbuf offers it
    if native.available():  # both queues on the native loop (splitblk_net.c)
        assert [q["engine"] for q in s["queues"]] == ["native", "native"]


def test_tcp_transfer_survives_kill9(net: list[Daemon]) -> None:
    """kill -9 the daemon in the middle of a TCP transfer, restart it: the connection carries
    on and the bytes arrive intact."""
    assert wait_ping(THERE)  # the neighbour is known before the connection starts
    # paced at 2 MiB/s, so that it is still running at the last kill (a restart takes
    # seconds under emulation)
    transfer = Transfer(THERE, (8 * KILLS + 4) * 2 * MiB, NS, port=5098, rate=2 * MiB)
    for _ in range(KILLS):
        time.sleep(2)
        ended = transfer.ended()
        assert ended is None, f"the transfer ended before the kill: {ended}"
        net[0].proc.send_signal(signal.SIGKILL)
        net[0].proc.wait()
        net[0] = Daemon(*ARGS, name="net0", command="net")
        assert "resumed" in net[0].stderr(), net[0].stderr()
    sent, got, _ = transfer.wait(timeout=600)
    assert sent == got
    assert wait_ping(THERE)


def test_packed_ring_and_mergeable_buffers() -> None:
    with Daemon("--tap", "tap19", "--packed", "--mrg-rxbuf", name="net1", command="net") as d:
        move_to_namespace(d.ifname, "nsB", "10.19.0.2/24")
        address_here("tap19", "10.19.0.1/24")
        try:
            assert wait_ping("10.19.0.2")
            features = ctl_result("net1", "status")["feature_names"]
            assert "RING_PACKED" in features and "MRG_RXBUF" in features
            sent, got, _ = Transfer("10.19.0.2", 8 * MiB, "nsB", port=5097).wait(timeout=300)
            assert sent == got
        finally:
            sh("ip netns del nsB", check=False)


def test_user_errors() -> None:
    """One line, exit 2, nothing left behind."""
    py = f"{sys.executable} -m pyvduse net --name bad0"
    p = sh(f"setpriv --bounding-set -net_admin {py} --tap tap20", check=False)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "CAP_NET_ADMIN" in p.stderr, p
    p = sh(f"{py} --tap lo", check=False)
    assert p.returncode == 2 and "not a TAP" in p.stderr, p
    p = sh(f"{py} --tap tap20 --mac 01:00:5e:00:00:01", check=False)
    assert p.returncode == 2 and "multicast" in p.stderr, p
    p = sh(f"{py} --tap tap20 --mrg-rxbuf --data-path native", check=False)
    why = "mergeable" if native.available() else "not built"
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and why in p.stderr, p
    assert not os.path.exists("/dev/vduse/bad0") and not os.path.exists("/sys/class/net/tap20")


def test_python_device_answers_ping() -> None:
    """examples/ping_responder.py: a network device written in Python, on the real driver."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}  # this checkout's pyvduse
    p = subprocess.Popen(
        [sys.executable, str(root / "examples" / "ping_responder.py"), "--name", "pong0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=root,
        env=env,
    )
    try:
        assert p.stdout is not None
        line = p.stdout.readline()
        assert line.startswith("READY name=pong0 ifname="), line
        ifname = line.split("ifname=")[1].strip()
        move_to_namespace(ifname, "nsP", "10.9.0.1/24")
        assert ping("10.9.0.2", ns="nsP") and ping("10.9.0.77", ns="nsP")
    finally:
        p.terminate()
        code = p.wait(60)
        sh("ip netns del nsP", check=False)
    assert code == 0, p.stderr.read() if p.stderr else code


def test_destroy_after_kill_removes_the_tap() -> None:
    """A daemon killed for good leaves its device and its TAP; 'pyvduse destroy' removes
    both."""
    d = Daemon("--tap", "tap21", name="net2", command="net")
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    assert os.path.exists("/sys/class/net/tap21")  # persistent, for the next daemon
    p = sh(f"{sys.executable} -m pyvduse destroy net2", check=False)
    assert p.returncode == 0 and "removed TAP tap21" in p.stdout, p
    assert not os.path.exists("/sys/class/net/tap21") and not os.path.exists("/dev/vduse/net2")
