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
