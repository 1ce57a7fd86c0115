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
    # Listed for --help only: main() hands everything after "testvm" to its own parser,
    # since argparse's REMAINDER drops options that come before "--".
    sub.add_parser("testvm", add_help=False,
                   help="run a command in the test VM (Linux with VDUSE, under QEMU)")
    return parser


def split_testvm(argv: list[str]) -> tuple[list[str], list[str]] | None:
    """(global options, testvm's own arguments) when the subcommand is ``testvm``."""
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "testvm":
            return argv[:i], argv[i + 1:]
        if word == "--log-level":
            i += 2
            continue
        if not word.startswith("-"):
            return None
        i += 1
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    testvm_args = split_testvm(argv)
    if testvm_args is not None:
        from pyvduse import testvm

        build_parser().parse_args([*testvm_args[0], "testvm"])  # checks the global options
        return testvm.main(testvm_args[1])
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
