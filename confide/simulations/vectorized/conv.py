"""Convolutions with per-client weights: vmap's grouped convolution or unfold + batched matmul.

Under ``vmap`` over clients, ``F.conv2d`` with per-client weights becomes one grouped
convolution with ``groups = clients``; :func:`lower_convolutions` swaps chosen ``Conv2d``
modules for one GEMM per client over its unfolded batch (``simulation.conv_lowering``;
``auto`` times both per layer on the GPU with :func:`conv_lowering_costs`).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional name
from torch import nn
from torch.func import functional_call, grad, vmap

from confide.simulations.vectorized.options import autocast

__all__ = ["UnfoldConv2d", "lowerable", "lower_convolutions", "conv_lowering_costs"]


def _conv2d_as_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    stride: tuple[int, int], padding: tuple[int, int],
                    dilation: tuple[int, int]) -> torch.Tensor:
    """conv2d as unfold + a GEMM per sample (vmap makes it one batched matmul).

    Under ``vmap`` over clients, ``F.conv2d`` with per-client weights becomes one grouped
    convolution with ``groups = clients``, which cuDNN runs slowly for few channels per group
    (measured on an H100: 1.7 TFLOP/s for LEAF's first conv). Here each sample's convolution
    is ``[C_out, C_in k k] @ [C_in k k, L]`` over its unfolded input, the weight broadcast over
    the batch: the output is written in place as NCHW (no transpose copy of the activations,
    as a ``[C_out, B L]`` GEMM would need), and the weight gradient is a batched GEMM summed
    over the batch. For a first layer the input needs no gradient, so there is no ``fold``.
    """
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
        weight = weight.to(x.dtype)
    b, _, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # [B, K, L]
    out = torch.matmul(weight.reshape(c_out, cols.shape[1]), cols)  # [B, C_out, L]
    if bias is not None:
        out = out + bias.to(out.dtype)[:, None]
    h_out = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    w_out = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return out.reshape(b, c_out, h_out, w_out)


class UnfoldConv2d(nn.Conv2d):
    """A Conv2d computed by :func:`_conv2d_as_gemm` (same parameters and names)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if x.dim() != 4:
            return super().forward(x)
        return _conv2d_as_gemm(x, self.weight, self.bias, self.stride,  # type: ignore[arg-type]
                               self.padding, self.dilation)  # type: ignore[arg-type]


def lowerable(module: nn.Module) -> bool:
    """Whether ``module`` is a Conv2d that :func:`lower_convolutions` can rewrite."""
    return (type(module) is nn.Conv2d and module.groups == 1
            and module.padding_mode == "zeros" and not isinstance(module.padding, str))


def lower_convolutions(model: nn.Module, names: Sequence[str]) -> nn.Module:
    """A copy of ``model`` whose Conv2d modules ``names`` run as unfold + batched matmul."""
    model = copy.deepcopy(model)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        if not lowerable(old):
            continue
        new = UnfoldConv2d(old.in_channels, old.out_channels, old.kernel_size,
                            stride=old.stride, padding=old.padding, dilation=old.dilation,
                            bias=old.bias is not None, device=old.weight.device,
                            dtype=old.weight.dtype)
        new.load_state_dict(old.state_dict())
        new.train(old.training)
        setattr(parent, child, new)
    return model


def _conv_inputs(model: nn.Module, sample: torch.Tensor
                 ) -> dict[str, tuple[tuple[int, ...], bool]]:
    """The input shape (one sample) of every lowerable Conv2d, from one forward pass, and
    whether that input is the model's own (then training needs no gradient for it).
    """
    shapes: dict[str, tuple[tuple[int, ...], bool]] = {}
    hooks = []
    for name, module in model.named_modules():
        if lowerable(module):
            def hook(_m: nn.Module, args: tuple, _out: Any, name: str = name) -> None:
                # with grad enabled, an input that needs no gradient depends on no weight
                shapes[name] = (tuple(args[0].shape[1:]), not args[0].requires_grad)
            hooks.append(module.register_forward_hook(hook))
    try:
        with torch.enable_grad():
            model(sample.detach())
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _time_cuda(fn: Callable[[], Any], device: torch.device, repeats: int = 3) -> float:
    fn()  # warm-up (cuDNN algorithm choice, allocator)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeats


def conv_lowering_costs(model: nn.Module, sample: torch.Tensor, *, clients: int, batch: int,
                        mixed_precision: str = "off", repeats: int = 3
                        ) -> list[dict[str, Any]]:
    """Time forward + backward of each Conv2d of ``model`` under ``vmap`` over ``clients``
    with per-client weights, as vmap's grouped convolution and as unfold + batched matmul.

    ``sample`` is one input batch on the model's device (CUDA); returns one row per layer with
    the seconds of each lowering and the FLOPs of the layer (forward + backward, 3x forward).
    """
    device = sample.device
    rows = []
    for name, (in_shape, is_input) in _conv_inputs(model, sample[:1]).items():
        conv = model.get_submodule(name)
        if not isinstance(conv, nn.Conv2d):  # pragma: no cover - _conv_inputs finds Conv2d
            continue
        x = torch.randn(clients, batch, *in_shape, device=device, dtype=sample.dtype)
        weights = {k: v.detach().expand(clients, *v.shape).clone()
                   for k, v in conv.named_parameters()}
        # a later layer's input depends on the weights before it: its gradient (``fold`` for
        # unfold + GEMM) is part of training's cost
        timings = {label: _time_vmapped(module, weights, x, mixed_precision, repeats,
                                        input_grad=not is_input)
                   for label, module in (("grouped", conv), ("unfold", _as_unfold(conv)))}
        out_numel = math.prod(conv(x[0, :1]).shape[1:])
        flops = 3 * 2 * clients * batch * out_numel * conv.in_channels * math.prod(
            conv.kernel_size)
        rows.append({"layer": name, "input": list(in_shape), "clients": clients,
                     "batch": batch, "grouped_s": timings["grouped"],
                     "unfold_s": timings["unfold"], "flops": flops})
    return rows


def _time_vmapped(module: nn.Module, weights: dict[str, torch.Tensor], x: torch.Tensor,
                  mixed_precision: str, repeats: int, *, input_grad: bool = False) -> float:
    """Seconds of one vmapped forward + backward of ``module`` (NaN when out of memory)."""
    device = x.device

    def loss(p: dict[str, torch.Tensor], xb: torch.Tensor) -> torch.Tensor:
        with autocast(device, mixed_precision):
            return functional_call(module, p, (xb,)).float().square().mean()

    step = vmap(grad(loss, argnums=(0, 1) if input_grad else 0))
    try:
        return _time_cuda(lambda: step(weights, x), device, repeats)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return float("nan")


def _as_unfold(conv: nn.Module) -> nn.Module:
    return lower_convolutions(nn.Sequential(conv), ["0"]).get_submodule("0")

