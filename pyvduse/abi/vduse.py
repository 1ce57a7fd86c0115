"""VDUSE user-space ABI (``<linux/vduse.h>``): ioctl numbers, structs and messages.

API version 0 is what every kernel from 5.15 to 6.1x speaks; Linux 7.x adds API version 1
(virtqueue groups and address spaces: ``ngroups``/``nas`` in the device config, a ``group``
per queue, ASID-tagged IOTLB messages and VDUSE_IOTLB_GET_FD2, SET_VQ_GROUP_ASID) and
VDUSE's own control features on the control fd (VDUSE_GET_FEATURES/SET_FEATURES:
QUEUE_READY, SUSPEND, each with its message). The layouts here are those of Debian's
``linux-libc-dev`` 7.3.4 (trixie-backports) ``<linux/vduse.h>``; on API 0 the new fields
sit in what was reserved (and must be zero), so one layout serves both versions.

All layouts are x86_64 little-endian with the C padding spelled out as ``x`` bytes, so each
``struct.Struct`` below has exactly the size ``sizeof`` reports; the unit tests pin them and
cross-check against the installed C header when a compiler is available.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

# --------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------

VDUSE_BASE = 0x81
VDUSE_API_VERSION = 0
VDUSE_API_VERSION_1 = 1  # Linux 7.x; SET_API_VERSION(1) fails with EINVAL on 6.1x
#: The newest API version this library speaks (Control chooses min(kernel's, this)).
API_VERSION_MAX = VDUSE_API_VERSION_1

# VDUSE control features (bit numbers in VDUSE_GET_FEATURES/SET_FEATURES, Linux 7.x): the
# device expects a message for each (SET_VQ_READY, SUSPEND) once set before CREATE_DEV.
VDUSE_F_QUEUE_READY = 0
VDUSE_F_SUSPEND = 1
#: Their names as ``ctl status`` shows them.
VDUSE_FEATURE_NAMES = {VDUSE_F_QUEUE_READY: "queue_ready", VDUSE_F_SUSPEND: "suspend"}
VDUSE_NAME_MAX = 256

VDUSE_ACCESS_RO = 1
VDUSE_ACCESS_WO = 2
VDUSE_ACCESS_RW = 3

VDUSE_EVENTFD_DEASSIGN = -1
VDUSE_IOVA_CAP_UMEM = 1

VDUSE_REQ_RESULT_OK = 0
VDUSE_REQ_RESULT_FAILED = 1

MESSAGE_SIZE = 152  # sizeof(struct vduse_dev_request) == sizeof(struct vduse_dev_response)
DEV_CONFIG_HEADER_SIZE = 336  # sizeof(struct vduse_dev_config) without the config bytes
CONFIG_SIZE_MAX = 4096  # the kernel refuses config_size > PAGE_SIZE
# sysfs attributes of /sys/class/vduse/NAME (not the uapi header: the driver's limits)
MIN_BOUNCE_SIZE = 1 << 20  # bounce_size (6.4+): VDUSE_MIN_BOUNCE_SIZE .. VDUSE_MAX_BOUNCE_SIZE
MAX_BOUNCE_SIZE = 1 << 30
DEFAULT_MSG_TIMEOUT = 30  # msg_timeout, whole seconds; 0 waits forever


class MsgType(IntEnum):
    """``enum vduse_req_type``: what a request read from the device fd asks for."""

    GET_VQ_STATE = 0
    SET_STATUS = 1
    UPDATE_IOTLB = 2
    SET_VQ_GROUP_ASID = 3  # API version 1 only
    SET_VQ_READY = 4  # only with VDUSE_F_QUEUE_READY set
    SUSPEND = 5  # only with VDUSE_F_SUSPEND set


def vduse_feature_names(features: int) -> list[str]:
    """The names of the VDUSE control features in ``features``, unknown bits as ``bitN``."""
    return [
        VDUSE_FEATURE_NAMES.get(bit, f"bit{bit}")
        for bit in range(features.bit_length())
        if features >> bit & 1
    ]


# --------------------------------------------------------------------------------------
# ioctl number encoding (asm-generic/ioctl.h, as used on x86_64)
# --------------------------------------------------------------------------------------

IOC_NRBITS = 8
IOC_TYPEBITS = 8
IOC_SIZEBITS = 14
IOC_DIRBITS = 2

IOC_NRSHIFT = 0
IOC_TYPESHIFT = IOC_NRSHIFT + IOC_NRBITS
IOC_SIZESHIFT = IOC_TYPESHIFT + IOC_TYPEBITS
IOC_DIRSHIFT = IOC_SIZESHIFT + IOC_SIZEBITS

IOC_NONE = 0
IOC_WRITE = 1
IOC_READ = 2


def ioc(direction: int, type_: int, nr: int, size: int) -> int:
    """``_IOC()``: pack direction, type, number and argument size into a request number."""
    for value, bits, what in (
        (direction, IOC_DIRBITS, "direction"),
        (type_, IOC_TYPEBITS, "type"),
        (nr, IOC_NRBITS, "nr"),
        (size, IOC_SIZEBITS, "size"),
    ):
        if not 0 <= value < 1 << bits:
            raise ValueError(f"ioctl {what} {value} does not fit in {bits} bits")
    return direction << IOC_DIRSHIFT | size << IOC_SIZESHIFT | type_ << IOC_TYPESHIFT | nr << IOC_NRSHIFT


def io(type_: int, nr: int) -> int:
    """``_IO()``: an ioctl without an argument."""
    return ioc(IOC_NONE, type_, nr, 0)


def ior(type_: int, nr: int, size: int) -> int:
    """``_IOR()``: the kernel writes ``size`` bytes to the argument."""
    return ioc(IOC_READ, type_, nr, size)


def iow(type_: int, nr: int, size: int) -> int:
    """``_IOW()``: the kernel reads ``size`` bytes from the argument."""
    return ioc(IOC_WRITE, type_, nr, size)


def iowr(type_: int, nr: int, size: int) -> int:
    """``_IOWR()``: the argument is read and then rewritten by the kernel."""
    return ioc(IOC_READ | IOC_WRITE, type_, nr, size)


# --------------------------------------------------------------------------------------
# Struct layouts
# --------------------------------------------------------------------------------------

U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")

# struct vduse_dev_config (API 0): name, vendor_id, device_id, features, vq_num, vq_align,
# reserved[13], config_size; the config bytes follow the 336-byte header.
DEV_CONFIG = struct.Struct("<256sIIQII13II")
# API 1 renames reserved[0..1] to ngroups and nas.
DEV_CONFIG_V1 = struct.Struct("<256sIIQIIII11II")

# struct vduse_iotlb_entry {u64 offset, start, last; u8 perm; 7 bytes padding}
IOTLB_ENTRY = struct.Struct("<QQQB7x")
# struct vduse_iotlb_entry_v2 (7.3) {u64 offset, start, last; u8 perm; u8 padding[7];
# u32 asid; u32 reserved[11];} -- 80 bytes (a draft nested vduse_iotlb_entry and had
# reserved[12], 88 bytes: not what shipped)
IOTLB_ENTRY_V2 = struct.Struct("<QQQB7xI11I")

# struct vduse_config_data {u32 offset; u32 length; u8 buffer[];}
CONFIG_DATA_HEADER = struct.Struct("<II")

# struct vduse_vq_config (API 0) {u32 index; u16 max_size; u16 reserved[13];}
VQ_CONFIG = struct.Struct("<IH13H")
# API 1: {u32 index; u16 max_size; u16 reserved1; u32 group; u16 reserved2[10];}
VQ_CONFIG_V1 = struct.Struct("<IHHI10H")

VQ_STATE_SPLIT = struct.Struct("<H")
VQ_STATE_PACKED = struct.Struct("<HHHH")
# struct vduse_vq_state {u32 index; union {split, packed};} -- 12 bytes, 4-byte aligned
VQ_STATE = struct.Struct("<IHHHH")

# struct vduse_vq_info: index, num, desc/driver/device addr, 8-byte state union, u8 ready
VQ_INFO = struct.Struct("<IIQQQHHHHB7x")

# struct vduse_vq_eventfd {u32 index; int fd;}
VQ_EVENTFD = struct.Struct("<Ii")

# struct vduse_iova_umem {u64 uaddr, iova, size; u64 reserved[3];}
IOVA_UMEM = struct.Struct("<QQQ3Q")
IOVA_UMEM_V1 = struct.Struct("<QQQI5I")  # API 1: u32 asid, u32 reserved[5]

# struct vduse_iova_info {u64 start, last, capability; u64 reserved[3];}
IOVA_INFO = struct.Struct("<QQQ3Q")
IOVA_INFO_V1 = struct.Struct("<QQQI5I")  # API 1: u32 asid, u32 reserved[5]

# Message-body structs (the union inside requests and responses).
DEV_STATUS = struct.Struct("<B")
IOVA_RANGE = struct.Struct("<QQ")
IOVA_RANGE_V2 = struct.Struct("<QQI4x")  # API 1: {u64 start, last; u32 asid; u32 padding;}
VQ_GROUP_ASID = struct.Struct("<II")  # API 1
VQ_READY = struct.Struct("<II")  # VDUSE_F_QUEUE_READY: {u32 num; u32 ready;}

# struct vduse_dev_request {u32 type; u32 request_id; u32 reserved[4]; union (128 bytes)}
DEV_REQUEST = struct.Struct("<II4I128s")
REQUEST_HEADER = struct.Struct("<II16x")
REQUEST_BODY_OFFSET = 24
# struct vduse_dev_response {u32 request_id; u32 result; u32 reserved[4];
#                            struct vduse_vq_state vq_state; padding to 128 bytes}
DEV_RESPONSE = struct.Struct("<II4IIHHHH116x")


# --------------------------------------------------------------------------------------
# ioctl request numbers
# --------------------------------------------------------------------------------------

# /dev/vduse/control
VDUSE_GET_API_VERSION = ior(VDUSE_BASE, 0x00, U64.size)
VDUSE_SET_API_VERSION = iow(VDUSE_BASE, 0x01, U64.size)
VDUSE_CREATE_DEV = iow(VDUSE_BASE, 0x02, DEV_CONFIG.size)
VDUSE_DESTROY_DEV = iow(VDUSE_BASE, 0x03, VDUSE_NAME_MAX)
VDUSE_GET_FEATURES = ior(VDUSE_BASE, 0x04, U64.size)  # 7.x: the VDUSE features it offers
VDUSE_SET_FEATURES = iow(VDUSE_BASE, 0x05, U64.size)  # 7.x: those the next CREATE_DEV gets

# /dev/vduse/<name>
VDUSE_IOTLB_GET_FD = iowr(VDUSE_BASE, 0x10, IOTLB_ENTRY.size)
VDUSE_DEV_GET_FEATURES = ior(VDUSE_BASE, 0x11, U64.size)
VDUSE_DEV_SET_CONFIG = iow(VDUSE_BASE, 0x12, CONFIG_DATA_HEADER.size)
VDUSE_DEV_INJECT_CONFIG_IRQ = io(VDUSE_BASE, 0x13)
VDUSE_VQ_SETUP = iow(VDUSE_BASE, 0x14, VQ_CONFIG.size)
VDUSE_VQ_GET_INFO = iowr(VDUSE_BASE, 0x15, VQ_INFO.size)
VDUSE_VQ_SETUP_KICKFD = iow(VDUSE_BASE, 0x16, VQ_EVENTFD.size)
VDUSE_VQ_INJECT_IRQ = iow(VDUSE_BASE, 0x17, U32.size)
VDUSE_IOTLB_REG_UMEM = iow(VDUSE_BASE, 0x18, IOVA_UMEM.size)  # 6.0+
VDUSE_IOTLB_DEREG_UMEM = iow(VDUSE_BASE, 0x19, IOVA_UMEM.size)  # 6.0+
VDUSE_IOTLB_GET_INFO = iowr(VDUSE_BASE, 0x1A, IOVA_INFO.size)  # 6.0+
VDUSE_IOTLB_GET_FD2 = iowr(VDUSE_BASE, 0x1B, IOTLB_ENTRY_V2.size)  # API 1 only


# --------------------------------------------------------------------------------------
# Typed views
# --------------------------------------------------------------------------------------


def encode_name(name: str) -> bytes:
    """A device name as the kernel wants it: 1..255 bytes of UTF-8, no NUL.

    Raises ValueError otherwise, because the kernel would either truncate the name silently
    (it forces ``name[255] = 0``) or reject it with a bare EINVAL.
    """
    raw = name.encode()
    if not raw:
        raise ValueError("VDUSE device name must not be empty")
    if b"\0" in raw:
        raise ValueError("VDUSE device name must not contain NUL")
    if len(raw) >= VDUSE_NAME_MAX:
        raise ValueError(f"VDUSE device name is {len(raw)} bytes; at most {VDUSE_NAME_MAX - 1} allowed")
    return raw


def name_buffer(name: str) -> bytes:
    """The 256-byte ``char[VDUSE_NAME_MAX]`` argument of VDUSE_DESTROY_DEV."""
    return encode_name(name).ljust(VDUSE_NAME_MAX, b"\0")


def _decode_name(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode()


@dataclass(frozen=True)
class DevConfig:
    """``struct vduse_dev_config`` plus its trailing config space (VDUSE_CREATE_DEV)."""

    name: str
    vendor_id: int
    device_id: int
    features: int
    vq_num: int
    vq_align: int
    config: bytes = b""
    #: API 1: the virtqueue groups and address spaces the device declares (each 1..0xffff;
    #: the kernel refuses 0 with EINVAL). API 0: both 0 (the kernel refuses anything else).
    ngroups: int = 0
    nas: int = 0

    def __post_init__(self) -> None:
        encode_name(self.name)

    def pack(self) -> bytes:
        """The 336-byte header followed by the config bytes (config_size = len(config)).

        Pass the result as a ``bytearray`` to ``fcntl.ioctl``: an immutable argument is
        limited to 1024 bytes.
        """
        header = DEV_CONFIG_V1.pack(
            encode_name(self.name),
            self.vendor_id,
            self.device_id,
            self.features,
            self.vq_num,
            self.vq_align,
            self.ngroups,
            self.nas,
            *([0] * 11),
            len(self.config),
        )
        return header + bytes(self.config)

    @classmethod
    def unpack(cls, buf: bytes) -> DevConfig:
        """Decode a header and the ``config_size`` config bytes that follow it."""
        fields = DEV_CONFIG_V1.unpack_from(buf)
        config_size = fields[-1]
        config = bytes(buf[DEV_CONFIG.size : DEV_CONFIG.size + config_size])
        if len(config) != config_size:
            raise ValueError(f"config_size is {config_size} but only {len(config)} bytes follow")
        return cls(
            name=_decode_name(fields[0]),
            vendor_id=fields[1],
            device_id=fields[2],
            features=fields[3],
            vq_num=fields[4],
            vq_align=fields[5],
            config=config,
            ngroups=fields[6],
            nas=fields[7],
        )


@dataclass(frozen=True)
class IotlbEntry:
    """``struct vduse_iotlb_entry``: the in/out argument of VDUSE_IOTLB_GET_FD."""

    offset: int
    start: int
    last: int
    perm: int

    def pack(self) -> bytes:
        return IOTLB_ENTRY.pack(self.offset, self.start, self.last, self.perm)

    @classmethod
    def unpack(cls, buf: bytes) -> IotlbEntry:
        return cls(*IOTLB_ENTRY.unpack_from(buf))


@dataclass(frozen=True)
class IotlbEntryV2:
    """``struct vduse_iotlb_entry_v2`` (API 1, VDUSE_IOTLB_GET_FD2); reserved stays zero
    (the kernel refuses anything else with EINVAL)."""

    offset: int
    start: int
    last: int
    perm: int
    asid: int

    def pack(self) -> bytes:
        return IOTLB_ENTRY_V2.pack(self.offset, self.start, self.last, self.perm, self.asid, *([0] * 11))

    @classmethod
    def unpack(cls, buf: bytes) -> IotlbEntryV2:
        return cls(*IOTLB_ENTRY_V2.unpack_from(buf)[:5])

    @property
    def entry(self) -> IotlbEntry:
        """The same region as VDUSE_IOTLB_GET_FD describes it."""
        return IotlbEntry(self.offset, self.start, self.last, self.perm)


@dataclass(frozen=True)
class VqConfig:
    """``struct vduse_vq_config``: every reserved field zero, as required; ``group`` (API
    1: below the device's ngroups, set before DRIVER_OK) must be 0 on API 0."""

    index: int
    max_size: int
    group: int = 0

    def pack(self) -> bytes:
        return VQ_CONFIG_V1.pack(self.index, self.max_size, 0, self.group, *([0] * 10))

    @classmethod
    def unpack(cls, buf: bytes) -> VqConfig:
        index, max_size, _, group = VQ_CONFIG_V1.unpack_from(buf)[:4]
        return cls(index, max_size, group)


@dataclass(frozen=True)
class VqStatePacked:
    """``struct vduse_vq_state_packed``: wrap counters (0/1) and 15-bit ring indices."""

    last_avail_counter: int
    last_avail_idx: int
    last_used_counter: int
    last_used_idx: int

    def pack(self) -> bytes:
        return VQ_STATE_PACKED.pack(
            self.last_avail_counter,
            self.last_avail_idx,
            self.last_used_counter,
            self.last_used_idx,
        )

    @classmethod
    def unpack(cls, buf: bytes) -> VqStatePacked:
        return cls(*VQ_STATE_PACKED.unpack_from(buf))


_ZERO_PACKED = VqStatePacked(0, 0, 0, 0)


@dataclass(frozen=True)
class VqInfo:
    """``struct vduse_vq_info`` as returned by VDUSE_VQ_GET_INFO.

    The kernel stores one 8-byte union; ``avail_index`` is its split-ring view (the first
    u16) and ``packed`` the packed-ring view of the same bytes. Which one is meaningful
    depends on whether VIRTIO_F_RING_PACKED was negotiated.
    """

    index: int
    num: int
    desc_addr: int
    driver_addr: int
    device_addr: int
    avail_index: int
    packed: VqStatePacked
    ready: bool

    def pack(self) -> bytes:
        """Encode; the union comes from ``packed`` unless it is all zero.

        Raises ValueError when both views are set and disagree about the first u16.
        """
        if self.packed == _ZERO_PACKED:
            state = VqStatePacked(self.avail_index, 0, 0, 0)
        elif self.avail_index in (0, self.packed.last_avail_counter):
            state = self.packed
        else:
            raise ValueError("avail_index and packed describe different union contents")
        return VQ_INFO.pack(
            self.index,
            self.num,
            self.desc_addr,
            self.driver_addr,
            self.device_addr,
            state.last_avail_counter,
            state.last_avail_idx,
            state.last_used_counter,
            state.last_used_idx,
            int(self.ready),
        )

    @classmethod
    def unpack(cls, buf: bytes) -> VqInfo:
        f = VQ_INFO.unpack_from(buf)
        return cls(
            index=f[0],
            num=f[1],
            desc_addr=f[2],
            driver_addr=f[3],
            device_addr=f[4],
            avail_index=f[5],
            packed=VqStatePacked(*f[5:9]),
            ready=bool(f[9]),
        )

    @staticmethod
    def query(index: int) -> bytes:
        """The VDUSE_VQ_GET_INFO in-argument: only ``index`` set (wrap it in a bytearray)."""
        return VQ_INFO.pack(index, 0, 0, 0, 0, 0, 0, 0, 0, 0)


@dataclass(frozen=True)
class VqEventfd:
    """``struct vduse_vq_eventfd`` for VDUSE_VQ_SETUP_KICKFD; fd -1 deassigns."""

    index: int
    fd: int

    def pack(self) -> bytes:
        return VQ_EVENTFD.pack(self.index, self.fd)

    @classmethod
    def unpack(cls, buf: bytes) -> VqEventfd:
        return cls(*VQ_EVENTFD.unpack_from(buf))


def config_data(offset: int, data: bytes) -> bytes:
    """``struct vduse_config_data`` with its payload, the VDUSE_DEV_SET_CONFIG argument.

    Empty data is rejected here because the kernel answers it with a bare EINVAL.
    """
    if not data:
        raise ValueError("VDUSE_DEV_SET_CONFIG needs at least one byte")
    return CONFIG_DATA_HEADER.pack(offset, len(data)) + bytes(data)


@dataclass(frozen=True)
class IovaUmem:
    """``struct vduse_iova_umem`` for VDUSE_IOTLB_REG_UMEM / DEREG_UMEM (``asid``: API 1,
    0 on API 0)."""

    uaddr: int
    iova: int
    size: int
    asid: int = 0

    def pack(self) -> bytes:
        return IOVA_UMEM_V1.pack(self.uaddr, self.iova, self.size, self.asid, 0, 0, 0, 0, 0)

    @classmethod
    def unpack(cls, buf: bytes) -> IovaUmem:
        return cls(*IOVA_UMEM_V1.unpack_from(buf)[:4])


@dataclass(frozen=True)
class IovaInfo:
    """``struct vduse_iova_info`` for VDUSE_IOTLB_GET_INFO (``asid``: API 1, 0 on API 0)."""

    start: int
    last: int
    capability: int
    asid: int = 0

    def pack(self) -> bytes:
        return IOVA_INFO_V1.pack(self.start, self.last, self.capability, self.asid, 0, 0, 0, 0, 0)

    @classmethod
    def unpack(cls, buf: bytes) -> IovaInfo:
        return cls(*IOVA_INFO_V1.unpack_from(buf)[:4])

    @property
    def umem_capable(self) -> bool:
        """Whether the region may be backed by user memory (VDUSE_IOVA_CAP_UMEM)."""
        return bool(self.capability & VDUSE_IOVA_CAP_UMEM)


@dataclass(frozen=True)
class Request:
    """``struct vduse_dev_request``: one 152-byte message read from the device fd.

    Only the fields of the union member that ``type`` selects are decoded; the rest are 0.
    An unknown ``type`` is kept as a plain int so the caller can answer FAILED instead of
    crashing on a message from a newer kernel.
    """

    type: int
    request_id: int
    vq_index: int = 0  # GET_VQ_STATE
    status: int = 0  # SET_STATUS
    iova_start: int = 0  # UPDATE_IOTLB
    iova_last: int = 0  # UPDATE_IOTLB
    asid: int = 0  # UPDATE_IOTLB (API 1) and SET_VQ_GROUP_ASID
    group: int = 0  # SET_VQ_GROUP_ASID
    ready: bool = False  # SET_VQ_READY (its queue in vq_index)

    @classmethod
    def unpack(cls, buf: bytes) -> Request:
        if len(buf) < MESSAGE_SIZE:
            raise ValueError(f"VDUSE request is {MESSAGE_SIZE} bytes, got {len(buf)}")
        type_, request_id = REQUEST_HEADER.unpack_from(buf)
        off = REQUEST_BODY_OFFSET
        if type_ == MsgType.GET_VQ_STATE:
            return cls(MsgType.GET_VQ_STATE, request_id, vq_index=U32.unpack_from(buf, off)[0])
        if type_ == MsgType.SET_STATUS:
            return cls(MsgType.SET_STATUS, request_id, status=DEV_STATUS.unpack_from(buf, off)[0])
        if type_ == MsgType.UPDATE_IOTLB:
            # The kernel zero-fills its message, so reading the API-1 asid is harmless on API 0.
            start, last, asid = IOVA_RANGE_V2.unpack_from(buf, off)
            return cls(MsgType.UPDATE_IOTLB, request_id, iova_start=start, iova_last=last, asid=asid)
        if type_ == MsgType.SET_VQ_GROUP_ASID:
            group, asid = VQ_GROUP_ASID.unpack_from(buf, off)
            return cls(MsgType.SET_VQ_GROUP_ASID, request_id, group=group, asid=asid)
        if type_ == MsgType.SET_VQ_READY:
            num, ready = VQ_READY.unpack_from(buf, off)
            return cls(MsgType.SET_VQ_READY, request_id, vq_index=num, ready=bool(ready))
        if type_ == MsgType.SUSPEND:
            return cls(MsgType.SUSPEND, request_id)
        return cls(type_, request_id)

    def pack(self) -> bytes:
        """Encode as the kernel would; used by fakes and tests, never by the daemon."""
        if self.type == MsgType.GET_VQ_STATE:
            body = U32.pack(self.vq_index)
        elif self.type == MsgType.SET_STATUS:
            body = DEV_STATUS.pack(self.status)
        elif self.type == MsgType.UPDATE_IOTLB:
            body = IOVA_RANGE_V2.pack(self.iova_start, self.iova_last, self.asid)
        elif self.type == MsgType.SET_VQ_GROUP_ASID:
            body = VQ_GROUP_ASID.pack(self.group, self.asid)
        elif self.type == MsgType.SET_VQ_READY:
            body = VQ_READY.pack(self.vq_index, int(self.ready))
        else:
            body = b""
        return DEV_REQUEST.pack(self.type, self.request_id, 0, 0, 0, 0, body)


@dataclass(frozen=True)
class Response:
    """``struct vduse_dev_response`` decoded, for fakes and tests (see pack_response)."""

    request_id: int
    result: int
    vq_index: int
    avail_index: int
    packed: VqStatePacked

    @classmethod
    def unpack(cls, buf: bytes) -> Response:
        f = DEV_RESPONSE.unpack_from(buf)
        if any(f[2:6]):
            raise ValueError("vduse_dev_response.reserved must be zero")
        return cls(f[0], f[1], f[6], f[7], VqStatePacked(*f[7:11]))


def pack_response(
    request_id: int,
    result: int,
    *,
    avail_index: int | None = None,
    packed: VqStatePacked | None = None,
    vq_index: int = 0,
) -> bytes:
    """The 152-byte ``struct vduse_dev_response`` to ``write()`` back.

    ``reserved`` is always zero (the kernel rejects anything else with EINVAL). Give
    ``avail_index`` (split ring) or ``packed`` only when answering GET_VQ_STATE.
    """
    if avail_index is not None and packed is not None:
        raise ValueError("give either avail_index (split) or packed state, not both")
    if packed is not None:
        state = (
            packed.last_avail_counter,
            packed.last_avail_idx,
            packed.last_used_counter,
            packed.last_used_idx,
        )
    else:
        state = (avail_index or 0, 0, 0, 0)
    return DEV_RESPONSE.pack(request_id, result, 0, 0, 0, 0, vq_index, *state)
