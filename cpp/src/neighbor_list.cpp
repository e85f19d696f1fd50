// Cell-list neighbour list. Atoms are binned in fractional coordinates of the lattice (or of the Cartesian
// axes when nothing is periodic); each bin is at least one cutoff thick along the normal of its lattice
// planes, so neighbours lie in bins within a small offset range. For periodic axes an offset that leaves the
// box wraps to a bin on the other side and carries a lattice image, and when the box is thinner than the
// cutoff the offset range spans several images: every (bin, image) pair is visited once, so no pair is
// listed twice and none is missed. Each bin's candidates are listed once, in the order rows need, for all its
// atoms; each atom's row is then a distance pass and a compaction (within_cutoff, kernels.h).
#include "neighbor_list.h"

#include "kernels.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

namespace transip {

namespace {

using Vec3 = std::array<double, 3>;
using Mat3 = std::array<Vec3, 3>;

Vec3 cross(const Vec3& a, const Vec3& b) {
  return {a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]};
}
double dot3(const Vec3& a, const Vec3& b) { return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]; }
double norm3(const Vec3& a) { return std::sqrt(dot3(a, a)); }

// Inverse of a matrix whose rows are lattice vectors: rows of the result's transpose are reciprocal vectors.
Mat3 inverse(const Mat3& m, double det) {
  Mat3 inv;
  const Vec3 c0 = cross(m[1], m[2]), c1 = cross(m[2], m[0]), c2 = cross(m[0], m[1]);
  for (int r = 0; r < 3; ++r) {
    inv[r][0] = c0[r] / det;
    inv[r][1] = c1[r] / det;
    inv[r][2] = c2[r] / det;
  }
  return inv;
}

