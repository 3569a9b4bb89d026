"""Drift profiler: how far SGD drifts from every conservation law, as a function of the learning rate.

For each model, learning rate τ and seed, train with `consopt.SGD` on real data (scikit-learn's
digits, shipped with the package: no download) and record, at every step k and for every law
family, the relative deviation (the paper's metric, Marcotte, Gribonval, Peyré, ICML 2025, §5)

    rel_k = ‖h(θ_k) − h(θ_0)‖_F / ‖h(θ_0)‖_F        abs_k = ‖h(θ_k) − h(θ_0)‖_F

(Frobenius norm over the family's functions: for a single function this is |Δh / h(θ_0)|).
Theory (Prop. 5.1): each plain SGD step moves a quadratic law by O(τ²), so after a fixed number
of steps the deviation grows like τ² (log-log slope 2), and at a fixed training time T = kτ
like τ (slope 1). The profiler fits the slope of the final deviation against τ on a log-log
scale, with a 95 % confidence interval over seeds, and plots both.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import models as M
from .laws import Family, LawSet, Term

THEORY_SLOPE = {"steps": 2.0, "time": 1.0}


class ProfileError(Exception):
    """Bad profiler input: reported without a traceback, exit code 2."""


# ----------------------------------------------------------------------------------------------
# data and models
# ----------------------------------------------------------------------------------------------
def load_digits_data(kind: str, device, image_size: int = 8, channels: int = 1):
    """scikit-learn's digits (1797 8×8 images, 10 classes) as images, flat vectors or token sequences."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ProfileError("the profiler's data set needs scikit-learn: pip install 'consopt[data]'") from e
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32)  # [N, 64], values 0..16
    y = torch.tensor(d.target, dtype=torch.int64)
    if kind == "tokens":
        inputs = x.round().long().clamp(0, 16)  # a 64-token sequence per image, vocabulary 17
    elif kind == "flat":
        inputs = x / 16.0
    else:
        img = (x / 16.0).view(-1, 1, 8, 8)
        if image_size != 8:
            img = F.interpolate(img, size=image_size, mode="bilinear", align_corners=False)
        inputs = img.expand(-1, channels, -1, -1).contiguous()
    return inputs.to(device), y.to(device)


@dataclass
class Task:
    """A model factory and its data; `paper_family` optionally adds the paper's tracked quantity."""

    name: str
    make: callable
    data: str  # "image" | "flat" | "tokens"
    headline: str = ""  # family plotted against steps
    image_size: int = 8
    channels: int = 1
    extra_families: callable = None
    inputs: torch.Tensor = None  # a user task brings its own data
    targets: torch.Tensor = None


def _resnet_first_block_quantity(model) -> Family:
    """The paper's ResNet quantity ‖conv2[:, j]‖² − ‖conv1[j]‖² of the first block.

    With BatchNorm between conv1 and conv2 this is NOT a conservation law (SCIENCE.md): it drifts
    at order τ. The profiler tracks it beside the exact laws to show the difference."""
    blk = model.layer1[0]
    c = blk.conv1.weight.shape[0]
    units = torch.arange(c)[:, None]
    return Family("paper:layer1.0.conv2-conv1", "rescale", "diag", 2,
                  [Term("layer1.0.conv2.weight", 1, units, +1), Term("layer1.0.conv1.weight", 0, units, -1)],
                  modules=("layer1.0.conv2", "layer1.0.conv1"),
                  note="not a conservation law with BatchNorm: drifts at order τ")


BUILTIN = {
    "mlp": Task("mlp", lambda: M.MLP([64, 32, 32, 10]), "flat", headline="rescale:0"),
    "resnet": Task("resnet", lambda: M.resnet_small(in_channels=1, bn=True), "image",
                   headline="rescale:layer1.0.bn1", extra_families=_resnet_first_block_quantity),
    "resnet-nobn": Task("resnet-nobn", lambda: M.resnet_small(in_channels=1, bn=False), "image",
                        headline="rescale:layer1.0.conv1", extra_families=_resnet_first_block_quantity),
    "transformer": Task("transformer", lambda: M.TransformerClassifier(), "tokens",
                        headline="attention_qk:encoder.layers.0.self_attn.h0"),
    "llama": Task("llama", lambda: M.LlamaClassifier(), "tokens", headline="attention_qk:blocks.0.wq.h0"),
    # The paper's design (ResNet-18, 32×32 inputs; digits upsampled to 3×32×32 stand in for CIFAR-10,
    # which cannot be downloaded here). Meant for a GPU.
    "resnet18": Task("resnet18", lambda: M.resnet18(in_channels=3, num_classes=10), "image",
                     headline="rescale:layer1.0.bn1", image_size=32, channels=3,
                     extra_families=_resnet_first_block_quantity),
}

