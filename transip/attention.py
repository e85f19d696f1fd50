"""Neighbour attention, reference path (plain PyTorch ops, autograd does the backward).

For receiving atom i, head h, over the edges e = (i, j) of its neighbourhood (CSR row i, which includes the
self edge):

    logit_e  = q_i . k_j / sqrt(d) + bias_e
    weight_e = envelope_e * exp(logit_e - max_row) / sum_{e' in row i} envelope_e' * exp(logit_e' - max_row)
    out_i    = sum_e weight_e * [v_j, u_e]

u_e (optional) are values of the edge itself (its geometry), the same for every head and appended to each
head's v_j: each head then also returns the attention-weighted mean of its edges' geometry (width D + F).

The envelope multiplies inside the normalisation, so an edge whose envelope goes to zero (a neighbour
reaching the cutoff) leaves the softmax smoothly. The fused native op (cpp/) computes the same function in
one pass; this function is what it is tested against.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def neighbor_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                                 envelope: torch.Tensor, receivers: torch.Tensor, senders: torch.Tensor,
                                 edge_values: Optional[torch.Tensor] = None) -> torch.Tensor:
    """q, k, v: (N, H, D); bias: (E, H); envelope: (E,); receivers/senders: (E,); edge_values: (E, F) or None.
    Returns (N, H, D + F) (F = 0 without edge values).

    Atoms with no edges get zeros.
    """
    num_atoms, num_heads, head_dim = q.shape
    logits = (q.index_select(0, receivers) * k.index_select(0, senders)).sum(-1) / math.sqrt(head_dim) + bias
    # Subtracting the row maximum keeps exp() finite; it cancels in the ratio, so no gradient is needed.
    row_max = torch.full((num_atoms, num_heads), -1e300 if q.dtype == torch.float64 else -1e30,
                         dtype=q.dtype, device=q.device)
    row_max = row_max.scatter_reduce(0, receivers[:, None].expand(-1, num_heads), logits.detach(), "amax")
    weights = envelope[:, None] * torch.exp(logits - row_max.index_select(0, receivers))
    denom = torch.zeros(num_atoms, num_heads, dtype=q.dtype, device=q.device).index_add(0, receivers, weights)
    values = v.index_select(0, senders)
    if edge_values is not None:
        values = torch.cat([values, edge_values[:, None, :].expand(-1, num_heads, -1)], dim=2)
    numer = torch.zeros(num_atoms, num_heads, values.shape[2], dtype=q.dtype, device=q.device).index_add(
        0, receivers, weights[:, :, None] * values)
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    return numer / safe[:, :, None]
