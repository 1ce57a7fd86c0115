"""Run one shell command in a throwaway Linux guest (6.12 or 7.3) that has the real VDUSE module.

Why: VDUSE needs a kernel module that CI and developer machines do not have, and loading
kernel modules on the host is neither possible nor wise. So we boot a Debian cloud kernel
(6.12 from the machine's own apt sources by default; 7.3, whose VDUSE speaks API version 1,
from trixie-backports through a private apt configuration: see KERNELS) under QEMU (TCG,
no KVM needed) with a tiny busybox initramfs that loads the
vduse/vdpa/virtio_vdpa/vhost_vdpa/virtio_blk/virtio_net modules, mounts this machine's
whole filesystem at / through virtiofs (so the same Python, packages and checkout are
there), gives the guest its own /dev, /proc, /sys and a private tmpfs at /tmp, runs the
command in a chroot, saves its exit status and the kernel log, and powers off.

Several VMs may run at once: each run gets its own directory under /run/pyvduse-testvm/
(named on the kernel command line) holding the command script, the exit status and the
kernel log, so nothing is scraped from the console except the command's own output.

    python -m pyvduse.testvm [--kernel 6.12|7.3] [--mem 2G] [--smp 2] [--timeout 900]
                             [--cwd DIR] -- COMMAND...
"""

from __future__ import annotations

import argparse
import codecs
import ctypes
import dataclasses
import fcntl
import gzip
import hashlib
import importlib
import importlib.util
import io
import json
import lzma
import os
import re
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, TextIO

__all__ = [
    "DEFAULT_KERNEL",
    "EXIT_NO_STATUS",
    "EXIT_TIMEOUT",
    "KERNELS",
    "GuestImage",
    "HostTools",
    "KernelSpec",
    "RunResult",
    "TestVMError",
    "default_cache",
    "ensure_guest",
    "ensure_test_tools",
    "ensure_tools",
    "main",
    "run",
]

# Bump when the guest image recipe changes in a way the hash below cannot see (e.g. the
# way modules are picked); the init script and module list are hashed in automatically.
RECIPE = 1

APT_PACKAGES = (
    "qemu-system-x86",
    "qemu-system-common",
    "busybox-static",
    "cpio",
    "kmod",
    "xz-utils",
    "iproute2",
)
# Commands the packages above provide; any missing one triggers the apt install. The guest
# sees the host's filesystem, so kmod (modprobe) and iproute2 (vdpa) are for the guest.
REQUIRED_COMMANDS = ("qemu-system-x86_64", "cpio", "depmod", "xz", "vdpa")
# What the tests run in the guest (it sees the host's filesystem), by the command that shows
# each package is there: the test harness installs the missing ones, as it does the VM's.
TEST_PACKAGES = {
    "fio": "fio",
    "mkfs.ext4": "e2fsprogs",
    "blkdiscard": "util-linux",
    "dmsetup": "dmsetup",
    "qemu-storage-daemon": "qemu-system-common",
    "sha256sum": "coreutils",
    "iperf3": "iperf3",
    "ping": "iputils-ping",
    "nbdkit": "nbdkit",
    "qemu-nbd": "qemu-utils",
    "nbdsh": "python3-libnbd",
    # the kernel's own NBD client (with nbd.ko, GUEST_MODULES): bench/nbd.py's limit
    "nbd-client": "nbd-client",
    # the Ceph cluster of the RBD tests (pyvduse.testing.ceph); ceph-common brings librbd1
    "ceph-mon": "ceph-mon",
    "ceph-osd": "ceph-osd",
    "rbd": "ceph-common",
}
# What building the native data path takes (pyproject.toml): a C compiler, the Python
# headers, and liburing and libnbd for its io_uring and NBD paths.
BUILD_PACKAGES = ("gcc", "libc6-dev", "python3-dev", "liburing-dev", "libnbd-dev")
NATIVE_FULL_MODULE = "pyvduse.fastpath._splitblk_full"
VIRTIOFSD_CANDIDATES = ("/usr/lib/qemu/virtiofsd", "/usr/libexec/virtiofsd")
SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")
STANDARD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """Where one test kernel comes from: Debian's cloud kernel (small, boots fast under TCG,
    ships VDUSE as a module), the newest of its series."""

    version: str
    #: The package that names the kernel (group 1: the stable release N, group 2: debM).
    package_re: re.Pattern[str]
    #: Every package of one kernel, made from the name package_re matched (7.3 is split in
    #: two: linux-binary-... holds the image, linux-modules-... the modules).
    companions: tuple[tuple[str, str], ...] = ()
    #: A Debian suite fetched through a private apt configuration (its own sources list,
    #: lists and cache under the kernel's cache directory): the machine's sources stay as
    #: they are. None: the machine's own apt sources.
    suite: str | None = None

    @property
    def apt_pattern(self) -> str:
        """package_re for ``apt-cache search`` (POSIX ERE: no \\d)."""
        return self.package_re.pattern.replace("\\d", "[0-9]")

    def packages(self, name: str) -> list[str]:
        """All the packages of the kernel whose naming package is ``name``."""
        return [name, *(name.replace(old, new, 1) for old, new in self.companions)]


KERNELS = {
    # Debian 12's own (bookworm-security): VDUSE API version 0.
    "6.12": KernelSpec("6.12", re.compile(r"^linux-image-6\.12\.(\d+)\+deb(\d+)-cloud-amd64-unsigned$")),
    # trixie-backports': VDUSE API version 1 (virtqueue groups, address spaces) and the
    # control features QUEUE_READY and SUSPEND.
    "7.3": KernelSpec(
        "7.3",
        re.compile(r"^linux-modules-7\.3\.(\d+)\+deb(\d+)-cloud-amd64$"),
        companions=(("linux-modules-", "linux-binary-"),),
        suite="trixie-backports",
    ),
}
#: The kernel the tests and ``pyvduse testvm`` boot unless told otherwise (--kernel, or
#: $PYVDUSE_TESTVM_KERNEL, which ``pytest --kernel`` sets for the tests that boot one).
DEFAULT_KERNEL = "6.12"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
# What the tests need; their dependencies (vdpa, vhost_iotlb, vhost, irqbypass, failover,
# net_failover) are found from each module's modinfo and loaded first.
GUEST_MODULES = (
    "vduse",
    "virtio_vdpa",
    "vhost_vdpa",
    "virtio_blk",
    "virtio_net",
    "tun",
    # slow and hanging block devices for the tests and benchmarks: null_blk
    # (devices made through configfs: with a completion latency, an SSD),
    # device-mapper (dmsetup suspend makes I/O hang), dm-delay, nbd
    "null_blk",
    "dm_mod",
    "dm_delay",
    "nbd",
    # the network tests and benchmark: a veth pair is bench/net.py's peer
    "veth",
    # the kernel's own Ceph RBD client (rbd map): bench/rbd.py's limit
    "rbd",
)
#: Parameters a module is loaded with (null_blk: no device at load, tests make theirs).
MODULE_PARAMS = {"null_blk": "nr_devices=0"}

