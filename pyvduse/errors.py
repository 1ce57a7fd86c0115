"""The errors pyvduse raises on purpose, by what the caller can do about each.

Every layer raises these in the terms of the Python API: ``str()`` says what went wrong and
what to do, and ``option`` names the argument at fault, if one is. Only the command line
words them for a terminal (``pyvduse.cli.messages``: its option names, its commands), so a
program that embeds pyvduse never reads about ``--name`` or ``pyvduse destroy``.
"""

from __future__ import annotations


class PyvduseError(Exception):
    """Base of the errors pyvduse raises on purpose; ``option``: the argument at fault."""

    def __init__(self, message: str, *, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option


class UserError(PyvduseError):
    """A mistake on the command line, already worded for the terminal: printed as one line,
    no traceback."""

    exit_code = 2


class ConfigError(PyvduseError):
    """An argument's value cannot work here (found before anything was created)."""


class MissingDependency(PyvduseError):
    """A package or kernel module pyvduse needs is not there; the message says how to add it."""


class KernelMissing(MissingDependency, UserError):
    """The running kernel lacks what is asked (the vduse module, a vdpa bus driver, a sysfs
    attribute of a newer kernel)."""


class AccessDenied(PyvduseError):
    """No permission or capability for what is asked (root or CAP_NET_ADMIN needed)."""


class DeviceError(PyvduseError):
    """About one named VDUSE device."""

    def __init__(self, name: str, message: str, *, option: str | None = None) -> None:
        super().__init__(message, option=option)
        self.name = name


class NameTaken(DeviceError):
    """A VDUSE device of that name exists already (and no daemon of ours can resume it)."""


class NoSuchDevice(DeviceError):
    """There is no VDUSE device of that name to resume."""


class DeviceBusy(DeviceError):
    """Another running daemon serves that device."""


class DeviceBroken(DeviceError):
    """The kernel marked the device broken (a control message timed out): it must be
    destroyed and created again."""


class KernelRefused(DeviceError):
    """The kernel refused to create the device as configured."""


class StateMismatch(DeviceError):
    """The device left by a dead daemon was made with another configuration than the one
    given now, so its in-flight log does not apply."""


class ResizeError(PyvduseError):
    """A resize that cannot be done: ``code`` is ``unsupported`` (not with this storage),
    ``invalid`` (not with these arguments) or ``failed`` (the storage refused)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
