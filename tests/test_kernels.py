"""Raw Triton kernels of triton_kernels.sgd_stats against plain torch references.

Runs under TRITON_INTERPRET=1 on the CPU (tests/conftest.py) and on a GPU with CONSOPT_TEST_GPU=1.
Parity with torch.optim.SGD's single-tensor path:
  fp32, fp64: bitwise (the kernel uses fma where torch's `add(x, alpha=a)` does, and the same
              scalar roundings: fp32(lr), fp32(momentum), fp32(1 - dampening));
  bf16, fp16: the kernel computes in fp32 and rounds once at the store (torch's fused SGD
              semantics), while the single-tensor path rounds after every op; compared against
              an fp32 emulation of the kernel (bitwise up to the double-rounding of the fp32
              FMA emulation) and against torch with the tolerances below.
"""

import math

import pytest
import torch

sgd_stats = pytest.importorskip("triton_kernels.sgd_stats")
K = sgd_stats

ON_GPU = torch.cuda.is_available() and __import__("os").environ.get("CONSOPT_TEST_GPU") == "1"
DEV = "cuda" if ON_GPU else "cpu"

# relative tolerance of updated params/momentum vs torch.optim.SGD single-tensor, per dtype
TOL_VS_TORCH = {torch.float32: 0.0, torch.float64: 0.0, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}
# vs torch's own fp32 emulation of our arithmetic (one rounding at the store)
TOL_VS_EMUL = {torch.float32: 0.0, torch.float64: 0.0, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}
if ON_GPU:  # the GPU contracts mul+add into FMA where the CPU may not (SPEC §7): allow 1 ulp
    TOL_VS_TORCH = {torch.float32: 2 ** -23, torch.float64: 2 ** -52, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}
    TOL_VS_EMUL = {torch.float32: 2 ** -23, torch.float64: 2 ** -52, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}
# vs torch.optim.SGD(fused=True) (fp32), whose op order differs from the single-tensor path
TOL_FUSED = 2 ** -22


def _close(a, b, rel, what, scale=None):
    """a == b bitwise if rel == 0, else |a - b| <= rel * scale (default |b|; the step's inputs'
    magnitudes where the result may cancel)."""
    a64, b64 = a.double(), b.double()
    if rel == 0.0:
        assert torch.equal(a, b), f"{what}: not bitwise equal, max diff {(a64 - b64).abs().max().item()}"
        return
    scale = b64.abs() if scale is None else scale.double().abs() + b64.abs()
    err = ((a64 - b64).abs() / scale.clamp_min(1e-30)).max().item()
    ok = ((a64 - b64).abs() <= rel * scale + 1e-30).all()
    assert ok, f"{what}: max rel err {err} > {rel}"


def _row(seg, base, K_, x0, x1, nrc, cb, cj, cy, nch, ny, cend, cpitch, rsq=-1, rsum=-1, csq=-1, csum=-1, gr=-1, gc=-1):
    r = [0] * K.NCOL
    vals = [seg, base, K_, x0, x1, nrc, cb, cj, cy, nch, ny, cend, rsq, rsum, csq, csum, cpitch, gr, gc]
    r[:len(vals)] = vals
    return r


class _Alloc:
    def __init__(self):
        self.n = 0

    def __call__(self, n):
        s = self.n
        self.n += n
        return s


