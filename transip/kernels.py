"""The two implementations of the model's per-edge work, switchable per model (see transip.native).

`reference`: plain PyTorch ops (transip/attention.py and `reference_edge_embedding`), any edge order,
differentiable to any order: what training uses and what the tests compare against.

`fused`: the native ops of cpp/ (`torch.ops.transip.*`): the edge encoder (features + two-layer MLP per edge,
no per-edge intermediate tensors) and the neighbour attention (online softmax over each atom's CSR row).
Differentiable once, with respect to the geometry: exactly what energy -> forces and virial need.

Each implementation is its own module, so a scripted model only references the native ops when it uses them.
"""

from __future__ import annotations

import torch

from .attention import neighbor_attention_reference


def reference_edge_embedding(vectors: torch.Tensor, lengths: torch.Tensor, centers: torch.Tensor, width: float,
                             cutoff: float, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                             b2: torch.Tensor) -> torch.Tensor:
    """Edge features [r / cutoff, Gaussian radial basis of |r|] (not rotation invariant) through
    Linear(w1, b1) -> SiLU -> Linear(w2, b2)."""
    rbf = torch.exp(-0.5 * ((lengths[:, None] - centers) / width) ** 2)
    features = torch.cat([vectors / cutoff, rbf], dim=1)
    return torch.nn.functional.linear(torch.nn.functional.silu(torch.nn.functional.linear(features, w1, b1)), w2, b2)


class ReferenceEdgeEmbedding(torch.nn.Module):
    kernel = "reference"

    def forward(self, vectors: torch.Tensor, lengths: torch.Tensor, centers: torch.Tensor, width: float,
                cutoff: float, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
        return reference_edge_embedding(vectors, lengths, centers, width, cutoff, w1, b1, w2, b2)


class FusedEdgeEmbedding(torch.nn.Module):
    kernel = "fused"

    def forward(self, vectors: torch.Tensor, lengths: torch.Tensor, centers: torch.Tensor, width: float,
                cutoff: float, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
        return torch.ops.transip.edge_embedding(vectors, centers, width, cutoff, w1, b1, w2, b2)


class ReferenceNeighborAttention(torch.nn.Module):
    kernel = "reference"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, envelope: torch.Tensor,
                receivers: torch.Tensor, senders: torch.Tensor) -> torch.Tensor:
        return neighbor_attention_reference(q, k, v, bias, envelope, receivers, senders)


class FusedNeighborAttention(torch.nn.Module):
    """`torch.ops.transip.neighbor_attention` reads edges grouped by receiver (CSR); edges in any order are
    grouped here with a linear-time counting sort, permuting only the per-edge scalars (bias, envelope,
    sender)."""

    kernel = "fused"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, envelope: torch.Tensor,
                receivers: torch.Tensor, senders: torch.Tensor) -> torch.Tensor:
        perm, row_ptr = torch.ops.transip.csr_order(receivers, q.shape[0])
        return torch.ops.transip.neighbor_attention(q, k, v, bias.index_select(0, perm), envelope.index_select(0, perm),
                                                    row_ptr, senders.index_select(0, perm))


def attention_module(kernel: str) -> torch.nn.Module:
    """The attention module for a resolved kernel name ('fused' or 'reference')."""
    return _pick(kernel, FusedNeighborAttention, ReferenceNeighborAttention)()


def edge_embedding_module(kernel: str) -> torch.nn.Module:
    return _pick(kernel, FusedEdgeEmbedding, ReferenceEdgeEmbedding)()


def _pick(kernel: str, fused, reference):
    if kernel == "fused":
        return fused
    if kernel == "reference":
        return reference
    raise ValueError(f"unknown attention kernel {kernel!r}: choose 'fused' or 'reference'")
