"""Client for the kernel's ``vdpa`` generic-netlink family (what ``vdpa dev add`` uses).

A VDUSE device exists as ``/dev/vduse/<name>`` after VDUSE_CREATE_DEV, but drivers only see
it once it is attached to the vdpa bus with VDPA_CMD_DEV_NEW. That call does not return
until the bound driver has probed, which involves VDUSE messages (SET_STATUS ...) that
*another thread* of ours must answer. So nothing here takes a process-wide lock; each
``VdpaNetlink`` owns its own socket and asyncio loop (pyroute2), and is meant to be used by
one thread at a time. Open one per thread if several threads need it. pyroute2 drives the
socket with a private asyncio loop, so do not call this from inside a running event loop
(use ``asyncio.to_thread``).
"""

from __future__ import annotations

import errno
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from pyvduse.abi.vdpa import GENL_NAME, GENL_VERSION, VDUSE_MGMTDEV, VdpaAttr, VdpaCmd


def defer_package_init(name: str) -> None:
    """Let ``import NAME.sub`` load the submodule without running ``NAME/__init__.py``; that
    runs, once, when something asks ``NAME`` for a name that only ``__init__`` defines.

    ``pyroute2/__init__.py`` imports every subsystem of pyroute2 (ndb, ipdb, iproute,
    conntrack, nftables, ...), some 280 modules, of which the netlink client below needs
    about 15. Where a module import is slow (the test VM: tens of ms each) those cost a
    daemon 15 s at start and again at stop. Does nothing if ``NAME`` is already imported or
    cannot be found (the plain import that follows then reports it).
    """
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return
    package = importlib.util.module_from_spec(spec)
    loader = spec.loader

    def __getattr__(attr: str) -> object:
        if importlib.util.find_spec(f"{name}.{attr}") is not None:  # e.g. from NAME import x
            return importlib.import_module(f"{name}.{attr}")
        package.__dict__.pop("__getattr__", None)
        loader.exec_module(package)
        try:
            return package.__dict__[attr]
        except KeyError:
            raise AttributeError(f"module {name!r} has no attribute {attr!r}") from None

    package.__getattr__ = __getattr__  # type: ignore[method-assign]
    sys.modules[name] = package


defer_package_init("pyroute2")

from pyroute2.netlink import NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, genlmsg  # noqa: E402
from pyroute2.netlink.exceptions import NetlinkError  # noqa: E402
from pyroute2.netlink.generic import (  # noqa: E402
    AsyncGenericNetlinkSocket,
    GenericNetlinkSocket,
)

FAMILY_NOT_FOUND = "vdpa netlink family not found: load the vdpa and vduse modules (modprobe vduse)"

# pyroute2 NLA type of each attribute. Strings are 'asciiz' so that they are sent with the
# trailing NUL the kernel's strcmp() relies on.
_ATTR_TYPES: dict[VdpaAttr, str] = {
    VdpaAttr.UNSPEC: "none",
    VdpaAttr.MGMTDEV_BUS_NAME: "asciiz",
    VdpaAttr.MGMTDEV_DEV_NAME: "asciiz",
    VdpaAttr.MGMTDEV_SUPPORTED_CLASSES: "uint64",
    VdpaAttr.DEV_NAME: "asciiz",
    VdpaAttr.DEV_ID: "uint32",
    VdpaAttr.DEV_VENDOR_ID: "uint32",
    VdpaAttr.DEV_MAX_VQS: "uint32",
    VdpaAttr.DEV_MAX_VQ_SIZE: "uint16",
    VdpaAttr.DEV_MIN_VQ_SIZE: "uint16",
    VdpaAttr.DEV_NET_CFG_MACADDR: "cdata",
    VdpaAttr.DEV_NET_STATUS: "uint16",
    VdpaAttr.DEV_NET_CFG_MAX_VQP: "uint16",
    VdpaAttr.DEV_NET_CFG_MTU: "uint16",
    VdpaAttr.DEV_NEGOTIATED_FEATURES: "uint64",
    VdpaAttr.DEV_MGMTDEV_MAX_VQS: "uint32",
    VdpaAttr.DEV_SUPPORTED_FEATURES: "uint64",
    VdpaAttr.DEV_QUEUE_INDEX: "uint32",
    VdpaAttr.DEV_VENDOR_ATTR_NAME: "asciiz",
    VdpaAttr.DEV_VENDOR_ATTR_VALUE: "uint64",
    VdpaAttr.DEV_FEATURES: "uint64",
}
# 21 and up change meaning between kernels; keep them undecoded.
for _attr in VdpaAttr:
    _ATTR_TYPES.setdefault(_attr, "cdata")


