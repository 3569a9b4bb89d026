"""consopt.SGD on its fused Triton path (run on the CPU under TRITON_INTERPRET=1) vs torch.optim.SGD.

The optimizer takes this path on CUDA; `_force_triton` makes it take it here so that the wiring
(flat storage, momentum buffers in state_dict, law values from the kernels) is tested without a GPU.
"""

import copy
import os

import pytest
import torch
import torch.nn as nn

import consopt


# With CONSOPT_TEST_GPU=1 on a CUDA machine (benchmarks/gpu_check.sh) the same tests run on the GPU,
# where the fused path is the default; on the CPU `_force_triton` routes them through the interpreter.
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("CONSOPT_TEST_GPU") == "1" else "cpu"


def tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3), nn.ReLU(), nn.Linear(3, 2)).to(DEVICE)


def batch(k):
    g = torch.Generator().manual_seed(100 + k)
    return torch.randn(6, 5, generator=g).to(DEVICE), torch.randn(6, 2, generator=g).to(DEVICE)


def run(model, opt, steps, start=0, set_to_none=True):
    for k in range(start, start + steps):
        x, y = batch(k)
        opt.zero_grad(set_to_none=set_to_none)
        ((model(x) - y) ** 2).mean().backward()
        opt.step()


@pytest.mark.parametrize("kw", [dict(momentum=0.9), dict(momentum=0.9, nesterov=True, weight_decay=1e-2),
                                dict(momentum=0.5, dampening=0.3, maximize=True), dict()])
