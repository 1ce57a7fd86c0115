"""virtio-blk behaviour, the same tests on the in-process model and on the real kernel.

The ``kernel`` variants run in the test VM (Linux's virtio_blk driver, ``/dev/vdX``), the
``vhost`` variants too, through vhost_vdpa with our own driver in the test's process (as a
VMM); the ``model`` variants run here in milliseconds. What only the model can provoke (resets
mid-request, changed features, kicks on unready queues) lives in tests/unit/test_model.py.
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.scenarios.targets import TargetFactory

MiB = 1 << 20


@pytest.fixture(
    params=[
        "model-split",
        "model-packed",
        pytest.param("kernel-split", marks=pytest.mark.vm),
        pytest.param("kernel-packed", marks=pytest.mark.vm),
        pytest.param("vhost-split", marks=pytest.mark.vm),
        pytest.param("vhost-packed", marks=pytest.mark.vm),
    ]
)
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TargetFactory]:
    kind, ring = request.param.split("-")
    with TargetFactory(kind, tmp_path, packed=ring == "packed") as factory:
        yield factory


def test_capacity_and_serial(target: TargetFactory) -> None:
    t = target(32 * MiB, serial="SCENARIO-7")
    assert t.capacity == 32 * MiB
    assert t.get_id() == "SCENARIO-7"


def test_random_writes_read_back(target: TargetFactory) -> None:
    t = target(32 * MiB)
    rng = random.Random(7)
    written: dict[int, bytes] = {}
    for _ in range(60):
        size = rng.choice([4096, 8192, 65536, 262144])
        off = rng.randrange(0, (32 * MiB - size) // 4096) * 4096
        data = rng.randbytes(size)
        t.write(off, data)
        written = {o: d for o, d in written.items() if o + len(d) <= off or o >= off + size}
        written[off] = data
    t.flush()
    for off, data in written.items():
        assert t.read(off, len(data)) == data


def test_discard_and_write_zeroes_read_as_zero(target: TargetFactory) -> None:
    t = target(16 * MiB)
    t.write(0, b"\xaa" * (4 * MiB))
    t.discard(0, MiB)
    t.write_zeroes(2 * MiB, MiB)
    assert t.read(0, MiB) == bytes(MiB)
    assert t.read(MiB, MiB) == b"\xaa" * MiB
    assert t.read(2 * MiB, MiB) == bytes(MiB)
    assert t.read(3 * MiB, MiB) == b"\xaa" * MiB


def test_readonly_refuses_writes_and_keeps_data(target: TargetFactory) -> None:
    content = os.urandom(4 * MiB)
    t = target(4 * MiB, readonly=True, fill=content)
    with pytest.raises(OSError):
        t.write(0, bytes(4096))
    assert hashlib.sha256(t.read(0, 4 * MiB)).digest() == hashlib.sha256(content).digest()


def test_block_size_4096(target: TargetFactory) -> None:
    t = target(8 * MiB, block_size=4096)
    t.write(4096, b"\x42" * 4096)
    assert t.read(4096, 4096) == b"\x42" * 4096


def test_two_queues_concurrent_writers(target: TargetFactory) -> None:
    t = target(16 * MiB, num_queues=2)
    errors: list[BaseException] = []

    def writer(q: int) -> None:
        try:
            for k in range(40):
                off = q * 8 * MiB + k * 65536
                data = bytes([q + 1, k]) * 32768
                t.write(off, data, queue=q)
                assert t.read(off, 65536, queue=q) == data
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(q,)) for q in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