int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> neighbor_list(const at::Tensor& positions, const std::optional<at::Tensor>& cell,
                                                 const std::optional<at::Tensor>& pbc, double cutoff) {
  TORCH_CHECK(positions.dim() == 2 && positions.size(1) == 3,
              "transip::neighbor_list: positions must have shape (N, 3), got ", positions.sizes());
  TORCH_CHECK(positions.is_floating_point(), "transip::neighbor_list: positions must be floating point, got ",
              positions.scalar_type());
  TORCH_CHECK(std::isfinite(cutoff) && cutoff > 0, "transip::neighbor_list: cutoff must be positive and finite, got ",
              cutoff);
  const int64_t n = positions.size(0);
  const at::Tensor pos_t = positions.detach().to(at::kCPU, at::kDouble).contiguous();
  TORCH_CHECK(n == 0 || at::isfinite(pos_t).all().item<bool>(),
              "transip::neighbor_list: positions contain NaN or infinite values");
  const double* pos = pos_t.data_ptr<double>();

  std::array<bool, 3> periodic{false, false, false};
  Mat3 lattice{{{1, 0, 0}, {0, 1, 0}, {0, 0, 1}}};
  if (cell.has_value()) {
    TORCH_CHECK(cell->dim() == 2 && cell->size(0) == 3 && cell->size(1) == 3,
                "transip::neighbor_list: cell must have shape (3, 3) with lattice vectors as rows, got ", cell->sizes());
    periodic = {true, true, true};
    if (pbc.has_value()) {
      TORCH_CHECK(pbc->numel() == 3, "transip::neighbor_list: pbc must have 3 entries, got ", pbc->numel());
      const at::Tensor p = pbc->to(at::kCPU, at::kBool).contiguous();
      for (int a = 0; a < 3; ++a) periodic[a] = p.data_ptr<bool>()[a];
    }
  } else {
    TORCH_CHECK(!pbc.has_value() || !pbc->to(at::kBool).any().item<bool>(),
                "transip::neighbor_list: pbc is set but no cell was given");
  }
  const bool any_periodic = periodic[0] || periodic[1] || periodic[2];
  if (any_periodic) {
    const at::Tensor c = cell->detach().to(at::kCPU, at::kDouble).contiguous();
    TORCH_CHECK(at::isfinite(c).all().item<bool>(), "transip::neighbor_list: cell contains NaN or infinite values");
    for (int r = 0; r < 3; ++r)
      for (int a = 0; a < 3; ++a) lattice[r][a] = c.data_ptr<double>()[3 * r + a];
  }
  const double det = dot3(lattice[0], cross(lattice[1], lattice[2]));
  TORCH_CHECK(std::abs(det) > 1e-12, "transip::neighbor_list: periodic box has zero volume: cell vectors are degenerate");
  const Mat3 inv = inverse(lattice, det);
  // Thickness of the box along each lattice direction: the distance between opposite faces.
  Vec3 spacing;
  for (int a = 0; a < 3; ++a) spacing[a] = std::abs(det) / norm3(cross(lattice[(a + 1) % 3], lattice[(a + 2) % 3]));

  // Fractional coordinates; periodic axes wrapped into [0, 1) (the wrap is folded into the shifts at the end).
  std::vector<double> frac(3 * n), wrapped(3 * n);
  std::vector<int64_t> wrap(3 * n, 0);
  Vec3 lo{0, 0, 0}, width{1, 1, 1};
  for (int a = 0; a < 3; ++a) {
    double mn = 0, mx = 0;
    for (int64_t i = 0; i < n; ++i) {
      double f = pos[3 * i] * inv[0][a] + pos[3 * i + 1] * inv[1][a] + pos[3 * i + 2] * inv[2][a];
      if (periodic[a]) {
        const double w = std::floor(f);
        wrap[3 * i + a] = static_cast<int64_t>(w);
        f -= w;
        if (f >= 1.0) f = 0.0;  // -1e-17 wraps to 1 - 1e-17, which rounds to 1
      }
      frac[3 * i + a] = f;
      mn = i == 0 ? f : std::min(mn, f);
      mx = i == 0 ? f : std::max(mx, f);
    }
    if (!periodic[a]) {
      lo[a] = mn;
      width[a] = mx - mn;
    }
  }
  for (int64_t i = 0; i < n; ++i)
    for (int a = 0; a < 3; ++a) {
      double x = pos[3 * i + a];
      for (int r = 0; r < 3; ++r) x -= static_cast<double>(wrap[3 * i + r]) * lattice[r][a];
      wrapped[3 * i + a] = x;
    }

  // Bins at least one cutoff thick; at most about 2N + 8 of them so that a sparse gas does not allocate a
  // huge empty grid.
  std::array<int64_t, 3> bins, range;
  for (int a = 0; a < 3; ++a)
    bins[a] = std::max<int64_t>(1, static_cast<int64_t>(std::min(1e6, std::floor(width[a] * spacing[a] / cutoff))));
  const int64_t max_bins = 2 * n + 8;
  while (bins[0] * bins[1] * bins[2] > max_bins) {
    const int a = static_cast<int>(std::max_element(bins.begin(), bins.end()) - bins.begin());
    bins[a] = std::max<int64_t>(1, bins[a] / 2);
  }
  int64_t images = 1;
  for (int a = 0; a < 3; ++a) {
    const double bin_length = width[a] * spacing[a] / static_cast<double>(bins[a]);
    range[a] = periodic[a] ? static_cast<int64_t>(std::ceil(cutoff / bin_length)) : 1;
    images *= 2 * range[a] + 1;
  }
  TORCH_CHECK(images <= 1000000, "transip::neighbor_list: the periodic box (thickness ", spacing[0], ", ", spacing[1],
              ", ", spacing[2], " A) is far thinner than the cutoff ", cutoff, " A: ", images,
              " bin offsets would be needed");

  std::vector<int64_t> bin_of(n);
  for (int64_t i = 0; i < n; ++i) {
    int64_t b = 0;
    for (int a = 0; a < 3; ++a) {
      const double u = width[a] > 0 ? (frac[3 * i + a] - lo[a]) / width[a] : 0.0;
      const int64_t ba = std::clamp<int64_t>(static_cast<int64_t>(u * static_cast<double>(bins[a])), 0, bins[a] - 1);
      b = b * bins[a] + ba;
    }
    bin_of[i] = b;
  }
  const int64_t num_bins = bins[0] * bins[1] * bins[2];

  // Each home bin's candidates, built once for all its atoms: every atom j of every (target bin, image) pair
  // within the offset range, listed in order of (j, image), with x_j + image shift precomputed per axis. An atom's
  // row is then one vectorised distance pass over its bin's list followed by a branch-free compaction, already
  // in the row's order (sender, shift): no per-atom walk over the offsets and no per-row sort (the two took most
  // of the list's time). Candidates over all bins: (number of offsets) x atoms.
  std::vector<std::array<int64_t, 3>> offsets;
  for (int64_t o0 = -range[0]; o0 <= range[0]; ++o0)
    for (int64_t o1 = -range[1]; o1 <= range[1]; ++o1)
      for (int64_t o2 = -range[2]; o2 <= range[2]; ++o2) offsets.push_back({o0, o1, o2});
  const int64_t num_offsets = static_cast<int64_t>(offsets.size());
  // Per (target bin, offset): the home bin that reaches the target through the offset (-1 when that home would
  // lie outside a non-periodic axis) and the lattice image the target then carries, integer and Cartesian.
  struct Reach {
    int64_t home;
    std::array<int64_t, 3> image;
    Vec3 shift;
  };
  std::vector<Reach> reach(num_bins * num_offsets);
  for (int64_t t = 0; t < num_bins; ++t) {
    std::array<int64_t, 3> target;
    for (int64_t a = 2, rest = t; a >= 0; --a) {
      target[a] = rest % bins[a];
      rest /= bins[a];
    }
    for (int64_t k = 0; k < num_offsets; ++k) {
      Reach& r = reach[t * num_offsets + k];
      r.home = 0;
      r.shift = {0, 0, 0};
      for (int a = 0; a < 3; ++a) {
        const int64_t h = target[a] - offsets[k][a];
        const int64_t wrapped_h = periodic[a] ? h - floor_div(h, bins[a]) * bins[a] : h;
        if (!periodic[a] && (h < 0 || h >= bins[a])) r.home = -1;
        r.image[a] = periodic[a] ? floor_div(wrapped_h + offsets[k][a], bins[a]) : 0;
        if (r.home >= 0) r.home = r.home * bins[a] + wrapped_h;
      }
      for (int q = 0; q < 3; ++q)
        for (int a = 0; a < 3; ++a) r.shift[a] += static_cast<double>(r.image[q]) * lattice[q][a];
    }
  }
  // The lists are filled by a pass over j in increasing order, each j appended to the list of every home bin
  // that reaches its bin, so each list comes out sorted by j; offsets are visited in increasing order, and for
  // one (home, target) pair the image grows with the offset, so one j's images follow in increasing order too.
  // The pass runs in parallel over contiguous ranges of j: a first sweep counts each range's entries per home
  // bin, so that every range writes its own consecutive slots of every list (a stable counting sort).
  const int64_t num_ranges = std::max<int64_t>(1, std::min<int64_t>(n, at::get_num_threads()));
  std::vector<int64_t> range_fill(num_ranges * num_bins, 0);  // per (range, home bin): entries, then first slot
  at::parallel_for(0, num_ranges, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      int64_t* count = range_fill.data() + p * num_bins;
      for (int64_t j = p * n / num_ranges; j < (p + 1) * n / num_ranges; ++j)
        for (const Reach* r = &reach[bin_of[j] * num_offsets]; r != &reach[(bin_of[j] + 1) * num_offsets]; ++r)
          if (r->home >= 0) ++count[r->home];
    }
  });
  std::vector<int64_t> list_ptr(num_bins + 1, 0);
  for (int64_t b = 0, slot = 0; b < num_bins; ++b) {
    list_ptr[b] = slot;
    for (int64_t p = 0; p < num_ranges; ++p) {
      const int64_t count = range_fill[p * num_bins + b];
      range_fill[p * num_bins + b] = slot;
      slot += count;
    }
    list_ptr[b + 1] = slot;
  }
  const int64_t num_candidates = list_ptr[num_bins];
  std::vector<double> cand_x(num_candidates), cand_y(num_candidates), cand_z(num_candidates);
  std::vector<int64_t> cand_sender(num_candidates);
  std::vector<std::array<int64_t, 3>> cand_shift(num_candidates);  // image - wrap_j: the row's shift is wrap_i + this
  at::parallel_for(0, num_ranges, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      int64_t* fill = range_fill.data() + p * num_bins;
      for (int64_t j = p * n / num_ranges; j < (p + 1) * n / num_ranges; ++j) {
        const double* xj = &wrapped[3 * j];
        for (const Reach* r = &reach[bin_of[j] * num_offsets]; r != &reach[(bin_of[j] + 1) * num_offsets]; ++r) {
          if (r->home < 0) continue;
          const int64_t c = fill[r->home]++;
          cand_x[c] = xj[0] + r->shift[0];
          cand_y[c] = xj[1] + r->shift[1];
          cand_z[c] = xj[2] + r->shift[2];
          cand_sender[c] = j;
          cand_shift[c] = {r->image[0] - wrap[3 * j], r->image[1] - wrap[3 * j + 1], r->image[2] - wrap[3 * j + 2]};
        }
      }
    }
  });

  const double cutoff2 = cutoff * cutoff;
  const int64_t num_chunks = std::max<int64_t>(1, std::min<int64_t>(n, 4 * at::get_num_threads()));
  std::vector<std::vector<int64_t>> chunk_receivers(num_chunks), chunk_senders(num_chunks), chunk_shifts(num_chunks);
  const auto within_cutoff = use_avx512() ? avx512::within_cutoff : generic::within_cutoff;
  at::parallel_for(0, num_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    std::vector<int64_t> kept;
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      auto& receivers_out = chunk_receivers[chunk];
      auto& senders_out = chunk_senders[chunk];
      auto& shifts_out = chunk_shifts[chunk];
      for (int64_t i = chunk * n / num_chunks; i < (chunk + 1) * n / num_chunks; ++i) {
        const int64_t first = list_ptr[bin_of[i]], count = list_ptr[bin_of[i] + 1] - first;
        if (static_cast<int64_t>(kept.size()) < count) kept.resize(count);
        const int64_t m = within_cutoff(cand_x.data() + first, cand_y.data() + first, cand_z.data() + first, count,
                                        &wrapped[3 * i], cutoff2, kept.data());
        const std::array<int64_t, 3> wrap_i{wrap[3 * i], wrap[3 * i + 1], wrap[3 * i + 2]};
        for (int64_t k = 0; k < m; ++k) {
          const int64_t c = first + kept[k], j = cand_sender[c];
          const std::array<int64_t, 3> shift{wrap_i[0] + cand_shift[c][0], wrap_i[1] + cand_shift[c][1],
                                             wrap_i[2] + cand_shift[c][2]};
          if (j == i && shift[0] == 0 && shift[1] == 0 && shift[2] == 0) continue;  // an atom is not its own neighbour
          receivers_out.push_back(i);
          senders_out.push_back(j);
          shifts_out.insert(shifts_out.end(), shift.begin(), shift.end());
        }
      }
    }
  });

  int64_t num_edges = 0;
  std::vector<int64_t> chunk_start(num_chunks);
  for (int64_t c = 0; c < num_chunks; ++c) {
    chunk_start[c] = num_edges;
    num_edges += static_cast<int64_t>(chunk_senders[c].size());
  }
  at::Tensor edge_index = at::empty({2, num_edges}, at::kLong);
  at::Tensor shifts = at::empty({num_edges, 3}, at::kLong);
  int64_t* recv_out = edge_index.data_ptr<int64_t>();
  int64_t* send_out = recv_out + num_edges;
  int64_t* shift_out = shifts.data_ptr<int64_t>();
  at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      std::copy(chunk_receivers[c].begin(), chunk_receivers[c].end(), recv_out + chunk_start[c]);
      std::copy(chunk_senders[c].begin(), chunk_senders[c].end(), send_out + chunk_start[c]);
      std::copy(chunk_shifts[c].begin(), chunk_shifts[c].end(), shift_out + 3 * chunk_start[c]);
    }
  });
  return {edge_index, shifts};
}

