// The TORCH_LIBRARY registration of TransIP's native ops, with argument checks and autograd.
//
//   transip::neighbor_attention(q, k, v, bias, envelope, row_ptr, senders, self_bias?, edge_values?,
//       self_values?) -> out (atoms, heads, head_dim + F)
//       (differentiable once; with self_bias every row also holds its own atom, bias self_bias, envelope 1 and
//       edge values self_values; edge_values (E, F) are appended to every head's values)
//   transip::neighbor_attention_forward(...)  -> (out, row_exp, row_sum)  (row_exp: exp(s - m) per edge and
//       head, rows in turn with the self edge first; row_sum: each row's normaliser; kernels.h)
//   transip::neighbor_attention_backward(grad_out, q, k, v, bias, envelope, row_ptr, senders, self_bias?,
//       edge_values?, self_values?, out, row_exp, row_sum)
//       -> (grad_q, grad_k, grad_v, grad_bias, grad_envelope, grad_self_bias, grad_edge_values, grad_self_values)
//   transip::edge_encoder(vectors, slot, num_slots, centers, width, cutoff, w1, b1, w2, b2, wb, bb, bias_groups,
//       features) -> (bias (groups, E, heads), pooled, pooled_weight, envelope, features (E, 3 + num_rbf), or
//       (E, 0) unless `features`)  (differentiable once, in `vectors` only)
//   transip::edge_encoder_backward(grad_bias, grad_pooled, grad_pooled_weight, grad_envelope, vectors, slot,
//                                  centers, width, cutoff, w1, b1, w2, b2, wb, bb, bias_groups, grad_features?)
//       -> grad_vectors
//   transip::edge_encoder_train_backward(same arguments) -> (grad_vectors, grad_weights)  (training: the weights'
//       gradients as one flat tensor, w1, b1, w2, b2, wb, bb in turn)
//   transip::edge_encoder_double_backward(dot_vectors, same arguments)
//       -> (d grad_bias, d grad_pooled, d grad_pooled_weight, d grad_envelope, d vectors, grad_weights,
//           d grad_features (empty without grad_features))
//       (the gradients of <dot_vectors, grad_vectors>: what a force loss needs; transip/kernels.py wires both
//       into autograd for training)
//   transip::neighbor_list(positions, cell?, pbc?, cutoff) -> (edge_index, shifts)
//   transip::csr_order(index, num_rows) -> (perm, row_ptr)
//   transip::edge_vectors(positions, receivers, senders, shift_vectors) -> (E, 3)  (not differentiable)
//   transip::edge_forces(g, receivers, senders, num_atoms) -> (num_atoms, 3)  (not differentiable)
//   transip::version() -> str,  transip::isa() -> str,  transip::keep_freed_memory() -> bool
//
// Loading this library (from Python through `import transip`, or with torch.ops.load_library / dlopen from
// C++ engines) registers the ops, so TorchScript models that call them run anywhere the library is loaded.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <malloc.h>

#include <cstdlib>
#include <limits>
#include <optional>
#include <string>

#include "edge_geometry.h"
#include "kernels.h"
#include "neighbor_list.h"

#ifndef TRANSIP_VERSION
#define TRANSIP_VERSION "unknown"
#endif

namespace transip {

// glibc returns every block above 32 MB to the system when it is freed, so each evaluation of a large
// system pays page faults again for all its big tensors (measured: a third of the time at 100 000 atoms
// on this project's machines). Keeping freed memory in the heap makes later evaluations reuse it. Opt-in,
// since it changes the process's allocator: MD drivers call it once.
bool keep_freed_memory() {
#if defined(__GLIBC__)
  return mallopt(M_MMAP_MAX, 0) == 1 && mallopt(M_TRIM_THRESHOLD, std::numeric_limits<int>::max()) == 1;
#else
  return false;
#endif
}
std::string version() { return TRANSIP_VERSION; }

// The instruction set the kernels run with: AVX-512 when the CPU has it and the compiler built it,
// otherwise the portable build. TRANSIP_ISA=generic forces the portable build (for testing it).
bool use_avx512() {
  static const bool value = [] {
    const char* forced = std::getenv("TRANSIP_ISA");
    if (forced != nullptr && std::string(forced) == "generic") return false;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    return avx512::built_with_avx512() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw");
#else
    return false;
#endif
  }();
  return value;
}

namespace {

using at::Tensor;

std::string isa() { return use_avx512() ? "avx512" : "generic"; }

void check_attention_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& bias,
                            const Tensor& envelope, const Tensor& row_ptr, const Tensor& senders,
                            const std::optional<Tensor>& self_bias, const std::optional<Tensor>& edge_values,
                            const std::optional<Tensor>& self_values) {
  const char* op = "transip::neighbor_attention: ";
  TORCH_CHECK(q.dim() == 3, op, "q must have shape (atoms, heads, head_dim), got ", q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(), op, "q, k and v must have the same shape, got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble, op,
              "q, k, v must be float32 or float64, got ", q.scalar_type());
  for (const Tensor* t : {&k, &v, &bias, &envelope})
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), op, "all floating inputs must share q's dtype ",
                q.scalar_type(), ", got ", t->scalar_type());
  for (const Tensor* t : {&q, &k, &v, &bias, &envelope, &row_ptr, &senders})
    TORCH_CHECK(t->device().is_cpu(), op, "inputs must be on the CPU, got ", t->device());
  const int64_t atoms = q.size(0), heads = q.size(1);
  TORCH_CHECK(row_ptr.dim() == 1 && row_ptr.scalar_type() == at::kLong && row_ptr.numel() == atoms + 1, op,
              "row_ptr must be int64 of length atoms + 1 = ", atoms + 1, ", got ", row_ptr.scalar_type(), " ",
              row_ptr.sizes());
  TORCH_CHECK(senders.dim() == 1 && senders.scalar_type() == at::kLong, op, "senders must be 1-D int64, got ",
              senders.scalar_type(), " ", senders.sizes());
  const int64_t edges = senders.numel();
  TORCH_CHECK(bias.dim() == 2 && bias.size(0) == edges && bias.size(1) == heads, op, "bias must have shape (edges, heads) = (",
              edges, ", ", heads, "), got ", bias.sizes());
  TORCH_CHECK(envelope.dim() == 1 && envelope.numel() == edges, op, "envelope must have shape (edges,) = (", edges,
              "), got ", envelope.sizes());
  if (self_bias.has_value()) {
    TORCH_CHECK(self_bias->dim() == 1 && self_bias->numel() == heads && self_bias->scalar_type() == q.scalar_type() &&
                    self_bias->device().is_cpu(),
                op, "self_bias must be a CPU tensor of shape (heads,) = (", heads, ") and dtype ", q.scalar_type(),
                ", got ", self_bias->scalar_type(), " ", self_bias->sizes());
  }
  if (edge_values.has_value()) {
    TORCH_CHECK(edge_values->dim() == 2 && edge_values->size(0) == edges && edge_values->scalar_type() == q.scalar_type() &&
                    edge_values->device().is_cpu(),
                op, "edge_values must be a CPU tensor of shape (edges, F) with edges = ", edges, " and dtype ",
                q.scalar_type(), ", got ", edge_values->scalar_type(), " ", edge_values->sizes());
    const int64_t width = edge_values->size(1);
    TORCH_CHECK(self_values.has_value() == self_bias.has_value(), op,
                "with edge_values, give self_values exactly when self_bias is given (the self edge's values)");
    if (self_values.has_value())
      TORCH_CHECK(self_values->dim() == 1 && self_values->numel() == width &&
                      self_values->scalar_type() == q.scalar_type() && self_values->device().is_cpu(),
                  op, "self_values must be a CPU tensor of shape (F,) = (", width, ") and dtype ", q.scalar_type(),
                  ", got ", self_values->scalar_type(), " ", self_values->sizes());
  } else {
    TORCH_CHECK(!self_values.has_value(), op, "self_values needs edge_values");
  }
  const Tensor rp = row_ptr.contiguous();
  const int64_t* p = rp.data_ptr<int64_t>();
  TORCH_CHECK(p[0] == 0 && p[atoms] == edges, op, "row_ptr must start at 0 and end at the number of edges ", edges,
              ", got ", p[0], " and ", p[atoms]);
  for (int64_t i = 0; i < atoms; ++i)
    TORCH_CHECK(p[i] <= p[i + 1], op, "row_ptr must be non-decreasing (edges grouped by receiver), but row ", i,
                " has ", p[i], " > ", p[i + 1]);
  if (edges > 0) {
    const auto [lo, hi] = at::aminmax(senders);
    TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < atoms, op, "senders must lie in [0, ", atoms,
                "), got values from ", lo.item<int64_t>(), " to ", hi.item<int64_t>());
  }
}

