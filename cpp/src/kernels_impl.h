// Kernel bodies, included by one .cpp per instruction set with TRANSIP_KERNEL_NAMESPACE set. The inner loops
// run over the contiguous H*D features of one edge with per-head scalars broadcast, which the compiler turns
// into full-width vector code; the loops over atoms are split between threads with at::parallel_for (OpenMP).
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "kernels.h"

#ifdef TRANSIP_AVX512_BUILD
#include <immintrin.h>
#endif

namespace transip {
namespace TRANSIP_KERNEL_NAMESPACE {

namespace {

// Rows per task: enough work per task to amortise scheduling, small enough to balance uneven rows.
constexpr int64_t kGrainAtoms = 16;

// One 512-bit vector's worth of lanes per partial sum, then a tree over the lanes. `omp simd reduction` on a
// short runtime-length loop compiled, for float, to scalar multiply-adds followed by sixteen serial adds from the
// stack (found with perf: the float32 attention was slower than the float64 one). The remainder (fewer than a
// vector's lanes: all of a 12-wide head in float) is one masked step, not a serial chain of scalar adds.
template <typename T>
inline T dot(const T* __restrict a, const T* __restrict b, int64_t n) {
  constexpr int kLanes = 64 / sizeof(T);
  alignas(64) T acc[kLanes];
#pragma omp simd
  for (int l = 0; l < kLanes; ++l) acc[l] = T(0);
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) acc[l] += a[d + l] * b[d + l];
  }
  const int64_t left = n - d;
#pragma omp simd
  for (int l = 0; l < kLanes; ++l) acc[l] += l < left ? a[d + l] * b[d + l] : T(0);
  for (int width = kLanes / 2; width > 0; width /= 2) {
#pragma omp simd
    for (int l = 0; l < width; ++l) acc[l] += acc[l + width];
  }
  return acc[0];
}

#ifdef TRANSIP_AVX512_BUILD
// The 512-bit vector of a type: its lanes, and loads of up to a vector's worth (a masked load for the tail).
template <typename T>
struct Vec512;

template <>
struct Vec512<float> {
  using type = __m512;
  static constexpr int64_t kLanes = 16;
  static type zero() { return _mm512_setzero_ps(); }
  static type load(const float* p, int64_t left) {
    return left >= kLanes ? _mm512_loadu_ps(p)
                          : _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << left) - 1u), p);
  }
  static void store(float* p, type v, int64_t left) {
    if (left >= kLanes)
      _mm512_storeu_ps(p, v);
    else
      _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << left) - 1u), v);
  }
  static type broadcast(float a) { return _mm512_set1_ps(a); }
  using index = int32_t;  // lane indices of permute
  static type permute(const index* lanes, type v) { return _mm512_permutexvar_ps(_mm512_loadu_si512(lanes), v); }
  static type add(type a, type b) { return _mm512_add_ps(a, b); }
  static type mul(type a, type b) { return _mm512_mul_ps(a, b); }
  static type fma(type a, type b, type c) { return _mm512_fmadd_ps(a, b, c); }
  static type lane(type v, int lane) { return _mm512_permutexvar_ps(_mm512_set1_epi32(lane), v); }  // broadcast
};

template <>
struct Vec512<double> {
  using type = __m512d;
  static constexpr int64_t kLanes = 8;
  static type zero() { return _mm512_setzero_pd(); }
  static type load(const double* p, int64_t left) {
    return left >= kLanes ? _mm512_loadu_pd(p) : _mm512_maskz_loadu_pd(static_cast<__mmask8>((1u << left) - 1u), p);
  }
  static void store(double* p, type v, int64_t left) {
    if (left >= kLanes)
      _mm512_storeu_pd(p, v);
    else
      _mm512_mask_storeu_pd(p, static_cast<__mmask8>((1u << left) - 1u), v);
  }
  static type broadcast(double a) { return _mm512_set1_pd(a); }
  using index = int64_t;
  static type permute(const index* lanes, type v) { return _mm512_permutexvar_pd(_mm512_loadu_si512(lanes), v); }
  static type add(type a, type b) { return _mm512_add_pd(a, b); }
  static type mul(type a, type b) { return _mm512_mul_pd(a, b); }
  static type fma(type a, type b, type c) { return _mm512_fmadd_pd(a, b, c); }
  static type lane(type v, int lane) { return _mm512_permutexvar_pd(_mm512_set1_epi64(lane), v); }
};

// One vector of lane-wise partial sums of a . b (n any length; the tail is a masked step).
template <typename T>
inline typename Vec512<T>::type lane_products(const T* a, const T* b, int64_t n) {
  using V = Vec512<T>;
  typename V::type acc = V::zero();
  for (int64_t d = 0; d < n; d += V::kLanes) acc = V::fma(V::load(a + d, n - d), V::load(b + d, n - d), acc);
  return acc;
}

// The lane sums of four vectors, out[k] = sum of v_k's lanes, through one shuffle network: two rounds that
// fold 128-bit quarters of two vectors into one (each add serves two or four vectors at once), then the last
// lanes within each quarter.
inline void sum_lanes4(__m512 v0, __m512 v1, __m512 v2, __m512 v3, float* out) {
  const __m512 v01 = _mm512_add_ps(_mm512_shuffle_f32x4(v0, v1, 0x44), _mm512_shuffle_f32x4(v0, v1, 0xEE));
  const __m512 v23 = _mm512_add_ps(_mm512_shuffle_f32x4(v2, v3, 0x44), _mm512_shuffle_f32x4(v2, v3, 0xEE));
  // Quarter k now holds four partial sums of v_k.
  __m512 c = _mm512_add_ps(_mm512_shuffle_f32x4(v01, v23, 0x88), _mm512_shuffle_f32x4(v01, v23, 0xDD));
  c = _mm512_add_ps(c, _mm512_shuffle_ps(c, c, _MM_SHUFFLE(2, 3, 0, 1)));
  c = _mm512_add_ps(c, _mm512_shuffle_ps(c, c, _MM_SHUFFLE(1, 0, 3, 2)));
  const __m512 firsts = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), c);
  _mm_storeu_ps(out, _mm512_castps512_ps128(firsts));
}

inline void sum_lanes4(__m512d v0, __m512d v1, __m512d v2, __m512d v3, double* out) {
  const __m512d v01 = _mm512_add_pd(_mm512_shuffle_f64x2(v0, v1, 0x44), _mm512_shuffle_f64x2(v0, v1, 0xEE));
  const __m512d v23 = _mm512_add_pd(_mm512_shuffle_f64x2(v2, v3, 0x44), _mm512_shuffle_f64x2(v2, v3, 0xEE));
  // Quarter k now holds two partial sums of v_k.
  __m512d c = _mm512_add_pd(_mm512_shuffle_f64x2(v01, v23, 0x88), _mm512_shuffle_f64x2(v01, v23, 0xDD));
  c = _mm512_add_pd(c, _mm512_permute_pd(c, 0x55));
  const __m512d firsts = _mm512_permutexvar_pd(_mm512_setr_epi64(0, 2, 4, 6, 0, 0, 0, 0), c);
  _mm256_storeu_pd(out, _mm512_castpd512_pd256(firsts));
}
#endif

// out[h] = a_h . b_h with a_h = a + h stride_a, b_h = b + h stride_b (stride 0: the same vector for every head),
// each n long: the per-head dot products of one edge. With AVX-512 the heads' partial-sum vectors are reduced
// four at a time (sum_lanes4): a short dot's cost is mostly its reduction tree, not its multiply-adds.
template <typename T>
inline void head_dots(const T* a, int64_t stride_a, const T* b, int64_t stride_b, int64_t heads, int64_t n, T* out) {
  int64_t h = 0;
#ifdef TRANSIP_AVX512_BUILD
  for (; h + 4 <= heads; h += 4) {
    const T* ah = a + h * stride_a;
    const T* bh = b + h * stride_b;
    sum_lanes4(lane_products(ah, bh, n), lane_products(ah + stride_a, bh + stride_b, n),
               lane_products(ah + 2 * stride_a, bh + 2 * stride_b, n),
               lane_products(ah + 3 * stride_a, bh + 3 * stride_b, n), out + h);
  }
#endif
  for (; h < heads; ++h) out[h] = dot(a + h * stride_a, b + h * stride_b, n);
}

// out[h] = a_h . b_h + c_h . d_h (n and m long, strides as in head_dots): where only the sum of two per-head dot
// products is used (a score and its tangent, g . v_j and g . u_e), their partial-sum vectors are added before the
// one reduction, which costs the same in either precision while the products halve in float.
template <typename T>
inline void head_dot_sums(const T* a, int64_t stride_a, const T* b, int64_t stride_b, int64_t n, const T* c,
                          int64_t stride_c, const T* d, int64_t stride_d, int64_t m, int64_t heads, T* out) {
  int64_t h = 0;
#ifdef TRANSIP_AVX512_BUILD
  using V = Vec512<T>;
  const auto both = [&](int64_t k) {
    return V::add(lane_products(a + k * stride_a, b + k * stride_b, n),
                  lane_products(c + k * stride_c, d + k * stride_d, m));
  };
  for (; h + 4 <= heads; h += 4) sum_lanes4(both(h), both(h + 1), both(h + 2), both(h + 3), out + h);
#endif
  for (; h < heads; ++h)
    out[h] = dot(a + h * stride_a, b + h * stride_b, n) + (m > 0 ? dot(c + h * stride_c, d + h * stride_d, m) : T(0));
}

// y[0..n) += a x[0..n), for the short runtime lengths of the attention (a head's D = 12, the value width):
// whole vectors and one masked step. The compiler's own loop for these did, in float, eight lanes and then a
// scalar remainder (perf), so float32 gained nothing over float64 there.
template <typename T>
inline void axpy(T* __restrict y, T a, const T* __restrict x, int64_t n) {
#ifdef TRANSIP_AVX512_BUILD
  using V = Vec512<T>;
  const auto va = V::broadcast(a);
  for (int64_t d = 0; d < n; d += V::kLanes)
    V::store(y + d, V::fma(va, V::load(x + d, n - d), V::load(y + d, n - d)), n - d);
#else
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) y[d] += a * x[d];
#endif
}

// dst[0..n) = src[0..n) for the short runtime lengths copied per edge (a head, an edge's features, a tile row):
// whole vectors and one masked step. std::copy calls memmove there, whose fixed cost per call (the same in either
// precision) showed in perf beside the float32 attention and edge encoder.
template <typename T>
inline void copy_short(const T* __restrict src, int64_t n, T* __restrict dst) {
#ifdef TRANSIP_AVX512_BUILD
  using V = Vec512<T>;
  for (int64_t d = 0; d < n; d += V::kLanes) V::store(dst + d, V::load(src + d, n - d), n - d);
#else
  std::copy(src, src + n, dst);
#endif
}

// y[0..n) = sum_h c[h] x[h * stride + .], each vector summed in a register and stored once: one edge's gradient
// of its values from every head's part of the row's grad_out. (It replaces a sum into a local accumulator, which
// loaded and stored each vector once per head, and a copy of that accumulator out.)
template <typename T>
inline void combine_heads(T* __restrict y, const T* __restrict c, const T* __restrict x, int64_t stride,
                          int64_t heads, int64_t n) {
#ifdef TRANSIP_AVX512_BUILD
  using V = Vec512<T>;
  for (int64_t d = 0; d < n; d += V::kLanes) {
    auto acc = V::zero();
    for (int64_t h = 0; h < heads; ++h) acc = V::fma(V::broadcast(c[h]), V::load(x + h * stride + d, n - d), acc);
    V::store(y + d, acc, n - d);
  }
#else
  std::fill(y, y + n, T(0));
  for (int64_t h = 0; h < heads; ++h) axpy(y, c[h], x + h * stride, n);
#endif
}

