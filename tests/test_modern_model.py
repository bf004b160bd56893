"""modern/model.py: parameter counts, the peephole LSTM, Lasagne-style batch norm, taps, init."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the current environment has no torch

import torch.nn.functional as F

from crmn import paper
from crmn.config import ModelConfig
from crmn.naming import BN_ALPHA, BN_EPS, count_trainable
from crmn.naming import LSTM_GATES
from modern.model import BatchNorm, CIFARNet, PeepholeLSTM, build, shortcut_a
from reference_lstm import lstm_forward


@pytest.mark.parametrize("row", paper.ROWS, ids=lambda r: r.id)
def test_param_count_matches_naming_and_paper(row):
    cfg = ModelConfig.for_row(row)
    with torch.device("meta"):  # shapes only: no memory, no init
        net = CIFARNet(cfg)
    assert net.param_count() == count_trainable(cfg)
    if row.paper_params_m is not None:
        assert round(net.param_count() / 1e6, 2) == row.paper_params_m


def test_builders_agree_with_build():
    a = build(ModelConfig(n=1, k=0.5, classes=10, memory=True), 3)
    b = build(ModelConfig(n=1, k=0.5, classes=10, memory=True), seed=3)
    for (na, ta), (nb, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(ta, tb)
    r = build(ModelConfig(n=1, k=0.5, classes=10, memory=False), 3)
    assert not hasattr(r, "lstm") and r.fc.in_features == 32


def _lstm_params(lstm: PeepholeLSTM):
    H = lstm.units
    p = {}
    for g, name in enumerate(LSTM_GATES):
        p[f"W_x{name}"] = lstm.W_x[:, g * H:(g + 1) * H].detach().numpy()
        p[f"W_h{name}"] = lstm.W_h[:, g * H:(g + 1) * H].detach().numpy()
        p[f"b_{name}"] = lstm.b[g * H:(g + 1) * H].detach().numpy()
    if lstm.peepholes:
        for g in "ifo":
            p[f"w_c{g}"] = getattr(lstm, f"w_c{g}").detach().numpy()
    p["h0"], p["c0"] = lstm.h0.detach().numpy(), lstm.c0.detach().numpy()
    return p


@pytest.mark.parametrize("outgate", ["logistic", "tanh"])
@pytest.mark.parametrize("peepholes", [True, False])
def test_lstm_matches_numpy_reference(outgate, peepholes):
    torch.manual_seed(0)
    lstm = PeepholeLSTM(7, 5, outgate, peepholes).double()
    with torch.no_grad():
        for p in lstm.parameters():  # random everything, h0/c0 and peepholes included
            p.copy_(torch.randn_like(p))
    x = torch.randn(3, 4, 7, dtype=torch.float64)
    got = lstm(x).detach().numpy()
    want = lstm_forward(x.numpy(), _lstm_params(lstm), outgate=outgate)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def _random_lstm(outgate, peepholes, seed=0):
    torch.manual_seed(seed)
    lstm = PeepholeLSTM(7, 5, outgate, peepholes).double()
    with torch.no_grad():
        for p in lstm.parameters():
            p.copy_(torch.randn_like(p) * 0.7)
    return lstm


@pytest.mark.parametrize("outgate", ["logistic", "tanh"])
@pytest.mark.parametrize("peepholes", [True, False])
@pytest.mark.parametrize("last_only", [False, True], ids=["all-steps", "last-only"])
@pytest.mark.slow
def test_lstm_backward_matches_finite_differences(outgate, peepholes, last_only):
    """The hand-written backward, against central differences of the forward (float64):
    gradients of the inputs and of every parameter, h0, c0 and peepholes included."""
    lstm = _random_lstm(outgate, peepholes)
    names = [n for n, _ in lstm.named_parameters()]

    def run(x, *params):
        return torch.func.functional_call(lstm, dict(zip(names, params)), (x,),
                                          {"last_only": last_only})

    x = torch.randn(3, 4, 7, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in lstm.parameters()]
    assert torch.autograd.gradcheck(run, (x, *params), atol=1e-8, rtol=1e-6)
    full = lstm(x.detach())
    if last_only:  # the same forward, only the last step returned
        assert torch.equal(run(x, *params), full[:, -1])


@pytest.mark.parametrize("peepholes", [True, False])
def test_lstm_bfloat16_products_keep_float32_gradients(peepholes):
    """Under bf16 autocast the products run in bf16 (W_h cast once per forward) while the
    gates, cell and every gradient stay float32, within bf16 rounding of float64's."""
    ref = _random_lstm("logistic", peepholes, seed=4)
    lstm = _random_lstm("logistic", peepholes, seed=4).float()
    x = torch.randn(3, 4, 7, dtype=torch.float64)
    want = torch.autograd.grad(ref(x, last_only=True).square().sum(), list(ref.parameters()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = lstm(x.float(), last_only=True)
    assert h.dtype == torch.float32
    got = torch.autograd.grad(h.square().sum(), list(lstm.parameters()))
    for (name, p), g, w in zip(lstm.named_parameters(), got, want):
        assert g.dtype == torch.float32, name
        err = (g.double() - w).norm() / w.norm()
        assert err < 3e-2, (name, float(err))  # bf16 keeps 8 bits: ~4e-3 per rounding


def test_lstm_backward_runs_one_product_per_step():
    """Each step's backward adds one matrix product (h's gradient through W_h) and, under
    bf16, a fixed number of casts: W_h's gradient is one product for all steps."""
    from crmn.tools.profile import op_counter

    counts = {}
    for amp in (False, True):
        for T in (3, 6):
            lstm = _random_lstm("logistic", True).float()
            x = torch.randn(2, T, 7, requires_grad=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                out = lstm(x, last_only=True)
            with op_counter() as c:
                out.sum().backward()
            counts[amp, T] = c.counts
    for amp in (False, True):
        more = {op: counts[amp, 6][op] - counts[amp, 3][op] for op in ("mm", "_to_copy")}
        # torch.profiler records every aten::to -> _to_copy of a step's backward: 3 per step
        # under bf16 (the private dispatch-mode count used before issue 33 saw 1 per step)
        assert more == {"mm": 3, "_to_copy": 9 if amp else 0}, (amp, more)


def test_lstm_rejects_unknown_outgate():
    with pytest.raises(ValueError, match="outgate"):
        PeepholeLSTM(4, 3, "relu", True)


def test_batchnorm_is_lasagnes():
    torch.manual_seed(1)
    bn = BatchNorm(4).double()
    with torch.no_grad():
        bn.weight.copy_(torch.rand(4) + 0.5), bn.bias.copy_(torch.randn(4))
        bn.mean.copy_(torch.randn(4)), bn.inv_std.copy_(torch.rand(4) + 0.5)
    x = 3 * torch.randn(6, 4, 5, 5, dtype=torch.float64) + 1
    mean0, inv0 = bn.mean.clone(), bn.inv_std.clone()
    bmean = x.mean(dim=(0, 2, 3))
    binv = 1 / torch.sqrt(x.var(dim=(0, 2, 3), unbiased=False) + BN_EPS)
    c = (None, slice(None), None, None)
    want = (x - bmean[c]) * binv[c] * bn.weight[c] + bn.bias[c]

    out = bn(x, training=True)  # forward alone leaves the running averages alone
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(bn.mean, mean0) and torch.equal(bn.inv_std, inv0)

    bn(x, training=True, update_stats=True)
    torch.testing.assert_close(bn.mean, (1 - BN_ALPHA) * mean0 + BN_ALPHA * bmean)
    torch.testing.assert_close(bn.inv_std, (1 - BN_ALPHA) * inv0 + BN_ALPHA * binv)

    inf = bn(x, training=False)
    want_inf = (x - bn.mean[c]) * bn.inv_std[c] * bn.weight[c] + bn.bias[c]
    torch.testing.assert_close(inf, want_inf, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_net_moves_running_averages_like_each_layer_alone(dtype):
    """CIFARNet gathers every layer's batch statistics and moves all running averages in one
    multi-tensor lerp: the same bits as each BatchNorm doing its own ``lerp_``."""
    net = build(ModelConfig(n=1, k=0.5, classes=10, memory=True), seed=3).to(dtype)
    bns = [m for m in net.modules() if isinstance(m, BatchNorm)]
    with torch.no_grad():
        for bn in bns:  # running averages away from their initial 0 and 1
            bn.mean.copy_(torch.randn(bn.mean.shape)), bn.inv_std.copy_(torch.rand(bn.mean.shape) + 0.5)
    inputs = {}
    hooks = [bn.register_forward_pre_hook(lambda m, a: inputs.__setitem__(m, a[0].detach()))
             for bn in bns]
    before = {bn: (bn.mean.clone(), bn.inv_std.clone()) for bn in bns}
    net(torch.randn(6, 3, 32, 32, dtype=dtype), training=True, update_stats=True)
    for h in hooks:
        h.remove()
    assert set(inputs) == set(bns)
    for bn in bns:
        _, bmean, binv = torch.native_batch_norm(inputs[bn], bn.weight, bn.bias, None, None,
                                                 True, 0.0, BN_EPS)
        mean0, inv0 = before[bn]
        assert not torch.equal(bn.mean, mean0)  # moved
        assert torch.equal(bn.mean, mean0.clone().lerp_(bmean, BN_ALPHA))
        assert torch.equal(bn.inv_std, inv0.clone().lerp_(binv, BN_ALPHA))


def test_shortcut_option_a_subsamples_and_pads_both_sides():
    x = torch.arange(2 * 4 * 4 * 4, dtype=torch.float64).reshape(2, 4, 4, 4) + 1
    s = shortcut_a(x, 8, 2)
    assert s.shape == (2, 8, 2, 2)
    assert torch.equal(s[:, 2:6], x[:, :, ::2, ::2])
    assert (s[:, :2] == 0).all() and (s[:, 6:] == 0).all()
    assert torch.equal(shortcut_a(x, 4, 1), x)


def test_taps_pool_flatten_and_pad():
    net = build(ModelConfig(n=1, k=0.5, classes=10, memory=True)).double()
    I = net.cfg.lstm_input  # 8 * 16 * 16
    h = torch.randn(2, 16, 8, 8, dtype=torch.float64)  # a stage-2 block output
    t = net.tap(h)
    assert t.shape == (2, I)
    pooled = h.reshape(2, 16, 4, 2, 4, 2).mean(dim=(3, 5)).reshape(2, -1)  # C-major
    torch.testing.assert_close(t[:, :16 * 16], pooled)
    assert (t[:, 16 * 16:] == 0).all()


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_lstm_reads_every_block_output_through_tap(channels_last):
    """The LSTM's input sequence is tap(output of block j) for j = 0..3n-1, bit for bit
    (the forward taps a whole stage at once)."""
    net = build(ModelConfig(n=2, k=0.5, classes=10, memory=True), 1)
    x = torch.randn(3, 3, 32, 32)
    if channels_last:
        net, x = net.to(memory_format=torch.channels_last), x.contiguous(
            memory_format=torch.channels_last)
    outs, seqs = [], []
    hooks = [b.register_forward_hook(lambda m, a, out: outs.append(out)) for b in net.blocks]
    hooks.append(net.lstm.register_forward_pre_hook(lambda m, args: seqs.append(args[0])))
    net(x, training=True)
    for hk in hooks:
        hk.remove()
    assert len(outs) == 6 and seqs[0].shape == (3, 6, net.cfg.lstm_input)
    assert torch.equal(seqs[0], torch.stack([net.tap(o) for o in outs], dim=1))


def test_forward_training_changes_no_state_and_modes_differ():
    net = build(ModelConfig(n=1, k=0.5, classes=10, memory=True), 0).double()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    a = net(x, training=True)
    b = net(x, training=False)
    assert a.shape == b.shape == (4, 10)
    assert not torch.allclose(a, b)  # running stats (0, 1) differ from batch stats
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="update_stats"):
        net(x, training=False, update_stats=True)


def test_init_follows_the_spec():
    cfg = ModelConfig(n=2, k=1, classes=100, memory=True, forget_bias=-3.0, gate_bias=0.5)
    net = build(cfg, seed=7)
    w = net.blocks[3].conv2.weight.detach().double()  # 32 -> 32 maps: fan_in 288
    assert abs(w.std().item() / np.sqrt(2 / 288) - 1) < 0.05
    H = cfg.lstm_units
    b = net.lstm.b.detach()
    assert (b[H:2 * H] == -3.0).all() and (b[:H] == 0.5).all() and (b[2 * H:] == 0.5).all()
    for g in range(4):
        wx = net.lstm.W_x[:, g * H:(g + 1) * H].detach().double()  # (I, H), I > H
        torch.testing.assert_close(wx.T @ wx, torch.eye(H, dtype=torch.float64), atol=1e-6,
                                   rtol=0)
        wh = net.lstm.W_h[:, g * H:(g + 1) * H].detach().double()
        torch.testing.assert_close(wh @ wh.T, torch.eye(H, dtype=torch.float64), atol=1e-6,
                                   rtol=0)
    assert (net.lstm.h0 == 0).all() and (net.lstm.c0 == 0).all()
    fc = net.fc.weight.detach().double()  # He normal, gain 1, fan_in 64 + 100
    assert abs(fc.std().item() / np.sqrt(1 / 164) - 1) < 0.1
    # seeded: the same seed gives the same network, another seed another one
    same = build(cfg, seed=7)
    other = build(cfg, seed=8)
    assert torch.equal(same.lstm.W_x, net.lstm.W_x)
    assert not torch.equal(other.conv0.weight, net.conv0.weight)


def test_glorot_dense_init():
    net = build(ModelConfig(n=1, k=1, classes=10, memory=False, dense_init="glorot"), 0)
    bound = np.sqrt(6 / (64 + 10))
    w = net.fc.weight.detach()
    assert w.abs().max() <= bound and w.abs().max() > 0.8 * bound


def test_gradients_flow_to_every_parameter():
    net = build(ModelConfig(n=1, k=0.5, classes=10, memory=True), 0).double()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    loss = F.cross_entropy(net(x, training=True), torch.tensor([0, 1, 2, 3]))
    grads = torch.autograd.grad(loss, list(net.parameters()))
    names = [n for n, _ in net.named_parameters()]
    for n, g in zip(names, grads):
        assert torch.isfinite(g).all() and g.abs().sum() > 0, n
