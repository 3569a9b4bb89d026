"""CPU benchmark: torch.optim.SGD step vs consopt.SGD step with law tracking.

Models: a ResNet-18-sized CNN (CIFAR layout, ~11.2 M parameters) and a small Transformer
(4 layers, d=256, 8 heads, MLP 1024). Gradients are filled with random values, as after a
backward pass. The variants are timed side by side, in interleaved repetitions (median):

  torch      torch.optim.SGD(foreach=True, momentum=0.9).step()
  consopt[native]  consopt.SGD(foreach=True, momentum=0.9, laws=laws).step(); opt.deviation()
             (every family tracked and read after every step) with tracking_backend="native", the
             CPU default: torch's update and the law statistics (sums, Gram matrices) in one C++
             pass (consopt.native; bitwise torch's update, checked here on a separate pair)
  consopt    the same with tracking_backend="eager" (torch's update, then chunked float64 torch ops)
  consopt[compile]  the same with opt.tracking_backend = "compile": torch's update as one compiled
             graph (consopt.compiled_update, bitwise torch's) and the statistics as another
             (compiled before timing, compile time reported)
  consopt[read/10]  eager, deviation() read after every 10th step only (per-step time: the
             laws are evaluated when read, so unread steps cost torch's update); its ratio is
             against torch[x10], 10 consecutive torch steps (same cache conditions)
  torch+eval torch.optim.SGD step, then laws.evaluate(model) (eager float64 law values)
  evaluator  the eager float64 law evaluation alone

Laws come from consopt.find_laws (hand-built rescale/QK/VO laws if it is unavailable).

    python benchmarks/bench_cpu.py [--reps 30] [--json out.json] [--models resnet18,transformer]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import consopt
from consopt.laws import Family, LawSet, Term


# -- models ----------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18, CIFAR stem (3x3 conv), 10 classes: 11.17 M parameters."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, c = [], 64
        for c_out, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            layers.append(nn.Sequential(BasicBlock(c, c_out, stride), BasicBlock(c_out, c_out, 1)))
            c = c_out
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Block(nn.Module):
    def __init__(self, d, heads, ffn):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, ffn)
        self.fc2 = nn.Linear(ffn, d)

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(torch.relu(self.fc1(self.ln2(x))))


class Transformer(nn.Module):
    """Pre-LN Transformer classifier: 4 layers, d=256, 8 heads, MLP 1024 (ReLU)."""

    def __init__(self, vocab=1000, d=256, heads=8, layers=4, ffn=1024, num_classes=10):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, heads, ffn) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, num_classes)

    def forward(self, tokens):
        x = self.emb(tokens)
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln(x).mean(1))


def make(name):
    if name == "resnet18":
        return ResNet18(), (torch.randn(2, 3, 32, 32),)
    if name == "transformer":
        return Transformer(), (torch.randint(0, 1000, (2, 16)),)
    raise ValueError(name)


# -- hand-built laws (fallback when find_laws is unavailable) -------------------------------
def _rows(n, start=0):
    return torch.arange(start, start + n).view(n, 1)


def hand_laws(model) -> LawSet:
    params = dict(model.named_parameters())
    fams = []
    if isinstance(model, ResNet18):
        # inside each block: bn1 affine (γ, β) of channel j against conv2's in-channel j
        for name, mod in model.named_modules():
            if isinstance(mod, BasicBlock):
                c = mod.conv1.out_channels
                fams.append(Family(f"rescale:{name}.bn1", "rescale", "diag", 2, [
                    Term(f"{name}.bn1.weight", 0, _rows(c), 1), Term(f"{name}.bn1.bias", 0, _rows(c), 1),
                    Term(f"{name}.conv2.weight", 1, _rows(c), -1)]))
    else:
        for i, b in enumerate(model.blocks):
            E, H = b.attn.embed_dim, b.attn.num_heads
            dh = E // H
            p = f"blocks.{i}.attn."
            for h in range(H):
                fams.append(Family(f"attention_qk:{i}.h{h}", "attention_qk", "matrix", 2, [
                    Term(p + "in_proj_weight", 0, _rows(dh, h * dh), 1), Term(p + "in_proj_bias", 0, _rows(dh, h * dh), 1),
                    Term(p + "in_proj_weight", 0, _rows(dh, E + h * dh), -1),
                    Term(p + "in_proj_bias", 0, _rows(dh, E + h * dh), -1)]))
                fams.append(Family(f"attention_vo:{i}.h{h}", "attention_vo", "matrix", 2, [
                    Term(p + "in_proj_weight", 0, _rows(dh, 2 * E + h * dh), 1),
                    Term(p + "in_proj_bias", 0, _rows(dh, 2 * E + h * dh), 1),
                    Term(p + "out_proj.weight", 1, _rows(dh, h * dh), -1)]))
            f = b.fc1.out_features
            fams.append(Family(f"rescale:{i}.fc1", "rescale", "diag", 2, [
                Term(f"blocks.{i}.fc1.weight", 0, _rows(f), 1), Term(f"blocks.{i}.fc1.bias", 0, _rows(f), 1),
                Term(f"blocks.{i}.fc2.weight", 1, _rows(f), -1)]))
    return LawSet(fams, {k: v.shape for k, v in params.items()}, params=params)


def get_laws(model, inputs):
    try:
        t0 = time.perf_counter()
        laws = consopt.find_laws(model, inputs)
        return laws, "find_laws", time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - report and fall back
        print(f"  find_laws unavailable or failed ({type(e).__name__}: {e}); using hand-built laws", file=sys.stderr)
        return hand_laws(model), "hand", 0.0


# -- timing ----------------------------------------------------------------------------------
def fill_random_grads(model, gen):
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen).mul_(1e-3)


def native_matches_torch(base, laws, steps=3) -> bool | None:
    """consopt.SGD(tracking_backend="native") and torch.optim.SGD from the same point with the
    same gradients: bitwise equal parameters after `steps` steps (None: native unavailable)."""
    m_t, m_n = copy.deepcopy(base), copy.deepcopy(base)
    o_t = torch.optim.SGD(m_t.parameters(), lr=1e-3, momentum=0.9, foreach=True)
    o_n = consopt.SGD(m_n.parameters(), lr=1e-3, momentum=0.9, foreach=True, laws=copy.deepcopy(laws).bind(m_n))
    o_n.tracking_backend = "native"
    gen = torch.Generator().manual_seed(2)
    for _ in range(steps):
        for a, b in zip(m_t.parameters(), m_n.parameters()):
            a.grad = torch.randn(a.shape, generator=gen).mul_(1e-3)
            b.grad = a.grad.clone()
        o_t.step()
        o_n.step()
    if o_n._native is None or o_n._native.disabled is not None:
        return None
    return all(torch.equal(a, b) for a, b in zip(m_t.parameters(), m_n.parameters()))


def bench_model(name, reps, warmup):
    torch.manual_seed(0)
    base, inputs = make(name)
    base.train()
    n_params = sum(p.numel() for p in base.parameters())
    laws, source, t_find = get_laws(base, inputs)
    n_law_params = sum(base.get_parameter(n).numel() for n in laws.param_names)

    variants = {}
    m_t = copy.deepcopy(base)
    o_t = torch.optim.SGD(m_t.parameters(), lr=1e-3, momentum=0.9, foreach=True)
    variants["torch"] = (m_t, o_t.step)
    m_c = copy.deepcopy(base)
    laws_c = copy.deepcopy(laws).bind(m_c)
    o_c = consopt.SGD(m_c.parameters(), lr=1e-3, momentum=0.9, foreach=True, laws=laws_c)
    o_c.tracking_backend = "eager"
    variants["consopt"] = (m_c, lambda: (o_c.step(), o_c.deviation()))
    # the same with tracking_backend="compile" (statistics in one torch.compile'd graph)
    m_k = copy.deepcopy(base)
    o_k = consopt.SGD(m_k.parameters(), lr=1e-3, momentum=0.9, foreach=True, laws=copy.deepcopy(laws).bind(m_k))
    o_k.tracking_backend = "compile"
    t0 = time.perf_counter()
    fill_random_grads(m_k, torch.Generator().manual_seed(1))
    o_k.step()  # compiles the evaluation (θ_0); the second step compiles the update
    o_k.step()
    o_k.deviation()
    t_compile = time.perf_counter() - t0
    if o_k.tracking_backend == "compile":
        variants["consopt[compile]"] = (m_k, lambda: (o_k.step(), o_k.deviation()))
    # tracking_backend="native": update and statistics in one C++ pass (consopt.native)
    m_n = copy.deepcopy(base)
    o_n = consopt.SGD(m_n.parameters(), lr=1e-3, momentum=0.9, foreach=True, laws=copy.deepcopy(laws).bind(m_n))
    o_n.tracking_backend = "native"
    t0 = time.perf_counter()
    fill_random_grads(m_n, torch.Generator().manual_seed(1))
    o_n.step()  # builds (or loads) the library; the first momentum step is torch's
    o_n.step()  # the native step's first call, checked against torch's update
    o_n.deviation()
    t_native = time.perf_counter() - t0
    if o_n.tracking_backend == "native" and o_n._native is not None and o_n._native.disabled is None:
        variants["consopt[native]"] = (m_n, lambda: (o_n.step(), o_n.deviation()))
    m_r = copy.deepcopy(base)
    o_r = consopt.SGD(m_r.parameters(), lr=1e-3, momentum=0.9, foreach=True, laws=copy.deepcopy(laws).bind(m_r))
    o_r.tracking_backend = "eager"  # evaluated when read: unread steps cost torch's update

    def read_every_10():
        for _ in range(10):
            o_r.step()
        o_r.deviation()

    variants["consopt[read/10]"] = (m_r, read_every_10)
    # its baseline: 10 consecutive torch steps (the model stays in cache between them, as it does
    # for consopt[read/10]; the single-step variants interleave with the other models)
    m_t10 = copy.deepcopy(base)
    o_t10 = torch.optim.SGD(m_t10.parameters(), lr=1e-3, momentum=0.9, foreach=True)

    def torch_x10():
        for _ in range(10):
            o_t10.step()

    variants["torch[x10]"] = (m_t10, torch_x10)
    per_call = {"consopt[read/10]": 10, "torch[x10]": 10}
    m_e = copy.deepcopy(base)
    o_e = torch.optim.SGD(m_e.parameters(), lr=1e-3, momentum=0.9, foreach=True)
    laws_e = copy.deepcopy(laws).bind(m_e)

    def torch_eval():
        o_e.step()
        laws_e.evaluate(m_e)

    variants["torch+eval"] = (m_e, torch_eval)
    # the tracking evaluation alone (what consopt adds to torch's step)
    ev = o_c._tracker.evaluator
    variants["evaluator"] = (m_c, ev)

    gen = torch.Generator().manual_seed(1)
    for m, _ in variants.values():
        fill_random_grads(m, gen)  # fixed random gradients (as after a backward pass)
    times = {k: [] for k in variants}
    order = list(variants)
    for r in range(warmup + reps):
        order = order[1:] + order[:1]  # rotate: no variant always runs first
        for k in order:
            m, fn = variants[k]
            t0 = time.perf_counter()
            fn()
            dt = (time.perf_counter() - t0) / per_call.get(k, 1)
            if r >= warmup:
                times[k].append(dt)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    q = {k: (statistics.quantiles(v, n=4)[0] * 1e3, statistics.quantiles(v, n=4)[2] * 1e3) for k, v in times.items()}
    # tracking is exact: deviation() against a float64 re-evaluation h(θ_t) − h(θ_0)
    h0_ref = laws.evaluate(base)

    def max_err(m, o):
        lw = copy.deepcopy(laws).bind(m)
        h, sc, dev = lw.evaluate(m), lw.scale(m), o.deviation()
        return max(float(((dev[k] - (h[k] - h0_ref[k])).abs() / sc[k].clamp_min(1e-300)).max()) for k in h)
    return {
        "model": name,
        "params": n_params,
        "law_params": n_law_params,
        "families": len(laws),
        "functions": laws.num_functions,
        "laws_source": source,
        "find_laws_s": round(t_find, 3),
        "median_ms": {k: round(v, 3) for k, v in med.items()},
        "iqr_ms": {k: [round(a, 3), round(b, 3)] for k, (a, b) in q.items()},
        "min_ms": {k: round(min(v) * 1e3, 3) for k, v in times.items()},
        "compile_s": round(t_compile, 2),
        "native_first_steps_s": round(t_native, 2),
        "ratio_consopt_native_vs_torch": (round(med["consopt[native]"] / med["torch"], 3)
                                          if "consopt[native]" in med else None),
        "ratio_consopt_vs_torch": round(med["consopt"] / med["torch"], 3),
        "ratio_consopt_compile_vs_torch": (round(med["consopt[compile]"] / med["torch"], 3)
                                           if "consopt[compile]" in med else None),
        "ratio_consopt_read10_vs_torch": round(med["consopt[read/10]"] / med["torch[x10]"], 3),
        "ratio_min_consopt_vs_torch": round(min(times["consopt"]) / min(times["torch"]), 3),
        "ratio_torch_eval_vs_torch": round(med["torch+eval"] / med["torch"], 3),
        "speedup_consopt_vs_torch_eval": round(med["torch+eval"] / med["consopt"], 3),
        "tracked_steps": o_c.tracked_steps,
        "max_err_over_scale": {"consopt": max_err(m_c, o_c),
                               **({"consopt[compile]": max_err(m_k, o_k)} if "consopt[compile]" in med else {}),
                               **({"consopt[native]": max_err(m_n, o_n)} if "consopt[native]" in med else {})},
        "native_bitwise_torch": native_matches_torch(base, laws),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,transformer")
    ap.add_argument("--reps", type=int, default=25)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--json", default=None, help="write results to this JSON file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for name in args.models.split(","):
        print(f"[{name}] building, finding laws, timing {args.reps} interleaved reps ...", file=sys.stderr)
        results.append(bench_model(name.strip(), args.reps, args.warmup))
    hdr = ("model", "params", "families", "functions", "torch ms", "native ms", "ratio", "eager ms", "ratio",
           "compile ms", "ratio", "torch x10 ms", "eager read/10 ms", "ratio", "torch+eval ms", "ratio",
           "evaluator ms")
    rows = [hdr]
    for r in results:
        m = r["median_ms"]
        mk, mn = m.get("consopt[compile]"), m.get("consopt[native]")
        rows.append((r["model"], f"{r['params'] / 1e6:.2f}M", str(r["families"]), str(r["functions"]),
                     f"{m['torch']:.2f}",
                     "n/a" if mn is None else f"{mn:.2f}",
                     "n/a" if mn is None else f"{r['ratio_consopt_native_vs_torch']:.2f}x",
                     f"{m['consopt']:.2f}", f"{r['ratio_consopt_vs_torch']:.2f}x",
                     "n/a" if mk is None else f"{mk:.2f}",
                     "n/a" if mk is None else f"{r['ratio_consopt_compile_vs_torch']:.2f}x",
                     f"{m['torch[x10]']:.2f}", f"{m['consopt[read/10]']:.2f}", f"{r['ratio_consopt_read10_vs_torch']:.2f}x",
                     f"{m['torch+eval']:.2f}", f"{r['ratio_torch_eval_vs_torch']:.2f}x", f"{m['evaluator']:.2f}"))
    w = [max(len(row[i]) for row in rows) for i in range(len(hdr))]
    lines = ["  ".join(c.rjust(w[i]) if i else c.ljust(w[i]) for i, c in enumerate(row)) for row in rows]
    lines.insert(1, "  ".join("-" * x for x in w))
    print("\n".join(lines))
    print(f"(median of {args.reps} interleaved reps; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}; ratio = time / torch step)")
    for r in results:
        errs = ", ".join(f"{k} {v:.1e}" for k, v in r["max_err_over_scale"].items())
        print(f"{r['model']}: laws from {r['laws_source']}; compile {r['compile_s']} s; "
              f"native first two steps {r['native_first_steps_s']} s "
              f"(params bitwise torch's: {r['native_bitwise_torch']}); "
              f"min-time ratio consopt/torch {r['ratio_min_consopt_vs_torch']:.2f}x; "
              f"max |deviation - reevaluation| / scale: {errs}")
    if args.json:
        meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
                "reps": args.reps, "warmup": args.warmup}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