// y[h * padded(n) + .] += c[h] x[0..n) for every head h: one edge's value row into every head's local padded
// accumulator, each vector of x loaded once for all heads (axpy per head loaded it once per head).
template <typename T>
inline void add_to_heads(T* __restrict y, const T* __restrict c, const T* __restrict x, int64_t heads, int64_t n,
                         int64_t padded_n) {
#ifdef TRANSIP_AVX512_BUILD
  using V = Vec512<T>;
  for (int64_t d = 0; d < n; d += V::kLanes) {
    const auto xd = V::load(x + d, n - d);
    for (int64_t h = 0; h < heads; ++h) {
      T* yd = y + h * padded_n + d;
      V::store(yd, V::fma(V::broadcast(c[h]), xd, V::load(yd, V::kLanes)), V::kLanes);
    }
  }
#else
  for (int64_t h = 0; h < heads; ++h) axpy(y + h * padded_n, c[h], x, n);
#endif
}

// n rounded up to whole 512-bit vectors of T: the size of a local accumulator that is only ever loaded and stored
// whole (HeadRow, add_to_heads). A masked store that the next edge's load of the same accumulator reads cannot be
// forwarded to it: the load waits for the store to retire, and perf showed the attention rows waiting there.
template <typename T>
inline int64_t padded(int64_t n) {
  constexpr int64_t kLanes = 64 / sizeof(T);
  return (n + kLanes - 1) / kLanes * kLanes;
}

// y[d] += c[head of d] x[d] over one row of heads x head_dim values stored head after head (q, k, v and their
// gradients), y a local accumulator of padded(heads * head_dim) values. With AVX-512 (and heads no more than a
// vector's lanes) the row goes in whole vectors that span heads, each lane's coefficient picked from c by one
// permutation: three vectors for four 12-wide heads in float, six in double, where a step per head is one
// partly masked vector in either. When a head is whole vectors (16-wide heads in float) each vector's coefficient
// is one head's, broadcast, and the permutation is skipped. The other builds step per head.
// kH, kD > 0: the heads and head width as compile-time constants (AttentionDims).
template <typename T, int kH = 0, int kD = 0>
class HeadRow {
 public:
  HeadRow(int64_t heads, int64_t head_dim) : heads_(kH > 0 ? kH : heads), head_dim_(kD > 0 ? kD : head_dim) {
#ifdef TRANSIP_AVX512_BUILD
    if (heads <= Vec512<T>::kLanes) {
      lane_heads_.resize(padded<T>(heads * head_dim));
      for (size_t d = 0; d < lane_heads_.size(); ++d)  // padding lanes: any head (x is 0 there)
        lane_heads_[d] = static_cast<typename Vec512<T>::index>(std::min<int64_t>(d / head_dim, heads - 1));
    }
#endif
  }
  int64_t size() const { return padded<T>(heads() * head_dim()); }
  int64_t heads() const { return kH > 0 ? kH : heads_; }
  int64_t head_dim() const { return kD > 0 ? kD : head_dim_; }
  // y += c[head] x, and y += c[head] x + c2[head] x2 with y loaded and stored once for both terms.
  __attribute__((always_inline)) inline void add(T* __restrict y, const T* c, const T* x) const {
    add_terms<1>(y, {c, nullptr}, {x, nullptr});
  }
  __attribute__((always_inline)) inline void add2(T* __restrict y, const T* c, const T* x, const T* c2,
                                                  const T* x2) const {
    add_terms<2>(y, {c, c2}, {x, x2});
  }

 private:
  // Always inlined, as add and add2: called per edge, and as calls (GCC's choice) they showed in perf as
  // functions of their own.
  template <int kTerms>
  __attribute__((always_inline)) inline void add_terms(T* __restrict y, std::array<const T*, 2> c,
                                                       std::array<const T*, 2> x) const {
    const int64_t n = heads() * head_dim();
#ifdef TRANSIP_AVX512_BUILD
    using V = Vec512<T>;
    if (head_dim() % V::kLanes == 0) {  // every vector lies in one head: its coefficient is a broadcast
      for (int64_t h = 0; h < heads(); ++h) {
        typename V::type coefficient[kTerms];
        for (int k = 0; k < kTerms; ++k) coefficient[k] = V::broadcast(c[k][h]);
        for (int64_t d = h * head_dim(); d < (h + 1) * head_dim(); d += V::kLanes) {
          auto acc = V::load(y + d, V::kLanes);
          for (int k = 0; k < kTerms; ++k) acc = V::fma(coefficient[k], V::load(x[k] + d, V::kLanes), acc);
          V::store(y + d, acc, V::kLanes);
        }
      }
      return;
    }
    if (!lane_heads_.empty()) {
      typename V::type coefficients[kTerms];
      for (int k = 0; k < kTerms; ++k) coefficients[k] = V::load(c[k], heads());
      for (int64_t d = 0; d < n; d += V::kLanes) {
        auto acc = V::load(y + d, V::kLanes);
        for (int k = 0; k < kTerms; ++k)
          acc = V::fma(V::permute(lane_heads_.data() + d, coefficients[k]), V::load(x[k] + d, n - d), acc);
        V::store(y + d, acc, V::kLanes);
      }
      return;
    }
#endif
    for (int k = 0; k < kTerms; ++k)
      for (int64_t h = 0; h < heads(); ++h) axpy(y + h * head_dim(), c[k][h], x[k] + h * head_dim(), head_dim());
  }

  int64_t heads_, head_dim_;
#ifdef TRANSIP_AVX512_BUILD
  std::vector<typename Vec512<T>::index> lane_heads_;
#endif
};

// exp(x) below this argument counts as zero: there exp(x) times a number of relative size epsilon would be
// denormal (under the type's smallest normal number), and every operation on a denormal takes the CPU's slow
// path. exp_array gives 0 there (-71 for float, -672 for double); transip/analytic.py (exp_floor) uses the same
// floors, so the Python radial basis and the kernels agree.
template <typename T>
const T kExpFloor =
    static_cast<T>(std::ceil(std::log(std::numeric_limits<T>::min() / std::numeric_limits<T>::epsilon())));

// y = exp(x) for an array, written as plain arithmetic so that the compiler vectorises it (std::exp is a scalar
// library call). Range reduction x = n ln2 + r with |r| <= ln2 / 2, a degree-13 Taylor polynomial for exp(r)
// (truncation error below 2e-16 relative), and 2^n assembled in the exponent bits; computed in double.
// Arguments below kExpFloor give 0, above 709 are clamped (never reached here).
template <typename T>
void exp_array(const T* x, T* y, int64_t n) {
  constexpr double log2e = 1.4426950408889634, ln2_hi = 0.6931471803691238, ln2_lo = 1.9082149292705877e-10;
  const double floor = kExpFloor<T>;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const double xi = std::min(std::max(static_cast<double>(x[i]), floor), 709.0);
    const double k = std::nearbyint(xi * log2e);
    const double r = (xi - k * ln2_hi) - k * ln2_lo;
    double p = 1.0 / 6227020800.0;  // 1/13!
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    const int64_t bits = (static_cast<int64_t>(k) + 1023) << 52;
    double scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    y[i] = static_cast<T>(x[i] < floor ? 0.0 : p * scale);
  }
}

// The float32 version, in float throughout: mixing in doubles halves the vector width and (measured) made the
// float32 kernels slower than the float64 ones. Same scheme with float's constants: ln 2 split in two (its high
// part has few mantissa bits, so k * ln2_hi is exact), a degree-7 Taylor polynomial (truncation below 3e-9
// relative for |r| <= ln2 / 2, under float's rounding), 2^k in float's exponent bits. Arguments below
// kExpFloor give 0, above 88 are clamped (never reached here).
template <>
void exp_array<float>(const float* x, float* y, int64_t n) {
  constexpr float log2e = 1.44269504f, ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
  const float floor = kExpFloor<float>;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    // Ternaries, not std::min/max: those take references to constants, which kept this loop from vectorising.
    const float xi = x[i] < floor ? floor : (x[i] > 88.0f ? 88.0f : x[i]);
    const float k = std::nearbyint(xi * log2e);
    const float r = (xi - k * ln2_hi) - k * ln2_lo;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    y[i] = x[i] < floor ? 0.0f : p * scale;
  }
}

}  // namespace

// The attention's sizes: heads H, head width D and edge-value width F, each a compile-time constant when its
// template argument is set (kH, kD > 0; kF >= 0), else read from the shape. With constants every per-edge loop
// over a head or a row has a known trip count and mask, so it compiles to straight-line vector code: the loop
// control and mask arithmetic of runtime lengths took much of the float32 backward's samples in perf, a fixed
// cost per edge that kept float32 from gaining over float64. Each kernel's lambdas read the sizes from
// here rather than capturing them, so that they see the constants.
template <int kH, int kD, int kF>
struct AttentionDims {
  explicit AttentionDims(const AttentionShape& shape)
      : heads_(shape.heads), head_dim_(shape.head_dim), value_width_(shape.value_width) {}
  int64_t H() const { return kH > 0 ? kH : heads_; }
  int64_t D() const { return kD > 0 ? kD : head_dim_; }
  int64_t F() const { return kF >= 0 ? kF : value_width_; }

 private:
  int64_t heads_, head_dim_, value_width_;
};

// Runs run(kH, kD, kF) (std::integral_constant each) with the sizes of the models this project trains as
// constants (four heads of 12 or 16 values, edge values of 0 or 19: 3 + 16 radial functions); any other shape
// runs with (0, 0, -1): sizes read at run time.
template <typename Run>
void with_attention_dims(const AttentionShape& shape, Run run) {
  using std::integral_constant;
  if (shape.heads == 4 && (shape.value_width == 0 || shape.value_width == 19)) {
    const bool values = shape.value_width == 19;
    if (shape.head_dim == 12)
      return values ? run(integral_constant<int, 4>{}, integral_constant<int, 12>{}, integral_constant<int, 19>{})
                    : run(integral_constant<int, 4>{}, integral_constant<int, 12>{}, integral_constant<int, 0>{});
    if (shape.head_dim == 16)
      return values ? run(integral_constant<int, 4>{}, integral_constant<int, 16>{}, integral_constant<int, 19>{})
                    : run(integral_constant<int, 4>{}, integral_constant<int, 16>{}, integral_constant<int, 0>{});
  }
  run(integral_constant<int, 0>{}, integral_constant<int, 0>{}, integral_constant<int, -1>{});
}

// Where row i's values start in a per-edge array that also holds the self edges (row_exp): the row's first edge,
// shifted by the self edges of the rows before it.
template <typename T>
inline int64_t row_start_with_self(const AttentionInputs<T>& in, int64_t i) {
  return in.row_ptr[i] + (in.self_bias != nullptr ? i : 0);
}

