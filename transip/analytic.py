"""Hand-derived first and second derivatives of the per-edge work, for training.

A force loss differentiates the forces, so training runs a double backward through every per-edge function.
Left to autograd, each small per-edge op (the edge length, the Gaussian radial basis, the screened repulsion)
records its own backward graph and then that graph's backward. Here each function comes with its derivatives
written out, as autograd Functions that are differentiable exactly twice (a third derivative raises):

- `lengths(vectors)`: |r| per edge;
- `radial(lengths, value, slope, curvature)`: any function of the edge length, given its value and first two
  derivatives (the repulsion).

The edge encoder's own second derivatives are native ops (transip.kernels.TrainingEdgeEncoder), those of the
block geometry's edge features included. `gaussian_basis` lives here because both paths share its floor. These are plain
PyTorch (any device) and compute the same functions as the reference path; the tests compare values, first and
second derivatives with it (float64, 1e-10). TorchScript cannot compile autograd Functions, so exported models
never use them (TransIP.set_kernel leaves them to training).
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch.autograd.function import once_differentiable

# ------------------------------------------------------------------------------------------------- lengths
class _Lengths(torch.autograd.Function):
    """|r| per edge (E,); the gradient at a zero vector is zero, as torch.linalg.norm's."""

    @staticmethod
    def forward(ctx, vectors):
        lengths = torch.linalg.norm(vectors, dim=1)
        ctx.save_for_backward(vectors, lengths)
        return lengths

    @staticmethod
    def backward(ctx, grad):
        vectors, lengths = ctx.saved_tensors
        return _LengthsBackward.apply(grad, vectors, lengths)


class _LengthsBackward(torch.autograd.Function):
    """dL/dr = g r / |r|: linear in g; its own derivative in r is g (I - r^ r^T) / |r|."""

    @staticmethod
    def forward(ctx, grad, vectors, lengths):
        inverse = torch.where(lengths > 0, 1.0 / lengths, torch.zeros_like(lengths))
        ctx.save_for_backward(grad, vectors, inverse)
        return (grad * inverse)[:, None] * vectors

    @staticmethod
    @once_differentiable
    def backward(ctx, cotangent):
        grad, vectors, inverse = ctx.saved_tensors
        along = (cotangent * vectors).sum(1) * inverse  # c . r^
        unit = vectors * inverse[:, None]
        d_vectors = (grad * inverse)[:, None] * (cotangent - along[:, None] * unit)
        return along, d_vectors, None


def lengths(vectors: torch.Tensor) -> torch.Tensor:
    """|r| of every edge (E,), differentiable twice by hand."""
    return _Lengths.apply(vectors)


# ------------------------------------------------------------------------------------------------- radial
class _Radial(torch.autograd.Function):
    """value(lengths), with its slope and curvature given: (E,) or (E, K) per edge."""

    @staticmethod
    def forward(ctx, lengths, value, slope, curvature):
        ctx.save_for_backward(lengths, slope, curvature)
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        lengths, slope, curvature = ctx.saved_tensors
        return _RadialBackward.apply(grad, lengths, slope, curvature), None, None, None


class _RadialBackward(torch.autograd.Function):
    """dL/dlength = sum_k g_k value_k'(length); linear in g, and through value' a function of the length."""

    @staticmethod
    def forward(ctx, grad, lengths, slope, curvature):
        ctx.save_for_backward(grad, slope, curvature)
        return _sum_per_edge(grad * slope)

    @staticmethod
    @once_differentiable
    def backward(ctx, cotangent):
        grad, slope, curvature = ctx.saved_tensors
        per_edge = cotangent if slope.dim() == 1 else cotangent[:, None]
        return per_edge * slope, _sum_per_edge(per_edge * grad * curvature), None, None


def _sum_per_edge(x: torch.Tensor) -> torch.Tensor:
    return x if x.dim() == 1 else x.sum(1)


def radial(lengths: torch.Tensor, value: torch.Tensor, slope: torch.Tensor, curvature: torch.Tensor) -> torch.Tensor:
    """`value` as a function of `lengths` (E,), differentiable twice through the given derivatives with respect
    to the length (all three (E,) or (E, K), computed without autograd)."""
    return _Radial.apply(lengths, value.detach(), slope.detach(), curvature.detach())


def smooth_step_down_derivatives(x: torch.Tensor, scale) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """S(x) = 1 - 10x^3 + 15x^4 - 6x^5 (zero from x = 1) of x = length / scale, and dS/dlength, d2S/dlength2."""
    inside = x < 1.0
    c = x.clamp(max=1.0)
    value = torch.where(inside, 1.0 + c * c * c * (-10.0 + c * (15.0 - 6.0 * c)), torch.zeros_like(x))
    slope = torch.where(inside, c * c * (-30.0 + c * (60.0 - 30.0 * c)), torch.zeros_like(x)) / scale
    curvature = torch.where(inside, c * (-60.0 + c * (180.0 - 120.0 * c)), torch.zeros_like(x)) / (scale * scale)
    return value, slope, curvature


def exp_floor(dtype: torch.dtype) -> float:
    """The argument below which exp(x) counts as zero in `dtype`: there exp(x) times a number of relative size
    epsilon would be denormal (under the type's smallest normal number), and every operation on a denormal takes
    the CPU's slow path. `gaussian_basis` gives 0 there, as the native kernels' exp does. ceil(log(tiny / eps))
    of torch.finfo(dtype), written out because TorchScript has no finfo (a test checks both values against finfo;
    cpp/src/kernels_impl.h derives its kExpFloor the same way from std::numeric_limits)."""
    return -71.0 if dtype == torch.float32 else -672.0


def gaussian_of(u: torch.Tensor) -> torch.Tensor:
    """exp(-u^2 / 2), exactly 0 where it would be denormal. exp(-inf) is 0, and so is its derivative (exp
    itself): no tiny value is left anywhere, not even in the graph of a second derivative (clamping to the floor
    instead left exp(-71) in every tail entry, whose products in training's double backward were denormal)."""
    exponent = -0.5 * u * u
    return torch.exp(exponent.masked_fill(exponent < exp_floor(exponent.dtype), float("-inf")))


def gaussian_basis(lengths: torch.Tensor, centers: torch.Tensor, width: float) -> torch.Tensor:
    """exp(-u^2 / 2), u = (length - centre) / width, (E, K); exactly 0 where it would be denormal."""
    return gaussian_of((lengths[:, None] - centers) / width)
