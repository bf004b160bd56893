"""CRMN and its ResNet baseline in PyTorch (docs/spec.md §4), equal to ``original/`` by
construction: its initial arrays, batch norm, option-A shortcuts and peephole LSTM (eqs. 2-7).
``python -m modern.model`` prints each Table 1 row's parameter count beside the paper's."""
from __future__ import annotations

from typing import List, Union

import torch
import torch.nn.functional as F
from torch import nn

from crmn.config import ModelConfig
from crmn.convert import canonical_to_torch
from crmn.init import initial_state
from crmn.naming import BN_ALPHA, BN_EPS, count_trainable


class RunningStats:
    """The batch statistics of one forward, folded into the running averages at its end
    by one multi-tensor lerp (same bits as a lerp per layer, far fewer kernels)."""

    def __init__(self):
        self.running: List[torch.Tensor] = []
        self.batch: List[torch.Tensor] = []

    def add(self, running: torch.Tensor, batch: torch.Tensor) -> None:
        self.running.append(running)
        self.batch.append(batch.detach().to(running.dtype))

    def apply(self) -> None:  # r <- (1 - α) r + α batch, α = BN_ALPHA
        if self.running:
            with torch.no_grad():
                torch._foreach_lerp_(self.running, self.batch, BN_ALPHA)


class BatchNorm(nn.Module):
    """Batch norm in Lasagne's convention: ``weight`` γ, ``bias`` β; buffers ``mean`` and
    ``inv_std`` average the batch mean and ``1/sqrt(biased var + ε)`` with rate α."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("inv_std", torch.ones(channels))

    def forward(self, x: torch.Tensor, training: bool,
                update_stats: Union[bool, RunningStats] = False) -> torch.Tensor:
        """Normalise ``x`` (B, C, H, W); ``update_stats``: True moves the running averages
        now, a :class:`RunningStats` collects the batch statistics for its ``apply``."""
        if training:
            # one fused kernel also giving the batch mean and 1/sqrt(var + eps); we average them
            # Lasagne's way (not cuDNN's batch norm: crmn.verify's graph check drifted with it)
            out, bmean, binv = torch.native_batch_norm(
                x, self.weight, self.bias, None, None, True, 0.0, BN_EPS)
            if update_stats:
                stats = RunningStats() if update_stats is True else update_stats
                stats.add(self.mean, bmean)
                stats.add(self.inv_std, binv)
                if stats is not update_stats:
                    stats.apply()
            return out
        scale = self.weight * self.inv_std  # γ / σ
        shift = self.bias - self.mean * scale  # β - μ γ / σ
        return x * scale.to(x.dtype)[:, None, None] + shift.to(x.dtype)[:, None, None]


def shortcut_a(x: torch.Tensor, out_channels: int, stride: int) -> torch.Tensor:
    """Option-A shortcut (He et al. 2015): (B, C, H, W) -> (B, out_channels, H/stride,
    W/stride), new zero channels split before and after the identity's (Lasagne's recipe)."""
    if stride > 1:
        x = x[:, :, ::stride, ::stride]
    extra = out_channels - x.shape[1]
    if extra:
        x = F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))
    return x


class BasicBlock(nn.Module):
    """Post-activation basic block: conv3×3 → BN → ReLU → conv3×3 → BN, + shortcut, ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.c_out, self.stride = c_out, stride
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = BatchNorm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = BatchNorm(c_out)

    def forward(self, x: torch.Tensor, training: bool,
                update_stats: Union[bool, RunningStats]) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x), training, update_stats))
        y = self.bn2(self.conv2(y), training, update_stats)
        return F.relu(y + shortcut_a(x, self.c_out, self.stride))