// Scores of one row, (self edge first when there is one) x heads: s = q_i . k_j / sqrt(D) + bias.
template <typename T, int kH, int kD>
int64_t row_scores(const AttentionInputs<T>& in, int64_t i, int64_t heads, int64_t head_dim, T scale,
                   std::vector<T>& s) {
  const int64_t H = kH > 0 ? kH : heads, D = kD > 0 ? kD : head_dim;
  const int64_t HD = H * D, self = in.self_bias != nullptr ? 1 : 0;
  const int64_t e0 = in.row_ptr[i], count = self + in.row_ptr[i + 1] - e0;
  if (static_cast<int64_t>(s.size()) < count * H) s.resize(count * H);
  const T* qi = in.q + i * HD;
  for (int64_t x = 0; x < count; ++x) {
    const bool is_self = x < self;
    const T* kj = in.k + (is_self ? i : in.senders[e0 + x - self]) * HD;
    const T* bias = is_self ? in.self_bias : in.bias + (e0 + x - self) * H;
    T* sx = s.data() + x * H;
    head_dots(qi, D, kj, D, H, D, sx);
    for (int64_t h = 0; h < H; ++h) sx[h] = sx[h] * scale + bias[h];
  }
  return count;
}

#ifdef TRANSIP_AVX512_BUILD
// Whether the attention's per-row and per-sender sums run in registers (RowSumRegisters): the sizes are
// constants (AttentionDims) and the heads fit in one vector's lanes.
template <typename T, int kH, int kD>
constexpr bool kSumsInRegisters = kH > 0 && kD > 0 && kH <= Vec512<T>::kLanes;

// sum_e c_e[head of d] x_e[d] over one row of heads x head_dim values (q, k, v and their gradients), kept in
// registers across a row's edges and stored once; c_e is one vector of per-head coefficients, from which each
// lane's coefficient is permuted (HeadRow does the same sums in a memory accumulator).
template <typename T, int kH, int kD>
class RowSumRegisters {
  using V = Vec512<T>;
  static constexpr int64_t L = V::kLanes, HD = kH * kD, NV = (HD + L - 1) / L;

 public:
  RowSumRegisters() {
    for (int64_t k = 0; k < NV; ++k) sum_[k] = V::zero();
  }
  __attribute__((always_inline)) inline void add(typename V::type c, const T* x) {
    for (int64_t k = 0; k < NV; ++k)
      sum_[k] = V::fma(V::permute(head_of_lane().data() + k * L, c), V::load(x + k * L, HD - k * L), sum_[k]);
  }
  void store(T* out, int64_t size = HD) const {  // the HD values, or the padded accumulator's whole vectors
    for (int64_t k = 0; k < NV; ++k) V::store(out + k * L, sum_[k], size - k * L);
  }

 private:
  static const std::array<typename V::index, NV * L>& head_of_lane() {
    static const std::array<typename V::index, NV * L> lanes = [] {
      std::array<typename V::index, NV * L> a{};
      for (int64_t d = 0; d < NV * L; ++d) a[d] = static_cast<typename V::index>(std::min<int64_t>(d / kD, kH - 1));
      return a;
    }();
    return lanes;
  }
  typename V::type sum_[NV];
};

// The forward's weighted sums over one row when the sizes are constants (AttentionDims) and the heads fit in one
// vector: the row's sum of v (heads x head_dim, in whole vectors spanning heads), of the edge values (one padded
// run per head) and the normalisers stay in registers over all the row's edges and are stored once, into the same
// padded accumulators the general loop fills. Each edge's weights w = envelope x exp(s - m) are one vector, from
// which every coefficient is permuted. (The general loop keeps the sums in memory: a load and a store of every
// accumulator vector per edge, and the weights, written as scalars and read back as a vector, wait on a failed
// store-to-load forward; both cost the same in either precision.) The same products and sums in the same order.
template <typename T, int kH, int kD, int kF>
void row_sums_in_registers(const AttentionInputs<T>& in, int64_t i, int64_t e0, int64_t count, int64_t self,
                           const T* p, T* acc_v, T* acc_u, T* z) {
  using V = Vec512<T>;
  constexpr int64_t L = V::kLanes, HD = kH * kD, NF = (kF + L - 1) / L, Fp = NF * L;
  RowSumRegisters<T, kH, kD> sum_v;
  typename V::type sum_u[kH][NF > 0 ? NF : 1], sum_w = V::zero();
  for (int64_t h = 0; h < kH; ++h)
    for (int64_t f = 0; f < NF; ++f) sum_u[h][f] = V::zero();
  for (int64_t x = 0; x < count; ++x) {
    const bool is_self = x < self;
    const T* vj = in.v + (is_self ? i : in.senders[e0 + x - self]) * HD;
    const T env = is_self ? T(1) : in.envelope[e0 + x - self];
    const auto w = V::mul(V::broadcast(env), V::load(p + x * kH, kH));  // lanes past the heads are 0
    sum_w = V::add(sum_w, w);
    sum_v.add(w, vj);
    if constexpr (kF > 0) {
      const T* u = is_self ? in.self_values : in.edge_values + (e0 + x - self) * kF;
      typename V::type w_head[kH];
      for (int h = 0; h < kH; ++h) w_head[h] = V::lane(w, h);
      for (int64_t f = 0; f < NF; ++f) {
        const auto uf = V::load(u + f * L, kF - f * L);
        for (int h = 0; h < kH; ++h) sum_u[h][f] = V::fma(w_head[h], uf, sum_u[h][f]);
      }
    }
  }
  sum_v.store(acc_v, padded<T>(HD));
  for (int64_t h = 0; h < kH; ++h)
    for (int64_t f = 0; f < NF; ++f) V::store(acc_u + h * Fp + f * L, sum_u[h][f], L);
  V::store(z, sum_w, kH);
}
#endif

template <typename T, int kH, int kD, int kF>
void attention_forward_impl(const AttentionShape& shape, const AttentionInputs<T>& in,
                            const AttentionForwardOutputs<T>& result) {
  const AttentionDims<kH, kD, kF> dims(shape);  // out holds W = D + F per head
  const int64_t self = in.self_bias != nullptr ? 1 : 0;
  const T scale = T(1) / std::sqrt(T(dims.D()));
  const HeadRow<T, kH, kD> head_row(dims.H(), dims.D());
  at::parallel_for(0, shape.atoms, kGrainAtoms, [&](int64_t begin, int64_t end) {
    const int64_t H = dims.H(), D = dims.D(), HD = H * D, F = dims.F(), W = D + F, HW = H * W, Fp = padded<T>(F);
    // Two passes over each row instead of an online softmax: all scores first, then the row maximum, then
    // every exp at once (vectorised), so the accumulator is never rescaled. The row's sums of v and of the
    // edge values are kept in local padded accumulators (HeadRow, add_to_heads) and written to `out` once.
    std::vector<T> p, state(3 * H), acc_v(head_row.size()), acc_u(H * Fp);
    T* m = state.data();
    T* z = m + H;
    T* w = z + H;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t count = row_scores<T, kH, kD>(in, i, H, D, scale, p), e0 = in.row_ptr[i];
      T* __restrict scores = p.data();  // (restrict: m is not in p, so the maximum stays in a register)
      for (int64_t h = 0; h < H; ++h) {
        T mh = -std::numeric_limits<T>::infinity();
        for (int64_t x = 0; x < count; ++x) mh = std::max(mh, scores[x * H + h]);
        m[h] = mh;
      }
      for (int64_t x = 0; x < count; ++x)
        for (int64_t h = 0; h < H; ++h) scores[x * H + h] -= m[h];
      exp_array(p.data(), p.data(), count * H);
      copy_short(p.data(), count * H, result.row_exp + row_start_with_self(in, i) * H);
#ifdef TRANSIP_AVX512_BUILD
      if constexpr (kSumsInRegisters<T, kH, kD> && kF >= 0) {
        row_sums_in_registers<T, kH, kD, kF>(in, i, e0, count, self, p.data(), acc_v.data(), acc_u.data(), z);
      } else
#endif
      {
        std::fill(acc_v.begin(), acc_v.end(), T(0));
        std::fill(acc_u.begin(), acc_u.end(), T(0));
        std::fill(z, z + H, T(0));
        for (int64_t x = 0; x < count; ++x) {
          const bool is_self = x < self;
          const T* vj = in.v + (is_self ? i : in.senders[e0 + x - self]) * HD;
          const T* u = F == 0 ? nullptr : is_self ? in.self_values : in.edge_values + (e0 + x - self) * F;
          const T env = is_self ? T(1) : in.envelope[e0 + x - self];
          for (int64_t h = 0; h < H; ++h) {
            w[h] = env * p[x * H + h];
            z[h] += w[h];
          }
          head_row.add(acc_v.data(), w, vj);
          if (F > 0) add_to_heads(acc_u.data(), w, u, H, F, Fp);
        }
      }
      T* out = result.out + i * HW;
      for (int64_t h = 0; h < H; ++h) {
        const T inv = z[h] > T(0) ? T(1) / z[h] : T(0);
        for (int64_t d = 0; d < D; ++d) out[h * W + d] = acc_v[h * D + d] * inv;
        for (int64_t f = 0; f < F; ++f) out[h * W + D + f] = acc_u[h * Fp + f] * inv;
        result.row_sum[i * H + h] = z[h];
      }
    }
  });
}

#ifdef TRANSIP_AVX512_BUILD
// The backward's pass over senders for sender j when the sizes are constants, as row_sums_in_registers does the
// forward's rows: dL/dk_j and dL/dv_j summed in registers over j's edges (its self edge first) and written once,
// each edge's coefficients one vector. Same products and sums in the same order as the general loop.
template <typename T, int kH, int kD>
void sender_sums_in_registers(const AttentionInputs<T>& in, const AttentionBackwardArgs<T>& args, int64_t j, T scale,
                              const T* grad_out_v) {
  using V = Vec512<T>;
  constexpr int64_t HD = kH * kD;
  RowSumRegisters<T, kH, kD> sum_k, sum_v;
  const auto scale_v = V::broadcast(scale);
  const auto add = [&](int64_t i, const T* ds, const T* weight) {
    sum_k.add(V::mul(V::load(ds, kH), scale_v), in.q + i * HD);
    sum_v.add(V::load(weight, kH), grad_out_v + i * HD);
  };
  if (in.self_bias != nullptr) add(j, args.self_grad + j * kH, args.self_weight + j * kH);
  for (int64_t idx = args.sender_ptr[j]; idx < args.sender_ptr[j + 1]; ++idx) {
    const int64_t e = args.sender_perm[idx];
    add(args.receivers[e], args.grad_bias + e * kH, args.edge_weight + e * kH);
  }
  sum_k.store(args.grad_k + j * HD);
  sum_v.store(args.grad_v + j * HD);
}
#endif

