// Fused neighbour attention on the CPU: declarations shared by the op layer (ops.cpp) and the kernels,
// which are compiled once per instruction set (kernels_{generic,avx512}.cpp).
//
// Layout: q, k, v are (N, H, D) contiguous; bias is (E, H); envelope (E,); edges are grouped by receiving atom
// in CSR form: row i owns edges row_ptr[i] .. row_ptr[i+1]-1 and senders[e] is the atom j that edge e reads.
// Function (per atom i, head h):
//   s_e = q_i . k_j / sqrt(D) + bias_e,   w_e = envelope_e * exp(s_e - m_i),   Z_i = sum_e w_e,
//   out_i = sum_e w_e [v_j, u_e] / Z_i  (out_i = 0 when Z_i = 0, as in the reference path),
// where u_e (F values of the edge itself, the same for every head; F may be 0) is appended to each head's v_j, so
// out is (N, H, D + F).
#pragma once

#include <cstdint>

namespace transip {

struct AttentionShape {
  int64_t atoms;     // N
  int64_t edges;     // E
  int64_t heads;     // H
  int64_t head_dim;  // D
  int64_t value_width;  // F: edge values appended to each head's values (0: none)
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
  const T* self_bias;  // (H,) or null: every row also holds the edge (i, i) with this bias and envelope 1
  const T* edge_values;  // (E, F) or null (F = 0)
  const T* self_values;  // (F,): the self edge's values (when there is a self edge and F > 0)
};

// Forward: writes out (N, H, D + F) and the softmax state the backward and double backward read instead of
// recomputing the scores: row_exp, exp(s - m) of every edge of every row (m the row's maximum score), rows one
// after another with the self edge first ((E + N, H) with a self edge, (E, H) without: as many values as the
// biases), and Z, the row's normaliser (N, H).
template <typename T>
struct AttentionForwardOutputs {
  T* out;
  T* row_exp;
  T* row_sum;
};

// Backward, in two passes. Pass over receivers: grad_q, grad_bias (= dL/ds per edge and head),
// grad_envelope, and edge_weight (w_e / Z, per edge and head). Pass over senders (edges regrouped by sender
// with sender_ptr/sender_perm, so that no two threads write the same atom): grad_k and grad_v.
template <typename T>
struct AttentionBackwardArgs {
  const T* grad_out;
  const T* out;
  const T* row_exp;
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
  T* self_grad;                // (N, H): dL/ds of each atom's self edge (summed into grad_self_bias)
  T* self_weight;              // (N, H): its w / Z
  T* grad_edge_values;         // (E, F) when F > 0
  T* self_values_grad;         // (N, F) when F > 0 and there is a self edge (summed into grad_self_values)
};

// Double backward (the backward of the backward, which training with a force loss needs). With phi = g . out(x)
// the backward returns grad_x phi; given cotangents c for those outputs (shaped like the inputs x), it returns
//   dL/dg = J_out(x) c              (the forward's directional derivative along c: shaped like out)
//   dL/dx = Hessian_x(phi) c        (the backward's directional derivative along c, g held fixed)
// both in one pass over receivers (everything per row and per edge) and one over senders (k and v), as the
// backward does. `t*` are the cotangents, named after the inputs they are shaped like.
template <typename T>
struct AttentionDoubleBackwardArgs {
  const T* grad_out;  // g (N, H, D + F)
  const T* out;
  const T* row_exp;
  const T* row_sum;
  const T* tq;  // (N, H, D)
  const T* tk;
  const T* tv;
  const T* tbias;         // (E, H)
  const T* tenvelope;     // (E,)
  const T* tself_bias;    // (H,) when there is a self edge
  const T* tedge_values;  // (E, F) when F > 0
  const T* tself_values;  // (F,) when F > 0 and there is a self edge
  T* grad_grad_out;       // (N, H, D + F)
  T* grad_q;              // (N, H, D)
  T* grad_k;
  T* grad_v;
  T* grad_bias;           // (E, H)
  T* grad_envelope;       // (E,)
  T* grad_edge_values;    // (E, F) when F > 0
  T* edge_ds;             // scratch (E, H): dL/ds of the backward (its grad_bias)
  T* edge_dw;             // scratch (E, H): the tangent of each edge's normalised weight
  T* self_ds;             // (N, H) the self edge's dL/ds, its tangent and its weight's tangent
  T* self_dds;
  T* self_dw;
  T* self_values_grad;    // (N, F): summed into the self values' gradient
  const int64_t* receivers;
  const int64_t* sender_ptr;
  const int64_t* sender_perm;
};

// Edge encoder: everything the model computes per neighbour edge besides attention, in one pass, with no
// per-edge hidden-sized tensor in memory. For edge e with displacement r_e (receiver i, slot = (i, species of
// the sender)):
//   features  f_e = [r_e / cutoff, exp(-((|r_e| - c_k) / width)^2 / 2)]
//   embedding a_e = w2 SiLU(w1 f_e + b1) + b2                                   (kept in a per-thread buffer)
//   bias_e    = wb a_e + bb           (attention biases of every layer: num_bias = groups x heads, written as
//                                      (groups, E, heads) so that each layer's slice is contiguous)
//   envelope_e = f_c(|r_e|)            (1 - 10x^3 + 15x^4 - 6x^5, x = |r_e| / cutoff; 0 beyond)
//   pooled[slot]        += envelope_e a_e,   pooled_weight[slot] += envelope_e
// and, when asked for, f_e itself (the edge values every attention block reads: the model's block geometry), so
// that no separate pass builds them. The backward returns the gradient with respect to r_e (all that forces and
// virial need), with the incoming gradient of f_e, when given, added to the one from the first layer.
template <typename T>
struct EdgeEncoderParams {
  int64_t edges;
  int64_t num_rbf;
  int64_t hidden;
  int64_t num_bias;
  int64_t bias_groups;
  const T* centers;  // (num_rbf,)
  T width;
  T cutoff;
  const T* w1;   // (hidden, 3 + num_rbf), nn.Linear layout
  const T* w1t;  // its transpose
  const T* b1;
  const T* w2;  // (hidden, hidden)
  const T* w2t;
  const T* b2;
  const T* wb;  // (num_bias, hidden)
  const T* wbt;
  const T* bb;
};

template <typename T>
struct EdgeEncoderForward {
  const T* vectors;          // (E, 3)
  int64_t num_slots;
  const int64_t* slot_ptr;   // edges grouped by slot (CSR), so each thread owns whole slots
  const int64_t* slot_perm;
  T* bias;                   // (groups, E, heads)
  T* pooled;                 // (num_slots, hidden)
  T* pooled_weight;          // (num_slots,)
  T* envelope;               // (E,)
  T* features;               // (E, 3 + num_rbf), or null: not asked for
};

// The parameters' gradients, laid out one after another in one buffer of weight_grad_size(p) values:
// w1 (hidden, 3 + num_rbf), b1, w2 (hidden, hidden), b2, wb (num_bias, hidden), bb.
template <typename T>
inline int64_t weight_grad_size(const EdgeEncoderParams<T>& p) {
  const int64_t H = p.hidden, in = 3 + p.num_rbf;
  return H * in + H + H * H + H + p.num_bias * H + p.num_bias;
}

template <typename T>
struct EdgeEncoderBackward {
  const T* vectors;
  const int64_t* slot;  // (E,)
  const T* grad_bias;
  const T* grad_pooled;
  const T* grad_pooled_weight;
  const T* grad_envelope;
  const T* grad_features;  // (E, 3 + num_rbf), or null: the features were not an output
  T* grad_vectors;
  T* grad_weights;  // weight_grad_size values (training), or null: gradient with respect to r_e only
};

// Training's second derivative: the backward above is linear in its incoming gradients and a function of r_e and
// the weights; a force loss differentiates its output grad_vectors again. Given the cotangent dot_vectors of
// grad_vectors, this returns the gradients of <dot_vectors, grad_vectors> with respect to every input of the
// backward: the incoming gradients (which equal the forward's outputs' directional derivatives along
// dot_vectors), r_e and the weights. Edges are visited per slot (CSR), so the per-slot sums need no atomics.
template <typename T>
struct EdgeEncoderDoubleBackward {
  const T* vectors;
  const T* dot_vectors;
  int64_t num_slots;
  const int64_t* slot_ptr;
  const int64_t* slot_perm;
  const T* grad_bias;           // (groups, E, heads)
  const T* grad_pooled;         // (num_slots, hidden)
  const T* grad_pooled_weight;  // (num_slots,)
  const T* grad_envelope;       // (E,)
  const T* grad_features;       // (E, 3 + num_rbf), or null
  T* d_grad_bias;               // outputs, shaped as the inputs above
  T* d_grad_pooled;
  T* d_grad_pooled_weight;
  T* d_grad_envelope;
  T* d_grad_features;           // null exactly when grad_features is
  T* d_vectors;                 // (E, 3)
  T* grad_weights;              // weight_grad_size values
};

#define TRANSIP_DECLARE_KERNELS(NS)                                                                  \
  namespace NS {                                                                                     \
  bool built_with_avx512();                                                                          \
  int64_t within_cutoff(const double* x, const double* y, const double* z, int64_t count,           \
                        const double* center, double cutoff2, int64_t* kept);                        \
  template <typename T>                                                                              \
  void attention_forward(const AttentionShape& shape, const AttentionInputs<T>& in,                  \
                         const AttentionForwardOutputs<T>& result);                                  \
  template <typename T>                                                                              \
  void attention_backward(const AttentionShape& shape, const AttentionInputs<T>& in,                 \
                          const AttentionBackwardArgs<T>& args);                                     \
  template <typename T>                                                                              \
  void attention_double_backward(const AttentionShape& shape, const AttentionInputs<T>& in,          \
                                 const AttentionDoubleBackwardArgs<T>& args);                        \
  template <typename T>                                                                              \
  void edge_encoder_forward(const EdgeEncoderParams<T>& p, const EdgeEncoderForward<T>& io);          \
  template <typename T>                                                                              \
  void edge_encoder_backward(const EdgeEncoderParams<T>& p, const EdgeEncoderBackward<T>& io);        \
  template <typename T>                                                                              \
  void edge_encoder_double_backward(const EdgeEncoderParams<T>& p,                                   \
                                    const EdgeEncoderDoubleBackward<T>& io);                         \
  }

TRANSIP_DECLARE_KERNELS(generic)
TRANSIP_DECLARE_KERNELS(avx512)

// Whether the kernels run from the AVX-512 build (the CPU has it, the compiler built it, and TRANSIP_ISA does
// not ask for the portable one).
bool use_avx512();

}  // namespace transip
