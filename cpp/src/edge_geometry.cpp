#include "edge_geometry.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

namespace transip {

namespace {

void check_edges(const char* op, const at::Tensor& receivers, const at::Tensor& senders) {
  TORCH_CHECK(receivers.dim() == 1 && senders.dim() == 1 && receivers.size(0) == senders.size(0),
              "transip::", op, ": receivers and senders must be 1-D of one length, got ", receivers.sizes(), " and ",
              senders.sizes());
  TORCH_CHECK(receivers.scalar_type() == at::kLong && senders.scalar_type() == at::kLong, "transip::", op,
              ": receivers and senders must be int64, got ", receivers.scalar_type(), " and ", senders.scalar_type());
}

// Each edge's two atoms must be in [0, num_atoms): checked once per edge beside the work, named on failure.
inline void check_atom(const char* op, const char* role, int64_t atom, int64_t edge, int64_t num_atoms) {
  TORCH_CHECK(atom >= 0 && atom < num_atoms, "transip::", op, ": ", role, "[", edge, "] = ", atom,
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
  AT_DISPATCH_FLOATING_TYPES(positions.scalar_type(), "edge_vectors", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* sp = shift.data_ptr<scalar_t>();
    const int64_t* rp = r.data_ptr<int64_t>();
    const int64_t* snd = s.data_ptr<int64_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, num_edges, kGrainEdges, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) {
        check_atom("edge_vectors", "receivers", rp[e], e, num_atoms);
        check_atom("edge_vectors", "senders", snd[e], e, num_atoms);
        for (int a = 0; a < 3; ++a) op[3 * e + a] = (xp[3 * snd[e] + a] - xp[3 * rp[e] + a]) + sp[3 * e + a];
      }
    });
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
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "edge_forces", [&] {
    const scalar_t* gp = gc.data_ptr<scalar_t>();
    const int64_t* rp = r.data_ptr<int64_t>();
    const int64_t* sp = s.data_ptr<int64_t>();
    scalar_t* f = forces.data_ptr<scalar_t>();
    // Serial: every atom's sum must run in edge order (a few nanoseconds per edge; the model's work per edge is
    // thousands of times more).
    for (int64_t e = 0; e < num_edges; ++e) {
      check_atom("edge_forces", "receivers", rp[e], e, num_atoms);
      for (int a = 0; a < 3; ++a) f[3 * rp[e] + a] += gp[3 * e + a];
    }
    for (int64_t e = 0; e < num_edges; ++e) {
      check_atom("edge_forces", "senders", sp[e], e, num_atoms);
      for (int a = 0; a < 3; ++a) f[3 * sp[e] + a] -= gp[3 * e + a];
    }
  });
  return forces;
}

}  // namespace transip
