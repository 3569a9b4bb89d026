"""Small model zoo shared by the tests, with hand-built conservation laws.

Each model comes with `example_inputs(model, batch, generator)` -> tuple of inputs and a matching
target, and a `*_laws(model)` helper that builds its laws by hand with `Term`/`Family` (SPEC §5
orientation: Linear weight is [out, in]; producer slices +1, consumer slices −1). The hand-built
laws name exactly which slices are which, so tests can check formulas slice by slice.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from consopt.laws import Family, LawSet, Term


# -- index helpers ---------------------------------------------------------------------------
def rows(n: int, start: int = 0) -> torch.Tensor:
    """Index [n, 1]: unit u is slice start + u."""
    return torch.arange(start, start + n).view(n, 1)


def blocks(n: int, size: int, start: int = 0) -> torch.Tensor:
    """Index [n, size]: unit u is slices start + u*size ... start + (u+1)*size − 1."""
    return torch.arange(start, start + n * size).view(n, size)


def lawset(model: nn.Module, families) -> LawSet:
    params = dict(model.named_parameters())
    return LawSet(families, {k: v.shape for k, v in params.items()}, params=params)


def rescale_family(name, producers, consumers, units, kind="rescale", modules=()):
    """Order-2 diag family: Σ‖producer slices‖² − Σ‖consumer slices‖² per unit.

    producers / consumers: lists of (param name, axis, index)."""
    terms = [Term(p, a, i, +1) for p, a, i in producers] + [Term(p, a, i, -1) for p, a, i in consumers]
    for t in terms:
        assert t.units == units, (t.param, t.units, units)
    return Family(name, kind, "diag", 2, terms, tuple(modules))


# -- MLP -------------------------------------------------------------------------------------
class MLP(nn.Module):
    """x -> fc1 -> ReLU -> fc2 -> ReLU -> fc3 (odd, prime widths by default)."""

    def __init__(self, d_in=7, h1=13, h2=11, d_out=5, bias=True):
        super().__init__()
        self.fc1 = nn.Linear(d_in, h1, bias=bias)
        self.fc2 = nn.Linear(h1, h2, bias=bias)
        self.fc3 = nn.Linear(h2, d_out, bias=bias)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))

    def example_inputs(self, batch=16, generator=None):
        d_in = self.fc1.in_features
        x = torch.randn(batch, d_in, generator=generator, dtype=self.fc1.weight.dtype)
        y = torch.randn(batch, self.fc3.out_features, generator=generator, dtype=self.fc1.weight.dtype)
        return (x,), y


def mlp_laws(model: MLP) -> LawSet:
    fams = []
    for k, (a, b) in enumerate([("fc1", "fc2"), ("fc2", "fc3")], start=1):
        la, lb = getattr(model, a), getattr(model, b)
        r = la.out_features
        prod = [(f"{a}.weight", 0, rows(r))]
        if la.bias is not None:
            prod.append((f"{a}.bias", 0, rows(r)))
        fams.append(rescale_family(f"rescale.{a}", prod, [(f"{b}.weight", 1, rows(r))], r, modules=(a, b)))
    return lawset(model, fams)


# -- CNN with BatchNorm ----------------------------------------------------------------------
class ConvBN(nn.Module):
    """conv1 -> BN -> ReLU -> maxpool -> conv2 -> ReLU -> avgpool(2x2) -> flatten -> fc."""

    def __init__(self, c_in=3, c1=5, c2=7, n_out=3):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c1, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(c2 * 4, n_out)

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)
        x = self.pool(torch.relu(self.conv2(x)))
        return self.fc(torch.flatten(x, 1))

    def example_inputs(self, batch=6, generator=None):
        dt = self.conv1.weight.dtype
        x = torch.randn(batch, self.conv1.in_channels, 9, 11, generator=generator, dtype=dt)
        y = torch.randn(batch, self.fc.out_features, generator=generator, dtype=dt)
        return (x,), y


def convbn_laws(model: ConvBN) -> LawSet:
    c1, c2 = model.conv1.out_channels, model.conv2.out_channels
    fams = [
        # BN affine of channel j (γ_j, β_j) against conv2's in-channel j.
        rescale_family("rescale.bn1", [("bn1.weight", 0, rows(c1)), ("bn1.bias", 0, rows(c1))],
                       [("conv2.weight", 1, rows(c1))], c1, modules=("bn1", "conv2")),
        # conv2 out-channel j against the 4 columns of fc that flatten(avgpool 2x2) makes of it.
        rescale_family("rescale.conv2", [("conv2.weight", 0, rows(c2)), ("conv2.bias", 0, rows(c2))],
                       [("fc.weight", 1, blocks(c2, 4))], c2, modules=("conv2", "fc")),
        # BatchNorm translation: the producer's bias before a batch-statistics BN.
        Family("translation.conv1", "translation", "diag", 1, [Term("conv1.bias", 0, rows(c1), +1)],
               ("conv1", "bn1")),
    ]
    return lawset(model, fams)


# -- attention (nn.MultiheadAttention) -------------------------------------------------------
class Attn(nn.Module):
    """inp Linear -> MultiheadAttention (packed in_proj, biases) -> out Linear, on [B, T, d]."""

    def __init__(self, d_in=5, embed=12, heads=3, d_out=4):
        super().__init__()
        self.inp = nn.Linear(d_in, embed)
        self.attn = nn.MultiheadAttention(embed, heads, bias=True, batch_first=True)
        self.out = nn.Linear(embed, d_out)

    def forward(self, x):
        h = self.inp(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.out(a)

    def example_inputs(self, batch=3, seq=7, generator=None):
        dt = self.inp.weight.dtype
        x = torch.randn(batch, seq, self.inp.in_features, generator=generator, dtype=dt)
        y = torch.randn(batch, seq, self.out.out_features, generator=generator, dtype=dt)
        return (x,), y


def attn_qk_terms(model: Attn, h: int):
    """(q terms, k terms) of head h: rows of the packed in_proj weight and bias."""
    E, H = model.attn.embed_dim, model.attn.num_heads
    dh = E // H
    q = [Term("attn.in_proj_weight", 0, rows(dh, h * dh), +1), Term("attn.in_proj_bias", 0, rows(dh, h * dh), +1)]
    k = [Term("attn.in_proj_weight", 0, rows(dh, E + h * dh), -1),
         Term("attn.in_proj_bias", 0, rows(dh, E + h * dh), -1)]
    return q, k


def attn_laws(model: Attn) -> LawSet:
    E, H = model.attn.embed_dim, model.attn.num_heads
    dh = E // H
    fams = []
    for h in range(H):
        q, k = attn_qk_terms(model, h)
        fams.append(Family(f"attention_qk.h{h}", "attention_qk", "matrix", 2, q + k, ("attn",)))
        v = [Term("attn.in_proj_weight", 0, rows(dh, 2 * E + h * dh), +1),
             Term("attn.in_proj_bias", 0, rows(dh, 2 * E + h * dh), +1),
             Term("attn.out_proj.weight", 1, rows(dh, h * dh), -1)]
        fams.append(Family(f"attention_vo.h{h}", "attention_vo", "matrix", 2, v, ("attn",)))
    return lawset(model, fams)


# -- Llama-style block -------------------------------------------------------------------------
class LlamaBlock(nn.Module):
    """Pre-norm block: x + Attn(RMSNorm(x)), then + SwiGLU(RMSNorm(.)), then a Linear head.

    Grouped-query attention (n_kv_heads < n_heads) through
    F.scaled_dot_product_attention(..., enable_gqa=True); no biases, no RoPE.
    """

    def __init__(self, d=12, n_heads=4, n_kv_heads=2, ffn=17, d_out=5):
        super().__init__()
        assert d % n_heads == 0 and n_heads % n_kv_heads == 0
        self.d, self.h, self.hkv, self.dh = d, n_heads, n_kv_heads, d // n_heads
        self.attn_norm = nn.RMSNorm(d)
        self.q_proj = nn.Linear(d, n_heads * self.dh, bias=False)
        self.k_proj = nn.Linear(d, n_kv_heads * self.dh, bias=False)
        self.v_proj = nn.Linear(d, n_kv_heads * self.dh, bias=False)
        self.o_proj = nn.Linear(n_heads * self.dh, d, bias=False)
        self.mlp_norm = nn.RMSNorm(d)
        self.gate = nn.Linear(d, ffn, bias=False)
        self.up = nn.Linear(d, ffn, bias=False)
        self.down = nn.Linear(ffn, d, bias=False)
        self.head = nn.Linear(d, d_out)

    def forward(self, x):
        B, T, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(B, T, self.h, self.dh).transpose(1, 2)
        k = self.k_proj(h).view(B, T, self.hkv, self.dh).transpose(1, 2)
        v = self.v_proj(h).view(B, T, self.hkv, self.dh).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.o_proj(a.transpose(1, 2).reshape(B, T, self.h * self.dh))
        h = self.mlp_norm(x)
        x = x + self.down(F.silu(self.gate(h)) * self.up(h))
        return self.head(x)

    def example_inputs(self, batch=2, seq=6, generator=None):
        dt = self.q_proj.weight.dtype
        x = torch.randn(batch, seq, self.d, generator=generator, dtype=dt)
        y = torch.randn(batch, seq, self.head.out_features, generator=generator, dtype=dt)
        return (x,), y


def llama_laws(model: LlamaBlock) -> LawSet:
    dh, g = model.dh, model.h // model.hkv
    fams = []
    for kv in range(model.hkv):
        qheads = range(kv * g, (kv + 1) * g)  # query heads sharing kv head `kv` (repeat_interleave)
        qk = [Term("q_proj.weight", 0, rows(dh, h * dh), +1) for h in qheads]
        qk.append(Term("k_proj.weight", 0, rows(dh, kv * dh), -1))
        fams.append(Family(f"attention_qk.g{kv}", "attention_qk", "matrix", 2, qk, ("q_proj", "k_proj")))
        vo = [Term("v_proj.weight", 0, rows(dh, kv * dh), +1)]
        vo += [Term("o_proj.weight", 1, rows(dh, h * dh), -1) for h in qheads]
        fams.append(Family(f"attention_vo.g{kv}", "attention_vo", "matrix", 2, vo, ("v_proj", "o_proj")))
    f = model.up.out_features
    fams.append(rescale_family("gate.mlp", [("up.weight", 0, rows(f))], [("down.weight", 1, rows(f))], f,
                               kind="gate", modules=("up", "down")))
    return lawset(model, fams)


# -- registry --------------------------------------------------------------------------------
class GroupedConv(nn.Module):
    """Conv(2→6) → ReLU → Conv(6→4, groups=2: 3 input channels per group) → ReLU → mean → Linear(4→3):
    the units feeding the grouped conv have a law through a refined axis (`Term.groups`)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 4, 3, padding=1, groups=2)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))


