"""find_laws: counts, autograd verification and closed-form values of every law family.

Every discovered law must pass LawSet.verify: |cos(∇h, ∇L)| ≤ 1e-10 in float64 (SPEC §5).
Reference values are computed here from the parameters by hand, independently of consopt.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import consopt
from consopt import models as M
from consopt.discover import LawDiscoveryError

COS_TOL = 1e-10


def mse(out, target):
    out = out[0] if isinstance(out, tuple) else out
    return ((out - target) ** 2).mean()


def ce(out, target):
    return F.cross_entropy(out, target)


def check(model, inputs, target, loss_fn=mse, loss=None, approximate=False):
    model.train()
    laws = consopt.find_laws(model, inputs, loss=loss, approximate=approximate)
    cos = laws.verify(model, inputs, target, loss_fn)
    for f in laws:
        if not f.approximate:
            assert cos[f.name] <= COS_TOL, f"{f.name}: |cos| = {cos[f.name]:.3e}"
    return laws, cos


def kinds(laws):
    out = {}
    for f in laws:
        out.setdefault(f.kind, []).append(f)
    return out


# ---------------------------------------------------------------------------------------------
# exact counts (issue 2)
# ---------------------------------------------------------------------------------------------
def test_relu_mlp_count_and_values():
    m = M.MLP([10, 32, 32, 3])
    x = torch.randn(7, 10)
    laws, _ = check(m, (x,), torch.randn(7, 3))
    assert laws.num_functions == 64
    assert {f.kind for f in laws} == {"rescale"}
    v = laws.evaluate(m)
    W1, b1, W2 = m[0].weight.double(), m[0].bias.double(), m[2].weight.double()
    ref = (W1 ** 2).sum(1) + b1 ** 2 - (W2 ** 2).sum(0)
    fam = [f for f in laws if "0" in f.modules][0]
    torch.testing.assert_close(v[fam.name], ref, rtol=1e-14, atol=1e-14)


def test_linear_linear_matrix_law():
    m = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 3))
    laws, _ = check(m, (torch.randn(5, 6),), torch.randn(5, 3))
    assert laws.num_functions == 36
    (f,) = list(laws)
    assert f.kind == "linear" and f.form == "matrix"
    Wt = torch.cat([m[0].weight, m[0].bias[:, None]], 1).double()
    ref = Wt @ Wt.T - m[1].weight.double().T @ m[1].weight.double()
    torch.testing.assert_close(laws.evaluate(m)[f.name], ref, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_count_and_values(bias, batch_first):
    E, H = 8, 2
    m = nn.MultiheadAttention(E, H, bias=bias, batch_first=batch_first)
    x = torch.randn(3, 4, E)
    laws, _ = check(m, (x, x, x), torch.randn(3, 4, E))
    # 2 heads × (QK + VO) × 4·5/2; with bias also the key bias b_k, which never gets a gradient
    # (softmax over the keys ignores a shift common to all keys).
    assert laws.num_functions == 40 + (E if bias else 0)
    kd = kinds(laws)
    if bias:
        (kb,) = kd["translation"]
        assert kb.terms[0].param == "in_proj_bias" and kb.terms[0].index.reshape(-1).tolist() == list(range(E, 2 * E))
        torch.testing.assert_close(laws.evaluate(m)[kb.name], m.in_proj_bias.double()[E:2 * E])
    assert len(kd["attention_qk"]) == 2 and len(kd["attention_vo"]) == 2
    dh = E // H
    W = m.in_proj_weight.double()
    if bias:
        W = torch.cat([W, m.in_proj_bias.double()[:, None]], 1)
    Wo = m.out_proj.weight.double()
    v = laws.evaluate(m)
    for h in range(H):
        q, k, vv = W[h * dh:(h + 1) * dh], W[E + h * dh:E + (h + 1) * dh], W[2 * E + h * dh:2 * E + (h + 1) * dh]
        o = Wo[:, h * dh:(h + 1) * dh]
        qk = [f for f in kd["attention_qk"] if f.name.endswith(f".h{h}")][0]
        vo = [f for f in kd["attention_vo"] if f.name.endswith(f".h{h}")][0]
        torch.testing.assert_close(v[qk.name], q @ q.T - k @ k.T, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(v[vo.name], vv @ vv.T - o.T @ o, rtol=1e-13, atol=1e-13)


def _head_laws_match(laws, model, blocks, Wo, H):
    """Each head's QK and VO values against W̃_q W̃_qᵀ − W̃_k W̃_kᵀ and W̃_v W̃_vᵀ − W_oᵀW_o;
    blocks: the (weight, bias or None) of q, k and v, each cut to its E rows."""
    kd, v = kinds(laws), laws.evaluate(model)
    E = blocks[0][0].shape[0]
    dh = E // H
    assert len(kd["attention_qk"]) == H and len(kd["attention_vo"]) == H
    for h in range(H):
        def rows(Wx, bx):
            r = Wx[h * dh:(h + 1) * dh].double()
            return r if bx is None else torch.cat([r, bx[h * dh:(h + 1) * dh, None].double()], 1)

        q, k, vv = (rows(*blk) for blk in blocks)
        o = Wo[:, h * dh:(h + 1) * dh].double()
        qk = [f for f in kd["attention_qk"] if f.name.endswith(f".h{h}")][0]
        vo = [f for f in kd["attention_vo"] if f.name.endswith(f".h{h}")][0]
        torch.testing.assert_close(v[qk.name], q @ q.T - k @ k.T, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(v[vo.name], vv @ vv.T - o.T @ o, rtol=1e-13, atol=1e-13)


def _packed(W, b, E):
    return [(W[i * E:(i + 1) * E], None if b is None else b[i * E:(i + 1) * E]) for i in range(3)]


@pytest.mark.parametrize("bias", [True, False])
def test_multihead_attention_with_other_key_and_value_widths(bias):
    # kdim, vdim ≠ embed_dim: separate q/k/v weights, and the biases are row blocks of the packed
    # in_proj_bias (a chunk into three): each block is its own producer, so the head laws hold
    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.MultiheadAttention(8, 2, bias=bias, kdim=5, vdim=3, batch_first=True)

        def forward(self, x, z1, z2):
            return self.a(x, z1, z2, need_weights=False)[0]

    torch.manual_seed(0)
    m = Cross().double()
    if bias:
        with torch.no_grad():
            m.a.in_proj_bias.normal_()
    inputs = (torch.randn(3, 4, 8).double(), torch.randn(3, 6, 5).double(), torch.randn(3, 6, 3).double())
    laws, cos = check(m, inputs, torch.randn(3, 4, 8).double())  # every claimed law conserved
    a = m.a
    b = _packed(a.in_proj_bias, a.in_proj_bias, 8) if bias else [(None, None)] * 3
    _head_laws_match(laws, m, [(W, bb) for W, (bb, _) in zip((a.q_proj_weight, a.k_proj_weight, a.v_proj_weight), b)],
                     a.out_proj.weight, 2)
    if bias:  # the bias's row blocks sit at 0, E, 2E of in_proj_bias; the weights are their own
        qk = kinds(laws)["attention_qk"][0]
        assert [t.param for t in qk.terms] == ["a.q_proj_weight", "a.in_proj_bias", "a.k_proj_weight", "a.in_proj_bias"]


@pytest.mark.parametrize("value_is_key", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_cross_attention_packed_weights(bias, value_is_key):
    # query ≠ key: nn.MultiheadAttention splits in_proj_weight into q | kv (value is key) or
    # q | k | v: row blocks of one parameter, each its own producer. The columns of a block are
    # not whole columns of the weight, so no consumer law reaches through them (the norms before)
    E, H = 12, 3

    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.MultiheadAttention(E, H, bias=bias, batch_first=True)

        def forward(self, x, mem):
            return self.a(x, mem, mem if value_is_key else 2 * mem, need_weights=False)[0]

    torch.manual_seed(1)
    m = Cross().double()
    if bias:
        with torch.no_grad():
            m.a.in_proj_bias.normal_()
            m.a.out_proj.bias.normal_()
    inputs = (torch.randn(2, 5, E).double(), torch.randn(2, 7, E).double())
    laws, _ = check(m, inputs, torch.randn(2, 5, E).double())
    _head_laws_match(laws, m, _packed(m.a.in_proj_weight, m.a.in_proj_bias if bias else None, E), m.a.out_proj.weight, H)
    if bias:  # the key bias shift, as for self-attention
        (kb,) = kinds(laws)["translation"]
        assert kb.terms[0].index.reshape(-1).tolist() == list(range(E, 2 * E))


def test_transformer_decoder_cross_attention_has_head_laws():
    torch.manual_seed(2)
    m = nn.Transformer(d_model=8, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=16,
                       dropout=0.0, batch_first=True).double()
    inputs = (torch.randn(2, 5, 8).double(), torch.randn(2, 3, 8).double())
    laws, _ = check(m, inputs, torch.randn(2, 3, 8).double())
    cross = [f.kind for f in laws if f.modules[0].startswith("decoder.layers.0.multihead_attn")]
    assert sorted(cross).count("attention_qk") == 2 and sorted(cross).count("attention_vo") == 2


def test_conv1d_addmm_rescale():
    # GPT-2's Conv1D (b + x W, W [in, out]): unit j is column j of W and b_j; the consumer's rows
    from _models import Conv1D

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = Conv1D(5, 7), Conv1D(7, 3)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(5)
    m = Net().double()
    x = torch.randn(2, 4, 5).double()
    laws, _ = check(m, (x,), torch.randn(2, 4, 3).double())
    (f,) = list(laws)
    assert f.kind == "rescale"
    ref = (m.a.weight.double() ** 2).sum(0) + m.a.bias.double() ** 2 - (m.b.weight.double() ** 2).sum(1)
    torch.testing.assert_close(laws.evaluate(m)[f.name], ref, rtol=1e-13, atol=1e-13)


def test_gpt2_style_attention_head_laws():
    # q, k, v are column blocks of c_attn's W [d, 3d] (and of its bias): head h of q is columns
    # h·d_h …, of k d + h·d_h …, of v 2d + h·d_h …; W_o,h is rows h·d_h … of c_proj's W
    from _models import GPT2Attention

    torch.manual_seed(6)
    d, H = 12, 3
    m = GPT2Attention(d, H).double()
    x = torch.randn(2, 5, d).double()
    laws, _ = check(m, (x,), torch.randn(2, 5, d).double())
    W, b, Wo = m.c_attn.weight.double(), m.c_attn.bias.double(), m.c_proj.weight.double()
    Wt = torch.cat([W.T, b[:, None]], 1)  # [3d, d + 1]: rows are output features
    _head_laws_match(laws, m, _packed(Wt, None, d), Wo.T, H)


def _laws_as_the_plain_form(make, variant, plain, x, target):
    """find_laws on the model written as `variant` and as `plain` (same weights): every law of
    the variant verified, the same families, bitwise the same values. Returns both LawSets."""
    ref = make(plain).double()
    m = make(variant).double()
    m.load_state_dict(ref.state_dict())
    laws, _ = check(m, (x,), target)
    ref_laws = consopt.find_laws(ref, (x,))
    assert [f.name for f in laws] == [f.name for f in ref_laws]
    v, rv = laws.evaluate(m), ref_laws.evaluate(ref)
    for k in rv:
        torch.testing.assert_close(v[k], rv[k], rtol=0, atol=0)
    return laws, ref_laws


class _EinsumAttention(nn.Module):
    """Attention with separate q/k/v/o Linears, its products written as matmuls or einsums."""

    def __init__(self, style):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(8, 8) for _ in range(4))
        self.style = style

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = (lin(x).view(B, T, 2, 4) for lin in (self.q, self.k, self.v))
        if self.style == "matmul":
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            y = ((q @ k.transpose(-1, -2)).softmax(-1) @ v).transpose(1, 2)
        elif self.style == "einsum":  # heads first, as the matmul
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            y = torch.einsum("bhqk,bhkd->bqhd", torch.einsum("bhqd,bhkd->bhqk", q, k).softmax(-1), v)
        else:  # heads in place: the letters permute
            y = torch.einsum("bhqk,bkhd->bqhd", torch.einsum("bqhd,bkhd->bhqk", q, k).softmax(-1), v)
        return self.o(y.reshape(B, T, 8))


@pytest.mark.parametrize("style", ["einsum", "einsum-in-place"])
def test_einsum_attention_has_the_matmul_laws(style):
    # the same model written with matmuls is the reference: same families, same values
    torch.manual_seed(7)
    laws, _ = _laws_as_the_plain_form(_EinsumAttention, style, "matmul", torch.randn(2, 5, 8).double(),
                                      torch.randn(2, 5, 8).double())
    assert sorted(f.kind for f in laws) == ["attention_qk"] * 2 + ["attention_vo"] * 2 + ["translation"]


@pytest.mark.parametrize("eq", ["...qd,...kd->...qk", "bqd,bkd->bqdk", "bqd->bdq", "bqd,bqd->bq", "bqd,bke->bqkde"])
def test_unusual_einsums_claim_nothing_wrong(eq):
    # ellipses, a contraction kept in the output, one operand, a diagonal-free elementwise product,
    # an outer product: followed where the rule applies, dropped otherwise, never a wrong law
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.o = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            ops = (self.a(x), self.b(x)) if "," in eq else (self.a(x),)
            y = torch.einsum(eq, *ops)
            y = torch.relu(y.reshape(x.shape[0], x.shape[1], -1))
            return self.o(y[..., :4] if y.shape[-1] >= 4 else y.expand(-1, -1, 4))

    torch.manual_seed(13)
    m = Net().double()
    x = torch.randn(2, 4, 4).double()
    check(m, (x,), torch.randn(2, 4, 3).double())


def test_einsum_with_a_parameter_drops_its_laws():
    # "btd,od->bto" is a Linear written as an einsum: not followed, so W keeps no law
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.W = nn.Parameter(torch.randn(6, 4))
            self.fc = nn.Linear(6, 3)

        def forward(self, x):
            return self.fc(torch.relu(torch.einsum("btd,od->bto", x, self.W)))

    laws = consopt.find_laws(Net(), (torch.randn(2, 3, 4),))
    assert all(t.param != "W" for f in laws for t in f.terms)
    assert any("parameter W " in n and "einsum" in n for n in laws.notes)


class _Idioms(nn.Module):
    """One network written with common idioms (`x @ W.T`, `out += h`, `torch.baddbmm` with a
    data bias on the logits) or in the reference form (F.linear, `out = out + h`, `bias + q @ kᵀ`)."""

    def __init__(self, idiom):
        super().__init__()
        self.W = nn.Parameter(torch.randn(6, 4))
        self.c, self.q, self.k, self.v, self.o = nn.Linear(6, 6), nn.Linear(6, 4), nn.Linear(6, 4), nn.Linear(6, 4), \
            nn.Linear(4, 3)
        self.idiom = idiom

    def forward(self, x):
        i = self.idiom
        W = self.W
        pre = {"T": lambda: x @ W.T, "t": lambda: x @ W.t(), "transpose": lambda: x @ W.transpose(0, 1),
               "permute": lambda: x @ W.permute(1, 0), "mT": lambda: x @ W.mT}.get(i, lambda: F.linear(x, W))()
        h = torch.relu(pre)
        out = self.c(h)
        if i == "+=":
            out += h
        else:
            out = out + h
        out = torch.relu(out)
        q, k, v = self.q(out), self.k(out), self.v(out)  # [B, T, 4]
        T = x.shape[1]
        bias = (torch.arange(T * T, dtype=x.dtype).view(T, T) * 0.1).expand(x.shape[0], T, T)  # ALiBi-like data
        logits = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=0.5) if i == "baddbmm" else \
            bias + 0.5 * (q @ k.transpose(1, 2))
        return self.o(logits.softmax(-1) @ v)


@pytest.mark.parametrize("idiom", ["T", "t", "transpose", "permute", "mT", "+=", "baddbmm"])
def test_idioms_have_the_reference_laws(idiom):
    torch.manual_seed(9)
    laws, ref_laws = _laws_as_the_plain_form(_Idioms, idiom, "reference", torch.randn(2, 5, 4).double(),
                                             torch.randn(2, 5, 3).double())
    assert {f.kind for f in ref_laws} >= {"stream", "attention_qk", "attention_vo"}
    assert not laws.notes


@pytest.mark.parametrize("in_place", [False, True])
def test_translation_through_an_in_place_residual(in_place):
    # a per-token shift of fc's output passes the residual sum (written `r += e` or `r = r + e`)
    # and is absorbed by the LayerNorm (the embedding's also reaches fc0's ReLU: no law)
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc0, self.fc = nn.Embedding(7, 6), nn.Linear(6, 5), nn.Linear(5, 6)
            self.ln, self.head = nn.LayerNorm(6), nn.Linear(6, 3)

        def forward(self, t):
            e = self.emb(t)
            r = self.fc(torch.relu(self.fc0(e)))
            if in_place:
                r += e
            else:
                r = r + e
            return self.head(self.ln(r))

    torch.manual_seed(12)
    m = Net().double()
    t = torch.randint(0, 7, (2, 4))
    laws, _ = check(m, (t,), torch.randn(2, 4, 3).double())
    assert [f.name for f in laws if f.kind == "translation"] == ["translation:fc"]


class _MultiQuery(nn.Module):
    """Falcon-style multi-query attention: one fused projection viewed as [B, T, H + 2, d_h];
    the queries are heads 0 … H−1, the key and value heads H and H + 1 picked by a slice or by
    a constant index list (which the trace lifts as a tensor constant)."""

    def __init__(self, pick):
        super().__init__()
        self.qkv, self.o = nn.Linear(8, 16), nn.Linear(8, 3)
        self.pick = pick

    def forward(self, x):
        B, T, _ = x.shape
        f = self.qkv(x).view(B, T, 4, 4)
        q = f[:, :, :2]
        if self.pick == "index":
            k, v = f[:, :, torch.tensor([2])], f[:, :, torch.tensor([3])]
        else:
            k, v = f[:, :, 2:3], f[:, :, 3:4]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k.expand(-1, 2, -1, -1), v.expand(-1, 2, -1, -1))
        return self.o(y.transpose(1, 2).reshape(B, T, 8))


def test_constant_index_moves_channels_like_a_slice():
    torch.manual_seed(14)
    _, ref_laws = _laws_as_the_plain_form(_MultiQuery, "index", "slice", torch.randn(2, 5, 8).double(),
                                          torch.randn(2, 5, 3).double())
    assert {f.kind for f in ref_laws} >= {"attention_qk", "attention_vo"}


def test_data_dependent_index_claims_nothing_wrong():
    # indices computed from the input are data: the channels they pick are dropped
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.b(h[:, torch.argsort(x[0, :4].sum().reshape(1).expand(6) * torch.arange(6.0))])

    torch.manual_seed(15)
    m = Net().double()
    check(m, (torch.randn(5, 4).double(),), torch.randn(5, 3).double())


def _aliased_in_place(kind):
    """An in-place op on a tensor a view of which is read afterwards (the view sees the write)."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.l0, self.l1, self.l2 = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 3)
            self.g = nn.Parameter(torch.rand(6) + 0.5)

        def forward(self, x):
            h = self.l1(x)
            v = h.view(h.shape) if kind == "mul_" else h[1:]
            if kind == "mul_":
                h.mul_(self.g)
            else:
                h.add_(self.l0(x))
            return self.l2(v)

    return Net(), (torch.randn(6, 4),)