PRESETS = {
    "default": dict(models=["resnet", "transformer"], lrs=[0.01, 0.02, 0.05, 0.1], seeds=3, steps=50, batch=64),
    "quick": dict(models=["mlp"], lrs=[0.02, 0.05, 0.1], seeds=2, steps=10, batch=32),
    "paper": dict(models=["resnet18", "transformer"], lrs=[1e-3, 2e-3, 3e-3, 4e-3, 5e-3], seeds=10, steps=50,
                  batch=128),
}


# ----------------------------------------------------------------------------------------------
# the sweep
# ----------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    model: str
    lr: float
    seed: int
    momentum: float
    weight_decay: float
    projection: str
    steps: int
    rel: dict = field(default_factory=dict)  # family -> [steps] list of floats
    abs: dict = field(default_factory=dict)
    loss: list = field(default_factory=list)
    seconds: float = 0.0

    @property
    def label(self) -> str:
        """The table/plot key: the model, and the projection mode when there is one."""
        return self.model if self.projection == "none" else f"{self.model}[{self.projection}]"


def _family_norms(dev: dict, h0: dict):
    rel, ab = {}, {}
    for k, d in dev.items():
        a = float(torch.linalg.vector_norm(d))
        n0 = float(torch.linalg.vector_norm(h0[k]))
        ab[k] = a
        rel[k] = a / n0 if n0 > 0 else float("nan")
    return rel, ab


def run_one(task: Task, base_model, laws: LawSet, inputs, targets, *, lr, seed, steps, batch, momentum,
            weight_decay, projection, device):
    from .sgd import SGD

    model = copy.deepcopy(base_model).to(device).train()
    run_laws = LawSet(laws.families, laws.param_shapes, laws.notes, loss=laws.loss).bind(model)
    kw = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, laws=run_laws)
    if projection != "none":
        kw["projection"] = projection
    opt = SGD(model.parameters(), **kw)
    gen = torch.Generator(device="cpu").manual_seed(10_000 + seed)  # same batches for every lr
    res = RunResult(task.name, lr, seed, momentum, weight_decay, projection, steps)
    h0 = run_laws.evaluate(model)
    t0 = time.perf_counter()
    for k in range(steps):
        idx = torch.randint(0, inputs.shape[0], (batch,), generator=gen).to(device)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(inputs[idx]), targets[idx])
        loss.backward()
        opt.step()
        rel, ab = _family_norms(opt.deviation(), h0)
        for f in rel:
            res.rel.setdefault(f, []).append(rel[f])
            res.abs.setdefault(f, []).append(ab[f])
        res.loss.append(float(loss.detach()))
    res.seconds = time.perf_counter() - t0
    return res


def fit_slope(lrs, values):
    """OLS fit of log(value) = a + s·log(lr) over all (lr, seed) points: (s, 95 % CI half-width)."""
    x = np.log(np.asarray(lrs, dtype=float))
    y = np.log(np.asarray(values, dtype=float))
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3 or np.ptp(x) == 0:
        return float("nan"), float("nan")
    A = np.stack([np.ones_like(x), x], 1)
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    resid = y - A @ coef
    dof = len(x) - 2
    s2 = float(resid @ resid) / dof if dof > 0 else 0.0
    se = math.sqrt(s2 / float(((x - x.mean()) ** 2).sum()))
    try:
        from scipy.stats import t as student_t

        q = float(student_t.ppf(0.975, dof))
    except ImportError:  # pragma: no cover
        q = 1.96
    return float(coef[1]), q * se


