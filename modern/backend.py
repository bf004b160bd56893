"""The PyTorch backend behind :class:`crmn.backend.Backend`: Lasagne's SGD (section 4), with
``g = ∂L/∂p + wd·p`` on the decayed arrays; ``v <- μ v - lr g``, ``p <- p + v`` (Nesterov:
``p <- p + μ v - lr g``). On CUDA the step is one CUDA graph (else a few hundred tiny kernels)
and the training set stays on the device (:mod:`modern.gpu`)."""
from __future__ import annotations

import contextlib
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from crmn import convert
from crmn.config import ModelConfig, TrainConfig
from crmn.errors import ConfigError
from crmn.init import initial_state
from crmn.naming import DECAYED_ROLES, velocity_name
from crmn.registry import BACKEND_DTYPES, check_device
from modern import gpu
from modern.model import build

DTYPES = BACKEND_DTYPES["torch"]


class TorchBackend:
    """:class:`crmn.backend.Backend` over :class:`modern.model.CIFARNet`. bfloat16 is autocast
    over float32 weights; ``graph`` (default on CUDA) captures the step; ``channels_last`` and
    ``cast_once`` (one bf16 cast of the single-product weights per step) default on in bf16."""

    name = "torch"

    @staticmethod
    def problem(options) -> Optional[str]:
        """Why torch cannot use ``options.device`` (one line), or None."""
        dev = torch.device(options.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            return (f"--device {options.device}: torch {torch.__version__} sees no CUDA GPU; "
                    "run on this CPU with --device cpu, or on a machine whose GPU torch sees")
        if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
            return (f"--device {options.device}: torch sees {torch.cuda.device_count()} "
                    f"CUDA device(s)")
        return None

    def __init__(self, model: ModelConfig, train: TrainConfig, device: str = "cpu",
                 dtype: str = "float32", graph: Optional[bool] = None, tf32: bool = True,
                 channels_last: Optional[bool] = None, compile: bool = False,
                 cast_once: Optional[bool] = None):
        if dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {dtype!r} for the torch backend; choose one of "
                              f"{', '.join(DTYPES)}")
        dev = torch.device(check_device(device))
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} asked for, but torch {torch.__version__} "
                              "sees no CUDA GPU")
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        self.cfg, self.train_cfg, self.dev = model, train, dev
        self.amp = dtype == "bfloat16"
        self.dtype = torch.float64 if dtype == "float64" else torch.float32  # of the weights
        self.device = "cpu"
        if dev.type == "cuda":
            self.device = f"{dev} ({torch.cuda.get_device_name(dev)})"
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
            torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest convs once
        self.use_graph = (dev.type == "cuda") if graph is None else bool(graph)
        if self.use_graph and dev.type != "cuda":
            raise ConfigError("graph=True needs a CUDA device")
        self.fast_epoch = self.use_graph  # epochs on the device's resident training set
        self.channels_last = self.amp if channels_last is None else bool(channels_last)
        self.cast_once = self.amp if cast_once is None else bool(cast_once)
        if self.cast_once and not self.amp:
            raise ConfigError(f"cast_once is a bfloat16 option; dtype is {dtype}")
        net = self.net = build(model, seed=train.seed).to(device=dev, dtype=self.dtype)
        if self.channels_last:
            net.to(memory_format=torch.channels_last)  # in place, as Module.to is

        def train_forward(weights: Dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(net, weights, (x,),
                                              {"training": True, "update_stats": True})

        self._train_forward = torch.compile(train_forward, dynamic=False) if compile \
            else train_forward
        roles, named = convert.torch_roles(model), dict(net.named_parameters())
        self.names: List[str] = list(named)
        self.params: List[torch.Tensor] = list(named.values())
        self.velocity: List[torch.Tensor] = [torch.zeros_like(p) for p in self.params]
        self.decayed = [i for i, n in enumerate(self.names) if roles[n] in DECAYED_ROLES]
        self._cast: List[Tuple[str, torch.Tensor]] = (
            [(n, named[n]) for n in net.single_product_weights()] if self.cast_once else [])
        self._graph = None  # (CUDAGraph, x, y, lr, sums), made on first use
        self.compile_seconds = 0.0  # graph capture (and torch.compile inside it) so far
        self._resident: Optional[gpu.ResidentData] = None
        # crmn.init's arrays again, cast from float64 (build made float32)
        self.set_state(initial_state(model, train.seed))

    def param_count(self) -> int:
        return self.net.param_count()

    def _autocast(self):
        if self.amp:
            # no weight-cast cache: cached casts would outlive a CUDA-graph capture
            return torch.autocast(self.dev.type, dtype=torch.bfloat16, cache_enabled=False)
        return contextlib.nullcontext()

    def _input(self, x) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            x = np.asarray(x)
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, 32, 32):
            raise ConfigError(f"images must be (B, 3, 32, 32), got {tuple(x.shape)}")
        t = torch.as_tensor(x).to(device=self.dev, dtype=self.dtype)
        return t.contiguous(memory_format=torch.channels_last) if self.channels_last else t

    def _labels(self, y) -> torch.Tensor:
        y = y if isinstance(y, torch.Tensor) else torch.as_tensor(np.asarray(y, dtype=np.int64))
        return y.to(self.dev)

    def _sync(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)

    def _flat(self, p: torch.Tensor) -> torch.Tensor:
        # a 1-D view in memory order (channels-last filters: O, H, W, I)
        return p.permute(0, 2, 3, 1).reshape(-1) if self.channels_last and p.dim() == 4 \
            else p.reshape(-1)

    def _unflat(self, flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if self.channels_last and like.dim() == 4:
            o, i, h, w = like.shape
            return flat.view(o, h, w, i).permute(0, 3, 1, 2)
        return flat.view(like.shape)

    def _cast_weights(self) -> Dict[str, torch.Tensor]:
        """bf16 copies of the single-product weights, cast in one kernel ({} if off)."""
        if not self._cast:
            return {}
        flat = torch.cat([self._flat(p) for _, p in self._cast]).to(torch.bfloat16)
        chunks = flat.split([p.numel() for _, p in self._cast])
        return {n: self._unflat(c, p) for (n, p), c in zip(self._cast, chunks)}

    def _step(self, x: torch.Tensor, y: torch.Tensor, lr: torch.Tensor):
        """Forward, backward, SGD update; (loss sum, correct) as device scalars (capturable)."""
        with self._autocast():
            logits = self._train_forward(self._cast_weights(), x)
        loss = F.cross_entropy(logits.float() if self.amp else logits, y)  # bf16: in float32
        grads = list(torch.autograd.grad(loss, self.params))
        with torch.no_grad():
            tc = self.train_cfg
            if tc.weight_decay and self.decayed:
                torch._foreach_add_([grads[i] for i in self.decayed],
                                    [self.params[i] for i in self.decayed],
                                    alpha=tc.weight_decay)
            torch._foreach_mul_(self.velocity, tc.momentum)
            step = torch._foreach_mul(grads, lr)  # lr·g
            torch._foreach_sub_(self.velocity, step)  # v <- μv - lr·g
            if tc.nesterov:
                torch._foreach_add_(self.params, self.velocity, alpha=tc.momentum)
                torch._foreach_sub_(self.params, step)  # p <- p + μv - lr·g
            else:
                torch._foreach_add_(self.params, self.velocity)  # p <- p + v
            correct = (logits.argmax(dim=1) == y).sum()
        return loss.detach().double() * y.shape[0], correct

    def _tensors(self) -> Dict[str, torch.Tensor]:
        """Every state tensor by native name: parameters, BN buffers, velocities."""
        return {**self.net.state_dict(keep_vars=True),
                **{velocity_name(n): v for n, v in zip(self.names, self.velocity)}}

    def _capture(self) -> None:
        """Record the step as one CUDA graph; the state is restored after the warm-up steps."""
        B = self.train_cfg.batch_size
        x = torch.randn(B, 3, 32, 32, device=self.dev, dtype=self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, self.cfg.classes, (B,), device=self.dev)
        lr = torch.zeros((), device=self.dev, dtype=self.dtype)
        saved = [t.detach().clone() for t in self._tensors().values()]
        side = torch.cuda.Stream(self.dev)
        side.wait_stream(torch.cuda.current_stream(self.dev))
        with torch.cuda.stream(side):
            for _ in range(3):
                self._step(x, y, lr)
        torch.cuda.current_stream(self.dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            sums = self._step(x, y, lr)
        with torch.no_grad():
            for t, s in zip(self._tensors().values(), saved):
                t.copy_(s)
        self._sync()
        self._graph = (graph, x, y, lr, sums)
        self._graph_lr = None  # the learning rate tensor holds no rate yet

    def step(self, x, y, lr: float) -> Tuple[torch.Tensor, torch.Tensor]:
        """:meth:`crmn.backend.Backend.step` on numpy or device tensors."""
        xb, yb = self._input(x), self._labels(y)
        if self.use_graph and xb.shape[0] == self.train_cfg.batch_size:
            if self._graph is None:
                t0 = time.perf_counter()
                self._capture()
                self.compile_seconds += time.perf_counter() - t0
            graph, sx, sy, slr, sums = self._graph
            sx.copy_(xb), sy.copy_(yb)
            if lr != self._graph_lr:  # one small kernel per new rate, not per step
                slr.fill_(lr)
                self._graph_lr = lr
            graph.replay()
            return sums
        return self._step(xb, yb, torch.tensor(lr, device=self.dev, dtype=self.dtype))

    def resident(self, sampler) -> gpu.ResidentData:
        """The sampler's training set on this device, copied once."""
        r = self._resident
        if r is None or r.source is not sampler.x or r.pad != sampler.pad:
            self._resident = None  # free the previous copy first
            self._resident = gpu.make_resident(sampler.x, sampler.y, sampler.pad, self.dev,
                                               self.dtype)
        return self._resident

    def epoch_batches(self, sampler, epoch: int):
        """The batches of ``sampler.epoch(epoch)``, gathered on the device (FastEpoch)."""
        B = sampler.batch_size
        plan = sampler.plan(epoch)
        m = len(sampler) * B  # positions past the last full batch are unused (dropped)
        xe, ye = gpu.gather_epoch(self.resident(sampler), plan.order[:m], plan.dy[:m],
                                  plan.dx[:m], plan.flip[:m])
        if self.channels_last:
            xe = xe.contiguous(memory_format=torch.channels_last)
        for b in range(len(sampler)):
            yield xe[b * B:(b + 1) * B], ye[b * B:(b + 1) * B]

    @torch.no_grad()
    def logits(self, x: np.ndarray, training: bool) -> np.ndarray:
        """Logits (B, classes) as numpy; changes no state (running stats included)."""
        with self._autocast():
            out = self.net(self._input(x), training=training, update_stats=False)
        return out.float().cpu().numpy() if self.amp else out.cpu().numpy()

    def get_state(self) -> Dict[str, np.ndarray]:
        """Params, BN running stats and velocities under canonical names (crmn.convert)."""
        # copies: on the CPU .numpy() would share memory with the live tensors
        native = {k: v.detach().cpu().numpy().copy() for k, v in self._tensors().items()}
        return convert.torch_to_canonical(self.cfg, native)

    def set_state(self, state: Dict[str, np.ndarray]) -> None:
        """Copy canonical arrays in place (a captured graph keeps pointing at them)."""
        native = convert.canonical_to_torch(self.cfg, state)  # checks every name and shape
        with torch.no_grad():
            for k, t in self._tensors().items():
                src = torch.as_tensor(np.ascontiguousarray(native[k]))
                t.copy_(src.to(dtype=t.dtype).reshape(t.shape))
        self._sync()

    def reset_velocity(self) -> None:
        torch._foreach_zero_(self.velocity)