class _PeepholeRecurrence(torch.autograd.Function):
    """The 3n-step recurrence of eqs. 2-7 with a hand-written backward (far fewer kernels than
    autograd's; ``W_h``'s gradient one product after the loop). ``xw`` (B, T, 4H) = x W_x + b;
    ``W_h`` cast once to ``mm_dtype`` (bf16 under autocast); returns h (B, T, H) or (B, H)."""

    @staticmethod
    def forward(ctx, xw, W_h, w_ci, w_cf, w_co, h0, c0, tanh_out: bool, mm_dtype: torch.dtype,
                last_only: bool):
        B, T, H4 = xw.shape
        H = H4 // 4
        peep = w_ci is not None
        sig_o = torch.tanh if tanh_out else torch.sigmoid
        Wm = W_h.to(mm_dtype)
        h, c = h0.expand(B, H), c0.expand(B, H)
        cs, hms, gates, hs = [c], [], [], []
        for t in range(T):
            hm = h.to(mm_dtype)
            z = xw[:, t] + hm @ Wm  # (B, 4H)
            zi, zf, zg, zo = z.split(H, dim=1)
            if peep:
                zi = torch.addcmul(zi, c, w_ci)
                zf = torch.addcmul(zf, c, w_cf)
            i, f, g = torch.sigmoid(zi), torch.sigmoid(zf), torch.tanh(zg)  # (2), (3), (6)
            c = torch.addcmul(f * c, i, g)  # (5)
            if peep:
                zo = torch.addcmul(zo, c, w_co)  # (4) peeks at the new cell
            o, tc = sig_o(zo), torch.tanh(c)
            h = o * tc  # (7)
            cs.append(c)
            hms.append(hm)
            gates += [i, f, g, o, tc]
            hs.append(h)
        ctx.dims = (B, T, H, peep, tanh_out, mm_dtype, last_only, W_h.dtype, h0.dtype)
        ctx.save_for_backward(Wm, w_ci, w_cf, w_co, *cs, *hms, *gates)
        return h if last_only else torch.stack(hs, dim=1)

    @staticmethod
    def backward(ctx, dout):
        B, T, H, peep, tanh_out, mm_dtype, last_only, w_dtype, h_dtype = ctx.dims
        Wm, w_ci, w_cf, w_co, *rest = ctx.saved_tensors
        cs, hms, gates = rest[:T + 1], rest[T + 1:2 * T + 1], rest[2 * T + 1:]
        o_bw = torch.ops.aten.tanh_backward if tanh_out else torch.ops.aten.sigmoid_backward
        dzs, dzms = [None] * T, [None] * T
        dh_rec = dc_next = None
        WmT = Wm.t()
        for t in reversed(range(T)):
            i, f, g, o, tc = gates[5 * t:5 * t + 5]
            if last_only:
                dh = dout if t == T - 1 else dh_rec
            else:
                dh = dout[:, t] if dh_rec is None else dout[:, t] + dh_rec
            dzo = o_bw(dh * tc, o)
            dc = torch.ops.aten.tanh_backward(dh * o, tc)
            if dc_next is not None:
                dc = dc + dc_next
            if peep:
                dc = torch.addcmul(dc, dzo, w_co)
            dzi = torch.ops.aten.sigmoid_backward(dc * g, i)
            dzf = torch.ops.aten.sigmoid_backward(dc * cs[t], f)
            dzg = torch.ops.aten.tanh_backward(dc * i, g)
            dc_next = dc * f
            if peep:
                dc_next = torch.addcmul(torch.addcmul(dc_next, dzi, w_ci), dzf, w_cf)
            dz = torch.cat([dzi, dzf, dzg, dzo], dim=1)  # (B, 4H)
            dzm = dz.to(mm_dtype)
            dh_rec = dzm @ WmT
            dzs[t], dzms[t] = dz, dzm
        dxw = torch.stack(dzs, dim=1)  # (B, T, 4H)
        dzm_all = dxw if dzms[0] is dzs[0] else torch.stack(dzms, dim=1)
        hm_all = torch.stack(hms, dim=1)  # (B, T, H): the recurrent product's inputs
        dW_h = (hm_all.reshape(B * T, H).t() @ dzm_all.reshape(B * T, 4 * H)).to(w_dtype)
        dw_ci = dw_cf = dw_co = None
        if peep:
            c_all = torch.stack(cs, dim=1)  # (B, T + 1, H)
            dw_ci = (dxw[..., :H] * c_all[:, :-1]).sum(dim=(0, 1))
            dw_cf = (dxw[..., H:2 * H] * c_all[:, :-1]).sum(dim=(0, 1))
            dw_co = (dxw[..., 3 * H:] * c_all[:, 1:]).sum(dim=(0, 1))
        return (dxw, dW_h, dw_ci, dw_cf, dw_co, dh_rec.sum(dim=0, dtype=h_dtype),
                dc_next.sum(dim=0, dtype=h_dtype), None, None, None)


