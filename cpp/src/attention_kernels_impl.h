// Kernel bodies, included by one .cpp per instruction set with TRANSIP_KERNEL_NAMESPACE set. The inner loops
// run over the contiguous H*D features of one edge with per-head scalars broadcast, which the compiler turns
// into full-width vector code; the loops over atoms are split between threads with at::parallel_for (OpenMP).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "attention_kernels.h"

namespace transip {
namespace TRANSIP_KERNEL_NAMESPACE {

namespace {

// Rows per task: enough work per task to amortise scheduling, small enough to balance uneven rows.
constexpr int64_t kGrainAtoms = 16;

template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t d = 0; d < n; ++d) sum += a[d] * b[d];
  return sum;
}

}  // namespace

template <typename T>
void attention_forward(const AttentionShape& shape, const AttentionInputs<T>& in,
                       const AttentionForwardOutputs<T>& result) {
  const int64_t H = shape.heads, D = shape.head_dim, HD = H * D;
  const T scale = T(1) / std::sqrt(T(D));
  at::parallel_for(0, shape.atoms, kGrainAtoms, [&](int64_t begin, int64_t end) {
    // Per-head softmax state of the current row, and the per-edge rescale factor c and weight w.
    std::vector<T> state(4 * H);
    T* m = state.data();
    T* z = m + H;
    T* c = z + H;
    T* w = c + H;
    for (int64_t i = begin; i < end; ++i) {
      T* acc = result.out + i * HD;
      std::fill(acc, acc + HD, T(0));
      std::fill(m, m + H, -std::numeric_limits<T>::infinity());
      std::fill(z, z + H, T(0));
      const T* qi = in.q + i * HD;
      for (int64_t e = in.row_ptr[i]; e < in.row_ptr[i + 1]; ++e) {
        const int64_t j = in.senders[e];
        const T* kj = in.k + j * HD;
        const T* vj = in.v + j * HD;
        const T env = in.envelope[e];
        for (int64_t h = 0; h < H; ++h) {
          const T s = dot(qi + h * D, kj + h * D, D) * scale + in.bias[e * H + h];
          // Online softmax: when a new maximum arrives, rescale what has been accumulated so far.
          if (s > m[h]) {
            c[h] = std::exp(m[h] - s);
            m[h] = s;
          } else {
            c[h] = T(1);
          }
          w[h] = env * std::exp(s - m[h]);
          z[h] = z[h] * c[h] + w[h];
        }
        for (int64_t h = 0; h < H; ++h) {
          T* a = acc + h * D;
          const T* vh = vj + h * D;
          const T ch = c[h], wh = w[h];
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) a[d] = a[d] * ch + wh * vh[d];
        }
      }
      for (int64_t h = 0; h < H; ++h) {
        const T inv = z[h] > T(0) ? T(1) / z[h] : T(0);
        T* a = acc + h * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) a[d] *= inv;
        result.row_max[i * H + h] = std::isfinite(m[h]) ? m[h] : T(0);  // empty row: no maximum
        result.row_sum[i * H + h] = z[h];
      }
    }
  });
}

