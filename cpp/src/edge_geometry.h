// The edges' displacements from positions, and forces from the energy's gradient along the edges: the two
// per-edge steps around the model in an engine's energy + forces call (transip/model.py derives them), as one
// pass each instead of ATen gathers and scatters (whose per-row overhead is the same in both precisions).
#pragma once

#include <ATen/ATen.h>

namespace transip {

// r_e = x_{senders[e]} - x_{receivers[e]} + shift_vectors[e], (E, 3); rounded as the reference's
// (x_s - x_r) + shift. Not differentiable: the model differentiates its energy with respect to r itself.
at::Tensor edge_vectors(const at::Tensor& positions, const at::Tensor& receivers, const at::Tensor& senders,
                        const at::Tensor& shift_vectors);

// F_i = sum_{e: receivers[e] = i} g_e - sum_{e: senders[e] = i} g_e, (num_atoms, 3): each atom's receiver terms in
// edge order, then its sender terms in edge order, the order of the reference's two index_add calls, so the
// results are bit for bit the same. Not differentiable (training's force loss goes through the reference).
at::Tensor edge_forces(const at::Tensor& g, const at::Tensor& receivers, const at::Tensor& senders,
                       int64_t num_atoms);

}  // namespace transip