def _one_param_twice(kind):
    """A parameter (or a row block of it) read twice by one op, or as an operand no rule follows."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.W, self.b = nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(4))
            self.P = nn.Parameter(torch.rand(4) + 0.5)
            self.o2, self.o4 = nn.Linear(2, 2), nn.Linear(4, 2)

        def forward(self, x):
            W = self.W
            if kind == "linear(W, W)":
                return self.o4(torch.relu(F.linear(W, W))) + x[:, :2]
            if kind == "addmm(b, W, W)":
                return self.o4(torch.relu(torch.addmm(self.b, W, W))) + x[:, :2]
            if kind == "linear(W[:2], W[:2])":
                return self.o2(F.linear(W[:2], W[:2])) + x[:2, :2]
            if kind == "addmm(b, W[:2], W)":
                return self.o4(torch.addmm(self.b, W[:2], W)) + x[:2, :2]
            if kind == "W[:2] @ W.T":
                return self.o4(W[:2] @ W.T) + x[:2, :2]
            return self.o4(x * (self.P * self.P[:1]))  # P ⊙ P[0]

    return Net(), (torch.randn(4, 4),)


def _baddbmm_onto_values():
    """baddbmm(x, attention, values): data added to the values' channels (not to logits)."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.v, self.o = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.o(torch.baddbmm(x, (x @ x.transpose(1, 2)).softmax(-1), self.v(x)))

    return Net(), (torch.randn(2, 5, 4),)