def _build(shapes, mode, alloc, block):
    """Tile rows covering segments of `shapes` (concatenated) in one mode, with every statistic on."""
    bx, by = block
    rows, meta, base = [], [], 0
    for si, shp in enumerate(shapes):
        n0 = shp[0]
        numel = math.prod(shp)
        Kc = numel // n0
        if mode == "vec":
            chunk = bx * by
            rsq, rsum = alloc(n0), alloc(n0)
            csq, csum = alloc(1), alloc(1)
            rows.append(_row(si, base, 1, 0, n0, -(-n0 // chunk), 0, 0, 0, 1, 0, 1, 1, rsq, rsum, csq, csum))
            meta.append(dict(mode=mode, rsq=rsq, rsum=rsum, csq=csq, csum=csum))
        elif mode == "row":
            nrc = -(-n0 // bx)
            rsq, rsum = alloc(n0), alloc(n0)
            csq, csum = alloc(nrc * Kc), alloc(nrc * Kc)
            gr = alloc(bx * bx) if (n0 <= bx and block == K.GRAM) else -1
            rows.append(_row(si, base, Kc, 0, n0, nrc if gr < 0 else 1, 0, by, 1, -(-Kc // by), by, Kc, Kc,
                             rsq, rsum, csq, csum, gr, -1))
            meta.append(dict(mode=mode, rsq=rsq, rsum=rsum, csq=csq, csum=csum, nrc=nrc, gr=gr))
        else:  # col: whole axis 1 in one block
            n1 = shp[1]
            inner = Kc // n1
            nrc = -(-n0 // bx)
            rsq, rsum = alloc(n0), alloc(n0)
            csq, csum = alloc(nrc * Kc), alloc(nrc * Kc)
            gc = alloc(by * by)
            rows.append(_row(si, base, Kc, 0, n0, nrc, 0, 1, inner, inner, n1, Kc, Kc, rsq, rsum, csq, csum, -1, gc))
            meta.append(dict(mode=mode, rsq=rsq, rsum=rsum, csq=csq, csum=csum, nrc=nrc, gc=gc, inner=inner))
        base += numel
    return torch.tensor(rows, dtype=torch.int64, device=DEV), meta, base


def _check_stats(scr, meta, shapes, flat, block):
    bx, by = block
    off = 0
    for shp, m in zip(shapes, meta):
        numel = math.prod(shp)
        X = flat[off:off + numel].double().view(shp[0], -1)
        off += numel
        n0, Kc = X.shape
        scale = X.abs().pow(2).sum().item() + 1e-300
        torch.testing.assert_close(scr[m["rsq"]:m["rsq"] + n0], (X * X).sum(1), rtol=0, atol=1e-13 * scale)
        torch.testing.assert_close(scr[m["rsum"]:m["rsum"] + n0], X.sum(1), rtol=0, atol=1e-13 * scale)
        if m["mode"] == "vec":
            torch.testing.assert_close(scr[m["csq"]], (X * X).sum(), rtol=0, atol=1e-13 * scale)
            torch.testing.assert_close(scr[m["csum"]], X.sum(), rtol=0, atol=1e-13 * scale)
            continue
        nrc = m["nrc"]
        csq = scr[m["csq"]:m["csq"] + nrc * Kc].view(nrc, Kc)
        csum = scr[m["csum"]:m["csum"] + nrc * Kc].view(nrc, Kc)
        for rc in range(nrc):
            chunk = X[rc * bx:(rc + 1) * bx]
            torch.testing.assert_close(csq[rc], (chunk * chunk).sum(0), rtol=0, atol=1e-13 * scale)
            torch.testing.assert_close(csum[rc], chunk.sum(0), rtol=0, atol=1e-13 * scale)
        if m.get("gr", -1) >= 0:
            G = scr[m["gr"]:m["gr"] + bx * bx].view(bx, bx)[:n0, :n0]
            torch.testing.assert_close(G, X @ X.T, rtol=0, atol=1e-13 * scale)
        if m.get("gc", -1) >= 0:
            n1, inner = shp[1], m["inner"]
            Y = X.view(n0, n1, inner).transpose(0, 1).reshape(n1, -1)
            G = scr[m["gc"]:m["gc"] + by * by].view(by, by)[:n1, :n1]
            torch.testing.assert_close(G, Y @ Y.T, rtol=0, atol=1e-13 * scale)


def _torch_sgd(params, grads, bufs, *, lr, momentum, dampening, wd, nesterov, maximize):
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    for p, g in zip(ps, grads):
        p.grad = g.clone()
    opt = torch.optim.SGD(ps, lr=lr, momentum=momentum, dampening=dampening, weight_decay=wd, nesterov=nesterov,
                          maximize=maximize, foreach=False)
    for p, b in zip(ps, bufs):
        if b is not None:
            opt.state[p]["momentum_buffer"] = b.clone()
    opt.step()
    return [p.detach() for p in ps], [opt.state[p].get("momentum_buffer") for p in ps]


def _emulate(p, g, m, hb, *, lr, momentum, dampening, wd, nesterov, maximize, gs=None):
    """fp32 (fp64 for fp64) emulation of the kernel: fma as exact-product-then-round."""
    ct = torch.float64 if p.dtype == torch.float64 else torch.float32
    f32 = lambda v: torch.tensor(v, dtype=torch.float32).to(ct)  # noqa: E731

    def fma(a, b, c):
        if ct == torch.float64:
            return torch.addcmul(c, a, b) if False else (a * b + c)  # not used for fp64 comparisons
        return (a.double() * b.double() + c.double()).float()

    P, G = p.to(ct), g.to(ct)
    if gs is not None:
        G = G / gs.to(ct)
    if maximize:
        G = -G
    if wd != 0:
        G = fma(P, f32(wd), G)
    M = None
    if momentum != 0:
        if hb:
            buf = fma(G, f32(1 - dampening), m.to(ct) * f32(momentum))
        else:
            buf = G.clone()
        M = buf.to(p.dtype)
        G = fma(buf, f32(momentum), G) if nesterov else buf
    Pn = fma(G, f32(-lr), P)
    return Pn.to(p.dtype), M


SHAPES_ROW = [(7, 13), (1, 1), (3, 5, 7, 2), (40, 3), (2, 200)]
SHAPES_VEC = [(1,), (7,), (1500,)]
SHAPES_COL = [(5, 7), (9, 3, 2, 2), (70, 4)]
CONFIGS = [
    dict(lr=0.1, momentum=0.0, dampening=0.0, wd=0.0, nesterov=False, maximize=False, hb=False),
    dict(lr=0.05, momentum=0.9, dampening=0.0, wd=0.0, nesterov=False, maximize=False, hb=False),
    dict(lr=0.05, momentum=0.9, dampening=0.3, wd=1e-2, nesterov=False, maximize=True, hb=True),
    dict(lr=0.2, momentum=0.8, dampening=0.0, wd=5e-3, nesterov=True, maximize=False, hb=True),
]


def _mode_case(mode, dtype):
    """The shapes and tile block of one tile mode; 16-bit rows run row Gram blocks too (their
    operands re-read through 32-bit words)."""
    shapes = {"row": SHAPES_ROW, "vec": SHAPES_VEC, "col": SHAPES_COL}[mode]
    block = {"row": K.WIDE, "vec": K.VEC, "col": K.GRAM_COL}[mode]
    if mode == "row" and dtype in (torch.bfloat16, torch.float16):
        block = K.GRAM
    return shapes, block


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("mode", ["row", "vec", "col"])
def test_update_and_stats_match_torch(dtype, mode):
    shapes, block = _mode_case(mode, dtype)
    cfgs = CONFIGS if dtype in (torch.float32, torch.bfloat16) else CONFIGS[2:]
    for cfg in cfgs:
        alloc = _Alloc()
        tiles, meta, n = _build(shapes, mode, alloc, block)
        scr = torch.full((alloc.n,), float("nan"), dtype=torch.float64, device=DEV)
        p = torch.randn(n, device=DEV).to(dtype)
        g = torch.randn(n, device=DEV).to(dtype)
        m = torch.randn(n, device=DEV).to(dtype)
        P, G, M = p.clone(), g.clone(), m.clone()
        nseg = len(shapes)
        act = torch.ones(nseg, dtype=torch.int32, device=DEV)
        hb = torch.full((nseg,), int(cfg["hb"]), dtype=torch.int32, device=DEV)
        hyper = {k: cfg[k] for k in ("lr", "momentum", "dampening", "nesterov", "maximize")}
        K.launch_sgd_stats(P, G, M, tiles, act, hb, scr, block=block, vec=mode == "vec",
                           gram_r=mode == "row" and block == K.GRAM, gram_c=mode == "col", stats=True,
                           update=True, weight_decay=cfg["wd"], **hyper)
        # torch reference, tensor by tensor
        off, outs_p, outs_m, emu_p, emu_m = 0, [], [], [], []
        for shp in shapes:
            k = math.prod(shp)
            sl = slice(off, off + k)
            off += k
            tp, tm = _torch_sgd([p[sl].view(shp)], [g[sl].view(shp)], [m[sl].view(shp) if cfg["hb"] else None],
                                lr=cfg["lr"], momentum=cfg["momentum"], dampening=cfg["dampening"], wd=cfg["wd"],
                                nesterov=cfg["nesterov"], maximize=cfg["maximize"])
            outs_p.append(tp[0].reshape(-1))
            outs_m.append(tm[0].reshape(-1) if tm[0] is not None else None)
            ep, em = _emulate(p[sl], g[sl], m[sl], cfg["hb"], lr=cfg["lr"], momentum=cfg["momentum"],
                              dampening=cfg["dampening"], wd=cfg["wd"], nesterov=cfg["nesterov"],
                              maximize=cfg["maximize"])
            emu_p.append(ep)
            emu_m.append(em)
        ref_p = torch.cat(outs_p)
        sc = p.double().abs() + g.double().abs() + m.double().abs()  # magnitudes entering the step
        _close(P, ref_p, TOL_VS_TORCH[dtype], f"{dtype} {mode} {cfg} params vs torch", sc)
        if dtype != torch.float64:
            _close(P, torch.cat(emu_p), TOL_VS_EMUL[dtype], f"{dtype} {mode} params vs emulation", sc)
        if cfg["momentum"] != 0:
            _close(M, torch.cat(outs_m), TOL_VS_TORCH[dtype], f"{dtype} {mode} momentum vs torch", sc)
            if dtype != torch.float64:
                _close(M, torch.cat(emu_m), TOL_VS_EMUL[dtype], f"{dtype} {mode} momentum vs emulation", sc)
        else:
            assert torch.equal(M, m), "momentum buffer must not be touched when momentum == 0"
        assert torch.equal(G, g), "grads must not be written without grad_scale"
        _check_stats(scr, meta, shapes, P, block)


def _scale_tables(shapes, gen, skip=()):
    """Random factors along up to two axes of every segment (FSEG rows of launch_sgd_stats) and the
    reference result: (x.double() · f_A · f_B) rounded once, per segment; segments in `skip` off."""
    fac, fseg, views = [1.0], [], []
    for si, shp in enumerate(shapes):
        axes = [a for a in (0, len(shp) - 1, 1) if a < len(shp)][: 1 + si % 2]  # one or two axes
        axes = sorted(set(axes))
        row, fs = [], []
        for a in axes + [None] * (2 - len(axes)):
            if a is None:
                row += [0, 0, 1, 1]
                continue
            f = 0.5 + torch.rand(shp[a], generator=gen, dtype=torch.float64)
            row += [len(fac), 1, math.prod(shp[a + 1:]), shp[a]]
            fac += f.tolist()
            view = [1] * len(shp)
            view[a] = shp[a]
            fs.append(f.view(view))
        fseg.append(row + [0 if si in skip else 1])
        views.append(fs)
    return (torch.tensor(fac, dtype=torch.float64, device=DEV), torch.tensor(fseg, dtype=torch.int64, device=DEV)), views


def _scaled(x, shp, fs, dtype):
    y = x.double().view(shp)
    for f in fs:  # the kernel's order: x · f_A · f_B
        y = y * f.to(y.device)
    y = y.reshape(-1)
    return y.to(dtype) if dtype == torch.float64 else y.float().to(dtype)  # once, through fp32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("mode", ["row", "vec", "col"])
def test_scale_prologue_applies_factors_then_forms_statistics(dtype, mode):
    # the projection's diagonal action folded into a statistics pass: parameters and momentum
    # become x · f_A · f_B rounded once (bitwise, as triton_kernels.project), segments switched
    # off stay as they were, and the statistics are those of the values stored
    shapes, block = _mode_case(mode, dtype)
    gen = torch.Generator().manual_seed(23)
    skip = (1,)
    for with_m in (True, False):
        alloc = _Alloc()
        tiles, meta, n = _build(shapes, mode, alloc, block)
        scale, views = _scale_tables(shapes, gen, skip)
        scr = torch.full((alloc.n,), float("nan"), dtype=torch.float64, device=DEV)
        p = (torch.randn(n, generator=gen) * 2).to(DEV).to(dtype)
        m = torch.randn(n, generator=gen).to(DEV).to(dtype)
        P, M = p.clone(), m.clone()
        K.launch_sgd_stats(P, None, M if with_m else None, tiles, None, None, scr, block=block, vec=mode == "vec",
                           gram_r=mode == "row" and block == K.GRAM, gram_c=mode == "col", stats=True, update=False,
                           scale=scale)
        off = 0
        for si, (shp, fs) in enumerate(zip(shapes, views)):
            sl = slice(off, off + math.prod(shp))
            off = sl.stop
            ref_p = p[sl] if si in skip else _scaled(p[sl], shp, fs, dtype)
            ref_m = m[sl] if (si in skip or not with_m) else _scaled(m[sl], shp, fs, dtype)
            assert torch.equal(P[sl], ref_p), f"{dtype} {mode} segment {si}: params"
            assert torch.equal(M[sl], ref_m), f"{dtype} {mode} segment {si}: momentum"
            if si not in skip:
                assert not torch.equal(P[sl], p[sl])
        _check_stats(scr, meta, shapes, P, block)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("mode", ["row", "vec", "col"])
def test_update_applies_the_owed_momentum_transport(dtype, mode):
    # lazy momentum transport: an update launch with `mscale` first turns every buffer into
    # m · f_A · f_B rounded once (what the projection's own pass would have stored), then steps
    # as torch does from that buffer; segments switched off keep m, segments without a buffer
    # start one from the grad, and buffers the step leaves alone (inactive segment, skipped
    # GradScaler step) are stored transported
    shapes, block = _mode_case(mode, dtype)
    gen = torch.Generator().manual_seed(29)
    skip, inactive, fresh = (1,), 2, len(shapes) - 1
    for found_inf in (None, torch.ones(1, device=DEV)):
        alloc = _Alloc()
        tiles, meta, n = _build(shapes, mode, alloc, block)
        scale, views = _scale_tables(shapes, gen, skip)
        scr = torch.full((alloc.n,), float("nan"), dtype=torch.float64, device=DEV)
        p = torch.randn(n, generator=gen).to(DEV).to(dtype)
        g = torch.randn(n, generator=gen).to(DEV).to(dtype)
        m = torch.randn(n, generator=gen).to(DEV).to(dtype)
        P, G, M = p.clone(), g.clone(), m.clone()
        act = torch.tensor([int(si != inactive) for si in range(len(shapes))], dtype=torch.int32, device=DEV)
        hb = torch.tensor([int(si != fresh) for si in range(len(shapes))], dtype=torch.int32, device=DEV)
        hyper = dict(lr=0.05, momentum=0.9, dampening=0.1, nesterov=False, maximize=False)
        K.launch_sgd_stats(P, G, M, tiles, act, hb, scr, block=block, vec=mode == "vec",
                           gram_r=mode == "row" and block == K.GRAM, gram_c=mode == "col", stats=True,
                           update=True, weight_decay=1e-2, found_inf=found_inf, mscale=scale, **hyper)
        off = 0
        for si, (shp, fs) in enumerate(zip(shapes, views)):
            sl = slice(off, off + math.prod(shp))
            off = sl.stop
            owed = m[sl] if si in skip else _scaled(m[sl], shp, fs, dtype)
            if si != fresh and si not in skip:
                assert not torch.equal(owed, m[sl])
            if found_inf is not None or si == inactive:
                assert torch.equal(P[sl], p[sl]), f"{dtype} {mode} segment {si}: params of a skipped step"
                assert torch.equal(M[sl], m[sl] if si == fresh else owed), f"{dtype} {mode} segment {si}: momentum"
                continue
            tp, tm = _torch_sgd([p[sl].view(shp)], [g[sl].view(shp)], [None if si == fresh else owed.view(shp)],
                                wd=1e-2, **hyper)
            sc = p[sl].double().abs() + g[sl].double().abs() + owed.double().abs()
            _close(P[sl], tp[0].reshape(-1), TOL_VS_TORCH[dtype], f"{dtype} {mode} segment {si}: params", sc)
            _close(M[sl], tm[0].reshape(-1), TOL_VS_TORCH[dtype], f"{dtype} {mode} segment {si}: momentum", sc)
        if found_inf is None:
            _check_stats(scr, meta, shapes, P, block)


def test_scale_prologue_is_for_statistics_passes_only():
    tiles, _, n = _build([(3, 4)], "row", _Alloc(), K.WIDE)
    p = torch.randn(n, device=DEV)
    with pytest.raises(ValueError, match="statistics-only"):
        K.launch_sgd_stats(p, p.clone(), None, tiles, None, None, torch.zeros(64, dtype=torch.float64, device=DEV),
                           block=K.WIDE, vec=False, gram_r=False, gram_c=False, stats=True, update=True, lr=0.1,
                           scale=(torch.ones(1, dtype=torch.float64, device=DEV),
                                  torch.zeros((1, 9), dtype=torch.int64, device=DEV)))


def test_skip_inactive_found_inf_and_grad_scale():
    shapes = [(7, 13), (3, 5, 7, 2)]
    alloc = _Alloc()
    tiles, meta, n = _build(shapes, "row", alloc, K.WIDE)
    scr = torch.zeros(alloc.n, dtype=torch.float64, device=DEV)
    p, g, m = (torch.randn(n, device=DEV) for _ in range(3))
    k0 = 7 * 13
    # segment 1 inactive (grad None in torch terms): untouched
    act = torch.tensor([1, 0], dtype=torch.int32, device=DEV)
    hb = torch.ones(2, dtype=torch.int32, device=DEV)
    P, G, M = p.clone(), g.clone(), m.clone()
    gs = torch.tensor([4.0], device=DEV)
    fi = torch.zeros(1, device=DEV)
    K.launch_sgd_stats(P, G, M, tiles, act, hb, scr, block=K.WIDE, vec=False, gram_r=False, gram_c=False, stats=True,
                       update=True, lr=0.1, momentum=0.9, grad_scale=gs, found_inf=fi)
    assert torch.equal(P[k0:], p[k0:]) and torch.equal(M[k0:], m[k0:]) and torch.equal(G[k0:], g[k0:])
    # torch's fused SGD with the same grad_scale (it divides and writes the unscaled grad back)
    w = torch.nn.Parameter(p[:k0].clone())
    w.grad = g[:k0].clone()
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9, fused=True)
    opt.state[w]["momentum_buffer"] = m[:k0].clone()
    opt.grad_scale, opt.found_inf = gs, fi
    opt.step()
    # torch's fused CPU kernel orders the momentum update differently from the single-tensor
    # path (which we match bitwise): allow 1 ulp of the inputs' magnitude
    sc = p[:k0].abs() + g[:k0].abs() + m[:k0].abs()
    _close(P[:k0], w.detach(), TOL_FUSED, "grad_scale params vs torch fused", sc)
    _close(G[:k0], w.grad, 0.0, "unscaled grads written back")
    _close(M[:k0], opt.state[w]["momentum_buffer"], TOL_FUSED, "grad_scale momentum", sc)
    _check_stats(scr, meta, shapes, P, K.WIDE)
    # found_inf: nothing changes, statistics are still formed (at the old parameters)
    P2, G2, M2 = p.clone(), g.clone(), m.clone()
    scr.zero_()
    K.launch_sgd_stats(P2, G2, M2, tiles, torch.ones(2, dtype=torch.int32, device=DEV), hb, scr, block=K.WIDE,
                       vec=False, gram_r=False, gram_c=False, stats=True, update=True, lr=0.1, momentum=0.9,
                       grad_scale=gs, found_inf=torch.ones(1, device=DEV))
    assert torch.equal(P2, p) and torch.equal(G2, g) and torch.equal(M2, m)
    _check_stats(scr, meta, shapes, p, K.WIDE)


def test_tensor_lr_read_on_device():
    alloc = _Alloc()
    tiles, meta, n = _build([(7, 13)], "row", alloc, K.WIDE)
    scr = torch.zeros(alloc.n, dtype=torch.float64, device=DEV)
    p, g = torch.randn(n, device=DEV), torch.randn(n, device=DEV)
    act = torch.ones(1, dtype=torch.int32, device=DEV)
    lr = torch.tensor(0.1, device=DEV)
    outs = []
    for v in (0.1, 0.025):
        lr.fill_(v)
        P = p.clone()
        K.launch_sgd_stats(P, g.clone(), None, tiles, act, act, scr, block=K.WIDE, vec=False, gram_r=False,
                           gram_c=False, stats=False, update=True, lr=lr)
        outs.append(P)
        ref = p.clone().add_(g, alpha=-v)
        _close(P, ref, TOL_VS_TORCH[torch.float32], f"tensor lr {v}")
    assert not torch.equal(outs[0], outs[1])


def test_stats_only_does_not_write():
    alloc = _Alloc()
    shapes = [(5, 7), (9, 3, 2, 2)]
    tiles, meta, n = _build(shapes, "col", alloc, K.GRAM_COL)
    scr = torch.zeros(alloc.n, dtype=torch.float64, device=DEV)
    p = torch.randn(n, device=DEV).to(torch.bfloat16)
    P = p.clone()
    K.launch_sgd_stats(P, None, None, tiles, None, None, scr, block=K.GRAM_COL, vec=False, gram_r=False, gram_c=True,
                       stats=True, update=False)
    assert torch.equal(P, p)
    _check_stats(scr, meta, shapes, p, K.GRAM_COL)


def test_bf16_round_to_nearest_even():
    """fp32 -> bf16 stores round to nearest even (the interpreter's own cast truncates)."""
    vals = [1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -1.0 - 2 ** -8, 1.0 + 2 ** -9, 3.0e38 * 1.13, float("inf"),
            float("-inf"), float("nan"), 1e-40, -0.0] + torch.randn(6).tolist()
    alloc = _Alloc()
    tiles, meta, n = _build([(1,)], "vec", alloc, K.VEC)
    scr = torch.zeros(alloc.n, dtype=torch.float64, device=DEV)
    one = torch.ones(1, dtype=torch.int32, device=DEV)
    G = torch.full((1,), -1.0, dtype=torch.bfloat16, device=DEV)
    for v in vals:
        # p_new = fma(-1, -lr, 0) = lr exactly in fp32, then rounded into the bf16 parameter
        P = torch.zeros(1, dtype=torch.bfloat16, device=DEV)
        lr = torch.tensor([v], dtype=torch.float32, device=DEV)
        K.launch_sgd_stats(P, G, None, tiles, one, None, scr, block=K.VEC, vec=True, gram_r=False, gram_c=False,
                           stats=False, update=True, lr=lr[0])
        ref = lr.to(torch.bfloat16)
        assert (P.isnan() & ref.isnan()).all() or torch.equal(P, ref), (v, P.item(), ref.item())
    # and through the momentum store: d_p = -p (weight decay -1), buf = d_p, p_new = 2p
    x = torch.randn(300, device=DEV).to(torch.bfloat16)
    tiles, meta, n = _build([(300,)], "vec", alloc, K.VEC)
    P, M = x.clone(), torch.zeros_like(x)
    K.launch_sgd_stats(P, torch.zeros_like(x), M, tiles, one, torch.zeros(1, dtype=torch.int32, device=DEV), scr,
                       block=K.VEC, vec=True, gram_r=False, gram_c=False, stats=False, update=True, lr=1.0,
                       weight_decay=-1.0, momentum=0.5)
    assert torch.equal(M, -x) and torch.equal(P, (2 * x.float()).to(torch.bfloat16))


def test_gram_kernel_blocks():
    # a [n0, n1, inner] tensor: row Gram blocks (axis 0) and axis-1 Gram blocks, sizes > 64
    torch.manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        shp = (70, 3, 5)
        X = torch.randn(shp, device=DEV).to(dtype)
        flat = torch.cat([torch.randn(11, device=DEV).to(dtype), X.reshape(-1)])
        base = 11
        BM = K.BIG_GRAM_BM
        rows, outs = [], []
        n = 0
        # axis 0, units 3..70 (67 > 64: two blocks), contraction over 15 contiguous
        a, U = 3, 67
        nb = -(-U // BM)
        for i in range(nb):
            for j in range(i, nb):
                r = [0] * K.GCOL
                r[:10] = [base + a * 15 + i * BM * 15, base + a * 15 + j * BM * 15, 15, min(BM, U - i * BM),
                          min(BM, U - j * BM), 1, 0, 15, 1, n]
                rows.append(r)
                outs.append(("r", i, j, n))
                n += BM * BM
        # axis 1 (3 units), contraction over 70 rows (loop) and inner 5 (vec): swap roles -> vec over rows
        r = [0] * K.GCOL
        r[:10] = [base, base, 5, 3, 3, 5, 1, 70, 15, n]
        rows.append(r)
        outs.append(("c", 0, 0, n))
        n += BM * BM
        scr = torch.zeros(n, dtype=torch.float64, device=DEV)
        K.launch_gram(flat, torch.tensor(rows, dtype=torch.int64, device=DEV), scr)
        X64 = X.double()
        R = X64.reshape(70, -1)[a:a + U]
        GR = R @ R.T
        C = X64.transpose(0, 1).reshape(3, -1)
        GC = C @ C.T
        for kind, i, j, o in outs:
            blk = scr[o:o + BM * BM].view(BM, BM)
            if kind == "r":
                ref = GR[i * BM:(i + 1) * BM, j * BM:(j + 1) * BM]
                torch.testing.assert_close(blk[:ref.shape[0], :ref.shape[1]], ref, rtol=0, atol=1e-12)
            else:
                torch.testing.assert_close(blk[:3, :3], GC, rtol=0, atol=1e-12)


def test_csr_sum_fixed_order():
    import numpy as np

    torch.manual_seed(2)
    scr = torch.randn(50, dtype=torch.float64, device=DEV)
    lens = [0, 1, 5, 3, 0, 17] * 50  # several CSR blocks
    indptr = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int64, device=DEV)
    nnz = int(indptr[-1])
    slots = torch.randint(0, 50, (nnz,))
    coef = torch.randint(0, 2, (nnz,)).double() * 2 - 1
    enc = torch.from_numpy(K.encode_signed_slots(slots.numpy(), coef.numpy())).to(DEV)
    assert enc.dtype == torch.int32
    slots, coef = slots.to(DEV), coef.to(DEV)
    B = K.CSR_BLOCK
    L = torch.tensor(lens + [0] * ((-len(lens)) % B)).view(-1, B).max(1).values.to(DEV)
    out = torch.empty(len(lens), dtype=torch.float64, device=DEV)
    K.launch_csr_sum(scr, indptr, enc, L, out)
    ref = torch.stack([(scr[slots[indptr[i]:indptr[i + 1]]] * coef[indptr[i]:indptr[i + 1]]).sum()
                       for i in range(len(lens))])
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-13)
    out2 = torch.empty_like(out)
    K.launch_csr_sum(scr, indptr, enc, L, out2)
    assert torch.equal(out, out2)
    big = K.encode_signed_slots(np.array([2 ** 31 + 5, 3]), np.array([-1.0, 1.0]))
    assert big.dtype == np.int64 and big[0] == -(2 ** 31 + 6)


def test_colacc_tall_tile():
    """COLACC: one column chunk per tile, column sums accumulated over all row chunks."""
    shp = (70, 100)
    n0, Kc = shp
    bx, by = K.WIDE
    rows = []
    slots = 0
    meta = []
    for k0 in range(0, Kc, by):
        k1 = min(k0 + by, Kc)
        rsq, csq, csum = slots, slots + n0, slots + n0 + (k1 - k0)
        slots += n0 + 2 * (k1 - k0)
        rows.append(_row(0, 0, Kc, 0, n0, -(-n0 // bx), k0, by, 1, 1, by, k1, k1 - k0, rsq, -1, csq, csum))
        meta.append((k0, k1, rsq, csq, csum))
    scr = torch.zeros(slots, dtype=torch.float64, device=DEV)
    p = torch.randn(n0 * Kc, device=DEV)
    K.launch_sgd_stats(p, None, None, torch.tensor(rows, dtype=torch.int64, device=DEV), None, None, scr,
                       block=K.WIDE, vec=False, gram_r=False, gram_c=False, colacc=True, stats=True, update=False)
    X = p.double().view(n0, Kc)
    for k0, k1, rsq, csq, csum in meta:
        Y = X[:, k0:k1]
        torch.testing.assert_close(scr[rsq:rsq + n0], (Y * Y).sum(1), rtol=0, atol=1e-12)
        torch.testing.assert_close(scr[csq:csq + k1 - k0], (Y * Y).sum(0), rtol=0, atol=1e-12)
        torch.testing.assert_close(scr[csum:csum + k1 - k0], Y.sum(0), rtol=0, atol=1e-12)


def test_split_scalar_exact():
    import numpy as np

    for x in (0.1, 1 / 3, 0.9, 1e-3, 2.0 ** -30 * 1.2345678901234567, 123456.789):
        hi, mid, lo = K.split_scalar(x)
        assert hi == float(np.float32(x))
        assert (hi + mid) + lo == x