class PeepholeLSTM(nn.Module):
    """The LSTM of eqs. 2-7 (section 3.2) with peepholes and learned ``h0, c0`` (H,); gates
    packed i, f, c, o: ``W_x`` (I, 4H), ``W_h`` (H, 4H), ``b`` (4H,)."""

    def __init__(self, inputs: int, units: int, outgate: str, peepholes: bool):
        super().__init__()
        if outgate not in ("logistic", "tanh"):
            raise ValueError(f"outgate must be 'logistic' or 'tanh', got {outgate!r}")
        self.inputs, self.units, self.outgate, self.peepholes = inputs, units, outgate, peepholes
        self.W_x = nn.Parameter(torch.empty(inputs, 4 * units))
        self.W_h = nn.Parameter(torch.empty(units, 4 * units))
        self.b = nn.Parameter(torch.zeros(4 * units))
        peep = ("w_ci", "w_cf", "w_co") if peepholes else ()
        for name in peep + ("h0", "c0"):  # (H,) each
            self.register_parameter(name, nn.Parameter(torch.zeros(units)))

    def forward(self, x: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Hidden states (B, T, H) of ``x`` (B, T, I); the last (B, H) with ``last_only``."""
        B, T, I = x.shape
        H = self.units
        # one product for all steps (Lasagne's precompute_input); its dtype is the recurrence's
        xm = x.reshape(B * T, I) @ self.W_x
        xw = (xm + self.b).reshape(B, T, 4 * H)
        peep = (self.w_ci, self.w_cf, self.w_co) if self.peepholes else (None, None, None)
        return _PeepholeRecurrence.apply(xw, self.W_h, *peep, self.h0, self.c0,
                                         self.outgate == "tanh", xm.dtype, last_only)


class CIFARNet(nn.Module):
    """6n+2-layer CIFAR ResNet (He et al. 2015), with the CRMN memory when ``cfg.memory``:
    (B, 3, 32, 32) -> logits (B, classes). Modules ``conv0, bn0, blocks.{j}, lstm, fc``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        w1, w2, w3 = cfg.widths
        self.conv0 = nn.Conv2d(3, w1, 3, padding=1, bias=False)
        self.bn0 = BatchNorm(w1)
        blocks, c_in = [], w1
        for stage, c_out in enumerate((w1, w2, w3)):
            for b in range(cfg.n):
                stride = 2 if (stage > 0 and b == 0) else 1
                blocks.append(BasicBlock(c_in, c_out, stride))
                c_in = c_out
        self.blocks = nn.ModuleList(blocks)
        fc_in = w3
        if cfg.memory:
            self.lstm = PeepholeLSTM(cfg.lstm_input, cfg.lstm_units, cfg.outgate, cfg.peepholes)
            fc_in += cfg.lstm_units
        self.fc = nn.Linear(fc_in, cfg.classes)

    def reset_parameters(self, seed: int) -> None:
        """Load :func:`crmn.init.initial_state` for ``seed`` (the arrays ``original/`` loads)."""
        state = canonical_to_torch(self.cfg, initial_state(self.cfg, seed), with_velocity=False)
        with torch.no_grad():
            for name, t in self.state_dict(keep_vars=True).items():  # params and BN buffers
                t.copy_(torch.from_numpy(state[name]).reshape(t.shape))

    def tap(self, x: torch.Tensor) -> torch.Tensor:
        """Block output (B, C, S, S) -> LSTM input (B, I): 2×2 mean pool, flatten, zero-pad."""
        p = F.avg_pool2d(x, 2).flatten(1)
        return F.pad(p, (0, self.cfg.lstm_input - p.shape[1]))

    def forward(self, x: torch.Tensor, training: bool = True,
                update_stats: bool = False) -> torch.Tensor:
        """Logits; ``training``: batch statistics, ``update_stats``: move the running averages."""
        if update_stats and not training:
            raise ValueError("update_stats needs training=True")
        stats = RunningStats() if update_stats else False  # applied once, after the blocks
        h = F.relu(self.bn0(self.conv0(x), training, stats))
        taps, stage = [], []
        for block in self.blocks:
            h = block(h, training, stats)
            if self.cfg.memory:
                stage.append(h)
                if len(stage) == self.cfg.n:  # a stage's n taps share a shape: one tap call
                    outs = torch.stack(stage, dim=1).flatten(0, 1)  # (B·n, C, S, S)
                    taps.append(self.tap(outs).view(x.shape[0], len(stage), -1))
                    stage = []
        feat = h.mean(dim=(2, 3))  # global average pool, (B, 64k)
        if self.cfg.memory:
            seq = torch.cat(taps, dim=1)  # (B, 3n, I), shallow to deep
            h_last = self.lstm(seq.to(self.lstm.W_x.dtype), last_only=True)  # (B, H)
            feat = torch.cat([feat, h_last.to(feat.dtype)], dim=1)
        if stats:
            stats.apply()
        return self.fc(feat)

    def single_product_weights(self) -> List[str]:
        """Parameters entering exactly one product, which ``cast_once`` may cast before the
        forward (not ``lstm.W_h``: autocast sums its 3n casts' gradients in float32)."""
        names = [f"{m}.weight" for m, mod in self.named_modules() if isinstance(mod, nn.Conv2d)]
        return names + ["fc.weight", "fc.bias"] + (["lstm.W_x"] if self.cfg.memory else [])

    def param_count(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build(cfg: ModelConfig, seed: int = 0, cls=None) -> CIFARNet:
    """The network of ``cfg`` (a ``cls``, default CIFARNet), float32 on the CPU, crmn.init's."""
    net = (cls or CIFARNet)(cfg)
    net.reset_parameters(seed)
    return net


if __name__ == "__main__":  # pragma: no cover - a printout for checking Table 1 by eye
    from crmn import paper

    for row in paper.TABLE1:
        cfg = ModelConfig.for_row(row)
        print(f"{row.label:14s} ours {CIFARNet(cfg).param_count() / 1e6:6.2f} M  "
              f"paper {row.paper_params_m:6.2f} M  (naming {count_trainable(cfg) / 1e6:.2f} M)")