template <typename T, int kH, int kD, int kF>
void attention_backward_impl(const AttentionShape& shape, const AttentionInputs<T>& in,
                             const AttentionBackwardArgs<T>& args) {
  const AttentionDims<kH, kD, kF> dims(shape);  // out and grad_out hold W = D + F per head
  const int64_t self = in.self_bias != nullptr ? 1 : 0;
  const T scale = T(1) / std::sqrt(T(dims.D()));
  const HeadRow<T, kH, kD> head_row(dims.H(), dims.D());
  // grad_out's v part, (atoms, H * D) head after head as v itself, for pass 2's whole-row HeadRow sums.
  std::vector<T> grad_out_v(shape.atoms * dims.H() * dims.D());

  // Pass 1, over receivers. With t_e = dL/dw_e = g_i . ([v_j, u_e] - out_i) / Z_i (or g_i . [v_j, u_e] when
  // Z_i = 0, where the reference path divides by 1):
  //   dL/d envelope_e = sum_h t_e exp(s_e - m_i),   dL/ds_e = t_e w_e,   dL/dq_i = sum_e dL/ds_e k_j / sqrt(D),
  //   dL/du_e = sum_h (w_e / Z_i) g_i[D:]  (each edge belongs to one row: no two threads write it).
  at::parallel_for(0, shape.atoms, kGrainAtoms, [&](int64_t begin, int64_t end) {
    const int64_t H = dims.H(), D = dims.D(), HD = H * D, F = dims.F(), W = D + F, HW = H * W;
    std::vector<T> t, state(5 * H);  // per row: t, (self edge first) x heads
    std::vector<T> gq(head_row.size());  // local accumulator (HeadRow)
    T* g_dot_out = state.data();
    T* inv_z = g_dot_out + H;
    T* g_dot_value = inv_z + H;
    T* q_coefficient = g_dot_value + H;
    T* u_coefficient = q_coefficient + H;
    for (int64_t i = begin; i < end; ++i) {
      const T* gi = args.grad_out + i * HW;
      const T* oi = args.out + i * HW;
      std::fill(gq.begin(), gq.end(), T(0));
      for (int64_t h = 0; h < H; ++h) {
        const T zh = args.row_sum[i * H + h];
        inv_z[h] = zh > T(0) ? T(1) / zh : T(1);
        g_dot_out[h] = zh > T(0) ? dot(gi + h * W, oi + h * W, W) : T(0);
        copy_short(gi + h * W, D, grad_out_v.data() + i * HD + h * D);
      }
      const int64_t e0 = in.row_ptr[i], count = self + in.row_ptr[i + 1] - e0;
      const T* p = args.row_exp + row_start_with_self(in, i) * H;  // exp(s - m), as the forward left it
      if (static_cast<int64_t>(t.size()) < count * H) t.resize(count * H);
#ifdef TRANSIP_AVX512_BUILD
      // dL/dq_i in registers over the row when the sizes allow (RowSumRegisters), else in gq (HeadRow).
      std::conditional_t<kSumsInRegisters<T, kH, kD>, RowSumRegisters<T, kH, kD>, char> sum_q{};
#endif
      for (int64_t x = 0; x < count; ++x) {
        const T* vj = in.v + (x < self ? i : in.senders[e0 + x - self]) * HD;
        const T* u = F == 0 ? nullptr : x < self ? in.self_values : in.edge_values + (e0 + x - self) * F;
        head_dot_sums(gi, W, vj, D, D, gi + D, W, u, 0, F, H, g_dot_value);  // g . [v_j, u_e] per head
        for (int64_t h = 0; h < H; ++h) t[x * H + h] = (g_dot_value[h] - g_dot_out[h]) * inv_z[h];
      }
      for (int64_t x = 0; x < count; ++x) {
        const bool is_self = x < self;
        const int64_t e = e0 + x - self;
        const T* kj = in.k + (is_self ? i : in.senders[e]) * HD;
        const T env = is_self ? T(1) : in.envelope[e];
        T grad_env = 0;
        for (int64_t h = 0; h < H; ++h) {
          const T ph = p[x * H + h], th = t[x * H + h], ds = th * env * ph;
          if (is_self) {  // the self edge: its k_i, v_i gradients are added in pass 2
            args.self_grad[i * H + h] = ds;
            args.self_weight[i * H + h] = ph * inv_z[h];
          } else {
            grad_env += th * ph;
            args.grad_bias[e * H + h] = ds;
            args.edge_weight[e * H + h] = env * ph * inv_z[h];
          }
          q_coefficient[h] = ds * scale;
          u_coefficient[h] = env * ph * inv_z[h];  // w_e / Z_i (0 where Z_i = 0: then ph is 0 too)
        }
#ifdef TRANSIP_AVX512_BUILD
        if constexpr (kSumsInRegisters<T, kH, kD>) {  // the same products as q_coefficient, as one vector
          using V = Vec512<T>;
          sum_q.add(V::mul(V::mul(V::mul(V::load(t.data() + x * kH, kH), V::broadcast(env)), V::load(p + x * kH, kH)),
                           V::broadcast(scale)),
                    kj);
        } else
#endif
          head_row.add(gq.data(), q_coefficient, kj);
        if (F > 0)
          combine_heads(is_self ? args.self_values_grad + i * F : args.grad_edge_values + e * F, u_coefficient,
                        gi + D, W, H, F);
        if (!is_self) args.grad_envelope[e] = grad_env;
      }
#ifdef TRANSIP_AVX512_BUILD
      if constexpr (kSumsInRegisters<T, kH, kD>)
        sum_q.store(args.grad_q + i * HD);
      else
#endif
        copy_short(gq.data(), HD, args.grad_q + i * HD);
    }
  });

  // Pass 2, over senders: dL/dk_j = sum_e dL/ds_e q_i / sqrt(D),  dL/dv_j = sum_e (w_e / Z_i) g_i.
  at::parallel_for(0, shape.atoms, kGrainAtoms, [&](int64_t begin, int64_t end) {
    const int64_t H = dims.H(), HD = H * dims.D();
    std::vector<T> gk(head_row.size()), gv(head_row.size()), k_coefficient(H);
    const auto add = [&](int64_t i, const T* ds, const T* weight) {
      for (int64_t h = 0; h < H; ++h) k_coefficient[h] = ds[h] * scale;
      head_row.add(gk.data(), k_coefficient.data(), in.q + i * HD);
      head_row.add(gv.data(), weight, grad_out_v.data() + i * HD);
    };
    for (int64_t j = begin; j < end; ++j) {
#ifdef TRANSIP_AVX512_BUILD
      if constexpr (kSumsInRegisters<T, kH, kD>) {
        sender_sums_in_registers<T, kH, kD>(in, args, j, scale, grad_out_v.data());
        continue;
      }
#endif
      std::fill(gk.begin(), gk.end(), T(0));
      std::fill(gv.begin(), gv.end(), T(0));
      if (in.self_bias != nullptr) add(j, args.self_grad + j * H, args.self_weight + j * H);
      for (int64_t idx = args.sender_ptr[j]; idx < args.sender_ptr[j + 1]; ++idx) {
        const int64_t e = args.sender_perm[idx];
        add(args.receivers[e], args.grad_bias + e * H, args.edge_weight + e * H);
      }
      copy_short(gk.data(), HD, args.grad_k + j * HD);
      copy_short(gv.data(), HD, args.grad_v + j * HD);
    }
  });
}