RUN_BASE = Path("/run/pyvduse-testvm")
#: A second virtiofs share, with cache=none (FUSE direct-I/O mode: every read and write of
#: its files pins the caller's buffer), for tests of files on such filesystems: an empty
#: directory of the run's own on the host, at this path in the guest (also in the command's
#: environment as PYVDUSE_VM_NOCACHE_DIR), under the guest's private /tmp.
NOCACHE_TAG = "nocache"
NOCACHE_MOUNT = "/tmp/pyvduse-nocache"
# Ignored by the kernel (a dotted name is a module parameter), read by the init.
CMDLINE_KEY = "pyvduse.rundir"
READY_MARKER = "pyvduse-testvm: guest ready"
DONE_MARKER = "pyvduse-testvm: guest done"
KMSG_START = "pyvduse-testvm: command start"

EXIT_TIMEOUT = 124  # like timeout(1)
EXIT_NO_STATUS = 99  # the guest never reported a status (boot failure, crash, panic)
# Under TCG the guest kernel now and then panics while patching itself at boot
# (text_poke_early in apparmor_init, RIP 0), before any command ran; such a boot is retried.
BOOT_ATTEMPTS = 3
BOOT_PANIC = "Kernel panic"
# A boot that has not reached the command after this long (s) hung, and is retried too: a
# boot takes about 10 s here, a minute on a loaded machine.
BOOT_TIMEOUT = float(os.environ.get("PYVDUSE_VM_BOOT_TIMEOUT", "300"))
#: At most this many test VMs run at once on this machine (each keeps its vCPUs busy under
#: emulation; more than the cores can carry makes every guest's timeouts fire). A run that
#: finds every slot taken waits for one.
VM_SLOTS = max(int(os.environ.get("PYVDUSE_VM_SLOTS", "2")), 1)

INIT_SCRIPT = r"""#!/bin/busybox sh
# pyvduse test VM init: load the VDUSE modules, mount the host's / over virtiofs, run the
# command from the run directory named on the kernel command line, save its status and
# the kernel log there, power off.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs shm /dev/shm
fail() {
  echo "pyvduse-testvm: $*"
  dmesg | tail -n 40
  poweroff -f
}
bad=
for m in $(cat /mods/order); do
  params=$(grep "^$m " /mods/params | cut -d' ' -f2-)
  insmod "/mods/$m.ko" $params 2>/dev/null || bad="$bad $m"
done
mount -t configfs configfs /sys/kernel/config 2>/dev/null
rundir=
for arg in $(cat /proc/cmdline); do
  case "$arg" in pyvduse.rundir=*) rundir="${arg#pyvduse.rundir=}" ;; esac
done
[ -n "$rundir" ] || fail "no pyvduse.rundir= on the kernel command line"
token="${rundir##*/}"
mount -t virtiofs hostroot /host || fail "virtiofs mount failed"
for d in proc sys dev; do mount -o rbind "/$d" "/host/$d"; done
mount -t tmpfs tmp /host/tmp
mkdir -p /host/tmp/pyvduse-nocache
mount -t virtiofs nocache /host/tmp/pyvduse-nocache ||
  echo "pyvduse-testvm: the cache=none share (tag nocache) did not mount"
# /run is tmpfs on a real host; pyvduse keeps memory-mapped state there, which virtiofs
# (without DAX) cannot share-map.
mkdir -p /host/run/pyvduse && mount -t tmpfs run-pyvduse /host/run/pyvduse
ip link set lo up
run="/host$rundir"
[ -f "$run/command.sh" ] || fail "no $rundir/command.sh on the host"
echo
echo "pyvduse-testvm: guest ready $token"
[ -z "$bad" ] || echo "pyvduse-testvm: could not load:$bad"
echo "<6>pyvduse-testvm: command start" > /dev/kmsg
env -i chroot /host /bin/bash "$rundir/command.sh" </dev/null
status=$?
echo "<6>pyvduse-testvm: command exited with status $status" > /dev/kmsg
dmesg > "$run/kernel.log"
echo "$status" > "$run/status"
sync
echo
echo "pyvduse-testvm: guest done $token"
poweroff -f
"""


class TestVMError(RuntimeError):
    """The test VM cannot be set up (missing tools, no kernel package, not root...)."""

    __test__ = False  # not a pytest test class despite the name


@dataclasses.dataclass(frozen=True)
class HostTools:
    """Host binaries the VM needs, found by ensure_tools()."""

    qemu: str
    virtiofsd: str
    busybox: str


@dataclasses.dataclass(frozen=True)
class GuestImage:
    """A bootable kernel + initramfs pair in the cache."""

    vmlinuz: Path
    initrd: Path
    kernel_release: str
    package: str


@dataclasses.dataclass
class RunResult:
    """What one VM run gave: the command's status, its console output and the kernel log."""

    exit_code: int
    output: str
    kernel_log: str
    timed_out: bool
    duration: float
    boot_panic: str = ""  # the boot console when the kernel panicked before the command began
    boot_hung: bool = False  # the guest never reached the command within BOOT_TIMEOUT
    boots: int = 1  # how many boots it took (a boot that panicked or hung is retried)

    @property
    def command_kernel_log(self) -> str:
        """Kernel messages logged while the command ran (after the boot noise)."""
        lines = self.kernel_log.splitlines(keepends=True)
        for i, line in enumerate(lines):
            if KMSG_START in line:
                return "".join(lines[i + 1 :])
        return self.kernel_log


def _note(message: str) -> None:
    """Progress for slow one-off steps (apt, download, build) so a first run is not silent."""
    print(f"pyvduse testvm: {message}", file=sys.stderr, flush=True)


def _is_root() -> bool:
    return os.geteuid() == 0


# --------------------------------------------------------------------------- host tools


def _which(name: str) -> str | None:
    """shutil.which that also looks in the sbin directories (depmod, vdpa live there)."""
    path = os.environ.get("PATH", "") + ":" + ":".join(SBIN_DIRS)
    return shutil.which(name, path=path)


