"""The ``pyvduse`` command: one subcommand per job, user errors as one line on stderr."""

from __future__ import annotations

import argparse
import logging
import sys

from pyvduse import __version__
from pyvduse.cli import blk, ctl, manage
from pyvduse.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyvduse", description=__doc__)
    parser.add_argument("--version", action="version", version=f"pyvduse {__version__}")
    parser.add_argument("--log-level", default="warning",
                        choices=("debug", "info", "warning", "error"),
                        help="stderr log level (default warning)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    blk.add_parser(sub)
    manage.add_parsers(sub)
    ctl.add_parser(sub)
    tv = sub.add_parser("testvm", add_help=False,
                        help="run a command in the test VM (Linux with VDUSE, under QEMU)")
    tv.add_argument("rest", nargs=argparse.REMAINDER)
    tv.set_defaults(func=_run_testvm)
    return parser


def _run_testvm(args: argparse.Namespace) -> int:
    from pyvduse import testvm

    return testvm.main(args.rest)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="pyvduse: %(levelname)s: %(message)s")
    logging.getLogger("pyroute2").setLevel(logging.WARNING)  # its debug output is per message
    try:
        return int(args.func(args))
    except UserError as e:
        print(f"pyvduse: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
