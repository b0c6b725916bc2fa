#!/usr/bin/env bash
# One GPU session on a bare lent machine: build the CUDA extension, run the GPU tests, run the
# benchmarks. Run from anywhere inside the repository (through the device tool, $OUT is set):
#
#   STAGE=build,test bash bench/gpu_session.sh      # ~ build (1-3 min) + GPU tests
#   STAGE=build,bench bash bench/gpu_session.sh     # the three benchmarks (default ~9 min)
#   STAGE=attn ATTN_ARGS="--models cvt-13@224" bash bench/gpu_session.sh
#
# STAGE: comma-separated steps among build, test, attn, conv_proj, model;
#        'bench' = attn,conv_proj,model; 'all' = build,test,attn,conv_proj,model (longer than one
#        10-minute command: split it). Without 'build', the extension already in the tree is
#        used (e.g. a cvt_fast/_C*.so from an earlier session's $OUT, carried back).
# Each step runs under `timeout` (BUILD_TIMEOUT, TEST_TIMEOUT, ATTN_TIMEOUT, CONV_TIMEOUT,
# MODEL_TIMEOUT, seconds); benchmarks also get --time-budget a little shorter than their timeout,
# so they stop starting measurements in time and still write their results; SIGINT comes next.
# Extra arguments per benchmark: ATTN_ARGS, CONV_ARGS, MODEL_ARGS.
#
# The machine: its own python3 with torch and triton, no yacs; Python wheels carried in .whl/ are
# installed to /tmp/site. Files written to $OUT (at most 8 come back):
#   env.txt          nvidia-smi, versions, the session's settings
#   build.log        pip install -e . output (ptxas resource usage), extension status
#   gpu_tests.log    pytest -m gpu output with durations
#   bench.log        the benchmarks' console output, then their Markdown tables
#   results.tar.gz   bench/results/<device>-<date>-<script>.{json,md,png}: untar in the repo root
#   <_C...so>        the built extension (build stage, KEEP_SO=1 default), to carry to a later call
set -uo pipefail

cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-$REPO/.gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
STAGE=${STAGE:-all}
BUILD_TIMEOUT=${BUILD_TIMEOUT:-420}
TEST_TIMEOUT=${TEST_TIMEOUT:-420}
ATTN_TIMEOUT=${ATTN_TIMEOUT:-150}
CONV_TIMEOUT=${CONV_TIMEOUT:-170}
MODEL_TIMEOUT=${MODEL_TIMEOUT:-230}
ATTN_ARGS=${ATTN_ARGS:-}
CONV_ARGS=${CONV_ARGS:---modes eval-fwd,train-fwd+bwd}
MODEL_ARGS=${MODEL_ARGS:---models cvt-13@224,cvt-w24@384}
KEEP_SO=${KEEP_SO:-1}
export PYTHONUNBUFFERED=1
# Compiled kernels of torch.compile/Triton stay within this session's disk.
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor-cache}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-cache}

case ",$STAGE," in
    *,all,*) STAGE="build,test,attn,conv_proj,model" ;;
esac
STAGE=${STAGE//bench/attn,conv_proj,model}
has_stage() { [[ ",$STAGE," == *",$1,"* ]]; }
started=$(date +%s)
stamp() { echo "[gpu_session $(( $(date +%s) - started ))s] $*"; }
STAMP_FILE=$(mktemp)

# --- environment -----------------------------------------------------------------------------
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        > /tmp/whl-install.log 2>&1 || { stamp "wheel install failed"; cat /tmp/whl-install.log; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}

{
    echo "# gpu_session $(date -u +%Y-%m-%dT%H:%M:%SZ) STAGE=$STAGE"
    echo "ATTN_ARGS=$ATTN_ARGS | CONV_ARGS=$CONV_ARGS | MODEL_ARGS=$MODEL_ARGS"
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
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"cc {p.major}.{p.minor}", "SMs", p.multi_processor_count,
          "mem GiB", round(p.total_memory / 2**30, 1), "L2 MiB", getattr(p, "L2_cache_size", 0) / 2**20)
EOF
} > "$OUT/env.txt" 2>&1
stamp "environment in env.txt"

# --- build -----------------------------------------------------------------------------------
if has_stage build; then
    stamp "building the CUDA extension (timeout ${BUILD_TIMEOUT}s)"
    TORCH_CUDA_ARCH_LIST=9.0 CVT_FAST_PTXAS_VERBOSE=1 timeout "$BUILD_TIMEOUT" \
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
if has_stage test; then
    stamp "pytest -m gpu (timeout ${TEST_TIMEOUT}s)"
    timeout -s INT -k 30 "$TEST_TIMEOUT" "$PY" -m pytest -q -m gpu tests/ --durations=25 -p no:cacheprovider \
        > "$OUT/gpu_tests.log" 2>&1
    status=$?
    echo "== pytest exit status: $status" >> "$OUT/gpu_tests.log"
    stamp "pytest exit status $status"
    tail -5 "$OUT/gpu_tests.log"
fi

# --- benchmarks ------------------------------------------------------------------------------
run_bench() {  # name timeout extra-args...
    local script=$1 limit=$2
    shift 2
    local budget=$(( limit > 90 ? limit - 40 : limit * 2 / 3 ))
    stamp "bench/$script.py (timeout ${limit}s, budget ${budget}s) $*"
    # shellcheck disable=SC2068
    timeout -s INT -k 45 "$limit" "$PY" "bench/$script.py" --time-budget "$budget" $@ >> "$OUT/bench.log" 2>&1
    local status=$?
    echo "== bench/$script.py exit status: $status" >> "$OUT/bench.log"
    stamp "bench/$script.py exit status $status"
}
ran_bench=0
if has_stage attn; then run_bench attn "$ATTN_TIMEOUT" $ATTN_ARGS; ran_bench=1; fi
if has_stage conv_proj; then run_bench conv_proj "$CONV_TIMEOUT" $CONV_ARGS; ran_bench=1; fi
if has_stage model; then run_bench model "$MODEL_TIMEOUT" $MODEL_ARGS; ran_bench=1; fi
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
