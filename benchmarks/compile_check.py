"""Compile every Triton kernel configuration consopt launches, for a GPU target, without a GPU.

The Triton interpreter (what the CPU test suite runs) does not go through Triton's compiler, so
a kernel can pass every CPU test and still fail to compile on the GPU (an unsupported dtype in
`tl.dot`, a layout the backend rejects, an API that differs between Triton versions). This
script drives consopt's fused step, law statistics and projection on small CPU models with
`JITFunction.run` replaced by a recorder, then compiles each distinct (kernel, argument types,
constexprs, launch options, the JIT's alignment specializations) to a cubin with
`triton.compile(..., target=GPUTarget("cuda", cc, 32))`; ptxas ships with Triton, so no driver
or GPU is needed. For each it also reports ptxas's registers and spill bytes per thread and
the shared memory: the block sizes in triton_kernels/sgd_stats.py were chosen with it.

    python benchmarks/compile_check.py [--arch 90] [--level smoke|quick|full] [--json out.json]

Exit code 0 when every configuration compiles. Run it under each Triton version the GPU
machines use (the project's GPU machine has Triton 3.6; CI installs the newest).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("compile_check: unset TRITON_INTERPRET (the interpreter skips the compiler this checks)")

import torch
import triton
from torch import nn
from triton.runtime.jit import JITFunction

_TYPES = {torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16", torch.bfloat16: "bf16",
          torch.int8: "i8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8",
          torch.bool: "i1"}
_OPTIONS = ("num_warps", "num_stages", "num_ctas")


class Recorder:
    """Stands in for JITFunction.run: remembers each distinct launch configuration."""

    def __init__(self):
        self.configs = {}

    def __call__(self, fn, *args, grid=None, warmup=False, **kwargs):
        options = {k: kwargs.pop(k) for k in _OPTIONS if k in kwargs}
        sig, const, attrs = {}, {}, {}
        params = fn.params
        values = dict(zip([p.name for p in params], args))
        values.update(kwargs)
        for i, p in enumerate(params):
            v = values.get(p.name, p.default if hasattr(p, "default") else None)
            # what the JIT specializes on at launch: 16-byte aligned pointers, ints divisible by 16
            if (torch.is_tensor(v) and v.data_ptr() % 16 == 0) or (
                    isinstance(v, int) and not isinstance(v, bool) and not p.is_constexpr and v % 16 == 0):
                attrs[(i,)] = [["tt.divisibility", 16]]
            if p.is_constexpr or v is None:
                sig[p.name] = "constexpr"
                const[p.name] = v
            elif torch.is_tensor(v):
                sig[p.name] = "*" + _TYPES[v.dtype]
            elif isinstance(v, bool):
                sig[p.name] = "i1"
            elif isinstance(v, int):
                sig[p.name] = "i32" if -(2 ** 31) <= v < 2 ** 31 else "i64"
            elif isinstance(v, float):
                sig[p.name] = "fp32"
            else:
                raise TypeError(f"{fn.__name__}: cannot type argument {p.name}={v!r}")
        key = (fn.__name__, tuple(sorted(sig.items())), tuple(sorted((k, repr(v)) for k, v in const.items())),
               tuple(sorted(options.items())), tuple(sorted(attrs)))
        self.configs.setdefault(key, (fn, sig, const, options, attrs))
        return None


def _models():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    conv = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 3))
    attn = nn.MultiheadAttention(8, 2, batch_first=True)
    wide = nn.Sequential(nn.Linear(6, 80), nn.Linear(80, 70), nn.ReLU(), nn.Linear(70, 3))  # Gram > 64 units
    return [("mlp", mlp, (torch.randn(4, 5),)), ("conv", conv, (torch.randn(2, 3, 7, 7),)),
            ("attn", attn, (torch.randn(2, 3, 8),) * 3), ("wide", wide, (torch.randn(4, 6),))]


def drive(level: str) -> None:
    """Run consopt's fused paths on CPU tensors (every launch is recorded, none executed).

    smoke: fp32 and bf16, momentum only (one configuration of each kernel path, the test suite's
    check); quick: + no momentum; full: fp32/bf16/fp16/fp64 and four hyperparameter sets."""
    import consopt
    from consopt.fused import FlatGroup, compile_laws, fused_sgd_step, law_values_only

    full = level == "full"
    dtypes = [torch.float32, torch.bfloat16] + ([torch.float16, torch.float64] if full else [])
    hypers = [dict(momentum=0.9)] + ([dict(momentum=0.0)] if level != "smoke" else []) + (
        [dict(momentum=0.9, nesterov=True, weight_decay=1e-4),
         dict(momentum=0.9, dampening=0.1, maximize=True, weight_decay=1e-4)] if full else [])
    for name, model, inputs in _models():
        model.train()
        laws = consopt.find_laws(model, inputs)
        for dtype in dtypes:
            m = model.to(dtype)
            params = dict(m.named_parameters())
            for p in params.values():
                p.grad = torch.randn_like(p)
            group = FlatGroup(list(params.values()))
            compiled = compile_laws(laws, params, [group])
            law_values_only(compiled)
            for h in hypers:
                fused_sgd_step(group, 0.01, compiled_laws=compiled, **h)
            if level != "smoke":
                fused_sgd_step(group, torch.tensor(0.01), momentum=0.9, compiled_laws=compiled,
                               grad_scale=torch.tensor(2.0), found_inf=torch.tensor(0.0))
            fused_sgd_step(group, 0.01, momentum=0.9)  # no laws: plain tables
            _drive_folded(group, compiled)
            _drive_owed(group, compiled)
        model.float()
    _drive_projection(dtypes)


def _drive_folded(group, compiled) -> None:
    """The statistics launches with the projection's SCALE prologue (a colour's apply folded into
    the next measurement, `FlatProjector._apply_folded`), on every tile variant of the step tables."""
    from triton_kernels import sgd_stats as K

    F = torch.ones(1, dtype=torch.float64)
    for bi, b in enumerate(group.buffers):
        fseg = torch.zeros((max(len(b.segs), 1), 9), dtype=torch.int64)
        fseg[:, [2, 3, 6, 7, 8]] = 1
        for (bx, by, vec, gr, gc, ca, al), table in compiled.step_tables(0, bi):
            K.launch_sgd_stats(b.param, None, b.mom, table, None, None, compiled.scratch, block=(bx, by), vec=vec,
                               gram_r=gr, gram_c=gc, colacc=ca, aligned=al, stats=True, update=False,
                               scale=(F, fseg))


def _drive_owed(group, compiled) -> None:
    """Update launches that apply a lazy projection's owed momentum transport as they load the
    buffer (MSCALE, `consopt.fused.MomentumTransport`), on every tile variant of the step tables."""
    from consopt.fused import MomentumTransport, fused_sgd_step

    for b in group.buffers:
        fseg = torch.zeros((max(len(b.segs), 1), 9), dtype=torch.int64)
        fseg[:, [2, 3, 6, 7, 8]] = 1
        b.transport = MomentumTransport(torch.ones(1, dtype=torch.float64), fseg, torch.zeros((0, 16), dtype=torch.int64),
                                        [(0, 1)] * len(b.segs), False)  # (every segment owed)
        b.transport.dirty = True
    fused_sgd_step(group, 0.01, momentum=0.9, compiled_laws=compiled)
    for b in group.buffers:
        b.transport = None


def _drive_projection(dtypes) -> None:
    """The symmetry projection's apply kernel (rescale only, and rescale + translation shift) and
    its matrix kernel (head sizes 64, 32 and one below 16, with and without momentum)."""
    from triton_kernels.project import ACOL, launch_matrix_apply, launch_symmetry_apply, matrix_rows, plan_tiles

    for dtype in dtypes:
        p, m = torch.randn(4096).to(dtype), torch.randn(4096).to(dtype)
        F = torch.ones(64, dtype=torch.float64)
        table = torch.from_numpy(plan_tiles([[0, 4096, 1, 1, 64, 64, 0, 0, 1, 1, 0, 0, 64, 1]]))
        assert table.shape[1] == ACOL
        launch_symmetry_apply(p, m, F, table)
        launch_symmetry_apply(p, None, F, table, coef=torch.zeros(65, dtype=torch.float64),
                              rowtab=torch.zeros(128, dtype=torch.int64), shift=torch.zeros(64, dtype=torch.float64))
        for r in (64, 32, 5):  # (R = 64, 32, 16; one slice of r columns × 64 rows: inside p's 4096)
            mats = torch.eye(r, dtype=torch.float64).expand(2, r, r)
            tab = torch.tensor(matrix_rows([0], [1], r, 1, 64, 64), dtype=torch.int64)
            launch_matrix_apply(p, m, mats, tab, r)
            launch_matrix_apply(p, None, mats, tab, r)


def ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers per thread and spill bytes per thread, from the bundled ptxas (-v)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        tool = get_ptxas(arch)
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(ptx)
        sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        r = subprocess.run([tool.path, f"-arch={sm}", "-v", f.name, "-o", os.devnull], capture_output=True,
                           text=True, timeout=300)
        os.unlink(f.name)
        log = r.stdout + r.stderr
        regs = re.search(r"Used (\d+) registers", log)
        spill = re.search(r"(\d+) bytes spill stores", log)
        return {"registers": int(regs.group(1)) if regs else None, "spill_bytes": int(spill.group(1)) if spill else None}
    except Exception as e:  # noqa: BLE001 - usage is informative only
        return {"registers": None, "spill_bytes": None, "ptxas_error": f"{type(e).__name__}: {e}"[:200]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90 = H100)")
    ap.add_argument("--level", choices=("smoke", "quick", "full"), default="full",
                    help="how many dtypes / hyperparameter sets to drive (see drive())")
    ap.add_argument("--json", help="write the per-configuration results here")
    args = ap.parse_args(argv)

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    rec = Recorder()
    original = JITFunction.run
    JITFunction.run = lambda self, *a, **k: rec(self, *a, **k)
    try:
        drive(args.level)
    finally:
        JITFunction.run = original
    target = GPUTarget("cuda", args.arch, 32)
    results, failed = [], 0
    t_all = time.perf_counter()
    for (kname, *_), (fn, sig, constexprs, options, attrs) in sorted(rec.configs.items(), key=lambda kv: kv[0][0]):
        t0 = time.perf_counter()
        try:
            k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs), target=target,
                               options=options or None)
            ok, err, size = True, "", len(k.asm.get("cubin", b""))
            usage = ptxas_usage(k.asm["ptx"], args.arch)
            usage["shared_bytes"] = getattr(k.metadata, "shared", None)
        except Exception as e:  # noqa: BLE001 - report every failing configuration
            ok, err, size = False, f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}", 0
            usage = {}
            failed += 1
        flags = {k_: v for k_, v in constexprs.items() if isinstance(v, bool) and v}
        data = next((t for t in sig.values() if t.startswith("*")), "")  # the first pointer: the buffer
        results.append(dict(kernel=kname, data=data, ok=ok, seconds=round(time.perf_counter() - t0, 2),
                            cubin_bytes=size, flags=sorted(flags), options=options, error=err, **usage))
        use = (f"regs {usage.get('registers')} spill {usage.get('spill_bytes')} smem {usage.get('shared_bytes')}"
               if ok else "")
        print(f"{'ok  ' if ok else 'FAIL'} {kname:18s} {data:6s} {results[-1]['seconds']:6.2f}s  {use:32s} "
              f"{' '.join(sorted(flags))}"
              + (f"\n     {err}" if err else ""), flush=True)
    print(f"triton {triton.__version__}, torch {torch.__version__}, sm_{args.arch}: {len(results) - failed}/{len(results)} "
          f"configurations compiled in {time.perf_counter() - t_all:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(triton=triton.__version__, arch=args.arch, results=results), f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
