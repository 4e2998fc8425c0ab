#!/usr/bin/env bash
# The GPU proof in one prepared run, on a bare GPU machine, from a checkout and a carried wheel folder:
#
#   install          pip-install the carried wheels (tools/gpu_wheels.sh) into .cache/gpu_site;
#                    check that everything imports and record the versions (env.json)
#   build            csrc/ -> megaclm/_cuda_kernels (+ the C++ data helpers) in place, with ninja and
#                    MAX_JOBS parallel jobs for TORCH_CUDA_ARCH_LIST (default 9.0); DeepSpeed's FusedAdam
#                    JIT-built at the same time (every DeepSpeed run on the GPU needs it)
#   tests            pytest tests/gpu: every kernel against its reference, fwd and bwd, fp32/bf16/fp16
#   kernel-bench     bench/kernel_bench.py: GB/s against the HBM peak, fused vs eager vs torch.compile
#   profile-hardware bench/profile_hardware.py: the GPU's matmul/attention FLOP/s, copy GB/s, cost per kernel and
#                    ZeRO-3's per-layer host cost as a planner profile (hardware_profile.json, for
#                    tools/plan_layout.py --gpu); H100/H200 datasheet peak
#   throughput-CASE  bench/throughput.py, one stage per case: megaclm (fused and torch ops) vs HF eager,
#                    HF + torch.compile and HF + DeepSpeed ZeRO-2
# then one JSON (gpu_check.json) and one Markdown table (gpu_check.md) in the output folder, with
# every stage's status, the logs in OUT/logs/.
#
# Each stage runs under its own time budget (--stage-budget NAME=SECONDS) and the whole run under
# --budget SECONDS: a stage that would start after the budget is spent is skipped with a line saying
# so. A failing stage never stops the later ones. Exit status 0 when every stage passed, 1 otherwise,
# 2 for a bad flag.
#
#   bash tools/gpu_check.sh [--out DIR] [--wheels DIR] [--budget S] [--stages a,b] [--cases a,b]
#                           [--stage-budget NAME=S]... [--throughput-args "FLAGS"] [--dry-run]
#
# --throughput-args go to every bench/throughput.py stage, e.g. "--micro-batch-size 8 --no-batch-search"
# to measure at the micro batch an earlier run's search found.
#
# --dry-run runs every stage on the CPU with tiny sizes (kernel bench and throughput --quick); the
# build stage builds only the CPU parts, out of tree, and says that it skipped the CUDA build.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
OUTDIR=${OUT:-$ROOT/runs/gpu_check}
WHEELS=$ROOT/.whl
BUDGET=480  # the issue's 8 minutes of wall time
DRY=0
STAGES=""
CASES=""
THROUGHPUT_ARGS=""
declare -A STAGE_BUDGET=([install]=60 [build]=240 [tests]=150 [kernel-bench]=150 [profile-hardware]=60)
THROUGHPUT_BUDGET=150  # per case; the Llama case also searches the largest micro batch
STAGE_BUDGET_FLAGS=()

die() { echo "error: $*" >&2; exit 2; }
is_int() { [[ $1 =~ ^[0-9]+$ ]]; }

while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) DRY=1 ;;
        --out|--wheels|--budget|--stages|--cases|--stage-budget|--throughput-args)
            [ $# -ge 2 ] || die "$1 needs a value"
            case $1 in
                --out) OUTDIR=$2 ;;
                --wheels) WHEELS=$2 ;;
                --budget) is_int "$2" || die "--budget $2: give whole seconds, e.g. --budget 480"; BUDGET=$2 ;;
                --stages) STAGES=$2 ;;
                --cases) CASES=$2 ;;
                --stage-budget) STAGE_BUDGET_FLAGS+=("$2") ;;
                --throughput-args) THROUGHPUT_ARGS=$2 ;;
            esac
            shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
    shift
done

if [ -z "$CASES" ]; then
    if [ $DRY = 1 ]; then CASES=gpt2-tiny,llama-tiny; else CASES=gpt2-124m,gpt-1.3b,llama-1.2b; fi