// The optional inputs, contiguous; undefined tensors where absent.
struct OptionalInputs {
  Tensor self_bias, edge_values, self_values;
  OptionalInputs(const std::optional<Tensor>& self_bias_in, const std::optional<Tensor>& edge_values_in,
                 const std::optional<Tensor>& self_values_in)
      : self_bias(self_bias_in.has_value() ? self_bias_in->contiguous() : Tensor()),
        edge_values(edge_values_in.has_value() ? edge_values_in->contiguous() : Tensor()),
        self_values(self_values_in.has_value() ? self_values_in->contiguous() : Tensor()) {}
  int64_t value_width() const { return edge_values.defined() ? edge_values.size(1) : 0; }
};

template <typename T>
const T* pointer_or_null(const Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

template <typename T>
AttentionInputs<T> attention_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& bias,
                                    const Tensor& envelope, const Tensor& row_ptr, const Tensor& senders,
                                    const OptionalInputs& optional) {
  return {q.data_ptr<T>(),
          k.data_ptr<T>(),
          v.data_ptr<T>(),
          bias.data_ptr<T>(),
          envelope.data_ptr<T>(),
          row_ptr.data_ptr<int64_t>(),
          senders.data_ptr<int64_t>(),
          pointer_or_null<T>(optional.self_bias),
          pointer_or_null<T>(optional.edge_values),
          pointer_or_null<T>(optional.self_values)};
}

std::tuple<Tensor, Tensor, Tensor> attention_forward_cpu(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                                         const Tensor& bias_in, const Tensor& envelope_in,
                                                         const Tensor& row_ptr_in, const Tensor& senders_in,
                                                         const std::optional<Tensor>& self_bias_in,
                                                         const std::optional<Tensor>& edge_values_in,
                                                         const std::optional<Tensor>& self_values_in) {
  check_attention_inputs(q_in, k_in, v_in, bias_in, envelope_in, row_ptr_in, senders_in, self_bias_in,
                         edge_values_in, self_values_in);
  const OptionalInputs optional(self_bias_in, edge_values_in, self_values_in);
  const Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous(), bias = bias_in.contiguous(),
               envelope = envelope_in.contiguous(), row_ptr = row_ptr_in.contiguous(),
               senders = senders_in.contiguous();
  const AttentionShape shape{q.size(0), senders.numel(), q.size(1), q.size(2), optional.value_width()};
  Tensor out = at::empty({shape.atoms, shape.heads, shape.head_dim + shape.value_width}, q.options());
  const int64_t self_edges = optional.self_bias.defined() ? shape.atoms : 0;
  Tensor row_exp = at::empty({shape.edges + self_edges, shape.heads}, q.options());
  Tensor row_sum = at::empty({shape.atoms, shape.heads}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "transip::neighbor_attention_forward", [&] {
    const auto in = attention_inputs<scalar_t>(q, k, v, bias, envelope, row_ptr, senders, optional);
    const AttentionForwardOutputs<scalar_t> result{out.data_ptr<scalar_t>(), row_exp.data_ptr<scalar_t>(),
                                                   row_sum.data_ptr<scalar_t>()};
    if (use_avx512())
      avx512::attention_forward<scalar_t>(shape, in, result);
    else
      generic::attention_forward<scalar_t>(shape, in, result);
  });
  return {out, row_exp, row_sum};
}

// What the backward and the double backward both take: the forward's inputs, its output and softmax state, and
// the incoming gradient, checked and contiguous; with each edge's receiver and the edges regrouped by sender for
// the race-free pass over senders.
struct SavedAttention {
  OptionalInputs optional;
  Tensor q, k, v, bias, envelope, row_ptr, senders, grad_out, out, row_exp, row_sum, receivers, sender_perm,
      sender_ptr;
  AttentionShape shape;

  SavedAttention(const char* op, const Tensor& grad_out_in, const Tensor& q_in, const Tensor& k_in,
                 const Tensor& v_in, const Tensor& bias_in, const Tensor& envelope_in, const Tensor& row_ptr_in,
                 const Tensor& senders_in, const std::optional<Tensor>& self_bias_in,
                 const std::optional<Tensor>& edge_values_in, const std::optional<Tensor>& self_values_in,
                 const Tensor& out_in, const Tensor& row_exp_in, const Tensor& row_sum_in)
      // The comma runs the checks before `optional`, the first member, is built from the inputs.
      : optional((check_attention_inputs(q_in, k_in, v_in, bias_in, envelope_in, row_ptr_in, senders_in,
                                         self_bias_in, edge_values_in, self_values_in),
                  self_bias_in),
                 edge_values_in, self_values_in) {
    const int64_t width = optional.value_width();
    const std::vector<int64_t> out_shape{q_in.size(0), q_in.size(1), q_in.size(2) + width};
    TORCH_CHECK(grad_out_in.sizes() == out_shape && out_in.sizes() == out_shape, op,
                ": grad_out and out must have shape (atoms, heads, head_dim + F) = ", c10::IntArrayRef(out_shape),
                ", got ", grad_out_in.sizes(), " and ", out_in.sizes());
    TORCH_CHECK(row_sum_in.dim() == 2 && row_sum_in.size(0) == q_in.size(0) && row_sum_in.size(1) == q_in.size(1),
                op, ": row_sum must have shape (atoms, heads), got ", row_sum_in.sizes());
    const int64_t rows = senders_in.numel() + (optional.self_bias.defined() ? q_in.size(0) : 0);
    TORCH_CHECK(row_exp_in.dim() == 2 && row_exp_in.size(0) == rows && row_exp_in.size(1) == q_in.size(1), op,
                ": row_exp must have shape (edges + self edges, heads) = (", rows, ", ", q_in.size(1), "), got ",
                row_exp_in.sizes());
    q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous(), bias = bias_in.contiguous();
    envelope = envelope_in.contiguous(), row_ptr = row_ptr_in.contiguous(), senders = senders_in.contiguous();
    grad_out = grad_out_in.to(q.scalar_type()).contiguous(), out = out_in.contiguous();
    row_exp = row_exp_in.contiguous(), row_sum = row_sum_in.contiguous();
    shape = AttentionShape{q.size(0), senders.numel(), q.size(1), q.size(2), width};
    receivers = at::repeat_interleave(at::arange(shape.atoms, row_ptr.options()), row_ptr.diff(), /*dim=*/0,
                                      /*output_size=*/shape.edges);
    std::tie(sender_perm, sender_ptr) = csr_order(senders, shape.atoms);
  }
};

using BackwardOutputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

BackwardOutputs attention_backward_cpu(const Tensor& grad_out_in, const Tensor& q_in, const Tensor& k_in,
                                       const Tensor& v_in, const Tensor& bias_in, const Tensor& envelope_in,
                                       const Tensor& row_ptr_in, const Tensor& senders_in,
                                       const std::optional<Tensor>& self_bias_in,
                                       const std::optional<Tensor>& edge_values_in,
                                       const std::optional<Tensor>& self_values_in, const Tensor& out_in,
                                       const Tensor& row_exp_in, const Tensor& row_sum_in) {
  const SavedAttention a("transip::neighbor_attention_backward", grad_out_in, q_in, k_in, v_in, bias_in,
                         envelope_in, row_ptr_in, senders_in, self_bias_in, edge_values_in, self_values_in, out_in,
                         row_exp_in, row_sum_in);
  const OptionalInputs& optional = a.optional;
  const Tensor &q = a.q, &k = a.k, &v = a.v, &bias = a.bias, &envelope = a.envelope, &row_ptr = a.row_ptr,
               &senders = a.senders, &grad_out = a.grad_out, &out = a.out, &row_exp = a.row_exp,
               &row_sum = a.row_sum, &receivers = a.receivers, &sender_perm = a.sender_perm,
               &sender_ptr = a.sender_ptr;
  const AttentionShape& shape = a.shape;
  const int64_t width = shape.value_width;
  Tensor grad_q = at::empty_like(q), grad_k = at::empty_like(k), grad_v = at::empty_like(v);
  Tensor grad_edge_values = width > 0 ? at::empty({shape.edges, width}, q.options()) : Tensor();
  Tensor self_values_grad = width > 0 && optional.self_bias.defined() ? at::empty({shape.atoms, width}, q.options())
                                                                      : Tensor();
  Tensor grad_bias = at::empty_like(bias), grad_envelope = at::empty_like(envelope);
  Tensor edge_weight = at::empty_like(bias);
  Tensor self_grad = at::zeros({shape.atoms, shape.heads}, q.options());
  Tensor self_weight = at::zeros({shape.atoms, shape.heads}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "transip::neighbor_attention_backward", [&] {
    const auto in = attention_inputs<scalar_t>(q, k, v, bias, envelope, row_ptr, senders, optional);
    const AttentionBackwardArgs<scalar_t> args{
        grad_out.data_ptr<scalar_t>(),      out.data_ptr<scalar_t>(),        row_exp.data_ptr<scalar_t>(),
        row_sum.data_ptr<scalar_t>(),       grad_q.data_ptr<scalar_t>(),     grad_k.data_ptr<scalar_t>(),
        grad_v.data_ptr<scalar_t>(),        grad_bias.data_ptr<scalar_t>(),  grad_envelope.data_ptr<scalar_t>(),
        edge_weight.data_ptr<scalar_t>(),   receivers.data_ptr<int64_t>(),   sender_ptr.data_ptr<int64_t>(),
        sender_perm.data_ptr<int64_t>(),   self_grad.data_ptr<scalar_t>(),  self_weight.data_ptr<scalar_t>(),
        grad_edge_values.defined() ? grad_edge_values.data_ptr<scalar_t>() : nullptr,
        self_values_grad.defined() ? self_values_grad.data_ptr<scalar_t>() : nullptr};
    if (use_avx512())
      avx512::attention_backward<scalar_t>(shape, in, args);
    else
      generic::attention_backward<scalar_t>(shape, in, args);
  });
  Tensor grad_self_bias = optional.self_bias.defined() ? self_grad.sum(0) : Tensor();
  Tensor grad_self_values = self_values_grad.defined() ? self_values_grad.sum(0) : Tensor();
  return {grad_q, grad_k, grad_v, grad_bias, grad_envelope, grad_self_bias, grad_edge_values, grad_self_values};
}

using DoubleBackwardOutputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// The cotangent of an output autograd left undefined (nothing used it) is zero.
Tensor or_zeros(const std::optional<Tensor>& t, const Tensor& like) {
  return t.has_value() && t->defined() ? t->to(like.scalar_type()).contiguous() : at::zeros_like(like);
}

