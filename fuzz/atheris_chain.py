"""Coverage-guided fuzzing of the descriptor-chain parser with atheris.

    pip install atheris && python3 fuzz/atheris_chain.py -max_total_time=60

libFuzzer drives ``fuzz.ring_cases.run_case`` with inputs it mutates towards new coverage
of the pyvduse ring code; each input is served by both engines (the native loop when the
extension is built), and any property violation or difference between them is a crash it
saves. The coverage that guides it is the Python code's (the engine and the native loop's
Python side); the C loop is exercised through the same inputs, not instrumented.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import atheris

with atheris.instrument_imports(include=["pyvduse"]):
    from fuzz.ring_cases import run_case


def test_one_input(data: bytes) -> None:
    run_case(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
