"""``pyvduse ctl NAME COMMAND``: talk to a running daemon over its management socket."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pyvduse.errors import UserError
from pyvduse.ops import inspect
from pyvduse.ops.client import ClientError, NoDaemon, request
from pyvduse.ops.protocol import Json, default_control_path
from pyvduse.transport.kernel.irq_affinity import format_cpu_list

COMMANDS = ("status", "stats", "resize", "link", "quit")


class ErrorReply(UserError):
    """The daemon answered with an error."""

    exit_code = 1


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "ctl",
        help="query or control a running device daemon",
        description="Send one command to the daemon serving NAME over its management socket: "
        "status, stats, resize [SIZE] [--shrink] (no SIZE: take the backing file's new size), "
        "link up|down (network devices), quit.",
    )
    p.add_argument("name", help="the device's name (pyvduse blk --name)")
    p.add_argument("command", choices=COMMANDS, metavar="COMMAND", help="status, stats, resize, link or quit")
    p.add_argument(
        "size",
        nargs="?",
        metavar="SIZE|up|down",
        help="resize: the new size (bytes, or like 2G); link: up or down",
    )
    p.add_argument(
        "--shrink", action="store_true", help="resize: allow a smaller size (loses the data past the new end)"
    )
    p.add_argument("--json", action="store_true", help="print the daemon's reply as JSON")
    p.add_argument("--control", metavar="PATH", help="the daemon's socket (default /run/pyvduse/NAME.sock)")
    p.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how long to wait for the answer (default 10)",
    )
    p.set_defaults(func=run)


def build_request(args: argparse.Namespace) -> Json:
    if args.command == "link":
        if args.size not in ("up", "down") or args.shrink:
            raise UserError("say 'link up' or 'link down'")
        return {"cmd": "link", "state": args.size}
    if args.command != "resize" and (args.size is not None or args.shrink):
        raise UserError(f"'{args.command}' takes no size and no --shrink")
    req: Json = {"cmd": args.command}
    if args.command == "resize":
        if args.size is not None:
            req["size"] = args.size
        if args.shrink:
            req["shrink"] = True
    return req


def run(args: argparse.Namespace) -> int:
    path = args.control or default_control_path(args.name)
    req = build_request(args)
    try:
        reply = request(path, req, timeout=args.timeout)
    except NoDaemon:
        raise UserError(f"no daemon serves {args.name}: is it running? (socket {path})") from None
    except ClientError as e:
        raise UserError(f"{args.name}: {e}") from None
    if args.json:
        print(json.dumps(reply, indent=2))
    if "error" in reply:
        err = reply["error"]
        code = err.get("code", "?") if isinstance(err, dict) else "?"
        message = err.get("message", "") if isinstance(err, dict) else str(err)
        raise ErrorReply(f"{args.name}: {message} ({code})")
    if not args.json:
        sys.stdout.write(render(args.command, args.name, reply["result"]))
    return 0


# -- human-readable output --------------------------------------------------------------------


def human_bytes(n: int) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            value = n / (1 << shift)
            return f"{value:.1f} {unit}" if value != int(value) else f"{int(value)} {unit}"
    return f"{n} B"


def human_us(us: int | None) -> str:
    if us is None:
        return "-"
    if us >= 1_000_000:
        return f"{us / 1e6:g} s"
    if us >= 1000:
        return f"{us / 1000:g} ms"
    return f"{us} µs"


def render(command: str, name: str, result: Json) -> str:
    if command == "status":
        return render_status(result)
    if command == "stats":
        return render_stats(result)
    if command == "resize":
        old, new = result["old_size"], result["size"]
        if not result["changed"]:
            return f"{name}: size unchanged, {new} bytes ({human_bytes(new)})\n"
        return f"{name}: resized from {old} to {new} bytes ({human_bytes(old)} -> {human_bytes(new)})\n"
    if command == "link":
        state = result["link"]
        return f"{name}: link {state}" + ("" if result["changed"] else " (it was)") + "\n"
    if command == "quit":
        return f"{name}: stopping\n"
    return json.dumps(result, indent=2) + "\n"


def render_status(r: Json) -> str:
    lines = [
        f"{r['name']}: {r['state']}, {r['device']} on {r.get('node') or '-'} "
        f"(pid {r['pid']}, up {r['uptime_s']:.0f} s)"
    ]
    if "capacity" in r:
        ro = ", read-only" if r.get("readonly") else ""
        lines.append(f"  backend   {r['backend']}")
        lines.append(
            f"  capacity  {r['capacity']} bytes ({human_bytes(r['capacity'])}), "
            f"block size {r['block_size']}{ro}"
        )
        chosen = f" ({r['cache_choice']})" if r.get("cache_choice") == "auto" else ""
        lines.append(
            f"  I/O       aio {r.get('aio', '-')}, cache {r.get('cache', '-')}{chosen}, "
            f"bounce buffer {r.get('bounce_memory') or '-'}"
        )
    if "mac" in r:
        mtu = f", MTU {r['mtu']}" if r.get("mtu") else ""
        lines.append(f"  backend   {r['backend']}")
        lines.append(
            f"  link      {r['link']}, MAC {r['mac']}{mtu}, "
            f"{r.get('rx_buffers_held', 0)} receive buffers waiting for frames"
        )
    nbd = r.get("nbd")
    if nbd:
        conns = ", ".join(
            f"{c['state']}" + (f" ({c['reconnects']} reconnects)" if c["reconnects"] else "")
            for c in nbd["connections"]
        )
        lines.append(
            f"  nbd       {len(nbd['connections'])} connection(s): {conns}; "
            f"reconnect window {nbd['reconnect_seconds']:g} s"
        )
    status = r.get("status")
    names = "|".join(r.get("status_names") or []) or "-"
    lines.append("  status    " + ("unknown" if status is None else f"0x{status:02x} {names}"))
    lines.append(f"  features  {r['features']} {' '.join(r.get('feature_names') or [])}".rstrip())
    if r.get("vduse_api") is not None:
        offered = " ".join(r.get("vduse_features") or []) or "none"
        lines.append(f"  VDUSE     API version {r['vduse_api']}, kernel features: {offered}")
    for q in r["queues"]:
        if not q["served"]:
            why = f"  BROKEN: {q['broken']}" if q.get("broken") else ""
            lines.append(f"  queue {q['index']}   not served{why}")
            continue
        avail = "-" if q.get("avail_idx") is None else q["avail_idx"]
        broken = f"  BROKEN: {q['broken']}" if q.get("broken") else ""
        age = q.get("in_flight_s")
        since = f" (for {age:.1f} s)" if age is not None and age >= 0.1 else ""
        irq = f", interrupts on CPU {format_cpu_list(q['irq_cpus'])}" if q.get("irq_cpus") else ""
        engine = f", {q['engine']} engine, aio {q['aio']}" if q.get("engine") else ""
        lines.append(
            f"  queue {q['index']}   size {q['size']}, avail {avail}, "
            f"taken {q['last_avail_idx']}, used {q['used_idx']}, "
            f"in flight {q['in_flight']}{since}{engine}{irq}{broken}"
        )
    if r.get("control"):
        lines.append(f"  control   {r['control']}")
    if r.get("metrics"):
        lines.append(f"  metrics   http://{r['metrics']}/metrics")
    return "\n".join(lines) + "\n"


def _stats_line(label: str, q: Json) -> list[str]:
    lat = q["latency"]
    parts = []
    if "packets" in q:
        parts.append(f"{q['packets']} packets, {human_bytes(q['bytes'])}")
        parts.append(f"{q['drops']} dropped, {q['bad_requests']} bad")
        if "direction" in q:
            label = f"{label} ({q['direction']})"
    elif "requests" in q:
        kinds = ", ".join(f"{k} {n}" for k, n in q["requests"].items())
        parts.append(f"{q['requests_total']} requests" + (f" ({kinds})" if kinds else ""))
        parts.append(f"{human_bytes(q['bytes_read'])} read, {human_bytes(q['bytes_written'])} written")
        parts.append(f"{q['errors']} errors, {q['bad_requests']} bad")
    else:
        parts.append(f"{q['completed']} requests")
    parts.append(f"{q['in_flight']} in flight")
    out = [f"{label}: " + "; ".join(parts)]
    if lat["count"]:
        mean = lat["sum_us"] / lat["count"]
        out.append(
            f"  latency: mean {human_us(round(mean))}, "
            f"p50 <= {human_us(inspect.percentile(lat, 0.5))}, "
            f"p99 <= {human_us(inspect.percentile(lat, 0.99))}, "
            f"max <= {human_us(inspect.percentile(lat, 1.0))}"
        )
    dep = q.get("depth")
    if dep and dep["count"]:
        top = dep["buckets"][-1][0]
        shared = sum(n for bound, n in dep["buckets"] if bound > 2)
        out.append(
            f"  depth: up to {top - 1} in flight; {100 * shared / dep['count']:.0f}% "
            "of requests were taken while others were in flight"
        )
    return out


def render_stats(r: Json) -> str:
    lines: list[str] = []
    for q in r["queues"]:
        lines += _stats_line(f"queue {q['index']}", q)
    if len(r["queues"]) > 1:
        lines += _stats_line("total", r["total"])
    lines += _histogram(r["total"]["latency"])
    return "\n".join(lines) + "\n"


def _histogram(lat: Json) -> list[str]:
    buckets: list[list[Any]] = [b for b in lat["buckets"] if b[1]]
    if not buckets:
        return []
    out = ["latency histogram (all queues):"]
    peak = max(n for _, n in buckets)
    for bound, n in buckets:
        label = f"< {human_us(bound)}"
        bar = "#" * max(1, round(40 * n / peak))
        out.append(f"  {label:>10} {n:>10} {bar}")
    return out