@pytest.mark.parametrize("make", [lambda: _aliased_in_place("mul_"), lambda: _aliased_in_place("add_"),
                                  _baddbmm_onto_values] + [
    (lambda k: lambda: _one_param_twice(k))(k) for k in
    ("linear(W, W)", "addmm(b, W, W)", "linear(W[:2], W[:2])", "addmm(b, W[:2], W)", "W[:2] @ W.T", "P * P[:1]")],
    ids=["mul_ aliased", "add_ aliased", "baddbmm onto values", "linear(W, W)", "addmm(b, W, W)",
         "linear(W[:2], W[:2])", "addmm(b, W[:2], W)", "W[:2] @ W.T", "P * P[:1]"])
def test_reviewed_wrong_laws_stay_away(make):
    # each made find_laws claim a law that is not one (|cos| 0.03 to 0.35); verified on two batches
    torch.manual_seed(16)
    m, inputs = make()
    m = m.double()
    inputs = tuple(x.double() for x in inputs)
    for batch in range(2):
        x = inputs if batch == 0 else tuple(torch.randn_like(t) for t in inputs)
        with torch.no_grad():
            y = torch.randn_like(m(*x))
        check(m, x, y)


@pytest.mark.parametrize("in_place", [False, True])
def test_chained_in_place_ops(in_place):
    # h = a(x); h -= b(x); h /= 2 (each on the previous one's output): as h = (a(x) − b(x)) / 2
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            h = self.a(x)
            if in_place:
                h.sub_(self.b(x))
                h.div_(2.0)
            else:
                h = (h - self.b(x)) / 2.0
            return self.c(torch.relu(h))

    torch.manual_seed(17)
    m = Net().double()
    x = torch.randn(5, 4).double()
    laws, _ = check(m, (x,), torch.randn(5, 3).double())
    assert [f.name for f in laws] == ["stream:a"] and not laws.notes


