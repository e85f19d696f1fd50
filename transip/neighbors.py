"""Neighbour lists: the pure-PyTorch reference and the dispatch to the native cell-list op.

Edges are directed pairs (receiver i, sender j) with an integer periodic image `shift` such that the
displacement is r_ij = x_j - x_i + shift @ cell. Every pair within the cutoff appears in both directions;
edges are sorted by receiver (CSR order), which is the layout the attention layers consume.

`reference_neighbors` is O(N^2) per structure (all pairs, all needed images): exact and simple, which is what
a reference should be. `structure_neighbors` runs the kernel it is given (transip.native's vocabulary): the
fused kernel's cell-list op (`torch.ops.transip.neighbor_list`, linear in atoms, same pairs and shifts), or the
reference; by default (`auto`) the fused one when the library is loaded. Both handle boxes thinner than the
cutoff exactly, by listing every periodic image within the cutoff.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch

from . import native


def _image_range(cell: torch.Tensor, pbc: torch.Tensor, cutoff: float) -> List[int]:
    """How many periodic images along each lattice vector can hold a neighbour within `cutoff`."""
    counts: List[int] = []
    volume = torch.abs(torch.linalg.det(cell))
    for axis in range(3):
        if not bool(pbc[axis]):
            counts.append(0)
            continue
        # distance between the lattice planes spanned by the other two vectors
        spacing = volume / torch.linalg.norm(torch.linalg.cross(cell[(axis + 1) % 3], cell[(axis + 2) % 3]))
        counts.append(int(math.ceil(cutoff / float(spacing))))
    return counts


def structure_neighbors(positions: torch.Tensor, cutoff: float, cell: Optional[torch.Tensor] = None,
                        pbc: Optional[torch.Tensor] = None, kernel: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Neighbours of one structure. Returns (edge_index (2, E) as [receiver, sender], shifts (E, 3) int).

    `kernel`: 'fused' (the native cell list), 'reference' (all pairs) or 'auto' (fused when the library is
    loaded). Not TRANSIP_KERNEL: that picks a model's kernel, and both lists give the same edges.
    """
    if kernel not in native.KERNEL_CHOICES:
        raise ValueError(f"unknown neighbour-list kernel {kernel!r}: choose one of {', '.join(native.KERNEL_CHOICES)}")
    if native.resolve_kernel(kernel) == "fused":
        if cell is not None and pbc is not None and not bool(pbc.any()):
            cell = pbc = None  # a cell without periodic axes changes nothing
        return torch.ops.transip.neighbor_list(positions.detach(), cell, pbc, float(cutoff))
    return reference_neighbors(positions, cutoff, cell, pbc)


def reference_neighbors(positions: torch.Tensor, cutoff: float, cell: Optional[torch.Tensor] = None,
                        pbc: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """All-pairs neighbour list of one structure, same output as `structure_neighbors`. TorchScript-compatible,
    so that an artifact exported with the reference kernel needs no native library."""
    n = positions.shape[0]
    pos = positions.detach()
    wrap = torch.zeros(n, 3, dtype=pos.dtype, device=pos.device)
    images = torch.zeros(1, 3, dtype=torch.long, device=pos.device)
    offsets = torch.zeros(1, 3, dtype=pos.dtype, device=pos.device)
    if cell is not None and pbc is not None:
        if bool(pbc.any()):
            cell_d = cell.detach().to(pos.dtype)
            if abs(float(torch.linalg.det(cell_d))) < 1e-12:
                raise ValueError("periodic box has zero volume: cell vectors are degenerate")
            # Wrap atoms into the cell first (fractional coordinates in [0, 1) along periodic axes) so that
            # the image range below is enough; `wrap` is added back to the shifts at the end.
            frac = torch.linalg.solve(cell_d.T, pos.T).T
            wrap = torch.where(pbc[None, :], torch.floor(frac), torch.zeros_like(frac))
            pos = pos - wrap @ cell_d
            counts = _image_range(cell_d, pbc, cutoff)
            grids = torch.meshgrid([torch.arange(-c, c + 1, device=pos.device) for c in counts], indexing="ij")
            images = torch.stack(grids, dim=-1).reshape(-1, 3)
            offsets = images.to(pos.dtype) @ cell_d  # (S, 3)
    # displacement[s, i, j] = x_j + offset_s - x_i
    disp = pos[None, None, :, :] + offsets[:, None, None, :] - pos[None, :, None, :]
    dist2 = (disp * disp).sum(-1)
    mask = dist2 < cutoff * cutoff
    zero_image = (images == 0).all(dim=1)
    eye = torch.eye(n, dtype=torch.bool, device=pos.device)
    mask &= ~(zero_image[:, None, None] & eye[None])  # an atom is not its own neighbour in the home cell
    found = torch.nonzero(mask)
    s, i, j = found[:, 0], found[:, 1], found[:, 2]
    order = torch.argsort(i * (n * images.shape[0]) + j * images.shape[0] + s, stable=True)
    s, i, j = s[order], i[order], j[order]
    shifts = images[s] + (wrap[i] - wrap[j]).round().long()
    return torch.stack([i, j]), shifts


def batch_neighbors(positions: torch.Tensor, batch: torch.Tensor, num_structures: int, cutoff: float,
                    cell: Optional[torch.Tensor] = None, pbc: Optional[torch.Tensor] = None
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Neighbours of a batch of structures (atoms of structure b are contiguous, `batch` gives b)."""
    counts = torch.bincount(batch, minlength=num_structures).tolist()
    starts = [0]
    for c in counts[:-1]:
        starts.append(starts[-1] + c)
    edges, shifts = [], []
    for b in range(num_structures):
        sl = slice(starts[b], starts[b] + counts[b])
        e, s = structure_neighbors(positions[sl], cutoff, None if cell is None else cell[b],
                                   None if pbc is None else pbc[b])
        edges.append(e + starts[b])
        shifts.append(s)
    return torch.cat(edges, dim=1), torch.cat(shifts, dim=0)