fi
ALL_STAGES=(install build tests kernel-bench profile-hardware)
for c in ${CASES//,/ }; do
    ALL_STAGES+=("throughput-$c")
    STAGE_BUDGET[throughput-$c]=$THROUGHPUT_BUDGET
done
[ -n "$STAGES" ] || STAGES=$(IFS=,; echo "${ALL_STAGES[*]}")
for s in ${STAGES//,/ }; do
    [[ " ${ALL_STAGES[*]} " == *" $s "* ]] || die "--stages: unknown stage '$s'; choose from ${ALL_STAGES[*]}"
done
for kv in "${STAGE_BUDGET_FLAGS[@]}"; do
    name=${kv%%=*}; secs=${kv#*=}
    [ -n "${STAGE_BUDGET[$name]+x}" ] || die "--stage-budget $kv: unknown stage '$name'; choose from ${ALL_STAGES[*]}"
    is_int "$secs" || die "--stage-budget $kv: give NAME=SECONDS, e.g. tests=120"
    STAGE_BUDGET[$name]=$secs
done

mkdir -p "$OUTDIR/logs" || die "--out $OUTDIR: cannot create it"
OUTDIR=$(cd "$OUTDIR" && pwd)
# The wheels go to a fixed folder, emptied by the install stage: DeepSpeed's JIT-built ops are keyed
# on their source path, so a new folder per run would rebuild FusedAdam (a minute) every time.
SITE=${GPU_CHECK_SITE:-$ROOT/.cache/gpu_site}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/megaclm_gpu_work.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
STAGE_FILE=$OUTDIR/stages.tsv
: > "$STAGE_FILE"
# What each stage leaves for the report; removed before the stage runs, so that an earlier run's
# file in the same folder is never reported as this run's.
stage_output() {
    case $1 in
        install) echo env.json ;;
        tests) echo tests_gpu.xml ;;
        kernel-bench) echo kernel_bench.json ;;
        profile-hardware) echo hardware_profile.json ;;
        throughput-*) echo "throughput_${1#throughput-}.json" ;;
    esac
}
for s in ${ALL_STAGES[*]}; do
    out=$(stage_output "$s")
    [ -z "$out" ] || rm -f "$OUTDIR/$out"
done
rm -f "$OUTDIR/gpu_check.json" "$OUTDIR/gpu_check.md"

# Caches under the checkout's ignored .cache/: a warm GPU machine keeps them between calls, so a rerun
# neither rebuilds DeepSpeed's ops nor recompiles torch.compile graphs.
export PYTHONPATH=$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}
export PATH=$SITE/bin:$PATH
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$ROOT/.cache/torch_extensions}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$ROOT/.cache/inductor}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}  # DeepSpeed's op builder cannot parse "9.0a"
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export HF_HUB_OFFLINE=1 WANDB_MODE=offline PYTHONUNBUFFERED=1
export ROOT PY OUTDIR WHEELS SITE WORK DRY THROUGHPUT_ARGS

