#!/usr/bin/env bash
# One GPU session on a bare lent machine: build the CUDA extension, run the GPU tests, run the
# benchmarks. Run from anywhere inside the repository (through the device tool, $OUT is set):
#
#   STAGE=smoke bash bench/gpu_session.sh           # FIRST, on any lent GPU: tools/gpu_smoke.py
#                                                   # (build for sm_90, compute-sanitizer runs, the
#                                                   # real batch-256 shapes; <= 8 min; smoke.log/json)
#   STAGE=build,test bash bench/gpu_session.sh      # ~ build (1-3 min) + GPU tests
#   STAGE=bench bash bench/gpu_session.sh           # the three benchmarks (~9 min; with 'build'
#                                                   # first, they get what the build leaves)
#   STAGE=attn ATTN_ARGS="--models cvt-13@224" bash bench/gpu_session.sh
#   STAGE=tune TUNE_ARGS="--steps tests" bash bench/gpu_session.sh   # evidence for 'auto' (bench/tune.py);
#                                                   # then TUNE_ARGS="--steps timings": commit $OUT/tuning.json
#                                                   # as cvt_fast/ops/tuning.json
#
# Before the first device call, HERE (the device machine cannot fetch anything):
#
#   STAGE=fetch bash bench/gpu_session.sh           # wheels for the device machine into .whl/
#
# downloads, for the device's Python (DEVICE_PYTHON, default 3.12: the device KINDS.md) on Linux
# x86-64, pyproject.toml's 'peers' extra (what `pip install -e ".[peers]"` installs here: xformers
# and the CUDA 12 runtime it links) and FETCH_ALSO (default yacs, which the image lacks;
# pytest-xdist and execnet are there). Each device call then names .whl in its carry; this script
# installs the wheels to /tmp/site, puts the CUDA 12 runtime on LD_LIBRARY_PATH (torch before 2.14
# does not preload it from the path) and says in env.txt whether the xformers backend can run.
#
# STAGE: comma-separated steps among smoke, build, test, attn, conv_proj, model, tune;
#        'bench' = attn,conv_proj,model; 'all' = smoke,test,attn,conv_proj,model (longer than one
#        10-minute command: split it). 'smoke' builds the extension itself (so 'build' after a
#        smoke whose build passed is skipped); SMOKE_TIMEOUT (default 480 s) is its budget. Without 'build', the extension already in the tree is
#        used (e.g. a cvt_fast/_C*.so from an earlier session's $OUT, carried back).
# Each step runs under `timeout` (BUILD_TIMEOUT, TEST_TIMEOUT, ATTN_TIMEOUT, CONV_TIMEOUT,
# MODEL_TIMEOUT, TUNE_TIMEOUT, seconds), cut to what is left of SESSION_LIMIT (default 570 s, inside the device
# tool's 10-minute command limit; a step with under 30 s left is skipped). Benchmarks also get
# --time-budget a little shorter than their timeout, so they stop starting measurements in time
# and still write their results; SIGINT comes next, then SIGKILL.
# Extra arguments per benchmark: ATTN_ARGS, CONV_ARGS, MODEL_ARGS, TUNE_ARGS.
#
# The machine: its own python3 with torch and triton, no yacs; Python wheels carried in .whl/ are
# installed to /tmp/site. Files written to $OUT (at most 8 come back):
#   env.txt          nvidia-smi, versions, the session's settings
#   smoke.log        tools/gpu_smoke.py: every step's output (sanitizer reports, one line per case)
#   smoke.json       its summary: per step passed/failed/skipped, seconds, failures
#   build.log        pip install -e . output (ptxas resource usage), extension status
#   gpu_tests.log    pytest -m gpu output with durations
#   bench.log        the benchmarks' console output, then their Markdown tables
#   results.tar.gz   bench/results/<device>-<date>-<script>.{json,md,png}: untar in the repo root
#   tuning.json      the tuning file after the tune step (cvt_fast/ops/tuning.json)
#   <_C...so>        the built extension (build stage, KEEP_SO=1 default), to carry to a later call
set -uo pipefail

cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-$REPO/.gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
STAGE=${STAGE:-all}
SESSION_LIMIT=${SESSION_LIMIT:-570}
BUILD_TIMEOUT=${BUILD_TIMEOUT:-300}
TEST_TIMEOUT=${TEST_TIMEOUT:-300}
ATTN_TIMEOUT=${ATTN_TIMEOUT:-150}
CONV_TIMEOUT=${CONV_TIMEOUT:-170}
MODEL_TIMEOUT=${MODEL_TIMEOUT:-230}
TUNE_TIMEOUT=${TUNE_TIMEOUT:-540}
SMOKE_TIMEOUT=${SMOKE_TIMEOUT:-480}
ATTN_ARGS=${ATTN_ARGS:-}
CONV_ARGS=${CONV_ARGS:---modes eval-fwd,train-fwd+bwd}
MODEL_ARGS=${MODEL_ARGS:---models cvt-13@224,cvt-w24@384}
TUNE_ARGS=${TUNE_ARGS:-}
KEEP_SO=${KEEP_SO:-1}
export PYTHONUNBUFFERED=1
# Compiled kernels of torch.compile/Triton stay within this session's disk.
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor-cache}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-cache}

DEVICE_PYTHON=${DEVICE_PYTHON:-3.12}
FETCH_ALSO=${FETCH_ALSO:-yacs==0.1.8}

# fetch_wheels: here, not on the device. One version of each distribution in .whl/, or the
# device's install stops (the device README): older ones are removed.
fetch_wheels() {
    local requirements
    mapfile -t requirements < <("$PY" - <<'PYTHON'
import pathlib, re
match = re.search(r"^peers\s*=\s*\[([^\]]*)\]", pathlib.Path("pyproject.toml").read_text(), re.MULTILINE)
if match is None:
    raise SystemExit("pyproject.toml has no 'peers' extra")
print("\n".join(re.findall(r'"([^"]+)"', match.group(1))))
PYTHON
)
    [ "${#requirements[@]}" -gt 0 ] || { echo "fetch: nothing read from pyproject.toml's peers extra"; return 1; }
    # shellcheck disable=SC2206
    requirements+=($FETCH_ALSO)
    echo "fetch: ${requirements[*]} for CPython $DEVICE_PYTHON, Linux x86-64, into .whl/"
    mkdir -p .whl
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$DEVICE_PYTHON" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${requirements[@]}" || return 1
    "$PY" - <<'PYTHON' || return 1
import collections, pathlib
from packaging.version import Version
wheels = collections.defaultdict(list)
for path in pathlib.Path(".whl").glob("*.whl"):
    name, version = path.name.split("-")[:2]
    wheels[name.lower().replace("_", "-")].append((Version(version), path))
for name, found in sorted(wheels.items()):
    found.sort()
    for _, old in found[:-1]:
        print(f"fetch: removing {old.name} (a newer {name} is there)")
        old.unlink()
    print(f"fetch: .whl/{found[-1][1].name} ({found[-1][1].stat().st_size / 2**20:.1f} MiB)")
PYTHON
    git check-ignore -q .whl/ || echo "fetch: warning: git does not ignore .whl/ (add /.whl/ to .gitignore)"
    echo "fetch: $(du -sh .whl | cut -f1) in .whl/; name \".whl\" in each device call's carry"
}
if [[ ",$STAGE," == *",fetch,"* ]]; then
    fetch_wheels
    exit $?
fi

case ",$STAGE," in
    *,all,*) STAGE="smoke,test,attn,conv_proj,model" ;;