template <typename T>
void attention_backward(const AttentionShape& shape, const AttentionInputs<T>& in,
                        const AttentionBackwardArgs<T>& args) {
  const int64_t H = shape.heads, D = shape.head_dim, HD = H * D;
  const T scale = T(1) / std::sqrt(T(D));

  // Pass 1, over receivers. With t_e = dL/dw_e = g_i . (v_j - out_i) / Z_i (or g_i . v_j when Z_i = 0,
  // where the reference path divides by 1):
  //   dL/d envelope_e = sum_h t_e exp(s_e - m_i),   dL/ds_e = t_e w_e,   dL/dq_i = sum_e dL/ds_e k_j / sqrt(D).
  at::parallel_for(0, shape.atoms, kGrainAtoms, [&](int64_t begin, int64_t end) {
    std::vector<T> state(3 * H);
    T* g_dot_out = state.data();
    T* inv_z = g_dot_out + H;
    T* coef = inv_z + H;
    for (int64_t i = begin; i < end; ++i) {
      const T* gi = args.grad_out + i * HD;
      const T* oi = args.out + i * HD;
      const T* qi = in.q + i * HD;
      const T* mi = args.row_max + i * H;
      T* gqi = args.grad_q + i * HD;
      std::fill(gqi, gqi + HD, T(0));
      for (int64_t h = 0; h < H; ++h) {
        const T zh = args.row_sum[i * H + h];
        inv_z[h] = zh > T(0) ? T(1) / zh : T(1);
        g_dot_out[h] = zh > T(0) ? dot(gi + h * D, oi + h * D, D) : T(0);
      }
      for (int64_t e = in.row_ptr[i]; e < in.row_ptr[i + 1]; ++e) {
        const int64_t j = in.senders[e];
        const T* kj = in.k + j * HD;
        const T* vj = in.v + j * HD;
        const T env = in.envelope[e];
        T grad_env = 0;
        for (int64_t h = 0; h < H; ++h) {
          const T s = dot(qi + h * D, kj + h * D, D) * scale + in.bias[e * H + h];
          const T p = std::exp(s - mi[h]);
          const T t = (dot(gi + h * D, vj + h * D, D) - g_dot_out[h]) * inv_z[h];
          const T w = env * p;
          const T ds = t * w;
          grad_env += t * p;
          args.grad_bias[e * H + h] = ds;
          args.edge_weight[e * H + h] = w * inv_z[h];
          coef[h] = ds * scale;
        }
        args.grad_envelope[e] = grad_env;
        for (int64_t h = 0; h < H; ++h) {
          T* g = gqi + h * D;
          const T* kh = kj + h * D;
          const T ch = coef[h];
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) g[d] += ch * kh[d];
        }
      }
    }
  });

  // Pass 2, over senders: dL/dk_j = sum_e dL/ds_e q_i / sqrt(D),  dL/dv_j = sum_e (w_e / Z_i) g_i.
  at::parallel_for(0, shape.atoms, kGrainAtoms, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      T* gkj = args.grad_k + j * HD;
      T* gvj = args.grad_v + j * HD;
      std::fill(gkj, gkj + HD, T(0));
      std::fill(gvj, gvj + HD, T(0));
      for (int64_t idx = args.sender_ptr[j]; idx < args.sender_ptr[j + 1]; ++idx) {
        const int64_t e = args.sender_perm[idx];
        const int64_t i = args.receivers[e];
        const T* qi = in.q + i * HD;
        const T* gi = args.grad_out + i * HD;
        for (int64_t h = 0; h < H; ++h) {
          const T cs = args.grad_bias[e * H + h] * scale;
          const T cw = args.edge_weight[e * H + h];
          T* gk = gkj + h * D;
          T* gv = gvj + h * D;
          const T* qh = qi + h * D;
          const T* gh = gi + h * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) {
            gk[d] += cs * qh[d];
            gv[d] += cw * gh[d];
          }
        }
      }
    }
  });
}

bool built_with_avx512() {
#ifdef TRANSIP_AVX512_BUILD
  return true;
#else
  return false;
#endif
}

template void attention_forward<float>(const AttentionShape&, const AttentionInputs<float>&,
                                       const AttentionForwardOutputs<float>&);
template void attention_forward<double>(const AttentionShape&, const AttentionInputs<double>&,
                                        const AttentionForwardOutputs<double>&);
template void attention_backward<float>(const AttentionShape&, const AttentionInputs<float>&,
                                        const AttentionBackwardArgs<float>&);
template void attention_backward<double>(const AttentionShape&, const AttentionInputs<double>&,
                                         const AttentionBackwardArgs<double>&);

}  // namespace TRANSIP_KERNEL_NAMESPACE
}  // namespace transip
