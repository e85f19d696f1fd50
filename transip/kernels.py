"""The two implementations of the model's per-edge work, switchable per model (see transip.native).

`reference`: plain PyTorch ops (transip/attention.py and `reference_edge_embedding`), any edge order,
differentiable to any order: what training uses and what the tests compare against.

`fused`: the native ops of cpp/ (`torch.ops.transip.*`): the edge encoder (features, edge MLP, attention
biases, envelope and pooled initial messages in one pass per edge) and the neighbour attention (over each atom's
CSR row: all its scores first, then the row's maximum, then one vectorised exp over the row).
Differentiable once, with respect to the geometry: exactly what energy -> forces and virial need. In training the
fused path's edge encoder is `TrainingEdgeEncoder`, on native ops that also give the weights' gradients and the
second derivative a force loss needs.

Each implementation is its own module, so a scripted model only references the native ops when it uses them.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .analytic import gaussian_basis
from .attention import neighbor_attention_reference


def smooth_step_down(x: torch.Tensor) -> torch.Tensor:
    """1 - 10x^3 + 15x^4 - 6x^5 for x < 1, 0 beyond: value, slope and curvature vanish at x = 1."""
    c = x.clamp(max=1.0)
    return torch.where(x < 1.0, 1.0 + c * c * c * (-10.0 + c * (15.0 - 6.0 * c)), torch.zeros_like(x))


def envelope(r: torch.Tensor, cutoff: float) -> torch.Tensor:
    """The cutoff envelope of every edge: `smooth_step_down(r / cutoff)`."""
    return smooth_step_down(r / cutoff)


class EdgeWeights(NamedTuple):
    """The model's parameters of the per-edge work, in one value so that both edge encoders take the same
    arguments (the model builds it: `TransIP.edge_weights`). The attention-bias layers of all blocks are stacked
    (`bias_groups` of them), so one product gives every block's biases."""

    centers: torch.Tensor  # radial basis centres
    width: float  # radial basis width
    cutoff: float
    w1: torch.Tensor  # edge MLP: Linear(w1, b1) -> SiLU -> Linear(w2, b2)
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor
    w_bias: torch.Tensor  # attention biases of every block, stacked
    b_bias: torch.Tensor
    bias_groups: int  # blocks
    w_msg: torch.Tensor  # edge message projection
    b_msg: torch.Tensor
    neighbor_embedding: torch.Tensor  # (species, d_model)


def edge_features(vectors: torch.Tensor, lengths: torch.Tensor, centers: torch.Tensor, width: float,
                  cutoff: float) -> torch.Tensor:
    """Edge features (E, 3 + num_rbf): [r / cutoff, Gaussian radial basis of |r|] (not rotation invariant)."""
    return torch.cat([vectors / cutoff, gaussian_basis(lengths, centers, width)], dim=1)


def reference_edge_embedding(vectors: torch.Tensor, lengths: torch.Tensor, w: EdgeWeights) -> torch.Tensor:
    """Edge features through Linear(w1, b1) -> SiLU -> Linear(w2, b2)."""
    return embed_features(edge_features(vectors, lengths, w.centers, w.width, w.cutoff), w)


def embed_features(features: torch.Tensor, w: EdgeWeights) -> torch.Tensor:
    return F.linear(F.silu(F.linear(features, w.w1, w.b1)), w.w2, w.b2)


def message_slots(receivers: torch.Tensor, senders: torch.Tensor, species: torch.Tensor,
                  w: EdgeWeights) -> torch.Tensor:
    """Each edge's slot, (receiver, species of the sender): the neighbour embedding u takes one value per species,
    so the message sum is regrouped per slot (`pooled_messages`)."""
    return receivers * w.neighbor_embedding.shape[0] + species.index_select(0, senders)


