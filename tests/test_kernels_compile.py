"""The Triton kernels compile for an H100 (sm_90) through Triton's real compiler, without a GPU.

Everything else in the suite runs the kernels in the Triton interpreter, which skips the
compiler: `benchmarks/compile_check.py` records every launch configuration consopt's fused step
makes on small CPU models and compiles each to a cubin (ptxas ships with Triton). Under Triton
3.6 this caught float64 `tl.dot` Grams of bf16/fp16 parameters that its backend rejects.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_recorded_kernel_configuration_compiles_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "compile.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_check.py"), "--level", "smoke", "--arch",
                        "90", "--json", str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())["results"]
    assert res and all(x["ok"] for x in res)
    seen = {(x["kernel"], x["data"], tuple(x["flags"])) for x in res}
    kernels = {k for k, _, _ in seen}
    assert kernels == {"sgd_stats_kernel", "gram_kernel", "csr_sum_kernel", "symmetry_apply_kernel",
                       "matrix_apply_kernel"}
    # the paths that matter: update + row Gram for fp32 and for bf16 (read through 32-bit words)
    assert any(k == "sgd_stats_kernel" and d == "*fp32" and "GRAM_R" in f and "UPDATE" in f for k, d, f in seen)
    assert any(k == "sgd_stats_kernel" and d == "*i16" and {"GRAM_R", "HALF", "UPDATE"} <= set(f) for k, d, f in seen)
    assert any(k == "gram_kernel" and "HALF" in f for k, d, f in seen)
    # the lazy momentum transport inside the update, and the matrix actions' float64 tl.dot on
    # 16-bit buffers (read through 32-bit words too)
    assert any(k == "sgd_stats_kernel" and {"MSCALE", "UPDATE"} <= set(f) for k, d, f in seen)
    assert any(k == "matrix_apply_kernel" and {"HALF", "HAS_M"} <= set(f) for k, d, f in seen)
    assert all(x["cubin_bytes"] > 0 for x in res)
