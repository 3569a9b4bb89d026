"""GPU time per optimizer step: torch SGD vs consopt's fused step with law tracking (SPEC §7).

    python benchmarks/bench_step.py [--json out.json] [--models large,resnet18,resnet50,gpt2]
    python benchmarks/bench_step.py --smoke          # tiny shapes; runs on the CPU (Triton interpreter)

For every model (parameter shapes written out here, no torchvision/transformers) and method:

    torch_foreach            torch.optim.SGD(momentum=0.9, foreach=True).step()
    torch_fused              torch.optim.SGD(momentum=0.9, fused=True).step()
    torch_foreach+evaluate   the foreach step, then LawSet.evaluate (eager float64 law values)
    torch_foreach+evaluator  the foreach step, then consopt.functional.LawEvaluator (if present)
    consopt_fused            consopt.fused.fused_sgd_step without laws
    consopt_fused+laws       consopt.fused.fused_sgd_step with every law family tracked
    consopt_fused+symmetry   the tracked fused step, then the symmetry projection on the flat
                             buffers (consopt.projection.FlatProjector) back onto {h = h(θ_0)};
                             GPU (and --smoke) only; reports the mean projection rounds per step
    consopt_fused+symmetry-lazy  the same with the momentum transported lazily (the diagonal
                             factors owed to the momentum and applied by the next step's kernel as
                             it loads the buffer; consopt.SGD's momentum_transport="lazy")

it reports the median time (CUDA events, L2 flushed between reps), the effective bandwidth at
the nominal 20 B/element of fp32 momentum SGD (read p, g, m; write p, m), and that bandwidth as a
fraction of a measured device copy of the same number of bytes. fp32, momentum 0.9.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

if "--smoke" in sys.argv and not os.environ.get("CONSOPT_TEST_GPU"):
    try:
        import torch as _t

        if not _t.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")
    except ImportError:
        pass

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from consopt import fused as F  # noqa: E402
from consopt.laws import Family, LawSet, Term  # noqa: E402

BYTES_PER_ELT = 20  # fp32 momentum SGD: p (r+w), g (r), m (r+w)


# ----------------------------------------------------------------------------------------
# parameter shapes and law sets
# ----------------------------------------------------------------------------------------

def _ar(a, b=None):
    r = torch.arange(a) if b is None else torch.arange(a, b)
    return r[:, None]


def large(n=16384):
    shapes = {"w": (n, n)}
    fams = [Family("rows_minus_cols", "rescale", "diag", 2, [Term("w", 0, _ar(n), +1), Term("w", 1, _ar(n), -1)])]
    return shapes, fams


def resnet(depths, bottleneck, width=64, classes=1000, div=1):
    """torchvision ResNet parameter shapes (named_parameters order) and its BN<->conv laws:
    per block the BN-affine -> next conv rescale laws, per stage the stream law (every BN that
    writes the stream, every conv/fc that reads it), and the cross-entropy translation of fc."""
    w0 = width // div
    S = {}
    fams = []

    def conv(name, o, i, k):
        S[name + ".weight"] = (o, i, k, k)

    def bn(name, c):
        S[name + ".weight"] = (c,)
        S[name + ".bias"] = (c,)

    def rescale(fname, bn_name, conv_name, c):
        fams.append(Family(fname, "rescale", "diag", 2, [Term(bn_name + ".weight", 0, _ar(c), +1),
                                                        Term(bn_name + ".bias", 0, _ar(c), +1),
                                                        Term(conv_name + ".weight", 1, _ar(c), -1)]))

    conv("conv1", w0, 3, 7)
    bn("bn1", w0)
    inplanes = w0
    exp = 4 if bottleneck else 1
    cur = dict(c=w0, writers=["bn1"], readers=[])  # the residual stream of the current width
    streams = []
    for li, (d, planes) in enumerate(zip(depths, [w0, 2 * w0, 4 * w0, 8 * w0])):
        for bi in range(d):
            pre = f"layer{li + 1}.{bi}"
            out = planes * exp
            if bottleneck:
                conv(pre + ".conv1", planes, inplanes, 1), bn(pre + ".bn1", planes)
                conv(pre + ".conv2", planes, planes, 3), bn(pre + ".bn2", planes)
                conv(pre + ".conv3", out, planes, 1), bn(pre + ".bn3", out)
                rescale(pre + ".bn1", pre + ".bn1", pre + ".conv2", planes)
                rescale(pre + ".bn2", pre + ".bn2", pre + ".conv3", planes)
                last = pre + ".bn3"
            else:
                conv(pre + ".conv1", planes, inplanes, 3), bn(pre + ".bn1", planes)
                conv(pre + ".conv2", planes, planes, 3), bn(pre + ".bn2", planes)
                rescale(pre + ".bn1", pre + ".bn1", pre + ".conv2", planes)
                last = pre + ".bn2"
            cur["readers"].append(pre + ".conv1")
            if bi == 0 and (inplanes != out or li > 0):
                conv(pre + ".downsample.0", out, inplanes, 1), bn(pre + ".downsample.1", out)
                cur["readers"].append(pre + ".downsample.0")
                streams.append(cur)
                cur = dict(c=out, writers=[pre + ".downsample.1"], readers=[])
            cur["writers"].append(last)
            inplanes = out
    S["fc.weight"] = (classes, inplanes)
    S["fc.bias"] = (classes,)
    cur["readers"].append("fc")
    streams.append(cur)
    for k, st in enumerate(streams):
        terms = []
        for w in st["writers"]:
            terms += [Term(w + ".weight", 0, _ar(st["c"]), +1), Term(w + ".bias", 0, _ar(st["c"]), +1)]
        terms += [Term(r + ".weight", 1, _ar(st["c"]), -1) for r in st["readers"]]
        fams.append(Family(f"stream{k}", "stream", "diag", 2, terms))
    fams.append(Family("ce", "translation", "vector", 1, [Term("fc.weight", 0, _ar(classes), +1),
                                                        Term("fc.bias", 0, _ar(classes), +1)]))
    return S, fams


def gpt2(layers=12, d=768, heads=12, vocab=50257, ctx=1024):
    """GPT-2 small parameter shapes (148 tensors, 124.4 M with the tied lm_head), Linear
    orientation, and its attention laws (QK and VO per head) plus the CE translation of wte."""
    S = {"wte.weight": (vocab, d), "wpe.weight": (ctx, d)}
    fams = []
    dh = d // heads
    for i in range(layers):
        p = f"h.{i}"
        S[p + ".ln_1.weight"] = (d,)
        S[p + ".ln_1.bias"] = (d,)
        S[p + ".attn.c_attn.weight"] = (3 * d, d)
        S[p + ".attn.c_attn.bias"] = (3 * d,)
        S[p + ".attn.c_proj.weight"] = (d, d)
        S[p + ".attn.c_proj.bias"] = (d,)
        S[p + ".ln_2.weight"] = (d,)
        S[p + ".ln_2.bias"] = (d,)
        S[p + ".mlp.c_fc.weight"] = (4 * d, d)
        S[p + ".mlp.c_fc.bias"] = (4 * d,)
        S[p + ".mlp.c_proj.weight"] = (d, 4 * d)
        S[p + ".mlp.c_proj.bias"] = (d,)
        W, B = p + ".attn.c_attn.weight", p + ".attn.c_attn.bias"
        for h in range(heads):
            q, k, v = _ar(h * dh, (h + 1) * dh), _ar(d + h * dh, d + (h + 1) * dh), _ar(2 * d + h * dh,
                                                                                        2 * d + (h + 1) * dh)
            fams.append(Family(f"{p}.qk{h}", "attention_qk", "matrix", 2, [
                Term(W, 0, q, +1), Term(B, 0, q, +1), Term(W, 0, k, -1), Term(B, 0, k, -1)]))
            fams.append(Family(f"{p}.vo{h}", "attention_vo", "matrix", 2, [
                Term(W, 0, v, +1), Term(B, 0, v, +1), Term(p + ".attn.c_proj.weight", 1, _ar(h * dh, (h + 1) * dh), -1)]))
    S["ln_f.weight"] = (d,)
    S["ln_f.bias"] = (d,)
    fams.append(Family("ce_wte", "translation", "vector", 1, [Term("wte.weight", 0, _ar(vocab), +1)]))
    return S, fams


def models(smoke):
    if smoke:
        return {
            "large": lambda: large(96),
            "resnet18": lambda: resnet([2, 2, 2, 2], False, div=16, classes=10),
            "resnet50": lambda: resnet([1, 1, 1, 1], True, div=16, classes=10),
            "gpt2": lambda: gpt2(layers=1, d=64, heads=2, vocab=101, ctx=16),
        }
    return {
        "large": large,
        "resnet18": lambda: resnet([2, 2, 2, 2], False),
        "resnet50": lambda: resnet([3, 4, 6, 3], True),
        "gpt2": gpt2,
    }


# ----------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------

class Timer:
    def __init__(self, device, reps, warmup):
        self.cuda = device.type == "cuda"
        self.reps, self.warmup = reps, warmup
        self.flush = torch.empty(64 * 2 ** 20, dtype=torch.int32, device=device) if self.cuda else None

    def __call__(self, fn):
        for _ in range(self.warmup):
            fn()
        ts = []
        if self.cuda:
            torch.cuda.synchronize()
            for _ in range(self.reps):
                self.flush.zero_()  # evict L2 (256 MB of writes)
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                ts.append(a.elapsed_time(b))
        else:
            for _ in range(self.reps):
                t0 = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)


def make_params(shapes, device):
    g = torch.Generator(device=device).manual_seed(0)
    ps = {}
    for n, s in shapes.items():
        t = torch.empty(s, dtype=torch.float32, device=device)
        t.copy_((torch.rand(s, generator=g, device=device) - 0.5) * 0.1)
        ps[n] = torch.nn.Parameter(t)
    for p in ps.values():
        p.grad = ((torch.rand(p.shape, generator=g, device=device) - 0.5) * 0.01)
    return ps


def _emit(r, out=None):
    """Print one row as soon as it is measured (and append it to the JSON-lines file `out`): a
    timeout of the whole run (gpu_check.sh) then still leaves every finished row."""
    la = "" if r.get("launches") is None else str(r["launches"])
    if r.get("rounds") is not None:  # projection rows: mean rounds per step instead
        la = f"{r['rounds']:.1f}r"
    frac = f"{100 * r['frac_copy']:5.1f}%" if "frac_copy" in r else "      "
    print(f"{r['model']:10s} {r['method']:26s} {r['ms']:9.3f} {r['gbs']:8.1f} {frac} {la:>6s}", flush=True)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(r) + "\n")


def bench_model(name, build, device, timer, lr=0.01, smoke=False, projection=None, stream=None):
    """Rows of one model; projection=None: the step rows only; True: the projection row only."""
    shapes, fams = build()
    ls = LawSet(fams, {n: torch.Size(s) for n, s in shapes.items()})
    numel = sum(math.prod(s) for s in shapes.values())
    nbytes = BYTES_PER_ELT * numel
    rows = []

    # device copy of the same bytes (half read, half written)
    n_copy = nbytes // 8
    src = torch.empty(n_copy, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t_copy = timer(lambda: dst.copy_(src))
    del src, dst
    copy_gbs = nbytes / (t_copy * 1e-3) / 1e9

    def row(method, ms, **extra):
        gbs = nbytes / (ms * 1e-3) / 1e9
        r = dict(model=name, method=method, ms=ms, gbs=gbs, numel=numel, tensors=len(shapes), families=len(fams),
                 copy_ms=t_copy, copy_gbs=copy_gbs, frac_copy=t_copy / ms, **extra)
        rows.append(r)
        _emit(r, stream)

    if projection:
        if device.type == "cuda" or smoke:
            bench_projection(ls, shapes, device, timer, lr, row)
        return rows

    for method in ("torch_foreach", "torch_fused", "torch_foreach+evaluate", "torch_foreach+evaluator"):
        if device.type != "cuda" and method == "torch_fused":
            continue
        ps = make_params(shapes, device)
        kw = dict(fused=True) if method == "torch_fused" else dict(foreach=True)
        opt = torch.optim.SGD(list(ps.values()), lr=lr, momentum=0.9, **kw)
        if method == "torch_foreach":
            fn = opt.step
        elif method == "torch_foreach+evaluate":
            def fn(opt=opt, ps=ps):
                opt.step()
                ls.evaluate(ps)
        else:
            try:
                from consopt.functional import LawEvaluator

                ev = LawEvaluator(ls, ps)
            except Exception as e:  # written concurrently; optional
                print(f"  (skip {method}: {type(e).__name__}: {e})")
                continue

            def fn(opt=opt, ev=ev):
                opt.step()
                ev()
        with torch.no_grad():
            row(method, timer(fn), launches=None)
        del opt, ps

    for method in ("consopt_fused", "consopt_fused+laws"):
        ps = make_params(shapes, device)
        g = F.FlatGroup(list(ps.values()), names=list(ps))
        c = F.compile_laws(ls, ps, g) if method.endswith("laws") else None
        if c is None:
            launches = sum(len(b.plain_tables(g.target)) for b in g.buffers)
        else:
            launches = (sum(len(c.step_tables(0, bi)) + (c.gram_table(0, bi) is not None) for bi in range(len(g.buffers)))
                        + 1)
        fn = lambda g=g, c=c: F.fused_sgd_step(g, lr, momentum=0.9, compiled_laws=c)  # noqa: E731
        with torch.no_grad():
            fn()  # first step (buffers start from d_p) + compilation
            row(method, timer(fn), launches=launches, eager_families=len(c.eager) if c else 0,
                scratch_mb=(c.n_slots * 8 / 2 ** 20) if c else 0.0)
        del g, c, ps

    return rows


def bench_projection(ls, shapes, device, timer, lr, row):
    """consopt_fused+symmetry(-lazy): tracked fused step + FlatProjector to h(θ_0), fp32 (tol 2·eps)."""
    for lazy in (False, True):
        _bench_projection(ls, shapes, device, lr, row, lazy)


def _bench_projection(ls, shapes, device, lr, row, lazy):
    from consopt.projection import FlatProjector

    ps = make_params(shapes, device)
    g = F.FlatGroup(list(ps.values()), names=list(ps))
    c = F.compile_laws(ls, ps, g)
    proj = FlatProjector(ls, ps, g, lazy_momentum=lazy)
    with torch.no_grad():
        h0 = F.law_values_only(c)
    rounds = []

    def fn():  # as consopt.SGD runs it: the step forms the projector's first measurement (its split
        # statistics; h for a step within tolerance to skip), colours of diagonal families fold
        F.fused_sgd_step(g, lr, momentum=0.9, compiled_laws=proj.step_laws())
        vals, measured = proj.step_values()
        st = proj(h0, values=vals, measured=measured)
        rounds.append(st.rounds)

    with torch.no_grad():
        fn()  # first step + compilation
        rounds.clear()
        # fewer reps than the other rows: each step here runs C statistics passes per projection round
        short = Timer(device, reps=10 if device.type == "cuda" else 1, warmup=2 if device.type == "cuda" else 0)
        ms = short(fn)
    row("consopt_fused+symmetry" + ("-lazy" if lazy else ""), ms, launches=None,
        rounds=sum(rounds) / max(len(rounds), 1), colours=len(proj.colours), fallback=len(proj.fallback),
        lazy=proj.lazy)
    del g, c, ps, proj


def plan_table(names) -> list:
    """The compiled plans of the full-size models, on the CPU (no kernel runs): tiles and launches
    per step, scratch, CSR terms and the statistics' extra traffic per element (the design table
    of benchmarks/RESULTS.md)."""
    out = []
    table = models(False)
    for name in names:
        shapes, fams = table[name]()
        ls = LawSet(fams, {n: torch.Size(s) for n, s in shapes.items()})
        numel = sum(math.prod(s) for s in shapes.values())
        ps = {n: torch.nn.Parameter(torch.zeros(s)) for n, s in shapes.items()}
        g = F.FlatGroup(list(ps.values()), names=list(ps))
        plain = g.buffers[0].plain_tables(g.target)
        t0 = time.perf_counter()
        c = F.compile_laws(ls, ps, g)
        t_compile = time.perf_counter() - t0
        tabs = c.step_tables(0, 0)
        gram = c.gram_table(0, 0)
        n_terms = int(c._slots.numel())
        outer = 3 if c._outer else 0
        # scratch written once and read once (fp64), the CSR index (int32/int64), fp64 outputs, and
        # gram_kernel's re-read of the slices of Gram blocks that do not fit a tile (fp32)
        gram_read = 0
        if gram is not None:
            from triton_kernels import sgd_stats as K

            t = gram.cpu().numpy()
            gram_read = int(((t[:, K.G_NA] + t[:, K.G_NB]) * t[:, K.G_NLOOP] * t[:, K.G_NVEC]).sum()) * 4
        extra = (16 * c.n_slots + c._slots.element_size() * n_terms + 8 * c.n_out + gram_read) / numel
        out.append(dict(model=name, tensors=len(shapes), params=numel, families=len(fams),
                        tiles_plain=sum(int(t.shape[0]) for _, t in plain), launches_plain=len(plain),
                        tiles=sum(int(t.shape[0]) for _, t in tabs), update_launches=len(tabs),
                        aligned_launches=sum(1 for v, _ in tabs if v[-1]), gram_launches=int(gram is not None),
                        outer_ops=outer, scratch_mib=c.n_slots * 8 / 2 ** 20, csr_terms=n_terms,
                        extra_bytes=extra, compile_s=t_compile))
        del g, c, ps
    hdr = ("model", "tensors", "params", "families", "tiles/launches, no laws", "tiles/launches, laws",
           "scratch", "CSR terms", "extra B/element (vs 20)", "compile")
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for r in out:
        launches = (f"{r['update_launches']} update ({r['aligned_launches']} aligned)"
                    + (f" + {r['gram_launches']} Gram" if r["gram_launches"] else "") + " + 1 CSR"
                    + (f" + {r['outer_ops']} small torch ops" if r["outer_ops"] else ""))
        print(f"| {r['model']} | {r['tensors']} | {r['params'] / 1e6:.2f} M | {r['families']} | "
              f"{r['tiles_plain']} / {r['launches_plain']} | {r['tiles']} / {launches} | {r['scratch_mib']:.1f} MiB | "
              f"{r['csr_terms'] / 1e6:.2f} M | {r['extra_bytes']:.2f} B ({100 * r['extra_bytes'] / 20:.1f} %) | "
              f"{r['compile_s']:.1f} s |")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU / Triton interpreter)")
    ap.add_argument("--json", default=None, help="write the rows as JSON here")
    ap.add_argument("--models", default="large,resnet18,resnet50,gpt2")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--plan", action="store_true", help="print the full-size plans (tiles, launches, "
                    "scratch, extra bytes) without running kernels, then exit")
    args = ap.parse_args(argv)
    if args.plan:
        return plan_table(args.models.split(","))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        print("no CUDA device: running --smoke (tiny shapes, interpreter timings are not meaningful)")
        args.smoke = True
    reps = args.reps or (3 if args.smoke else 30)
    timer = Timer(device, reps=reps, warmup=1 if args.smoke else 5)
    table = models(args.smoke)
    hdr = f"{'model':10s} {'method':26s} {'ms':>9s} {'GB/s':>8s} {'%copy':>6s} {'launch':>6s}"
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu (interpreter)'}; "
          f"torch {torch.__version__}; fp32, momentum 0.9; {BYTES_PER_ELT} B/element nominal")
    print(hdr)
    print("-" * len(hdr), flush=True)
    stream = (args.json + "l") if args.json else None  # rows as JSON lines, written as they come
    if stream and os.path.exists(stream):
        os.remove(stream)
    all_rows = []
    names = args.models.split(",")
    for name in names:  # every step row first: the projection rows (slow, many rounds) come last
        all_rows += bench_model(name, table[name], device, timer, smoke=args.smoke, stream=stream)
    for name in names:
        all_rows += bench_model(name, table[name], device, timer, smoke=args.smoke, projection=True, stream=stream)
    for name in dict.fromkeys(r["model"] for r in all_rows):
        rr = {r["method"]: r for r in all_rows if r["model"] == name}
        if "consopt_fused+symmetry" in rr and "consopt_fused+laws" in rr:
            pr = rr["consopt_fused+symmetry"]
            lz = rr.get("consopt_fused+symmetry-lazy")
            lazy = (f", {lz['ms'] / rr['consopt_fused+laws']['ms']:.2f}x with lazy momentum transport"
                    + ("" if lz["lazy"] else " (the transport stays eager here)")) if lz else ""
            print(f"{name}: symmetry projection {pr['rounds']:.1f} rounds/step, {pr['colours']} colours, "
                  f"{pr['fallback']} fallback families; step + projection {pr['ms'] / rr['consopt_fused+laws']['ms']:.2f}x "
                  f"the tracked step{lazy}")
        if "consopt_fused+laws" in rr and "torch_foreach+evaluate" in rr:
            base = min(rr[k]["ms"] for k in ("torch_foreach+evaluate", "torch_foreach+evaluator") if k in rr)
            print(f"{name}: tracked fused step {base / rr['consopt_fused+laws']['ms']:.2f}x faster than "
                  f"torch foreach + eager laws; copy {rr['consopt_fused+laws']['copy_gbs']:.0f} GB/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=str(device), torch=torch.__version__, smoke=args.smoke, rows=all_rows), f, indent=1)
    return all_rows


if __name__ == "__main__":
    main()