def nla_name(attr: VdpaAttr) -> str:
    """The pyroute2 NLA name of an attribute, e.g. ``VDPA_ATTR_DEV_NAME``."""
    return f"VDPA_ATTR_{attr.name}"


class VdpaMsg(genlmsg):  # type: ignore[misc]
    """A vdpa generic-netlink message (genlmsghdr + ``enum vdpa_attr`` attributes)."""

    prefix = "VDPA_ATTR_"
    nla_map = tuple((int(a), nla_name(a), _ATTR_TYPES[a]) for a in VdpaAttr)


class _AsyncVdpaSocket(AsyncGenericNetlinkSocket):  # type: ignore[misc]
    # A missing family is reported through VdpaError; keep pyroute2 from logging errors.
    module_err_level = "debug"


class _VdpaSocket(GenericNetlinkSocket):  # type: ignore[misc]
    async_class = _AsyncVdpaSocket


class VdpaError(OSError):
    """A vdpa netlink request failed; ``errno`` is the kernel's error code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)


@dataclass(frozen=True)
class VdpaDevice:
    """One vdpa device as VDPA_CMD_DEV_GET reports it."""

    name: str
    mgmtdev: str  # "vduse", or "bus/device" for management devices on a bus
    device_id: int  # virtio device id (1 net, 2 block)
    vendor_id: int
    max_vqs: int
    max_vq_size: int


def build_msg(cmd: VdpaCmd, attrs: Iterable[tuple[VdpaAttr, Any]] = ()) -> VdpaMsg:
    """A request message for ``cmd`` carrying exactly ``attrs``, in order."""
    msg = VdpaMsg()
    msg["cmd"] = int(cmd)
    msg["version"] = GENL_VERSION
    msg["reserved"] = 0
    msg["attrs"] = [[nla_name(attr), value] for attr, value in attrs]
    return msg


def build_dev_add(name: str, mgmtdev: str = VDUSE_MGMTDEV) -> VdpaMsg:
    """VDPA_CMD_DEV_NEW with DEV_NAME and MGMTDEV_DEV_NAME only.

    No MGMTDEV_BUS_NAME: the vduse management device has no bus and the kernel's lookup
    fails with ENODEV if one is given. No net config attributes either: vduse declares
    none and the kernel answers EOPNOTSUPP.
    """
    return build_msg(
        VdpaCmd.DEV_NEW,
        [(VdpaAttr.DEV_NAME, name), (VdpaAttr.MGMTDEV_DEV_NAME, mgmtdev)],
    )


def build_dev_del(name: str) -> VdpaMsg:
    """VDPA_CMD_DEV_DEL with DEV_NAME only."""
    return build_msg(VdpaCmd.DEV_DEL, [(VdpaAttr.DEV_NAME, name)])


def _mgmtdev_of(msg: VdpaMsg) -> str:
    dev = msg.get_attr(nla_name(VdpaAttr.MGMTDEV_DEV_NAME)) or ""
    bus = msg.get_attr(nla_name(VdpaAttr.MGMTDEV_BUS_NAME))
    return f"{bus}/{dev}" if bus else str(dev)


def parse_device(msg: VdpaMsg) -> VdpaDevice:
    """Decode one DEV_GET reply."""

    def num(attr: VdpaAttr) -> int:
        value = msg.get_attr(nla_name(attr))
        return int(value) if value is not None else 0

    return VdpaDevice(
        name=str(msg.get_attr(nla_name(VdpaAttr.DEV_NAME)) or ""),
        mgmtdev=_mgmtdev_of(msg),
        device_id=num(VdpaAttr.DEV_ID),
        vendor_id=num(VdpaAttr.DEV_VENDOR_ID),
        max_vqs=num(VdpaAttr.DEV_MAX_VQS),
        max_vq_size=num(VdpaAttr.DEV_MAX_VQ_SIZE),
    )


def _describe(cmd: VdpaCmd, err: NetlinkError, what: str) -> str:
    code = int(err.code)
    text = f"vdpa {cmd.name}{what} failed: {os.strerror(code)}"
    # With extended ACKs the kernel explains itself; pyroute2 puts that text in args[1].
    detail = err.args[1] if len(err.args) > 1 else None
    if detail and detail != os.strerror(code):
        text += f" ({detail})"
    return text


class VdpaNetlink:
    """A vdpa generic-netlink socket: list management devices and attach/detach devices.

    Needs CAP_NET_ADMIN for dev_add/dev_del, and works only in the initial network
    namespace (the family is not netns-aware).
    """

    def __init__(self) -> None:
        try:
            sock = _VdpaSocket(ext_ack=True)
        except OSError as exc:
            code = exc.errno or errno.EPROTONOSUPPORT
            raise VdpaError(code, f"cannot open a generic netlink socket: {exc}") from exc
        try:
            sock.bind(GENL_NAME, VdpaMsg)
        except NetlinkError as exc:
            sock.close()
            if exc.code == errno.ENOENT:
                raise VdpaError(errno.ENOENT, FAMILY_NOT_FOUND) from exc
            raise VdpaError(int(exc.code), f"vdpa family lookup failed: {exc}") from exc
        except BaseException:
            sock.close()
            raise
        self._sock: Any = sock
        self._closed = False

    # -- lifetime --------------------------------------------------------------------

    def close(self) -> None:
        """Close the socket; further calls raise VdpaError(EBADF)."""
        if not self._closed:
            self._closed = True
            self._sock.close()

    def __enter__(self) -> VdpaNetlink:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- requests --------------------------------------------------------------------

    def _request(self, msg: VdpaMsg, *, dump: bool = False, what: str = "") -> list[VdpaMsg]:
        """Send ``msg`` and return the family's reply messages (ACKs and DONE dropped)."""
        if self._closed:
            raise VdpaError(errno.EBADF, "vdpa netlink socket is closed")
        cmd = VdpaCmd(msg["cmd"])
        flags = NLM_F_REQUEST | (NLM_F_DUMP if dump else NLM_F_ACK)
        prid = self._sock.prid
        try:
            replies: Sequence[Any] = tuple(self._sock.nlm_request(msg, msg_type=prid, msg_flags=flags))
        except NetlinkError as exc:
            raise VdpaError(int(exc.code), _describe(cmd, exc, what)) from exc
        return [m for m in replies if m["header"]["type"] == prid]

    def mgmtdev_names(self) -> list[str]:
        """Names of the registered management devices, e.g. ``["vduse"]``."""
        replies = self._request(build_msg(VdpaCmd.MGMTDEV_GET), dump=True)
        return [_mgmtdev_of(m) for m in replies]

    def has_mgmtdev(self, name: str = VDUSE_MGMTDEV) -> bool:
        """Whether management device ``name`` exists (for "vduse": the module is loaded)."""
        return name in self.mgmtdev_names()

    def dev_add(self, name: str, mgmtdev: str = VDUSE_MGMTDEV) -> None:
        """Attach VDUSE device ``name`` to the vdpa bus (``vdpa dev add``).

        Blocks until the bound driver has probed; the device's VDUSE messages must be
        answered from another thread meanwhile.
        """
        self._request(build_dev_add(name, mgmtdev), what=f" {name!r}")

    def dev_del(self, name: str) -> None:
        """Detach device ``name`` from the vdpa bus (``vdpa dev del``); also blocks."""
        self._request(build_dev_del(name), what=f" {name!r}")

    def dev_list(self) -> list[VdpaDevice]:
        """All vdpa devices (``vdpa dev show``)."""
        return [parse_device(m) for m in self._request(build_msg(VdpaCmd.DEV_GET), dump=True)]
