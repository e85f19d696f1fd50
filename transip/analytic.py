"""Hand-derived first and second derivatives of the per-edge work, for training.

A force loss differentiates the forces, so training runs a double backward through every per-edge function.
Left to autograd, each small per-edge op (the Gaussian radial basis, the envelope, the screened repulsion, the
edge MLP) records its own backward graph and then that graph's backward: hundreds of edge-sized ops per step.
Here each function comes with its derivatives written out, as autograd Functions that are differentiable exactly
twice (a third derivative raises), so the double backward is a handful of matrix products per step:

- `lengths(vectors)`: |r| per edge;
- `radial(lengths, value, slope, curvature)`: any function of the edge length, given its value and first two
  derivatives (radial basis, envelope, repulsion);
- `edge_mlp(features, envelope, slot, num_slots, w1, b1, w2, b2, wb, bb)`: the edge MLP a = W2 SiLU(W1 f + b1) + b2,
  the attention biases Wb a + bb of every block, and the envelope-weighted per-slot sums of a.

They are plain PyTorch (any device) and compute the same functions as transip.kernels' reference path; the
tests compare values, first and second derivatives with it (float64, 1e-10). TorchScript cannot compile autograd
Functions, so exported models never use them (TransIP.set_kernel leaves them to training).
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


def gaussian_basis_derivatives(lengths: torch.Tensor, centers: torch.Tensor,
                               width: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """exp(-u^2 / 2), u = (length - centre) / width, (E, K), with its first and second length derivatives."""
    u = (lengths[:, None] - centers) / width
    value = torch.exp(-0.5 * u * u)
    return value, -u / width * value, (u * u - 1.0) / (width * width) * value


def edge_features(vectors: torch.Tensor, lengths: torch.Tensor, centers: torch.Tensor, width: float,
                  cutoff: float) -> torch.Tensor:
    """transip.kernels.edge_features, [r / cutoff, radial basis], with the basis through `radial`."""
    with torch.no_grad():
        basis = gaussian_basis_derivatives(lengths, centers, width)
    return torch.cat([vectors / cutoff, radial(lengths, *basis)], dim=1)


def envelope(lengths: torch.Tensor, cutoff: float) -> torch.Tensor:
    """transip.kernels.envelope through `radial`."""
    with torch.no_grad():
        derivatives = smooth_step_down_derivatives(lengths / cutoff, cutoff)
    return radial(lengths, *derivatives)


# ------------------------------------------------------------------------------------------------- edge MLP
def _silu_slope(sigmoid: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """SiLU'(z) = s (1 + z (1 - s)) = s + h (1 - s), with s = sigmoid(z) and h = SiLU(z) = z s."""
    return torch.addcmul(sigmoid, hidden, 1.0 - sigmoid)


def _silu_curvature(z: torch.Tensor, sigmoid: torch.Tensor) -> torch.Tensor:
    """SiLU''(z) = s (1 - s) (2 + z (1 - 2 s))."""
    return sigmoid * (1.0 - sigmoid) * torch.addcmul(torch.full_like(z, 2.0), z, 1.0 - 2.0 * sigmoid)


class _EdgeMLP(torch.autograd.Function):
    """(features f (E, F), envelope (E,)) -> (biases Wb a + bb (E, B), pooled sum_{e in slot} env_e a_e (S, H))
    with a = W2 SiLU(W1 f + b1) + b2."""

    @staticmethod
    def forward(ctx, features, env, slot, num_slots: int, w1, b1, w2, b2, wb, bb):
        z = torch.nn.functional.linear(features, w1, b1)
        sigmoid = torch.sigmoid(z)
        hidden = z * sigmoid
        a = torch.nn.functional.linear(hidden, w2, b2)
        bias = torch.nn.functional.linear(a, wb, bb)
        pooled = torch.zeros(num_slots, a.shape[1], dtype=a.dtype, device=a.device).index_add_(0, slot,
                                                                                              env[:, None] * a)
        ctx.save_for_backward(features, env, slot, w1, b1, w2, b2, wb, z, sigmoid, hidden, a)
        ctx.num_slots = num_slots
        return bias, pooled

    @staticmethod
    def backward(ctx, grad_bias, grad_pooled):
        features, env, slot, w1, b1, w2, b2, wb, z, sigmoid, hidden, a = ctx.saved_tensors
        if grad_bias is None:
            grad_bias = torch.zeros(a.shape[0], wb.shape[0], dtype=a.dtype, device=a.device)
        if grad_pooled is None:
            grad_pooled = torch.zeros(ctx.num_slots, a.shape[1], dtype=a.dtype, device=a.device)
        grads = _EdgeMLPBackward.apply(grad_bias, grad_pooled, features, env, w1, b1, w2, b2, wb,
                                       (slot, z, sigmoid, hidden, a))
        d_features, d_env, d_w1, d_b1, d_w2, d_b2, d_wb, d_bb = grads
        return d_features, d_env, None, None, d_w1, d_b1, d_w2, d_b2, d_wb, d_bb