def summarize(runs, mode, orders=None):
    """Per model and family: mean/std of the final deviation per lr and the fitted slope."""
    orders = orders or {}
    out = {}
    for r in runs:
        m = out.setdefault(r.label, {})
        for fam, series in r.rel.items():
            d = m.setdefault(fam, {"lr": [], "final_rel": [], "final_abs": []})
            d["lr"].append(r.lr)
            d["final_rel"].append(series[-1])
            d["final_abs"].append(r.abs[fam][-1])
    table = {}
    for model, fams in out.items():
        table[model] = {}
        for fam, d in fams.items():
            lrs = sorted(set(d["lr"]))
            use_abs = not all(np.isfinite(d["final_rel"])) or any(v == 0 for v in d["final_rel"])
            vals = d["final_abs"] if use_abs else d["final_rel"]
            per_lr = {}
            for lr in lrs:
                v = np.array([x for l, x in zip(d["lr"], vals) if l == lr], dtype=float)
                per_lr[lr] = (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0)
            slope, ci = fit_slope(d["lr"], vals)
            # Linear (order-1) laws are kept exactly by every plain SGD step: only rounding remains.
            theory = "exact" if orders.get((model.split("[")[0], fam)) == 1 else THEORY_SLOPE[mode]
            if "[" in model:
                theory = "projected"  # held at h(θ_0) up to the parameters' float rounding
            if fam.startswith("paper:"):
                theory = "not a law"  # the paper's quantity, tracked for comparison
            table[model][fam] = dict(metric="abs" if use_abs else "rel", per_lr=per_lr, slope=slope, ci95=ci,
                                     theory=theory)
    return table


def format_table(table, mode):
    lines = []
    for model, fams in table.items():
        lrs = sorted({lr for f in fams.values() for lr in f["per_lr"]})
        head = ["family", "metric"] + [f"lr={lr:g}" for lr in lrs] + ["slope (95% CI)", "theory"]
        rows = [head]
        for fam, f in fams.items():
            rows.append([fam, f["metric"]] + [f"{f['per_lr'][lr][0]:.2e}" if lr in f["per_lr"] else "" for lr in lrs]
                        + [f"{f['slope']:.2f} ± {f['ci95']:.2f}", str(f["theory"])])
        w = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines.append(f"== {model}: final deviation after {'a fixed number of steps' if mode == 'steps' else 'a fixed time T'} "
                     "(mean over seeds)")
        for i, r in enumerate(rows):
            lines.append("  ".join(c.ljust(x) for c, x in zip(r, w)).rstrip())
            if i == 0:
                lines.append("  ".join("-" * x for x in w))
        lines.append("")
    return "\n".join(lines)


