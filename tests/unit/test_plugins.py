"""``--backend`` / ``--device`` plugins: a user's class loaded, constructed and checked."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pyvduse.cli import plugins
from pyvduse.errors import UserError
from tests.unit.test_cli import HAS_VDUSE, one_line_error, pyvduse

ROOT = Path(__file__).resolve().parents[2]
SPARSE = f"{ROOT}/examples/sparse_ram.py:SparseRam"
FLAKY = f"{ROOT}/examples/flaky_blk.py:FlakyBlk"


def test_a_backend_from_a_file_is_built_from_its_arguments() -> None:
    cls = plugins.load_class(SPARSE, "--backend")
    b = plugins.construct(cls, plugins.parse_args(["size=1M", "block=512"], "--backend-arg"), "--backend")
    assert (b.size, b.block) == (1 << 20, 512)  # "1M" became an int by its annotation


def test_a_device_gets_its_options_when_it_takes_them() -> None:
    from pyvduse import BlkOptions

    cls = plugins.load_class(FLAKY, "--device")
    options = BlkOptions(num_queues=2)
    d = plugins.construct(cls, {"size": "1M", "every": "3"}, "--device", {"options": options})
    assert d.every == 3 and d.options.num_queues == 2


def test_conversions_by_annotation(tmp_path: Path) -> None:
    mod = tmp_path / "typed.py"
    mod.write_text(
        "from pathlib import Path\n"
        "class T:\n"
        "    def __init__(self, a: int, b: float, c: bool, d: Path, e: str, "
        "f: int | None = None, g=1):\n"
        "        self.v = (a, b, c, d, e, f, g)\n"
    )
    cls = plugins.load_class(f"{mod}:T", "--backend")
    t = plugins.construct(
        cls, {"a": "0x10", "b": "2.5", "c": "yes", "d": "/x", "e": "5", "f": "4K", "g": "text"}, "--backend"
    )
    assert t.v == (16, 2.5, True, Path("/x"), "5", 4096, "text")
    with pytest.raises(UserError, match="--backend-arg c=maybe: T wants bool there"):
        plugins.construct(cls, {"a": "1", "b": "1", "c": "maybe", "d": "/", "e": ""}, "--backend")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--backend", f"{ROOT}/examples/sparse_ram.py:Nope"], ["has no 'Nope'"]),
        (["--backend", FLAKY], ["is not a backend"]),
        (["--device", SPARSE], ["is not a device"]),
        (["--backend", SPARSE], ["SparseRam refuses these arguments", "missing", "size"]),
        (
            ["--backend", SPARSE, "--backend-arg", "size=1M", "--backend-arg", "colour=red"],
            ["refuses these arguments", "colour", "it takes: size, block"],
        ),
        (["--backend", SPARSE, "--backend-arg", "size"], ["give KEY=VALUE"]),
        (["--backend", "no_such_module_anywhere:X"], ["cannot import no_such_module_anywhere"]),
        (["--backend", "/nonexistent/x.py:X"], ["there is no file /nonexistent/x.py"]),
        (["--backend", "justamodule"], ["give MODULE:CLASS"]),
        (["--device-arg", "a=1", "--null", "1M"], ["--device-arg is for --device"]),
        ([], ["say what to serve"]),
    ],
)
def test_every_plugin_mistake_is_one_line(args: list[str], words: list[str]) -> None:
    one_line_error(pyvduse("blk", "--name", "x", *args), *words)


def test_a_plugin_that_fails_to_import_says_why(tmp_path: Path) -> None:
    bad = tmp_path / "broken.py"
    bad.write_text("raise RuntimeError('half written')\n")
    one_line_error(
        pyvduse("blk", "--name", "x", "--backend", f"{bad}:X"), "loading", "RuntimeError: half written"
    )


def test_a_constructor_that_fails_is_one_line() -> None:
    cls = plugins.load_class(SPARSE, "--backend")
    with pytest.raises(UserError, match=r"SparseRam\(...\) failed: ValueError"):
        plugins.construct(cls, {"size": "3"}, "--backend")


@pytest.mark.skipif(HAS_VDUSE, reason="this host has the vduse module")
@pytest.mark.parametrize("option", ["--backend", "--device"])
def test_the_kernel_is_checked_before_a_plugin_is_constructed(tmp_path: Path, option: str) -> None:
    image = tmp_path / "made.img"
    plugin = tmp_path / "eager.py"
    plugin.write_text(
        "from pathlib import Path\n"
        "from pyvduse import BlkDevice, MemoryBackend\n"
        "def make(path: Path) -> None:\n"
        "    path.write_bytes(bytes(4096))  # creates and truncates its image\n"
        "class EagerBackend(MemoryBackend):\n"
        "    def __init__(self, path: Path) -> None:\n"
        "        make(path)\n"
        "        super().__init__(1 << 20)\n"
        "class EagerDevice(BlkDevice):\n"
        "    def __init__(self, path: Path) -> None:\n"
        "        make(path)\n"
        "        super().__init__(MemoryBackend(1 << 20))\n"
    )
    cls = "EagerBackend" if option == "--backend" else "EagerDevice"
    p = pyvduse("blk", "--name", "x", option, f"{plugin}:{cls}", f"{option}-arg", f"path={image}")
    one_line_error(p, "modprobe vduse")
    assert p.returncode == 2
    assert not image.exists(), "the plugin ran before the kernel was checked"


def test_string_annotations_naming_type_checking_imports_still_convert(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "path", [*sys.path])  # loading a file adds its folder
    mod = tmp_path / "lazy_typed.py"
    mod.write_text(
        "from __future__ import annotations\n"
        "from typing import TYPE_CHECKING, Optional\n"
        "if TYPE_CHECKING:\n"
        "    from collections.abc import Sequence\n"
        "    from pathlib import Path\n"
        "class T:\n"
        "    def __init__(self, size: int, fast: bool, where: Path | None = None,\n"
        "                 ratio: Optional[float] = None, names: Sequence[str] | None = None) -> None:\n"
        "        self.v = (size, fast, where, ratio, names)\n"
    )
    cls = plugins.load_class(f"{mod}:T", "--backend")
    t = plugins.construct(
        cls, {"size": "64M", "fast": "yes", "where": "/x", "ratio": "0.5", "names": "a,b"}, "--backend"
    )
    assert t.v == (64 << 20, True, Path("/x"), 0.5, "a,b")


def test_a_file_plugin_imports_a_module_beside_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "path", [*sys.path])
    (tmp_path / "plugin_helpers_beside.py").write_text("BLOCK = 4096\n")
    mod = tmp_path / "uses_helper.py"
    mod.write_text(
        "from plugin_helpers_beside import BLOCK\n"
        "class T:\n"
        "    def __init__(self) -> None:\n"
        "        self.block = BLOCK\n"
    )
    cls = plugins.load_class(f"{mod}:T", "--backend")
    assert plugins.construct(cls, {}, "--backend").block == 4096