class _EdgeMLPBackward(torch.autograd.Function):
    """The edge MLP's backward as a function of the cotangents, inputs and weights, with its own backward (the
    directional derivative along the cotangent of dL/df and dL/denv: what a force loss needs)."""

    @staticmethod
    def forward(ctx, grad_bias, grad_pooled, features, env, w1, b1, w2, b2, wb, saved):
        slot, z, sigmoid, hidden, a = saved
        silu_first = _silu_slope(sigmoid, hidden)
        grad_slot = grad_pooled.index_select(0, slot)  # (E, H): dL/dpooled of each edge's slot
        d_a = grad_bias @ wb + env[:, None] * grad_slot  # dL/da
        d_hidden = d_a @ w2
        d_z = d_hidden * silu_first
        ctx.save_for_backward(grad_bias, grad_slot, features, env, w1, w2, wb, slot, z, hidden, a, d_a, d_hidden,
                              d_z, sigmoid, silu_first)
        ctx.num_slots = grad_pooled.shape[0]
        ctx.set_materialize_grads(False)
        return (d_z @ w1, (grad_slot * a).sum(1), d_z.t() @ features, d_z.sum(0), d_a.t() @ hidden, d_a.sum(0),
                grad_bias.t() @ a, grad_bias.sum(0))

    @staticmethod
    @once_differentiable
    def backward(ctx, dot_features, dot_env, dot_w1, dot_b1, dot_w2, dot_b2, dot_wb, dot_bb):
        # The backward's outputs contracted with their cotangents, S = <dot_f, dL/df> + <dot_env, dL/denv> +
        # sum <dot_W, dL/dW>, is the directional derivative of <grad_bias, bias> + <grad_pooled, pooled> along
        # the tangent (dot_f, dot_env, dot_W). Its gradients, term by term:
        (grad_bias, grad_slot, features, env, w1, w2, wb, slot, z, hidden, a, d_a, d_hidden, c, sigmoid,
         silu_first) = ctx.saved_tensors  # c = dL/dz of the backward = dS/d(dot_z)
        # Tangent of the forward.
        dot_z = _linear_tangent(features, dot_features, w1, dot_w1, dot_b1)
        dot_hidden = silu_first * dot_z
        dot_a = _linear_tangent(hidden, dot_hidden, w2, dot_w2, dot_b2)
        # S = sum_e d_a . dot_a + q . a (+ terms without a), with q the coefficient of a itself.
        q = torch.zeros_like(a) if dot_env is None else dot_env[:, None] * grad_slot
        if dot_wb is not None:
            q = q + grad_bias @ dot_wb
        d_h = q @ w2 if dot_w2 is None else q @ w2 + d_a @ dot_w2  # dS/dhidden
        d_z = torch.addcmul(d_hidden * _silu_curvature(z, sigmoid) * dot_z, d_h, silu_first)  # dS/dz
        d_features = d_z @ w1 if dot_w1 is None else d_z @ w1 + c @ dot_w1
        d_w1 = d_z.t() @ features if dot_features is None else d_z.t() @ features + c.t() @ dot_features
        dot_bias = _linear_tangent(a, dot_a, wb, dot_wb, dot_bb)
        grad_pooled = torch.zeros(ctx.num_slots, a.shape[1], dtype=a.dtype, device=a.device).index_add_(
            0, slot, env[:, None] * dot_a if dot_env is None else dot_env[:, None] * a + env[:, None] * dot_a)
        return (dot_bias, grad_pooled, d_features, (grad_slot * dot_a).sum(1), d_w1, d_z.sum(0),
                d_a.t() @ dot_hidden + q.t() @ hidden, q.sum(0), grad_bias.t() @ dot_a, None)


def _linear_tangent(x: torch.Tensor, dot_x: torch.Tensor, w: torch.Tensor, dot_w: torch.Tensor,
                    dot_b: torch.Tensor) -> torch.Tensor:
    """Tangent of x W^T + b along (dot_x, dot_W, dot_b); None means a zero tangent."""
    out = torch.zeros(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device) if dot_x is None else dot_x @ w.t()
    if dot_w is not None:
        out = out + x @ dot_w.t()
    if dot_b is not None:
        out = out + dot_b
    return out


def edge_mlp(features: torch.Tensor, env: torch.Tensor, slot: torch.Tensor, num_slots: int, w1: torch.Tensor,
             b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, wb: torch.Tensor,
             bb: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention biases (E, B) and envelope-weighted slot sums of the edge MLP's output (num_slots, H)."""
    return _EdgeMLP.apply(features, env, slot, num_slots, w1, b1, w2, b2, wb, bb)