DoubleBackwardOutputs attention_double_backward_cpu(
    const Tensor& grad_out_in, const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, const Tensor& bias_in,
    const Tensor& envelope_in, const Tensor& row_ptr_in, const Tensor& senders_in,
    const std::optional<Tensor>& self_bias_in, const std::optional<Tensor>& edge_values_in,
    const std::optional<Tensor>& self_values_in, const Tensor& out_in, const Tensor& row_exp_in,
    const Tensor& row_sum_in, const std::optional<Tensor>& tq_in, const std::optional<Tensor>& tk_in,
    const std::optional<Tensor>& tv_in, const std::optional<Tensor>& tbias_in,
    const std::optional<Tensor>& tenvelope_in, const std::optional<Tensor>& tself_bias_in,
    const std::optional<Tensor>& tedge_values_in, const std::optional<Tensor>& tself_values_in) {
  const SavedAttention a("transip::neighbor_attention_double_backward", grad_out_in, q_in, k_in, v_in, bias_in,
                         envelope_in, row_ptr_in, senders_in, self_bias_in, edge_values_in, self_values_in, out_in,
                         row_exp_in, row_sum_in);
  const OptionalInputs& optional = a.optional;
  const Tensor &q = a.q, &k = a.k, &v = a.v, &bias = a.bias, &envelope = a.envelope, &row_ptr = a.row_ptr,
               &senders = a.senders, &grad_out = a.grad_out, &out = a.out, &row_exp = a.row_exp,
               &row_sum = a.row_sum, &receivers = a.receivers, &sender_perm = a.sender_perm,
               &sender_ptr = a.sender_ptr;
  const AttentionShape& shape = a.shape;
  const int64_t width = shape.value_width;
  const std::vector<int64_t> out_shape{shape.atoms, shape.heads, shape.head_dim + width};
  const Tensor tq = or_zeros(tq_in, q), tk = or_zeros(tk_in, k), tv = or_zeros(tv_in, v),
               tbias = or_zeros(tbias_in, bias), tenvelope = or_zeros(tenvelope_in, envelope);
  const Tensor tself_bias = optional.self_bias.defined() ? or_zeros(tself_bias_in, optional.self_bias) : Tensor();
  const Tensor tedge_values = width > 0 ? or_zeros(tedge_values_in, optional.edge_values) : Tensor();
  const Tensor tself_values =
      width > 0 && optional.self_values.defined() ? or_zeros(tself_values_in, optional.self_values) : Tensor();
  Tensor grad_grad_out = at::empty(out_shape, q.options());
  Tensor grad_q = at::empty_like(q), grad_k = at::empty_like(k), grad_v = at::empty_like(v);
  Tensor grad_bias = at::empty_like(bias), grad_envelope = at::empty_like(envelope);
  Tensor edge_ds = at::empty_like(bias), edge_dw = at::empty_like(bias);
  Tensor self_ds = at::zeros({shape.atoms, shape.heads}, q.options()), self_dds = at::zeros_like(self_ds),
         self_dw = at::zeros_like(self_ds);
  Tensor grad_edge_values = width > 0 ? at::empty({shape.edges, width}, q.options()) : Tensor();
  Tensor self_values_grad = tself_values.defined() ? at::empty({shape.atoms, width}, q.options()) : Tensor();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "transip::neighbor_attention_double_backward", [&] {
    const auto in = attention_inputs<scalar_t>(q, k, v, bias, envelope, row_ptr, senders, optional);
    const AttentionDoubleBackwardArgs<scalar_t> args{
        grad_out.data_ptr<scalar_t>(),       out.data_ptr<scalar_t>(),
        row_exp.data_ptr<scalar_t>(),        row_sum.data_ptr<scalar_t>(),
        tq.data_ptr<scalar_t>(),             tk.data_ptr<scalar_t>(),
        tv.data_ptr<scalar_t>(),             tbias.data_ptr<scalar_t>(),
        tenvelope.data_ptr<scalar_t>(),      pointer_or_null<scalar_t>(tself_bias),
        pointer_or_null<scalar_t>(tedge_values), pointer_or_null<scalar_t>(tself_values),
        grad_grad_out.data_ptr<scalar_t>(),  grad_q.data_ptr<scalar_t>(),
        grad_k.data_ptr<scalar_t>(),         grad_v.data_ptr<scalar_t>(),
        grad_bias.data_ptr<scalar_t>(),      grad_envelope.data_ptr<scalar_t>(),
        grad_edge_values.defined() ? grad_edge_values.data_ptr<scalar_t>() : nullptr,
        edge_ds.data_ptr<scalar_t>(),        edge_dw.data_ptr<scalar_t>(),
        self_ds.data_ptr<scalar_t>(),        self_dds.data_ptr<scalar_t>(),
        self_dw.data_ptr<scalar_t>(),
        self_values_grad.defined() ? self_values_grad.data_ptr<scalar_t>() : nullptr,
        receivers.data_ptr<int64_t>(),       sender_ptr.data_ptr<int64_t>(),
        sender_perm.data_ptr<int64_t>()};
    if (use_avx512())
      avx512::attention_double_backward<scalar_t>(shape, in, args);
    else
      generic::attention_double_backward<scalar_t>(shape, in, args);
  });
  Tensor grad_self_bias = optional.self_bias.defined() ? self_dds.sum(0) : Tensor();
  Tensor grad_self_values = self_values_grad.defined() ? self_values_grad.sum(0) : Tensor();
  return {grad_grad_out, grad_q, grad_k, grad_v, grad_bias, grad_envelope, grad_self_bias, grad_edge_values,
          grad_self_values};
}

// The backward as a differentiable function: its own backward is the double backward above, so training with a
// force loss (create_graph) runs on the fused kernel. The double backward itself is differentiable no further.
class NeighborAttentionBackward : public torch::autograd::Function<NeighborAttentionBackward> {
 public:
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const Tensor& grad_out, const Tensor& q, const Tensor& k,
      const Tensor& v, const Tensor& bias, const Tensor& envelope, const Tensor& row_ptr, const Tensor& senders,
      const std::optional<Tensor>& self_bias, const std::optional<Tensor>& edge_values,
      const std::optional<Tensor>& self_values, const Tensor& out, const Tensor& row_exp, const Tensor& row_sum) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("transip::neighbor_attention_backward", "")
                         .typed<BackwardOutputs(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                const std::optional<Tensor>&, const std::optional<Tensor>&,
                                                const std::optional<Tensor>&, const Tensor&, const Tensor&,
                                                const Tensor&)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [gq, gk, gv, gbias, genv, gself, gvalues, gself_values] = op.call(
        grad_out, q, k, v, bias, envelope, row_ptr, senders, self_bias, edge_values, self_values, out, row_exp,
        row_sum);
    ctx->save_for_backward({grad_out, q, k, v, bias, envelope, row_ptr, senders, self_bias.value_or(Tensor()),
                            edge_values.value_or(Tensor()), self_values.value_or(Tensor()), out, row_exp, row_sum});
    // A function's outputs must be defined: the gradients of absent inputs are empty (the caller drops them).
    const auto or_empty = [&](const Tensor& t) { return t.defined() ? t : at::empty({0}, q.options()); };
    return {gq, gk, gv, gbias, genv, or_empty(gself), or_empty(gvalues), or_empty(gself_values)};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list cotangents) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "transip::neighbor_attention: the fused kernel is differentiable twice (training with a force "
                "loss); a third derivative needs the reference kernel: call model.set_kernel('reference')");
    static auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("transip::neighbor_attention_double_backward", "")
            .typed<DoubleBackwardOutputs(
                const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                const Tensor&, const Tensor&, const std::optional<Tensor>&, const std::optional<Tensor>&,
                const std::optional<Tensor>&, const Tensor&, const Tensor&, const Tensor&,
                const std::optional<Tensor>&, const std::optional<Tensor>&, const std::optional<Tensor>&,
                const std::optional<Tensor>&, const std::optional<Tensor>&, const std::optional<Tensor>&,
                const std::optional<Tensor>&, const std::optional<Tensor>&)>();
    const auto saved = ctx->get_saved_variables();
    const auto optional = [](const Tensor& t) { return t.defined() ? std::optional<Tensor>(t) : std::nullopt; };
    auto [ggo, gq, gk, gv, gbias, genv, gself, gvalues, gself_values] = op.call(
        saved[0], saved[1], saved[2], saved[3], saved[4], saved[5], saved[6], saved[7], optional(saved[8]),
        optional(saved[9]), optional(saved[10]), saved[11], saved[12], saved[13], optional(cotangents[0]),
        optional(cotangents[1]), optional(cotangents[2]), optional(cotangents[3]), optional(cotangents[4]),
        optional(cotangents[5]), optional(cotangents[6]), optional(cotangents[7]));
    return {ggo, gq, gk, gv, gbias, genv, Tensor(), Tensor(), gself, gvalues, gself_values,
            Tensor(), Tensor(), Tensor()};
  }
};

