"""find_laws: every conservation law of a model, from its traced graph.

Discovery principle (SPEC §5). The model is traced by `torch.export` into aten ops. Every
producer (Linear/Conv rows with their bias, a norm's affine γ, β, an embedding's columns, a
parameter added to a tagged tensor) creates *channels*. Integer channel-id tensors are pushed
through the graph's own shape ops, so every tensor knows which channel sits at each position.
Each op then does one of four things to the channels it touches (its entry in `RULES`):

  * merge:    a sum joins channels elementwise (residual adds): they transform together;
  * pair:     a contraction q·k joins channels as duals (k transforms by A⁻ᵀ when q does by A);
  * restrict: caps their group at GL(r), positive diagonal, or nothing (non-homogeneous ops,
              norm statistics, the model's output, unknown ops);
  * label:    marks channels that an op treats differently (attention heads), so that they
              are never mixed by one group element.

A *feature space* is then a set of channel classes with the same producers, consumers and
labels; its law is the Noether charge Σ W̃W̃ᵀ − Σ WᵀW of the largest group every op allows
(the matrix for GL, its diagonal for diagonal groups). Translation laws (a per-token shift
absorbed by LayerNorm or softmax cross-entropy, a per-channel bias shift absorbed by BatchNorm)
and approximate scale laws come from a second, forward propagation of symbolic shifts/scales.
When in doubt, a rule restricts to nothing: a wrong law is worse than a missing one.

A producer's weight may be a block of a parameter's rows (a split of a packed projection, as
cross-attention's q | kv): its terms sit at those rows. A parameter that reaches an op by a path
no rule follows, or whose uses overlap (tied weights), keeps no law.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict

import numpy as np
import torch

from .laws import Family, LawSet, Term

GL, DIAG, NONE = 2, 1, 0
aten = torch.ops.aten


class LawDiscoveryError(ValueError):
    """find_laws could not trace or understand the model (the message says what and how to fix)."""


# ----------------------------------------------------------------------------------------------
# Channel bookkeeping: recorded during the walk, resolved at the end (union-find with parity).
# ----------------------------------------------------------------------------------------------
class _Channels:
    def __init__(self):
        self.n = 0
        self.level = []  # per concrete id
        self.traits = defaultdict(set)  # id -> {"gate", "qk", "vo", "stream"}
        self.labels = []  # (ids ndarray, label)
        self.terms = []  # (id, param, axis, sign, positions tuple)
        self.unions = []  # (ids_a ndarray, ids_b ndarray, parity)
        self.restricts = []  # (ids ndarray, level)
        self.dead = set()  # ids restricted to nothing so far: no law can reach them any more

    def new(self, n: int, level: int) -> torch.Tensor:
        base = self.n
        self.n += n
        self.level.extend([level] * n)
        return torch.arange(base, base + n, dtype=torch.int64)

    @staticmethod
    def _ids(t) -> np.ndarray:
        if t is None:
            return np.zeros(0, dtype=np.int64)
        a = t.reshape(-1).numpy() if torch.is_tensor(t) else np.asarray(t, dtype=np.int64).reshape(-1)
        a = np.unique(a)
        return a[a >= 0]

    def restrict(self, t, level: int):
        ids = self._ids(t)
        if ids.size:
            self.restricts.append((ids, level))
            if level == NONE:
                self.dead.update(ids.tolist())

    def all_dead(self, t) -> bool:
        """Every channel of `t` was restricted to nothing: `t` is data to any later law."""
        ids = self._ids(t)
        return bool(ids.size) and all(i in self.dead for i in ids.tolist())

    def label(self, t, label):
        ids = self._ids(t)
        if ids.size:
            self.labels.append((ids, label))

    def trait(self, t, name: str):
        for i in self._ids(t):
            self.traits[int(i)].add(name)

    def union(self, a: torch.Tensor, b: torch.Tensor, parity: int):
        a = a.reshape(-1)
        b = b.reshape(-1)
        keep = (a >= 0) & (b >= 0)
        if keep.any():
            a, b = a[keep].numpy(), b[keep].numpy()
            key = np.unique(a * (self.n + 1) + b)
            self.unions.append((key // (self.n + 1), key % (self.n + 1), parity))

    def term(self, ids, positions, param: str, axis: int, sign: int):
        """Channel ids[i] owns the slice at `positions` of `param` along `axis`.

        `positions` is (counts, flat) from _group_positions, or None for position i per id i."""
        ids = ids.numpy() if torch.is_tensor(ids) else np.asarray(ids, dtype=np.int64)
        if positions is None:
            counts, flat = np.ones(len(ids), dtype=np.int64), np.arange(len(ids), dtype=np.int64)
        else:
            counts, flat = positions
        if len(ids):
            self.terms.append((ids, counts, flat, param, axis, sign))


def _group_positions(vec: torch.Tensor):
    """For a 1-D tag vector: (unique ids, (counts, positions sorted by id then position))."""
    pos = torch.nonzero(vec >= 0).reshape(-1)
    if pos.numel() == 0:
        return torch.zeros(0, dtype=torch.int64), (np.zeros(0, np.int64), np.zeros(0, np.int64))
    ids = vec[pos]
    order = torch.argsort(ids * (vec.numel() + 1) + pos)
    ids, pos = ids[order], pos[order]
    uniq, counts = torch.unique_consecutive(ids, return_counts=True)
    return uniq, (counts.numpy(), pos.numpy())


def _compress(t: torch.Tensor) -> torch.Tensor:
    """Shrink every dim along which `t` is constant to size 1 (tags broadcast back)."""
    for d in range(t.dim()):
        if t.shape[d] > 1:
            first = t.narrow(d, 0, 1)
            if torch.equal(t, first.expand_as(t)):
                t = first
    return t.contiguous()


def _expand(t: torch.Tensor, shape) -> torch.Tensor:
    shape = tuple(shape)
    if t.dim() < len(shape):
        t = t.reshape((1,) * (len(shape) - t.dim()) + tuple(t.shape))
    return t.expand(shape).contiguous()


def _is_tagged(t) -> bool:
    return torch.is_tensor(t) and bool((t >= 0).any())


# ----------------------------------------------------------------------------------------------
# The walk
# ----------------------------------------------------------------------------------------------
class _Walk:
    def __init__(self, gm, param_of: dict, constants: dict | None = None):
        self.gm = gm
        # placeholder name -> value of a tensor constant the trace lifted (an index list built in
        # forward): `index` with constant indices moves channels like a layout op
        self.consts = {n: constants[n.name] for n in gm.graph.nodes
                       if n.op == "placeholder" and constants and n.name in constants}
        self.param_of = param_of  # placeholder node name -> parameter FQN
        self.ch = _Channels()
        self.tags = {}  # node -> tag tensor | tuple | None
        self.param_users = defaultdict(set)  # parameter -> ops that use it whole
        self.consumed = defaultdict(int)  # (op, argument): times a rule took that argument as a parameter
        self.row_users = defaultdict(list)  # parameter -> [(op, first row, end row)]: packed slices
        self.views = {}  # node -> (parameter, first row, rows), or a tuple of them (a split)
        self.inplace = set()  # in-place ops followed as their out-of-place forms (`_fresh_target`)
        self.transposed = {}  # node -> parameter: W.T, W.t(), W.transpose(0, 1) of a 2-D parameter
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.untracked = set()  # parameters some op uses in a way no rule follows
        self._param_shapes = {param_of[n.name]: tuple(n.meta["val"].shape) for n in gm.graph.nodes
                              if n.op == "placeholder" and n.name in param_of}
        self.unknown = defaultdict(int)
        self.notes = []
        self.producers = []  # dicts: node, W, w_axis, B, dim, n, kind (for translation/scale laws)

    # -- helpers used by rules ----------------------------------------------------------------
    def shape(self, node):
        val = node.meta.get("val") if hasattr(node, "meta") else None
        return tuple(val.shape) if torch.is_tensor(val) else None

    def tag(self, arg):
        if isinstance(arg, torch.fx.Node):
            t = self.tags.get(arg)
            return t if torch.is_tensor(t) and _is_tagged(t) else None
        return None

    def param(self, arg, node=None):
        if isinstance(arg, torch.fx.Node) and arg.op == "placeholder" and arg.name in self.param_of:
            name = self.param_of[arg.name]
            if node is not None:
                self.took(name, node, arg)
            return name
        return None

    def took(self, P, node, arg, rows=None):
        """Op `node`'s rule took argument `arg` as parameter P (whole, or the rows (first, end))."""
        if rows is None:
            self.param_users[P].add(node.name)
        else:
            self.row_users[P].append((node.name,) + rows)
        self.consumed[(node.name, arg.name)] += 1

    def param_rows(self, arg, node):
        """(parameter, first row, whole) for a parameter or a block of its rows (a split of a
        packed weight, as nn.MultiheadAttention's cross-attention q | kv); (None, 0, True) else."""
        P = self.param(arg, node)
        if P is not None:
            return P, 0, True
        v = self.views.get(arg) if isinstance(arg, torch.fx.Node) else None
        if v is None or isinstance(v, tuple) and isinstance(v[0], tuple):
            return None, 0, True
        P, start, n = v
        self.took(P, node, arg, (start, start + n))
        return P, start, n == self._param_shapes[P][0]

    def tied(self) -> set:
        """Parameters whose laws are dropped: used by several ops (tied or reused, or two
        overlapping row blocks), or by an op no rule follows."""
        out = set(self.untracked)
        for P in set(self.param_users) | set(self.row_users):
            whole, rows = self.param_users.get(P, ()), sorted(self.row_users.get(P, ()), key=lambda u: u[1])
            if len(whole) + bool(rows) > 1 or any(b[1] < a[2] for a, b in zip(rows, rows[1:])):
                out.add(P)
        return out

    def is_tensor_node(self, arg):
        return isinstance(arg, torch.fx.Node) and torch.is_tensor(arg.meta.get("val"))

    def tagged_inputs(self, node):
        out = []
        for a in node.all_input_nodes:
            t = self.tags.get(a)
            if isinstance(t, tuple):
                out.extend(x for x in t if x is not None and _is_tagged(x))
            elif t is not None and _is_tagged(t):
                out.append(t)
        return out

    def break_all(self, node):
        for t in self.tagged_inputs(node):
            self.ch.restrict(t, NONE)

    def new_out(self, n, level, shape, dim):
        """New channel ids laid along `dim` of a tensor of `shape` (other dims broadcast)."""
        ids = self.ch.new(n, level)
        view = [1] * len(shape)
        view[dim] = n
        return ids, ids.reshape(view)

    def add_producers(self, node, ids, params_axes):
        """Channel i owns slice i (+ the first row of a row block) of each (param, axis[, first])."""
        for p, axis, *first in params_axes:
            if p is not None:
                start = first[0] if first else 0
                pos = None if not start else (np.ones(len(ids), np.int64), np.arange(start, start + len(ids)))
                self.ch.term(ids, pos, p, axis, +1)

    # -- main loop --------------------------------------------------------------------------
    def run(self):
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self.tags[node] = None
            elif node.op == "call_function":
                name = _opname(node.target)
                src = node.args[0] if node.args else None
                if name in _SAME_VALUE and isinstance(src, torch.fx.Node) and src in self.consts:
                    self.consts[node] = self.consts[src]  # (a constant copied or cast is that constant)
                rule = RULES.get(name)
                if rule is None and name.endswith("_") and name[:-1] in RULES and self._fresh_target(node):
                    rule = RULES[name[:-1]]  # x += y on a tensor nothing else reads: as x + y
                    self.inplace.add(node)
                if rule is None:
                    if self.tagged_inputs(node):
                        self.unknown[_opname(node.target)] += 1
                    self.break_all(node)
                    self.tags[node] = None
                else:
                    self.tags[node] = rule(self, node)
            elif node.op == "output":
                for t in self.tagged_inputs(node):
                    self.ch.restrict(t, NONE)
            else:
                self.break_all(node)
                self.tags[node] = None
        self._check_uses()
        for name in sorted(self.tied() - self.untracked):
            n = len(self.param_users.get(name, ())) + len(self.row_users.get(name, ()))
            self.notes.append(f"parameter {name} is used by {n} ops (tied or reused): its laws are dropped")

    def _fresh_target(self, node) -> bool:
        """An in-place op (`out += identity`) acts as its out-of-place form when the tensor it
        writes is an op's fresh output (or an in-place op followed so) that no other op reads
        later, nor any view or alias of it (torch.export hands later readers the in-place op's
        own output, but a view taken before still reads the written memory)."""
        a = node.args[0] if node.args else None
        if not isinstance(a, torch.fx.Node) or a.op != "call_function" or not (
                _opname(a.target) in _FRESH_OPS or a in self.inplace):
            return False
        for u in a.users:
            if u is node:
                continue
            name = _opname(u.target) if u.op == "call_function" else u.op
            if self.order[u] > self.order[node] or name in LAYOUT_OPS or name in _SAME_VALUE or \
                    name in ("getitem", "expand_as", "view_as") or name.endswith("_"):
                return False
        return True

    def _check_uses(self):
        """A parameter that reaches an op no rule follows (tanh(W), a penalty on W, W.t() @ x,
        W twice in one op) breaks the symmetries of its laws, whatever its other uses: mark it
        untracked. A use is followed when the op's rule took that very argument as a parameter
        (as often as it occurs), or the op is a view of it (a row block, W.T) whose every use is."""

        def count(u, x):
            n = 0
            for a in list(u.args) + list(u.kwargs.values()):
                n += sum(1 for b in a if b is x) if isinstance(a, (list, tuple)) else a is x
            return n

        def first_bad(x):
            """The first op that reads x (a parameter or a view of one) in a way no rule follows."""
            for u in x.users:
                if self.consumed[(u.name, x.name)] >= count(u, x):
                    continue
                if (u in self.views or u in self.transposed) and count(u, x) == 1:
                    bad = first_bad(u)
                    if bad is None:
                        continue
                    return bad
                return u
            return None

        for node in self.gm.graph.nodes:
            P = self.param_of.get(node.name) if node.op == "placeholder" else None
            bad = first_bad(node) if P is not None else None
            if bad is not None:
                self.untracked.add(P)
                self.notes.append(f"parameter {P} is used by {bad.name} ({_opname(bad.target)}), which no law "
                                  "follows: its laws are dropped")


