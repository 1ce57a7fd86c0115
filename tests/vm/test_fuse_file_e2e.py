"""An image file on a FUSE filesystem in direct-I/O mode: virtiofs with cache=none.

Every read and write of such a file pins the caller's buffer (FUSE's direct I/O), even
through the page cache's descriptor (``--cache writeback``), as direct I/O does (``--cache
auto``, the default, opens it O_DIRECT where virtiofs takes that), and the kernel
cannot pin the pages VDUSE maps for its bounce buffer: each transfer straight between the
file and the driver's buffers fails with EFAULT (qemu-storage-daemon fails every request
there). pyvduse's file backend then copies through buffers of its own, from the first
EFAULT on, and says so once: that log line is the proof the EFAULT really happened (before
the fallback, those requests failed with IOERR and mkfs.ext4 could not even start).

That is Linux 6.12's VDUSE. Linux 7.3's pins those pages (measured in the test VM: every
request on the same share goes straight through, no EFAULT), so there the test checks the
opposite: no fallback, no EFAULT, the same clean ext4 and fio verify. Which of the two a
kernel does is what KERNEL_PINS_BOUNCE_PAGES says, by major version.

The test VM shares a directory of its run with cache=none (pyvduse/testvm.py, tag
``nocache``), mounted at $PYVDUSE_VM_NOCACHE_DIR.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.vm.helpers import Daemon, MiB, make_image, sh, wait_gone

pytestmark = pytest.mark.vm

FALLBACK = "the kernel cannot pin the driver's buffers for I/O on this file"
# 6.12: FUSE's direct I/O cannot pin VDUSE's bounce pages (EFAULT); 7.3: it can
KERNEL_PINS_BOUNCE_PAGES = int(os.uname().release.split(".")[0]) >= 7


def nocache_dir() -> Path:
    """The cache=none share (a test VM without it is a broken harness, not a skip)."""
    path = os.environ.get("PYVDUSE_VM_NOCACHE_DIR", "")
    mounts = Path("/proc/mounts").read_text().splitlines()
    options = [m.split()[3] for m in mounts if m.split()[1:3] == [path, "virtiofs"]]
    if not path or not options:
        pytest.fail(
            f"no virtiofs share with cache=none at {path!r} (pyvduse/testvm.py "
            "mounts one; see the console for why it did not)"
        )
    return Path(path)


@pytest.mark.parametrize(
    ("engine", "cache"), [("native", "writeback"), ("python", "writeback"), ("native", "auto")]
)
def test_ext4_and_fio_verify_on_an_image_on_a_cache_none_share(
    tmp_path: Path, engine: str, cache: str
) -> None:
    img = make_image(nocache_dir() / f"fuse-{engine}-{cache}.img", 64 * MiB)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    name = f"e2e-fuse-{engine}-{cache}"
    args = ("--cache", cache, *(("--data-path", "python") if engine == "python" else ()))
    try:
        with Daemon("--file", str(img), *args, name=name) as d:
            sh(f"mkfs.ext4 -q -F {d.dev}")
            sh(f"mount {d.dev} {mnt}")
            sh(
                f"fio --name=verify --filename={mnt}/f --size=12M --direct=1 --ioengine=libaio "
                "--rw=randwrite --bsrange=4k-64k --iodepth=8 --verify=crc32c --verify_fatal=1 "
                "--verify_state_save=0 --do_verify=1 --output-format=terse"
            )
            sh(f"umount {mnt}")
            sh(f"e2fsck -fn {d.dev}")
            assert d.stop() == 0
            log = d.stderr()
        assert wait_gone(f"/dev/vduse/{name}")
        if KERNEL_PINS_BOUNCE_PAGES:
            assert FALLBACK not in log and "EFAULT" not in log, log[-3000:]
        else:
            assert log.count(FALLBACK) == 1, log[-3000:]
            assert "EFAULT" in log and ("FUSE" in log or cache == "auto")
        assert "failed" not in log, log[-3000:]  # no request failed on the way
        sh(f"e2fsck -fn {img}")  # what reached the file through the share is a clean ext4
    finally:
        img.unlink(missing_ok=True)
