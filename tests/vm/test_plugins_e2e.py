"""Plugins on the real kernel: a user's backend and a user's device, loaded by the command
line from their files, serving Linux's own drivers."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vm.helpers import Daemon, sh

pytestmark = pytest.mark.vm

ROOT = Path(__file__).resolve().parents[2]


def test_ext4_on_a_backend_plugins_device(tmp_path: Path) -> None:
    with Daemon(
        "--backend",
        f"{ROOT}/examples/sparse_ram.py:SparseRam",
        "--backend-arg",
        "size=128M",
        "--backend-arg",
        "block=4096",
        name="plug-sparse",
    ) as d:
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        sh(f"mkfs.ext4 -q -F {d.dev}")
        sh(f"mount {d.dev} {mnt}")
        sh(f"head -c 3000000 /dev/urandom > {mnt}/data; sync; sha256sum {mnt}/data > {tmp_path}/sum")
        sh(f"umount {mnt}")
        sh(f"e2fsck -fn {d.dev}")
        sh(f"mount {d.dev} {mnt}")
        sh(f"sha256sum -c {tmp_path}/sum")
        sh(f"umount {mnt}")
        assert d.stop() == 0


def test_a_device_plugin_fails_exactly_its_writes() -> None:
    with Daemon(
        "--device",
        f"{ROOT}/examples/flaky_blk.py:FlakyBlk",
        "--device-arg",
        "size=16M",
        "--device-arg",
        "every=4",
        name="plug-flaky",
    ) as d:
        p = sh(
            f"for i in 0 1 2 3 4 5 6 7; do dd if=/dev/zero of={d.dev} bs=4k count=1 "
            "seek=$i oflag=direct status=none || echo failed; done",
            check=False,
        )
        assert p.stdout.count("failed") == 2, p  # the 4th and 8th writes
        assert d.stop() == 0
