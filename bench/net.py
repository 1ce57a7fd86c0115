"""iperf3 through pyvduse's virtio-net device against a veth pair, in the test VM.

Boots the test VM once and runs this file there with ``--guest``: it serves ``pyvduse net``
with a TAP (offloads on, split ring), puts the VDUSE interface in one network namespace and
leaves the TAP in the daemon's, makes a veth pair laid out the same way (the limit: Linux
moving frames between two namespaces with no device in between), and runs iperf3 over each
in turn: TCP with one and four streams both ways, and UDP with 64-byte datagrams (packets
per second received). Prints one table (ours, veth, ours/veth, our daemon's CPU, the whole
guest's CPU in each run: 200% is both vCPUs busy) and writes it as JSON with the VM's
details.

    python3 bench/net.py [--seconds 5] [--json PATH] [--our-args=--packed]
    python3 bench/net.py --profile bench/results/net-prof.out    # the daemon under cProfile

Needs root (the test VM does). Emulated (TCG) figures: compare the columns with each other,
not with real hardware.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import pstats
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from guest_runner import perf_record, perf_report  # noqa: E402

from tests.vm.net_tools import address_here, move_to_namespace, sh, wait_ping  # noqa: E402

DEFAULT_JSON = HERE / "results" / "net.json"
CLK_TCK = os.sysconf("SC_CLK_TCK")
#: (name, iperf3 options, what is reported). "into": from the daemon's namespace to the
#: interface's (the device's receive queue); "out of": the other way (its transmit queue).
TESTS: tuple[tuple[str, str, str], ...] = (
    ("TCP, 1 stream, into", "", "bits"),
    ("TCP, 1 stream, out of", "-R", "bits"),
    ("TCP, 4 streams, into", "-P 4", "bits"),
    ("TCP, 4 streams, out of", "-P 4 -R", "bits"),
    ("UDP 64 B, into", "-u -l 64 -b 0", "pps"),
    ("UDP 64 B, out of", "-u -l 64 -b 0 -R", "pps"),
)
OURS, PEER = ("10.30.0.1", "10.30.0.2", "benchA"), ("10.31.0.1", "10.31.0.2", "benchV")


# --------------------------------------------------------------------------- the guest


def _log(msg: str) -> None:
    print(f"[guest {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_ticks() -> tuple[int, int]:
    """The guest's CPU time so far, all CPUs: (busy, total) in ticks (/proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = values[3] + values[4]  # idle, iowait
    return sum(values) - idle, sum(values)


def iperf3(server: str, ns: str, options: str, seconds: float) -> dict[str, Any]:
    sh(f"ip netns exec {ns} iperf3 -s -D -1")
    time.sleep(0.5)
    p = sh(f"iperf3 -c {server} -t {seconds:g} -J {options}", check=False, timeout=seconds + 120)
    result: dict[str, Any] = json.loads(p.stdout)
    if "error" in result:
        raise RuntimeError(f"iperf3 {options}: {result['error']}")
    return result


def figure(result: dict[str, Any], kind: str) -> float:
    end = result["end"]
    if kind == "bits":
        return float(end["sum_received"]["bits_per_second"])
    s = end["sum"]  # UDP: what arrived, per second
    return float((s["packets"] - s["lost_packets"]) / s["seconds"])


def start_ours(extra: list[str], profile: str | None) -> tuple[subprocess.Popen[bytes], str]:
    argv = ["net", "--name", "bench0", "--tap", "btap0", *extra]
    if profile:
        argv = [sys.executable, str(HERE / "profile_daemon.py"), profile, *argv]
    else:
        argv = [sys.executable, "-m", "pyvduse", *argv]
    log = open("/tmp/bench-net-daemon.log", "wb")  # noqa: SIM115 (the daemon's, until it ends)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's pyvduse, not another
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, cwd=ROOT, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if not line.startswith("READY"):
        proc.wait(60)
        raise RuntimeError(
            f"daemon not ready: {line!r} {Path('/tmp/bench-net-daemon.log').read_text()[-2000:]}"
        )
    fields = dict(kv.split("=", 1) for kv in line.split()[1:])
    return proc, fields["ifname"]