def find_virtiofsd() -> str | None:
    """Debian 12 ships virtiofsd in qemu-system-common; newer ones have the Rust package."""
    for candidate in VIRTIOFSD_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    return _which("virtiofsd")


def is_static_elf(path: str) -> bool:
    """True for an ELF executable without a program interpreter (runs in a bare initramfs)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
                return False  # only 64-bit little-endian is expected here
            phoff = int.from_bytes(head[0x20:0x28], "little")
            phentsize = int.from_bytes(head[0x36:0x38], "little")
            phnum = int.from_bytes(head[0x38:0x3A], "little")
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError:
        return False
    types = (int.from_bytes(table[i * phentsize : i * phentsize + 4], "little") for i in range(phnum))
    return 3 not in types  # PT_INTERP: needs a dynamic loader


def _find_busybox() -> str | None:
    for candidate in (_which("busybox"), "/bin/busybox", "/usr/bin/busybox"):
        if candidate and is_static_elf(candidate):
            return candidate
    return None


def _missing_tools() -> list[str]:
    """Names of what the VM needs but the host lacks."""
    missing = [name for name in REQUIRED_COMMANDS if _which(name) is None]
    if find_virtiofsd() is None:
        missing.append("virtiofsd")
    if _find_busybox() is None:
        missing.append("busybox (static)")
    return missing


def _apt(*args: str) -> None:
    """apt-get, non-interactive, waiting for a concurrent dpkg instead of failing."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "-o", "DPkg::Lock::Timeout=300", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise TestVMError(f"{shlex.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def ensure_tools() -> HostTools:
    """Install what the VM needs with apt when root; otherwise say exactly what is missing."""
    missing = _missing_tools()
    if missing:
        if not _is_root():
            raise TestVMError(
                f"the test VM needs {', '.join(missing)}; as root run: "
                f"apt-get update && apt-get install -y {' '.join(APT_PACKAGES)}"
            )
        _note(f"installing {' '.join(APT_PACKAGES)} (missing: {', '.join(missing)})")
        _apt("update", "-qq")
        _apt("install", "-y", "-qq", *APT_PACKAGES)
        if find_virtiofsd() is None:  # Debian 13+: virtiofsd is its own (Rust) package
            _apt("install", "-y", "-qq", "virtiofsd")
        missing = _missing_tools()
        if missing:
            raise TestVMError(f"still missing after apt-get install: {', '.join(missing)}")
    qemu, virtiofsd, busybox = _which("qemu-system-x86_64"), find_virtiofsd(), _find_busybox()
    assert qemu and virtiofsd and busybox
    return HostTools(qemu=qemu, virtiofsd=virtiofsd, busybox=busybox)


def ensure_test_tools() -> None:
    """Install (as root, with apt) the commands the tests run in the guest: a fresh machine
    has Python and nothing else."""
    missing = sorted({pkg for cmd, pkg in TEST_PACKAGES.items() if _which(cmd) is None})
    if not missing:
        return
    if not _is_root():
        raise TestVMError(
            f"the tests need {', '.join(missing)}; as root run: "
            f"apt-get update && apt-get install -y {' '.join(missing)}"
        )
    _note(f"installing what the tests run: {' '.join(missing)}")
    _apt("update", "-qq")
    _apt("install", "-y", "-qq", "--no-install-recommends", *missing)


def native_built() -> bool:
    """Whether the native data path's full build (io_uring and NBD) is installed."""
    importlib.invalidate_caches()
    return importlib.util.find_spec(NATIVE_FULL_MODULE) is not None


def source_checkout() -> Path | None:
    """The checkout this pyvduse runs from (``pip install -e``, or a clone on the path), or
    None: an installed copy, built when it was installed."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").exists() and (root / "pyvduse" / "fastpath").is_dir() else None


def ensure_native_build(checkout: Path) -> None:
    """Build the native data path when ``pip install`` could not (a fresh machine has no C
    compiler, no liburing): as root, install what it takes with apt and reinstall the
    checkout in place, so the tests and the quickstart (``pyvduse testvm``) run the engine
    users run. Without root, say how; the native path's tests then fail, saying it is not
    built."""
    if native_built() or os.environ.get("PYVDUSE_NO_NATIVE") == "1":
        return
    how = f"apt-get install -y {' '.join(BUILD_PACKAGES)} && pip install -e {checkout}"
    if not _is_root():
        _note(f"the native data path is not built, and its tests will fail; as root run: {how}")
        return
    _note(f"building the native data path: installing {' '.join(BUILD_PACKAGES)}")
    _apt("update", "-qq")
    _apt("install", "-y", "-qq", "--no-install-recommends", *BUILD_PACKAGES)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "-e", str(checkout)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not native_built():
        raise TestVMError(f"{shlex.join(cmd)} did not build the native data path:\n{proc.stderr[-3000:]}")


# --------------------------------------------------------------------------- guest image


def default_cache() -> Path:
    """$PYVDUSE_TESTVM_CACHE, else ~/.cache/pyvduse/testvm (one directory per kernel in it)."""
    env = os.environ.get("PYVDUSE_TESTVM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "pyvduse" / "testvm"


def default_kernel() -> str:
    """$PYVDUSE_TESTVM_KERNEL, else DEFAULT_KERNEL."""
    return os.environ.get("PYVDUSE_TESTVM_KERNEL") or DEFAULT_KERNEL


def kernel_spec(version: str) -> KernelSpec:
    """The KernelSpec of ``version``; ValueError naming the choices otherwise."""
    try:
        return KERNELS[version]
    except KeyError:
        raise ValueError(f"no test kernel {version!r}: choose one of {', '.join(KERNELS)}") from None


def recipe_key() -> str:
    """Names the cached image; changes whenever the init or the module set changes."""
    h = hashlib.sha256()
    h.update(f"{RECIPE}\n{' '.join(GUEST_MODULES)}\n{MODULE_PARAMS}\n{INIT_SCRIPT}".encode())
    return h.hexdigest()[:12]


def pick_kernel_package(names: Iterable[str], kernel: KernelSpec = KERNELS[DEFAULT_KERNEL]) -> str | None:
    """The newest package among names that names a kernel of ``kernel``'s series."""
    best: tuple[int, int] | None = None
    best_name = None
    for name in names:
        m = kernel.package_re.match(name.strip())
        if m:
            key = (int(m.group(1)), int(m.group(2)))
            if best is None or key > best:
                best, best_name = key, name.strip()
    return best_name


def apt_options(kernel: KernelSpec, cache: Path) -> list[str]:
    """apt's options for ``kernel``: none for the machine's sources; for a suite of its own,
    a private configuration under ``cache/apt`` (sources list, package lists, downloads), so
    the machine's apt sources and lists stay exactly as they are."""
    if kernel.suite is None:
        return []
    d = cache / "apt"
    for sub in ("lists/partial", "cache/archives/partial"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    sources = d / "sources.list"
    line = f"deb [signed-by={DEBIAN_KEYRING}] {DEBIAN_MIRROR} {kernel.suite} main\n"
    if not sources.exists() or sources.read_text() != line:
        sources.write_text(line)
    return [
        "-o", f"Dir::Etc::SourceList={sources}",
        "-o", "Dir::Etc::SourceParts=/dev/null",
        "-o", f"Dir::State::Lists={d / 'lists'}",
        "-o", f"Dir::Cache={d / 'cache'}",
    ]  # fmt: skip


def _search_kernel_package(kernel: KernelSpec, apt_opts: Sequence[str] = ()) -> str | None:
    """Ask apt (no download) which kernels of ``kernel``'s series it knows."""
    proc = subprocess.run(
        ["apt-cache", *apt_opts, "search", "--names-only", kernel.apt_pattern],
        capture_output=True,
        text=True,
        check=False,
    )
    return pick_kernel_package((line.split(" ", 1)[0] for line in proc.stdout.splitlines()), kernel)


def _download_deb(package: str, debs: Path, apt_opts: Sequence[str] = ()) -> Path:
    """apt-get download into debs/ (kept, so a recipe change does not download again)."""
    debs.mkdir(parents=True, exist_ok=True)
    existing = sorted(debs.glob(f"{package}_*.deb"))
    if existing:
        return existing[-1]
    _note(f"downloading {package}")
    with tempfile.TemporaryDirectory(dir=debs, prefix=".dl-") as tmp:

        def download() -> subprocess.CompletedProcess[str]:
            argv = ["apt-get", *apt_opts, "download", package]
            return subprocess.run(argv, cwd=tmp, capture_output=True, text=True, check=False)

        proc = download()
        if proc.returncode != 0 and _is_root():
            _apt(*apt_opts, "update", "-qq")  # stale package lists may name a file the mirror dropped
            proc = download()
        if proc.returncode != 0:
            raise TestVMError(f"apt-get download {package} failed: {proc.stderr[-3000:]}")
        (downloaded,) = Path(tmp).glob("*.deb")
        target = debs / downloaded.name
        downloaded.rename(target)
    return target


def _keep_only(debs: Path, wanted: Iterable[Path]) -> None:
    """Remove the packages of earlier kernels from debs/."""
    keep = set(wanted)
    for old in debs.glob("*.deb"):
        if old not in keep:
            old.unlink()


_MODULE_RE = re.compile(r"^(?:usr/)?lib/modules/([^/]+)/kernel/.*/([^/]+)\.ko(\.xz|\.gz)?$")
_BUILTIN_RE = re.compile(r"^(?:usr/)?lib/modules/[^/]+/modules\.builtin$")


class _Modules(Mapping[str, bytes]):
    """Module name -> .ko bytes, decompressed on first use (a kernel ships ~1000)."""

    def __init__(self, compressed: dict[str, tuple[str, bytes]]) -> None:
        self._compressed = compressed
        self._plain: dict[str, bytes] = {}

    def __getitem__(self, name: str) -> bytes:
        if name not in self._plain:
            suffix, data = self._compressed[name]
            if suffix == ".xz":
                data = lzma.decompress(data)
            elif suffix == ".gz":
                data = gzip.decompress(data)
            self._plain[name] = data
        return self._plain[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._compressed)

    def __len__(self) -> int:
        return len(self._compressed)


@dataclasses.dataclass
class _KernelPackage:
    release: str
    vmlinuz: bytes
    modules: _Modules
    builtin: set[str]


def _module_name(stem: str) -> str:
    return stem.replace("-", "_")


_VMLINUZ_RE = re.compile(r"^(?:boot/vmlinuz-([^/]+)|(?:usr/)?lib/modules/([^/]+)/vmlinuz)$")


def _read_kernel_debs(debs: Sequence[Path]) -> _KernelPackage:
    """Stream the .debs' data tarballs and keep only the kernel image and the modules (the
    image is boot/vmlinuz-RELEASE, or usr/lib/modules/RELEASE/vmlinuz in a split kernel)."""
    vmlinuz: dict[str, bytes] = {}
    compressed: dict[str, tuple[str, bytes]] = {}
    builtin: set[str] = set()
    release = None
    for deb in debs:
        proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
        assert proc.stdout is not None
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name.removeprefix("./")
                m = _MODULE_RE.match(name)
                image = _VMLINUZ_RE.match(name)
                if m is None and image is None and not _BUILTIN_RE.match(name):
                    continue
                f = tar.extractfile(member)
                assert f is not None
                data = f.read()
                if image is not None:
                    vmlinuz[image.group(1) or image.group(2)] = data
                elif m is not None:
                    release = m.group(1)
                    compressed[_module_name(m.group(2))] = (m.group(3) or "", data)
                else:
                    builtin |= {
                        _module_name(Path(line).name.split(".ko")[0])
                        for line in data.decode().splitlines()
                        if line
                    }
        if proc.wait() != 0:
            raise TestVMError(f"dpkg-deb --fsys-tarfile {deb} failed")
    if release is None or release not in vmlinuz:
        raise TestVMError(f"{', '.join(map(str, debs))}: no kernel image matching the modules")
    return _KernelPackage(
        release=release, vmlinuz=vmlinuz[release], modules=_Modules(compressed), builtin=builtin
    )


def module_depends(ko: bytes) -> list[str]:
    """The depends= field of a .ko's .modinfo section."""
    m = re.search(rb"(?:^|\x00)depends=([^\x00]*)\x00", ko)
    if m is None or not m.group(1):
        return []
    return [_module_name(d) for d in m.group(1).decode().split(",") if d]


def module_load_order(
    wanted: Sequence[str], modules: Mapping[str, bytes], builtin: Iterable[str] = ()
) -> list[str]:
    """wanted plus their dependencies, each after what it depends on (insmod order)."""
    skip = set(builtin)
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order or name in skip:
            return
        if name in visiting:
            raise TestVMError(f"module dependency cycle through {name}")
        if name not in modules:
            raise TestVMError(f"kernel package has no module {name}")
        visiting.add(name)
        for dep in module_depends(modules[name]):
            visit(dep)
        visiting.discard(name)
        order.append(name)

    for name in wanted:
        visit(_module_name(name))
    return order


@dataclasses.dataclass(frozen=True)
class CpioEntry:
    """One member of a newc cpio archive (a directory, regular file or device node)."""

    name: str
    mode: int  # including the file type bits (stat.S_IFDIR etc.)
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def cpio_newc(entries: Iterable[CpioEntry]) -> bytes:
    """The "newc" format the kernel unpacks as initramfs; written here to need no cpio tool
    and no root (device nodes are just headers)."""
    out = io.BytesIO()

    def put(ino: int, entry: CpioEntry) -> None:
        name = entry.name.encode() + b"\x00"
        nlink = 2 if entry.mode & 0o170000 == 0o040000 else 1
        fields = (ino, entry.mode, 0, 0, nlink, 0, len(entry.data), 0, 0, *entry.rdev, len(name), 0)
        out.write(b"070701" + b"".join(b"%08X" % v for v in fields) + name)
        out.write(b"\x00" * (-out.tell() % 4))
        out.write(entry.data)
        out.write(b"\x00" * (-out.tell() % 4))

    ino = 0
    for ino, entry in enumerate(entries, start=1):
        put(ino, entry)
    put(ino + 1, CpioEntry("TRAILER!!!", 0))
    return out.getvalue()


def initramfs_entries(busybox: bytes, modules: Sequence[tuple[str, bytes]]) -> list[CpioEntry]:
    """The guest's whole initramfs: busybox, the init script and the modules in load order."""
    d, f, x, c = 0o040755, 0o100644, 0o100755, 0o020600
    entries = [CpioEntry(name, d) for name in ("bin", "dev", "proc", "sys", "host", "mods")]
    entries.append(CpioEntry("dev/console", c, rdev=(5, 1)))
    entries.append(CpioEntry("bin/busybox", x, busybox))
    entries.append(CpioEntry("init", x, INIT_SCRIPT.encode()))
    entries.extend(CpioEntry(f"mods/{name}.ko", f, data) for name, data in modules)
    order = "".join(f"{name}\n" for name, _ in modules)
    entries.append(CpioEntry("mods/order", f, order.encode()))
    params = "".join(f"{name} {MODULE_PARAMS[name]}\n" for name, _ in modules if name in MODULE_PARAMS)
    entries.append(CpioEntry("mods/params", f, params.encode()))
    return entries


def build_initrd(busybox: bytes, modules: Sequence[tuple[str, bytes]]) -> bytes:
    """gzip'd newc archive (gzip: every kernel can unpack it; level 6 is plenty fast)."""
    return gzip.compress(cpio_newc(initramfs_entries(busybox, modules)), 6, mtime=0)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive flock so concurrent callers build the image once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextmanager
def _vm_slot(slots: int = VM_SLOTS, poll: float = 2.0) -> Iterator[None]:
    """Hold one of ``slots`` machine-wide VM slots (flocks under RUN_BASE) for the block."""
    RUN_BASE.mkdir(parents=True, exist_ok=True)
    waiting = False
    while True:
        for i in range(slots):
            f = open(RUN_BASE / f"slot-{i}.lock", "a")  # noqa: SIM115  # held past the loop
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                continue
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
                f.close()
            return
        if not waiting:
            _note(
                f"{slots} test VM(s) already run on this machine (PYVDUSE_VM_SLOTS); waiting for one to end"
            )
            waiting = True
        time.sleep(poll)


def _load_image(directory: Path) -> GuestImage | None:
    """A finished build (guest.json is written last, then the dir is renamed in)."""
    try:
        info = json.loads((directory / "guest.json").read_text())
    except (OSError, ValueError):
        return None
    return GuestImage(
        vmlinuz=directory / "vmlinuz",
        initrd=directory / "initrd.gz",
        kernel_release=str(info["kernel_release"]),
        package=str(info["package"]),
    )


def kernel_cache(cache: Path, kernel: str) -> Path:
    """The cache directory of one kernel: its packages, apt files and guest images."""
    return cache / f"linux-{kernel}"


def ensure_guest(cache: Path | None = None, kernel: str | None = None) -> GuestImage:
    """The cached kernel + initramfs of ``kernel`` (default_kernel()) for the current
    recipe, downloading/building if needed; each kernel has its own cache directory."""
    spec = kernel_spec(default_kernel() if kernel is None else kernel)
    cache = kernel_cache(default_cache() if cache is None else cache, spec.version)
    final = cache / f"guest-{recipe_key()}"
    image = _load_image(final)
    if image is not None:
        return image
    with _locked(cache / ".lock"):
        image = _load_image(final)  # another process may have built it while we waited
        if image is not None:
            return image
        for stale in cache.glob(".build-*"):  # left by a killed build (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        busybox = _find_busybox()
        if busybox is None:
            raise TestVMError("no static busybox: apt-get install busybox-static")
        opts = apt_options(spec, cache)
        package = _search_kernel_package(spec, opts)
        if package is None and _is_root():
            _apt(*opts, "update", "-qq")
            package = _search_kernel_package(spec, opts)
        if package is None:
            where = f"Debian's {spec.suite}" if spec.suite else "apt (run apt-get update as root?)"
            raise TestVMError(f"{where} has no package matching {spec.apt_pattern}: no Linux {spec.version}")
        debs = [_download_deb(name, cache / "debs", opts) for name in spec.packages(package)]
        _keep_only(cache / "debs", debs)
        _note(f"building the guest initramfs from {', '.join(deb.name for deb in debs)}")
        kernel_package = _read_kernel_debs(debs)
        mods = kernel_package.modules
        order = module_load_order(GUEST_MODULES, mods, kernel_package.builtin)
        initrd = build_initrd(Path(busybox).read_bytes(), [(name, mods[name]) for name in order])
        build = Path(tempfile.mkdtemp(dir=cache, prefix=".build-"))
        (build / "vmlinuz").write_bytes(kernel_package.vmlinuz)
        (build / "initrd.gz").write_bytes(initrd)
        info = {
            "kernel": spec.version,
            "kernel_release": kernel_package.release,
            "package": package,
            "modules": order,
            "recipe": RECIPE,
        }
        (build / "guest.json").write_text(json.dumps(info, indent=1) + "\n")
        build.chmod(0o755)
        shutil.rmtree(final, ignore_errors=True)  # a damaged earlier build (no guest.json)
        build.rename(final)
    image = _load_image(final)
    assert image is not None
    return image


# --------------------------------------------------------------------------- running


def guest_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The command's whole environment: nothing leaks in from the host or the init.

    PATH starts with the directory of the running interpreter because the guest's
    /bin/python3 (the system one) lacks our packages; the host's venv/pyenv python is
    reachable at the same path through virtiofs.
    """
    path = STANDARD_PATH
    exe_dir = os.path.dirname(sys.executable) if sys.executable else ""
    if exe_dir:
        path = f"{exe_dir}:{path}"
    env = {
        "PATH": path,
        "HOME": "/root",
        "PYVDUSE_IN_VM": "1",
        "PYVDUSE_VM_NOCACHE_DIR": NOCACHE_MOUNT,
        "LANG": "C.UTF-8",
        "TERM": "dumb",
    }
    env.update(extra or {})
    return env


_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def command_script(command: str, *, cwd: str, env: Mapping[str, str]) -> str:
    """The bash script the guest runs (in the chroot, from an empty environment)."""
    lines = ["# generated by pyvduse.testvm: runs under bash in the test VM's chroot"]
    for name, value in env.items():
        if not _ENV_NAME_RE.match(name):
            raise ValueError(f"not an environment variable name: {name!r}")
        lines.append(f"export {name}={shlex.quote(value)}")
    lines.append(f"cd -- {shlex.quote(cwd)} || exit")
    lines.append(command)
    return "\n".join(lines) + "\n"


def qemu_argv(
    qemu: str,
    image: GuestImage,
    socket: Path,
    rundir: Path,
    *,
    mem: str,
    smp: int,
    nocache_socket: Path | None = None,
) -> list[str]:
    """The QEMU command line: serial console on stdout, no default devices, no NIC; the
    host's / over virtiofs from ``socket``, the cache=none share from ``nocache_socket``."""
    # TCG by default: it works everywhere, and a /dev/kvm that exists is no promise that
    # KVM works (on nested/PVM hosts guests hang at boot). Opt in with ...ACCEL=kvm.
    accel = os.environ.get("PYVDUSE_TESTVM_ACCEL", "tcg")
    append = f"console=ttyS0 quiet panic=-1 {CMDLINE_KEY}={rundir}"
    return [
        qemu,
        "-machine", "q35", "-accel", accel, "-cpu", "max", "-m", mem, "-smp", str(smp),
        "-nodefaults", "-display", "none", "-no-reboot", "-serial", "stdio",
        "-kernel", str(image.vmlinuz), "-initrd", str(image.initrd), "-append", append,
        "-object", f"memory-backend-memfd,id=mem,size={mem},share=on",
        "-numa", "node,memdev=mem",
        "-chardev", f"socket,id=vfs,path={socket}",
        "-device", "vhost-user-fs-pci,chardev=vfs,tag=hostroot",
    ] + ([
        "-chardev", f"socket,id=vfs2,path={nocache_socket}",
        "-device", f"vhost-user-fs-pci,chardev=vfs2,tag={NOCACHE_TAG}",
    ] if nocache_socket is not None else [])  # fmt: skip


def virtiofsd_argv(virtiofsd: str, socket: Path, source: str = "/", cache: str = "always") -> list[str]:
    """Share ``source`` (/) in a chroot sandbox, cached in the guest for as long as the VM
    lives (``cache="none"``: never, and every file is opened in FUSE's direct-I/O mode).

    Under emulation every uncached stat or read is a round trip to virtiofsd: with
    ``cache=none`` Python spent 4 s just starting (hundreds of import-path stats) and a
    daemon restart took 11-18 s; cached, 1 s and 3 s. The price: a file the *host* changes
    while the VM runs may look unchanged to the guest. A VM runs one command on a checkout
    that nobody edits meanwhile (the guest's own writes go through to the host at once), so
    that does not arise; restart the VM to see host edits.
    """
    try:
        usage = subprocess.run([virtiofsd, "--help"], capture_output=True, text=True, timeout=10, check=False)
        rust = "--shared-dir" in usage.stdout + usage.stderr
    except (OSError, subprocess.TimeoutExpired):
        rust = False
    if rust:
        return [
            virtiofsd,
            f"--socket-path={socket}",
            f"--shared-dir={source}",
            f"--cache={'never' if cache == 'none' else cache}",
            "--sandbox=chroot",
        ]
    return [
        virtiofsd,
        f"--socket-path={socket}",
        "-o",
        f"source={source}",
        "-o",
        f"cache={cache}",
        "-o",
        "sandbox=chroot",
    ]


_libc: ctypes.CDLL | None = None


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL the child if we die, so a killed test leaves no qemu behind."""
    if _libc is not None:
        _libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _spawn(argv: Sequence[str], stdout: int | IO[bytes]) -> subprocess.Popen[bytes]:
    """Start a helper that cannot outlive us and that we can kill as a process group."""
    global _libc
    if _libc is None:
        with suppress(OSError):
            _libc = ctypes.CDLL(None, use_errno=True)
    return subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # our own process group: Ctrl-C reaches us, we clean up
        preexec_fn=_die_with_parent,
    )


def _stop(proc: subprocess.Popen[bytes], grace: float = 2.0) -> None:
    """SIGTERM then SIGKILL the child's whole process group, and reap it."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 30.0)):
        if proc.poll() is not None:
            break
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
    # The group may outlive its leader (a forked helper); it must not outlive the run.
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


@contextmanager
def _virtiofsd(
    virtiofsd: str, socket: Path, log: Path, source: str = "/", cache: str = "always"
) -> Iterator[None]:
    """A virtiofsd serving ``source`` on socket for the lifetime of the block."""
    with open(log, "wb") as logf:
        proc = _spawn(virtiofsd_argv(virtiofsd, socket, source, cache), logf)
    try:
        deadline = time.monotonic() + 10
        while not socket.exists():
            if proc.poll() is not None:
                raise TestVMError(
                    f"virtiofsd exited with {proc.returncode}: {log.read_text(errors='replace')}"
                )
            if time.monotonic() > deadline:
                raise TestVMError("virtiofsd did not create its socket within 10 s")
            time.sleep(0.02)
        yield
    finally:
        _stop(proc)
        socket.unlink(missing_ok=True)


class ConsoleFilter:
    """Splits the raw serial console into boot noise, the command's output and the tail.

    Text before "<READY_MARKER> <token>" is boot noise (held back, shown only if the guest
    never got ready); text up to "<DONE_MARKER> <token>" is the command's output, passed to
    `sink` as it arrives; the rest (power-off messages) is dropped. The serial line's CRLF
    is turned back into LF. Markers carry the run's token so a command printing the bare
    marker text cannot end its own output early.
    """

    def __init__(self, token: str, sink: TextIO | None = None) -> None:
        self.sink = sink
        self.boot = ""
        self.output = ""
        self.ready = False
        self.started = False  # the guest printed its ready marker: the command began
        self.done = False
        self._ready_line = f"{READY_MARKER} {token}\n"
        self._done_line = f"\n{DONE_MARKER} {token}"
        self._pending = ""  # run-state text that might be the start of the done marker
        self._cr = False  # a chunk ended in "\r" that may pair with the next "\n"

    def _emit(self, text: str) -> None:
        if text:
            self.output += text
            if self.sink is not None:
                self.sink.write(text)
                self.sink.flush()

    def feed(self, text: str) -> None:
        """Add console text (any chunking)."""
        if self._cr:
            text = "\r" + text
        self._cr = text.endswith("\r")
        if self._cr:
            text = text[:-1]
        self._process(text.replace("\r\n", "\n"))

    def _process(self, text: str) -> None:
        if self.done:
            return
        if not self.ready:
            self.boot += text
            i = self.boot.find(self._ready_line)
            if i < 0:
                return
            self.ready = self.started = True
            text = self.boot[i + len(self._ready_line) :]
            self.boot = self.boot[:i]
        self._pending += text
        i = self._pending.find(self._done_line)
        if i >= 0:
            self.done = True
            self._emit(self._pending[:i])
            self._pending = ""
            return
        keep = 0  # longest suffix of pending that is a prefix of the done marker
        for n in range(min(len(self._pending), len(self._done_line) - 1), 0, -1):
            if self._done_line.startswith(self._pending[-n:]):
                keep = n
                break
        self._emit(self._pending[: len(self._pending) - keep])
        self._pending = self._pending[len(self._pending) - keep :]

    @property
    def panicked_at_boot(self) -> bool:
        """The kernel panicked before the command began, so running it again is safe."""
        return not self.started and BOOT_PANIC in self.boot

    def close(self, *, show_boot: bool = True) -> None:
        """End of console: flush what was held back; an unready guest shows its boot text
        (unless `show_boot` is false: a boot about to be retried is not worth showing)."""
        if self._cr:
            self._cr = False
            self._process("\r")  # a lone CR is kept as is
        if not self.ready:
            if not show_boot:
                return
            self.ready = True
            self._pending = ""
            self._emit(self.boot)
            self.boot = ""
        elif not self.done:
            self._emit(self._pending)
            self._pending = ""


def _drive(
    argv: Sequence[str], timeout: float, console: ConsoleFilter, boot_timeout: float = BOOT_TIMEOUT
) -> tuple[int | None, bool, bool]:
    """Run the VM, feeding its console to `console` until it exits or the timeout passes,
    or until `boot_timeout` passes before the command began.

    Returns (qemu's exit status or None if killed, timed out?, boot hung?).
    """
    proc = _spawn(argv, subprocess.PIPE)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    deadline = time.monotonic() + timeout
    boot_deadline = time.monotonic() + boot_timeout
    timed_out = boot_hung = eof = False
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while True:
                now = time.monotonic()
                remaining = deadline - now
                if remaining <= 0:
                    timed_out = True
                    break
                if not console.started:
                    if boot_deadline <= now:
                        boot_hung = True
                        break
                    remaining = min(remaining, boot_deadline - now)
                if not sel.select(remaining):
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    eof = True
                    break
                console.feed(decoder.decode(chunk))
    finally:
        if eof:  # qemu closed its console: it is exiting, give it a moment to do so
            with suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        # Timed out, interrupted (Ctrl-C, SIGTERM) or hung on exit: nothing worth keeping.
        _stop(proc, grace=0.0)
        proc.stdout.close()
        console.feed(decoder.decode(b"", final=True))
    return (None if timed_out or boot_hung else proc.returncode), timed_out, boot_hung


def _run_prepared(
    argv: Sequence[str],
    rundir: Path,
    *,
    timeout: float,
    console: TextIO | None,
    will_retry: bool = False,
    boot_timeout: float = BOOT_TIMEOUT,
) -> RunResult:
    """Boot with a prepared run directory and collect the result from it.

    With `will_retry`, a boot that panicked or hung before the command began is not shown on
    the console (the caller boots again); a panic's text is in the result's `boot_panic`.
    """
    start = time.monotonic()
    screen = ConsoleFilter(rundir.name, console)
    boot_hung = False
    try:
        _, timed_out, boot_hung = _drive(argv, timeout, screen, boot_timeout)
    finally:
        screen.close(show_boot=not (will_retry and (screen.panicked_at_boot or boot_hung)))
    duration = time.monotonic() - start
    try:
        kernel_log = (rundir / "kernel.log").read_text(errors="replace")
    except OSError:
        kernel_log = ""
    exit_code = EXIT_NO_STATUS
    if timed_out:
        exit_code = EXIT_TIMEOUT
    else:
        with suppress(OSError, ValueError):
            exit_code = int((rundir / "status").read_text().strip())
    return RunResult(
        exit_code=exit_code,
        output=screen.output,
        kernel_log=kernel_log,
        timed_out=timed_out,
        duration=duration,
        boot_panic=screen.boot if screen.panicked_at_boot else "",
        boot_hung=boot_hung,
    )


def _prune_stale_rundirs() -> None:
    """Remove run directories whose owner process is gone (a harness killed by SIGKILL)."""
    try:
        entries = list(RUN_BASE.iterdir())
    except OSError:
        return
    for d in entries:
        try:
            pid = int((d / "owner").read_text())
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (OSError, ValueError):
            pass


def _check_cwd(cwd: str) -> str:
    """The guest sees the host's tree, except /tmp (a private tmpfs), so refuse that early."""
    if not os.path.isabs(cwd):
        cwd = os.path.abspath(cwd)
    norm = os.path.normpath(cwd)
    if norm == "/tmp" or norm.startswith("/tmp/"):
        raise ValueError(f"cwd {cwd} is under /tmp, which the guest replaces with its own tmpfs")
    return norm


def run(
    command: str,
    *,
    cwd: str | None = None,
    mem: str = "2G",
    smp: int = 2,
    timeout: float = 900,
    env: dict[str, str] | None = None,
    console: TextIO | None = None,
    kernel: str | None = None,
) -> RunResult:
    """Run `command` (bash) as root in a fresh test VM, cwd defaulting to the current one,
    booting ``kernel`` (one of KERNELS; default_kernel() if None). The command's
    environment has PYVDUSE_VM_KERNEL set to it.

    The console output from 'guest ready' on is streamed to `console` (if given) and
    returned in `output`; exit_code is the command's status, EXIT_TIMEOUT (timed_out set)
    when `timeout` seconds passed first, or EXIT_NO_STATUS when the guest never reported.
    """
    workdir = _check_cwd(os.getcwd() if cwd is None else cwd)
    version = kernel_spec(default_kernel() if kernel is None else kernel).version
    script = command_script(
        command, cwd=workdir, env=guest_env({"PYVDUSE_VM_KERNEL": version, **(env or {})})
    )
    if not _is_root():
        raise TestVMError("the test VM needs root (virtiofsd shares / and runs as root)")
    tools = ensure_tools()
    image = ensure_guest(kernel=version)
    with _vm_slot():
        return _run_in_slot(script, tools, image, mem=mem, smp=smp, timeout=timeout, console=console)


def _run_in_slot(
    script: str,
    tools: HostTools,
    image: GuestImage,
    *,
    mem: str,
    smp: int,
    timeout: float,
    console: TextIO | None,
) -> RunResult:
    _prune_stale_rundirs()
    rundir = Path(tempfile.mkdtemp(prefix="r", dir=RUN_BASE))
    deadline = time.monotonic() + timeout
    try:
        (rundir / "owner").write_text(f"{os.getpid()}\n")
        (rundir / "command.sh").write_text(script)
        socket = rundir / "virtiofsd.sock"
        nocache, nocache_socket = rundir / "nocache", rundir / "nocache.sock"
        nocache.mkdir()
        argv = qemu_argv(tools.qemu, image, socket, rundir, mem=mem, smp=smp, nocache_socket=nocache_socket)
        for boot in range(1, BOOT_ATTEMPTS + 1):
            # virtiofsd serves one connection: a fresh one for every boot.
            with (
                _virtiofsd(tools.virtiofsd, socket, rundir / "virtiofsd.log"),
                _virtiofsd(
                    tools.virtiofsd, nocache_socket, rundir / "virtiofsd-nocache.log", str(nocache), "none"
                ),
            ):
                result = _run_prepared(
                    argv,
                    rundir,
                    timeout=max(deadline - time.monotonic(), 0.0),
                    console=console,
                    will_retry=boot < BOOT_ATTEMPTS,
                    boot_timeout=BOOT_TIMEOUT,
                )
            result.boots = boot
            if result.timed_out or boot == BOOT_ATTEMPTS:
                return result
            if result.boot_panic:
                _note(
                    f"the guest kernel panicked at boot, before the command began; booting "
                    f"again ({boot + 1} of {BOOT_ATTEMPTS}): {_panic_line(result.boot_panic)}"
                )
            elif result.boot_hung:
                _note(
                    f"the guest did not reach the command in {BOOT_TIMEOUT:.0f} s of booting; "
                    f"booting again ({boot + 1} of {BOOT_ATTEMPTS})"
                )
            else:
                return result
        raise AssertionError("unreachable")
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


def _panic_line(boot: str) -> str:
    """The kernel's one-line reason from a panicked boot's console."""
    for line in reversed(boot.splitlines()):
        if BOOT_PANIC in line:
            return line.split("] ", 1)[-1].strip()
    return BOOT_PANIC


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pyvduse testvm",
        description="Run a shell command as root in a Linux VM with the VDUSE module; "
        "the host's / is the guest's /, except a private /tmp. Exits with the command's "
        f"status ({EXIT_TIMEOUT} on timeout, {EXIT_NO_STATUS} if the guest gave none).",
    )
    p.add_argument(
        "--kernel",
        choices=list(KERNELS),
        default=default_kernel(),
        help=f"the guest's Linux (default {default_kernel()}; 7.3 comes from Debian's trixie-backports)",
    )
    p.add_argument("--mem", default="2G", help="guest memory (default 2G)")
    p.add_argument("--smp", type=int, default=2, help="guest CPUs (default 2)")
    p.add_argument("--timeout", type=float, default=900, help="seconds (default 900)")
    p.add_argument("--cwd", default=None, help="directory to run in (default: current)")
    p.add_argument("--kernel-log", action="store_true", help="print the guest's whole dmesg afterwards")
    p.add_argument("--prepare", action="store_true", help="only install tools and build the guest image")
    p.add_argument("command", nargs="*", help="one word: shell code as is; several: an argv (shlex-joined)")
    return p


def join_command(words: Sequence[str]) -> str:
    """One word is shell code ('uname -r; ls'); several are an argv quoted with shlex."""
    return words[0] if len(words) == 1 else shlex.join(words)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    """Turn SIGTERM into an exception so finally-blocks stop the VM."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """`pyvduse testvm`: stream the guest's console to stdout, exit with its status."""
    args = _parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        # A plain SIGTERM would skip the cleanup in run(); make it unwind like Ctrl-C.
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        checkout = source_checkout()
        if checkout is not None:  # the engine users run, in the guest too (it shares ours)
            ensure_native_build(checkout)
        if args.prepare:
            ensure_tools()
            image = ensure_guest(kernel=args.kernel)
            print(f"guest image: {image.package} in {image.vmlinuz.parent}")
            return 0
        if not args.command:
            _parser().error("no command given (use: pyvduse testvm -- COMMAND...)")
        result = run(
            join_command(args.command),
            cwd=args.cwd,
            mem=args.mem,
            smp=args.smp,
            timeout=args.timeout,
            console=sys.stdout,
            kernel=args.kernel,
        )
    except (TestVMError, ValueError) as e:
        print(f"pyvduse testvm: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # run() has already stopped the VM and cleaned up
        return 130
    if args.kernel_log:
        sys.stderr.write(result.kernel_log)
    elif result.exit_code != 0:
        ours = f"] {KMSG_START.split(':')[0]}:"  # our own markers say nothing new
        tail = [line for line in result.command_kernel_log.splitlines() if ours not in line]
        tail = tail[-60:]
        if tail:
            print("--- guest kernel messages while the command ran ---", file=sys.stderr)
            print("\n".join(tail), file=sys.stderr)
    if result.timed_out:
        print(f"pyvduse testvm: timed out after {args.timeout:g} s", file=sys.stderr)
    elif result.exit_code == EXIT_NO_STATUS and not result.kernel_log:
        # The init saves the kernel log just before the status: no log, no status.
        print("pyvduse testvm: the guest reported no exit status", file=sys.stderr)
    return result.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
