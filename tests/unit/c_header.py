"""Values of C expressions as a kernel header defines them, for the ABI tests."""

from __future__ import annotations

import subprocess
from pathlib import Path


def c_values(
    tmp: Path,
    header: str,
    exprs: list[str],
    optional: list[str],
    guarded: dict[str, list[str]] | None = None,
    include: Path | None = None,
) -> dict[str, int]:
    """Compile and run a program printing each expression (``optional`` ones only where
    ``#ifdef`` finds them, ``guarded`` ones only where ``#if`` finds their condition true)
    under ``#include <header>``, looked for first in ``include`` if given."""
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <sys/ioctl.h>",
        f"#include <{header}>",
        '#define P(x) printf("%s|%lld\\n", #x, (long long)(x));',
        "int main(void) {",
    ]
    lines += [f"P({e})" for e in exprs]
    for name in optional:
        lines += [f"#ifdef {name}", f"P({name})", "#endif"]
    for condition, guarded_exprs in (guarded or {}).items():
        lines += [f"#if {condition}", *(f"P({e})" for e in guarded_exprs), "#endif"]
    lines += ["return 0;", "}"]
    src = tmp / "abi_check.c"
    src.write_text("\n".join(lines) + "\n")
    exe = tmp / "abi_check"
    flags = [f"-I{include}"] if include is not None else []
    cc = subprocess.run(["gcc", *flags, "-o", str(exe), str(src)], capture_output=True, text=True)
    assert cc.returncode == 0, cc.stderr
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {k: int(val) for k, val in (line.split("|") for line in out.splitlines())}
