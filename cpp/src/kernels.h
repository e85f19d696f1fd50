// Fused neighbour attention on the CPU: declarations shared by the op layer (ops.cpp) and the kernels,
// which are compiled once per instruction set (attention_kernels_{generic,avx512}.cpp).
//
// Layout: q, k, v are (N, H, D) contiguous; bias is (E, H); envelope (E,); edges are grouped by receiving atom
// in CSR form: row i owns edges row_ptr[i] .. row_ptr[i+1]-1 and senders[e] is the atom j that edge e reads.
// Function (per atom i, head h):
//   s_e = q_i . k_j / sqrt(D) + bias_e,   w_e = envelope_e * exp(s_e - m_i),   Z_i = sum_e w_e,
//   out_i = sum_e w_e v_j / Z_i  (out_i = 0 when Z_i = 0, as in the reference path).
#pragma once

#include <cstdint>

namespace transip {

struct AttentionShape {
  int64_t atoms;     // N
  int64_t edges;     // E
  int64_t heads;     // H
  int64_t head_dim;  // D
};

template <typename T>
struct AttentionInputs {
  const T* q;
  const T* k;
  const T* v;
  const T* bias;
  const T* envelope;
  const int64_t* row_ptr;
  const int64_t* senders;
};

// Forward: writes out (N, H, D) and the per-row softmax state m (running maximum) and Z (normaliser),
// (N, H) each, which the backward reuses instead of storing per-edge weights.
template <typename T>
struct AttentionForwardOutputs {
  T* out;
  T* row_max;
  T* row_sum;
};

// Backward, in two passes. Pass over receivers: grad_q, grad_bias (= dL/ds per edge and head),
// grad_envelope, and edge_weight (w_e / Z, per edge and head). Pass over senders (edges regrouped by sender
// with sender_ptr/sender_perm, so that no two threads write the same atom): grad_k and grad_v.
template <typename T>
struct AttentionBackwardArgs {
  const T* grad_out;
  const T* out;
  const T* row_max;
  const T* row_sum;
  T* grad_q;
  T* grad_k;
  T* grad_v;
  T* grad_bias;
  T* grad_envelope;
  T* edge_weight;
  const int64_t* receivers;    // receiving atom of each edge (expanded from row_ptr)
  const int64_t* sender_ptr;   // CSR over senders
  const int64_t* sender_perm;  // edges in sender order
};

// Edge encoder: displacement r_e (E, 3) -> features [r_e / cutoff, exp(-((|r_e| - c_k) / width)^2 / 2)] ->
// Linear(w1, b1) -> SiLU -> Linear(w2, b2) -> embedding (E, hidden), one edge at a time in registers-sized
// buffers. The backward gives the gradient with respect to r_e only (all that forces and virial need).
template <typename T>
struct EdgeEncoderParams {
  int64_t edges;
  int64_t num_rbf;
  int64_t hidden;
  const T* centers;  // (num_rbf,)
  T width;
  T cutoff;
  const T* w1;  // (hidden, 3 + num_rbf), nn.Linear layout
  const T* w1t; // the same transposed, (3 + num_rbf, hidden)
  const T* b1;
  const T* w2;  // (hidden, hidden)
  const T* w2t;
  const T* b2;
};

#define TRANSIP_DECLARE_KERNELS(NS)                                                                  \
  namespace NS {                                                                                     \
  bool built_with_avx512();                                                                          \
  template <typename T>                                                                              \
  void attention_forward(const AttentionShape& shape, const AttentionInputs<T>& in,                  \
                         const AttentionForwardOutputs<T>& result);                                  \
  template <typename T>                                                                              \
  void attention_backward(const AttentionShape& shape, const AttentionInputs<T>& in,                 \
                          const AttentionBackwardArgs<T>& args);                                     \
  template <typename T>                                                                              \
  void edge_encoder_forward(const EdgeEncoderParams<T>& p, const T* vectors, T* embedding);          \
  template <typename T>                                                                              \
  void edge_encoder_backward(const EdgeEncoderParams<T>& p, const T* vectors, const T* grad_embedding, \
                             T* grad_vectors);                                                       \
  }

TRANSIP_DECLARE_KERNELS(generic)
TRANSIP_DECLARE_KERNELS(avx512)

}  // namespace transip