// Autograd: forward and backward both go through the dispatcher so that profilers and TorchScript see them.
// The backward itself is not differentiable (training with a force loss needs second derivatives and uses
// the reference path); asking for it fails with a message instead of silently wrong gradients.
class NeighborAttention : public torch::autograd::Function<NeighborAttention> {
 public:
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                        const Tensor& bias, const Tensor& envelope, const Tensor& row_ptr, const Tensor& senders,
                        const std::optional<Tensor>& self_bias, const std::optional<Tensor>& edge_values,
                        const std::optional<Tensor>& self_values) {
    static auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("transip::neighbor_attention_forward", "")
            .typed<std::tuple<Tensor, Tensor, Tensor>(
                const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                const Tensor&, const std::optional<Tensor>&, const std::optional<Tensor>&,
                const std::optional<Tensor>&)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, row_exp, row_sum] =
        op.call(q, k, v, bias, envelope, row_ptr, senders, self_bias, edge_values, self_values);
    ctx->save_for_backward({q, k, v, bias, envelope, row_ptr, senders, self_bias.value_or(Tensor()),
                            edge_values.value_or(Tensor()), self_values.value_or(Tensor()), out, row_exp, row_sum});
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    if (at::GradMode::is_enabled()) {  // create_graph: the backward itself must be differentiable
      const auto saved = ctx->get_saved_variables();
      const auto optional = [](const Tensor& t) { return t.defined() ? std::optional<Tensor>(t) : std::nullopt; };
      auto grads = NeighborAttentionBackward::apply(grad_outputs[0], saved[0], saved[1], saved[2], saved[3],
                                                    saved[4], saved[5], saved[6], optional(saved[7]),
                                                    optional(saved[8]), optional(saved[9]), saved[10].detach(),
                                                    saved[11], saved[12]);
      const auto if_given = [](const Tensor& input, const Tensor& grad) { return input.defined() ? grad : Tensor(); };
      return {grads[0], grads[1], grads[2], grads[3], grads[4], Tensor(), Tensor(), if_given(saved[7], grads[5]),
              if_given(saved[8], grads[6]), if_given(saved[9], grads[7])};
    }
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("transip::neighbor_attention_backward", "")
                         .typed<BackwardOutputs(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                const std::optional<Tensor>&, const std::optional<Tensor>&,
                                                const std::optional<Tensor>&, const Tensor&, const Tensor&,
                                                const Tensor&)>();
    const auto saved = ctx->get_saved_variables();
    const auto optional = [&](int index) {
      return saved[index].defined() ? std::optional<Tensor>(saved[index]) : std::nullopt;
    };
    auto [gq, gk, gv, gbias, genv, gself, gvalues, gself_values] =
        op.call(grad_outputs[0], saved[0], saved[1], saved[2], saved[3], saved[4], saved[5], saved[6], optional(7),
                optional(8), optional(9), saved[10], saved[11], saved[12]);
    return {gq, gk, gv, gbias, genv, Tensor(), Tensor(), gself, gvalues, gself_values};
  }
};

Tensor neighbor_attention_autograd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& bias,
                                   const Tensor& envelope, const Tensor& row_ptr, const Tensor& senders,
                                   const std::optional<Tensor>& self_bias, const std::optional<Tensor>& edge_values,
                                   const std::optional<Tensor>& self_values) {
  return NeighborAttention::apply(q, k, v, bias, envelope, row_ptr, senders, self_bias, edge_values, self_values);
}

Tensor neighbor_attention_cpu(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& bias,
                              const Tensor& envelope, const Tensor& row_ptr, const Tensor& senders,
                              const std::optional<Tensor>& self_bias, const std::optional<Tensor>& edge_values,
                              const std::optional<Tensor>& self_values) {
  return std::get<0>(
      attention_forward_cpu(q, k, v, bias, envelope, row_ptr, senders, self_bias, edge_values, self_values));
}

// ------------------------------------------------------------------------------------------ edge encoder
struct EdgeTensors {
  Tensor centers, w1, w1t, b1, w2, w2t, b2, wb, wbt, bb;
};

EdgeTensors check_edge_inputs(const Tensor& vectors, const Tensor& slot, const Tensor& centers, const Tensor& w1,
                              const Tensor& b1, const Tensor& w2, const Tensor& b2, const Tensor& wb,
                              const Tensor& bb) {
  const char* op = "transip::edge_encoder: ";
  TORCH_CHECK(vectors.dim() == 2 && vectors.size(1) == 3, op, "vectors must have shape (edges, 3), got ",
              vectors.sizes());
  TORCH_CHECK(vectors.scalar_type() == at::kFloat || vectors.scalar_type() == at::kDouble, op,
              "vectors must be float32 or float64, got ", vectors.scalar_type());
  TORCH_CHECK(slot.dim() == 1 && slot.scalar_type() == at::kLong && slot.numel() == vectors.size(0), op,
              "slot must be int64 with one entry per edge (", vectors.size(0), "), got ", slot.scalar_type(), " ",
              slot.sizes());
  for (const Tensor* t : {&vectors, &slot, &centers, &w1, &b1, &w2, &b2, &wb, &bb})
    TORCH_CHECK(t->device().is_cpu(), op, "inputs must be on the CPU, got ", t->device());
  for (const Tensor* t : {&centers, &w1, &b1, &w2, &b2, &wb, &bb})
    TORCH_CHECK(t->scalar_type() == vectors.scalar_type(), op, "parameters must share the dtype of vectors ",
                vectors.scalar_type(), ", got ", t->scalar_type());
  const int64_t rbf = centers.numel(), hidden = b1.numel(), num_bias = bb.numel();
  TORCH_CHECK(centers.dim() == 1, op, "centers must be 1-D, got ", centers.sizes());
  TORCH_CHECK(w1.dim() == 2 && w1.size(0) == hidden && w1.size(1) == 3 + rbf, op, "w1 must have shape (", hidden,
              ", ", 3 + rbf, "), got ", w1.sizes());
  TORCH_CHECK(w2.dim() == 2 && w2.size(0) == hidden && w2.size(1) == hidden && b2.numel() == hidden, op,
              "w2 must have shape (", hidden, ", ", hidden, ") and b2 (", hidden, "), got ", w2.sizes(), " and ",
              b2.sizes());
  TORCH_CHECK(wb.dim() == 2 && wb.size(0) == num_bias && wb.size(1) == hidden, op, "wb must have shape (", num_bias,
              ", ", hidden, "), got ", wb.sizes());
  EdgeTensors t{centers.contiguous(), w1.contiguous(), w1.t().contiguous(), b1.contiguous(), w2.contiguous(),
                w2.t().contiguous(),  b2.contiguous(), wb.contiguous(), wb.t().contiguous(), bb.contiguous()};
  return t;
}

template <typename T>
EdgeEncoderParams<T> edge_params(int64_t edges, const EdgeTensors& t, double width, double cutoff,
                                 int64_t bias_groups) {
  return {edges,
          t.centers.numel(),
          t.b1.numel(),
          t.bb.numel(),
          bias_groups,
          t.centers.data_ptr<T>(),
          static_cast<T>(width),
          static_cast<T>(cutoff),
          t.w1.data_ptr<T>(),
          t.w1t.data_ptr<T>(),
          t.b1.data_ptr<T>(),
          t.w2.data_ptr<T>(),
          t.w2t.data_ptr<T>(),
          t.b2.data_ptr<T>(),
          t.wb.data_ptr<T>(),
          t.wbt.data_ptr<T>(),
          t.bb.data_ptr<T>()};
}

