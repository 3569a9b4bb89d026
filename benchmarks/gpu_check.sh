#!/usr/bin/env bash
# GPU check for consopt's fused SGD kernels: the kernel/fused tests on the GPU, then the step table.
# Meant for one H100 with torch + triton preinstalled (no pip registry needed):
#     bash benchmarks/gpu_check.sh [out_dir]
# Budget: < 5 minutes (tests ~2 min including Triton compilation, benchmark ~2 min; the
# symmetry-projection rows of the benchmark time 10 steps per model and run after every step row).
# The benchmark prints each row as it is measured and appends it to bench_step_gpu.jsonl, so a
# timeout keeps the rows already measured.
set -u
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-benchmarks}}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export CONSOPT_TEST_GPU=1          # tests/conftest.py then leaves TRITON_INTERPRET unset
unset TRITON_INTERPRET

"$PY" - <<'PYEOF'
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NONE")
PYEOF

t0=$(date +%s)
timeout 200 "$PY" -m pytest tests/test_kernels.py tests/test_fused.py tests/test_sgd_fused.py \
    tests/test_projection_kernels.py -q -x -p no:cacheprovider \
    2>&1 | tee "$OUT/gpu_tests.log" | tail -25
test_rc=${PIPESTATUS[0]}
echo "tests: exit $test_rc in $(( $(date +%s) - t0 )) s"

# the Lyapunov solves' eigendecompositions: torch's CUDA eigh against consopt.projection._eigh
# (the host's LAPACK for batches of r > 32) on GPT-2's 288 heads of 64 (float64)
timeout 60 "$PY" - <<'PYEOF' 2>&1 | tee "$OUT/eigh_gpu.txt"
import time, torch
from consopt.projection import _eigh
for n, r in ((288, 64), (288, 32)):
    W = torch.randn(n, r, 3 * r, dtype=torch.float64, device="cuda")
    S = W @ W.mT
    for name, fn in (("torch.linalg.eigh (cuda)", torch.linalg.eigh), ("consopt _eigh", _eigh)):
        fn(S); torch.cuda.synchronize()
        t = time.perf_counter(); fn(S); torch.cuda.synchronize()
        print(f"eigh [{n}, {r}, {r}] {name}: {(time.perf_counter() - t) * 1e3:.1f} ms")
PYEOF

t1=$(date +%s)
timeout 240 "$PY" benchmarks/bench_step.py --json "$OUT/bench_step_gpu.json" 2>&1 | tee "$OUT/bench_step_gpu.txt"
bench_rc=${PIPESTATUS[0]}
echo "benchmark: exit $bench_rc in $(( $(date +%s) - t1 )) s"
exit $(( test_rc != 0 || bench_rc != 0 ))
