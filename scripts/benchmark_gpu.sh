#!/usr/bin/env bash
# Issue 6's accelerator figures: UMD-B/4 at 64x64, batch 256 on one GPU, bfloat16 matmuls,
# no scan, no remat; each variant in a process of its own (one failing leaves the others).
#
#   bash scripts/benchmark_gpu.sh OUT_DIR [VARIANT ...]
#
# Variants: xla (XLA attention, float32 residual stream: the config's own), cudnn (cuDNN's
# fused attention), cudnn_bf16 (and a bfloat16 residual stream), xla_bf16, profile
# (cudnn_bf16 with a profile of 3 steps), cublaslt (cudnn_bf16 with XLA's cuBLASLt
# epilogue fusion), notriton (cudnn_bf16, cuBLAS for every matmul), b512, b1024 and
# b512_cublaslt (batch 512 or 1024 on the one GPU; 1024 needs more than 80 GB),
# elementwise, b512_elementwise and b1024_elementwise (cudnn_bf16 with remat=elementwise:
# GELU's output, fc2's input, recomputed in the backward pass), autodiff (cudnn_bf16 with
# JAX's autodiff for GELU's, the LayerNorms' and the softmax's backward passes, as before
# the hand-written ones: compare with cudnn_bf16), nn_dense
# (cudnn_bf16 with nn.Dense's 3-D dots instead of TokenDense's flat matmuls), compare
# (the --compare table: straightforward objective, nn.Dense, scan, remat, each timed in
# turns with the config's step), ablate (cudnn_bf16 with --ablate: the wall time of the
# attention core, GELU, the LayerNorms' statistics and AdamW, each replaced by a cheap
# stand-in), pallas, b512_pallas and b1024_pallas (cudnn_bf16 with backward_kernels=pallas:
# the LayerNorms' and gated residuals' backward passes as Pallas kernels; compare with
# cudnn_bf16, b512, b1024), profile_pallas (pallas with a profile of 3 steps), triton_any
# (cudnn_bf16 with XLA's Triton GEMMs for every matmul, --xla_gpu_triton_gemm_any: can they
# take the elementwise work around them?). Default: the first four; table prints only the
# table.
# Each writes OUT_DIR/NAME.json and its log to LOG_DIR/NAME.log (default OUT_DIR); a
# table of all of them is printed last.
# Synthetic batches: imagenet2012 need not be prepared (the input figure is then skipped).
# PYTHON= names the interpreter (default: .venv/bin/python if there is one, else python3,
# as on a bare GPU machine with JAX installed).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
out=${1:?usage: bash scripts/benchmark_gpu.sh OUT_DIR [VARIANT ...]}
shift
variants=("$@")
[ ${#variants[@]} -gt 0 ] || variants=(xla cudnn cudnn_bf16 xla_bf16)
python=${PYTHON:-}
if [ -z "$python" ]; then
  if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
logs=${LOG_DIR:-$out}
mkdir -p "$out" "$logs"
# Grow GPU memory on demand, so that the device's peak bytes in use are the step's own.
export XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
config=${BENCH_CONFIG:-configs/ae_i1k.py:variant=B/4,size=64,batch_size=256,dtype_mm=bfloat16}
common=(--evals=false --steps "${STEPS:-20}")

bench() {  # NAME CONFIG_SUFFIX [FLAGS...]
  local name=$1 suffix=$2
  shift 2
  echo "== $name: $config$suffix $*"
  timeout "${VARIANT_TIMEOUT:-400}" "$python" -m big_vision.tools.benchmark \
      --config "$config$suffix" "${common[@]}" --out "$out/$name.json" "$@" \
      > "$logs/$name.log" 2>&1
  echo "   exit $?"
  grep -E "^(train|sampling|profile|  )|Error|error:" "$logs/$name.log" | tail -n 40
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null
for v in "${variants[@]}"; do
  case $v in
    xla) bench xla ",attention=xla" --samples 256 ;;
    cudnn) bench cudnn ",attention=cudnn" --sampling=false ;;
    cudnn_bf16) bench cudnn_bf16 ",attention=cudnn,dtype_activations=bfloat16" --samples 256 ;;
    xla_bf16) bench xla_bf16 ",attention=xla,dtype_activations=bfloat16" --sampling=false ;;
    profile) bench profile ",attention=cudnn,dtype_activations=bfloat16" --sampling=false \
        --profile_steps 3 ;;
    cublaslt) XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_cublaslt=true" \
        bench cublaslt ",attention=cudnn,dtype_activations=bfloat16" --sampling=false ;;
    notriton) XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=false" \
        bench notriton ",attention=cudnn,dtype_activations=bfloat16" --sampling=false ;;
    b512) bench b512 ",attention=cudnn,dtype_activations=bfloat16,batch_size=512" \
        --sampling=false ;;
    b1024) bench b1024 ",attention=cudnn,dtype_activations=bfloat16,batch_size=1024" \
        --sampling=false ;;
    b512_cublaslt) XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_cublaslt=true" \
        bench b512_cublaslt ",attention=cudnn,dtype_activations=bfloat16,batch_size=512" \
        --sampling=false ;;
    elementwise) bench elementwise \
        ",attention=cudnn,dtype_activations=bfloat16,remat=elementwise" --sampling=false ;;
    b512_elementwise) bench b512_elementwise \
        ",attention=cudnn,dtype_activations=bfloat16,remat=elementwise,batch_size=512" \
        --sampling=false ;;
    b1024_elementwise) bench b1024_elementwise \
        ",attention=cudnn,dtype_activations=bfloat16,remat=elementwise,batch_size=1024" \
        --sampling=false ;;
    autodiff) bench autodiff ",attention=cudnn,dtype_activations=bfloat16,autodiff_backward=True" \
        --sampling=false ;;
    nn_dense) bench nn_dense ",attention=cudnn,dtype_activations=bfloat16,flat_dense=False" \
        --sampling=false ;;
    compare) bench compare ",attention=${COMPARE_ATTENTION:-cudnn},dtype_activations=${COMPARE_ACTIVATIONS:-bfloat16}" \
        --sampling=false --compare ;;
    ablate) bench ablate ",attention=cudnn,dtype_activations=bfloat16" --sampling=false \
        --ablate ;;
    pallas) bench pallas ",attention=cudnn,dtype_activations=bfloat16,backward_kernels=pallas" \
        --sampling=false ;;
    profile_pallas) bench profile_pallas \
        ",attention=cudnn,dtype_activations=bfloat16,backward_kernels=pallas" --sampling=false \
        --profile_steps 3 ;;
    b512_pallas) bench b512_pallas \
        ",attention=cudnn,dtype_activations=bfloat16,backward_kernels=pallas,batch_size=512" \
        --sampling=false ;;
    b1024_pallas) bench b1024_pallas \
        ",attention=cudnn,dtype_activations=bfloat16,backward_kernels=pallas,batch_size=1024" \
        --sampling=false ;;
    triton_any) XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_triton_gemm_any=true" \
        bench triton_any ",attention=cudnn,dtype_activations=bfloat16" --sampling=false ;;
    table) ;;  # Only the table of what OUT_DIR holds.
    *) echo "unknown variant $v; known: xla cudnn cudnn_bf16 xla_bf16 profile cublaslt" \
         "notriton b512 b1024 b512_cublaslt elementwise b512_elementwise" \
         "b1024_elementwise autodiff nn_dense compare ablate pallas b512_pallas" \
         "b1024_pallas profile_pallas triton_any table" >&2; exit 2 ;;
  esac
done

"$python" - "$out" <<'EOF'
import glob, json, os, sys
rows = []
pct = lambda x: "-" if x is None else f"{x:.1%}"
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
  r = json.load(open(path))
  name = os.path.basename(path)[:-5]
  t = r.get("train")
  if not t:  # The variant failed before timing its step (e.g. out of memory).
    rows.append((name, r.get("device", "-"), "failed: " + str(r.get("error", "?"))[:60]))
    continue
  s = r.get("sampling") or {}
  rows.append((name, r["device"], f"{t['images_per_s']:.0f}",
               f"{t['step_s'] * 1e3:.1f}", pct(t.get("fraction_of_peak_analytic")),
               pct(t.get("fraction_of_peak")),
               f"{t['peak_memory_bytes'] / 2**30:.1f}" if t.get("peak_memory_bytes") else "-",
               pct(t.get("fraction_of_measured_matmul")),
               f"{s['images_per_s']:.1f}" if s else "-",
               str(s.get("steps_in_one_program", "-"))))
head = ("variant", "device", "img/s", "step ms", "MFU analytic", "MFU XLA", "peak GiB",
        "of bf16 matmul", "DDIM img/s", "one program")
for row in [head] + rows:
  print(" | ".join(row))
EOF