class EncoderDecoder(nn.Module):
    """nn.Transformer (1 encoder, 1 decoder layer, d = 8, 2 heads) on x [B, T, 8]: the source is
    x, the target its first 3 tokens; mean over the target → Linear(8→3). The decoder's
    cross-attention splits its packed in_proj_weight into q | kv row blocks."""

    def __init__(self):
        super().__init__()
        self.t = nn.Transformer(d_model=8, nhead=2, num_encoder_layers=1, num_decoder_layers=1,
                                dim_feedforward=12, dropout=0.0, batch_first=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.t(x, x[:, :3]).mean(1))


class Conv1D(nn.Module):
    """GPT-2's Conv1D (Hugging Face): y = b + x W with W [in, out], one addmm."""

    def __init__(self, nx, nf):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * nx ** -0.5)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


class GPT2Attention(nn.Module):
    """GPT-2's eager attention written out: c_attn (Conv1D d → 3d) split into q, k, v along the
    features, heads, softmax(q kᵀ / √d_h + causal mask) v, merged, c_proj (Conv1D d → d)."""

    def __init__(self, d=12, heads=3):
        super().__init__()
        self.d, self.heads = d, heads
        self.c_attn, self.c_proj = Conv1D(d, 3 * d), Conv1D(d, d)

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (t.view(B, T, self.heads, d // self.heads).permute(0, 2, 1, 3) for t in (q, k, v))
        a = torch.matmul(q, k.transpose(-1, -2)) / (d // self.heads) ** 0.5
        a = torch.where(torch.ones(T, T, dtype=torch.bool).tril(), a, torch.finfo(a.dtype).min)
        y = torch.matmul(a.softmax(-1), v).permute(0, 2, 1, 3).reshape(B, T, d)
        return self.c_proj(y)


class HeadRMSNorm(nn.Module):
    """RMSNorm over the last dim written out as Hugging Face does (Qwen3's q_norm / k_norm)."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.3 * torch.randn(d))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


def rotate(x):
    """Rotary position embedding (rotate-half form) over the last dim of [..., T, d_h]."""
    T, hd = x.shape[-2], x.shape[-1]
    ang = torch.arange(T, dtype=x.dtype)[:, None] / 10000 ** (torch.arange(0, hd, 2, dtype=x.dtype) / hd)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    return x * cos + torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], -1) * sin


class QKNormAttention(nn.Module):
    """Attention with per-head RMSNorm on q and k (Qwen3, OLMo2), gains shared by the heads,
    optionally rotary: q, k, v, o Linear(8→8) without bias, 2 heads of 4, causal."""

    def __init__(self, rope=True, d=8, heads=2):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.qn, self.kn = HeadRMSNorm(d // heads), HeadRMSNorm(d // heads)
        self.rope, self.heads = rope, heads

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = (lin(x).view(B, T, self.heads, d // self.heads) for lin in (self.q, self.k, self.v))
        q, k = self.qn(q).transpose(1, 2), self.kn(k).transpose(1, 2)
        if self.rope:
            q, k = rotate(q), rotate(k)
        y = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), is_causal=True)
        return self.o(y.transpose(1, 2).reshape(B, T, d))


MODELS = {
    "mlp": (MLP, mlp_laws),
    "cnn_bn": (ConvBN, convbn_laws),
    "attention": (Attn, attn_laws),
    "llama": (LlamaBlock, llama_laws),
}


def build(name: str, dtype=torch.float32, seed: int = 0):
    """(model, hand-built laws) with a seeded init, cast to `dtype` (identity of params kept)."""
    ctor, laws_fn = MODELS[name]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = ctor()
    model.to(dtype)
    return model, laws_fn(model)


def mse(out, target):
    return F.mse_loss(out, target)


def fill_grads(model: nn.Module, inputs, target, loss_fn=mse):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model(*inputs), target)
    loss.backward()
    return loss.detach()



__all__ = ["MLP", "ConvBN", "GroupedConv", "Attn", "LlamaBlock", "MODELS", "build", "rows", "blocks", "lawset",
           "rescale_family", "mlp_laws", "convbn_laws", "attn_laws", "llama_laws", "attn_qk_terms",
           "fill_grads", "mse"]