def plot(table, runs, task_by_name, out_dir, mode):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for model, fams in table.items():
        task = task_by_name[model.split("[")[0]]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
        head = task.headline if task.headline in fams else next(iter(fams))
        lrs = sorted({r.lr for r in runs if r.label == model})
        cmap = plt.get_cmap("viridis")
        for i, lr in enumerate(lrs):
            series = np.array([r.rel[head] for r in runs if r.label == model and r.lr == lr])
            mean = series.mean(0)
            steps = np.arange(1, len(mean) + 1)
            ax1.plot(steps, mean, color=cmap(i / max(1, len(lrs) - 1)), label=f"lr={lr:g}")
            if len(series) > 1:
                ax1.fill_between(steps, series.min(0), series.max(0), color=cmap(i / max(1, len(lrs) - 1)), alpha=0.2)
        ax1.set_yscale("log")
        ax1.set_xlabel("step k")
        ax1.set_ylabel("‖h(θ_k) − h(θ_0)‖ / ‖h(θ_0)‖")
        ax1.set_title(f"{model}: {head}")
        ax1.legend(fontsize=8)
        shown = list(fams)[:8]
        if head not in shown:
            shown = [head] + shown[:7]
        for j, fam in enumerate(shown):
            f = fams[fam]
            x = np.array(sorted(f["per_lr"]))
            y = np.array([f["per_lr"][lr][0] for lr in x])
            e = np.array([f["per_lr"][lr][1] for lr in x])
            line = ax2.errorbar(x, y, yerr=e, marker="o", ms=4, capsize=2, ls="none",
                                label=f"{fam} (slope {f['slope']:.2f})")
            if np.all(y > 0) and np.isfinite(f["slope"]):
                a = np.mean(np.log(y)) - f["slope"] * np.mean(np.log(x))  # the fit through the means
                ax2.plot(x, np.exp(a) * x ** f["slope"], ls="--", lw=0.8, color=line[0].get_color())
        th = THEORY_SLOPE[mode]
        x = np.array(sorted({lr for f in fams.values() for lr in f["per_lr"]}))
        y0 = fams[head]["per_lr"][x[0]][0]
        if y0 > 0:
            ax2.plot(x, y0 * (x / x[0]) ** th, color="k", lw=1.5, ls=":", label=f"theory: slope {th:g}")
        ax2.set_xscale("log")
        ax2.set_yscale("log")
        ax2.set_xlabel("learning rate τ")
        ax2.set_ylabel("final deviation")
        ax2.set_title(f"{model}: final deviation vs learning rate")
        ax2.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, f"drift_{model.replace('[', '_').replace(']', '')}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def profile(models, lrs, *, seeds=3, steps=50, time_T=None, batch=64, momentum=0.0, weight_decay=0.0,
            projections=("none",), device=None, out_dir="profile_out", progress=True, tasks=None):
    """Run the sweep; write results.json, results.csv and drift_<model>.png into `out_dir`."""
    import consopt

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tasks = tasks or {}
    mode = "time" if time_T else "steps"
    runs = []
    jobs = []
    for name in models:
        task = tasks.get(name) or BUILTIN[name]
        for seed in range(seeds):
            for proj in projections:
                for lr in lrs:
                    n = max(1, int(round(time_T / lr))) if time_T else steps
                    batch_j = min(batch, task.inputs.shape[0]) if task.inputs is not None else batch
                    jobs.append((task, seed, proj, lr, n, batch_j))
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(jobs), desc="profile", unit="run", file=sys.stderr)
        except ImportError:  # pragma: no cover
            bar = None
    data_cache, laws_cache, init_cache = {}, {}, {}
    for task, seed, proj, lr, n, batch_j in jobs:
        key = (task.data, task.image_size, task.channels)
        if task.inputs is not None:
            inputs, targets = task.inputs.to(device), task.targets.to(device)
        else:
            if key not in data_cache:
                data_cache[key] = load_digits_data(task.data, device, task.image_size, task.channels)
            inputs, targets = data_cache[key]
        if (task.name, seed) not in init_cache:
            torch.manual_seed(seed)
            init_cache[(task.name, seed)] = task.make().to(device).train()
        base = init_cache[(task.name, seed)]
        if task.name not in laws_cache:
            laws = consopt.find_laws(base, (inputs[:4],), loss="cross_entropy")
            fams = list(laws.families)
            if task.extra_families is not None:
                fams.append(task.extra_families(base))
            laws_cache[task.name] = LawSet(fams, laws.param_shapes, laws.notes, loss=laws.loss)
        r = run_one(task, base, laws_cache[task.name], inputs, targets, lr=lr, seed=seed, steps=n, batch=batch_j,
                    momentum=momentum, weight_decay=weight_decay, projection=proj, device=device)
        runs.append(r)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    os.makedirs(out_dir, exist_ok=True)
    orders = {(m, f.name): f.order for m, ls in laws_cache.items() for f in ls.families}
    table = summarize(runs, mode, orders)
    task_by_name = {t.name: t for t in (tasks.get(m) or BUILTIN[m] for m in models)}
    result = dict(
        schema="consopt.profile/1", mode=mode, theory_slope=THEORY_SLOPE[mode], device=str(device),
        torch=torch.__version__, models=list(models), lrs=list(lrs), seeds=seeds, steps=steps, time_T=time_T,
        batch=batch, momentum=momentum, weight_decay=weight_decay, projections=list(projections),
        summary={m: {f: dict(v, per_lr={str(k): list(x) for k, x in v["per_lr"].items()}) for f, v in fams.items()}
                 for m, fams in table.items()},
        runs=[dict(model=r.model, lr=r.lr, seed=r.seed, projection=r.projection, steps=r.steps, seconds=r.seconds,
                   loss=r.loss, rel=r.rel, abs=r.abs) for r in runs],
        laws={m: [dict(name=f.name, kind=f.kind, form=f.form, units=f.units, note=f.note)
                  for f in laws_cache[m].families] for m in models},
    )
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(result, f, indent=1, default=float)
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "family", "lr", "seed", "projection", "step", "rel_deviation", "abs_deviation"])
        for r in runs:
            for fam in r.rel:
                for k, (a, b) in enumerate(zip(r.rel[fam], r.abs[fam])):
                    w.writerow([r.model, fam, r.lr, r.seed, r.projection, k + 1, a, b])
    pngs = []
    try:
        pngs = plot(table, runs, task_by_name, out_dir, mode)
    except ImportError:  # pragma: no cover - matplotlib is an optional extra
        print("matplotlib is not installed: no plots (pip install 'consopt[plot]')", file=sys.stderr)
    return result, table, pngs


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def _floats(s, what):
    try:
        vals = [float(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise ProfileError(f"{what} must be a comma-separated list of numbers, got {s!r}") from None
    return vals


def add_profile_parser(sub):
    p = sub.add_parser("profile", help="drift of every conservation law vs learning rate (the main job)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="default", choices=sorted(PRESETS),
                   help="default: resnet+transformer, 4 lrs, 3 seeds, 50 steps (CPU, about 20–30 s on 2 cores); quick: tiny MLP; "
                        "paper: the ICML 2025 SGD design (ResNet-18, lr 1e-3..5e-3, 10 seeds; GPU)")
    p.add_argument("--models", help=f"comma-separated built-in models ({', '.join(BUILTIN)})")
    p.add_argument("--model", help="a user model: package.module:factory returning (model, inputs, targets) "
                                   "(this imports and runs that code)")
    p.add_argument("--lrs", help="comma-separated learning rates")
    p.add_argument("--seeds", type=int)
    p.add_argument("--steps", type=int, help="steps per run (fixed step count: theory slope 2)")
    p.add_argument("--time", dest="time_T", type=float, help="fixed training time T = steps × lr (theory slope 1)")
    p.add_argument("--batch", type=int)
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--projection", default="none", help="comma-separated: none, symmetry, euclidean")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--out", default="profile_out", help="output folder (created)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_profile)
    return p


def _user_task(spec):
    """`package.module:factory` returning (model, inputs, targets): imports and runs that code."""
    from .cli import UsageError, load_factory

    try:
        fn = load_factory(spec)
    except UsageError as e:
        raise ProfileError(str(e)) from None
    out = fn()
    if not (isinstance(out, (tuple, list)) and len(out) == 3 and isinstance(out[0], nn.Module)):
        raise ProfileError(f"{spec} must return (model, inputs, targets)")
    model, inputs, targets = out
    return Task(spec.split(":", 1)[1], lambda: copy.deepcopy(model), "user", inputs=inputs, targets=targets)


def cmd_profile(args):
    cfg = dict(PRESETS[args.preset])
    if args.models:
        cfg["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
    for k in ("seeds", "steps", "batch"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    try:
        if args.lrs:
            cfg["lrs"] = _floats(args.lrs, "--lrs")
        projections = [p.strip() for p in args.projection.split(",") if p.strip()]
        for p in projections:
            if p not in ("none", "symmetry", "euclidean"):
                raise ProfileError(f"--projection: unknown mode {p!r} (none, symmetry, euclidean)")
        if any(lr <= 0 or not math.isfinite(lr) for lr in cfg["lrs"]):
            raise ProfileError(f"learning rates must be positive, got {cfg['lrs']}")
        if args.time_T is not None and args.time_T <= 0:
            raise ProfileError(f"--time must be positive, got {args.time_T}")
        if cfg["seeds"] < 1 or cfg["steps"] < 1 or cfg["batch"] < 1:
            raise ProfileError("--seeds, --steps and --batch must be at least 1")
        tasks = {}
        if args.model:
            task = _user_task(args.model)
            tasks[task.name] = task
            cfg["models"] = [task.name]
        for m in cfg["models"]:
            if m not in BUILTIN and m not in tasks:
                raise ProfileError(f"unknown model {m!r}; built-in models: {', '.join(BUILTIN)}")
        if args.device not in (None, "cpu", "cuda"):
            raise ProfileError(f"--device must be cpu or cuda, got {args.device!r}")
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ProfileError("--device cuda: no CUDA device is available")
        try:
            os.makedirs(args.out, exist_ok=True)
            probe = os.path.join(args.out, ".write-test")
            with open(probe, "w") as f:
                f.write("")
            os.remove(probe)
        except OSError as e:
            raise ProfileError(f"cannot write to output folder {args.out!r}: {e.strerror or e}") from None
        t0 = time.perf_counter()
        result, table, pngs = profile(cfg["models"], cfg["lrs"], seeds=cfg["seeds"], steps=cfg["steps"],
                                      time_T=args.time_T, batch=cfg["batch"], momentum=args.momentum,
                                      weight_decay=args.weight_decay, projections=projections, device=args.device,
                                      out_dir=args.out, progress=not args.no_progress, tasks=tasks)
    except ProfileError as e:
        print(f"consopt profile: error: {e}", file=sys.stderr)
        return 2
    print(format_table(table, result["mode"]))
    print(f"wrote {os.path.join(args.out, 'results.json')}, results.csv, " + ", ".join(os.path.basename(p) for p in pngs)
          + f" in {time.perf_counter() - t0:.1f} s")
    return 0
