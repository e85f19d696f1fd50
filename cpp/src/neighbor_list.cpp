// Cell-list neighbour list. Atoms are binned in fractional coordinates of the lattice (or of the Cartesian
// axes when nothing is periodic); each bin is at least one cutoff thick along the normal of its lattice
// planes, so neighbours lie in bins within a small offset range. For periodic axes an offset that leaves the
// box wraps to a bin on the other side and carries a lattice image, and when the box is thinner than the
// cutoff the offset range spans several images: every (bin, image) pair is visited once, so no pair is
// listed twice and none is missed.
#include "neighbor_list.h"

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

struct Edge {
  int64_t sender;
  std::array<int64_t, 3> shift;
};

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
  auto [bin_perm_t, bin_ptr_t] = csr_order(at::from_blob(bin_of.data(), {n}, at::kLong), num_bins);
  const int64_t* bin_perm = bin_perm_t.data_ptr<int64_t>();
  const int64_t* bin_ptr = bin_ptr_t.data_ptr<int64_t>();

  // The wrapped positions in bin order, one array per axis: each bin's candidates are then one contiguous run
  // whose distances vectorise, instead of a gather through bin_perm per candidate (the list's main cost).
  std::vector<double> binned(3 * n);
  for (int64_t idx = 0; idx < n; ++idx)
    for (int a = 0; a < 3; ++a) binned[a * n + idx] = wrapped[3 * bin_perm[idx] + a];
  const double* bx = binned.data();
  const double* by = bx + n;
  const double* bz = by + n;

  const double cutoff2 = cutoff * cutoff;
  const int64_t num_chunks = std::max<int64_t>(1, std::min<int64_t>(n, 4 * at::get_num_threads()));
  std::vector<std::vector<int64_t>> chunk_receivers(num_chunks), chunk_senders(num_chunks), chunk_shifts(num_chunks);
  at::parallel_for(0, num_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    std::vector<Edge> row;
    std::vector<double> distance2;
    std::vector<int64_t> order;
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      auto& receivers_out = chunk_receivers[chunk];
      auto& senders_out = chunk_senders[chunk];
      auto& shifts_out = chunk_shifts[chunk];
      for (int64_t i = chunk * n / num_chunks; i < (chunk + 1) * n / num_chunks; ++i) {
        row.clear();
        std::array<int64_t, 3> home;
        int64_t b = bin_of[i];
        for (int a = 2; a >= 0; --a) {
          home[a] = b % bins[a];
          b /= bins[a];
        }
        const double* xi = &wrapped[3 * i];
        for (int64_t o0 = -range[0]; o0 <= range[0]; ++o0)
          for (int64_t o1 = -range[1]; o1 <= range[1]; ++o1)
            for (int64_t o2 = -range[2]; o2 <= range[2]; ++o2) {
              const std::array<int64_t, 3> offset{o0, o1, o2};
              std::array<int64_t, 3> target, image;
              bool inside = true;
              for (int a = 0; a < 3; ++a) {
                const int64_t t = home[a] + offset[a];
                if (periodic[a]) {
                  image[a] = floor_div(t, bins[a]);
                  target[a] = t - image[a] * bins[a];
                } else {
                  inside = inside && t >= 0 && t < bins[a];
                  image[a] = 0;
                  target[a] = t;
                }
              }
              if (!inside) continue;
              Vec3 shift_cart{0, 0, 0};
              for (int r = 0; r < 3; ++r)
                for (int a = 0; a < 3; ++a) shift_cart[a] += static_cast<double>(image[r]) * lattice[r][a];
              const bool home_image = image[0] == 0 && image[1] == 0 && image[2] == 0;
              const int64_t t = (target[0] * bins[1] + target[1]) * bins[2] + target[2];
              const int64_t first = bin_ptr[t], count = bin_ptr[t + 1] - first;
              if (static_cast<int64_t>(distance2.size()) < count) distance2.resize(count);
              double* d2 = distance2.data();
#pragma omp simd
              for (int64_t c = 0; c < count; ++c) {
                // (x_j + shift) - x_i, in this order: the same rounding, so the same pairs at the cutoff, as before.
                const double dx = bx[first + c] + shift_cart[0] - xi[0], dy = by[first + c] + shift_cart[1] - xi[1],
                             dz = bz[first + c] + shift_cart[2] - xi[2];
                d2[c] = dx * dx + dy * dy + dz * dz;
              }
              for (int64_t c = 0; c < count; ++c) {
                if (!(d2[c] < cutoff2)) continue;
                const int64_t j = bin_perm[first + c];
                if (home_image && j == i) continue;
                row.push_back({j, {image[0] + wrap[3 * i] - wrap[3 * j], image[1] + wrap[3 * i + 1] - wrap[3 * j + 1],
                                   image[2] + wrap[3 * i + 2] - wrap[3 * j + 2]}});
              }
            }
        // Sorted by (sender, shift): sort one integer key per edge, sender * m + position (m edges in the row),
        // then order the rare runs of one sender (several images of it) by shift; cheaper than moving the 32-byte
        // edges themselves through the sort (perf showed that sort in the list's profile).
        const int64_t m = static_cast<int64_t>(row.size());
        order.resize(m);
        for (int64_t c = 0; c < m; ++c) order[c] = row[c].sender * m + c;
        std::sort(order.begin(), order.end());
        for (int64_t start = 0, stop; start < m; start = stop) {
          for (stop = start + 1; stop < m && order[stop] / m == order[start] / m;) ++stop;
          if (stop - start > 1)
            std::sort(order.begin() + start, order.begin() + stop,
                      [&](int64_t a, int64_t b) { return row[a % m].shift < row[b % m].shift; });
        }
        for (const int64_t key : order) {
          const Edge& e = row[key % m];
          receivers_out.push_back(i);
          senders_out.push_back(e.sender);
          shifts_out.insert(shifts_out.end(), e.shift.begin(), e.shift.end());
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