// Double backward (kernels.h): the forward's and the backward's directional derivatives along the cotangents,
// per row i and head h, with V_e = [v_j, u_e]:
//   a_e = exp(s_e - m), p_e = env_e a_e, Z = sum p, w = p / Z, o = sum w V             (the forward)
//   delta_e = g . V_e - g . o,  ds_e = w_e delta_e                                    (the backward)
//   ts_e = (tq_i . k_j + q_i . tk_j) / sqrt(D) + tbias_e,  tp_e = tenv_e a_e + p_e ts_e,  tZ = sum tp,
//   tw_e = (tp_e - w_e tZ) / Z,  to = sum (tw_e V_e + w_e tV_e)                        [= dL/dg]
//   tdelta_e = g . tV_e - g . to,  tds_e = tw_e delta_e + w_e tdelta_e                 [= dL/dbias_e]
//   dL/dq_i = sum (tds_e k_j + ds_e tk_j) / sqrt(D),  dL/denv_e = a_e / Z ((ts_e - tZ / Z) delta_e + tdelta_e),
//   dL/du_e = sum_h tw_e g[D:]; over senders: dL/dk_j = sum (tds_e q_i + ds_e tq_i) / sqrt(D),
//   dL/dv_j = sum tw_e g_i[:D].
// A row with Z = 0 (every envelope 0, no self edge) is linear in the envelopes, as in the reference path (which
// divides by 1 there): Z -> 1, tZ -> 0 and no o terms.
template <typename T, int kH, int kD, int kF>
void attention_double_backward_impl(const AttentionShape& shape, const AttentionInputs<T>& in,
                                    const AttentionDoubleBackwardArgs<T>& args) {
  const AttentionDims<kH, kD, kF> dims(shape);
  const int64_t self = in.self_bias != nullptr ? 1 : 0;
  const T scale = T(1) / std::sqrt(T(dims.D()));
  const HeadRow<T, kH, kD> head_row(dims.H(), dims.D());
  // grad_out's v part, (atoms, H * D) head after head as v itself, for pass 2's whole-row HeadRow sums.
  std::vector<T> grad_out_v(shape.atoms * dims.H() * dims.D());

  // Every sum over a row's (or, in pass 2, a sender's) edges goes into a local padded accumulator, loaded and
  // stored as whole vectors and written to its output once: accumulating into the outputs directly is a masked
  // store per head and edge that the next edge's load of the same values must wait for (as in the backward).
  at::parallel_for(0, shape.atoms, kGrainAtoms, [&](int64_t begin, int64_t end) {
    const int64_t H = dims.H(), D = dims.D(), HD = H * D, F = dims.F(), W = D + F, HW = H * W, Fp = padded<T>(F);
    std::vector<T> ts, tw, state(10 * H);  // per row: ts and tw, (self edge first) x heads
    std::vector<T> to_v(head_row.size()), to_u(H * Fp), gq(head_row.size());
    T* inv_z = state.data();
    T* live = inv_z + H;  // 1 where Z > 0
    T* g_dot_o = live + H;
    T* tz = g_dot_o + H;
    T* g_dot_to = tz + H;
    T* first = g_dot_to + H;  // one edge's per-head sums of two dot products (head_dot_sums)
    T* second = first + H;
    T* weight = second + H;  // one edge's normalised weight w per head
    T* ds_scaled = weight + H;
    T* tds_scaled = ds_scaled + H;
    for (int64_t i = begin; i < end; ++i) {
      const T* gi = args.grad_out + i * HW;
      const T* qi = in.q + i * HD;
      const T* tqi = args.tq + i * HD;
      const int64_t e0 = in.row_ptr[i], count = self + in.row_ptr[i + 1] - e0;
      const T* a = args.row_exp + row_start_with_self(in, i) * H;  // exp(s - m), as the forward left it
      if (static_cast<int64_t>(ts.size()) < count * H) {
        ts.resize(count * H);
        tw.resize(count * H);
      }
      for (int64_t h = 0; h < H; ++h) {
        const T zh = args.row_sum[i * H + h];
        live[h] = zh > T(0) ? T(1) : T(0);
        inv_z[h] = zh > T(0) ? T(1) / zh : T(1);
        g_dot_o[h] = zh > T(0) ? dot(gi + h * W, args.out + i * HW + h * W, W) : T(0);
        tz[h] = T(0);
        copy_short(gi + h * W, D, grad_out_v.data() + i * HD + h * D);
      }
      // Edge x of the row: sender, values, tangents.
      const auto sender = [&](int64_t x) { return x < self ? i : in.senders[e0 + x - self]; };
      const auto values = [&](int64_t x) {
        return F == 0 ? nullptr : x < self ? in.self_values : in.edge_values + (e0 + x - self) * F;
      };
      const auto tvalues = [&](int64_t x) {
        return F == 0 ? nullptr : x < self ? args.tself_values : args.tedge_values + (e0 + x - self) * F;
      };
      for (int64_t x = 0; x < count; ++x) {
        const bool is_self = x < self;
        const int64_t j = sender(x), e = e0 + x - self;
        const T env = is_self ? T(1) : in.envelope[e], tenv = is_self ? T(0) : args.tenvelope[e];
        head_dot_sums(tqi, D, in.k + j * HD, D, D, qi, D, args.tk + j * HD, D, D, H, first);  // tq . k + q . tk
        for (int64_t h = 0; h < H; ++h) {
          const T tb = is_self ? args.tself_bias[h] : args.tbias[e * H + h];
          const T t = first[h] * scale + tb;
          ts[x * H + h] = t;
          tz[h] += (tenv + env * t) * a[x * H + h];
        }
      }
      for (int64_t h = 0; h < H; ++h) tz[h] *= live[h];
      std::fill(to_v.begin(), to_v.end(), T(0));
      std::fill(to_u.begin(), to_u.end(), T(0));
      for (int64_t x = 0; x < count; ++x) {
        const bool is_self = x < self;
        const int64_t j = sender(x), e = e0 + x - self;
        const T env = is_self ? T(1) : in.envelope[e], tenv = is_self ? T(0) : args.tenvelope[e];
        T* twx = tw.data() + x * H;
        for (int64_t h = 0; h < H; ++h) {
          const T ax = a[x * H + h];
          weight[h] = env * ax * inv_z[h];
          twx[h] = ((tenv + env * ts[x * H + h]) * ax - weight[h] * tz[h]) * inv_z[h];
        }
        head_row.add2(to_v.data(), twx, in.v + j * HD, weight, args.tv + j * HD);
        if (F > 0) {
          add_to_heads(to_u.data(), twx, values(x), H, F, Fp);
          add_to_heads(to_u.data(), weight, tvalues(x), H, F, Fp);
        }
      }
      T* to = args.grad_grad_out + i * HW;
      for (int64_t h = 0; h < H; ++h) {
        copy_short(to_v.data() + h * D, D, to + h * W);
        copy_short(to_u.data() + h * Fp, F, to + h * W + D);
        g_dot_to[h] = live[h] * dot(gi + h * W, to + h * W, W);
      }
      std::fill(gq.begin(), gq.end(), T(0));
      for (int64_t x = 0; x < count; ++x) {
        const bool is_self = x < self;
        const int64_t j = sender(x), e = e0 + x - self;
        const T env = is_self ? T(1) : in.envelope[e];
        const T* u = values(x);
        const T* tu = tvalues(x);
        const T* twx = tw.data() + x * H;
        T grad_env = 0;
        head_dot_sums(gi, W, in.v + j * HD, D, D, gi + D, W, u, 0, F, H, first);  // g . V_e
        head_dot_sums(gi, W, args.tv + j * HD, D, D, gi + D, W, tu, 0, F, H, second);  // g . tV_e
        T* ds_out = is_self ? args.self_ds + i * H : args.edge_ds + e * H;
        T* tds_out = is_self ? args.self_dds + i * H : args.grad_bias + e * H;
        T* tw_out = is_self ? args.self_dw + i * H : args.edge_dw + e * H;
        for (int64_t h = 0; h < H; ++h) {
          const T ax = a[x * H + h], w = env * ax * inv_z[h];
          const T delta = first[h] - g_dot_o[h];
          const T tdelta = second[h] - g_dot_to[h];
          const T ds = w * delta, tds = twx[h] * delta + w * tdelta;
          ds_scaled[h] = scale * ds;
          tds_scaled[h] = scale * tds;
          grad_env += ax * inv_z[h] * ((ts[x * H + h] - tz[h] * inv_z[h]) * delta + tdelta);
          ds_out[h] = ds;
          tds_out[h] = tds;
          tw_out[h] = twx[h];
        }
        head_row.add2(gq.data(), tds_scaled, in.k + j * HD, ds_scaled, args.tk + j * HD);
        if (F > 0)
          combine_heads(is_self ? args.self_values_grad + i * F : args.grad_edge_values + e * F, twx, gi + D, W, H, F);
        if (!is_self) args.grad_envelope[e] = grad_env;
      }
      copy_short(gq.data(), HD, args.grad_q + i * HD);
    }
  });

  // Pass 2, over senders (edges regrouped by sender, as in the backward).
  at::parallel_for(0, shape.atoms, kGrainAtoms, [&](int64_t begin, int64_t end) {
    const int64_t H = dims.H(), HD = H * dims.D();
    std::vector<T> gk(head_row.size()), gv(head_row.size()), coefficients(2 * H);
    T* ds_scaled = coefficients.data();
    T* tds_scaled = ds_scaled + H;
    const auto add = [&](int64_t i, const T* ds, const T* tds, const T* tw) {
      for (int64_t h = 0; h < H; ++h) {
        ds_scaled[h] = scale * ds[h];
        tds_scaled[h] = scale * tds[h];
      }
      head_row.add2(gk.data(), tds_scaled, in.q + i * HD, ds_scaled, args.tq + i * HD);
      head_row.add(gv.data(), tw, grad_out_v.data() + i * HD);
    };
    for (int64_t j = begin; j < end; ++j) {
      std::fill(gk.begin(), gk.end(), T(0));
      std::fill(gv.begin(), gv.end(), T(0));
      if (self) add(j, args.self_ds + j * H, args.self_dds + j * H, args.self_dw + j * H);
      for (int64_t idx = args.sender_ptr[j]; idx < args.sender_ptr[j + 1]; ++idx) {
        const int64_t e = args.sender_perm[idx];
        add(args.receivers[e], args.edge_ds + e * H, args.grad_bias + e * H, args.edge_dw + e * H);
      }
      copy_short(gk.data(), HD, args.grad_k + j * HD);
      copy_short(gv.data(), HD, args.grad_v + j * HD);
    }
  });
}

template <typename T>
void attention_forward(const AttentionShape& shape, const AttentionInputs<T>& in,
                       const AttentionForwardOutputs<T>& result) {
  with_attention_dims(shape, [&](auto h, auto d, auto f) {
    attention_forward_impl<T, decltype(h)::value, decltype(d)::value, decltype(f)::value>(shape, in, result);
  });
}

template <typename T>
void attention_backward(const AttentionShape& shape, const AttentionInputs<T>& in,
                        const AttentionBackwardArgs<T>& args) {
  with_attention_dims(shape, [&](auto h, auto d, auto f) {
    attention_backward_impl<T, decltype(h)::value, decltype(d)::value, decltype(f)::value>(shape, in, args);
  });
}

template <typename T>
void attention_double_backward(const AttentionShape& shape, const AttentionInputs<T>& in,
                               const AttentionDoubleBackwardArgs<T>& args) {
  with_attention_dims(shape, [&](auto h, auto d, auto f) {
    attention_double_backward_impl<T, decltype(h)::value, decltype(d)::value, decltype(f)::value>(shape, in, args);
  });
}

namespace {

constexpr int64_t kGrainEdges = 256;
constexpr int64_t kMaxRowWidth = 64;

// y[0..n) += sum_k x[k] w[k * n + .] over `rows` rows of w, for n <= kMaxRowWidth (the portable build's sum).
// One accumulator per output vector makes a chain of `rows` dependent multiply-adds: latency-bound. Four
// partial sums over alternating rows give four independent chains per vector.
template <typename T>
inline void add_rows_width(T* __restrict y, const T* __restrict x, const T* __restrict w, int64_t rows, int64_t n) {
  constexpr int64_t kSize = kMaxRowWidth;
  const int64_t width = n;
  alignas(64) T part[4][kSize];
  for (int q = 0; q < 4; ++q) {
#pragma omp simd
    for (int64_t h = 0; h < width; ++h) part[q][h] = T(0);
  }
  int64_t k = 0;
  for (; k + 4 <= rows; k += 4) {
    for (int q = 0; q < 4; ++q) {
      const T xk = x[k + q];
      const T* __restrict row = w + (k + q) * width;
      T* __restrict acc = part[q];
#pragma omp simd
      for (int64_t h = 0; h < width; ++h) acc[h] += xk * row[h];
    }
  }
  for (; k < rows; ++k) {
    const T xk = x[k];
    const T* __restrict row = w + k * width;
#pragma omp simd
    for (int64_t h = 0; h < width; ++h) part[0][h] += xk * row[h];
  }
#pragma omp simd
  for (int64_t h = 0; h < width; ++h) y[h] += (part[0][h] + part[1][h]) + (part[2][h] + part[3][h]);
}

#ifdef TRANSIP_AVX512_BUILD
// add_rows_width for a runtime width: the same four partial sums, held in vector registers one output vector at
// a time, the last one masked. The compiler's loop for a runtime width (the features' 3 + num_rbf = 19, the
// biases' groups x heads) ran eight lanes and a scalar remainder in float: no faster than float64 (perf).
template <typename T>
inline void add_rows_short(T* __restrict y, const T* __restrict x, const T* __restrict w, int64_t rows, int64_t n) {
  using V = Vec512<T>;
  for (int64_t d = 0; d < n; d += V::kLanes) {
    const int64_t left = n - d;
    typename V::type part[4] = {V::zero(), V::zero(), V::zero(), V::zero()};
    int64_t k = 0;
    for (; k + 4 <= rows; k += 4)
      for (int q = 0; q < 4; ++q) part[q] = V::fma(V::broadcast(x[k + q]), V::load(w + (k + q) * n + d, left), part[q]);
    for (; k < rows; ++k) part[0] = V::fma(V::broadcast(x[k]), V::load(w + k * n + d, left), part[0]);
    V::store(y + d, V::add(V::load(y + d, left), V::add(V::add(part[0], part[1]), V::add(part[2], part[3]))), left);
  }
}
#endif

// The same sum for any width, through add_rows_short (AVX-512) or add_rows_width when the rows fit its buffer:
// tile_rows' route for outputs wider than its register tiles, and the portable build's.
template <typename T>
inline void add_rows_any(T* __restrict y, const T* __restrict x, const T* __restrict w, int64_t rows, int64_t n) {
#ifdef TRANSIP_AVX512_BUILD
  add_rows_short(y, x, w, rows, n);
#else
  if (n <= kMaxRowWidth) return add_rows_width(y, x, w, rows, n);
  for (int64_t k = 0; k < rows; ++k) {
    const T xk = x[k];
    const T* __restrict row = w + k * n;
#pragma omp simd
    for (int64_t h = 0; h < n; ++h) y[h] += xk * row[h];
  }
#endif
}

// Edges per tile of the edge encoder's forward and backward: a tile's layers run as small matrix products, so
// that each weight row is loaded once per tile instead of once per edge, and the per-edge scalar work (|r|, the
// radial basis' and the sigmoid's exp) runs as one vector loop over the tile. Edge by edge, the float32 encoder
// spent as long outside its multiply-adds as the float64 one (torch profiler), so it gained little from float32.
constexpr int kEdgeTile = 8;

#ifdef TRANSIP_AVX512_BUILD
// tile_rows for an output kVecs vectors wide (the last one masked), kSub edges at a time: kSub x kVecs
// accumulators and the kVecs vectors of one weight row stay in registers through the sum over rows.
template <typename T, int kVecs, int kSub>
inline void tile_rows_vectors(T* __restrict y, const T* __restrict x, const T* __restrict w, int64_t rows,
                              int64_t n) {
  using V = Vec512<T>;
  static_assert(kEdgeTile % kSub == 0, "sub-tiles must divide the tile");
  for (int t0 = 0; t0 < kEdgeTile; t0 += kSub) {
    typename V::type acc[kSub][kVecs];
    for (int t = 0; t < kSub; ++t)
      for (int v = 0; v < kVecs; ++v) acc[t][v] = V::load(y + (t0 + t) * n + v * V::kLanes, n - v * V::kLanes);
    for (int64_t k = 0; k < rows; ++k) {
      typename V::type row[kVecs];
      for (int v = 0; v < kVecs; ++v) row[v] = V::load(w + k * n + v * V::kLanes, n - v * V::kLanes);
      for (int t = 0; t < kSub; ++t) {
        const auto xt = V::broadcast(x[(t0 + t) * rows + k]);
        for (int v = 0; v < kVecs; ++v) acc[t][v] = V::fma(xt, row[v], acc[t][v]);
      }
    }
    for (int t = 0; t < kSub; ++t)
      for (int v = 0; v < kVecs; ++v) V::store(y + (t0 + t) * n + v * V::kLanes, acc[t][v], n - v * V::kLanes);
  }
}
#endif

// Y[t] += X[t] W for the kEdgeTile rows of a tile: X (kEdgeTile, rows), Y (kEdgeTile, n), W (rows, n).
template <typename T>
inline void tile_rows(T* __restrict y, const T* __restrict x, const T* __restrict w, int64_t rows, int64_t n) {
#ifdef TRANSIP_AVX512_BUILD
  switch ((n + Vec512<T>::kLanes - 1) / Vec512<T>::kLanes) {
    case 1: return tile_rows_vectors<T, 1, 8>(y, x, w, rows, n);
    case 2: return tile_rows_vectors<T, 2, 8>(y, x, w, rows, n);
    case 3: return tile_rows_vectors<T, 3, 4>(y, x, w, rows, n);
    case 4: return tile_rows_vectors<T, 4, 4>(y, x, w, rows, n);
    default: break;
  }
#endif
  for (int t = 0; t < kEdgeTile; ++t) add_rows_any(y + t * n, x + t * rows, w, rows, n);
}

// One tile's features and layers, for edges[0..count) (count <= kEdgeTile; the other rows get r = 0, are
// computed and ignored): length |r|, f = [r / cutoff, rbf(|r|)], z = w1 f + b1, s = sigmoid(z),
// hidden = SiLU(z) = z s, a = w2 hidden + b2; each (kEdgeTile, width) row after row.
template <typename T>
struct EdgeTile {
  EdgeTile(const EdgeEncoderParams<T>& p)
      : in(3 + p.num_rbf), hidden_width(p.hidden), buffer(kEdgeTile * (1 + 2 * in + 4 * p.hidden)) {}
  int64_t in, hidden_width;
  std::vector<T> buffer;
  T* length() { return buffer.data(); }
  T* f() { return length() + kEdgeTile; }
  T* rbf() { return f() + kEdgeTile * in; }  // the radial basis, (kEdgeTile, num_rbf), before it joins f
  T* z() { return rbf() + kEdgeTile * in; }
  T* s() { return z() + kEdgeTile * hidden_width; }
  T* hidden() { return s() + kEdgeTile * hidden_width; }
  T* a() { return hidden() + kEdgeTile * hidden_width; }
};

template <typename T>
void edge_tile_layers(const EdgeEncoderParams<T>& p, const T* vectors, const int64_t* edges, int count,
                      EdgeTile<T>& tile) {
  const int64_t in = tile.in, H = p.hidden, K = p.num_rbf, TH = kEdgeTile * H;
  T *length = tile.length(), *f = tile.f(), *rbf = tile.rbf(), *z = tile.z(), *s = tile.s();
  for (int t = 0; t < kEdgeTile; ++t) {
    const T zero[3] = {T(0), T(0), T(0)};
    const T* r = t < count ? vectors + 3 * edges[t] : zero;
    length[t] = std::sqrt(r[0] * r[0] + r[1] * r[1] + r[2] * r[2]);
    for (int c = 0; c < 3; ++c) f[t * in + c] = r[c] / p.cutoff;
  }
  for (int t = 0; t < kEdgeTile; ++t) {
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) {
      const T u = (length[t] - p.centers[k]) / p.width;
      rbf[t * K + k] = T(-0.5) * u * u;
    }
  }
  exp_array(rbf, rbf, kEdgeTile * K);
  for (int t = 0; t < kEdgeTile; ++t) {
    copy_short(rbf + t * K, K, f + t * in + 3);
    copy_short(p.b1, H, z + t * H);
  }
  tile_rows(z, f, p.w1t, in, H);
#pragma omp simd
  for (int64_t h = 0; h < TH; ++h) s[h] = -z[h];
  exp_array(s, s, TH);
  T *hidden = tile.hidden(), *a = tile.a();
#pragma omp simd
  for (int64_t h = 0; h < TH; ++h) {
    s[h] = T(1) / (T(1) + s[h]);  // sigmoid(z)
    hidden[h] = z[h] * s[h];
  }
  for (int t = 0; t < kEdgeTile; ++t) copy_short(p.b2, H, a + t * H);
  tile_rows(a, hidden, p.w2t, H, H);
}

}  // namespace

