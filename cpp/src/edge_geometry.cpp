#include "edge_geometry.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace transip {

namespace {

void check_edges(const char* op, const at::Tensor& receivers, const at::Tensor& senders) {
  TORCH_CHECK(receivers.dim() == 1 && senders.dim() == 1 && receivers.size(0) == senders.size(0),
              "transip::", op, ": receivers and senders must be 1-D of one length, got ", receivers.sizes(), " and ",
              senders.sizes());
  TORCH_CHECK(receivers.scalar_type() == at::kLong && senders.scalar_type() == at::kLong, "transip::", op,
              ": receivers and senders must be int64, got ", receivers.scalar_type(), " and ", senders.scalar_type());
}

// Every entry of an edge list's receivers or senders must be in [0, num_atoms). The loops read each index
// through `clamped`, which keeps every access inside the arrays and notes any index outside; after the loop
// `check_atoms` names the first offender. (A check with a message per edge inside the loops made them several
// times slower; this costs a compare and a conditional move.)
inline int64_t clamped(int64_t atom, uint64_t last, uint64_t& outside) {
  const uint64_t a = static_cast<uint64_t>(atom);
  outside |= static_cast<uint64_t>(a > last);
  return static_cast<int64_t>(a > last ? last : a);
}

void check_atoms(const char* op, const char* role, const int64_t* atoms, int64_t num_edges, int64_t num_atoms) {
  for (int64_t e = 0; e < num_edges; ++e)
    TORCH_CHECK(atoms[e] >= 0 && atoms[e] < num_atoms, "transip::", op, ": ", role, "[", e, "] = ", atoms[e],
                " is outside [0, ", num_atoms, ")");
}

constexpr int64_t kGrainEdges = 4096;

}  // namespace

at::Tensor edge_vectors(const at::Tensor& positions, const at::Tensor& receivers, const at::Tensor& senders,
                        const at::Tensor& shift_vectors) {
  check_edges("edge_vectors", receivers, senders);
  const int64_t num_edges = receivers.size(0), num_atoms = positions.size(0);
  TORCH_CHECK(positions.dim() == 2 && positions.size(1) == 3,
              "transip::edge_vectors: positions must have shape (N, 3), got ", positions.sizes());
  TORCH_CHECK(shift_vectors.dim() == 2 && shift_vectors.size(0) == num_edges && shift_vectors.size(1) == 3,
              "transip::edge_vectors: shift_vectors must have shape (edges, 3) = (", num_edges, ", 3), got ",
              shift_vectors.sizes());
  TORCH_CHECK(positions.scalar_type() == shift_vectors.scalar_type() && positions.is_floating_point(),
              "transip::edge_vectors: positions and shift_vectors must share one floating type, got ",
              positions.scalar_type(), " and ", shift_vectors.scalar_type());
  const at::Tensor x = positions.contiguous(), shift = shift_vectors.contiguous();
  const at::Tensor r = receivers.contiguous(), s = senders.contiguous();
  at::Tensor out = at::empty({num_edges, 3}, positions.options());
  if (num_atoms == 0) check_atoms("edge_vectors", "receivers", r.data_ptr<int64_t>(), num_edges, num_atoms);
  const uint64_t last = static_cast<uint64_t>(std::max<int64_t>(num_atoms, 1) - 1);
  AT_DISPATCH_FLOATING_TYPES(positions.scalar_type(), "edge_vectors", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* sp = shift.data_ptr<scalar_t>();
    const int64_t* rp = r.data_ptr<int64_t>();
    const int64_t* snd = s.data_ptr<int64_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    std::atomic<bool> any_outside{false};
    at::parallel_for(0, num_edges, kGrainEdges, [&](int64_t begin, int64_t end) {
      uint64_t outside = 0;
      for (int64_t e = begin; e < end; ++e) {
        const int64_t r_e = clamped(rp[e], last, outside), s_e = clamped(snd[e], last, outside);
        for (int a = 0; a < 3; ++a) op[3 * e + a] = (xp[3 * s_e + a] - xp[3 * r_e + a]) + sp[3 * e + a];
      }
      if (outside) any_outside = true;
    });
    if (any_outside) {
      check_atoms("edge_vectors", "receivers", rp, num_edges, num_atoms);
      check_atoms("edge_vectors", "senders", snd, num_edges, num_atoms);
    }
  });
  return out;
}

at::Tensor edge_forces(const at::Tensor& g, const at::Tensor& receivers, const at::Tensor& senders,
                       int64_t num_atoms) {
  check_edges("edge_forces", receivers, senders);
  const int64_t num_edges = receivers.size(0);
  TORCH_CHECK(g.dim() == 2 && g.size(0) == num_edges && g.size(1) == 3,
              "transip::edge_forces: g must have shape (edges, 3) = (", num_edges, ", 3), got ", g.sizes());
  TORCH_CHECK(g.is_floating_point(), "transip::edge_forces: g must be floating point, got ", g.scalar_type());
  TORCH_CHECK(num_atoms >= 0, "transip::edge_forces: num_atoms must be non-negative, got ", num_atoms);
  const at::Tensor gc = g.contiguous(), r = receivers.contiguous(), s = senders.contiguous();
  at::Tensor forces = at::zeros({num_atoms, 3}, g.options());
  if (num_atoms == 0) check_atoms("edge_forces", "receivers", r.data_ptr<int64_t>(), num_edges, num_atoms);
  const uint64_t last = static_cast<uint64_t>(std::max<int64_t>(num_atoms, 1) - 1);
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "edge_forces", [&] {
    const scalar_t* gp = gc.data_ptr<scalar_t>();
    const int64_t* rp = r.data_ptr<int64_t>();
    const int64_t* sp = s.data_ptr<int64_t>();
    scalar_t* f = forces.data_ptr<scalar_t>();
    // Serial: every atom's sum must run in edge order (a few nanoseconds per edge; the model's work per edge is
    // thousands of times more). Consecutive edges of one atom (a receiver's whole row, in a CSR list) are summed in
    // registers and stored once per run: the same additions in the same order as one read-modify-write per edge,
    // without every add waiting on the store before it.
    uint64_t outside = 0;
    const auto add_all = [&](const int64_t* atoms, scalar_t sign) {
      int64_t current = -1;
      scalar_t acc[3] = {0, 0, 0};
      for (int64_t e = 0; e < num_edges; ++e) {
        const int64_t i = clamped(atoms[e], last, outside);
        if (i != current) {
          if (current >= 0)
            for (int a = 0; a < 3; ++a) f[3 * current + a] = acc[a];
          current = i;
          for (int a = 0; a < 3; ++a) acc[a] = f[3 * i + a];
        }
        for (int a = 0; a < 3; ++a) acc[a] += sign * gp[3 * e + a];
      }
      if (current >= 0)
        for (int a = 0; a < 3; ++a) f[3 * current + a] = acc[a];
    };
    add_all(rp, scalar_t(1));
    add_all(sp, scalar_t(-1));
    if (outside) {
      check_atoms("edge_forces", "receivers", rp, num_edges, num_atoms);
      check_atoms("edge_forces", "senders", sp, num_edges, num_atoms);
    }
  });
  return forces;
}

}  // namespace transip
