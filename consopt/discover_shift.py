"""Translation laws and approximate scale laws, by forward propagation of a symbolic shift/scale.

For each producer (Linear, Conv, Embedding, norm affine) we push a symbolic perturbation of its
output forward through the graph and ask whether every op that sees it either passes it on
unchanged in kind or absorbs it:

  mode      perturbation of the producer               absorbed by                        law
  token     W → W + 1vᵀ, b → b + t1 (same shift        LayerNorm over the channels,       Σ_rows W (a vector),
            for every channel of a token)              softmax, cross-entropy logits      Σ b
  channel   b_c → b_c + t_c (constant over batch)      BatchNorm (training)               b_c
  cscale    row c of W̃ scaled by d_c > 0               BatchNorm (training)               ‖W̃_c‖²   (approximate)
  pscale    the whole producer W̃ scaled by d > 0       LayerNorm / RMSNorm                ‖W̃‖²     (approximate)
  ushift    b → b + t1 (one constant everywhere)       as token; a shift that reaches     Σ b_A − Σ b_B
                                                       the output is cancelled by another
                                                       producer's whose shift reaches it too

ushift is the pre-norm residual stream without a final norm: adding t to every entry of the
attention output's bias is absorbed by the next LayerNorm on the stream's branch but flows on
along the skip to the output, where subtracting t from the MLP's output bias cancels it. Only
shifts that reach the output with coefficient +1 (through adds and layout ops, no scaling or
negation) are paired, so k such biases give k − 1 laws.

The scale laws are exact only with eps = 0 (SPEC §5): they are emitted only with
approximate=True, flagged, and not counted. Kunin et al., "Neural Mechanics" (ICLR 2021).
"""

from __future__ import annotations

import torch

from .discover import LAYOUT_OPS, _compress, _EinsumPlan, _expand, _opname, apply_layout, constant_index, modules_of
from .laws import Family, Term

