"""CPU benchmark of the projection mode: consopt.SGD(projection="symmetry") against the tracked
step, with real gradients (forward and backward on a fixed random batch, not timed).

Variants, each on its own copy of the model, interleaved per repetition (median of the step time):

  torch      torch.optim.SGD(momentum=0.9, foreach=True).step()
  tracked    consopt.SGD(..., laws=laws).step(); opt.deviation()   (the native CPU default)
  symmetry   consopt.SGD(..., laws=laws, projection="symmetry").step(); opt.deviation()
             (consopt.projection.TensorProjector: native statistics per colour, batched actions,
             one native apply pass per tensor, over-relaxed Gauss–Seidel rounds)
  reference  the same projected step through `consopt.projection.project` (per-family torch
             code, plain Gauss–Seidel: the path before TensorProjector), `--ref-reps` steps

Models and laws as in bench_cpu.py (ResNet-18 CIFAR, Transformer 4x256); float32; lr 0.05.

    python benchmarks/bench_projection_cpu.py [--reps 15] [--ref-reps 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_cpu as B  # noqa: E402

import consopt  # noqa: E402
from consopt import projection as P  # noqa: E402


def batch(name, gen):
    if name == "resnet18":
        return torch.randn(8, 3, 32, 32, generator=gen), torch.randint(0, 10, (8,), generator=gen)
    return torch.randint(0, 1000, (8, 16), generator=gen), torch.randint(0, 10, (8,), generator=gen)


def bench_model(name, reps, warmup, ref_reps, lr=0.05):
    torch.manual_seed(0)
    base, inputs = B.make(name)
    base.train()
    laws, _, _ = B.get_laws(base, inputs)
    x, y = batch(name, torch.Generator().manual_seed(5))
    h0 = laws.evaluate(base)

    def make(kind):
        m = copy.deepcopy(base)
        lw = copy.deepcopy(laws).bind(m)
        if kind == "torch":
            return m, torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, foreach=True), lw
        opt = consopt.SGD(m.parameters(), lr=lr, momentum=0.9, foreach=True, laws=lw,
                          projection=None if kind == "tracked" else "symmetry")
        return m, opt, lw

    variants = {k: make(k) for k in ("torch", "tracked", "symmetry")}

    def grads(m):
        m.zero_grad(set_to_none=True)
        F.cross_entropy(m(x), y).backward()

    def run(k):
        m, opt, _ = variants[k]
        grads(m)
        t0 = time.perf_counter()
        opt.step()
        if k != "torch":
            opt.deviation()
        return time.perf_counter() - t0

    times = {k: [] for k in variants}
    rounds, relax = [], []
    order = list(variants)
    for r in range(warmup + reps):
        order = order[1:] + order[:1]
        for k in order:
            dt = run(k)
            if r >= warmup:
                times[k].append(dt)
                if k == "symmetry":
                    st = variants[k][1].projection_stats
                    rounds.append(st.rounds)
                    relax.append(st.relaxation)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}

    # the reference path (project(): per-family code), a few steps from the same start
    m, opt, lw = make("symmetry")
    ref_times, ref_rounds = [], []
    orig = opt._project

    def reference(values=None):
        tensors = opt._tracker.evaluator.tensors
        bufs = {n: opt.state[p]["momentum_buffer"] for n, p in tensors.items() if "momentum_buffer" in opt.state[p]}
        opt.projection_stats = P.project(opt.laws, tensors, opt._tracker.h0, "symmetry", buffers=bufs)
        return None

    opt._project = reference
    for r in range(ref_reps + 1):
        grads(m)
        t0 = time.perf_counter()
        opt.step()
        opt.deviation()
        if r > 0:  # the first step builds the momentum buffers
            ref_times.append(time.perf_counter() - t0)
            ref_rounds.append(opt.projection_stats.rounds)
    opt._project = orig
    med["reference"] = statistics.median(ref_times) * 1e3

    _, o_s, lw_s = variants["symmetry"]
    m_s = variants["symmetry"][0]
    vals, sc = lw_s.evaluate(m_s), lw_s.scale(m_s)
    worst = max(float(((vals[k] - h0[k]).abs() / sc[k].clamp_min(1e-300)).max()) for k in vals)
    m_t = variants["tracked"][0]
    lw_t = variants["tracked"][2]
    vt, st_ = lw_t.evaluate(m_t), lw_t.scale(m_t)
    drift = max(float(((vt[k] - h0[k]).abs() / st_[k].clamp_min(1e-300)).max()) for k in vt)
    return {
        "model": name,
        "families": len(laws),
        "median_ms": {k: round(v, 3) for k, v in med.items()},
        "ratio_symmetry_vs_tracked": round(med["symmetry"] / med["tracked"], 2),
        "ratio_symmetry_vs_torch": round(med["symmetry"] / med["torch"], 2),
        "ratio_reference_vs_tracked": round(med["reference"] / med["tracked"], 1),
        "speedup_symmetry_vs_reference": round(med["reference"] / med["symmetry"], 1),
        "rounds_median": statistics.median(rounds) if rounds else 0,
        "rounds_max": max(rounds) if rounds else 0,
        "reference_rounds_median": statistics.median(ref_rounds),
        "relaxation_last": round(relax[-1], 3) if relax else 1.0,
        "symmetry_max_dev_over_scale": worst,
        "tracked_max_drift_over_scale": drift,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,transformer")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--ref-reps", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, float32, momentum 0.9, lr 0.05, real gradients; median ms per step")
    print(f"{'model':<12}{'torch':>9}{'tracked':>9}{'symmetry':>10}{'sym/tracked':>12}{'reference':>11}"
          f"{'ref/sym':>9}{'rounds':>8}{'ref rounds':>11}{'ω':>7}{'max dev':>10}{'drift':>10}")
    out = []
    for name in args.models.split(","):
        r = bench_model(name, args.reps, args.warmup, args.ref_reps)
        out.append(r)
        t = r["median_ms"]
        print(f"{name:<12}{t['torch']:>9.2f}{t['tracked']:>9.2f}{t['symmetry']:>10.2f}"
              f"{r['ratio_symmetry_vs_tracked']:>11.2f}x{t['reference']:>11.1f}{r['speedup_symmetry_vs_reference']:>8.1f}x"
              f"{r['rounds_median']:>8}{r['reference_rounds_median']:>11}{r['relaxation_last']:>7.3f}"
              f"{r['symmetry_max_dev_over_scale']:>10.1e}{r['tracked_max_drift_over_scale']:>10.1e}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
