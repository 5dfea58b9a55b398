#!/usr/bin/env bash
# Everything a lent GPU machine should run, in one call, with logs under $OUT
# (the device tool brings $OUT back) and a short summary printed last.
#
#   bash benchmarks/gpu_session.sh [STAGE ...]  (default: info build cuda bench demo graph)
#
# Stages, in the order given:
#   info    GPU, driver, nvcc, Python packages
#   build   pip install --no-build-isolation --no-deps . for this GPU's architecture
#           (CUDAARCHS=native unless set; CMake, nvcc; ~1 min on 16 cores)
#   cuda    pytest -m cuda: every GPU test (CPU vs GPU per op, models, trainer, viz, CLI)
#   bench   fastcnn bench --device cuda: GEMM, conv, ops, training step vs PyTorch + cuDNN,
#           TF32 off then on (JSON + Markdown for benchmarks/RESULTS.md); then
#           benchmarks/host_overhead.py, the eager step's Python side on this host
#   demo    fastcnn demo --device cuda, $DEMO_EPOCHS epochs (default 2; 15 is the full run)
#   graph   the same with --cuda-graph (each training step a replayed CUDA graph)
#   suite   the whole test suite (CPU and GPU tests)
#   memcheck compute-sanitizer memcheck on the GPU tests of tests/test_cuda.py
#   profile Nsight Compute on our SGEMM (4096^3, SIMT and TF32) and a training step's
#           GEMMs: speed of light, occupancy, launch statistics (for tuning)
#
# The demo needs Fashion-MNIST, which the device machine lacks: copy it into the
# repository's ignored build folder here and carry it, e.g. with the device tool
#   mkdir -p build/device-data && cp /usr/share/datasets/fashion-mnist/*.gz build/device-data/
#   run(command="bash benchmarks/gpu_session.sh", carry=["build/device-data"], timeout_s=590)
# Every stage has its own time limit, cut to what is left of $GPU_BUDGET_S
# (default 570 s, under the device tool's 590 s call) so that the summary is
# written and the logs come back within one call; a stage with under 20 s left
# is skipped (and says so).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fastcnn-gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(info build cuda bench demo graph)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

note() { echo "$*" | tee -a "$SUMMARY"; }

BUDGET=${GPU_BUDGET_S:-570}

# stage NAME LIMIT_S COMMAND...: runs the command with a time limit (at most
# what is left of the budget), log in $OUT/NAME.log
stage() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - SECONDS - 10))
  if [ "$left" -lt 20 ]; then
    note "$name: skipped, ${left} s of the ${BUDGET} s budget left"
    echo "not run (budget)" > "$OUT/$name.log"
    return 124
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local began=$SECONDS
  echo "=== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  note "$name: exit $rc in $((SECONDS - began)) s"
  return $rc
}