# ops that pass a shift on unchanged (averages of a constant are that constant)
_UNIFORM_PASS = {"clone", "contiguous", "alias", "_to_copy", "to", "lift_fresh_copy", "avg_pool1d", "avg_pool2d",
                 "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "identity"}
SHIFT_PASS = {"ushift": _UNIFORM_PASS,  # no neg: the output shift must keep its sign
              "token": _UNIFORM_PASS | {"neg"},
              # a per-channel constant also passes a max over positions of that channel
              "channel": _UNIFORM_PASS | {"neg", "max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices"}}
SCALE_PASS = {"clone", "contiguous", "alias", "_to_copy", "to", "lift_fresh_copy", "neg", "relu", "leaky_relu",
              "max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices", "avg_pool1d", "avg_pool2d",
              "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "identity",
              "feature_dropout"}


def _shape(node):
    v = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return tuple(v.shape) if torch.is_tensor(v) else None


def _constant_along(t, shape, dims):
    t = _expand(t, [1] * (len(shape) - t.dim()) + list(t.shape)) if t.dim() < len(shape) else t
    return all(t.shape[d] == 1 for d in dims)


def _full_along(t, shape):
    return bool((_expand(t, shape) >= 0).all())


GROUP_BASE = 1 << 40  # tag ids at or above this stand for a set of channel symbols (after a contraction)


def _propagate(nodes, start_idx, start_tag, mode, loss, walk):
    """Which symbols of the perturbation starting at nodes[start_idx] are absorbed wherever they go.

    Returns the set of broken symbols, or None if none broke. Uniform modes ("token", "pscale",
    "ushift") stop at the first break and return {"all"}; "ushift" returns {"output"} when the
    shift reaches the model's output unchanged and is absorbed everywhere else."""
    carry = {nodes[start_idx]: start_tag}
    groups = {}
    broken = set()
    per_channel = mode in ("channel", "cscale")
    for node in nodes[start_idx + 1:]:
        ins = [a for a in node.all_input_nodes if a in carry]
        if not ins:
            continue
        if _node(node, carry, groups, mode, loss, broken, walk):
            continue
        if not per_channel:
            return {"all"}
        for a in ins:  # every symbol that reached this op is lost
            ts = carry[a] if isinstance(carry[a], tuple) else (carry[a],)
            for t in ts:
                if torch.is_tensor(t):
                    for v in torch.unique(t[t >= 0]).tolist():
                        broken |= groups.get(v, {v})
        carry.pop(node, None)
    return broken or None


def _key_shift(ta, tb, out_shape, groups, broken):
    """q @ (k + δ)ᵀ in matmul layout (tb: [..., d, keys]): a per-channel shift of the contracted
    side, constant along the keys, adds a per-query constant to every key's logit (absorbed by a
    softmax over the keys). The query side's symbols (ta) are lost. Returns the product's tags
    (one group symbol per query row), or None if the shift does not pass."""
    if ta is not None:
        for v in torch.unique(ta[ta >= 0]).tolist():
            broken |= groups.get(v, {v})
    tb_c = _compress(tb)
    if tb_c.shape[-1] != 1 or not bool((tb >= 0).all()):
        return None
    members = {int(v) for v in torch.unique(tb_c).tolist()}
    members = set().union(*(groups.get(v, {v}) for v in members))
    base = GROUP_BASE + len(groups) * 1_000_003
    rows = torch.arange(out_shape[-2], dtype=torch.int64)
    for r in rows.tolist():
        groups[base + r] = members
    return (base + rows).reshape([1] * (len(out_shape) - 2) + [out_shape[-2], 1])


def _node(node, carry, groups, mode, loss, broken, walk):
    """Apply one op to the carried perturbation; False if the op breaks it (then nothing is carried).
    `walk`: the channel walk (its in-place ops followed as out-of-place, its constants)."""
    scale = mode in ("cscale", "pscale")
    name = _opname(node.target) if node.op == "call_function" else node.op
    if node in walk.inplace:  # `out += identity` the walk followed as `out + identity`
        name = name[:-1]
    get = lambda a: carry.get(a) if torch.is_tensor(carry.get(a)) else None
    if node.op == "output":
        outs = node.args[0] if isinstance(node.args[0], (tuple, list)) else (node.args[0],)
        if mode not in ("token", "ushift") or len(outs) != 1:
            return False
        t, shape = get(outs[0]), _shape(outs[0])
        if mode == "ushift":
            if t is None or not _full_along(t, shape) or any(d != 1 for d in _compress(_expand(t, shape)).shape):
                return False
            broken.add("output")  # cross-entropy would absorb it, but then "token" already holds
            return True
        if loss != "cross_entropy":
            return False
        cdim = 1 if len(shape) >= 2 else 0
        if t is None or not _full_along(t, shape):
            return False
        if not _constant_along(_compress(_expand(t, shape)), shape, [cdim]):
            return False
        return True
    if node.op != "call_function":
        return False
    if name == "getitem":
        src, i = node.args
        t = carry.get(src)
        if isinstance(t, tuple) and i < len(t) and t[i] is not None:
            carry[node] = t[i]
        return True
    if name == "index":  # constant indices: the positions move (see discover._index)
        t = get(node.args[0])
        out = None if t is None else constant_index(node, t, _shape(node.args[0]), walk.consts)
        if out is None:
            return False
        carry[node] = out
        return True
    if name in LAYOUT_OPS:
        try:
            out = apply_layout(node, get, _shape)
        except Exception:  # noqa: BLE001
            return False
        if out is not None:
            carry[node] = out
        return True
    shape = _shape(node)
    if name in ("layer_norm", "native_layer_norm", "rms_norm"):
        if mode not in ("token", "ushift", "pscale") or (mode in ("token", "ushift") and name == "rms_norm"):
            return False
        if node.args[0] not in carry or len(node.args[1]) != 1:
            return False
        t = get(node.args[0])
        xs = _shape(node.args[0])
        if not _full_along(t, xs) or not _constant_along(_compress(_expand(t, xs)), xs, [len(xs) - 1]):
            return False
        return True  # absorbed
    if name in ("batch_norm", "native_batch_norm", "_native_batch_norm_legit_functional", "_native_batch_norm_legit"):
        if mode not in ("channel", "cscale") or node.args[0] not in carry or not bool(node.args[5]):
            return False
        t = get(node.args[0])
        xs = _shape(node.args[0])
        full = _compress(_expand(t, xs))
        if not _constant_along(full, xs, [d for d in range(len(xs)) if d != 1]):
            return False
        return True  # absorbed per channel
    if name in ("softmax", "_softmax", "log_softmax", "_log_softmax") and mode in ("token", "ushift"):
        t = get(node.args[0])
        xs = _shape(node.args[0])
        d = node.args[1] % len(xs)
        if not _full_along(t, xs) or not _constant_along(_compress(_expand(t, xs)), xs, [d]):
            return False
        return True
    if name in ("dropout", "native_dropout"):
        p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
        if (train and p > 0) and not scale:
            return False
        t = get(node.args[0])
        carry[node] = (t, None) if name == "native_dropout" else t
        return True
    if name in ("add", "sub", "rsub"):
        a, b = node.args[0], node.args[1]
        ta = get(a) if isinstance(a, torch.fx.Node) else None
        tb = get(b) if isinstance(b, torch.fx.Node) else None
        if ta is not None and tb is not None:
            if not scale:
                return False
            fa, fb = _expand(ta, shape), _expand(tb, shape)
            if not torch.equal(fa, fb) or not bool((fa >= 0).all()):
                return False
            carry[node] = _compress(fa)
            return True
        if scale:
            return False  # adding an unscaled value breaks the scaling
        if mode == "ushift":  # the shift must reach the output with coefficient +1
            alpha = node.kwargs.get("alpha", node.args[2] if len(node.args) > 2 else 1)
            scaled = (tb is not None) if name != "rsub" else (ta is not None)
            if (scaled and (alpha != 1 or name != "add")) or (name == "rsub" and ta is not None):
                return False
        carry[node] = _compress(_expand(ta if ta is not None else tb, shape))
        return True
    if name in ("mul", "div"):
        if mode == "ushift":
            return False
        a, b = node.args[0], node.args[1]
        ta = get(a) if isinstance(a, torch.fx.Node) else None
        tb = get(b) if isinstance(b, torch.fx.Node) else None
        if ta is not None and tb is not None:
            return False
        other = b if ta is not None else a
        if name == "div" and tb is not None:
            return False
        if isinstance(other, torch.fx.Node) and not scale:
            return False  # a shift times data is no longer a shift
        carry[node] = _compress(_expand(ta if ta is not None else tb, shape))
        return True
    if name in ("bmm", "matmul", "baddbmm") and mode == "channel":
        a, b = node.args[1:3] if name == "baddbmm" else node.args[:2]
        if b not in carry or (name == "baddbmm" and node.args[0] in carry):
            return False
        out = _key_shift(get(a) if a in carry else None, _expand(get(b), _shape(b)), _shape(node), groups, broken)
        if out is None:
            return False
        carry[node] = out
        return True
    if name == "einsum" and mode == "channel":
        plan = _EinsumPlan.of(node.args[0], [_shape(x) for x in node.args[1]])
        if plan is None or node.args[1][1] not in carry or not plan.contr:
            return False
        a, b = node.args[1]
        out = _key_shift(plan.lay(get(a), 0) if a in carry else None, plan.lay(get(b), 1), plan.bs + (plan.n, plan.m),
                         groups, broken)
        if out is None:
            return False
        carry[node] = plan.unlay(out)
        return True
    if name == "scaled_dot_product_attention" and mode == "channel":
        q, k, v = node.args[:3]
        if k not in carry:
            return False
        for side in (q, v):  # their symbols are lost; the key side's shift is absorbed
            if side in carry:
                ts = get(side)
                for sym in torch.unique(ts[ts >= 0]).tolist():
                    broken |= groups.get(sym, {sym})
        tk, ks = get(k), _shape(k)
        ck = _compress(_expand(tk, ks))
        return ck.shape[-2] == 1 and bool((_expand(tk, ks) >= 0).all())  # absorbed by the softmax
    if name in ("softmax", "_softmax", "log_softmax", "_log_softmax") and mode == "channel":
        t = get(node.args[0])
        xs = _shape(node.args[0])
        d = node.args[1] % len(xs)
        return bool(_full_along(t, xs)) and _constant_along(_compress(_expand(t, xs)), xs, [d])
    if scale and name in SCALE_PASS or (not scale and name in SHIFT_PASS[mode]):
        t = get(node.args[0])
        xs = _shape(node.args[0])
        val = node.meta.get("val")
        os_ = tuple((val[0] if isinstance(val, (tuple, list)) else val).shape)
        if os_ != xs:
            full = _compress(_expand(t, xs))
            if any(a != b and full.shape[d] != 1 for d, (a, b) in enumerate(zip(xs, os_))):
                return False
            t = full
        carry[node] = (t, None) if isinstance(val, (tuple, list)) else t
        return True
    return False
    return True


def shift_laws(walk, ep, *, loss, approximate, param_order):
    nodes = list(ep.graph_module.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    tied = walk.tied()
    out = []
    arrivals = []  # (bias, size): uniform bias shifts that reach the output unchanged
    for pr in walk.producers:
        node, W, B, n, dim, kind = pr["node"], pr["W"], pr["B"], pr["n"], pr["dim"], pr["kind"]
        if (W in tied) or (B in tied):
            continue
        shape = _shape(node) if _shape(node) is not None else tuple(node.meta["val"][0].shape)
        view = [1] * len(shape)
        view[dim] = n
        per_channel = torch.arange(n, dtype=torch.int64).reshape(view)
        uniform = torch.zeros([1] * len(shape), dtype=torch.int64)
        # A per-token shift is the same for every channel of one token, and differs across tokens:
        # tag each position by its token (its index over the non-channel dims).
        tshape = [s if d != dim else 1 for d, s in enumerate(shape)]
        per_token = torch.arange(max(1, int(torch.tensor(tshape).prod())), dtype=torch.int64).reshape(tshape)
        i0 = index[node]
        start = (lambda t: (t,) + (None,) * (len(node.meta["val"]) - 1)) if isinstance(node.meta.get("val"), (tuple, list)) else (lambda t: t)
        units = torch.arange(n, dtype=torch.int64)[:, None]
        whole = torch.arange(n, dtype=torch.int64)[None, :]
        w0, b0 = pr.get("w0", 0), pr.get("b0", 0)  # first rows of a row block (a packed weight)
        # token translation: weights vary per token, so only per-token absorbers count.
        token_ok = False
        if kind in ("linear", "embedding") and W is not None:
            token_ok = _propagate(nodes, i0, start(_compress(per_token)), "token", loss, walk) is None
            if token_ok:
                terms = [Term(W, pr["w_axis"], units + w0, +1)] + ([Term(B, 0, units + b0, +1)] if B else [])
                out.append(Family("", "translation", "vector", 1, terms, note="per-token shift absorbed downstream"))
        # channel translation of the bias alone.
        if B is not None and kind in ("linear", "conv", "norm"):
            broken = _propagate(nodes, i0, start(per_channel), "channel", loss, walk)
            keep = [c for c in range(n) if broken is None or c not in broken]
            if keep:
                out.append(Family("", "translation", "diag", 1, [Term(B, 0, torch.tensor(keep)[:, None] + b0, +1)],
                                  note="per-channel bias shift absorbed downstream (batch norm, softmax over keys)"))
            if not token_ok and len(keep) < n and _propagate(nodes, i0, start(uniform), "ushift", loss, walk) == {"output"}:
                arrivals.append((B, b0, n))
        if not approximate or kind == "norm":
            continue
        if kind in ("linear", "conv") and _propagate(nodes, i0, start(per_channel), "cscale", loss, walk) is None:
            terms = [Term(W, pr["w_axis"], units + w0, +1)] + ([Term(B, 0, units + b0, +1)] if B else [])
            out.append(Family("", "scale", "diag", 2, terms, approximate=True,
                              note="exact only for eps = 0 in the normalization"))
        elif kind in ("linear", "conv", "embedding") and _propagate(nodes, i0, start(uniform), "pscale", loss, walk) is None:
            terms = [Term(W, pr["w_axis"], whole + w0, +1)] + ([Term(B, 0, whole + b0, +1)] if B else [])
            out.append(Family("", "scale", "diag", 2, terms, approximate=True,
                              note="exact only for eps = 0 in the normalization"))
    # Σ b_A − Σ b_B: shift b_A by t·1 and b_B by −t·1; both reach the output as ±t and cancel.
    for B, b0, n in arrivals[1:]:
        B0, f0, n0 = arrivals[0]
        out.append(Family("", "translation", "diag", 1, [Term(B0, 0, torch.arange(f0, f0 + n0)[None, :], +1),
                                                         Term(B, 0, torch.arange(b0, b0 + n)[None, :], -1)],
                          note="uniform bias shifts that cancel at the output (pre-norm residual stream)"))
    for f in out:
        f.modules = modules_of(f.terms)
    return out