def test_in_place_add_on_a_tensor_read_later_is_not_followed():
    # h += y where h is read again afterwards: its readers see the sum, so the rule of `+` does
    # not apply; the channels are dropped, never given a wrong law
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 2)

        def forward(self, x):
            h = self.a(x)
            y = h * 1.0
            s = self.b(torch.relu(h))
            s += y
            return self.c(torch.relu(s)) + h.sum(-1, keepdim=True)

    torch.manual_seed(10)
    m = Net().double()
    x = torch.randn(3, 4).double()
    check(m, (x,), torch.randn(3, 2).double())


@pytest.mark.parametrize("rope", [False, True])
def test_qk_norm_gains_law(rope):
    # q = γ_q ⊙ RMSNorm(W_q x) per head (gains shared by the heads), k likewise: scaling γ_q[d]
    # by c and γ_k[d] by 1/c keeps every logit, so γ_q[d]² − γ_k[d]² is conserved; rotary
    # embedding rotates d with d + d_h/2, so then the pair is one unit
    from _models import QKNormAttention

    torch.manual_seed(11)
    m = QKNormAttention(rope=rope).double()
    x = torch.randn(2, 5, 8).double()
    laws, _ = check(m, (x,), torch.randn(2, 5, 8).double())
    (f,) = [f for f in laws if f.kind == "attention_qk"]
    assert f.form == "diag" and f.name == "attention_qk:qn" and [t.param for t in f.terms] == ["qn.weight", "kn.weight"]
    gq, gk = m.qn.weight.double() ** 2, m.kn.weight.double() ** 2
    ref = gq - gk if not rope else (gq[:2] + gq[2:]) - (gk[:2] + gk[2:])
    torch.testing.assert_close(laws.evaluate(m)[f.name], ref, rtol=1e-14, atol=1e-14)
    assert len([f for f in laws if f.kind == "attention_vo"]) == 2  # the heads' VO laws as before


def test_row_blocks_of_one_weight():
    # F.linear on W[:3] and on W[3:], each into a ReLU layer: two producers, each with its own
    # rescale law. Overlapping blocks (W[:4], W[2:]) share rows, and a block used by an op no
    # rule follows (x @ W[:3].T) breaks W: no law for W at all then
    class Blocks(nn.Module):
        def __init__(self, cut_a, cut_b, matmul=False):
            super().__init__()
            self.W = nn.Parameter(torch.randn(7, 5))
            self.o1, self.o2 = nn.Linear(cut_a, 2), nn.Linear(7 - cut_b, 2)
            self.cut_a, self.cut_b, self.matmul = cut_a, cut_b, matmul

        def forward(self, x):
            a = x @ self.W[:self.cut_a].T if self.matmul else F.linear(x, self.W[:self.cut_a])
            return self.o1(torch.relu(a)) + self.o2(torch.relu(F.linear(x, self.W[self.cut_b:])))

    torch.manual_seed(3)
    x, y = torch.randn(6, 5).double(), torch.randn(6, 2).double()
    m = Blocks(3, 3).double()
    laws, _ = check(m, (x,), y)
    v = laws.evaluate(m)
    fams = sorted((f for f in laws if any(t.param == "W" for t in f.terms)), key=lambda f: int(f.terms[0].index.min()))
    assert [f.terms[0].index.reshape(-1).tolist() for f in fams] == [[0, 1, 2], [3, 4, 5, 6]]
    for f, rows, o in zip(fams, (slice(0, 3), slice(3, 7)), (m.o1, m.o2)):
        ref = (m.W[rows].double() ** 2).sum(1) - (o.weight.double() ** 2).sum(0)
        torch.testing.assert_close(v[f.name], ref, rtol=1e-13, atol=1e-13)
    for bad in (Blocks(4, 2), Blocks(3, 3, matmul=True)):
        laws, _ = check(bad.double(), (x,), y)
        assert all(t.param != "W" for f in laws for t in f.terms)
        assert any("parameter W " in n for n in laws.notes)