for s in "${STAGES[@]}"; do
  case $s in
    info)
      {
        date -u
        git rev-parse HEAD 2>/dev/null || echo "commit unknown"
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
        nvcc --version | tail -2
        nproc
        $PY -c "import sys, numpy, cupy, torch; print(sys.version); print('numpy', numpy.__version__, 'cupy', cupy.__version__, 'torch', torch.__version__, 'cudnn', torch.backends.cudnn.version())"
      } > "$OUT/info.log" 2>&1
      head -12 "$OUT/info.log" | tee -a "$SUMMARY"
      ;;
    build)
      export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
      # This GPU's architecture only (the default 80 + 90 + PTX build is CI's,
      # compiled everywhere nvcc is): a third of nvcc's work, on device time.
      export CUDAARCHS=${CUDAARCHS:-native}
      if ! stage build 420 $PY -m pip install --no-build-isolation --no-deps -v .; then
        grep -n -i -E "error|fatal" "$OUT/build.log" | head -40 | tee -a "$SUMMARY"
        tail -20 "$OUT/build.log"
        exit 1
      fi
      $PY -m fastcnn.cli info 2>&1 | tee -a "$SUMMARY"
      ;;
    cuda)
      stage cuda 300 $PY -m pytest -q -m cuda -rfE -p no:cacheprovider tests
      grep -E "passed|failed|error|skipped" "$OUT/cuda.log" | tail -3 | tee -a "$SUMMARY"
      grep -E "^(FAILED|ERROR)" "$OUT/cuda.log" | head -40 | tee -a "$SUMMARY"
      ;;
    bench)
      stage bench 330 $PY -m fastcnn.cli bench --device cuda --json "$OUT/bench_cuda.json" \
        --markdown "$OUT/bench_cuda.md"
      grep -E "vs cuBLAS|vs cuDNN|train step|inference" "$OUT/bench.log" | tee -a "$SUMMARY"
      tail -3 "$OUT/bench.log" | grep -i -E "error|Traceback" | tee -a "$SUMMARY"
      # The Python side of the eager step on this host (fake CuPy, no kernels):
      # the eager row minus this is CuPy's, the bindings' and the launches' share.
      timeout 60 $PY benchmarks/host_overhead.py 2>&1 | tail -1 | tee -a "$SUMMARY"
      ;;
    demo|graph)
      export FASTCNN_DATA=${FASTCNN_DATA:-$PWD/build/device-data}
      extra=()
      [ "$s" = graph ] && extra=(--cuda-graph)
      stage "$s" 420 $PY -m fastcnn.cli demo --device cuda --epochs "${DEMO_EPOCHS:-2}" \
        --no-progress --out "$OUT/$s" "${extra[@]}"
      grep -E "^epoch|test accuracy|error" "$OUT/$s.log" | tail -20 | tee -a "$SUMMARY"
      ;;
    profile)
      cat > "$OUT/profile_case.py" <<'PYEOF'
import cupy as cp
import numpy as np
import fastcnn.cuda
from fastcnn import _cuda, models, nn, optim

a, b = (cp.asarray(np.random.default_rng(i).standard_normal((4096, 4096), np.float32))
        for i in (0, 1))
c = cp.empty((4096, 4096), cp.float32)
for tf32 in (False, True):
    fastcnn.cuda.set_allow_tf32(tf32)
    _cuda.sgemm(False, False, 1.0, a, b, 0.0, c)
fastcnn.cuda.set_allow_tf32(False)
model = models.mnist_cnn().to("cuda")
loss_fn, opt = nn.CrossEntropyLoss(), optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
x = cp.asarray(np.random.default_rng(2).standard_normal((256, 1, 28, 28), np.float32))
y = cp.asarray(np.random.default_rng(3).integers(0, 10, 256))
loss_fn(model(x), y)
model.backward(loss_fn.backward(), input_grad=False)
opt.step()
cp.cuda.runtime.deviceSynchronize()
PYEOF
      stage profile 300 ncu --kernel-name regex:GemmBody --launch-count 12 \
        --section SpeedOfLight --section Occupancy --section LaunchStats \
        $PY "$OUT/profile_case.py"
      grep -E "GemmBody|Duration|Compute \(SM\) Throughput|Memory Throughput|Achieved Occupancy|Registers Per" \
        "$OUT/profile.log" | head -60 | tee -a "$SUMMARY"
      ;;
    memcheck)
      # compute-sanitizer on the GPU tests of test_cuda.py (as many as the limit
      # allows): out-of-bounds and misaligned device accesses, which the
      # emulator's ASan run (.ci/sanitize) sees only in host memory
      stage memcheck 300 compute-sanitizer --tool memcheck --error-exitcode 3 \
        $PY -m pytest -q -x -m cuda -p no:cacheprovider tests/test_cuda.py
      grep -E "ERROR SUMMARY|Invalid|passed|failed" "$OUT/memcheck.log" | head -20 | tee -a "$SUMMARY"
      ;;
    suite)
      stage suite 420 $PY -m pytest -q -rfE -p no:cacheprovider tests
      grep -E "passed|failed|error|skipped" "$OUT/suite.log" | tail -3 | tee -a "$SUMMARY"
      grep -E "^(FAILED|ERROR)" "$OUT/suite.log" | head -40 | tee -a "$SUMMARY"
      ;;
    *)
      echo "unknown stage '$s' (info build cuda bench demo graph suite memcheck profile)" >&2
      exit 2
      ;;
  esac
done

echo
echo "===== summary ($SUMMARY)"
cat "$SUMMARY"
