"""The ``pyvduse`` command: one subcommand per job, user errors as one line on stderr."""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import logging
import sys

from pyvduse import __version__
from pyvduse.errors import PyvduseError, UserError

#: What ``pyvduse --help`` says first (plain text: the docstring above is for readers of code).
DESCRIPTION = (
    "Serve virtio devices from Python through VDUSE: 'pyvduse blk' makes a real "
    "/dev/vdX whose every request this process serves."
)

# The subcommands each module defines. A command line that names one of them gets a parser
# with only that one, so that starting a daemon neither imports the other commands' modules
# nor builds their parsers: in the test VM every module and every argparse parser (its
# gettext look-ups stat the disk) costs tens of milliseconds, and restarting fast matters.
COMMAND_MODULES = {
    "blk": "blk",
    "net": "net",
    "fs": "fs",
    "list": "manage",
    "destroy": "manage",
    "ctl": "ctl",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line parser; given one of COMMAND_MODULES' commands, the parser of that
    command alone, which parses that command's arguments exactly as the full one does."""
    only = COMMAND_MODULES.get(command) if command is not None else None
    parser = argparse.ArgumentParser(prog="pyvduse", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"pyvduse {__version__}")
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=("debug", "info", "warning", "error"),
        help="stderr log level (default warning)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    if only in (None, "blk"):
        from pyvduse.cli import blk

        blk.add_parser(sub)
    if only in (None, "net"):
        from pyvduse.cli import net

        net.add_parser(sub)
    if only in (None, "fs"):
        from pyvduse.cli import fs

        fs.add_parser(sub)
    if only in (None, "manage"):
        from pyvduse.cli import manage

        manage.add_parsers(sub)
    if only in (None, "ctl"):
        from pyvduse.cli import ctl

        ctl.add_parser(sub)
    if only is None:
        # Listed for --help only: main() hands everything after "testvm" to its own parser,
        # since argparse's REMAINDER drops options that come before "--".
        sub.add_parser(
            "testvm", add_help=False, help="run a command in the test VM (Linux with VDUSE, under QEMU)"
        )
    return parser


def command_index(argv: list[str]) -> int | None:
    """Where the subcommand is in ``argv`` (the first word that is no global option)."""
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--log-level":
            i += 2
            continue
        if not word.startswith("-"):
            return i
        i += 1
    return None


def daemon_command(argv: list[str]) -> str | None:
    """The subcommand, when nothing before it but ``--log-level`` could need the others
    (as ``--help`` does, or an abbreviated option that takes the command for its value)."""
    i = command_index(argv)
    if i is None:
        return None
    j = 0
    while j < i:
        if argv[j] == "--log-level":
            j += 2
        elif argv[j].startswith("--log-level="):
            j += 1
        else:
            return None
    return argv[i]


def split_testvm(argv: list[str]) -> tuple[list[str], list[str]] | None:
    """(global options, testvm's own arguments) when the subcommand is ``testvm``."""
    i = command_index(argv)
    if i is None or argv[i] != "testvm":
        return None
    return argv[:i], argv[i + 1 :]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    testvm_args = split_testvm(argv)
    if testvm_args is not None:
        from pyvduse import testvm

        build_parser().parse_args([*testvm_args[0], "testvm"])  # checks the global options
        return testvm.main(testvm_args[1])
    args = build_parser(daemon_command(argv)).parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr, format="pyvduse: %(levelname)s: %(message)s"
    )
    logging.getLogger("pyroute2").setLevel(logging.WARNING)  # its debug output is per message
    with contextlib.suppress(ValueError, OSError):  # a stderr with no file (tests)
        faulthandler.enable()  # a crash in C (the native data path) says where, on stderr
    try:
        return int(args.func(args))
    except PyvduseError as e:
        from pyvduse.cli.messages import terminal_message

        print(f"pyvduse: error: {terminal_message(e)}", file=sys.stderr)
        return e.exit_code if isinstance(e, UserError) else UserError.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
