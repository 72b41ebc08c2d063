#!/usr/bin/env bash
# The prepared GPU check: everything a GPU shows that the CPU cannot, in one call of about 8
# minutes on one H100 or H200 (benchmarks/README.md, "device_check.sh").
#
#   benchmarks/device_check.sh --fetch-wheels   # here, with network: wheels into .whl/
#   benchmarks/device_check.sh                  # on the GPU machine (no network needed)
#   benchmarks/device_check.sh --dry-run        # on CPU: every stage, tiny shapes, no timing
#
# Stages, each under its own time limit, each recorded even when another fails:
#   kernel_tests  the kernel tests on CUDA (tf32 MMAs, approximate math, the wgmma tiles)
#   mhc_site      benchmarks/bench_mhc_site.py at C = 2560 and 7168, T = 16384: ours against
#                 eager, Liger-Kernel, the residual add and the memory floor
#   mhc_site_compile  the same at C = 2560 against torch.compile
#   step          benchmarks/bench_step.py at the 27B layer shape
#   experts       benchmarks/bench_experts.py: grouped-GEMM experts against SequentialMLP at the
#                 3B and 27B expert shapes
#   pretrain_*    20 bf16 steps of pretrain_mhc.py on one GPU (grouped-GEMM experts), mHC and
#                 the residual baseline
# Everything lands in $OUT (default out/device_check), eight files (the device tool brings back
# eight at most): device_check.json, the summary with the ratios (benchmarks/device_summary.py);
# each benchmark's JSON; environment.json; stages.jsonl; logs.tar.gz, every stage's log.
#
# The GPU machine has torch and Triton (other versions than ours) but no megatron-core or
# liger-kernel: they are installed from the wheels in $WHEELS (default .whl, about 3 MiB;
# --fetch-wheels downloads them) into a private folder on PYTHONPATH.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/out/device_check}"
WHEELS="${WHEELS:-$ROOT/.whl}"
DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    --fetch-wheels)
      PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
      "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$WHEELS" megatron-core==0.19.2 liger-kernel==0.8.5
      exit $? ;;
    -h|--help) sed -n '2,24p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "error: unknown argument '$arg' (use --dry-run, --fetch-wheels or --help)" >&2; exit 2 ;;
  esac
done
if [[ $DRY_RUN == 1 ]]; then
  PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
  [[ -x $PYTHON ]] || PYTHON=python3
else
  PYTHON="${PYTHON:-python3}"
fi
LOGS="$OUT/logs"
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1
# The GPU machine has no install of this package: the checkout itself is on the path.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
STAGES="$OUT/stages.jsonl"
: >"$STAGES"