def guest(args: argparse.Namespace) -> int:
    here, there, ns = OURS
    proc, ifname = start_ours(shlex.split(args.our_args), args.profile)
    cells: list[dict[str, Any]] = []
    profiles: dict[str, str] = {}
    try:
        move_to_namespace(ifname, ns, f"{there}/24")
        address_here("btap0", f"{here}/24")
        sh("ip link del bveth0", check=False)
        sh("ip link add bveth0 type veth peer name bveth1")
        v_here, v_there, v_ns = PEER
        move_to_namespace("bveth1", v_ns, f"{v_there}/24")
        address_here("bveth0", f"{v_here}/24")
        assert wait_ping(there) and wait_ping(v_there), "no ping"
        wanted = [args.profile_test] if args.profile else args.only
        tests = [t for t in TESTS if t[0] in wanted] if wanted else TESTS
        for name, options, kind in tests:
            for impl, (_, server, where) in (("pyvduse", OURS), ("veth", PEER)):
                if args.profile and impl == "veth":
                    continue
                perf = None
                if name in args.perf:  # the whole guest, sampled while iperf3 runs
                    data = f"/tmp/bench-net-{impl}.perf"
                    perf = perf_record(data, args.seconds)
                cpu0, t0, (busy0, all0) = cpu_seconds(proc.pid), time.monotonic(), cpu_ticks()
                try:
                    value: float | None = figure(iperf3(server, where, options, args.seconds), kind)
                    error = None
                except (RuntimeError, ValueError, subprocess.TimeoutExpired) as e:
                    value, error = None, str(e)[:300]
                busy = (cpu_seconds(proc.pid) - cpu0) / (time.monotonic() - t0)
                busy1, all1 = cpu_ticks()
                guest_cpu = (os.cpu_count() or 1) * (busy1 - busy0) / max(all1 - all0, 1)
                if perf is not None:
                    perf.wait(60)
                    profiles[f"{name}, {impl}"] = perf_report(data)
                cells.append(
                    {
                        "test": name,
                        "impl": impl,
                        "kind": kind,
                        "value": value,
                        "error": error,
                        "daemon_cpu": busy if impl == "pyvduse" else None,
                        "guest_cpu": guest_cpu,
                    }
                )
                _log(f"{name:24} {impl:8} {value} {error or ''}")
        stats = sh(f"{sys.executable} -m pyvduse ctl bench0 stats --json", check=False).stdout
    finally:
        proc.terminate()
        proc.wait(120)
        sh(f"ip netns del {ns}", check=False)
        sh(f"ip netns del {PEER[2]}", check=False)
        sh("ip link del bveth0", check=False)
    out = {
        "cells": cells,
        "perf": profiles,
        "stats": json.loads(stats) if stats else None,
        "kernel": os.uname().release,
        "cpus": os.cpu_count(),
        "mem_kib": int(Path("/proc/meminfo").read_text().split()[1]),
    }
    Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


# --------------------------------------------------------------------------- the host


def human(value: float | None, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "bits":
        return f"{value / 1e6:,.0f} Mbit/s"
    return f"{value:,.0f} pps"


def table(cells: list[dict[str, Any]]) -> str:
    rows = [
        "| test | pyvduse | veth | ratio | daemon CPU | guest CPU, ours / veth |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, _, kind in TESTS:
        ours = next((c for c in cells if c["test"] == name and c["impl"] == "pyvduse"), None)
        peer = next((c for c in cells if c["test"] == name and c["impl"] == "veth"), None)
        if ours is None:
            continue
        o, p = ours["value"], peer["value"] if peer else None
        ratio = f"{o / p:.2f}" if o and p else "-"
        cpu = f"{ours['daemon_cpu']:.0%}" if ours.get("daemon_cpu") is not None else "-"
        guest = " / ".join(
            f"{c['guest_cpu']:.0%}" if c and c.get("guest_cpu") is not None else "-" for c in (ours, peer)
        )
        rows.append(f"| {name} | {human(o, kind)} | {human(p, kind)} | {ratio} | {cpu} | {guest} |")
    return "\n".join(rows)


def host(args: argparse.Namespace) -> int:
    from pyvduse import testvm

    if args.perf and shutil.which("perf") is None:  # the guest runs this machine's programs
        print("--perf needs perf: apt install linux-perf", file=sys.stderr)
        return 2

    results = HERE / "results"
    results.mkdir(exist_ok=True)
    guest_json = results / ".net-guest.json"
    guest_json.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--guest",
        "--out",
        str(guest_json),
        "--seconds",
        str(args.seconds),
        f"--our-args={args.our_args}",
    ]
    if args.profile:
        cmd += ["--profile", str(Path(args.profile).resolve()), f"--profile-test={args.profile_test}"]
    cmd += [f"--only={name}" for name in args.only]
    cmd += [f"--perf={name}" for name in args.perf]
    started = time.monotonic()
    code = testvm.main(["--smp", "2", "--mem", "3G", "--cwd", str(ROOT), "--", shlex.join(cmd)])
    if code != 0 or not guest_json.exists():
        print(f"the guest run failed (exit {code})", file=sys.stderr)
        return 1
    data = json.loads(guest_json.read_text())
    if args.profile:
        s = io.StringIO()
        pstats.Stats(args.profile + ".workers", stream=s).sort_stats("cumulative").print_stats(30)
        print(s.getvalue())
    text = table(data["cells"])
    for what, report in data.get("perf", {}).items():
        print(f"perf, {what}:\n{report}\n")
    print(text)
    data.update(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        minutes=round((time.monotonic() - started) / 60, 1),
        seconds=args.seconds,
        our_args=args.our_args,
        host_cpus=os.cpu_count(),
        table=text,
    )
    Path(args.json).write_text(json.dumps(data, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=5.0, help="each iperf3 run (default 5)")
    p.add_argument("--our-args", default="", help="more 'pyvduse net' options")
    p.add_argument("--json", default=str(DEFAULT_JSON), help="where the results go")
    p.add_argument("--profile", help="run the daemon under cProfile (one test), pstats here")
    p.add_argument(
        "--profile-test",
        default=TESTS[0][0],
        metavar="TEST",
        help=f"the test profiled (default '{TESTS[0][0]}')",
    )
    p.add_argument(
        "--only",
        action="append",
        default=[],
        choices=[t[0] for t in TESTS],
        metavar="TEST",
        help="run this test only (repeatable; default: all of them)",
    )
    p.add_argument(
        "--perf",
        action="append",
        default=[],
        choices=[t[0] for t in TESTS],
        metavar="TEST",
        help="sample the whole guest with perf (cpu-clock) during this test, ours and veth's, "
        "and print where its CPU time went (repeatable)",
    )
    p.add_argument("--guest", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    return guest(args) if args.guest else host(args)


if __name__ == "__main__":
    sys.exit(main())