def test_untracked_parameter_use_drops_its_laws():
    # tanh(W) in the output is no symmetry of W's laws: claiming rescale for f1 would be wrong
    class Penalised(nn.Module):
        def __init__(self):
            super().__init__()
            self.f1, self.f2, self.g1, self.g2 = nn.Linear(4, 6), nn.Linear(6, 3), nn.Linear(4, 5), nn.Linear(5, 3)

        def forward(self, x):
            y = self.f2(torch.relu(self.f1(x))) + self.g2(torch.relu(self.g1(x)))
            return y + torch.tanh(self.f1.weight).sum()

    torch.manual_seed(4)
    m = Penalised().double()
    x = torch.randn(5, 4).double()
    laws, _ = check(m, (x,), torch.randn(5, 3).double())
    assert [f.name for f in laws if f.kind == "rescale"] == ["rescale:g1"]
    assert all("f1.weight" not in f.params() for f in laws)
    assert any("f1.weight" in n and "tanh" in n for n in laws.notes)


def test_conv_relu_conv_count():
    m = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 4, 3))
    laws, _ = check(m, (torch.randn(2, 3, 9, 9),), torch.randn(2, 4, 5, 5))
    assert laws.num_functions == 16
    (f,) = list(laws)
    ref = (m[0].weight.double() ** 2).sum((1, 2, 3)) + m[0].bias.double() ** 2 \
        - (m[2].weight.double() ** 2).sum((0, 2, 3))
    torch.testing.assert_close(laws.evaluate(m)[f.name], ref, rtol=1e-13, atol=1e-13)


def test_wide_hidden_linear_law_counts_only_independent_entries():
    # W1W1ᵀ − W2ᵀW2 (5×5) has rank ≤ 2 + 2 when there is no bias: only 5·4 − 4·3/2 = 14 entries are free
    m = nn.Sequential(nn.Linear(2, 5, bias=False), nn.Linear(5, 2, bias=False))
    laws, _ = check(m, (torch.randn(3, 2),), torch.randn(3, 2))
    assert laws.num_functions == 14


def test_conv_conv_gram_law():
    m = nn.Sequential(nn.Conv2d(2, 5, 3), nn.Conv2d(5, 3, 1))
    laws, _ = check(m, (torch.randn(2, 2, 7, 7),), torch.randn(2, 3, 5, 5))
    (f,) = list(laws)
    assert f.kind == "linear" and laws.num_functions == 15
    W1 = torch.cat([m[0].weight.reshape(5, -1), m[0].bias[:, None]], 1).double()
    W2 = m[1].weight.double().transpose(0, 1).reshape(5, -1)
    torch.testing.assert_close(laws.evaluate(m)[f.name], W1 @ W1.T - W2 @ W2.T, rtol=1e-13, atol=1e-13)


def test_residual_stream_law():
    m = M.ResidualMLP(4, 5, 7, 3, blocks=2)
    laws, _ = check(m, (torch.randn(6, 4),), torch.randn(6, 3))
    kd = kinds(laws)
    (stream,) = kd["stream"]
    assert stream.form == "matrix" and stream.units == 5
    assert stream.num_functions(laws.param_shapes) == 15
    assert len(kd["rescale"]) == 2 and all(f.units == 7 for f in kd["rescale"])
    assert laws.num_functions == 15 + 14
    tilde = lambda lin: torch.cat([lin.weight, lin.bias[:, None]], 1).double()
    ref = tilde(m.stem) @ tilde(m.stem).T + sum(tilde(u) @ tilde(u).T for u in m.U) \
        - sum(v.weight.double().T @ v.weight.double() for v in m.V) - m.head.weight.double().T @ m.head.weight.double()
    torch.testing.assert_close(laws.evaluate(m)[stream.name], ref, rtol=1e-13, atol=1e-13)


def test_residual_stream_diagonal_under_relu():
    m = M.ResidualMLP(4, 5, 7, 3, blocks=2, stream_relu=True)
    laws, _ = check(m, (torch.randn(6, 4),), torch.randn(6, 3))
    (stream,) = kinds(laws)["stream"]
    assert stream.form == "diag" and stream.units == 5


# ---------------------------------------------------------------------------------------------
# every family on at least two architectures
# ---------------------------------------------------------------------------------------------
def test_resnet_basic_block_with_batchnorm():
    m = M.resnet_small(in_channels=1, bn=True, width=4)
    x = torch.randn(4, 1, 8, 8)
    laws, _ = check(m, (x,), torch.randint(0, 10, (4,)), ce, loss="cross_entropy", approximate=True)
    kd = kinds(laws)
    # BN1 affine -> conv2 rescale inside each block; stream laws over stem BN + last BN of blocks.
    assert {f.name for f in kd["rescale"]} >= {"rescale:layer1.0.bn1", "rescale:layer2.0.bn1"}
    stream = {f.name: f for f in kd["stream"]}
    assert "stream:bn1" in stream and stream["stream:bn1"].form == "diag"
    assert set(stream["stream:bn1"].modules) >= {"bn1", "layer1.0.bn2", "layer1.0.conv1", "layer2.0.conv1"}
    assert any(f.name == "translation:fc" for f in kd["translation"])  # cross-entropy logits
    assert all(f.approximate for f in kd["scale"]) and len(kd["scale"]) >= 3
    n_approx = sum(f.num_functions(laws.param_shapes) for f in kd["scale"])
    assert n_approx == 0


def test_resnet_without_batchnorm_stream_and_conv_rescale():
    m = M.resnet_small(in_channels=1, bn=False, width=4)
    laws, _ = check(m, (torch.randn(3, 1, 8, 8),), torch.randint(0, 10, (3,)), ce)
    kd = kinds(laws)
    assert len(kd["stream"]) == 2 and len(kd["rescale"]) == 2


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_layer(norm_first):
    m = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, activation="relu", batch_first=True,
                                   norm_first=norm_first)
    laws, _ = check(m, (torch.randn(2, 5, 8),), torch.randn(2, 5, 8))
    kd = kinds(laws)
    assert len(kd["attention_qk"]) == 2 and len(kd["attention_vo"]) == 2
    assert any(f.name == "rescale:linear1" for f in kd["rescale"])
    # pre-norm: the norms' affine parameters feed Linear layers directly (norm affine -> consumer)
    assert any(f.name == "rescale:norm1" for f in kd["rescale"]) == norm_first
    assert "stream" not in kd  # LayerNorm on the stream: no stream law