if ! "$PYTHON" -c "import megatron.core, liger_kernel" 2>/dev/null; then
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    "$PYTHON" -c "import megatron.core" 2>/dev/null || echo "warning: no megatron-core and no" \
      "wheels in $WHEELS (benchmarks/device_check.sh --fetch-wheels): the step and training" \
      "stages will fail" >&2
  else
    SITE="${TMPDIR:-/tmp}/mhc_device_site"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$WHEELS"/*.whl || { echo "error: installing $WHEELS/*.whl failed" >&2; exit 1; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi

# stage NAME SECONDS COMMAND...: runs COMMAND with its output in $LOGS/NAME.log.
stage() {
  local name="$1" limit="$2"
  shift 2
  local start=$SECONDS
  echo "== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc in $((SECONDS - start))s"
  printf '{"stage": "%s", "rc": %d, "seconds": %d}\n' "$name" "$rc" "$((SECONDS - start))" >>"$STAGES"
}

# Shared flags of the two training runs: no TransformerEngine or Apex on the GPU machine.
TRAIN=(
  --transformer-impl local --no-persist-layer-norm --no-gradient-accumulation-fusion
  --no-masked-softmax-fusion --disable-bias-linear --no-bias-dropout-fusion --no-rope-fusion
  --no-bias-swiglu-fusion --position-embedding-type rope --normalization RMSNorm --swiglu
  --untie-embeddings-and-output-weights --moe-token-dispatcher-type alltoall
  --moe-aux-loss-coeff 1e-2 --moe-router-load-balancing-type aux_loss --lr 3e-4 --min-lr 3e-5
  --lr-decay-style cosine --lr-warmup-iters 1 --weight-decay 0.1 --clip-grad 1.0
  --init-method-std 0.02 --log-interval 1 --eval-iters 0 --eval-interval 1000 --mock-data
  --tokenizer-type NullTokenizer --attention-dropout 0.0 --hidden-dropout 0.0 --seed 1234
  --mhc-num-streams 4 --moe-grouped-gemm
)
if [[ $DRY_RUN == 1 ]]; then
  KERNEL_TESTS=(--collect-only)  # collected, not run: the interpreter would take minutes
  SITE_ARGS=(--device cpu --impls ours,eager,liger,residual --hidden 16 --tokens 32 --iters 1
    --warmup 0 --out "$OUT/mhc_site.json")
  STEP_ARGS=(--device cpu --configs residual,mhc_triton --iters 1 --warmup 0 --site-iters 1
    --out "$OUT/step.json")
  EXPERTS_ARGS=(--device cpu --shapes tiny --tokens 32 --iters 1 --warmup 0
    --out "$OUT/experts.json")
  TRAIN+=(--cpu --num-layers 2 --hidden-size 64 --num-attention-heads 4 --ffn-hidden-size 128
    --num-experts 4 --moe-router-topk 2 --moe-ffn-hidden-size 64 --seq-length 64
    --max-position-embeddings 64 --micro-batch-size 2 --global-batch-size 2 --train-iters 2
    --vocab-size 257 --mhc-backend torch)
  # torch.compile on CPU would take minutes, and ours ran in mhc_site: the stage's plumbing only.
  COMPILE_ARGS=(--device cpu --impls residual --hidden 16 --tokens 32 --iters 1 --warmup 0
    --out "$OUT/mhc_site_compile.json")
  LIMITS=(600 600 600 600 600 600)  # kernel tests, site, compile, step, each run, experts
else
  KERNEL_TESTS=()
  SITE_ARGS=(--hidden 2560 7168 --tokens 16384 --impls ours,eager,liger,residual --iters 20
    --warmup 5 --out "$OUT/mhc_site.json")
  # torch.compile compiles each op and the site per shape: its own stage, so that a slow compile
  # cannot cost the other numbers.
  COMPILE_ARGS=(--hidden 2560 --tokens 16384 --impls ours,compile,residual --iters 20 --warmup 5
    --out "$OUT/mhc_site_compile.json")
  STEP_ARGS=(--out "$OUT/step.json")
  EXPERTS_ARGS=(--iters 10 --warmup 2 --out "$OUT/experts.json")
  TRAIN+=(--bf16 --num-layers 8 --hidden-size 2048 --num-attention-heads 16
    --ffn-hidden-size 5632 --num-experts 16 --moe-router-topk 4 --moe-ffn-hidden-size 1024
    --seq-length 4096 --max-position-embeddings 4096 --micro-batch-size 1
    --global-batch-size 2 --train-iters 20 --vocab-size 32000 --mhc-backend triton)
  # 110 + 80 + 80 + 90 + 2 * 55 + 40 = 510 s at most: the whole check fits in 9 minutes.
  LIMITS=(110 80 80 90 55 40)
fi

"$PYTHON" - >"$OUT/environment.json" 2>&1 <<'EOF'
import json, platform, torch, triton
info = {"python": platform.python_version(), "torch": torch.__version__,
        "triton": triton.__version__, "cuda": torch.cuda.is_available()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info |= {"device": p.name, "sms": p.multi_processor_count, "memory_bytes": p.total_memory}
print(json.dumps(info))
EOF

# -o addopts=: pyproject's addopts name pytest-xdist, which the GPU machine does not have.
stage kernel_tests "${LIMITS[0]}" "$PYTHON" -m pytest -q -o addopts= -p no:cacheprovider \
  "${KERNEL_TESTS[@]}" \
  tests/kernels/test_kernels_mix.py tests/kernels/test_kernels_coefficients.py \
  tests/kernels/test_kernels_site.py \
  tests/kernels/test_kernels_chain.py
stage mhc_site "${LIMITS[1]}" "$PYTHON" benchmarks/bench_mhc_site.py "${SITE_ARGS[@]}"
stage mhc_site_compile "${LIMITS[2]}" "$PYTHON" benchmarks/bench_mhc_site.py "${COMPILE_ARGS[@]}"
stage step "${LIMITS[3]}" "$PYTHON" benchmarks/bench_step.py "${STEP_ARGS[@]}"
stage experts "${LIMITS[5]}" "$PYTHON" benchmarks/bench_experts.py "${EXPERTS_ARGS[@]}"
for variant in mhc residual; do
  PORT="$("$PYTHON" mhc_megatron/processes.py free-port)"
  stage "pretrain_$variant" "${LIMITS[4]}" "$PYTHON" -m torch.distributed.run --nproc-per-node 1 \
    --master-addr 127.0.0.1 --master-port "$PORT" pretrain_mhc.py "${TRAIN[@]}" \
    --mhc-variant "$variant"
done

"$PYTHON" benchmarks/device_summary.py "$OUT" --dry-run "$DRY_RUN"
status=$?
tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "$LOGS"
exit $status