void check_bias_groups(int64_t bias_groups, const Tensor& bb) {
  TORCH_CHECK(bias_groups >= 1 && bb.numel() % bias_groups == 0, "transip::edge_encoder: bias_groups (", bias_groups,
              ") must divide the number of biases (", bb.numel(), ")");
}

using EdgeEncoderOutputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

EdgeEncoderOutputs edge_encoder_cpu(const Tensor& vectors_in, const Tensor& slot_in, int64_t num_slots,
                                    const Tensor& centers, double width, double cutoff, const Tensor& w1,
                                    const Tensor& b1, const Tensor& w2, const Tensor& b2, const Tensor& wb,
                                    const Tensor& bb, int64_t bias_groups, bool features) {
  const EdgeTensors t = check_edge_inputs(vectors_in, slot_in, centers, w1, b1, w2, b2, wb, bb);
  check_bias_groups(bias_groups, bb);
  const Tensor vectors = vectors_in.contiguous(), slot = slot_in.contiguous();
  auto [slot_perm, slot_ptr] = csr_order(slot, num_slots);  // checks 0 <= slot < num_slots
  const int64_t edges = vectors.size(0);
  Tensor bias = at::empty({bias_groups, edges, t.bb.numel() / bias_groups}, vectors.options());
  Tensor pooled = at::empty({num_slots, t.b1.numel()}, vectors.options());
  Tensor pooled_weight = at::empty({num_slots}, vectors.options());
  Tensor envelope = at::empty({edges}, vectors.options());
  Tensor edge_features = at::empty({edges, features ? 3 + t.centers.numel() : 0}, vectors.options());
  AT_DISPATCH_FLOATING_TYPES(vectors.scalar_type(), "transip::edge_encoder", [&] {
    const auto p = edge_params<scalar_t>(edges, t, width, cutoff, bias_groups);
    const EdgeEncoderForward<scalar_t> io{vectors.data_ptr<scalar_t>(),  num_slots,
                                          slot_ptr.data_ptr<int64_t>(),  slot_perm.data_ptr<int64_t>(),
                                          bias.data_ptr<scalar_t>(),     pooled.data_ptr<scalar_t>(),
                                          pooled_weight.data_ptr<scalar_t>(), envelope.data_ptr<scalar_t>(),
                                          features ? edge_features.data_ptr<scalar_t>() : nullptr};
    if (use_avx512())
      avx512::edge_encoder_forward<scalar_t>(p, io);
    else
      generic::edge_encoder_forward<scalar_t>(p, io);
  });
  return {bias, pooled, pooled_weight, envelope, edge_features};
}

// The incoming gradients of the edge encoder's outputs, checked against the forward's shapes (features: undefined
// when the forward did not return them).
struct EdgeGradients {
  Tensor bias, pooled, pooled_weight, envelope, features;
  template <typename T>
  const T* features_or_null() const {
    return features.defined() ? features.data_ptr<T>() : nullptr;
  }
};

EdgeGradients check_edge_gradients(const char* op, const Tensor& grad_bias, const Tensor& grad_pooled,
                                   const Tensor& grad_pooled_weight, const Tensor& grad_envelope,
                                   const std::optional<Tensor>& grad_features, const Tensor& vectors,
                                   const Tensor& slot, const EdgeTensors& t) {
  const auto dtype = vectors.scalar_type();
  const int64_t edges = vectors.size(0);
  EdgeGradients g{grad_bias.to(dtype).contiguous(), grad_pooled.to(dtype).contiguous(),
                  grad_pooled_weight.to(dtype).contiguous(), grad_envelope.to(dtype).contiguous(),
                  grad_features.has_value() ? grad_features->to(dtype).contiguous() : Tensor()};
  TORCH_CHECK(!g.features.defined() ||
                  (g.features.dim() == 2 && g.features.size(0) == edges && g.features.size(1) == t.w1.size(1)),
              op, "grad_features must have shape (", edges, ", ", t.w1.size(1), "), got ", g.features.sizes());
  TORCH_CHECK(g.bias.numel() == edges * t.bb.numel() && g.envelope.numel() == edges && g.pooled.dim() == 2 &&
                  g.pooled.size(1) == t.b1.numel() && g.pooled_weight.numel() == g.pooled.size(0),
              op, "gradient shapes do not match the forward outputs");
  if (edges > 0) {
    const auto [lo, hi] = at::aminmax(slot);
    TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < g.pooled.size(0), op, "slot outside [0, ",
                g.pooled.size(0), ")");
  }
  return g;
}

// The backward of edge_encoder: dL/dr_e, and the weights' gradients when `with_weights` (one flat tensor laid
// out as weight_grad_size describes; empty otherwise).
std::tuple<Tensor, Tensor> edge_backward(const char* op, const Tensor& grad_bias_in, const Tensor& grad_pooled_in,
                                         const Tensor& grad_pooled_weight_in, const Tensor& grad_envelope_in,
                                         const Tensor& vectors_in, const Tensor& slot_in, const Tensor& centers,
                                         double width, double cutoff, const Tensor& w1, const Tensor& b1,
                                         const Tensor& w2, const Tensor& b2, const Tensor& wb, const Tensor& bb,
                                         int64_t bias_groups, const std::optional<Tensor>& grad_features,
                                         bool with_weights) {
  const EdgeTensors t = check_edge_inputs(vectors_in, slot_in, centers, w1, b1, w2, b2, wb, bb);
  check_bias_groups(bias_groups, bb);
  const Tensor vectors = vectors_in.contiguous(), slot = slot_in.contiguous();
  const EdgeGradients g = check_edge_gradients(op, grad_bias_in, grad_pooled_in, grad_pooled_weight_in,
                                               grad_envelope_in, grad_features, vectors, slot, t);
  const int64_t edges = vectors.size(0);
  Tensor grad_vectors = at::empty_like(vectors), grad_weights;
  AT_DISPATCH_FLOATING_TYPES(vectors.scalar_type(), "transip::edge_encoder_backward", [&] {
    const auto p = edge_params<scalar_t>(edges, t, width, cutoff, bias_groups);
    grad_weights = at::empty({with_weights ? weight_grad_size(p) : 0}, vectors.options());
    const EdgeEncoderBackward<scalar_t> io{vectors.data_ptr<scalar_t>(),      slot.data_ptr<int64_t>(),
                                           g.bias.data_ptr<scalar_t>(),       g.pooled.data_ptr<scalar_t>(),
                                           g.pooled_weight.data_ptr<scalar_t>(), g.envelope.data_ptr<scalar_t>(),
                                           g.features_or_null<scalar_t>(),    grad_vectors.data_ptr<scalar_t>(),
                                           with_weights ? grad_weights.data_ptr<scalar_t>() : nullptr};
    if (use_avx512())
      avx512::edge_encoder_backward<scalar_t>(p, io);
    else
      generic::edge_encoder_backward<scalar_t>(p, io);
  });
  return {grad_vectors, grad_weights};
}

