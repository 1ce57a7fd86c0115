#!/usr/bin/env bash
# The native engine under AddressSanitizer and UndefinedBehaviorSanitizer: build the
# extension (every build: plain, io_uring, and io_uring + NBD where libnbd-dev is there) with
# -fsanitize=address,undefined in a copy of the tree, then run the native-engine tests (the
# NBD ones against nbdkit when it is installed) and the fuzzers (fuzz/native_run.sh: blk
# rings on both engines byte for byte, net RX/TX, io_uring with requests in flight, out of
# order and remapped, NBD against lying servers) against it, on a fresh random seed each
# run, printed with the command that replays it (SANITIZE_SEED=...).
# Any sanitizer report fails the run (the first one aborts the process, and every report
# is also written to a log file this script checks for).
#
#   fuzz/sanitize.sh              # CI (.ci/run): the fixed budget, a few minutes
#   FUZZ_CASES=100000 fuzz/sanitize.sh   # a longer fuzzing run
#   SANITIZE_SEED=123 fuzz/sanitize.sh   # replay the run that printed seed 123
#
# Needs gcc (its libasan and libubsan: Debian's libgcc-12-dev brings them) and the tests'
# Python packages. The ordinary build in the checkout is left alone. Everything that may
# install (setuptools >= 77 for the build, the commands the tests run) happens first,
# without the sanitizer: under LD_PRELOAD of libasan apt's gpgv stalls, so the suite runs
# with PYVDUSE_NO_INSTALL=1. The build has SB_DEBUG: the engine's invariants (SB_CHECK)
# abort on the first breach. No test asserts a wall-clock bound, so a slow sanitized run
# fails only on what it finds.
set -euo pipefail
cd "$(dirname "$0")/.."
SEED=${SANITIZE_SEED:-$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}  # a fresh seed every run
CASES=${FUZZ_CASES:-4000}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/pyvduse-sanitize.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

echo "sanitize: copying the tree to $WORK"
tar --exclude='__pycache__' --exclude='*.so' --exclude='.hypothesis' -cf - \
  pyproject.toml README.md pyvduse tests fuzz | tar -xf - -C "$WORK"
cd "$WORK"
echo "sanitize: seed $SEED"

# The build needs setuptools >= 77 (pyproject.toml) in the interpreter that runs it.
if ! python3 -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 77)'; then
  echo "sanitize: installing setuptools>=77 for $(command -v python3)"
  python3 -m pip install -q 'setuptools>=77'
fi
# What the suite's set-up would install (nbdkit, fio, ...), now, without the preload.
python3 -c 'from pyvduse import testvm; testvm.ensure_test_tools()' \
  || echo "sanitize: warning: could not install the tests' tools; their tests skip"

# SB_DEBUG: the engine's own checks (SB_CHECK in splitblk.h) abort on a state it must never reach
SAN="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -g"
echo "sanitize: building the extension with $SAN -DSB_DEBUG"
CFLAGS="$SAN -DSB_DEBUG" LDFLAGS="$SAN" python3 -c 'import setuptools; setuptools.setup()' \
  build_ext --inplace >build.log 2>&1 || { cat build.log; exit 1; }

# The ASan runtime the extension was linked with must be loaded first (Python itself is not
# instrumented): find it in the extension's own dependencies.
LIBASAN=
for so in pyvduse/fastpath/_splitblk*.so; do
  lib=$(ldd "$so" | awk '/libasan/ {print $3}')
  [ -n "$lib" ] || { echo "sanitize: $so is not linked with AddressSanitizer" >&2; exit 1; }
  LIBASAN=$lib
done
[ -n "$LIBASAN" ] && [ -e "$LIBASAN" ] || { echo "sanitize: no libasan found" >&2; exit 1; }
ls pyvduse/fastpath/_splitblk_uring*.so >/dev/null 2>&1 \
  || echo "sanitize: warning: built without liburing, the io_uring path is not covered"

REPORT="$WORK/sanitizer-report"
export LD_PRELOAD="$LIBASAN"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:log_path=$REPORT:allocator_may_return_null=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$REPORT"
export PYTHONMALLOC=malloc    # Python's buffers (the tests' driver memory) get ASan's redzones
export PYVDUSE_REQUIRE_NATIVE=1
export PYVDUSE_NO_INSTALL=1   # installed above: nothing installs under the preload
export PYTHONDONTWRITEBYTECODE=1

python3 - <<'EOF'
import ctypes
ctypes.CDLL(None).__asan_init  # AttributeError unless the ASan runtime is loaded
import pyvduse.fastpath.engine as native
assert native.available(), "the sanitized extension did not load"
print(f"sanitize: {native._splitblk.__file__} loaded under AddressSanitizer")
EOF

status=0
echo "sanitize: native-engine properties and fuzzers, seed $SEED" \
  "(replay: SANITIZE_SEED=$SEED FUZZ_CASES=$CASES fuzz/sanitize.sh)"
FUZZ_SEED=$SEED CASES=$CASES bash fuzz/native_run.sh || status=$?
if compgen -G "$REPORT*" >/dev/null; then
  echo "sanitize: SANITIZER REPORTS:" >&2
  cat "$REPORT"* >&2
  exit 1
fi
[ "$status" = 0 ] || { echo "sanitize: FAILED (exit $status, seed $SEED: SANITIZE_SEED=$SEED fuzz/sanitize.sh replays it)" >&2; exit "$status"; }
echo "sanitize: no sanitizer report"