// The smooth cutoff envelope and its derivative with respect to |r| (polynomial, zero beyond the cutoff).
template <typename T>
inline T envelope_value(T length, T cutoff, T* slope) {
  if (!(length < cutoff)) {
    *slope = T(0);
    return T(0);
  }
  const T x = length / cutoff;
  *slope = x * x * (T(-30) + x * (T(60) - T(30) * x)) / cutoff;
  return T(1) + x * x * x * (T(-10) + x * (T(15) - T(6) * x));
}

// One edge's biases of every group, to and from the (groups, E, heads) layout (loops, not b / heads: an integer
// division per bias showed up in the profile).
template <typename T>
inline void gather_biases(const EdgeEncoderParams<T>& p, const T* all, int64_t e, int64_t heads, T* out) {
  for (int64_t g = 0; g < p.bias_groups; ++g)
    copy_short(all + (g * p.edges + e) * heads, heads, out + g * heads);
}

template <typename T>
inline void scatter_biases(const EdgeEncoderParams<T>& p, const T* in, int64_t e, int64_t heads, T* all) {
  for (int64_t g = 0; g < p.bias_groups; ++g)
    copy_short(in + g * heads, heads, all + (g * p.edges + e) * heads);
}

// Slots are split between threads, so that each thread owns its slots' sums. The edges of a thread's slots
// [begin, end) are contiguous in slot order (slot_perm): run(edges, count, slots) gets them kEdgeTile at a time
// (tiles may span slots), with slots[t] the slot of edges[t].
template <typename Run>
void for_slot_tiles(const int64_t* slot_ptr, const int64_t* slot_perm, int64_t begin, int64_t end, Run run) {
  const int64_t last = slot_ptr[end];
  int64_t slot = begin, slots[kEdgeTile];
  for (int64_t idx = slot_ptr[begin]; idx < last; idx += kEdgeTile) {
    const int count = static_cast<int>(std::min<int64_t>(kEdgeTile, last - idx));
    for (int t = 0; t < count; ++t) {
      while (slot_ptr[slot + 1] <= idx + t) ++slot;
      slots[t] = slot;
    }
    run(slot_perm + idx, count, slots);
  }
}

template <typename T>
void edge_forward_impl(const EdgeEncoderParams<T>& p, const EdgeEncoderForward<T>& io) {
  const int64_t H = p.hidden, in = 3 + p.num_rbf, B = p.num_bias;
  const int64_t heads = B / p.bias_groups;
  at::parallel_for(0, io.num_slots, kGrainAtoms, [&](int64_t begin, int64_t end) {
    EdgeTile<T> tile(p);
    std::vector<T> bias(kEdgeTile * B);
    std::fill(io.pooled + begin * H, io.pooled + end * H, T(0));
    std::fill(io.pooled_weight + begin, io.pooled_weight + end, T(0));
    for_slot_tiles(io.slot_ptr, io.slot_perm, begin, end, [&](const int64_t* edges, int count, const int64_t* slots) {
      edge_tile_layers(p, io.vectors, edges, count, tile);
      for (int t = 0; t < kEdgeTile; ++t) copy_short(p.bb, B, bias.data() + t * B);
      tile_rows(bias.data(), tile.a(), p.wbt, H, B);
      for (int t = 0; t < count; ++t) {
        const int64_t e = edges[t], slot = slots[t];
        T slope;
        const T env = envelope_value(tile.length()[t], p.cutoff, &slope);
        io.envelope[e] = env;
        if (io.features != nullptr) copy_short(tile.f() + t * in, in, io.features + e * in);
        io.pooled_weight[slot] += env;
        axpy(io.pooled + slot * H, env, tile.a() + t * H, H);
        scatter_biases(p, bias.data() + t * B, e, heads, io.bias);
      }
    });
  });
}

// Per-thread partial sums of the weight gradients (each thread adds into its own copy; summed at the end).
template <typename T>
class PerThreadSums {
 public:
  explicit PerThreadSums(int64_t size) : size_(size), data_(size * at::get_num_threads(), T(0)) {}
  T* mine() { return data_.data() + at::get_thread_num() * size_; }
  void sum_into(T* out) const {
    std::fill(out, out + size_, T(0));
    for (size_t start = 0; start < data_.size(); start += size_)
      for (int64_t i = 0; i < size_; ++i) out[i] += data_[start + i];
  }

 private:
  int64_t size_;
  std::vector<T> data_;
};

// Sums of outer products x y^T over edges, for the weight gradients: each edge's pair is copied into a tile,
// and every kTile edges the tile is added to its target (rows, H) at once, four target rows held in registers
// across the tile's edges instead of loaded and stored once per edge. H is the hidden width (the vectors' fast
// axis); kH > 0 makes it a compile-time constant.
template <typename T, int kH>
class OuterProductTiles {
 public:
  static constexpr int kTile = 16;
  explicit OuterProductTiles(int64_t hidden) : H_(kH > 0 ? kH : hidden) {}
  ~OuterProductTiles() { flush(); }

  // A term target (rows, H) += sum_e x_e y_e^T; returns its number for `put`. A null target (no weight
  // gradients asked for: the forces-only backward of MD) allocates nothing and must not be `put` to.
  int add_term(T* target, int64_t rows) {
    const bool used = target != nullptr;
    terms_.push_back({target, rows, std::vector<T>(used ? kTile * rows : 0), std::vector<T>(used ? kTile * H_ : 0)});
    return static_cast<int>(terms_.size()) - 1;
  }
  void put(int term, const T* x, const T* y) {
    Term& t = terms_[term];
    copy_short(x, t.rows, t.x.data() + count_ * t.rows);
    copy_short(y, H_, t.y.data() + count_ * H_);
  }
  void next_edge() {
    if (++count_ == kTile) flush();
  }
  void flush() {
    if (count_ == 0) return;
    for (Term& t : terms_) accumulate(t);
    count_ = 0;
  }

 private:
  struct Term {
    T* target;
    int64_t rows;
    std::vector<T> x, y;  // (kTile, rows) and (kTile, H)
  };

  void accumulate(Term& t) const {
    constexpr int kRows = 4;
    const int64_t n = H_;
    int64_t i = 0;
    if (n <= kMaxRowWidth) {
      for (; i + kRows <= t.rows; i += kRows) {
        alignas(64) T acc[kRows][kH > 0 ? kH : kMaxRowWidth];
        for (int q = 0; q < kRows; ++q) copy_short(t.target + (i + q) * n, n, acc[q]);
        for (int r = 0; r < count_; ++r) {
          const T* __restrict y = t.y.data() + r * n;
          for (int q = 0; q < kRows; ++q) {
            const T xq = t.x[r * t.rows + i + q];
#pragma omp simd
            for (int64_t h = 0; h < n; ++h) acc[q][h] += xq * y[h];
          }
        }
        for (int q = 0; q < kRows; ++q) copy_short(acc[q], n, t.target + (i + q) * n);
      }
    }
    for (; i < t.rows; ++i) {
      T* __restrict row = t.target + i * n;
      for (int r = 0; r < count_; ++r) {
        const T xr = t.x[r * t.rows + i];
        const T* __restrict y = t.y.data() + r * n;
#pragma omp simd
        for (int64_t h = 0; h < n; ++h) row[h] += xr * y[h];
      }
    }
  }