Tensor edge_encoder_backward_cpu(const Tensor& grad_bias, const Tensor& grad_pooled, const Tensor& grad_pooled_weight,
                                 const Tensor& grad_envelope, const Tensor& vectors, const Tensor& slot,
                                 const Tensor& centers, double width, double cutoff, const Tensor& w1,
                                 const Tensor& b1, const Tensor& w2, const Tensor& b2, const Tensor& wb,
                                 const Tensor& bb, int64_t bias_groups, const std::optional<Tensor>& grad_features) {
  return std::get<0>(edge_backward("transip::edge_encoder_backward: ", grad_bias, grad_pooled, grad_pooled_weight,
                                   grad_envelope, vectors, slot, centers, width, cutoff, w1, b1, w2, b2, wb, bb,
                                   bias_groups, grad_features, false));
}

std::tuple<Tensor, Tensor> edge_encoder_train_backward_cpu(
    const Tensor& grad_bias, const Tensor& grad_pooled, const Tensor& grad_pooled_weight, const Tensor& grad_envelope,
    const Tensor& vectors, const Tensor& slot, const Tensor& centers, double width, double cutoff, const Tensor& w1,
    const Tensor& b1, const Tensor& w2, const Tensor& b2, const Tensor& wb, const Tensor& bb, int64_t bias_groups,
    const std::optional<Tensor>& grad_features) {
  return edge_backward("transip::edge_encoder_train_backward: ", grad_bias, grad_pooled, grad_pooled_weight,
                       grad_envelope, vectors, slot, centers, width, cutoff, w1, b1, w2, b2, wb, bb, bias_groups,
                       grad_features, true);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> edge_encoder_double_backward_cpu(
    const Tensor& dot_vectors_in, const Tensor& grad_bias_in, const Tensor& grad_pooled_in,
    const Tensor& grad_pooled_weight_in, const Tensor& grad_envelope_in, const Tensor& vectors_in,
    const Tensor& slot_in, const Tensor& centers, double width, double cutoff, const Tensor& w1, const Tensor& b1,
    const Tensor& w2, const Tensor& b2, const Tensor& wb, const Tensor& bb, int64_t bias_groups,
    const std::optional<Tensor>& grad_features) {
  const char* op = "transip::edge_encoder_double_backward: ";
  const EdgeTensors t = check_edge_inputs(vectors_in, slot_in, centers, w1, b1, w2, b2, wb, bb);
  check_bias_groups(bias_groups, bb);
  const Tensor vectors = vectors_in.contiguous(), slot = slot_in.contiguous();
  const Tensor dot_vectors = dot_vectors_in.to(vectors.scalar_type()).contiguous();
  TORCH_CHECK(dot_vectors.sizes() == vectors.sizes(), op, "dot_vectors must have the shape of vectors ",
              vectors.sizes(), ", got ", dot_vectors.sizes());
  const EdgeGradients g = check_edge_gradients(op, grad_bias_in, grad_pooled_in, grad_pooled_weight_in,
                                               grad_envelope_in, grad_features, vectors, slot, t);
  const int64_t edges = vectors.size(0), num_slots = g.pooled.size(0);
  auto [slot_perm, slot_ptr] = csr_order(slot, num_slots);
  Tensor d_bias = at::empty_like(g.bias), d_pooled = at::empty_like(g.pooled),
         d_pooled_weight = at::empty_like(g.pooled_weight), d_envelope = at::empty_like(g.envelope),
         d_vectors = at::empty_like(vectors), grad_weights,
         d_features = g.features.defined() ? at::empty_like(g.features) : at::empty({0}, vectors.options());
  AT_DISPATCH_FLOATING_TYPES(vectors.scalar_type(), "transip::edge_encoder_double_backward", [&] {
    const auto p = edge_params<scalar_t>(edges, t, width, cutoff, bias_groups);
    grad_weights = at::empty({weight_grad_size(p)}, vectors.options());
    const EdgeEncoderDoubleBackward<scalar_t> io{
        vectors.data_ptr<scalar_t>(),     dot_vectors.data_ptr<scalar_t>(),   num_slots,
        slot_ptr.data_ptr<int64_t>(),     slot_perm.data_ptr<int64_t>(),      g.bias.data_ptr<scalar_t>(),
        g.pooled.data_ptr<scalar_t>(),    g.pooled_weight.data_ptr<scalar_t>(), g.envelope.data_ptr<scalar_t>(),
        g.features_or_null<scalar_t>(),   d_bias.data_ptr<scalar_t>(),        d_pooled.data_ptr<scalar_t>(),
        d_pooled_weight.data_ptr<scalar_t>(), d_envelope.data_ptr<scalar_t>(),
        g.features.defined() ? d_features.data_ptr<scalar_t>() : nullptr,
        d_vectors.data_ptr<scalar_t>(),   grad_weights.data_ptr<scalar_t>()};
    if (use_avx512())
      avx512::edge_encoder_double_backward<scalar_t>(p, io);
    else
      generic::edge_encoder_double_backward<scalar_t>(p, io);
  });
  return {d_bias, d_pooled, d_pooled_weight, d_envelope, d_vectors, grad_weights, d_features};
}

// Differentiable in the displacements only: forces and virial. Gradients for the parameters (training) are
// refused with a message, as is a second derivative, rather than returned as silent zeros.
class EdgeEncoder : public torch::autograd::Function<EdgeEncoder> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& vectors,
                                                const Tensor& slot, int64_t num_slots, const Tensor& centers,
                                                double width, double cutoff, const Tensor& w1, const Tensor& b1,
                                                const Tensor& w2, const Tensor& b2, const Tensor& wb,
                                                const Tensor& bb, int64_t bias_groups, bool features) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("transip::edge_encoder", "")
                         .typed<EdgeEncoderOutputs(const Tensor&, const Tensor&, int64_t, const Tensor&, double,
                                                   double, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                   const Tensor&, const Tensor&, int64_t, bool)>();
    auto [bias, pooled, pooled_weight, envelope, edge_features] =
        op.call(vectors, slot, num_slots, centers, width, cutoff, w1, b1, w2, b2, wb, bb, bias_groups, features);
    ctx->save_for_backward({vectors, slot, centers, w1, b1, w2, b2, wb, bb});
    ctx->saved_data["width"] = width;
    ctx->saved_data["cutoff"] = cutoff;
    ctx->saved_data["bias_groups"] = bias_groups;
    ctx->saved_data["features"] = features;
    return {bias, pooled, pooled_weight, envelope, edge_features};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    // Tensor inputs, in order: vectors 0, slot 1, centers 2, w1 3, b1 4, w2 5, b2 6, wb 7, bb 8.
    for (size_t input = 2; input <= 8; ++input)
      TORCH_CHECK(!ctx->needs_input_grad(input),
                  "transip::edge_encoder: the fused kernel differentiates with respect to the edge vectors only "
                  "(forces, virial); gradients for the model's parameters (training) need the reference kernel: "
                  "call model.set_kernel('reference') or set TRANSIP_KERNEL=reference");
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "transip::edge_encoder: the fused kernel is differentiable once (energy -> forces); a second "
                "derivative (create_graph=True) needs the reference kernel: call model.set_kernel('reference') or "
                "set TRANSIP_KERNEL=reference");
    const auto saved = ctx->get_saved_variables();
    const Tensor& vectors = saved[0];
    const int64_t edges = vectors.size(0), num_bias = saved[8].numel(), hidden = saved[4].numel();
    // Outputs that did not reach the loss come with undefined gradients: zeros of the right shape.
    auto or_zeros = [&](const Tensor& g, at::IntArrayRef shape) {
      return g.defined() ? g : at::zeros(shape, vectors.options());
    };
    const int64_t num_slots = grads[1].defined() ? grads[1].size(0) : grads[2].defined() ? grads[2].size(0) : 0;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("transip::edge_encoder_backward", "")
                         .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                       const Tensor&, const Tensor&, double, double, const Tensor&, const Tensor&,
                                       const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t,
                                       const std::optional<Tensor>&)>();
    const int64_t bias_groups = ctx->saved_data["bias_groups"].toInt();
    Tensor grad_pooled = grads[1], grad_pooled_weight = grads[2];
    if (!grad_pooled.defined() && !grad_pooled_weight.defined()) {
      // Neither pooled output is used: one zero slot, and every edge points at it.
      grad_pooled = at::zeros({1, hidden}, vectors.options());
      grad_pooled_weight = at::zeros({1}, vectors.options());
    } else {
      grad_pooled = or_zeros(grad_pooled, {num_slots, hidden});
      grad_pooled_weight = or_zeros(grad_pooled_weight, {num_slots});
    }
    const Tensor slot = grads[1].defined() || grads[2].defined() ? saved[1] : at::zeros_like(saved[1]);
    // The features' gradient, when they were returned and reached the loss (the blocks' edge values).
    const std::optional<Tensor> grad_features =
        ctx->saved_data["features"].toBool() && grads[4].defined() ? std::optional<Tensor>(grads[4]) : std::nullopt;
    Tensor grad_vectors = op.call(or_zeros(grads[0], {bias_groups, edges, num_bias / bias_groups}), grad_pooled,
                                  grad_pooled_weight, or_zeros(grads[3], {edges}), vectors, slot, saved[2],
                                  ctx->saved_data["width"].toDouble(), ctx->saved_data["cutoff"].toDouble(), saved[3],
                                  saved[4], saved[5], saved[6], saved[7], saved[8], bias_groups, grad_features);
    torch::autograd::variable_list result(14);
    result[0] = grad_vectors;
    return result;
  }
};