# ---- stages: each runs as `bash -c stage_x` under timeout; stdout+stderr go to its log --------------
stage_install() {
    shopt -s nullglob
    local wheels=("$WHEELS"/*.whl)
    if [ ${#wheels[@]} = 0 ]; then
        echo "no wheels in $WHEELS: build them with 'bash tools/gpu_wheels.sh' and carry the folder"
        return 1
    fi
    rm -rf "$SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
        --target "$SITE" "${wheels[@]}" || return 1
    echo "NOTE ${#wheels[@]} wheel(s) installed from $WHEELS"
    "$PY" "$ROOT/tools/gpu_report.py" env "$OUTDIR/env.json"
}

stage_build() {
    cd "$ROOT" || return 1
    if [ "$DRY" = 1 ]; then
        echo "NOTE CUDA build skipped (--dry-run); built the CPU data helpers out of tree"
        MEGACLM_CUDA_EXT=0 "$PY" setup.py -q build_ext --build-lib "$WORK/build/lib" --build-temp "$WORK/build/temp"
        return
    fi
    # A JIT build stopped by a budget leaves its lock file, and the next build would wait on it for
    # ever; on the GPU machine this run is the only user of the folder, so every lock is stale.
    rm -f "$TORCH_EXTENSIONS_DIR"/*/lock
    # Both builds at once: ours with ninja's MAX_JOBS, DeepSpeed's FusedAdam with what is left.
    "$PY" -c "from deepspeed.ops.op_builder import FusedAdamBuilder; FusedAdamBuilder().load()" \
        > "$OUTDIR/logs/build_fused_adam.log" 2>&1 &
    local adam=$!
    MEGACLM_CUDA_EXT=1 "$PY" setup.py build_ext --inplace
    local rc=$?
    wait $adam || { echo "DeepSpeed FusedAdam build failed: see logs/build_fused_adam.log"; rc=1; }
    "$PY" -c "from megaclm.ops import _cuda; assert _cuda.is_available(), _cuda.unavailable_reason()" || rc=1
    [ $rc = 0 ] && echo "NOTE megaclm._cuda_kernels for arch $TORCH_CUDA_ARCH_LIST, $MAX_JOBS jobs"
    return $rc
}

stage_tests() {
    cd "$ROOT" && "$PY" -m pytest -q -p no:cacheprovider tests/gpu --junitxml "$OUTDIR/tests_gpu.xml"
}

stage_kernel_bench() {
    cd "$ROOT" || return 1
    if [ "$DRY" = 1 ]; then
        "$PY" bench/kernel_bench.py --quick --json "$OUTDIR/kernel_bench.json"
    else
        "$PY" bench/kernel_bench.py --iters 20 --json "$OUTDIR/kernel_bench.json"
    fi
}

stage_profile_hardware() {
    cd "$ROOT" || return 1
    if [ "$DRY" = 1 ]; then
        "$PY" bench/profile_hardware.py --out "$OUTDIR/hardware_profile.json" --iters 2 --copy-mib 32 --link-mib 4
    else  # the lent GPUs are H100/H200 (989.4 dense bf16 TFLOP/s); one GPU: links from the shipped profile
        "$PY" bench/profile_hardware.py --out "$OUTDIR/hardware_profile.json" --peak-tflops 989.4 --base h100-80gb
    fi
}

stage_throughput() {  # $1: the case
    cd "$ROOT" || return 1
    if [ "$DRY" = 1 ]; then
        "$PY" bench/throughput.py --quick --cases "$1" --json "$OUTDIR/throughput_$1.json" $THROUGHPUT_ARGS
    else
        "$PY" bench/throughput.py --cases "$1" --warmup 2 --iters 10 --json "$OUTDIR/throughput_$1.json" $THROUGHPUT_ARGS
    fi
}
export -f stage_install stage_build stage_tests stage_kernel_bench stage_profile_hardware stage_throughput

now_ms() { date +%s%3N; }
START=$(now_ms)
FAILED=0

record() {  # name status rc seconds budget note
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >> "$STAGE_FILE"
}

run_stage() {
    local name=$1 fn=stage_${1//-/_} arg=""
    if [[ $name == throughput-* ]]; then fn=stage_throughput; arg=${name#throughput-}; fi
    local elapsed=$(( ($(now_ms) - START) / 1000 ))
    local left=$(( BUDGET - elapsed )) budget=${STAGE_BUDGET[$name]}
    local log=$OUTDIR/logs/$name.log
    if [ $left -lt 5 ]; then
        echo "== $name: skipped (the overall budget of ${BUDGET}s is spent: ${elapsed}s elapsed)"
        record "$name" skipped "" 0 "$budget" "overall budget of ${BUDGET}s spent after ${elapsed}s"
        FAILED=1
        return
    fi
    [ $left -lt "$budget" ] && budget=$left
    echo "== $name (budget ${budget}s, log logs/$name.log)"
    local t0 rc status note
    t0=$(now_ms)
    timeout -k 10 "$budget" bash -c "$fn \"\$@\"" _ $arg > "$log" 2>&1
    rc=$?
    local secs
    secs=$(awk -v ms=$(( $(now_ms) - t0 )) 'BEGIN { printf "%.1f", ms / 1000 }')
    note=$(grep -h '^NOTE ' "$log" | tail -n 1 | cut -c6- | tr '\t' ' ')
    case $rc in
        0) status=passed ;;
        124|137) status=timed_out; note="stopped by its ${budget}s budget${note:+; $note}" ;;
        *) status=failed; note="exit status $rc: $(grep -v '^NOTE ' "$log" | tail -n 1 | cut -c1-200 | tr '\t' ' ')" ;;
    esac
    [ $status = passed ] || FAILED=1
    echo "   $status in ${secs}s${note:+: $note}"
    record "$name" "$status" "$rc" "$secs" "$budget" "$note"
}

echo "gpu_check: $([ $DRY = 1 ] && echo 'dry run on the CPU' || echo 'GPU run'), budget ${BUDGET}s, output $OUTDIR"
for s in ${STAGES//,/ }; do
    run_stage "$s"
done
TOTAL=$(awk -v ms=$(( $(now_ms) - START )) 'BEGIN { printf "%.1f", ms / 1000 }')
"$PY" "$ROOT/tools/gpu_report.py" report "$OUTDIR" --budget "$BUDGET" --elapsed "$TOTAL" \
    $([ $DRY = 1 ] && echo --dry-run) || FAILED=1
exit $FAILED