std::tuple<at::Tensor, at::Tensor> csr_order(const at::Tensor& index, int64_t num_rows) {
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kLong,
              "transip::csr_order: index must be a 1-D int64 tensor, got ", index.scalar_type(), " of shape ",
              index.sizes());
  TORCH_CHECK(num_rows >= 0, "transip::csr_order: num_rows must be non-negative, got ", num_rows);
  const at::Tensor idx_t = index.to(at::kCPU).contiguous();
  const int64_t* idx = idx_t.data_ptr<int64_t>();
  const int64_t m = idx_t.numel();
  at::Tensor row_ptr = at::zeros({num_rows + 1}, at::kLong);
  at::Tensor perm = at::empty({m}, at::kLong);
  int64_t* ptr = row_ptr.data_ptr<int64_t>();
  int64_t* out = perm.data_ptr<int64_t>();
  for (int64_t e = 0; e < m; ++e) {
    TORCH_CHECK(idx[e] >= 0 && idx[e] < num_rows, "transip::csr_order: index ", idx[e], " at position ", e,
                " is outside [0, ", num_rows, ")");
    ++ptr[idx[e] + 1];
  }
  for (int64_t r = 0; r < num_rows; ++r) ptr[r + 1] += ptr[r];
  std::vector<int64_t> fill(ptr, ptr + num_rows);
  for (int64_t e = 0; e < m; ++e) out[fill[idx[e]]++] = e;
  return {perm.to(index.device()), row_ptr.to(index.device())};
}

}  // namespace transip
