"""The package's layers: a module imports only from its own package or a lower layer.

From the bottom: the kernel ABI and small utilities; the ring engine; backends; devices; the
native data path; transports; the runtime (and, beside it, the model's drivers, which drive
a transport from the other side); operations; the embeddable daemon; the test kit and the
test VM; the command line; the package's public face. A package may not import a sibling of
its own layer either: the runtime knows nothing of the model's drivers, and they nothing of
it. Imports under ``if TYPE_CHECKING:`` count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "pyvduse"

LAYERS: list[set[str]] = [
    {"abi", "errors", "sizes", "ratelimit"},
    {"ring"},
    {"backend", "fs"},  # storage backends; filesystems (the API, FUSE session, passthrough)
    {"device"},
    {"fastpath"},
    {"transport"},
    {"runtime", "model"},
    {"ops"},
    {"daemon"},
    {"netdaemon", "fsdaemon"},  # Daemons for network interfaces, for virtio-fs
    {"testing", "testvm"},
    {"cli"},
    {"__init__", "__main__"},  # the public names; ``python -m pyvduse``
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def part(module: str) -> str:
    """The top-level part of ``pyvduse.x.y`` ('x'), '__init__' for the package itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "pyvduse":
                found += [(node.lineno, f"pyvduse.{a.name}") for a in node.names]
            elif node.module.startswith("pyvduse."):
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("pyvduse.")]
    return found


def test_every_part_of_the_package_has_a_layer() -> None:
    parts = {
        p.stem if p.is_file() else p.name
        for p in PACKAGE.iterdir()
        if (p.suffix == ".py" or (p / "__init__.py").exists())
    }
    assert parts <= set(RANK), f"give these a layer: {sorted(parts - set(RANK))}"


def test_no_layer_imports_a_higher_one_or_a_sibling() -> None:
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        here = part(module.removesuffix(".__init__"))
        for line, target in imports(path):
            there = part(target)
            if there == here or there not in RANK:
                continue  # within one package; or a public name re-exported by __init__
            if RANK[there] >= RANK[here]:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({here}) imports {target} ({there})")
    assert not wrong, "lower layers import higher ones:\n" + "\n".join(wrong)