def pooled_messages(pooled: torch.Tensor, pooled_weight: torch.Tensor, num_atoms: int,
                    w: EdgeWeights) -> torch.Tensor:
    """The initial tokens' neighbour sum m_i = sum_j f_c(r_ij) (W_msg a_ij + b_msg) * u[species j] (N, d_model),
    regrouped as sum_s u_s (W_msg (sum_{j of species s} f_c a_ij) + b_msg sum f_c) from the per-slot sums
    `pooled` (N * species, hidden) and `pooled_weight` (N * species,): the projection runs per slot, not per
    edge. Both edge encoders end with it."""
    num_species = w.neighbor_embedding.shape[0]
    projected = F.linear(pooled, w.w_msg) + pooled_weight[:, None] * w.b_msg
    # Explicit width, not -1: with no atoms -1 would be ambiguous and view would fail.
    return (projected.view(num_atoms, num_species, w.w_msg.shape[0]) * w.neighbor_embedding).sum(1)


class ReferenceEdgeEncoder(torch.nn.Module):
    """Everything per neighbour edge except attention, in plain PyTorch. Returns (attention biases of every
    layer (layers, E, heads), the neighbour sum of the initial tokens (N, d_model), envelope (E,), and the edge
    features e_ij (E, 3 + num_rbf) that every block reads when `features`, else (E, 0)):

        a_ij = edge MLP(e_ij),   bias_ij = W_bias a_ij,   m_i = sum_j f_c(r_ij) (W_msg a_ij + b_msg) * u[species j]

    The message sum is pooled per slot (`pooled_messages`), as the fused op does: nothing d_model-wide per edge,
    which matters most in training, where every per-edge tensor is differentiated twice."""

    kernel = "reference"

    def forward(self, vectors: torch.Tensor, receivers: torch.Tensor, senders: torch.Tensor, species: torch.Tensor,
                num_atoms: int, w: EdgeWeights,
                features: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        lengths = torch.linalg.norm(vectors, dim=1)
        env = envelope(lengths, w.cutoff)
        edge_feature_values = edge_features(vectors, lengths, w.centers, w.width, w.cutoff)
        embedding = embed_features(edge_feature_values, w)
        slot = message_slots(receivers, senders, species, w)
        num_slots = num_atoms * w.neighbor_embedding.shape[0]
        pooled = torch.zeros(num_slots, embedding.shape[1], dtype=embedding.dtype,
                             device=embedding.device).index_add(0, slot, env[:, None] * embedding)
        weight = torch.zeros(num_slots, dtype=env.dtype, device=env.device).index_add(0, slot, env)
        heads = w.w_bias.shape[0] // w.bias_groups
        bias = F.linear(embedding, w.w_bias, w.b_bias).view(vectors.shape[0], w.bias_groups, heads).transpose(0, 1)
        if not features:
            edge_feature_values = edge_feature_values[:, :0]
        return bias, pooled_messages(pooled, weight, num_atoms, w), env, edge_feature_values


class FusedEdgeEncoder(torch.nn.Module):
    """The same outputs through `torch.ops.transip.edge_encoder`: one pass per edge, nothing hidden-sized per
    edge in memory. The op pools the edges per slot (`message_slots`) and the projection runs on the pooled sums
    (`pooled_messages`); it writes the edge features the blocks read in the same pass, and takes their gradient
    in its backward. Same function, other round-off."""

    kernel = "fused"

    def forward(self, vectors: torch.Tensor, receivers: torch.Tensor, senders: torch.Tensor, species: torch.Tensor,
                num_atoms: int, w: EdgeWeights,
                features: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        slot = message_slots(receivers, senders, species, w)
        bias, pooled, weight, env, edge_feature_values = torch.ops.transip.edge_encoder(
            vectors, slot, num_atoms * w.neighbor_embedding.shape[0], w.centers, w.width, w.cutoff, w.w1, w.b1, w.w2,
            w.b2, w.w_bias, w.b_bias, w.bias_groups, features)
        return bias, pooled_messages(pooled, weight, num_atoms, w), env, edge_feature_values


class TrainingEdgeEncoder(torch.nn.Module):
    """The fused path's edge encoder in training, where the force loss differentiates it twice: the forward is
    `torch.ops.transip.edge_encoder`, the backward `edge_encoder_train_backward` (gradients of the geometry and
    of every weight, in one pass per edge) and its derivative along the force loss's cotangent
    `edge_encoder_double_backward` (one pass per slot). Wired into autograd here in Python, so never part of an
    exported model (TorchScript cannot compile autograd Functions); the artifact uses FusedEdgeEncoder."""

    kernel = "fused"

    def forward(self, vectors: torch.Tensor, receivers: torch.Tensor, senders: torch.Tensor, species: torch.Tensor,
                num_atoms: int, w: EdgeWeights,
                features: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        slot = message_slots(receivers, senders, species, w)
        weights = (w.w1, w.b1, w.w2, w.b2, w.w_bias, w.b_bias)
        # The autograd nodes the weights' gradients flow into: the backward asks the engine whether this pass
        # will run any of them (the force pass of a training step does not) and skips the weight gradients if not.
        nodes = _autograd_nodes(weights)
        bias, pooled, weight, env, edge_feature_values = _TrainingEncoder.apply(
            vectors, slot, num_atoms * w.neighbor_embedding.shape[0], w.centers, w.width, w.cutoff, *weights,
            (w.bias_groups, nodes, features))
        return bias, pooled_messages(pooled, weight, num_atoms, w), env, edge_feature_values


class _TrainingEncoder(torch.autograd.Function):
    @staticmethod
    def forward(ctx, vectors, slot, num_slots: int, centers, width: float, cutoff: float, w1, b1, w2, b2, wb, bb,
                groups_nodes_features):
        groups, ctx.weight_nodes, features = groups_nodes_features
        outputs = torch.ops.transip.edge_encoder(vectors, slot, num_slots, centers, width, cutoff, w1, b1, w2, b2, wb,
                                                 bb, groups, features)
        ctx.save_for_backward(vectors, slot, centers, w1, b1, w2, b2, wb, bb)
        ctx.constants = (width, cutoff, groups)
        ctx.shapes = [o.shape for o in outputs[:4]]
        ctx.features = features
        return outputs

    @staticmethod
    def backward(ctx, *grads):
        vectors, slot, centers, *weights = ctx.saved_tensors
        # The four outputs every pass needs (zeros where they did not reach the loss); the features' gradient
        # stays None when they were not returned or not used.
        incoming = [torch.zeros(shape, dtype=vectors.dtype, device=vectors.device) if g is None else g
                    for g, shape in zip(grads[:4], ctx.shapes)]
        grad_features = grads[4] if ctx.features else None
        with_weights = _engine_needs(ctx.weight_nodes)
        out = _TrainingEncoderBackward.apply(*incoming, grad_features, vectors, *weights,
                                             (slot, centers, ctx.constants, with_weights))
        return (out[0], None, None, None, None, None, *out[1:], None)


def _autograd_nodes(tensors) -> Optional[list]:
    """The autograd nodes the gradients of these tensors flow into (None where this torch cannot say)."""
    node_of = getattr(torch.autograd.graph, "_get_grad_fn_or_grad_acc", None)
    return None if node_of is None else [node_of(t) for t in tensors if t.requires_grad]


def _engine_needs(nodes: Optional[list]) -> bool:
    """Whether the running backward pass will execute any of these autograd nodes (True when unsure)."""
    if nodes is None:
        return True
    try:
        return any(torch._C._will_engine_execute_node(node) for node in nodes)
    except (AttributeError, RuntimeError):
        return bool(nodes)


class _TrainingEncoderBackward(torch.autograd.Function):
    """(incoming gradients, vectors, weights) -> (dL/dvectors, dL/dweights), and its own backward along the
    cotangent of dL/dvectors (what a force loss needs)."""

    @staticmethod
    def forward(ctx, grad_bias, grad_pooled, grad_pooled_weight, grad_envelope, grad_features, vectors, w1, b1, w2,
                b2, wb, bb, constants):
        slot, centers, (width, cutoff, groups), with_weights = constants
        ctx.save_for_backward(grad_bias, grad_pooled, grad_pooled_weight, grad_envelope, grad_features, vectors, w1,
                              b1, w2, b2, wb, bb)
        ctx.constants = constants
        ctx.set_materialize_grads(False)
        inputs = (grad_bias, grad_pooled, grad_pooled_weight, grad_envelope, vectors, slot, centers, width, cutoff, w1,
                  b1, w2, b2, wb, bb, groups, grad_features)
        if not with_weights:  # a pass that only needs the geometry's gradient (the forces)
            return (torch.ops.transip.edge_encoder_backward(*inputs),) + (None,) * 6
        grad_vectors, flat = torch.ops.transip.edge_encoder_train_backward(*inputs)
        return (grad_vectors, *_split_weights(flat, (w1, b1, w2, b2, wb, bb)))

    @staticmethod
    @once_differentiable
    def backward(ctx, dot_vectors, *weight_cotangents):
        if any(c is not None for c in weight_cotangents):
            raise RuntimeError("the fused edge encoder does not differentiate its weights' gradients again (a "
                               "force loss never needs it); use the reference kernel (TrainConfig.kernel="
                               "'reference' or model.set_kernel('reference')) for that")
        if dot_vectors is None:
            return (None,) * 13
        *incoming, grad_features, vectors = ctx.saved_tensors[:6]
        weights = ctx.saved_tensors[6:]
        slot, centers, (width, cutoff, groups), _ = ctx.constants
        *d_incoming, d_vectors, flat, d_features = torch.ops.transip.edge_encoder_double_backward(
            dot_vectors, *incoming, vectors, slot, centers, width, cutoff, *weights, groups, grad_features)
        d_w1, d_b1, d_w2, d_b2, d_wb, _ = _split_weights(flat, weights)
        return (*d_incoming, d_features if grad_features is not None else None, d_vectors, d_w1, d_b1, d_w2, d_b2,
                d_wb, None, None)


def _split_weights(flat: torch.Tensor, like) -> list:
    """The op's flat weight gradients as tensors shaped like the weights (w1, b1, w2, b2, wb, bb)."""
    parts, start = [], 0
    for weight in like:
        parts.append(flat[start:start + weight.numel()].view(weight.shape))
        start += weight.numel()
    return parts


class ReferenceNeighborAttention(torch.nn.Module):
    """Self edges made explicit (prepended), then the reference function. `edge_values` (E, F) and
    `self_values` (F,) are the edges' own values (transip/attention.py); F = 0 means none."""

    kernel = "reference"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, envelope: torch.Tensor,
                self_bias: torch.Tensor, receivers: torch.Tensor, senders: torch.Tensor, row_ptr: torch.Tensor,
                edge_values: torch.Tensor, self_values: torch.Tensor) -> torch.Tensor:
        n = q.shape[0]
        atoms = torch.arange(n, device=receivers.device)
        values: Optional[torch.Tensor] = None
        if edge_values.shape[1] > 0:
            values = torch.cat([self_values.expand(n, -1), edge_values])
        return neighbor_attention_reference(
            q, k, v, torch.cat([self_bias.expand(n, -1), bias]),
            torch.cat([torch.ones(n, dtype=envelope.dtype, device=envelope.device), envelope]),
            torch.cat([atoms, receivers]), torch.cat([atoms, senders]), values)


class FusedNeighborAttention(torch.nn.Module):
    """`torch.ops.transip.neighbor_attention` on edges grouped by receiver (CSR `row_ptr`); each row's own atom
    is included by the op (`self_bias`, `self_values`, envelope 1), so no self-edge arrays are built."""

    kernel = "fused"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, envelope: torch.Tensor,
                self_bias: torch.Tensor, receivers: torch.Tensor, senders: torch.Tensor, row_ptr: torch.Tensor,
                edge_values: torch.Tensor, self_values: torch.Tensor) -> torch.Tensor:
        if edge_values.shape[1] == 0:
            return torch.ops.transip.neighbor_attention(q, k, v, bias, envelope, row_ptr, senders, self_bias, None,
                                                        None)
        return torch.ops.transip.neighbor_attention(q, k, v, bias, envelope, row_ptr, senders, self_bias,
                                                    edge_values, self_values)


def reference_edge_vectors(positions: torch.Tensor, receivers: torch.Tensor, senders: torch.Tensor,
                           shift_vectors: torch.Tensor) -> torch.Tensor:
    """r_e = x_sender - x_receiver + shift_e, (E, 3)."""
    return positions.index_select(0, senders) - positions.index_select(0, receivers) + shift_vectors


def reference_edge_forces(g: torch.Tensor, receivers: torch.Tensor, senders: torch.Tensor,
                          num_atoms: int) -> torch.Tensor:
    """F_i = sum_{e: receiver i} g_e - sum_{e: sender i} g_e, (num_atoms, 3), from g_e = dE/dr_e."""
    # Summed along the last axis of a (3, atoms) tensor: ATen's CPU index_add along the first axis of an
    # (atoms, 3) one takes its generic scatter path, several times slower (same sums, same order).
    g_t = g.t()
    return torch.zeros(3, num_atoms, dtype=g.dtype, device=g.device).index_add(
        1, receivers, g_t).index_add(1, senders, -g_t).t().contiguous()


class ReferenceEdgeGeometry(torch.nn.Module):
    """Edge displacements from positions (`vectors`) and forces from the energy's edge gradient (`forces`) with
    ATen gathers and scatters: differentiable to any order."""

    kernel = "reference"

    def forward(self, positions: torch.Tensor, receivers: torch.Tensor, senders: torch.Tensor,
                shift_vectors: torch.Tensor) -> torch.Tensor:
        return self.vectors(positions, receivers, senders, shift_vectors)

    @torch.jit.export
    def vectors(self, positions: torch.Tensor, receivers: torch.Tensor, senders: torch.Tensor,
                shift_vectors: torch.Tensor) -> torch.Tensor:
        return reference_edge_vectors(positions, receivers, senders, shift_vectors)

    @torch.jit.export
    def forces(self, g: torch.Tensor, receivers: torch.Tensor, senders: torch.Tensor, num_atoms: int) -> torch.Tensor:
        return reference_edge_forces(g, receivers, senders, num_atoms)


class FusedEdgeGeometry(ReferenceEdgeGeometry):
    """The same through `torch.ops.transip.edge_vectors` and `edge_forces`, one pass over the edges each (ATen's
    gathers and scatters cost as much per edge in float32 as in float64). The ops are not differentiable, so
    inputs that carry gradients (training's force loss differentiates the forces) go through the reference
    functions; the results are the same bit for bit."""

    kernel = "fused"

    @torch.jit.export
    def vectors(self, positions: torch.Tensor, receivers: torch.Tensor, senders: torch.Tensor,
                shift_vectors: torch.Tensor) -> torch.Tensor:
        if positions.requires_grad or shift_vectors.requires_grad:
            return reference_edge_vectors(positions, receivers, senders, shift_vectors)
        return torch.ops.transip.edge_vectors(positions, receivers, senders, shift_vectors)

    @torch.jit.export
    def forces(self, g: torch.Tensor, receivers: torch.Tensor, senders: torch.Tensor, num_atoms: int) -> torch.Tensor:
        if g.requires_grad:
            return reference_edge_forces(g, receivers, senders, num_atoms)
        return torch.ops.transip.edge_forces(g, receivers, senders, num_atoms)


def edge_geometry_module(kernel: str) -> torch.nn.Module:
    """Edge vectors and forces for a resolved kernel name."""
    return _pick(kernel, FusedEdgeGeometry, ReferenceEdgeGeometry)()


def attention_module(kernel: str) -> torch.nn.Module:
    """The attention module for a resolved kernel name ('fused' or 'reference')."""
    return _pick(kernel, FusedNeighborAttention, ReferenceNeighborAttention)()


def edge_encoder_module(kernel: str, twice_differentiable: bool = False) -> torch.nn.Module:
    """The edge encoder for a resolved kernel name; `twice_differentiable` (training with a force loss): the fused
    op is differentiable once, so the fused path trains with TrainingEdgeEncoder."""
    return _pick(kernel, TrainingEdgeEncoder if twice_differentiable else FusedEdgeEncoder, ReferenceEdgeEncoder)()


def _pick(kernel: str, fused, reference):
    if kernel == "fused":
        return fused
    if kernel == "reference":
        return reference
    raise ValueError(f"unknown attention kernel {kernel!r}: choose 'fused' or 'reference'")