  int64_t H_;
  int count_ = 0;
  std::vector<Term> terms_;
};

template <typename T>
inline void add_to(T* __restrict b, const T* __restrict x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) b[i] += x[i];
}

// The per-thread weight-gradient buffer: like weight_grad_size's layout, except that w1's gradient is kept
// transposed, (3 + num_rbf, hidden), so that every term's fast axis is the hidden width.
template <typename T>
struct WeightGrads {
  T *w1t, *b1, *w2, *b2, *wb, *bb;
  WeightGrads(T* base, const EdgeEncoderParams<T>& p) {  // base null: no weight gradients, all parts null
    const int64_t H = p.hidden, in = 3 + p.num_rbf;
    if (base == nullptr) {
      w1t = b1 = w2 = b2 = wb = bb = nullptr;
      return;
    }
    w1t = base, b1 = w1t + H * in, w2 = b1 + H, b2 = w2 + H * H, wb = b2 + H, bb = wb + p.num_bias * H;
  }
};

// Sum the threads' buffers into `out` (weight_grad_size layout), transposing w1's block back.
template <typename T>
void finish_weight_grads(const PerThreadSums<T>& sums, const EdgeEncoderParams<T>& p, T* out) {
  const int64_t H = p.hidden, in = 3 + p.num_rbf;
  std::vector<T> total(weight_grad_size(p));
  sums.sum_into(total.data());
  std::copy(total.begin() + H * in, total.end(), out + H * in);
  for (int64_t j = 0; j < in; ++j)
    for (int64_t k = 0; k < H; ++k) out[k * in + j] = total[j * H + k];
}

template <typename T, int kHidden>
void edge_backward_impl(const EdgeEncoderParams<T>& p, const EdgeEncoderBackward<T>& io) {
  const int64_t H = kHidden > 0 ? kHidden : p.hidden, in = 3 + p.num_rbf, B = p.num_bias;
  const int64_t heads = B / p.bias_groups, TH = kEdgeTile * H;
  PerThreadSums<T> sums(io.grad_weights != nullptr ? weight_grad_size(p) : 0);
  at::parallel_for(0, p.edges, kGrainEdges, [&](int64_t begin, int64_t end) {
    EdgeTile<T> tile(p);
    // Per tile: dL/da, dL/dz, dL/df and the bias gradients, (kEdgeTile, width) each, and dL/d|r| from the
    // envelope. Rows past `count` keep the previous tile's values: finite, computed on and ignored.
    std::vector<T> buffer(kEdgeTile * (2 * H + in + B) + kEdgeTile, T(0));
    T* __restrict ga = buffer.data();
    T* __restrict gz = ga + TH;
    T* __restrict gf = gz + TH;
    T* __restrict gb = gf + kEdgeTile * in;
    T* __restrict g_env = gb + kEdgeTile * B;
    int64_t edges[kEdgeTile];
    // The weight gradients: this thread's buffer, through tiles of outer products (empty without weights).
    const WeightGrads<T> g(io.grad_weights != nullptr ? sums.mine() : nullptr, p);
    OuterProductTiles<T, kHidden> tiles(H);
    const int w1_term = tiles.add_term(g.w1t, in), w2_term = tiles.add_term(g.w2, H), wb_term = tiles.add_term(g.wb, B);
    for (int64_t e0 = begin; e0 < end; e0 += kEdgeTile) {
      const int count = static_cast<int>(std::min<int64_t>(kEdgeTile, end - e0));
      for (int t = 0; t < count; ++t) edges[t] = e0 + t;
      edge_tile_layers(p, io.vectors, edges, count, tile);
      const T *z = tile.z(), *s = tile.s(), *a = tile.a();
      // dL/da from the pooled sum (envelope-weighted) and from the attention biases; dL/d envelope likewise.
      for (int t = 0; t < count; ++t) {
        const int64_t e = e0 + t, slot = io.slot[e];
        const T* __restrict gp = io.grad_pooled + slot * H;
        T slope;
        const T env = envelope_value(tile.length()[t], p.cutoff, &slope);
        g_env[t] = (io.grad_pooled_weight[slot] + io.grad_envelope[e] + dot(a + t * H, gp, H)) * slope;
#pragma omp simd
        for (int64_t h = 0; h < H; ++h) ga[t * H + h] = env * gp[h];
        gather_biases(p, io.grad_bias, e, heads, gb + t * B);
        if (io.grad_features != nullptr)
          copy_short(io.grad_features + e * in, in, gf + t * in);
      }
      tile_rows(ga, gb, p.wb, B, H);
      // Through the second layer and SiLU: d(z s)/dz = s (1 + z (1 - s)).
      std::fill(gz, gz + TH, T(0));
      tile_rows(gz, ga, p.w2, H, H);
#pragma omp simd
      for (int64_t h = 0; h < TH; ++h) gz[h] *= s[h] * (T(1) + z[h] * (T(1) - s[h]));
      // dL/df = w1^T dL/dz, plus the features' own incoming gradient (the blocks read them).
      tile_rows(gf, gz, p.w1, H, in);
      for (int t = 0; t < count; ++t) {
        // Through the features: r / cutoff directly; the radial basis and the envelope through |r|.
        const T length = tile.length()[t];
        const T* ft = tile.f() + t * in;
        const T* gft = gf + t * in;
        T d_length = g_env[t];
        for (int64_t k = 0; k < p.num_rbf; ++k)
          d_length += gft[3 + k] * ft[3 + k] * (-(length - p.centers[k]) / (p.width * p.width));
        const T radial = length > T(0) ? d_length / length : T(0);
        const T* r = io.vectors + 3 * (e0 + t);
        for (int c = 0; c < 3; ++c) io.grad_vectors[3 * (e0 + t) + c] = gft[c] / p.cutoff + radial * r[c];
        if (io.grad_weights != nullptr) {  // dL/dW = (dL/d output) (input)^T for each of the three layers
          tiles.put(w1_term, ft, gz + t * H);
          tiles.put(w2_term, ga + t * H, tile.hidden() + t * H);
          tiles.put(wb_term, gb + t * B, a + t * H);
          tiles.next_edge();
          add_to(g.b1, gz + t * H, H);
          add_to(g.b2, ga + t * H, H);
          add_to(g.bb, gb + t * B, B);
        }
      }
      // The next tile's incoming gradients start from 0 in the rows it does not fill.
      std::fill(gf, gf + kEdgeTile * in, T(0));
    }
  });
  if (io.grad_weights != nullptr) finish_weight_grads(sums, p, io.grad_weights);
}

// The envelope's second derivative with respect to |r|.
template <typename T>
inline T envelope_curvature(T length, T cutoff) {
  if (!(length < cutoff)) return T(0);
  const T x = length / cutoff;
  return x * (T(-60) + x * (T(180) - T(120) * x)) / (cutoff * cutoff);
}

