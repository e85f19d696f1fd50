// Cell-list neighbour list (linear in atoms) and CSR grouping, the native counterparts of
// transip/neighbors.py and of the CSR layout the fused attention reads.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace transip {

// Pairs (receiver i, sender j) with |x_j - x_i + shift @ cell| < cutoff, both directions, grouped by receiver
// and sorted by (sender, shift) within a row. Returns edge_index (2, E) int64 and integer shifts (E, 3) int64.
// `cell` (3, 3) rows are lattice vectors; `pbc` (3,) bool defaults to all true when a cell is given. Boxes
// thinner than the cutoff are handled exactly: every periodic image within the cutoff is listed.
std::tuple<at::Tensor, at::Tensor> neighbor_list(const at::Tensor& positions, const std::optional<at::Tensor>& cell,
                                                 const std::optional<at::Tensor>& pbc, double cutoff);

// Stable counting sort of `index` (values in [0, num_rows)): returns (perm, row_ptr) so that index[perm] is
// sorted and row r owns perm[row_ptr[r] .. row_ptr[r+1]-1]. Linear in the number of entries.
std::tuple<at::Tensor, at::Tensor> csr_order(const at::Tensor& index, int64_t num_rows);

}  // namespace transip