def test_pre_norm_stream_biases_cancel_at_the_output():
    # Pre-norm layer, no final norm: t·1 added to out_proj's bias is absorbed by norm2 on the MLP
    # branch and reaches the output along the skip, where −t·1 on linear2's bias cancels it.
    m = nn.TransformerEncoderLayer(4, 2, 6, dropout=0.0, activation="relu", batch_first=True, norm_first=True)
    laws, _ = check(m, (torch.randn(2, 5, 4),), torch.randn(2, 5, 4))
    (f,) = [f for f in laws if f.modules == ("self_attn.out_proj", "linear2")]
    assert f.kind == "translation" and f.units == 1
    ref = m.self_attn.out_proj.bias.double().sum() - m.linear2.bias.double().sum()
    torch.testing.assert_close(laws.evaluate(m)[f.name], ref.reshape(1), rtol=1e-14, atol=1e-14)
    assert laws.num_functions == 31  # = count_laws (docs/count_laws.md)


@pytest.mark.parametrize("final_norm", [False, True])
def test_pre_norm_stack_pairs_every_stream_bias(final_norm):
    # 2 layers: 4 biases write to the stream. Without a final norm they give 3 differences; with
    # one, each bias is its own per-token translation law and no difference is added.
    layer = nn.TransformerEncoderLayer(4, 2, 6, dropout=0.0, activation="relu", batch_first=True, norm_first=True)
    m = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(4) if final_norm else None, enable_nested_tensor=False)
    laws, _ = check(m, (torch.randn(2, 5, 4),), torch.randn(2, 5, 4))
    pairs = [f for f in laws if f.kind == "translation" and f.units == 1 and len(f.terms) == 2]
    assert len(pairs) == (0 if final_norm else 3)
    v = laws.evaluate(m)
    for f in pairs:
        a, b = (dict(m.named_parameters())[t.param].double().sum() for t in f.terms)
        torch.testing.assert_close(v[f.name], (a - b).reshape(1), rtol=1e-14, atol=1e-14)


def test_scaled_or_dropped_skip_has_no_cross_producer_law():
    class Scaled(nn.Module):
        def __init__(self, alpha, p):
            super().__init__()
            self.ln, self.f1, self.f2, self.alpha, self.drop = nn.LayerNorm(4), nn.Linear(4, 4), nn.Linear(4, 4), alpha, nn.Dropout(p)
            self.g = nn.Linear(4, 4)

        def forward(self, x):
            x = x + self.drop(self.f1(x))
            return (x if self.alpha == 1 else self.alpha * x) + self.f2(torch.relu(self.g(self.ln(x))))

    for alpha, p in [(0.5, 0.0), (1.0, 0.3)]:
        laws, _ = check(Scaled(alpha, p), (torch.randn(3, 4),), torch.randn(3, 4))
        assert not [f for f in laws if f.kind == "translation" and len(f.terms) == 2]
    laws, _ = check(Scaled(1.0, 0.0), (torch.randn(3, 4),), torch.randn(3, 4))
    assert len([f for f in laws if f.kind == "translation" and len(f.terms) == 2]) == 1


def test_transformer_post_norm_translation_laws():
    m = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, activation="relu", batch_first=True)
    laws, _ = check(m, (torch.randn(2, 5, 8),), torch.randn(2, 5, 8))
    names = {f.name for f in kinds(laws)["translation"]}
    assert names == {"translation:linear2", "translation:self_attn.out_proj", "translation:self_attn"}
    assert laws["translation:self_attn"].form == "diag"  # the key bias
    f = laws["translation:linear2"]
    ref = torch.cat([m.linear2.weight.double().sum(0), m.linear2.bias.double().sum()[None]])
    torch.testing.assert_close(laws.evaluate(m)[f.name], ref, rtol=1e-14, atol=1e-14)


def test_transformer_dropout_breaks_translation():
    m = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, activation="relu", batch_first=True)
    laws = consopt.find_laws(m, (torch.randn(2, 5, 8),))
    assert [f.name for f in laws if f.kind == "translation"] == ["translation:self_attn"]  # key bias only


@pytest.mark.parametrize("native_norm", [True, False])
def test_llama_block(native_norm):
    m = M.LlamaBlock(d=16, n_heads=4, n_kv_heads=2, hidden=12, native_norm=native_norm)
    laws, _ = check(m, (torch.randn(2, 5, 16),), torch.randn(2, 5, 16))
    kd = kinds(laws)
    assert len(kd["attention_qk"]) == 2 and len(kd["attention_vo"]) == 2  # one per key/value head
    assert [f.units for f in kd["gate"]] == [12]
    assert {f.name for f in kd["rescale"]} == {"rescale:attn_norm", "rescale:mlp_norm"}
    # grouped-query: QK of key head g is Σ over its query heads minus the key head's Gram.
    dh, g = 4, 1
    f = [f for f in kd["attention_qk"] if f.name.endswith(".h1")][0]
    Wq, Wk = m.wq.weight.double(), m.wk.weight.double()
    ref = sum(Wq[h * dh:(h + 1) * dh] @ Wq[h * dh:(h + 1) * dh].T for h in (2, 3)) \
        - Wk[g * dh:(g + 1) * dh] @ Wk[g * dh:(g + 1) * dh].T
    torch.testing.assert_close(laws.evaluate(m)[f.name], ref, rtol=1e-13, atol=1e-13)
    fv = [f for f in kd["attention_vo"] if f.name.endswith(".h1")][0]
    Wv, Wo = m.wv.weight.double(), m.wo.weight.double()
    ref = Wv[dh:2 * dh] @ Wv[dh:2 * dh].T - sum(Wo[:, h * dh:(h + 1) * dh].T @ Wo[:, h * dh:(h + 1) * dh] for h in (2, 3))
    torch.testing.assert_close(laws.evaluate(m)[fv.name], ref, rtol=1e-13, atol=1e-13)
    # gate law: ‖W_up[j]‖² − ‖W_down[:, j]‖²
    ref = (m.w_up.weight.double() ** 2).sum(1) - (m.w_down.weight.double() ** 2).sum(0)
    torch.testing.assert_close(laws.evaluate(m)[kd["gate"][0].name], ref, rtol=1e-13, atol=1e-13)