// See EdgeEncoderDoubleBackward. Per edge, with A = dL/da, C = dL/dz of the backward, and the tangent along
// dot_r of the features (df), first layer (dz), hidden (dh) and embedding (da):
//   d grad_bias = wb da,  d grad_pooled[slot] += d_env a + env da,  d grad_pooled_weight[slot] += d_env,
//   d grad_envelope = d_env = env'(|r|) d|r|;
//   with q = d_env gp, the coefficient of a itself, and dz_S = (w2^T A) SiLU''(z) dz + (w2^T q) SiLU'(z):
//   dW1 += dz_S f^T + C df^T,  db1 += dz_S,  dW2 += A dh^T + q SiLU(z)^T,  db2 += q,  dWb += grad_bias da^T;
//   d r  = J_f^T (w1^T dz_S) + (gp . da) env' r^ + the second derivatives of the features and the envelope.
template <typename T, int kHidden>
void edge_double_backward_impl(const EdgeEncoderParams<T>& p, const EdgeEncoderDoubleBackward<T>& io) {
  const int64_t H = kHidden > 0 ? kHidden : p.hidden, in = 3 + p.num_rbf, B = p.num_bias, K = p.num_rbf;
  const int64_t heads = B / p.bias_groups, TH = kEdgeTile * H, TI = kEdgeTile * in, TB = kEdgeTile * B;
  const T inv_w2 = T(1) / (p.width * p.width);
  PerThreadSums<T> sums(weight_grad_size(p));
  at::parallel_for(0, io.num_slots, kGrainAtoms, [&](int64_t begin, int64_t end) {
    EdgeTile<T> tile(p);
    // Per tile, (kEdgeTile, width) each: H wide A = dL/da, Bv = w2^T A, C = dL/dz, SiLU'(z), dz, dh, da, q,
    // w2^T q, dz_S; `in` wide w1^T C (gf), the features' tangent (df), w1^T dz_S (gF); the radial basis' first
    // derivatives (K); B wide bias gradients and their tangents; then six per-edge scalars.
    std::vector<T> buffer(10 * TH + 3 * TI + kEdgeTile * K + 2 * TB + 6 * kEdgeTile, T(0));
    T* __restrict A = buffer.data();
    T* __restrict Bv = A + TH;
    T* __restrict C = Bv + TH;
    T* __restrict sp = C + TH;
    T* __restrict dz = sp + TH;
    T* __restrict dh = dz + TH;
    T* __restrict da = dh + TH;
    T* __restrict q = da + TH;
    T* __restrict w2q = q + TH;
    T* __restrict dzS = w2q + TH;
    T* __restrict gf = dzS + TH;
    T* __restrict df = gf + TI;
    T* __restrict gF = df + TI;
    T* __restrict rb1 = gF + TI;
    T* __restrict gb = rb1 + kEdgeTile * K;
    T* __restrict dbias = gb + TB;
    T* __restrict env = dbias + TB;
    T* __restrict slope = env + kEdgeTile;
    T* __restrict g_env = slope + kEdgeTile;
    T* __restrict dlength = g_env + kEdgeTile;
    T* __restrict curvature = dlength + kEdgeTile;
    T* __restrict gp_da = curvature + kEdgeTile;
    const WeightGrads<T> g(sums.mine(), p);
    OuterProductTiles<T, kHidden> tiles(H);
    const int w1_f = tiles.add_term(g.w1t, in), w1_df = tiles.add_term(g.w1t, in), w2_hidden = tiles.add_term(g.w2, H),
              w2_dh = tiles.add_term(g.w2, H), wb_da = tiles.add_term(g.wb, B);
    std::fill(io.d_grad_pooled + begin * H, io.d_grad_pooled + end * H, T(0));
    std::fill(io.d_grad_pooled_weight + begin, io.d_grad_pooled_weight + end, T(0));
    for_slot_tiles(io.slot_ptr, io.slot_perm, begin, end, [&](const int64_t* edges, int count, const int64_t* slots) {
      edge_tile_layers(p, io.vectors, edges, count, tile);
      const T *f = tile.f(), *z = tile.z(), *s = tile.s(), *a = tile.a(), *hidden = tile.hidden();
      // The backward's own quantities: A = dL/da, dL/d env, C = dL/dz; and the tangent along dot_r.
      for (int t = 0; t < count; ++t) {
        const int64_t e = edges[t], slot = slots[t];
        const T* __restrict gp = io.grad_pooled + slot * H;
        const T length = tile.length()[t];
        env[t] = envelope_value(length, p.cutoff, slope + t);
        curvature[t] = envelope_curvature(length, p.cutoff);
        g_env[t] = io.grad_pooled_weight[slot] + io.grad_envelope[e] + dot(a + t * H, gp, H);
#pragma omp simd
        for (int64_t h = 0; h < H; ++h) A[t * H + h] = env[t] * gp[h];
        gather_biases(p, io.grad_bias, e, heads, gb + t * B);
        // dL/df = w1^T C plus the features' own incoming gradient: its radial part meets the basis' second
        // derivatives below, and its directional derivative is the features' tangent df.
        if (io.grad_features != nullptr)
          copy_short(io.grad_features + e * in, in, gf + t * in);
        const T* r = io.vectors + 3 * e;
        const T* rd = io.dot_vectors + 3 * e;
        dlength[t] = length > T(0) ? (r[0] * rd[0] + r[1] * rd[1] + r[2] * rd[2]) / length : T(0);
        for (int c = 0; c < 3; ++c) df[t * in + c] = rd[c] / p.cutoff;
        for (int64_t k = 0; k < K; ++k) {
          rb1[t * K + k] = -f[t * in + 3 + k] * (length - p.centers[k]) * inv_w2;
          df[t * in + 3 + k] = rb1[t * K + k] * dlength[t];
        }
        if (io.d_grad_features != nullptr) copy_short(df + t * in, in, io.d_grad_features + e * in);
      }
#pragma omp simd
      for (int64_t h = 0; h < TH; ++h) sp[h] = s[h] * (T(1) + z[h] * (T(1) - s[h]));  // SiLU'(z)
      tile_rows(A, gb, p.wb, B, H);
      std::fill(Bv, Bv + TH, T(0));
      tile_rows(Bv, A, p.w2, H, H);
#pragma omp simd
      for (int64_t h = 0; h < TH; ++h) C[h] = Bv[h] * sp[h];
      tile_rows(gf, C, p.w1, H, in);
      std::fill(dz, dz + TH, T(0));
      tile_rows(dz, df, p.w1t, in, H);
#pragma omp simd
      for (int64_t h = 0; h < TH; ++h) dh[h] = sp[h] * dz[h];
      std::fill(da, da + TH, T(0));
      tile_rows(da, dh, p.w2t, H, H);
      std::fill(dbias, dbias + TB, T(0));
      tile_rows(dbias, da, p.wbt, H, B);
      for (int t = 0; t < count; ++t) {
        const int64_t e = edges[t], sl = slots[t];
        const T* __restrict gp = io.grad_pooled + sl * H;
        scatter_biases(p, dbias + t * B, e, heads, io.d_grad_bias);
        const T denv = slope[t] * dlength[t];
        io.d_grad_envelope[e] = denv;
        io.d_grad_pooled_weight[sl] += denv;
        gp_da[t] = dot(gp, da + t * H, H);
        T* __restrict psum = io.d_grad_pooled + sl * H;
#pragma omp simd
        for (int64_t h = 0; h < H; ++h) {
          psum[h] += denv * a[t * H + h] + env[t] * da[t * H + h];
          q[t * H + h] = denv * gp[h];
        }
      }
      std::fill(w2q, w2q + TH, T(0));
      tile_rows(w2q, q, p.w2, H, H);
#pragma omp simd
      for (int64_t h = 0; h < TH; ++h) {
        const T spp = s[h] * (T(1) - s[h]) * (T(2) + z[h] * (T(1) - T(2) * s[h]));  // SiLU''(z)
        dzS[h] = Bv[h] * spp * dz[h] + w2q[h] * sp[h];
      }
      std::fill(gF, gF + TI, T(0));
      tile_rows(gF, dzS, p.w1, H, in);
      for (int t = 0; t < count; ++t) {
        tiles.put(w1_f, f + t * in, dzS + t * H);
        tiles.put(w1_df, df + t * in, C + t * H);
        tiles.put(w2_hidden, q + t * H, hidden + t * H);
        tiles.put(w2_dh, A + t * H, dh + t * H);
        tiles.put(wb_da, gb + t * B, da + t * H);
        tiles.next_edge();
        add_to(g.b1, dzS + t * H, H);
        add_to(g.b2, q + t * H, H);
        // d r: through the features' first derivatives (w1^T dz_S), the envelope in A, and the second
        // derivatives of the radial basis and the envelope along dot_r.
        const int64_t e = edges[t];
        const T length = tile.length()[t];
        const T* r = io.vectors + 3 * e;
        const T* rd = io.dot_vectors + 3 * e;
        const T *gft = gf + t * in, *gFt = gF + t * in, *ft = f + t * in, *rb1t = rb1 + t * K;
        T radial = gp_da[t] * slope[t] + dlength[t] * g_env[t] * curvature[t], tangential = g_env[t] * slope[t];
        for (int64_t k = 0; k < K; ++k) {
          const T u = (length - p.centers[k]) / p.width;
          const T rb2 = ft[3 + k] * (u * u - T(1)) * inv_w2;
          radial += gFt[3 + k] * rb1t[k] + gft[3 + k] * rb2 * dlength[t];
          tangential += gft[3 + k] * rb1t[k];
        }
        T* out = io.d_vectors + 3 * e;
        if (length > T(0)) {
          const T inv = T(1) / length;
          for (int c = 0; c < 3; ++c) {
            const T unit = r[c] * inv;
            out[c] = gFt[c] / p.cutoff + radial * unit + tangential * (rd[c] - dlength[t] * unit) * inv;
          }
        } else {
          for (int c = 0; c < 3; ++c) out[c] = gFt[c] / p.cutoff;
        }
      }
      // The next tile's incoming feature gradients start from 0 in the rows it does not fill.
      std::fill(gf, gf + TI, T(0));
    });
  });
  finish_weight_grads(sums, p, io.grad_weights);
}

// Runs run(std::integral_constant<int, W>) with the hidden width as a compile-time constant W for the common
// widths (0: any width).
template <typename Run>
void with_hidden_width(int64_t hidden, Run run) {
  switch (hidden) {
    case 16: return run(std::integral_constant<int, 16>{});
    case 32: return run(std::integral_constant<int, 32>{});
    case 64: return run(std::integral_constant<int, 64>{});
    default: return run(std::integral_constant<int, 0>{});
  }
}

template <typename T>
void edge_encoder_forward(const EdgeEncoderParams<T>& p, const EdgeEncoderForward<T>& io) {
  edge_forward_impl(p, io);
}

template <typename T>
void edge_encoder_backward(const EdgeEncoderParams<T>& p, const EdgeEncoderBackward<T>& io) {
  with_hidden_width(p.hidden, [&](auto width) { edge_backward_impl<T, decltype(width)::value>(p, io); });
}

template <typename T>
void edge_encoder_double_backward(const EdgeEncoderParams<T>& p, const EdgeEncoderDoubleBackward<T>& io) {
  with_hidden_width(p.hidden, [&](auto width) { edge_double_backward_impl<T, decltype(width)::value>(p, io); });
}

// The candidates c < count within the cutoff of `center`: (x_c - center)^2 summed over the axes < cutoff2, with
// x_c the candidate's position already shifted to its image. Their numbers go to `kept` in increasing order; the
// count is returned. The neighbour list's inner loop (one call per atom). Products and sums are rounded one at a
// time, never fused into an FMA, so that both builds and the reference list draw the cutoff at the same pairs.
int64_t within_cutoff(const double* x, const double* y, const double* z, int64_t count, const double* center,
                      double cutoff2, int64_t* kept) {
  int64_t m = 0;
#ifdef TRANSIP_AVX512_BUILD
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;  // explicit rounding: never contracted
  const __m512d cx = _mm512_set1_pd(center[0]), cy = _mm512_set1_pd(center[1]), cz = _mm512_set1_pd(center[2]);
  const __m512d limit = _mm512_set1_pd(cutoff2);
  const __m512i lanes = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
  for (int64_t c = 0; c < count; c += 8) {
    const __mmask8 tail = count - c >= 8 ? static_cast<__mmask8>(0xff) : static_cast<__mmask8>((1u << (count - c)) - 1u);
    const __m512d dx = _mm512_sub_round_pd(_mm512_maskz_loadu_pd(tail, x + c), cx, kRound);
    const __m512d dy = _mm512_sub_round_pd(_mm512_maskz_loadu_pd(tail, y + c), cy, kRound);
    const __m512d dz = _mm512_sub_round_pd(_mm512_maskz_loadu_pd(tail, z + c), cz, kRound);
    const __m512d d2 = _mm512_add_round_pd(_mm512_add_round_pd(_mm512_mul_round_pd(dx, dx, kRound),
                                                                _mm512_mul_round_pd(dy, dy, kRound), kRound),
                                           _mm512_mul_round_pd(dz, dz, kRound), kRound);
    const __mmask8 inside = _mm512_mask_cmp_pd_mask(tail, d2, limit, _CMP_LT_OQ);
    _mm512_mask_compressstoreu_epi64(kept + m, inside, _mm512_add_epi64(lanes, _mm512_set1_epi64(c)));
    m += __builtin_popcount(inside);
  }
#else
  // 64 candidates at a time: their distances (a loop the compiler vectorises), then a bit mask, then a branch per
  // kept candidate rather than per candidate (most are rejected, unpredictably).
  double d2[64];
  for (int64_t block = 0; block < count; block += 64) {
    const int64_t width = std::min<int64_t>(64, count - block);
    for (int64_t c = 0; c < width; ++c) {
      const double dx = x[block + c] - center[0], dy = y[block + c] - center[1], dz = z[block + c] - center[2];
      d2[c] = dx * dx + dy * dy + dz * dz;
    }
    uint64_t mask = 0;
    for (int64_t c = 0; c < width; ++c) mask |= static_cast<uint64_t>(d2[c] < cutoff2) << c;
    for (; mask != 0; mask &= mask - 1) kept[m++] = block + __builtin_ctzll(mask);
  }
#endif
  return m;
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
template void attention_double_backward<float>(const AttentionShape&, const AttentionInputs<float>&,
                                               const AttentionDoubleBackwardArgs<float>&);
template void attention_double_backward<double>(const AttentionShape&, const AttentionInputs<double>&,
                                                const AttentionDoubleBackwardArgs<double>&);
template void edge_encoder_forward<float>(const EdgeEncoderParams<float>&, const EdgeEncoderForward<float>&);
template void edge_encoder_forward<double>(const EdgeEncoderParams<double>&, const EdgeEncoderForward<double>&);
template void edge_encoder_backward<float>(const EdgeEncoderParams<float>&, const EdgeEncoderBackward<float>&);
template void edge_encoder_backward<double>(const EdgeEncoderParams<double>&, const EdgeEncoderBackward<double>&);
template void edge_encoder_double_backward<float>(const EdgeEncoderParams<float>&,
                                                  const EdgeEncoderDoubleBackward<float>&);
template void edge_encoder_double_backward<double>(const EdgeEncoderParams<double>&,
                                                   const EdgeEncoderDoubleBackward<double>&);

}  // namespace TRANSIP_KERNEL_NAMESPACE
}  // namespace transip
