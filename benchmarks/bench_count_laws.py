"""Time count_laws (the numeric completeness certificate) over the papers' architecture families.

Linear networks of depth 2-4 and hidden widths 2-5, and two-layer ReLU networks of widths 2-9 with
and without biases (Marcotte, Gribonval, Peyré, NeurIPS 2023: their SageMath code took 41 s per
linear and 136 s per ReLU architecture on 64 threads). For each architecture the table shows the
number of parameters D, the count (D − dim Lie(W)), the closed-form count, find_laws' count, the
bracket depth reached, the singular-value gap of the rank decision and the seconds count_laws took
(after a warm-up; find_laws is timed separately).

    python benchmarks/bench_count_laws.py [--quick] [--json out.json] [--dims 3 3]

Closed forms. ReLU d-r-m: r (one rescale law per hidden unit; needs d ≥ 2). Linear: each hidden
layer i of width r_i contributes the Noether charge W̃_iW̃_iᵀ − W_{i+1}ᵀW_{i+1}, a symmetric r_i×r_i
matrix of rank ≤ k_i = (r_{i-1} + bias) + r_{i+1}, hence r_i(r_i+1)/2 functions when r_i ≤ k_i and
r_i k_i − k_i(k_i−1)/2 (the dimension of the symmetric matrices of rank ≤ k_i) otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings

import torch
import torch.nn as nn

import consopt
from consopt.lie import count_laws


def sym_count(r: int, k: int) -> int:
    return r * (r + 1) // 2 if r <= k else r * k - k * (k - 1) // 2


def linear_net(dims, bias):
    return nn.Sequential(*[nn.Linear(a, b, bias=bias) for a, b in zip(dims[:-1], dims[1:])])


def linear_theory(dims, bias) -> int:
    return sum(sym_count(dims[i], dims[i - 1] + int(bias) + dims[i + 1]) for i in range(1, len(dims) - 1))


def relu_net(d, r, m, bias):
    return nn.Sequential(nn.Linear(d, r, bias=bias), nn.ReLU(), nn.Linear(r, m, bias=bias))


def architectures(quick: bool, d: int, m: int, batch: int):
    x = torch.randn(batch, d)
    depths = (2, 3) if quick else (2, 3, 4)
    widths = (2, 4) if quick else (2, 3, 4, 5)
    for L in depths:
        for r in widths:
            dims = [d] + [r] * (L - 1) + [m]
            yield (f"linear {'-'.join(map(str, dims))}", "linear", lambda dims=dims: linear_net(dims, False), (x,),
                   linear_theory(dims, False))
    rw = (2, 5) if quick else range(2, 10)
    for bias in (False, True):
        for r in rw:
            yield (f"relu {d}-{r}-{m}{' +bias' if bias else ''}", "relu", lambda r=r, bias=bias: relu_net(d, r, m, bias),
                   (x,), r)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few architectures (smoke test)")
    ap.add_argument("--json", help="write the rows and machine info to this file")
    ap.add_argument("--dims", type=int, nargs=2, default=(3, 3), metavar=("IN", "OUT"))
    ap.add_argument("--batch", type=int, default=4, help="inputs per example batch")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    d, m = args.dims
    torch.manual_seed(args.seed)
    # warm-up: first calls load torch's forward-AD decompositions and build the nested transforms
    count_laws(linear_net([2, 2, 2, 2], False), (torch.randn(2, 2),), seed=args.seed)
    consopt.find_laws(nn.Linear(2, 2), (torch.randn(1, 2),))
    rows = []
    head = f"{'architecture':22s} {'D':>4s} {'count':>5s} {'theory':>6s} {'find_laws':>9s} {'depth':>5s} " \
           f"{'gap':>8s} {'count s':>8s} {'find s':>7s}  ok"
    print(head)
    print("-" * len(head))
    for name, family, make, inputs, theory in architectures(args.quick, d, m, args.batch):
        model = make().train()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t = time.perf_counter()
            res = count_laws(model, inputs, seed=args.seed)
            secs = time.perf_counter() - t
        t = time.perf_counter()
        laws = consopt.find_laws(model, inputs)
        fsecs = time.perf_counter() - t
        ok = res.count == theory == laws.num_functions and res.converged
        rows.append(dict(architecture=name, family=family, D=res.D, count=res.count, theory=theory,
                         find_laws=laws.num_functions, ranks=res.ranks, depth=len(res.ranks) - 1, gap=res.gap,
                         sigma_above=res.sigma_above, sigma_below=res.sigma_below, samples=res.samples,
                         brackets=sum(res.brackets), converged=res.converged, seconds=secs,
                         find_laws_seconds=fsecs, ok=ok, warnings=[str(w.message) for w in caught]))
        print(f"{name:22s} {res.D:4d} {res.count:5d} {theory:6d} {laws.num_functions:9d} {len(res.ranks) - 1:5d} "
              f"{res.gap:8.1e} {secs:8.2f} {fsecs:7.2f}  {'yes' if ok else 'NO'}", flush=True)
    secs = [r["seconds"] for r in rows]
    n_ok = sum(r["ok"] for r in rows)
    print(f"\n{len(rows)} architectures, {n_ok} with count = theory = find_laws; count_laws seconds: "
          f"mean {sum(secs) / len(secs):.2f}, max {max(secs):.2f} "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(torch=torch.__version__, threads=torch.get_num_threads(), cpus=os.cpu_count(),
                           machine=platform.machine(), python=sys.version.split()[0], dims=[d, m],
                           batch=args.batch, seed=args.seed, rows=rows), f, indent=2)
    return 0 if n_ok == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
