#!/usr/bin/env bash
# The prepared GPU check: on a lent CUDA machine as it is (its own python3 with torch + triton, nvcc,
# no package registry), build the extension in place, run everything that needs CUDA, keep the results.
#
#   bash scripts/gpu_check.sh [OUTDIR]            # OUTDIR: default $OUT (the device tool's), else runs/gpu_check
#   bash scripts/gpu_check.sh --dry-run [OUTDIR]  # on a CPU machine: every part up to its first CUDA call
#
# Parts, in order, each under its own time limit (`timeout`; GPU_CHECK_LIMIT_<PART>=seconds overrides one,
# GPU_CHECK_LIMIT_SCALE=x multiplies the defaults, e.g. for a dry run on a slow or busy CPU machine), all
# inside GPU_CHECK_BUDGET seconds (default 480, i.e. 8 minutes; a part gets at most what is left).
# A part that fails or times out does not stop the others.
#   env          versions, GPU, compilers
#   build        pip install --no-build-isolation --no-deps --no-index -e .  (ZO_KERNELS_REQUIRE_NATIVE=1)
#   pytest_cuda  pytest -m cuda: the CUDA C++ kernel vs CPU bit for bit, Triton vs reference on the GPU, and
#                optimizers on both GPU kernels against their float64 transcriptions (HiZOO with float32 and
#                bfloat16 σ, the seeded ZO-Adam: tests/optim_helpers.py gpu_backends)
#   pytest_gpu   the other test files that run on the GPU when there is one (DEVICE = cuda), -m "not cuda"
#                (tests/test_scaled_form.py among them: the scaled form on Triton and the CUDA C++ kernel)
#   bench_noise  benchmarks/bench_noise.py --device cuda: GB/s and % of copy_ per dtype and key count,
#                Gaussian and ±1 noise
#   bench_lowrank benchmarks/bench_noise.py --lowrank --device cuda: the LOZO pass vs rank (table in the log)
#   bench_step   benchmarks/bench_step.py --device cuda: OPT-125m / OPT-1.3b configs, forward vs noise
#   seedlog      a seed log made on the CPU replayed on the GPU: equal bits or the max difference (in the log)
#   quant        QZO on an NF4 model (bitsandbytes) on CUDA: codes untouched, CPU vs CUDA logits (in the log);
#                when bitsandbytes is not importable the part says so and passes without running
#   finetune     zo-finetune on CUDA (MeZO, MeZO-SVRG, LOZO, FO-SGD) on a
#                synthetic task with a MiniLM-shaped random model (scripts/synthetic_task.py)
# Writes OUTDIR/gpu_check.log (everything), OUTDIR/summary.json (per part: status, exit code, seconds,
# limit, test counts and failing ids), OUTDIR/bench/{bench_noise,bench_step_cuda}.{csv,png} and
# OUTDIR/finetune/{results.json,curves.png}: 8 files, the most the device tool brings back.
# Exit status: 0 when every part passed.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

say() { echo "$@" | tee -a "$LOG"; }
calc() { awk "BEGIN { print ($*) }"; }   # float arithmetic (bc is not on every image)
elapsed() { calc "$EPOCHREALTIME - $T0"; }
seconds() { calc "int($1 * 10 + 0.5) / 10"; }

# init OUTDIR DRY: the run's globals, the output folder, the scratch folder.
init() {
    OUTDIR=$1 DRY=$2
    mkdir -p "$OUTDIR/bench" "$OUTDIR/finetune" || return 2
    OUTDIR=$(cd "$OUTDIR" && pwd)
    PY=${PYTHON:-python3}
    BUDGET=${GPU_CHECK_BUDGET:-480}
    LOG=$OUTDIR/gpu_check.log
    # Scratch outside OUTDIR: the device tool brings back at most 8 files.
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
    PARTS=$WORK/parts.tsv
    JUNIT=$WORK/junit
    mkdir -p "$JUNIT"
    : > "$LOG"
    : > "$PARTS"
    T0=$EPOCHREALTIME
    cd "$ROOT" || return 2
    export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
    say "gpu_check: $(date -u +%FT%TZ), $(git rev-parse --short HEAD 2>/dev/null || echo no-git), dry run: $DRY," \
        "budget $BUDGET s, out $OUTDIR"
}

# part NAME LIMIT_S PYTHON_ARGV... : run `$PY PYTHON_ARGV...` (in a dry run: up to its first CUDA call)
# under min(limit, what is left of the budget), log it, record one row of PARTS.
part() {
    local name=$1 limit=$2
    shift 2
    local var="GPU_CHECK_LIMIT_${name^^}"
    limit=${!var:-$(calc "$limit * ${GPU_CHECK_LIMIT_SCALE:-1}")}
    local left
    left=$(calc "$BUDGET - $(elapsed) - 15")   # 15 s kept for the summary
    if [ "$(calc "$left < 5")" = 1 ]; then
        say "=== $name: skipped, the ${BUDGET} s budget is spent"
        printf '%s\tskipped\t\t0\t%s\t%s\n' "$name" "$limit" "$*" >> "$PARTS"
        return
    fi
    [ "$(calc "$limit > $left")" = 1 ] && limit=$(seconds "$left")
    local cmd=("$PY" "$@")
    [ "$DRY" = 1 ] && cmd=("$PY" scripts/gpu_check_tools.py dry-run "$@")
    say "=== $name (limit ${limit} s, at $(seconds "$(elapsed)") s): ${cmd[*]}"
    local t1=$EPOCHREALTIME rc status took
    timeout -k 10 "$limit" "${cmd[@]}" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    case $rc in 0) status=pass ;; 124|137) status=timeout ;; *) status=fail ;; esac
    took=$(seconds "$(calc "$EPOCHREALTIME - $t1")")
    say "=== $name: $status (exit $rc) in $took s"
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$took" "$limit" "${cmd[*]}" >> "$PARTS"
}

