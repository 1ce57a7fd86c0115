#!/usr/bin/env bash
# Line coverage of the native engine's C files (pyvduse/fastpath/*.c) by what fuzz/sanitize.sh
# runs: the native-engine tests and the fuzzers, against a gcc --coverage build of the
# extension in a copy of the tree (the checkout's build is left alone). Prints gcovr's
# per-file summary and the functions no line of which ran.
#
#   fuzz/coverage.sh                      # the sanitizer run's budget (a few minutes)
#   FUZZ_CASES=20000 fuzz/coverage.sh     # more fuzzing
#   COVERAGE_SEED=123 fuzz/coverage.sh    # replay a seed
#
# Each of the three builds (_splitblk, _splitblk_uring, _splitblk_full) is compiled in a
# build directory of its own, so their counters do not mix; gcovr adds them up per line.
# Needs gcc and gcovr (pip install gcovr: installed here when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
SEED=${COVERAGE_SEED:-$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}
CASES=${FUZZ_CASES:-4000}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/pyvduse-coverage.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
command -v gcovr >/dev/null || python3 -m pip install -q gcovr

tar --exclude='__pycache__' --exclude='*.so' --exclude='.hypothesis' -cf - \
  pyproject.toml README.md pyvduse tests fuzz | tar -xf - -C "$WORK"
cd "$WORK"

echo "coverage: building the extension with --coverage in $WORK"
python3 - <<'EOF' >build.log 2>&1 || { cat build.log; exit 1; }
import os, shutil, tomllib
from setuptools import Extension, setup

work = os.getcwd()
exts = tomllib.load(open("pyproject.toml", "rb"))["tool"]["setuptools"]["ext-modules"]
os.makedirs("covbuild", exist_ok=True)
os.chdir("covbuild")  # no pyproject here: only the extension given below is built
for e in exts:
    short = e["name"].rsplit(".", 1)[1]
    ext = Extension(
        e["name"],
        [os.path.join(work, s) for s in e["sources"]],
        define_macros=[tuple(m) for m in e.get("define-macros", [])] + [("SB_DEBUG", "1")],
        libraries=e.get("libraries", []),
        extra_compile_args=["-O0", "-g", "--coverage", "-fvisibility=hidden"],
        extra_link_args=["--coverage"],
    )
    try:
        setup(
            name=short,
            ext_modules=[ext],
            script_args=["build_ext", "--build-lib", f"lib-{short}", "--build-temp", f"tmp-{short}"],
        )
    except (SystemExit, Exception) as err:  # the optional builds need liburing / libnbd
        print(f"coverage: {e['name']} not built ({err})")
        continue
    so = [f for f in os.listdir(f"lib-{short}/pyvduse/fastpath") if f.endswith(".so")]
    for f in so:
        shutil.copy(f"lib-{short}/pyvduse/fastpath/{f}", os.path.join(work, "pyvduse/fastpath", f))
EOF
ls pyvduse/fastpath/*.so

export PYVDUSE_REQUIRE_NATIVE=1 PYVDUSE_NO_INSTALL=1 PYTHONDONTWRITEBYTECODE=1
FUZZ_SEED=$SEED CASES=$CASES bash fuzz/native_run.sh || echo "coverage: warning: the run failed (the figure counts what ran)"

echo "coverage: line coverage of pyvduse/fastpath/*.c (seed $SEED)"
gcovr --root "$WORK" --filter 'pyvduse/fastpath/.*\.c$' --gcov-ignore-errors=no_working_dir_found \
  --merge-mode-functions=separate --txt - --json-summary covsum.json --json cov.json covbuild
if [ -d covbuild/tmp-_splitblk_full ]; then
  echo "coverage: the build the daemon loads where liburing and libnbd are there (_splitblk_full) alone:"
  gcovr --root "$WORK" --filter 'pyvduse/fastpath/.*\.c$' --gcov-ignore-errors=no_working_dir_found \
    --txt - covbuild/tmp-_splitblk_full | grep -E '^(pyvduse|TOTAL)'
fi
python3 - <<'EOF'
import collections, json
data = json.load(open("cov.json"))
for f in sorted(data["files"], key=lambda f: f["file"]):
    runs = collections.defaultdict(int)  # a function's calls in every build together
    for fn in f.get("functions", []):
        runs[fn.get("demangled_name") or fn["name"]] += fn.get("execution_count", 0)
    cold = sorted(name for name, n in runs.items() if n == 0)
    if cold:
        print(f"coverage: {f['file']}: functions never run: {', '.join(cold)}")
EOF