class ExplicitAttention(nn.Module):
    """Separate q/k/v/o Linear modules, explicit matmul-softmax, optional manual GQA."""

    def __init__(self, d=12, heads=3, kv_heads=3, bias=True):
        super().__init__()
        self.h, self.kv, self.dh = heads, kv_heads, d // heads
        self.q = nn.Linear(d, heads * self.dh, bias=bias)
        self.k = nn.Linear(d, kv_heads * self.dh, bias=bias)
        self.v = nn.Linear(d, kv_heads * self.dh, bias=bias)
        self.o = nn.Linear(heads * self.dh, d, bias=bias)

    def forward(self, x):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.h, self.dh).transpose(1, 2)
        k = self.k(x).view(B, T, self.kv, self.dh).transpose(1, 2)
        v = self.v(x).view(B, T, self.kv, self.dh).transpose(1, 2)
        if self.kv != self.h:
            k = k.repeat_interleave(self.h // self.kv, dim=1)
            v = v.repeat_interleave(self.h // self.kv, dim=1)
        a = torch.softmax(q @ k.transpose(-2, -1) / self.dh ** 0.5, dim=-1)
        return self.o((a @ v).transpose(1, 2).reshape(B, T, -1))


@pytest.mark.parametrize("kv_heads", [3, 1])
def test_explicit_attention_and_manual_gqa(kv_heads):
    m = ExplicitAttention(12, 3, kv_heads)
    laws, _ = check(m, (torch.randn(2, 4, 12),), torch.randn(2, 4, 12))
    kd = kinds(laws)
    assert len(kd["attention_qk"]) == kv_heads and len(kd["attention_vo"]) == kv_heads
    assert all(f.units == 4 for f in kd["attention_qk"])
    assert laws.num_functions == 2 * kv_heads * 10 + kv_heads * 4  # + the key bias
    assert [f.name for f in kd["translation"]] == ["translation:k"]


class GeGLU(nn.Module):
    def __init__(self, d=6, h=10):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(d, h), nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        return self.down(F.gelu(self.gate(x)) * self.up(x))


class _WrittenGELU(nn.Module):
    """The tanh GELU written out (T5 v1.1's NewGELU): 0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³)))."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * torch.pow(x, 3.0))))


@pytest.mark.parametrize("written", [False, True])
def test_geglu_gate_law_includes_up_bias(written):
    # with the activation written out, its channels die at tanh and are data to the product
    class Written(GeGLU):
        def forward(self, x):
            return self.down(_WrittenGELU()(self.gate(x)) * self.up(x))

    m = Written() if written else GeGLU()
    laws, _ = check(m, (torch.randn(5, 6),), torch.randn(5, 6))
    (f,) = kinds(laws)["gate"]
    ref = (m.up.weight.double() ** 2).sum(1) + m.up.bias.double() ** 2 - (m.down.weight.double() ** 2).sum(0)
    torch.testing.assert_close(laws.evaluate(m)[f.name], ref, rtol=1e-13, atol=1e-13)


def test_conv_relu_maxpool_flatten_linear():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 3 * 3, 5))
    laws, _ = check(m, (torch.randn(2, 3, 8, 8),), torch.randn(2, 5))
    (f,) = list(laws)
    W2 = m[4].weight.double().view(5, 4, 9)
    ref = (m[0].weight.double() ** 2).sum((1, 2, 3)) + m[0].bias.double() ** 2 - (W2 ** 2).sum((0, 2))
    torch.testing.assert_close(laws.evaluate(m)[f.name], ref, rtol=1e-13, atol=1e-13)


class _InvertedResidual(nn.Module):
    """MobileNetV2-style: 1x1 expand, depthwise 3x3 (channel multiplier m), 1x1 project."""

    def __init__(self, c=3, e=5, m=1, bn=False):
        super().__init__()
        self.pw1, self.dw = nn.Conv2d(c, e, 1), nn.Conv2d(e, e * m, 3, padding=1, groups=e)
        self.pw2 = nn.Conv2d(e * m, 4, 1)
        self.b1, self.b2 = (nn.BatchNorm2d(e), nn.BatchNorm2d(e * m)) if bn else (nn.Identity(), nn.Identity())

    def forward(self, x):
        x = torch.relu(self.b1(self.pw1(x)))
        return self.pw2(torch.relu(self.b2(self.dw(x))))


@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("bn", [False, True])
def test_depthwise_conv_rescale_laws(m, bn):
    # One law per unit on each side of the depthwise conv, plus a bias translation per BN; the
    # Lie-algebra certificate (count_laws) agrees: 12 / 18 without BN, 24 / 36 with BN for e = 6.
    e = 5
    mod = _InvertedResidual(e=e, m=m, bn=bn)
    x = torch.randn(4, 3, 5, 5)
    laws, _ = check(mod, (x,), torch.randn(4, 4, 5, 5))
    per_kind = kinds(laws)
    assert len(per_kind["rescale"]) == 2
    assert laws.num_functions == (e + e * m) * (2 if bn else 1)  # BN adds a bias translation per side
    v = laws.evaluate(mod)
    dw = mod.dw.weight.double().reshape(e, m, -1)  # input channel i feeds rows i·m … i·m+m−1
    if bn:
        into = mod.b1.weight.double() ** 2 + mod.b1.bias.double() ** 2
    else:
        into = (mod.pw1.weight.double() ** 2).sum((1, 2, 3)) + mod.pw1.bias.double() ** 2
    f_in = [f for f in per_kind["rescale"] if "dw" in f.modules and f.terms[-1].param == "dw.weight"][0]
    torch.testing.assert_close(v[f_in.name], into - (dw ** 2).sum((1, 2)), rtol=1e-13, atol=1e-13)
    if bn:
        prod = mod.b2.weight.double() ** 2 + mod.b2.bias.double() ** 2
    else:
        prod = (mod.dw.weight.double() ** 2).sum((1, 2, 3)) + mod.dw.bias.double() ** 2
    f_out = [f for f in per_kind["rescale"] if "pw2" in f.modules][0]
    ref = prod - (mod.pw2.weight.double() ** 2).sum((0, 2, 3))
    torch.testing.assert_close(v[f_out.name], ref, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("groups,c_mid", [(2, 6), (3, 9)])
def test_grouped_conv_laws_on_both_sides(groups, c_mid):
    # groups G with c = c_mid / G input channels per group: input channel g·c + j is read by column
    # j of group g's rows only (a refined axis, Term.groups), so the units feeding the grouped conv
    # get a law too; all laws together match count_laws.
    m = nn.Sequential(nn.Conv2d(2, c_mid, 1), nn.ReLU(), nn.Conv2d(c_mid, 2 * groups, 3, groups=groups), nn.ReLU(),
                      nn.Conv2d(2 * groups, 3, 1))
    x = torch.randn(3, 2, 6, 6)
    laws, _ = check(m, (x,), torch.randn(3, 3, 4, 4))
    assert laws.num_functions == consopt.count_laws(m, (x,)).count == c_mid + 2 * groups
    f_in = [f for f in laws if f.modules[0] == "0"][0]
    f_out = [f for f in laws if f.modules[0] == "2"][0]
    (cons,) = [t for t in f_in.terms if t.sign < 0]
    assert cons.param == "2.weight" and cons.groups == groups
    w0, b0, w2, b2, w4 = (m[0].weight.double(), m[0].bias.double(), m[2].weight.double(), m[2].bias.double(),
                          m[4].weight.double())
    c, og = c_mid // groups, 2
    into = torch.stack([(w2[(i // c) * og:(i // c + 1) * og, i % c] ** 2).sum() for i in range(c_mid)])
    ref_in = (w0 ** 2).sum((1, 2, 3)) + b0 ** 2 - into
    v = laws.evaluate(m)
    torch.testing.assert_close(v[f_in.name], ref_in, rtol=1e-13, atol=1e-13)
    ref_out = (w2 ** 2).sum((1, 2, 3)) + b2 ** 2 - (w4 ** 2).sum((0, 2, 3))
    torch.testing.assert_close(v[f_out.name], ref_out, rtol=1e-13, atol=1e-13)


def test_batchnorm_bias_translation_and_affine_rescale():
    m = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 4 * 4, 4))
    laws, _ = check(m, (torch.randn(4, 3, 6, 6),), torch.randint(0, 4, (4,)), ce, loss="cross_entropy",
                    approximate=True)
    assert laws["translation:0"].form == "diag"  # conv bias before BN: b_c itself
    torch.testing.assert_close(laws.evaluate(m)["translation:0"], m[0].bias.double())
    assert laws["rescale:1"].kind == "rescale"  # BN affine -> Linear columns
    assert laws["scale:0"].approximate and laws["translation:4"].form == "vector"


def test_layernorm_affine_feeds_mlp():
    m = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))
    laws, _ = check(m, (torch.randn(3, 5),), torch.randn(3, 2), approximate=True)
    names = {f.name for f in laws}
    assert {"rescale:1", "rescale:2", "translation:0", "scale:0"} <= names
    assert laws["scale:0"].approximate and laws["scale:0"].units == 1


# ---------------------------------------------------------------------------------------------
# negative cases
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("act", [nn.GELU, nn.SiLU, nn.Tanh])
def test_non_homogeneous_activations_have_no_rescale_law(act):
    m = M.MLP([4, 6, 3], activation=act)
    laws = consopt.find_laws(m, (torch.randn(2, 4),))
    assert laws.num_functions == 0


def test_layernorm_on_stream_kills_stream_law():
    class M2(M.ResidualMLP):
        def __init__(self):
            super().__init__(4, 5, 7, 3)
            self.ln = nn.LayerNorm(5)

        def forward(self, x):
            x = self.stem(x)
            for V, U in zip(self.V, self.U):
                x = x + U(torch.relu(V(x)))
            return self.head(self.ln(x))

    m = M2()
    laws, _ = check(m, (torch.randn(4, 4),), torch.randn(4, 3))
    assert "stream" not in {f.kind for f in laws}
    assert sum(f.kind == "rescale" for f in laws) == 3  # two blocks + LN affine -> head


@torch.library.custom_op("consopt_test::mystery", mutates_args=())
def _mystery(x: torch.Tensor) -> torch.Tensor:
    return x * 2.0 + 1.0


@_mystery.register_fake
def _(x):
    return torch.empty_like(x)


def test_unknown_custom_op_stops_only_its_spaces():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 5), nn.Linear(5, 2)

        def forward(self, x):
            h = torch.relu(self.a(x))
            g = _mystery(torch.relu(self.b(h)))
            return self.c(g)

    m = Net()
    laws = consopt.find_laws(m, (torch.randn(3, 4),))
    assert [f.name for f in laws] == ["rescale:a"]
    assert any("mystery" in n for n in laws.notes)


def test_tied_weights_drop_their_laws():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(9, 4)
            self.mid = nn.Linear(4, 4)

        def forward(self, t):
            return F.linear(torch.relu(self.mid(self.emb(t))), self.emb.weight)

    laws = consopt.find_laws(Tied(), (torch.randint(0, 9, (2, 3)),))
    assert all("emb.weight" not in f.params() for f in laws)


def test_frozen_parameters_drop_their_families():
    # a frozen producer does not move, so its unit's rescale law is no law of training:
    # find_laws drops it (with a note), and verify, judging by the trainable part, fails it
    def net():
        torch.manual_seed(8)
        return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()

    x, y = torch.randn(8, 4).double(), torch.randn(8, 3).double()
    free = consopt.find_laws(net(), (x,))
    assert [f.name for f in free] == ["rescale:0", "rescale:2"]
    m = net()
    m[0].requires_grad_(False)
    laws, _ = check(m, (x,), y)
    assert [f.name for f in laws] == ["rescale:2"]
    assert any("0.weight is frozen" in n for n in laws.notes)
    cos = free.verify(m, (x,), y, mse)
    assert cos["rescale:0"] > 1e-3 and cos["rescale:2"] <= COS_TOL


def test_verify_refuses_a_non_finite_loss():
    # a NaN gradient would make every cosine read 0, a pass
    m = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    x = torch.randn(5, 4).double()
    laws = consopt.find_laws(m, (x,))
    x[2, 1] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        laws.verify(m, (x,), torch.randn(5, 3).double(), mse)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def test_eval_mode_batchnorm_is_an_error():
    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU()).eval()
    with pytest.raises(LawDiscoveryError, match="eval mode"):
        consopt.find_laws(m, (torch.randn(2, 1, 5, 5),))


def test_untraceable_model_names_the_problem():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 3)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return self.l(x)
            return -self.l(x)

    with pytest.raises(LawDiscoveryError, match="could not trace Branchy.*control flow"):
        consopt.find_laws(Branchy(), (torch.randn(2, 3),))


def test_wrong_input_shape():
    with pytest.raises(LawDiscoveryError, match=r"does not run on example_inputs of shapes \[\(2, 7\)\]"):
        consopt.find_laws(M.MLP([4, 5, 2]), (torch.randn(2, 7),))


def test_non_module_and_bad_arguments():
    with pytest.raises(TypeError, match="nn.Module"):
        consopt.find_laws(lambda x: x, (torch.randn(2),))
    with pytest.raises(ValueError, match="loss"):
        consopt.find_laws(M.MLP([2, 3, 1]), (torch.randn(2, 2),), loss="hinge")
    with pytest.raises(TypeError, match="tuple"):
        consopt.find_laws(M.MLP([2, 3, 1]), {"x": torch.randn(2, 2)})


def test_single_tensor_input_and_one_unit_layer():
    m = M.MLP([3, 1, 2])
    laws, _ = check(m, torch.randn(4, 3), torch.randn(4, 2))
    assert laws.num_functions == 1


def test_lawset_evaluates_on_copies_and_rejects_other_shapes():
    import copy

    m = M.MLP([4, 5, 2])
    laws = consopt.find_laws(m, (torch.randn(2, 4),))
    a = laws.evaluate(m)
    b = laws.evaluate(copy.deepcopy(m).double())
    for k in a:
        assert torch.equal(a[k], b[k])
    with pytest.raises(ValueError, match="0.weight"):
        laws.evaluate(M.MLP([4, 6, 2]))
    with pytest.raises(KeyError, match="0.weight"):
        laws.evaluate(nn.Sequential())
    assert "rescale:0" in laws.summary()
