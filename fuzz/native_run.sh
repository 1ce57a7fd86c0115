#!/usr/bin/env bash
# What fuzz/sanitize.sh and fuzz/coverage.sh run against their build of the native engine:
# the native-engine property tests (hypothesis seeded with FUZZ_SEED), then the fuzzers of
# every native path on the same seed: fuzz/fuzz_rings.py (blk rings on every backend, both
# engines byte for byte) and fuzz/fuzz_native.py (net RX/TX, io_uring with many requests in
# flight completing out of order with remaps, poison and abandon, NBD against lying
# servers). Run from the tree's root with FUZZ_SEED and CASES set (FUZZ_NATIVE: the
# arguments of fuzz_native.py); exits non-zero at the first failure.
set -euo pipefail
: "${FUZZ_SEED:?}" "${CASES:?}"
python3 -m pytest -p no:cacheprovider -q --no-vm -x --hypothesis-seed="$FUZZ_SEED" \
  tests/unit/test_native_api.py tests/unit/test_native_engine.py \
  tests/unit/test_hostile_ring.py tests/unit/test_ring_areas.py \
  tests/unit/test_ring_budget.py tests/unit/test_native_uring.py \
  tests/unit/test_native_inflight.py tests/unit/test_nbd.py tests/unit/test_nbd_hostile.py \
  tests/unit/test_native_net.py tests/unit/test_hostile_net.py
echo "fuzz: blk rings, both engines, $CASES cases (seed $FUZZ_SEED)"
python3 fuzz/fuzz_rings.py --cases "$CASES" --seed "$FUZZ_SEED"
# shellcheck disable=SC2086  # FUZZ_NATIVE is a list of arguments
python3 fuzz/fuzz_native.py --seed "$FUZZ_SEED" ${FUZZ_NATIVE:-}
