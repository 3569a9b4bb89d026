"""Gradient-flow reference: how far do discrete SGD steps land from the flow they discretize?

`gradient_flow` integrates the full-batch flow θ̇ = −∇L(θ) with an adaptive solver from
torchdiffeq (Chen et al., dopri5 by default; `pip install 'consopt[flow]'`). Along the flow every
conservation law is exact, so the solver's own tolerance is the only error.

`compare` runs, for each step size τ, plain (full-batch) SGD, SGD projected back onto the
conserved level set (`projection="symmetry"` and/or `"euclidean"`) and the flow, and reports at
the common times t = kτ (the checkpoints in `times`): the parameter distance to the flow, the
distance of the outputs on the data, and the law deviation max_f ‖h_f(θ) − h_f(θ₀)‖ / ‖h_f(θ₀)‖.
Plain SGD is a first-order method: at a fixed T its distance to the flow shrinks like τ.
"""

from __future__ import annotations

import copy
import math

import torch
from torch.func import functional_call

from .laws import LawSet


def _require_torchdiffeq():
    try:
        import torchdiffeq
    except ImportError as e:  # pragma: no cover - optional extra
        raise ImportError("consopt.flow needs torchdiffeq: pip install 'consopt[flow]'") from e
    return torchdiffeq


def _flat(model):
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    vec = torch.cat([params[n].detach().reshape(-1) for n in names])
    return names, shapes, vec


def _unflat(vec, names, shapes):
    out, off = {}, 0
    for n, s in zip(names, shapes):
        k = math.prod(s)
        out[n] = vec[off:off + k].view(s)
        off += k
    return out


def gradient_flow(model, inputs, targets, loss_fn, times, *, rtol=1e-7, atol=1e-9, method="dopri5", options=None):
    """θ(t) at each time in `times` (ascending, starting at 0) as a list of {name: tensor} dicts.

    `model` is not modified. Buffers (e.g. BatchNorm statistics) are held fixed at their values.
    ReLU networks have a flow that is not smooth where a pre-activation crosses 0: adaptive
    solvers then shrink their steps a lot at tight tolerances (a 3-6-2 ReLU MLP: 1.5k gradient
    evaluations at rtol 1e-6, 240k at 1e-8). Smooth models (linear networks) reach 1e-10 cheaply.
    `options` goes to torchdiffeq (e.g. {"max_num_steps": 10_000})."""
    tde = _require_torchdiffeq()
    m = copy.deepcopy(model)
    names, shapes, theta0 = _flat(m)
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    buffers = dict(m.named_buffers())

    def rhs(t, theta):
        with torch.enable_grad():
            th = theta.detach().requires_grad_(True)
            p = _unflat(th, names, shapes)
            loss = loss_fn(functional_call(m, {**p, **buffers}, inputs), targets)
            (g,) = torch.autograd.grad(loss, th)
        return -g

    t = torch.as_tensor(times, dtype=theta0.dtype)
    sol = tde.odeint(rhs, theta0, t, rtol=rtol, atol=atol, method=method, options=options)
    return [_unflat(s.detach().clone(), names, shapes) for s in sol]


def _law_dev(laws, params, h0):
    vals = laws.evaluate(params)
    worst = 0.0
    for k, v in vals.items():
        n0 = float(torch.linalg.vector_norm(h0[k]))
        d = float(torch.linalg.vector_norm(v - h0[k]))
        worst = max(worst, d / n0 if n0 > 0 else d)
    return worst


def _outputs(model, params, inputs):
    with torch.no_grad():
        out = functional_call(model, {**params, **dict(model.named_buffers())}, inputs)
    return out[0] if isinstance(out, tuple) else out


def compare(model, inputs, targets, loss_fn, T, lrs, *, laws: LawSet = None, modes=("plain", "symmetry", "euclidean"),
            checkpoints=4, rtol=1e-7, atol=1e-9):
    """Plain SGD, projected SGD and the gradient flow at matching times t = kτ ≤ T.

    Returns {"times": [...], "flow": {"law_dev": [...]}, "runs": [{"lr", "mode", "param_dist",
    "output_dist", "law_dev"} ...]} where each list has one entry per checkpoint time."""
    from .sgd import SGD

    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    if laws is None:
        from .discover import find_laws

        laws = find_laws(model, inputs)
    times = [T * (i + 1) / checkpoints for i in range(checkpoints)]
    for lr in lrs:
        for t in times:
            k = t / lr
            if abs(k - round(k)) > 1e-6:
                raise ValueError(f"checkpoint time {t} is not a whole number of steps of lr={lr}: choose T and "
                                 "lrs so that T / (checkpoints · lr) is an integer")
    flow = gradient_flow(model, inputs, targets, loss_fn, [0.0] + times, rtol=rtol, atol=atol)
    h0 = laws.evaluate(flow[0])
    ref = model
    result = {"times": times, "flow": {"law_dev": [_law_dev(laws, p, h0) for p in flow[1:]]}, "runs": []}
    flow_out = [_outputs(ref, p, inputs) for p in flow[1:]]
    for lr in lrs:
        for mode in modes:
            m = copy.deepcopy(model)
            run_laws = LawSet(laws.families, laws.param_shapes, laws.notes, loss=laws.loss).bind(m)
            opt = SGD(m.parameters(), lr=lr, laws=run_laws, projection=None if mode == "plain" else mode)
            row = {"lr": lr, "mode": mode, "param_dist": [], "output_dist": [], "law_dev": []}
            steps_done = 0
            for t, fp, fo in zip(times, flow[1:], flow_out):
                while steps_done < round(t / lr):
                    opt.zero_grad(set_to_none=True)
                    loss_fn(m(*inputs), targets).backward()
                    opt.step()
                    steps_done += 1
                params = dict(m.named_parameters())
                d = torch.sqrt(sum(((params[n].detach() - fp[n]) ** 2).sum() for n in fp))
                row["param_dist"].append(float(d))
                out = _outputs(m, {n: params[n].detach() for n in fp}, inputs)
                row["output_dist"].append(float(torch.linalg.vector_norm(out - fo) / math.sqrt(out.shape[0])))
                row["law_dev"].append(_law_dev(run_laws, params, h0))
            result["runs"].append(row)
    return result


def format_comparison(result) -> str:
    """A plain-text table of `compare`'s result at the final time T."""
    lines = [f"{'lr':>8}  {'mode':<10}  {'‖θ−θ_flow‖':>12}  {'output dist':>12}  {'law deviation':>13}"]
    for r in result["runs"]:
        lines.append(f"{r['lr']:>8g}  {r['mode']:<10}  {r['param_dist'][-1]:>12.3e}  {r['output_dist'][-1]:>12.3e}"
                     f"  {r['law_dev'][-1]:>13.3e}")
    lines.append(f"{'flow':>8}  {'dopri5':<10}  {0.0:>12.3e}  {0.0:>12.3e}  {result['flow']['law_dev'][-1]:>13.3e}")
    return "\n".join(lines)