esac
STAGE=${STAGE//bench/attn,conv_proj,model}
has_stage() { [[ ",$STAGE," == *",$1,"* ]]; }
started=$(date +%s)
stamp() { echo "[gpu_session $(( $(date +%s) - started ))s] $*"; }
# step_limit WANTED: WANTED seconds, or what is left of SESSION_LIMIT (minus a margin for the
# packing at the end) if that is less.
step_limit() {
    local left=$(( SESSION_LIMIT - ($(date +%s) - started) - 15 ))
    echo $(( $1 < left ? $1 : left ))
}
STAMP_FILE=$(mktemp)

# --- environment -----------------------------------------------------------------------------
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        > /tmp/whl-install.log 2>&1 || { stamp "wheel install failed"; cat /tmp/whl-install.log; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    # xformers' extension links libcudart.so.12, which the image's CUDA 13 torch does not load.
    if [ -d /tmp/site/nvidia/cuda_runtime/lib ]; then
        export LD_LIBRARY_PATH=/tmp/site/nvidia/cuda_runtime/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    fi
fi
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}

{
    echo "# gpu_session $(date -u +%Y-%m-%dT%H:%M:%SZ) STAGE=$STAGE"
    echo "ATTN_ARGS=$ATTN_ARGS | CONV_ARGS=$CONV_ARGS | MODEL_ARGS=$MODEL_ARGS | TUNE_ARGS=$TUNE_ARGS"
    echo "git: $(git rev-parse HEAD 2>/dev/null || echo 'no .git here')"
    uname -a
    nvidia-smi 2>&1
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit \
        --format=csv 2>&1
    nvcc --version 2>&1 | tail -2
    "$PY" - <<'EOF' 2>&1
import importlib, platform, sys
print("python", platform.python_version(), sys.executable)
for name in ("torch", "triton", "transformers", "xformers", "yacs", "timm", "einops", "matplotlib"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as error:
        print(name, "unavailable:", type(error).__name__, str(error)[:200])
import torch
print("torch cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(), "gpu", torch.cuda.is_available())
from cvt_fast.ops.backends import xformers_import_error
print("xformers backend:", xformers_import_error() or "importable, its C++/CUDA extension loaded")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"cc {p.major}.{p.minor}", "SMs", p.multi_processor_count,
          "mem GiB", round(p.total_memory / 2**30, 1), "L2 MiB", getattr(p, "L2_cache_size", 0) / 2**20)
EOF
} > "$OUT/env.txt" 2>&1
stamp "environment in env.txt"

# --- smoke: the first thing on any lent GPU (tools/gpu_smoke.py) ------------------------------
smoke_built=0
if has_stage smoke; then
    limit=$(step_limit "$SMOKE_TIMEOUT")
    stamp "tools/gpu_smoke.py (budget ${limit}s)"
    # The script keeps to its budget (each step skipped when the deadline is near); the timeout
    # is a backstop 20 s later.
    timeout -s INT -k 10 $(( limit + 20 )) "$PY" tools/gpu_smoke.py --out "$OUT" --budget "$limit"
    status=$?
    stamp "gpu_smoke exit status $status"
    if "$PY" -c "import json, sys; s = json.load(open(sys.argv[1])); sys.exit(0 if any(t['name'] == 'build' and t['status'] == 'passed' for t in s['steps']) else 1)" "$OUT/smoke.json" 2>/dev/null; then
        smoke_built=1
        so=$(find cvt_fast build -name '_C*.so' -newer "$STAMP_FILE" 2>/dev/null | sort | head -1)
        if [ "$KEEP_SO" = 1 ] && [ -n "$so" ]; then cp "$so" "$OUT/" && stamp "copied $so to \$OUT"; fi
    fi
fi

# --- build -----------------------------------------------------------------------------------
if has_stage build && [ "$smoke_built" = 1 ]; then
    stamp "build: the smoke stage built the extension already"
elif has_stage build; then
    limit=$(step_limit "$BUILD_TIMEOUT")
    stamp "building the CUDA extension (timeout ${limit}s)"
    TORCH_CUDA_ARCH_LIST=9.0 CVT_FAST_PTXAS_VERBOSE=1 timeout "$limit" \
        "$PY" -m pip install --no-deps --no-build-isolation -e . > "$OUT/build.log" 2>&1
    status=$?
    echo "== pip install exit status: $status" >> "$OUT/build.log"
    stamp "build exit status $status"
    if [ "$KEEP_SO" = 1 ]; then
        so=$(find cvt_fast build -name '_C*.so' -newer "$STAMP_FILE" 2>/dev/null | sort | head -1)
        if [ -n "$so" ]; then
            cp "$so" "$OUT/" && echo "== copied $so to \$OUT (carry it back as cvt_fast/$(basename "$so"))" >> "$OUT/build.log"
        fi
    fi
fi
"$PY" -c "from cvt_fast.extension import extension_status; print('== cvt_fast extension:', extension_status())" \
    >> "$OUT/build.log" 2>&1
tail -1 "$OUT/build.log"

# --- GPU tests -------------------------------------------------------------------------------
if has_stage test && [ "$(step_limit "$TEST_TIMEOUT")" -lt 30 ]; then
    stamp "skipping the GPU tests: too little of SESSION_LIMIT=${SESSION_LIMIT}s left"
    echo "skipped: too little of SESSION_LIMIT=${SESSION_LIMIT}s left" > "$OUT/gpu_tests.log"
elif has_stage test; then
    # First the extension's host-side tests (registration, Meta shapes, C++ errors raised as
    # Python exceptions) against the extension built here: seconds, and they tell an ABI or
    # exception-translation problem of this build apart from a kernel problem.
    stamp "pytest tests/test_cuda_extension.py, host side (timeout 60s)"
    timeout -s INT -k 10 60 "$PY" -m pytest -q tests/test_cuda_extension.py -m "not gpu" -k "not emulated" \
        -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1
    echo "== host-side pytest exit status: $?" >> "$OUT/gpu_tests.log"
    limit=$(step_limit "$TEST_TIMEOUT")
    # With pytest-xdist (carry its wheel and execnet's in .whl/), one worker process: a test
    # that crashes it (a segfault in a kernel launch) is reported by name and a new worker
    # runs the rest, instead of the whole session ending there.
    crash_safe=()
    if "$PY" -c "import xdist" 2>/dev/null; then crash_safe=(-n 1 --max-worker-restart 20); fi
    stamp "pytest -m gpu ${crash_safe[*]} (timeout ${limit}s)"
    timeout -s INT -k 20 "$limit" "$PY" -m pytest -q -m gpu tests/ --durations=25 -p no:cacheprovider \
        "${crash_safe[@]}" >> "$OUT/gpu_tests.log" 2>&1
    status=$?
    echo "== pytest exit status: $status" >> "$OUT/gpu_tests.log"
    stamp "pytest exit status $status"
    tail -5 "$OUT/gpu_tests.log"
fi

# --- benchmarks ------------------------------------------------------------------------------
run_bench() {  # name timeout extra-args...
    local script=$1 limit
    limit=$(step_limit "$2")
    shift 2
    if [ "$limit" -lt 30 ]; then
        stamp "skipping bench/$script.py: too little of SESSION_LIMIT=${SESSION_LIMIT}s left"
        echo "== bench/$script.py skipped: too little of SESSION_LIMIT=${SESSION_LIMIT}s left" >> "$OUT/bench.log"
        return
    fi
    local budget=$(( limit > 90 ? limit - 40 : limit * 2 / 3 ))
    stamp "bench/$script.py (timeout ${limit}s, budget ${budget}s) $*"
    # shellcheck disable=SC2068
    timeout -s INT -k 20 "$limit" "$PY" "bench/$script.py" --time-budget "$budget" $@ >> "$OUT/bench.log" 2>&1
    local status=$?
    echo "== bench/$script.py exit status: $status" >> "$OUT/bench.log"
    stamp "bench/$script.py exit status $status"
}
ran_bench=0
if has_stage attn; then run_bench attn "$ATTN_TIMEOUT" $ATTN_ARGS; ran_bench=1; fi
if has_stage conv_proj; then run_bench conv_proj "$CONV_TIMEOUT" $CONV_ARGS; ran_bench=1; fi
if has_stage model; then run_bench model "$MODEL_TIMEOUT" $MODEL_ARGS; ran_bench=1; fi
if has_stage tune; then
    run_bench tune "$TUNE_TIMEOUT" $TUNE_ARGS
    cp cvt_fast/ops/tuning.json "$OUT/tuning.json" && stamp "tuning.json copied to \$OUT"
fi
if [ "$ran_bench" = 1 ]; then
    mapfile -t produced < <(find bench/results -type f -newer "$STAMP_FILE" \( -name '*.json' -o -name '*.md' -o -name '*.png' \) | sort)
    if [ "${#produced[@]}" -gt 0 ]; then
        tar czf "$OUT/results.tar.gz" "${produced[@]}"
        {
            echo
            echo "==================== Markdown tables ===================="
            for f in "${produced[@]}"; do
                case $f in *.md) echo; cat "$f" ;; esac
            done
        } >> "$OUT/bench.log"
        stamp "results.tar.gz: ${produced[*]}"
        # The compact tables last, so they are what a short output tail shows.
        for f in "${produced[@]}"; do
            case $f in *.md) echo "--- $f"; sed -n '/^## Median\|^## Images/,$p' "$f" ;; esac
        done
    else
        stamp "no benchmark results were written"
        tail -30 "$OUT/bench.log"
    fi
fi
rm -f "$STAMP_FILE"
stamp "done; files in \$OUT: $(ls "$OUT" | tr '\n' ' ')"