# A pytest part: in a dry run the selection is collected (an empty one fails: the check has rotted).
pytest_part() {
    local name=$1 limit=$2
    shift 2
    local args=(-m pytest -q -p no:cacheprovider --junitxml="$JUNIT/$name.xml" "$@")
    if [ "$DRY" = 1 ]; then
        DRY=0 part "$name" "$limit" "${args[@]}" --collect-only
    else
        part "$name" "$limit" "${args[@]}"
    fi
}

# finish: summary.json from PARTS, scratch removed; returns 0 when every part passed.
finish() {
    local args=("$PARTS" "$WORK/env.json" "$JUNIT" "$OUTDIR/summary.json" --budget "$BUDGET" --total "$(elapsed)")
    [ "$DRY" = 1 ] && args+=(--dry-run)
    "$PY" scripts/gpu_check_tools.py summary "${args[@]}" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    rm -rf "$WORK"
    return "$rc"
}

# The parts, in order (see the header).
check_parts() {
    local xdist=() cuda_files gpu_files shape
    part env 30 scripts/gpu_check_tools.py env "$WORK/env.json"

    # The build: against the machine's torch, nothing fetched; a failed build fails this part.
    if [ "$DRY" = 1 ]; then
        # setup.py's decisions (CUDA or not, the architectures) without compiling.
        DRY=0 part build 150 setup.py --name
    else
        # torch takes CUDA_HOME from nvcc's location; a wrapper script on PATH (/usr/local/bin/nvcc) would
        # point it at a folder without the CUDA headers.  /usr/local/cuda is torch's own last resort.
        [ -z "${CUDA_HOME:-}" ] && [ -f /usr/local/cuda/include/cuda_runtime_api.h ] && export CUDA_HOME=/usr/local/cuda
        MAX_JOBS=${MAX_JOBS:-$(nproc)} ZO_KERNELS_REQUIRE_NATIVE=1 \
            part build 150 -m pip install -v --no-build-isolation --no-deps --no-index -e .
    fi

    # xdist spreads Triton's first compiles over processes where it is installed.
    [ "$DRY" = 0 ] && "$PY" -c "import xdist" 2>/dev/null && xdist=(-n 8)
    # Files with tests marked cuda: directly, or through optim_helpers.gpu_backends (the optimizers' GPU runs).
    mapfile -t cuda_files < <(grep -lE 'mark\.cuda|gpu_backends\(' tests/test_*.py)
    pytest_part pytest_cuda 75 "${xdist[@]}" -m cuda "${cuda_files[@]}"
    # Test files that switch to CUDA when a GPU is present (DEVICE = "cuda"), beyond the tests marked cuda.
    mapfile -t gpu_files < <(grep -l 'torch.cuda.is_available()' tests/test_*.py)
    pytest_part pytest_gpu 75 "${xdist[@]}" -m "not cuda" "${gpu_files[@]}"

    # Gaussian and ±1 (noise="rademacher") rows of every backend (speedup_vs_gaussian in the CSV).
    part bench_noise 60 benchmarks/bench_noise.py --device cuda --sizes 1e6,1e7,1e8 --dtypes float32,bfloat16 \
        --keys 1,4 --noise gaussian,rademacher --out "$OUTDIR/bench"
    # The low-rank (LOZO) pass per rank against the full-rank pass and u @ v.t(): its table goes to the log;
    # its CSV/PNG stay in scratch (the device tool brings back 8 files, all taken above and below).
    part bench_lowrank 30 benchmarks/bench_noise.py --lowrank --device cuda --shapes 4096x4096,8192x8192 \
        --dtypes float32,bfloat16 --out "$WORK/bench_lowrank"
    part bench_step 50 benchmarks/bench_step.py --device cuda --models opt-125m,opt-1.3b --repeats 5 \
        --out "$OUTDIR/bench"

    part seedlog 20 scripts/gpu_check_tools.py seedlog

    if "$PY" -c "import os; os.environ.setdefault('HF_HUB_OFFLINE', '1'); import bitsandbytes" >/dev/null 2>&1; then
        part quant 60 scripts/gpu_check_tools.py quant
    else
        DRY=0 part quant 30 -c "print('quant: bitsandbytes is not importable here: the NF4 path was not run on CUDA')"
    fi

    # zo-finetune on a synthetic task (scripts/synthetic_task.py; a tiny model in a dry run): the default
    # model and data packages are not on the lent machine.
    # The split is explicit: the synthetic task has 1,200 rows, fewer than zo-finetune's default split needs.
    shape=minilm
    [ "$DRY" = 1 ] && shape=tiny
    part finetune 100 scripts/gpu_check_tools.py finetune "$WORK/task" --shape "$shape" \
        --want mezo,mezo-svrg,lozo,fo-sgd -- --device cuda --n-train 512 --n-val 256 --n-test 256 \
        --memory-steps 2 --no-progress --out "$OUTDIR/finetune"
}

main() {
    local dry=0 outdir="" arg
    for arg in "$@"; do
        case "$arg" in
            --dry-run) dry=1 ;;
            -h|--help) sed -n '2,/^set /p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; return 0 ;;
            -*) echo "gpu_check.sh: unknown option $arg (see --help)" >&2; return 2 ;;
            *) [ -z "$outdir" ] || { echo "gpu_check.sh: one output folder, got $outdir and $arg" >&2; return 2; }
               outdir=$arg ;;
        esac
    done
    init "${outdir:-${OUT:-$ROOT/runs/gpu_check}}" "$dry" || return 2
    check_parts
    finish
}

# Sourced (tests), only the functions are defined.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    main "$@"
fi
