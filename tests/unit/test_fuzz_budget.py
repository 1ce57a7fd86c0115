"""The ring fuzzer on a fixed, seeded budget (the open-ended run is fuzz/fuzz_rings.py)."""

from __future__ import annotations

import logging

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz.fuzz_rings import fuzz
from fuzz.ring_cases import run_case


def test_seeded_random_budget() -> None:
    logging.disable(logging.WARNING)
    try:
        assert fuzz(seconds=None, cases=3000, seed=20261125, report=False) == 0
    finally:
        logging.disable(logging.NOTSET)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=16, max_size=700))
def test_hypothesis_bytes(data: bytes) -> None:
    run_case(data)


def test_the_native_paths_fuzzer_on_a_seeded_budget() -> None:
    """fuzz/fuzz_native.py (net, io_uring in flight, NBD against lying servers), a few
    scenarios of each on a fixed seed: the paths it cannot run here are skipped inside."""
    from fuzz.fuzz_native import fuzz as fuzz_native

    logging.disable(logging.ERROR)
    try:
        assert fuzz_native(20261208, {"net": 200, "uring": 10, "nbd": 4}) == 0
    finally:
        logging.disable(logging.NOTSET)