EdgeEncoderOutputs edge_encoder_autograd(const Tensor& vectors, const Tensor& slot, int64_t num_slots,
                                         const Tensor& centers, double width, double cutoff, const Tensor& w1,
                                         const Tensor& b1, const Tensor& w2, const Tensor& b2, const Tensor& wb,
                                         const Tensor& bb, int64_t bias_groups, bool features) {
  auto out = EdgeEncoder::apply(vectors, slot, num_slots, centers, width, cutoff, w1, b1, w2, b2, wb, bb, bias_groups,
                                features);
  return {out[0], out[1], out[2], out[3], out[4]};
}

}  // namespace

TORCH_LIBRARY(transip, m) {
  m.def("neighbor_attention(Tensor q, Tensor k, Tensor v, Tensor bias, Tensor envelope, Tensor row_ptr, "
        "Tensor senders, Tensor? self_bias=None, Tensor? edge_values=None, Tensor? self_values=None) -> Tensor");
  m.def("neighbor_attention_forward(Tensor q, Tensor k, Tensor v, Tensor bias, Tensor envelope, Tensor row_ptr, "
        "Tensor senders, Tensor? self_bias=None, Tensor? edge_values=None, Tensor? self_values=None) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("neighbor_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor bias, Tensor envelope, "
        "Tensor row_ptr, Tensor senders, Tensor? self_bias, Tensor? edge_values, Tensor? self_values, Tensor out, "
        "Tensor row_exp, Tensor row_sum) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("neighbor_attention_double_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor bias, "
        "Tensor envelope, Tensor row_ptr, Tensor senders, Tensor? self_bias, Tensor? edge_values, "
        "Tensor? self_values, Tensor out, Tensor row_exp, Tensor row_sum, Tensor? tq, Tensor? tk, Tensor? tv, "
        "Tensor? tbias, Tensor? tenvelope, Tensor? tself_bias, Tensor? tedge_values, Tensor? tself_values) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("edge_encoder(Tensor vectors, Tensor slot, int num_slots, Tensor centers, float width, float cutoff, "
        "Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor wb, Tensor bb, int bias_groups=1, bool features=False) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("edge_encoder_backward(Tensor grad_bias, Tensor grad_pooled, Tensor grad_pooled_weight, "
        "Tensor grad_envelope, Tensor vectors, Tensor slot, Tensor centers, float width, float cutoff, Tensor w1, "
        "Tensor b1, Tensor w2, Tensor b2, Tensor wb, Tensor bb, int bias_groups=1, Tensor? grad_features=None) "
        "-> Tensor");
  m.def("edge_encoder_train_backward(Tensor grad_bias, Tensor grad_pooled, Tensor grad_pooled_weight, "
        "Tensor grad_envelope, Tensor vectors, Tensor slot, Tensor centers, float width, float cutoff, Tensor w1, "
        "Tensor b1, Tensor w2, Tensor b2, Tensor wb, Tensor bb, int bias_groups, Tensor? grad_features=None) "
        "-> (Tensor, Tensor)");
  m.def("edge_encoder_double_backward(Tensor dot_vectors, Tensor grad_bias, Tensor grad_pooled, "
        "Tensor grad_pooled_weight, Tensor grad_envelope, Tensor vectors, Tensor slot, Tensor centers, float width, "
        "float cutoff, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor wb, Tensor bb, int bias_groups, "
        "Tensor? grad_features=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("neighbor_list(Tensor positions, Tensor? cell, Tensor? pbc, float cutoff) -> (Tensor, Tensor)",
        &neighbor_list);
  m.def("csr_order(Tensor index, int num_rows) -> (Tensor, Tensor)", &csr_order);
  m.def("edge_vectors(Tensor positions, Tensor receivers, Tensor senders, Tensor shift_vectors) -> Tensor",
        &edge_vectors);
  m.def("edge_forces(Tensor g, Tensor receivers, Tensor senders, int num_atoms) -> Tensor", &edge_forces);
  m.def("version() -> str", &version);
  m.def("isa() -> str", &isa);
  m.def("keep_freed_memory() -> bool", &keep_freed_memory);
}

TORCH_LIBRARY_IMPL(transip, CPU, m) {
  m.impl("neighbor_attention", &neighbor_attention_cpu);
  m.impl("neighbor_attention_forward", &attention_forward_cpu);
  m.impl("neighbor_attention_backward", &attention_backward_cpu);
  m.impl("neighbor_attention_double_backward", &attention_double_backward_cpu);
  m.impl("edge_encoder", &edge_encoder_cpu);
  m.impl("edge_encoder_backward", &edge_encoder_backward_cpu);
  m.impl("edge_encoder_train_backward", &edge_encoder_train_backward_cpu);
  m.impl("edge_encoder_double_backward", &edge_encoder_double_backward_cpu);
}

TORCH_LIBRARY_IMPL(transip, Autograd, m) {
  m.impl("neighbor_attention", &neighbor_attention_autograd);
  m.impl("edge_encoder", &edge_encoder_autograd);
}

}  // namespace transip

namespace transip {
std::string library_marker() { return "libtransip_ops " TRANSIP_VERSION; }
}  // namespace transip