def test_fused_path_matches_torch_and_tracks_exactly(kw):
    ref = tiny()
    m = copy.deepcopy(ref)
    laws = consopt.find_laws(m, (torch.randn(2, 5, device=DEVICE),))
    opt = consopt.SGD(m.parameters(), lr=0.05, laws=laws, **kw)
    opt._force_triton = True
    topt = torch.optim.SGD(ref.parameters(), lr=0.05, foreach=False, **kw)
    h0 = laws.evaluate(m)
    run(m, opt, 4)
    run(ref, topt, 4)
    assert opt._step_impl() == "fused" and opt._flat is not None
    for p, q in zip(m.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    now, scale = laws.evaluate(m), laws.scale(m)
    for k, d in opt.deviation().items():
        assert float(((d - (now[k] - h0[k])).abs() / scale[k]).max()) <= 1e-12
    if kw.get("momentum"):
        sd, tsd = opt.state_dict(), topt.state_dict()
        for i in tsd["state"]:
            torch.testing.assert_close(sd["state"][i]["momentum_buffer"], tsd["state"][i]["momentum_buffer"],
                                       rtol=1e-6, atol=1e-7)


def test_fused_path_resumes_from_a_torch_state_dict_and_skips_params_without_grad():
    ref = tiny()
    m = copy.deepcopy(ref)
    topt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, foreach=False)
    run(ref, topt, 2)
    m.load_state_dict(ref.state_dict())
    laws = consopt.find_laws(m, (torch.randn(2, 5, device=DEVICE),))
    opt = consopt.SGD(m.parameters(), lr=0.05, momentum=0.9, laws=laws)
    opt._force_triton = True
    opt.load_state_dict(topt.state_dict())
    m[4].bias.requires_grad_(False)  # no grad: skipped, exactly as torch skips it
    ref[4].bias.requires_grad_(False)
    run(m, opt, 3, start=2)
    run(ref, topt, 3, start=2)
    for p, q in zip(m.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    # and the fused optimizer's state dict loads back into torch
    t2 = torch.optim.SGD(copy.deepcopy(ref).parameters(), lr=0.05, momentum=0.9)
    t2.load_state_dict(opt.state_dict())
    assert set(t2.state_dict()["state"]) == set(topt.state_dict()["state"])


def test_first_fused_step_failure_restores_and_falls_back(monkeypatch):
    import consopt.fused as fused

    def broken(group, *a, **k):
        for b in group.buffers:  # scribble, then fail as a kernel that cannot compile would
            b.param.add_(1.0)
            if b.mom is not None:
                b.mom.add_(1.0)
        raise RuntimeError("simulated Triton compilation error")

    monkeypatch.setattr(fused, "fused_sgd_step", broken)
    ref = tiny()
    m = copy.deepcopy(ref)
    laws = consopt.find_laws(m, (torch.randn(2, 5, device=DEVICE),))
    opt = consopt.SGD(m.parameters(), lr=0.05, momentum=0.9, laws=laws)
    opt._force_triton = True
    topt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    with pytest.warns(RuntimeWarning, match="simulated Triton compilation error"):
        run(m, opt, 1)
    run(m, opt, 2, start=1)
    run(ref, topt, 3)
    assert opt._step_impl() == "torch"
    for p, q in zip(m.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    assert opt.tracked_steps == 3


def _grouped_conv():
    from _models import GroupedConv

    return GroupedConv(), torch.randn(4, 2, 5, 5), torch.randn(4, 3)


def _gpt2_attention():
    from _models import GPT2Attention

    return nn.Sequential(GPT2Attention(6, 2), nn.Flatten(), nn.Linear(18, 3)), torch.randn(4, 3, 6), torch.randn(4, 3)


@pytest.mark.parametrize("make", [_grouped_conv, _gpt2_attention], ids=["grouped-conv", "gpt2-attention"])
def test_fused_path_on_discovered_laws(make):
    """Laws of models found by find_laws, evaluated by the kernels (GPT-2's Conv1D heads: Gram
    matrices of column blocks of c_attn's W and row blocks of c_proj's) or eagerly next to them
    (a family on a grouped conv's refined axis, Term.groups): every deviation matches a float64
    re-evaluation and the parameters torch's."""
    torch.manual_seed(1)
    ref, x, y = make()
    ref, x, y = ref.to(DEVICE), x.to(DEVICE), y.to(DEVICE)
    m = copy.deepcopy(ref)
    laws = consopt.find_laws(m, (x,))
    assert len(laws.families) > 0
    opt = consopt.SGD(m.parameters(), lr=0.05, momentum=0.9, laws=laws)
    opt._force_triton = True
    topt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, foreach=False)
    h0 = laws.evaluate(m)
    for model, o in ((m, opt), (ref, topt)):
        for _ in range(3):
            o.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            o.step()
    assert opt._step_impl() == "fused"
    for p, q in zip(m.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    now, scale = laws.evaluate(m), laws.scale(m)
    dev = opt.deviation()
    assert max(float(d.abs().max()) for d in dev.values()) > 0
    for k, d in dev.items():
        assert float(((d - (now[k] - h0[k])).abs() / scale[k]).max()) <= 1e-12


def test_replacing_a_parameters_data_republishes_every_momentum_buffer():
    # p.data = ... makes the flat group rebuild its buffers (the momentum carried over): the views
    # in opt.state, and so state_dict, must be the new buffers' (they were the stale old ones)
    ref = tiny()
    m = copy.deepcopy(ref)
    opt = consopt.SGD(m.parameters(), lr=0.05, momentum=0.9)
    opt._force_triton = True
    topt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, foreach=False)
    for model, o in ((m, opt), (ref, topt)):
        run(model, o, 2)
        w = next(model.parameters())
        w.data = w.data.clone()
        run(model, o, 2, start=2)
    assert opt._step_impl() == "fused"
    sd, tsd = opt.state_dict(), topt.state_dict()
    for i, (p, q) in enumerate(zip(m.parameters(), ref.parameters())):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], topt.state[q]["momentum_buffer"],
                                   rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(sd["state"][i]["momentum_buffer"], tsd["state"][i]["momentum_buffer"],
                                   rtol=1e-6, atol=1e-7)
    # and a run resumed from that checkpoint continues as torch's
    m2 = copy.deepcopy(m)
    opt2 = consopt.SGD(m2.parameters(), lr=0.05, momentum=0.9)
    opt2._force_triton = True
    opt2.load_state_dict(copy.deepcopy(sd))
    run(m2, opt2, 2, start=4)
    run(ref, topt, 2, start=4)
    for p, q in zip(m2.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