def _opname(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket.__name__
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target.__name__
    return getattr(target, "__name__", str(target))


# ----------------------------------------------------------------------------------------------
# Op rules: one entry per op. Each takes (walk, node) and returns the node's output tags.
# ----------------------------------------------------------------------------------------------
RULES = {}


def rule(*names):
    def deco(fn):
        for n in names:
            RULES[n] = fn
        return fn

    return deco


def _consume_last(w: _Walk, x, W: str, axis: int, node):
    """The input's tags along its last dim are read by parameter W along `axis` (a consumer)."""
    t = w.tag(x)
    if t is None:
        return
    if any(s > 1 for s in t.shape[:-1]):
        w.ch.restrict(t, NONE)  # channel layout varies across rows: no clean consumer slice
        return
    n_in = w.shape(x)[-1]
    vec = t.reshape(-1).expand(n_in) if t.shape[-1] == 1 else t.reshape(-1)
    ids, positions = _group_positions(vec)
    w.ch.term(ids, positions, W, axis, -1)


def _consume_dim(w: _Walk, x, W: str, axis: int, dim: int, repeat: int = 1, groups: int = 1):
    """The input's tags along `dim` are read by parameter W along `axis`; with `repeat` = m,
    input channel i is read by the m slices i·m … i·m+m−1 (a depthwise conv's rows); with
    `groups` = G (a grouped conv, c = n/G input channels per group), input channel g·c + j is
    read by block g of column j: position j·G + g of the refined axis (`Term.groups`)."""
    t = w.tag(x)
    if t is None:
        return
    shape = w.shape(x)
    t = _expand(t, [1 if i != dim else s for i, s in enumerate(shape)]) if t.shape[dim] == 1 else t
    if any(s > 1 for i, s in enumerate(t.shape) if i != dim):
        w.ch.restrict(t, NONE)
        return
    vec = t.reshape(-1).repeat_interleave(repeat)
    if groups > 1:
        c = vec.numel() // groups
        p = torch.arange(vec.numel())
        vec = vec[(p % groups) * c + p // groups]  # refined position p = j·G + g holds channel g·c + j
    ids, positions = _group_positions(vec)
    w.ch.term(ids, positions, W, axis if groups == 1 else (axis, groups), -1)


def _dense_out(w: _Walk, node, W: str, w_axis: int, B=None, level=GL, w0: int = 0, b0: int = 0):
    """Output channels along the last dim of a dense product (Linear, x @ W, x @ W.T, addmm):
    channel i owns slice w0 + i of W along `w_axis` and entry b0 + i of the bias B."""
    shape = w.shape(node)
    ids, out = w.new_out(shape[-1], level, shape, len(shape) - 1)
    w.add_producers(node, ids, [(W, w_axis, w0), (B, 0, b0)])
    w.producers.append(dict(node=node, W=W, w_axis=w_axis, B=B, dim=len(shape) - 1, n=shape[-1], kind="linear",
                            w0=w0, b0=b0))
    return out


@rule("linear")
def _linear(w: _Walk, node):
    x, weight = node.args[0], node.args[1]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    W, w0, whole = w.param_rows(weight, node)
    if W is None:
        w.break_all(node)
        return None
    if whole:
        _consume_last(w, x, W, 1, node)
    else:  # a column of a row block is no whole column of W: no consumer term can say it
        t = w.tag(x)
        if t is not None:
            w.ch.restrict(t, NONE)
    B, b0, _ = w.param_rows(bias, node) if bias is not None else (None, 0, True)
    # a bias that is not (a row block of) a parameter, e.g. a buffer, adds what no law term
    # follows: no law
    level = NONE if bias is not None and B is None else GL
    return _dense_out(w, node, W, 0, B, level, w0, b0)


@rule("conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
def _conv(w: _Walk, node):
    name = _opname(node.target)
    x, weight = node.args[0], node.args[1]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    transposed = name.startswith("conv_transpose") or (name == "convolution" and bool(node.args[6]))
    if name == "convolution":
        groups = node.args[8]
    else:  # convNd and conv_transposeNd both take groups at position 6
        groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
    W = w.param(weight, node)
    shape = w.shape(node)
    if W is None or (groups != 1 and transposed):
        w.break_all(node)
        ids, out = w.new_out(shape[1], NONE, shape, 1)
        return out
    in_axis, out_axis = (0, 1) if transposed else (1, 0)
    level = GL
    if groups == 1:
        _consume_dim(w, x, W, in_axis, 1)
    else:
        # Grouped conv: output channel o is row o of W (any group), so rows rescale freely; mixing
        # rows across groups would break the grouping, so outputs get the diagonal group (the
        # within-group GL is dropped: conservative). Input channel i = g·c + j is read by column j
        # of group g's rows only: with one input channel per group (depthwise, c = 1) the rows
        # i·m … i·m+m−1; otherwise block g of column j (a refined axis, `Term.groups`). Either
        # way a diagonal consumer.
        level = DIAG
        t = w.tag(x)
        if t is not None:
            w.ch.restrict(t, DIAG)
            if w.shape(weight)[1] == 1:
                _consume_dim(w, x, W, 0, 1, repeat=shape[1] // groups)
            else:
                _consume_dim(w, x, W, 1, 1, groups=groups)
        else:
            w.break_all(node)
    B = w.param(bias, node) if bias is not None else None
    if bias is not None and B is None:  # (a bias that is not a parameter: see `_linear`)
        level = NONE
    ids, out = w.new_out(shape[1], level, shape, 1)
    w.add_producers(node, ids, [(W, out_axis), (B, 0)])
    w.producers.append(dict(node=node, W=W, w_axis=out_axis, B=B, dim=1, n=shape[1], kind="conv"))
    return out


@rule("embedding")
def _embedding(w: _Walk, node):
    W = w.param(node.args[0], node)
    shape = w.shape(node)
    if W is None:
        w.break_all(node)
        return None
    ids, out = w.new_out(shape[-1], GL, shape, len(shape) - 1)
    w.add_producers(node, ids, [(W, 1)])
    w.producers.append(dict(node=node, W=W, w_axis=1, B=None, dim=len(shape) - 1, n=shape[-1], kind="embedding"))
    return out


def _norm(channel_dim, weight_idx, bias_idx, check_training=None):
    def fn(w: _Walk, node):
        x = node.args[0]
        if check_training is not None and not check_training(node):
            w.notes.append(f"{node.name}: batch norm in eval mode (running statistics): laws through it dropped")
        w.break_all(node)  # normalization statistics touch every input channel
        shape = w.shape(node) if w.shape(node) is not None else w.shape(x)
        if shape is None:
            shape = tuple(node.meta["val"][0].shape)
        dim = channel_dim if channel_dim >= 0 else len(shape) + channel_dim
        weight = node.args[weight_idx] if len(node.args) > weight_idx else None
        bias = node.args[bias_idx] if bias_idx is not None and len(node.args) > bias_idx else None
        G, B = w.param(weight, node), w.param(bias, node)
        if _opname(node.target) in ("layer_norm", "rms_norm", "native_layer_norm"):
            if len(node.args[1]) != 1:
                return None if not isinstance(node.meta.get("val"), tuple) else (None,) * 3
        if G is None and B is None:
            out = None
        else:
            ids, out = w.new_out(shape[dim], DIAG, shape, dim)
            w.add_producers(node, ids, [(G, 0), (B, 0)])
            w.producers.append(dict(node=node, W=G, w_axis=0, B=B, dim=dim, n=shape[dim], kind="norm"))
        if isinstance(node.meta.get("val"), (tuple, list)):
            return (out,) + (None,) * (len(node.meta["val"]) - 1)
        return out

    return fn


RULES["layer_norm"] = _norm(-1, 2, 3)
RULES["native_layer_norm"] = _norm(-1, 2, 3)
RULES["rms_norm"] = _norm(-1, 2, None)
RULES["group_norm"] = _norm(1, 2, 3)
RULES["batch_norm"] = _norm(1, 1, 2, check_training=lambda n: bool(n.args[5]))
RULES["native_batch_norm"] = _norm(1, 1, 2, check_training=lambda n: bool(n.args[5]))
RULES["_native_batch_norm_legit_functional"] = _norm(1, 1, 2, check_training=lambda n: bool(n.args[5]))
RULES["_native_batch_norm_legit"] = _norm(1, 1, 2, check_training=lambda n: bool(n.args[5]))
RULES["instance_norm"] = _norm(1, 1, 2)


def _pass(level, trait=None):
    """Unary op applied channel by channel (GL: linear; DIAG: positively homogeneous)."""

    def fn(w: _Walk, node):
        t = w.tag(node.args[0])
        if t is None:
            return (None,) * len(node.meta["val"]) if isinstance(node.meta.get("val"), (tuple, list)) else None
        if level < GL:
            w.ch.restrict(t, level)
        out = _reshape_like_output(w, node, t)
        if isinstance(node.meta.get("val"), (tuple, list)):
            return (out,) + (None,) * (len(node.meta["val"]) - 1)
        return out

    return fn


def _reshape_like_output(w, node, t):
    """Channel-preserving op whose output keeps the input's channel layout (maybe resized)."""
    val = node.meta.get("val")
    out_shape = tuple((val[0] if isinstance(val, (tuple, list)) else val).shape)
    in_shape = w.shape(node.args[0])
    if out_shape == in_shape:
        return t
    # Spatial resizing (pooling, upsampling): tags must be constant along resized dims.
    t = _expand(t, [1] * (len(in_shape) - t.dim()) + list(t.shape)) if t.dim() < len(in_shape) else t
    for d, (a, b) in enumerate(zip(in_shape, out_shape)):
        if a != b and t.shape[d] != 1:
            w.ch.restrict(t, NONE)
            return None
    return t


for _n in ("relu", "leaky_relu", "prelu", "_prelu_kernel", "rrelu", "abs", "max_pool1d", "max_pool2d", "max_pool3d",
           "max_pool1d_with_indices", "max_pool2d_with_indices", "max_pool3d_with_indices",
           "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d", "feature_dropout", "alpha_dropout",
           "feature_alpha_dropout"):
    RULES[_n] = _pass(DIAG)
for _n in ("clone", "contiguous", "alias", "lift_fresh_copy", "avg_pool1d", "avg_pool2d", "avg_pool3d",
           "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "_adaptive_avg_pool2d",
           "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "upsample_bilinear2d", "upsample_linear1d",
           "neg", "positive", "identity"):
    RULES[_n] = _pass(GL)


def _break(w: _Walk, node):
    """Non-homogeneous or channel-mixing op: no symmetry survives it."""
    w.break_all(node)
    val = node.meta.get("val")
    return (None,) * len(val) if isinstance(val, (tuple, list)) else None


BREAKING_OPS = ("gelu", "silu", "tanh", "sigmoid", "softmax", "_softmax", "log_softmax", "_log_softmax", "exp", "log",
                "pow", "sqrt", "rsqrt", "sin", "cos", "elu", "selu", "celu", "softplus", "mish", "hardswish",
                "hardsigmoid", "hardtanh", "clamp", "clamp_min", "clamp_max", "where", "erf", "logsumexp", "var",
                "std", "norm", "linalg_vector_norm", "reciprocal", "square", "sign", "round", "floor", "ceil",
                "masked_fill", "index_select", "gather", "scatter", "sort", "topk", "cumsum", "var_mean",
                "glu", "relu6", "threshold", "log_sigmoid", "logit", "atan", "tan", "sinh", "cosh")
for _n in BREAKING_OPS:
    RULES[_n] = _break


@rule("_to_copy", "to", "type_as", "_assert_tensor_metadata")
def _to(w: _Walk, node):
    return w.tags.get(node.args[0]) if isinstance(node.args[0], torch.fx.Node) else None


@rule("index")
def _index(w: _Walk, node):
    """x[..., c] with constant integer indices c (lifted by the trace, as Falcon's multi-query
    k, v picked from the fused projection): channels move as the positions do. Indices that are
    data (or boolean masks) break the channels they touch."""
    t = w.tag(node.args[0])
    if t is None:
        return None
    ints = all(i is None or (i in w.consts and w.consts[i].dtype in (torch.int64, torch.int32)) for i in node.args[1])
    out = constant_index(node, t, w.shape(node.args[0]), w.consts) if ints else None
    if out is None:  # an index the tags cannot follow: no law through it
        w.break_all(node)
        return None
    return out if _is_tagged(out) else None


def constant_index(node, t, shape, consts: dict):
    """The tags `t` (of a tensor of `shape`) moved by aten.index node `node` whose indices are
    all constants (`consts`: node -> value), compressed; None if one is not or they do not apply."""
    vals = [None if i is None else consts.get(i) for i in node.args[1]]
    if any(i is not None and v is None for i, v in zip(node.args[1], vals)):
        return None
    try:
        return _compress(aten.index.Tensor(_expand(t, shape), vals))
    except Exception:  # noqa: BLE001
        return None


@rule("dropout", "native_dropout")
def _dropout(w: _Walk, node):
    p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
    train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
    t = w.tag(node.args[0])
    if t is not None and train and p > 0:
        w.ch.restrict(t, DIAG)  # an elementwise mask commutes with diagonal scaling only
    if _opname(node.target) == "native_dropout":
        return (t, None)
    return t


@rule("detach")
def _detach(w: _Walk, node):
    w.break_all(node)  # gradients stop here: the flow no longer sees the symmetry
    return None


@rule("constant_pad_nd", "pad")
def _pad(w: _Walk, node):
    value = node.args[2] if len(node.args) > 2 else node.kwargs.get("value", 0.0)
    t = w.tag(node.args[0])
    if t is None:
        return None
    if value not in (0, 0.0, None):
        w.ch.restrict(t, NONE)
        return None
    return _reshape_like_output(w, node, t)


# -- layout ops: run the op itself on the expanded channel-id tensor --------------------------------
def apply_layout(node, get_tag, get_shape):
    """Run a shape op on integer tag tensors (-1 = untagged). Returns tags, a tuple, or raises."""

    def sub(a):
        if isinstance(a, torch.fx.Node):
            t = get_tag(a)
            shape = get_shape(a)
            if shape is None:
                return a.meta.get("val")
            if t is None or not torch.is_tensor(t):
                return torch.full(shape, -1, dtype=torch.int64)
            return _expand(t, shape)
        if isinstance(a, (list, tuple)):
            return type(a)(sub(x) for x in a)
        return a

    args = sub(node.args)
    kwargs = {k: sub(v) for k, v in node.kwargs.items()}
    out = node.target(*args, **kwargs)
    if isinstance(out, (tuple, list)):
        return tuple(_compress(o) if _is_tagged(o) else None for o in out)
    return _compress(out) if _is_tagged(out) else None


_SAME_VALUE = ("lift_fresh_copy", "detach", "detach_", "clone", "alias", "contiguous", "_to_copy", "to")
_ROW_SPLITS = ("split", "split_with_sizes", "chunk", "tensor_split", "unsafe_split", "unsafe_chunk")
_TRANSPOSES = ("numpy_T", "t", "transpose", "permute", "swapaxes", "swapdims", "mT", "adjoint")


def _row_view(w: _Walk, node):
    """Record blocks of a parameter's rows (dim 0) cut by split/chunk/slice/narrow: each block
    is its own producer (nn.MultiheadAttention's q and kv of the packed in_proj_weight)."""
    x = node.args[0]
    if not isinstance(x, torch.fx.Node):
        return
    P = w.param(x)
    base = (P, 0, w._param_shapes[P][0]) if P is not None and w._param_shapes[P] else w.views.get(x)
    if base is None or isinstance(base[0], tuple):
        return
    P, first, rows = base
    name, ndim = _opname(node.target), len(w.shape(x))
    if name in _TRANSPOSES and ndim == 2 and first == 0 and rows == w._param_shapes[P][0] and w.param(x):
        dims = [int(d) % 2 for d in (node.args[1:3] if name in ("transpose", "swapaxes", "swapdims")
                                     else node.args[1] if name == "permute" else (1, 0))]
        if dims in ([0, 1], [1, 0]) and (name != "permute" or dims == [1, 0]):
            w.transposed[node] = P
        return
    val = node.meta.get("val")
    if name in _ROW_SPLITS:
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        if dim % ndim or not isinstance(val, (tuple, list)):
            return
        sizes = [int(v.shape[0]) for v in val]
        if sum(sizes) != rows:
            return
        starts = np.cumsum([0] + sizes[:-1]).tolist()
        w.views[node] = tuple((P, first + a, n) for a, n in zip(starts, sizes))
    elif name in ("slice", "narrow") and torch.is_tensor(val):
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if dim % ndim:
            return
        if name == "slice":
            step = node.args[4] if len(node.args) > 4 else node.kwargs.get("step", 1)
            start = node.args[2] if len(node.args) > 2 else node.kwargs.get("start", 0)
            if step != 1 or not isinstance(start, (int, type(None))):
                return
            start = start or 0
        else:
            start = node.args[2]
            if not isinstance(start, int):
                return
        start = max(0, start + rows if start < 0 else min(start, rows))
        w.views[node] = (P, first + start, int(val.shape[0]))


def _layout(w: _Walk, node):
    _row_view(w, node)
    if not w.tagged_inputs(node):
        val = node.meta.get("val")
        return (None,) * len(val) if isinstance(val, (tuple, list)) else None
    try:
        return apply_layout(node, lambda a: w.tags.get(a), w.shape)
    except Exception as e:  # pragma: no cover - defensive: an unexpected layout op signature
        w.notes.append(f"{node.name}: could not follow channels through {_opname(node.target)} ({e})")
        w.break_all(node)
        return None


LAYOUT_OPS = ("view", "_unsafe_view", "reshape", "flatten", "unflatten", "transpose", "t", "numpy_T", "mT", "permute", "select", "slice",
              "squeeze", "unsqueeze", "expand", "repeat", "repeat_interleave", "cat", "stack", "split",
              "split_with_sizes", "chunk", "unbind", "narrow", "movedim", "view_as", "reshape_as", "swapaxes",
              "swapdims", "tensor_split", "unsafe_split", "unsafe_chunk", "flip", "roll", "pixel_shuffle",
              "pixel_unshuffle", "channel_shuffle", "expand_as", "alias_copy", "view_copy", "permute_copy",
              "transpose_copy", "select_copy", "slice_copy")
for _n in LAYOUT_OPS:
    RULES[_n] = _layout

# ops whose output is a new tensor (no view or alias of an input): an in-place op may write it
_FRESH_OPS = ("linear", "conv1d", "conv2d", "conv3d", "convolution", "addmm", "baddbmm", "matmul", "bmm", "mm",
              "einsum", "add", "sub", "mul", "div", "neg", "relu", "leaky_relu", "gelu", "silu", "clone",
              "embedding", "layer_norm", "rms_norm", "group_norm", "batch_norm", "instance_norm",
              "scaled_dot_product_attention", "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d",
              "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d")


@rule("getitem")
def _getitem(w: _Walk, node):
    src, i = node.args
    v = w.views.get(src)
    if isinstance(v, tuple) and isinstance(v[0], tuple) and i < len(v):
        w.views[node] = v[i]
    t = w.tags.get(src)
    if isinstance(t, tuple):
        return t[i] if i < len(t) else None
    return None


# -- reductions ------------------------------------------------------------------------------------
def _reduce(level):
    def fn(w: _Walk, node):
        x = node.args[0]
        t = w.tag(x)
        if t is None:
            return None
        shape = w.shape(x)
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = node.args[2] if len(node.args) > 2 and isinstance(node.args[2], bool) else node.kwargs.get("keepdim", False)
        if dims is None or dims == []:
            dims = list(range(len(shape)))
        dims = [dims] if isinstance(dims, int) else list(dims)
        dims = sorted(d % len(shape) for d in dims)
        t = _expand(t, [1] * (len(shape) - t.dim()) + list(t.shape)) if t.dim() < len(shape) else t
        if any(t.shape[d] > 1 for d in dims):
            w.ch.restrict(t, NONE)  # summing across channels mixes them
            return None
        if level < GL:
            w.ch.restrict(t, level)
        if not keep:
            for d in reversed(dims):
                t = t.squeeze(d)
        return t

    return fn


RULES["sum"] = _reduce(GL)
RULES["mean"] = _reduce(GL)
RULES["amax"] = _reduce(DIAG)


# -- elementwise binary ops ------------------------------------------------------------------------
def _param_axis_term(w: _Walk, t_out, out_shape, pnode, P: str, sign: int):
    """Attach parameter P (broadcast into a tagged tensor) to the channels it meets, elementwise.

    Returns False if P is not laid out per channel (then the caller breaks the channels)."""
    pshape = tuple(pnode.meta["val"].shape)
    full = _expand(t_out, out_shape)
    lead = len(out_shape) - len(pshape)
    # Collapse the dims P does not have, and those P broadcasts over: the tag must be constant there.
    for d in range(len(out_shape)):
        pd = d - lead
        if pd < 0 or pshape[pd] == 1:
            first = full.narrow(d, 0, 1)
            if not torch.equal(full, first.expand_as(full)):
                return False
    sub = full
    for d in reversed(range(len(out_shape))):
        pd = d - lead
        if pd < 0:
            sub = sub.select(d, 0)
    tp = _compress(sub)  # tags laid on P's own shape (size-1 where constant)
    varying = [d for d in range(tp.dim()) if tp.shape[d] > 1]
    if len(varying) > 1:
        return False
    axis = varying[0] if varying else max(range(len(pshape)), key=lambda d: pshape[d]) if pshape else 0
    if not pshape:
        return False
    vec = tp.reshape(-1) if varying else tp.reshape(-1).expand(pshape[axis])
    if len(vec) != pshape[axis]:
        vec = vec.expand(pshape[axis])
    ids, positions = _group_positions(vec)
    if len(ids) == 0:
        return True
    # A parameter entry may only belong to one channel (else it is shared: no per-channel law).
    w.ch.term(ids, positions, P, axis, sign)
    return True


def _broadcast_tags(w, node, a, b):
    shape = w.shape(node)
    ta, tb = w.tag(a), w.tag(b)
    fa = _expand(ta, shape) if ta is not None else None
    fb = _expand(tb, shape) if tb is not None else None
    return shape, fa, fb


@rule("add", "sub", "rsub")
def _add(w: _Walk, node):
    a, b = node.args[0], node.args[1]
    if _opname(node.target) == "rsub":
        a, b = b, a
    shape, fa, fb = _broadcast_tags(w, node, a, b)
    if fa is None and fb is None:
        return None
    if fa is not None and fb is not None:
        w.ch.union(fa, fb, 0)
        both = (fa >= 0) & (fb >= 0)
        w.ch.trait(fa[both], "stream")
        w.ch.trait(fb[both], "stream")
        only_a = (fa >= 0) & (fb < 0)
        only_b = (fb >= 0) & (fa < 0)
        # Positions where only one side is tagged add an untagged value: no symmetry there.
        w.ch.restrict(fa[only_a], NONE)
        w.ch.restrict(fb[only_b], NONE)
        return _compress(torch.where(fa >= 0, fa, fb))
    t, other = (fa, b) if fa is not None else (fb, a)
    if isinstance(other, torch.fx.Node):
        P = w.param(other, node)
        if P is not None and w.is_tensor_node(other):
            if not _param_axis_term(w, t, shape, other, P, +1):
                w.ch.restrict(t, NONE)
            return _compress(t)
        w.ch.restrict(t, NONE)  # adding data (or a buffer) breaks scaling
        return _compress(t)
    if other not in (0, 0.0):
        w.ch.restrict(t, NONE)
    return _compress(t)


@rule("mul", "div")
def _mul(w: _Walk, node):
    a, b = node.args[0], node.args[1]
    div = _opname(node.target) == "div"
    shape, fa, fb = _broadcast_tags(w, node, a, b)
    # channels already dead are data: γ ⊙ x̂ of a normalized x̂ (a per-head q/k RMSNorm written
    # out) makes γ a producer
    fa = None if fa is not None and w.ch.all_dead(fa) else fa
    fb = None if fb is not None and w.ch.all_dead(fb) else fb
    if fa is None and fb is None:
        if not div:
            return _param_times_data(w, node, a, b, shape)
        return None
    if fa is not None and fb is not None:
        w.ch.restrict(fa, NONE)
        w.ch.restrict(fb, NONE)
        return None
    if fb is not None and div:
        w.ch.restrict(fb, NONE)
        return None
    t, other = (fa, b) if fa is not None else (fb, a)
    if not isinstance(other, torch.fx.Node):
        return _compress(t)  # multiplication by a constant is linear
    P = w.param(other, node)
    if P is not None and not div:
        # γ ⊙ z: P consumes z's channels and produces new ones (diagonal group on both sides).
        ok = _param_axis_term(w, t, shape, other, P, -1)
        w.ch.restrict(t, DIAG)
        if not ok:
            w.ch.restrict(t, NONE)
            return None
        comp = _compress(t)
        # New output channels: one per input channel id, same layout.
        ids_in = torch.unique(comp[comp >= 0])
        new = w.ch.new(len(ids_in), DIAG)
        mapping = torch.full((int(ids_in.max()) + 1,), -1, dtype=torch.int64)
        mapping[ids_in] = new
        out = torch.where(comp >= 0, mapping[comp.clamp_min(0)], comp)
        _param_axis_term(w, out, shape, other, P, +1)
        return _compress(out)
    # Multiplication by data (a gate, a mask): commutes with diagonal scaling only.
    w.ch.restrict(t, DIAG)
    w.ch.trait(t, "gate")
    return _compress(t)


def _param_times_data(w: _Walk, node, a, b, shape):
    """γ ⊙ x with x untagged data (an affine norm written out): γ produces new channels."""
    for p_arg, x_arg in ((a, b), (b, a)):
        P = w.param(p_arg, node)
        if P is None or not w.is_tensor_node(x_arg) or w.param(x_arg) is not None:
            continue
        pshape = tuple(p_arg.meta["val"].shape)
        big = [d for d, s in enumerate(pshape) if s > 1]
        if len(big) != 1:
            return None
        axis = big[0]
        lead = len(shape) - len(pshape)
        ids, out = w.new_out(pshape[axis], DIAG, shape, lead + axis)
        w.ch.term(ids, None, P, axis, +1)
        w.producers.append(dict(node=node, W=P, w_axis=axis, B=None, dim=lead + axis, n=pshape[axis], kind="norm"))
        return out
    return None


# -- contractions ----------------------------------------------------------------------------------
def _batch_labels(w: _Walk, t: torch.Tensor, nbatch: int, label):
    """Label channel ids by the batch coordinate (e.g. attention head) at which they sit."""
    if nbatch == 0:
        w.ch.label(t, label)
        return
    flat = t.reshape(math.prod(t.shape[:nbatch]) if nbatch else 1, -1)
    for beta in range(flat.shape[0]):
        w.ch.label(flat[beta], label + (beta,))


def _contract(w: _Walk, node, a, b, a_shape, b_shape, out_shape):
    """a [..., n, k] @ b [..., k, m] with broadcast batch dims (tags already expanded)."""
    ta, tb = a, b
    nb = len(out_shape) - 2
    batch = tuple(out_shape[:-2])
    if ta is not None:
        ta = _expand(ta, batch + tuple(a_shape[-2:]))
    if tb is not None:
        tb = _expand(tb, batch + tuple(b_shape[-2:]))
    lbl = ("mm", node.name)
    if ta is not None and tb is not None:
        # Both sides tagged on the contracted dim: pair them as duals (q·k).
        ca, cb = _compress(ta), _compress(tb)
        if ca.dim() and (ca.shape[-2] > 1 if ca.dim() >= 2 else False) or (cb.dim() >= 1 and cb.shape[-1] > 1):
            w.ch.restrict(ta, NONE)
            w.ch.restrict(tb, NONE)
            return None
        ka = ta.narrow(-2, 0, 1).squeeze(-2)  # [..., k]
        kb = tb.narrow(-1, 0, 1).squeeze(-1)  # [..., k]
        bad = (ka >= 0) != (kb >= 0)
        if bad.any():
            w.ch.restrict(ka, NONE)
            w.ch.restrict(kb, NONE)
            return None
        w.ch.union(ka, kb, 1)
        w.ch.trait(ka, "qk")
        w.ch.trait(kb, "qk")
        _batch_labels(w, _compress(ka), nb, lbl + ("qk",)) if nb else w.ch.label(ka, lbl)
        _batch_labels(w, _compress(kb), nb, lbl + ("qk",)) if nb else w.ch.label(kb, lbl)
        return None
    if tb is not None:
        # Only the right side is tagged: its columns pass through if constant along k (attn @ v).
        if tb.shape[-2] > 1 and not torch.equal(tb, tb.narrow(-2, 0, 1).expand_as(tb)):
            w.ch.restrict(tb, NONE)
            return None
        col = tb.narrow(-2, 0, 1)  # [..., 1, m]
        w.ch.trait(col, "vo")
        if nb:
            _batch_labels(w, _compress(col), nb, lbl + ("v",))
        return _compress(col)
    # Only the left side is tagged: rows pass through if constant along k.
    if ta.shape[-1] > 1 and not torch.equal(ta, ta.narrow(-1, 0, 1).expand_as(ta)):
        w.ch.restrict(ta, NONE)
        return None
    row = ta.narrow(-1, 0, 1)
    if nb:
        _batch_labels(w, _compress(row), nb, lbl + ("r",))
    return _compress(row)


@rule("bmm", "matmul", "mm")
def _matmul(w: _Walk, node):
    a, b = node.args[0], node.args[1]
    ta, tb = w.tag(a), w.tag(b)
    Pb = w.param(b, node)
    if Pb is not None and len(w.shape(b)) == 2:
        # x @ W with W [in, out]: W consumes along axis 0 and produces along axis 1.
        _consume_last(w, a, Pb, 0, node)
        return _dense_out(w, node, Pb, 1)
    Pt = w.transposed.get(b) if isinstance(b, torch.fx.Node) else None
    if Pt is not None:
        # x @ W.T with W [out, in]: a Linear without bias (W consumes along 1, produces along 0)
        w.took(Pt, node, b)
        _consume_last(w, a, Pt, 1, node)
        return _dense_out(w, node, Pt, 0)
    if w.param(a, node) is not None:
        w.break_all(node)
        return None
    if ta is None and tb is None:
        return None
    a_shape, b_shape = w.shape(a), w.shape(b)
    if len(a_shape) < 2 or len(b_shape) < 2:
        w.break_all(node)
        return None
    return _contract(w, node, ta, tb, a_shape, b_shape, w.shape(node))


class _EinsumPlan:
    """A two-operand einsum without '...' or repeated letters as a batched matmul: batch letters
    (in both operands and the output), contracted letters (in both, not the output) and each
    side's free letters laid out as a [..., n, k] @ b [..., k, m]. None from `of` otherwise."""

    @classmethod
    def of(cls, eq, shapes):
        eq = eq.replace(" ", "")
        if "." in eq or "->" not in eq or len(shapes) != 2 or any(s is None for s in shapes):
            return None
        ins, so = eq.split("->")
        subs = ins.split(",")
        if len(subs) != 2 or any(len(x) != len(shp) for x, shp in zip(subs, shapes)):
            return None
        sa, sb = subs
        size = {}
        for sub, shp in zip(subs, shapes):
            for c, n in zip(sub, shp):
                if size.setdefault(c, n) != n:
                    return None  # broadcast letters: not handled
        letters = set(sa) | set(sb)
        if any(len(set(x)) != len(x) for x in (sa, sb, so)) or not set(so) <= letters or any(
                c not in so and not (c in sa and c in sb) for c in letters):
            return None  # a letter summed within one operand, or repeated (a diagonal)
        p = cls()
        p.subs, p.so, p.shapes, p.size = subs, so, shapes, size
        p.batch = [c for c in so if c in sa and c in sb]
        p.contr = sorted(c for c in letters if c in sa and c in sb and c not in so)
        p.fa, p.fb = [c for c in so if c in sa and c not in sb], [c for c in so if c in sb and c not in sa]
        p.bs = tuple(size[c] for c in p.batch)
        p.n, p.k, p.m = (math.prod(size[c] for c in x) for x in (p.fa, p.contr, p.fb))
        return p

    def lay(self, t, side):
        """Operand `side`'s tags as [..., n, k] (a) or [..., k, m] (b)."""
        if t is None:
            return None
        sub = self.subs[side]
        order = self.batch + (self.fa + self.contr if side == 0 else self.contr + self.fb)
        shape = self.bs + ((self.n, self.k) if side == 0 else (self.k, self.m))
        return _expand(t, self.shapes[side]).permute([sub.index(c) for c in order]).reshape(shape)

    def unlay(self, t):
        """Tags of the [..., n, m] product back in the output's layout."""
        t = _expand(t, self.bs + (self.n, self.m)).reshape(self.bs + tuple(self.size[c] for c in self.fa + self.fb))
        return _compress(t.permute([(self.batch + self.fa + self.fb).index(c) for c in self.so]))


@rule("einsum")
def _einsum(w: _Walk, node):
    ops = node.args[1]
    if any(w.param(x) for x in ops):  # a parameter operand is left untracked: its laws dropped
        w.break_all(node)
        return None
    plan = _EinsumPlan.of(node.args[0], [w.shape(x) for x in ops])
    if plan is None:
        w.break_all(node)
        return None
    ta, tb = w.tag(ops[0]), w.tag(ops[1])
    if ta is None and tb is None:
        return None
    if not plan.contr and ta is not None and tb is not None:
        w.break_all(node)  # an outer product of two tagged tensors: no linear action survives
        return None
    bs, n, k, m = plan.bs, plan.n, plan.k, plan.m
    out = _contract(w, node, plan.lay(ta, 0), plan.lay(tb, 1), bs + (n, k), bs + (k, m), bs + (n, m))
    return None if out is None else plan.unlay(out)


@rule("baddbmm")
def _baddbmm(w: _Walk, node):
    """β·input + α·(b1 @ b2) with data `input` (Bloom's ALiBi bias on the logits): the product's
    rule, unless the input carries channels."""
    inp, b1, b2 = node.args[:3]
    if w.tag(inp) is not None or any(w.param(x) for x in (inp, b1, b2)):
        w.break_all(node)
        return None
    t1, t2 = w.tag(b1), w.tag(b2)
    if t1 is None and t2 is None:
        return None
    out = _contract(w, node, t1, t2, w.shape(b1), w.shape(b2), w.shape(node))
    beta = node.kwargs.get("beta", node.args[3] if len(node.args) > 3 else 1)
    if out is not None and beta != 0:
        w.ch.restrict(out, NONE)  # data added to channels (not to logits, whose channels paired): no law
    return out


@rule("addmm")
def _addmm(w: _Walk, node):
    """b + x @ W with W [in, out] (GPT-2's Conv1D): as `x @ W` with b a producer of the output
    columns. α and β scale the two parts but not the symmetry (b → A b, W → W Aᵀ)."""
    b, x, weight = node.args[:3]
    W = w.param(weight, node)
    shape = w.shape(node)
    if W is None or len(w.shape(weight)) != 2:
        w.break_all(node)
        return None
    _consume_last(w, x, W, 0, node)
    B = w.param(b, node)
    bshape = w.shape(b) if isinstance(b, torch.fx.Node) else None
    # a bias that is not a vector parameter over the outputs (data, a buffer, a matrix) adds
    # what no law term follows: no law
    level = GL if B is not None and bshape == shape[-1:] else NONE
    return _dense_out(w, node, W, 1, B if level == GL else None, level)


@rule("scaled_dot_product_attention")
def _sdpa(w: _Walk, node):
    q, k, v = node.args[:3]
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    gqa = node.kwargs.get("enable_gqa", False) or (len(node.args) > 7 and node.args[7])
    if w.tag(mask) is not None:
        w.break_all(node)
        return None
    tq, tk, tv = w.tag(q), w.tag(k), w.tag(v)
    qs, ks, vs = w.shape(q), w.shape(k), w.shape(v)
    if gqa and len(qs) >= 3 and ks[-3] != qs[-3]:
        rep = qs[-3] // ks[-3]
        tk = _expand(tk, ks).repeat_interleave(rep, dim=-3) if tk is not None else None
        tv = _expand(tv, vs).repeat_interleave(rep, dim=-3) if tv is not None else None
        ks = ks[:-3] + (qs[-3],) + ks[-2:]
        vs = vs[:-3] + (qs[-3],) + vs[-2:]
    out_shape = w.shape(node)
    logits_shape = tuple(out_shape[:-1]) + (ks[-2],)
    if tq is not None or tk is not None:
        kt = _expand(tk, ks).transpose(-1, -2) if tk is not None else None
        _contract(w, node, tq, kt, qs, ks[:-2] + (ks[-1], ks[-2]), logits_shape)
    if tv is None:
        return None
    return _contract(w, node, None, tv, logits_shape, vs, out_shape)


# ----------------------------------------------------------------------------------------------
# Resolution: classes -> feature spaces -> families
# ----------------------------------------------------------------------------------------------
def _roots(n, unions):
    """Union-find with parity, vectorized: (root, parity-to-root, conflicting roots)."""
    parent = np.arange(n)
    parity = np.zeros(n, dtype=np.int64)
    conflict = set()

    def find(x):
        p = 0
        while parent[x] != x:
            p ^= parity[x]
            x = parent[x]
        return x, p

    for a_arr, b_arr, par in unions:
        for a, b in zip(a_arr.tolist(), b_arr.tolist()):
            (ra, pa), (rb, pb) = find(a), find(b)
            if ra == rb:
                if (pa ^ pb) != par:
                    conflict.add(ra)
                continue
            if rb in conflict:
                conflict.add(ra)
            parent[rb] = ra
            parity[rb] = pa ^ pb ^ par
    # pointer jumping to the roots, accumulating parity
    while True:
        gp = parent[parent]
        if np.array_equal(gp, parent):
            break
        parity = parity ^ np.where(parent != gp, parity[parent], 0)
        parent = gp
    conflict = {int(find(c)[0]) for c in conflict}
    return parent, parity, conflict


def _resolve(walk: _Walk, param_order: dict):
    ch = walk.ch
    N = ch.n
    if N == 0:
        return []
    roots, pars, conflict = _roots(N, ch.unions)
    level = np.array(ch.level, dtype=np.int64)
    for ids, lvl in ch.restricts:
        level[ids] = np.minimum(level[ids], lvl)
    root_level = np.full(N, GL, dtype=np.int64)
    np.minimum.at(root_level, roots, level)
    for r in conflict:
        root_level[r] = NONE

    labels = defaultdict(set)
    for ids, lbl in ch.labels:
        for r in np.unique(roots[ids]).tolist():
            labels[r].add(lbl)
    traits = defaultdict(set)
    for i, ts in ch.traits.items():
        traits[int(roots[i])] |= ts

    # Terms as flat arrays (root, key, position), grouped by sorting.
    keys, key_id = [], {}

    def kid(k):
        if k not in key_id:
            key_id[k] = len(keys)
            keys.append(k)
        return key_id[k]

    R, K, POS = [], [], []
    for ids, counts, flat, P, axis, sign in ch.terms:
        kk = np.where(pars[ids] == 0, kid((P, axis, sign)), kid((P, axis, -sign)))
        R.append(np.repeat(roots[ids], counts))
        K.append(np.repeat(kk, counts))
        POS.append(flat)
    if not R:
        return []
    R, K, POS = np.concatenate(R), np.concatenate(K), np.concatenate(POS)
    ok_root = root_level[R] >= DIAG
    R, K, POS = R[ok_root], K[ok_root], POS[ok_root]
    order = np.lexsort((POS, K, R))
    R, K, POS = R[order], K[order], POS[order]
    if len(R) == 0:
        return []
    change = np.r_[True, (R[1:] != R[:-1]) | (K[1:] != K[:-1])]
    dup = np.r_[False, (POS[1:] == POS[:-1]) & ~change[1:]]
    bad_roots = set(np.unique(R[dup]).tolist())  # one entry claimed twice by one slice
    starts = np.nonzero(change)[0]
    ends = np.r_[starts[1:], len(R)]
    tied = walk.tied()
    tied_keys = {key_id[k] for k in keys if k[0] in tied}

    per_root = defaultdict(list)  # root -> [(key, start, end)]
    for r, k, a, b in zip(R[starts].tolist(), K[starts].tolist(), starts.tolist(), ends.tolist()):
        per_root[r].append((k, a, b))

    blocks = defaultdict(list)
    for r, groups in per_root.items():
        if r in bad_roots or any(k in tied_keys for k, _, _ in groups):
            continue
        if {keys[k][2] for k, _, _ in groups} != {1, -1}:
            continue
        sig = (tuple(sorted((k, b - a) for k, a, b in groups)), frozenset(labels[r]), int(root_level[r]))
        blocks[sig].append(r)

    def key_order(k):
        P, axis, s = keys[k]
        return (-s, param_order.get(P, 1 << 30), axis if isinstance(axis, tuple) else (axis, 1))

    families = []
    for sig, rs in blocks.items():
        kset = sorted((k for k, _ in sig[0]), key=key_order)
        where = {r: {k: (a, b) for k, a, b in per_root[r]} for r in rs}
        first = kset[0]
        rs.sort(key=lambda r: int(POS[where[r][first][0]]))
        fam_terms = []
        for k in kset:
            idx = np.stack([POS[where[r][k][0]:where[r][k][1]] for r in rs])
            P, axis, sgn = keys[k]
            axis, G = axis if isinstance(axis, tuple) else (axis, 1)  # (axis, groups): a refined axis
            fam_terms.append(Term(P, axis, torch.from_numpy(idx.astype(np.int64)), sgn, G))
        lvl = sig[2]
        tr = set().union(*(traits[r] for r in rs))
        if "qk" in tr:
            kind = "attention_qk"
        elif "vo" in tr:
            kind = "attention_vo"
        elif lvl < GL and "gate" in tr:
            kind = "gate"
        elif "stream" in tr:
            kind = "stream"
        else:
            kind = "linear" if lvl == GL else "rescale"
        families.append(Family(name="", kind=kind, form="matrix" if lvl == GL else "diag", order=2,
                               terms=fam_terms, modules=modules_of(fam_terms)))
    return families


def _module_of(param: str) -> str:
    if "." in param:
        return param.rsplit(".", 1)[0]
    for suffix in ("_weight", "_bias"):
        if param.endswith(suffix):
            return param[: -len(suffix)]
    return param


def modules_of(terms) -> tuple:
    """The modules a family's terms belong to, in term order, each once."""
    return tuple(dict.fromkeys(_module_of(t.param) for t in terms))


def _name_families(families):
    counts = defaultdict(int)
    for f in families:
        mod = f.modules[0] if f.modules else "model"
        base = f"{f.kind}:{mod}"
        if f.kind.startswith("attention") and f.form == "matrix":  # (a diagonal one, q/k norm gains, spans the heads)
            counts[base] += 1
            f.name = f"{base}.h{counts[base] - 1}"
        else:
            counts[base] += 1
            f.name = base if counts[base] == 1 else f"{base}#{counts[base]}"
    return families


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------
def _trace(model, example_inputs):
    try:
        ep = torch.export.export(model, example_inputs, strict=False)
    except Exception as e:  # noqa: BLE001 - re-raised with a diagnosis
        msg = str(e).strip().splitlines()
        first = next((l for l in msg if l.strip()), type(e).__name__)
        # Does the model even run on these inputs? Then the trace, not the inputs, failed.
        import copy

        try:
            with torch.no_grad():
                copy.deepcopy(model)(*example_inputs)
        except Exception as e2:  # noqa: BLE001
            shapes = [tuple(x.shape) if torch.is_tensor(x) else type(x).__name__ for x in example_inputs]
            raise LawDiscoveryError(
                f"{type(model).__name__} does not run on example_inputs of shapes {shapes}: "
                f"{type(e2).__name__}: {str(e2).strip().splitlines()[0] if str(e2).strip() else ''}. "
                "Pass a tuple of positional inputs that the model's forward accepts."
            ) from e2
        raise LawDiscoveryError(
            f"torch.export could not trace {type(model).__name__}: {type(e).__name__}: {first}. "
            "find_laws needs a traceable forward: replace data-dependent Python control flow "
            "(e.g. `if x.sum() > 0`) by torch.where/torch.cond, keep shapes static, and avoid "
            "non-PyTorch calls (numpy, .item()) inside forward."
        ) from e
    return ep


def check_arguments(model, example_inputs, loss, who: str) -> tuple:
    """Validate (model, example_inputs, loss); returns example_inputs as a tuple."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{who} expects a torch.nn.Module, got {type(model).__name__}")
    if loss not in (None, "mse", "cross_entropy"):
        raise ValueError(f"loss must be None, 'mse' or 'cross_entropy', got {loss!r}")
    if torch.is_tensor(example_inputs):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, list):
        example_inputs = tuple(example_inputs)
    if not isinstance(example_inputs, tuple):
        raise TypeError(f"example_inputs must be a tuple of positional inputs, got {type(example_inputs).__name__}")
    return example_inputs


def find_laws(model, example_inputs, *, loss=None, approximate=False) -> LawSet:
    """Find every conservation law of `model` from its traced training-mode graph.

    Args:
        model: an nn.Module in training mode.
        example_inputs: tuple of positional inputs (a single tensor is accepted).
        loss: None or "mse" (no extra laws), or "cross_entropy" (softmax cross-entropy on the
            model's output adds the translation laws of the logits' producer).
        approximate: also emit the approximate scale laws of normalized producers (flagged,
            not counted in num_functions).

    Returns a LawSet bound to `model`'s parameters. Families: rescale, linear (matrix), stream,
    attention_qk, attention_vo, gate, translation, scale — SPEC §5.
    """
    example_inputs = check_arguments(model, example_inputs, loss, "find_laws")
    for name, mod in model.named_modules():
        if not mod.training:
            what = f"module {name!r} ({type(mod).__name__})" if name else f"the model ({type(mod).__name__})"
            raise LawDiscoveryError(
                f"{what} is in eval mode: find_laws traces the training-mode graph (batch statistics, "
                "dropout), whose laws are the ones training conserves. Call model.train() first."
            )
    params = dict(model.named_parameters(remove_duplicate=False))
    for n, p in params.items():
        if p.is_complex():
            raise LawDiscoveryError(f"parameter {n!r} is complex: consopt's laws are for real parameters")

    ep = _trace(model, example_inputs)
    sig = ep.graph_signature
    param_of = dict(sig.inputs_to_parameters)
    order = {n: i for i, n in enumerate(params)}
    lifted = getattr(sig, "inputs_to_lifted_tensor_constants", {}) or {}
    constants = {ph: ep.constants[c] for ph, c in lifted.items() if torch.is_tensor(ep.constants.get(c))}
    walk = _Walk(ep.graph_module, param_of, constants)
    walk.run()
    families = _resolve(walk, order)
    from .discover_shift import shift_laws

    families += shift_laws(walk, ep, loss=loss, approximate=approximate, param_order=order)
    families.sort(key=lambda f: (min(order.get(t.param, 1 << 30) for t in f.terms if t.sign > 0) if any(t.sign > 0 for t in f.terms) else min(order.get(t.param, 1 << 30) for t in f.terms),
                                 ("rescale", "gate", "linear", "stream", "attention_qk", "attention_vo", "translation", "scale").index(f.kind),
                                 int(f.terms[0].index.min())))
    families = _name_families(families)
    notes = list(walk.notes)
    frozen = {n for n, p in params.items() if not p.requires_grad}
    if frozen:  # training does not move a frozen term, so its family's symmetry is no flow's
        hit = defaultdict(int)
        for f in families:
            for n in set(f.params()) & frozen:
                hit[n] += 1
        families = [f for f in families if not set(f.params()) & frozen]
        notes += [f"parameter {n} is frozen (requires_grad=False): {k} famil{'y' if k == 1 else 'ies'} with a term on "
                  "it dropped (training does not move it, so they are not conserved)" for n, k in sorted(hit.items())]
    for op, n in sorted(walk.unknown.items()):
        notes.append(f"op {op!r} ({n}x) is not in consopt's op table: laws of the spaces it touches were dropped")
    shapes = {n: p.shape for n, p in params.items()}
    return LawSet(families, shapes, notes=notes, params=params, loss=loss)
