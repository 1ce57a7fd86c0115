"""How the command line words pyvduse's errors: its own option names and commands.

The layers below raise errors in the terms of the Python API (``pyvduse.errors``); this is
the one place that knows a device's name is ``--name`` here, the management socket's place
``--control``, and that ``pyvduse destroy`` removes a device.
"""

from __future__ import annotations

from pyvduse.errors import DeviceBroken, NameTaken, PyvduseError, StateMismatch, UserError

#: The command-line option of each API argument an error can name (others: --the-name).
FLAGS = {"irq_placement": "--irq-cpus", "user_bounce": "--bounce-memory"}


def flag(option: str) -> str:
    return FLAGS.get(option, "--" + option.replace("_", "-"))


def terminal_message(e: PyvduseError) -> str:
    """The one line ``pyvduse`` prints for ``e``."""
    if isinstance(e, UserError) and e.option is None:  # a KernelMissing may name its option
        return str(e)
    if isinstance(e, NameTaken):
        return (
            f"a VDUSE device named '{e.name}' already exists: choose another --name, or "
            f"remove the old one with 'pyvduse destroy {e.name}'"
        )
    if isinstance(e, DeviceBroken):
        return f"{e}; remove it with 'pyvduse destroy {e.name}' and start again"
    if isinstance(e, StateMismatch):
        return (
            f"refusing to resume '{e.name}': {e}; start it with the options it was "
            f"created with, or 'pyvduse destroy {e.name}'"
        )
    if e.option is not None:
        return f"{flag(e.option)}: {e}"
    return str(e)
