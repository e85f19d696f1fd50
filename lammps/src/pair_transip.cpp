// pair_style transip: see pair_transip.h and docs/lammps.md.
#include "pair_transip.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>

#include "atom.h"
#include "comm.h"
#include "error.h"
#include "force.h"
#include "memory.h"
#include "neigh_list.h"
#include "neighbor.h"
#include "update.h"
#include "transip/artifact_metadata.h"

using namespace LAMMPS_NS;

namespace transip {
std::string library_marker();  // from libtransip_ops: linking it registers the native ops the model calls
std::string version();      // of the native ops, as recorded in artifacts
bool keep_freed_memory();  // see cpp/src/ops.cpp
}

namespace {

namespace contract = transip::contract;  // format version, metadata key paths, unit factors (export/contract.py)

template <typename T>
std::string joined(const std::vector<T> &values) {
  std::string text;
  for (const T &v : values) text += (text.empty() ? "" : " ") + std::to_string(v);
  return text;
}

std::string element_list(const std::vector<int64_t> &numbers) {
  std::string text;
  for (int64_t z : numbers) text += (text.empty() ? "" : " ") + transip::element_symbol(z);
  return text;
}

template <typename T>
bool contains(const std::vector<T> &values, int64_t value) {
  return std::find(values.begin(), values.end(), value) != values.end();
}

}  // namespace

PairTransIP::PairTransIP(LAMMPS *lmp) : Pair(lmp) {
  single_enable = 0;
  restartinfo = 0;
  one_coeff = 1;
  manybody_flag = 1;
  no_virial_fdotr_compute = 1;  // the model gives its virial from edge gradients
}

PairTransIP::~PairTransIP() {
  if (allocated) {
    memory->destroy(setflag);
    memory->destroy(cutsq);
  }
}

void PairTransIP::allocate() {
  allocated = 1;
  const int n = atom->ntypes + 1;
  memory->create(setflag, n, n, "pair:setflag");
  memory->create(cutsq, n, n, "pair:cutsq");
  for (int i = 1; i < n; ++i)
    for (int j = i; j < n; ++j) setflag[i][j] = 0;
}

void PairTransIP::load_model(const std::string &path) {
  // torch::jit::load reports a missing file as an archive it cannot read; say what it is before trying.
  std::error_code status;
  if (!std::filesystem::exists(path, status))
    error->all(FLERR, "pair_style transip: model file {} not found; give the path of an artifact written by "
               "`transip export` (a relative path starts in the folder LAMMPS runs in)", path);
  if (!std::filesystem::is_regular_file(path, status))
    error->all(FLERR, "pair_style transip: model file {} is not a regular file; give the path of an artifact "
               "written by `transip export`", path);
  torch::jit::ExtraFilesMap extra{{contract::kMetadataFile, ""}};
  try {
    model_ = torch::jit::load(path, torch::kCPU, extra);
  } catch (const std::exception &e) {  // c10::Error, and torch::jit::ErrorReport for an op missing at compile
    const std::string what = transip::exception_message(e);
    if (what.find("Unknown builtin op") != std::string::npos)
      error->all(FLERR, "pair_style transip: model file {} calls a native op that this plugin's libtransip_ops {} "
                 "does not have ({}); export the model again with this transip", path, transip::version(),
                 what);
    error->all(FLERR, "pair_style transip: cannot load model file {}: {} (a corrupt or truncated file must be "
               "exported again with transip export)", path, what);
  }
  const std::string &json = extra[contract::kMetadataFile];
  const std::string problem = transip::format_problem(json, path, "this pair style");
  if (!problem.empty()) error->all(FLERR, "pair_style transip: {}", problem);
  // Native ops are versioned: the artifact records the version it was exported with (null for reference kernels).
  const std::string ops_version = transip::metadata_path(json, contract::kKeyNativeOpsVersion);
  if (!ops_version.empty() && ops_version != transip::version())
    error->all(FLERR, "pair_style transip: {} was exported with TransIP native ops {}, but this plugin has "
               "libtransip_ops {}; export the model again with this transip", path, ops_version,
               transip::version());
  cutoff_ = std::stod(transip::metadata_path(json, contract::kKeyCutoff));
  receptive_field_ = std::stod(transip::metadata_path(json, contract::kKeyReceptiveField));
  num_layers_ = std::stoi(transip::metadata_path(json, contract::kKeyNumLayers));
  token_width_ = std::stoi(transip::metadata_path(json, contract::kKeyDModel));
  for (const char *method : {"edge_energy_gradients", "halo_tokens", "halo_block", "halo_energies",
                             "energy_offset"})
    if (!model_.find_method(method))
      error->all(FLERR, "pair_style transip: {} has no method {}: it was exported by an older transip; export "
                 "it again with this one", path, method);
  comm_forward = comm_reverse = token_width_;  // one token per atom travels between ranks
  float64_ = transip::metadata_path(json, contract::kKeyDtype) == "float64";
  model_elements_ = transip::metadata_integers(transip::metadata_path(json, contract::kKeyAtomicNumbers));
  if (transip::metadata_object(json, contract::kKeyChargeSpin).empty())
    error->all(FLERR, "pair_style transip: {} has no {} ranges in its metadata; export the model again with "
               "`transip export`", path, contract::kKeyChargeSpin);
  max_abs_charge_ = std::stoll(transip::metadata_path(json, contract::kKeyMaxAbsCharge));
  max_multiplicity_ = std::stoll(transip::metadata_path(json, contract::kKeyMaxMultiplicity));
  has_trained_domain_ = !transip::metadata_object(json, contract::kKeyTrainedDomain).empty();
  trained_elements_ = transip::metadata_integers(transip::metadata_path(json, contract::kKeyTrainedAtomicNumbers));
  trained_charges_ = transip::metadata_integers(transip::metadata_path(json, contract::kKeyTrainedCharges));
  trained_spins_ = transip::metadata_integers(transip::metadata_path(json, contract::kKeyTrainedSpins));
  model_.eval();
}

// Charge and spin are plain inputs of every model call, so a value the model cannot take would otherwise stop the
// first `run` deep inside TorchScript. Outside the range of its embeddings there is no override; inside it, a value
// absent from the training data gives arbitrary energies, refused unless the user asked for `untrained warn`.
void PairTransIP::check_charge_spin() {
  if (charge_ < -max_abs_charge_ || charge_ > max_abs_charge_)
    error->all(FLERR, "pair_style transip: charge {} is outside the range of the model {}, total charge -{}..{} "
               "(charge_spin in its metadata); give `charge Q` with Q in that range", charge_, model_path_,
               max_abs_charge_, max_abs_charge_);
  if (spin_ < 1 || spin_ > max_multiplicity_)
    error->all(FLERR, "pair_style transip: spin {} is outside the range of the model {}, spin multiplicity 1..{} "
               "(charge_spin in its metadata; 1 singlet, 2 doublet, ...); give `spin S` with S in that range", spin_,
               model_path_, max_multiplicity_);
  if (!has_trained_domain_) return;  // exported before the trained domain was recorded: the range is all we know
  if (!contains(trained_charges_, charge_))
    untrained("pair_style transip", fmt::format("charge {} is not among the total charges the model {} was trained "
                                                "on ({})", charge_, model_path_, joined(trained_charges_)));
  if (!contains(trained_spins_, spin_))
    untrained("pair_style transip", fmt::format("spin {} is not among the spin multiplicities the model {} was "
                                                "trained on ({})", spin_, model_path_, joined(trained_spins_)));
}

void PairTransIP::untrained(const std::string &command, const std::string &problem) {
  if (!untrained_warn_)
    error->all(FLERR, "{}: {}: its energies and forces there would be arbitrary; use a trained value, or add "
               "`untrained warn` to the pair_style line to run anyway", command, problem);
  if (std::find(warned_.begin(), warned_.end(), problem) != warned_.end()) return;  // once per value
  warned_.push_back(problem);
  if (comm->me == 0)
    error->warning(FLERR, "{}: {}; running anyway (untrained warn): results there are not reliable", command,
                   problem);
}

void PairTransIP::settings(int narg, char **arg) {
  if (narg < 1)
    error->all(FLERR, "pair_style transip: expected `pair_style transip model.pt [charge Q] [spin S] [untrained "
               "error|warn]`");
  const std::string units = update->unit_style;
  if (units == "metal")
    energy_scale_ = 1.0;
  else if (units == "real")
    energy_scale_ = contract::kKcalPerMolPerEv;
  else
    error->all(FLERR, "pair_style transip supports units metal and real only, not units {}", units);
  model_path_ = arg[0];
  charge_ = 0;  // a new pair_style line starts from the defaults
  spin_ = 1;
  untrained_warn_ = false;
  for (int i = 1; i < narg; i += 2) {
    const std::string key = arg[i];
    if (i + 1 >= narg) error->all(FLERR, "pair_style transip: option {} needs a value", key);
    if (key == "charge")
      charge_ = utils::inumeric(FLERR, arg[i + 1], false, lmp);
    else if (key == "spin")
      spin_ = utils::inumeric(FLERR, arg[i + 1], false, lmp);
    else if (key == "untrained" && (strcmp(arg[i + 1], "error") == 0 || strcmp(arg[i + 1], "warn") == 0))
      untrained_warn_ = strcmp(arg[i + 1], "warn") == 0;
    else if (key == "untrained")
      error->all(FLERR, "pair_style transip: untrained {} is not a choice: use `untrained error` (the default: refuse "
                 "a charge, spin or element the model was not trained on) or `untrained warn` (warn once and run)",
                 arg[i + 1]);
    else
      error->all(FLERR, "pair_style transip: unknown option {} (expected charge, spin or untrained)", key);
  }
  load_model(model_path_);
  check_charge_spin();
  transip::keep_freed_memory();  // an MD run evaluates the same sizes every step (docs/native_ops.md)
  if (comm->me == 0)
    utils::logmesg(lmp, "pair_style transip: {} (cutoff {} A, receptive field {} A, {}), {}\n", model_path_, cutoff_,
                   receptive_field_, float64_ ? "float64" : "float32", transip::library_marker());
}

void PairTransIP::coeff(int narg, char **arg) {
  if (!allocated) allocate();
  const int ntypes = atom->ntypes;
  if (narg != 2 + ntypes)
    error->all(FLERR, "pair_coeff for transip: expected `pair_coeff * * El1 ... El{}` with one element per atom "
               "type ({} types), got {} elements", ntypes, ntypes, narg - 2);
  if (strcmp(arg[0], "*") != 0 || strcmp(arg[1], "*") != 0)
    error->all(FLERR, "pair_coeff for transip must start with `* *`");
  type_number_.assign(ntypes + 1, 0);
  for (int t = 1; t <= ntypes; ++t) {
    const std::string symbol = arg[1 + t];
    const int z = transip::atomic_number(symbol);
    if (z == 0)
      error->all(FLERR, "pair_coeff for transip: unknown element symbol {} for atom type {}; give element symbols "
                 "as in the periodic table (H, He, ..., Og), one per atom type", symbol, t);
    if (!contains(model_elements_, z))
      error->all(FLERR, "pair_coeff for transip: element {} (atom type {}) is not known to the model {}, which "
                 "knows {}", symbol, t, model_path_, element_list(model_elements_));
    if (has_trained_domain_ && !contains(trained_elements_, z))
      untrained("pair_coeff for transip", fmt::format("element {} (atom type {}) is not among the elements the model "
                                                      "{} was trained on ({})", symbol, t, model_path_,
                                                      element_list(trained_elements_)));
    type_number_[t] = z;
  }
  for (int i = 1; i <= ntypes; ++i)
    for (int j = i; j <= ntypes; ++j) setflag[i][j] = 1;
}

void PairTransIP::init_style() {
  if (force->newton_pair == 0) error->all(FLERR, "pair_style transip requires newton on");
  if (!atom->tag_enable) error->all(FLERR, "pair_style transip requires atom IDs (atom_modify id yes)");
  fold_images_ = comm->nprocs == 1;
  // Ghosts only need to reach one cutoff: on several ranks the tokens of each block travel between ranks.
  neighbor->add_request(this, NeighConst::REQ_FULL);
}

double PairTransIP::init_one(int, int) { return cutoff_; }

void PairTransIP::build_graph() {
  const int nlocal = atom->nlocal;
  double **x = atom->x;
  const tagint *tag = atom->tag;
  if (fold_images_) {
    tagint max_tag = 0;
    for (int i = 0; i < nlocal; ++i) max_tag = std::max(max_tag, tag[i]);
    owner_of_tag_.assign(max_tag + 1, -1);
    for (int i = 0; i < nlocal; ++i) owner_of_tag_[tag[i]] = i;
  }
  graph_.receivers.clear();
  graph_.senders.clear();
  graph_.sender_atoms.clear();
  graph_.vectors.clear();
  const double cut2 = cutoff_ * cutoff_;
  for (int i = 0; i < nlocal; ++i) {  // receivers in atom order: the model reads edges as CSR rows
    const int *neighbors = list->firstneigh[i];
    for (int jj = 0; jj < list->numneigh[i]; ++jj) {
      const int j = neighbors[jj] & NEIGHMASK;
      const double d[3] = {x[j][0] - x[i][0], x[j][1] - x[i][1], x[j][2] - x[i][2]};
      if (d[0] * d[0] + d[1] * d[1] + d[2] * d[2] >= cut2) continue;
      int sender = j;
      if (fold_images_ && j >= nlocal) {
        sender = owner_of_tag_[tag[j]];
        if (sender < 0) error->one(FLERR, "pair_style transip: ghost atom {} has no local owner on one rank", tag[j]);
      }
      row_.emplace_back(sender, j);
    }
    // Senders in atom order: the model gathers their rows, and neighbouring rows share cache lines.
    std::sort(row_.begin(), row_.end());
    for (const auto &[sender, j] : row_) {
      graph_.receivers.push_back(i);
      graph_.sender_atoms.push_back(sender);
      for (int k = 0; k < 3; ++k) graph_.vectors.push_back(x[j][k] - x[i][k]);
    }
    row_.clear();
  }
  // The model's atoms: local ones, then (several ranks) only the ghosts that send to a local atom, in LAMMPS
  // order. The shell of cutoff + skin holds many ghosts no local atom reads.
  graph_.ghosts.clear();
  graph_.senders = graph_.sender_atoms;
  if (!fold_images_) {
    row_of_ghost_.assign(atom->nghost, -1);
    for (int64_t j : graph_.sender_atoms)
      if (j >= nlocal) row_of_ghost_[j - nlocal] = 0;
    for (int g = 0; g < atom->nghost; ++g)
      if (row_of_ghost_[g] == 0) {
        row_of_ghost_[g] = nlocal + static_cast<int>(graph_.ghosts.size());
        graph_.ghosts.push_back(nlocal + g);
      }
    for (int64_t &j : graph_.senders)
      if (j >= nlocal) j = row_of_ghost_[j - nlocal];
  }
  graph_.atoms = nlocal + static_cast<int>(graph_.ghosts.size());
}

// ------------------------------------------------------------------------------ tokens between ranks
torch::Tensor PairTransIP::ghost_tokens(const torch::Tensor &local) {
  const int nlocal = atom->nlocal, nghost = graph_.atoms - nlocal;
  tokens_.resize(static_cast<size_t>(nlocal + atom->nghost) * token_width_);
  const torch::Tensor values = local.detach().to(torch::kFloat64).contiguous();
  std::copy(values.data_ptr<double>(), values.data_ptr<double>() + values.numel(), tokens_.begin());
  comm->forward_comm(this);
  torch::Tensor ghosts = torch::empty({nghost, token_width_}, torch::kFloat64);
  for (int g = 0; g < nghost; ++g)
    std::copy_n(tokens_.data() + static_cast<size_t>(graph_.ghosts[g]) * token_width_, token_width_,
                ghosts.data_ptr<double>() + static_cast<size_t>(g) * token_width_);
  return ghosts.to(local.scalar_type());
}

torch::Tensor PairTransIP::sum_onto_owners(const torch::Tensor &local_grad, const torch::Tensor &ghost_grad) {
  const int nlocal = atom->nlocal;
  token_grads_.assign(static_cast<size_t>(nlocal + atom->nghost) * token_width_, 0.0);
  if (ghost_grad.defined() && ghost_grad.numel() > 0) {
    const torch::Tensor values = ghost_grad.to(torch::kFloat64).contiguous();
    for (size_t g = 0; g < graph_.ghosts.size(); ++g)
      std::copy_n(values.data_ptr<double>() + g * token_width_, token_width_,
                  token_grads_.data() + static_cast<size_t>(graph_.ghosts[g]) * token_width_);
  }
  comm->reverse_comm(this);
  return local_grad + torch::from_blob(token_grads_.data(), {nlocal, token_width_}, torch::kFloat64)
                          .to(local_grad.scalar_type());
}

int PairTransIP::pack_forward_comm(int n, int *list_, double *buf, int, int *) {
  for (int i = 0; i < n; ++i)
    std::copy_n(tokens_.data() + static_cast<size_t>(list_[i]) * token_width_, token_width_, buf + i * token_width_);
  return n * token_width_;
}

void PairTransIP::unpack_forward_comm(int n, int first, double *buf) {
  std::copy_n(buf, n * token_width_, tokens_.data() + static_cast<size_t>(first) * token_width_);
}

int PairTransIP::pack_reverse_comm(int n, int first, double *buf) {
  std::copy_n(token_grads_.data() + static_cast<size_t>(first) * token_width_, n * token_width_, buf);
  return n * token_width_;
}

void PairTransIP::unpack_reverse_comm(int n, int *list_, double *buf) {
  for (int i = 0; i < n; ++i) {
    double *row = token_grads_.data() + static_cast<size_t>(list_[i]) * token_width_;
    for (int k = 0; k < token_width_; ++k) row[k] += buf[i * token_width_ + k];
  }
}

// ------------------------------------------------------------------------------------- evaluation
// One rank: every sender is a local atom (images folded onto owners), so the whole model and its gradient run
// in one call, as the bare artifact call does.
PairTransIP::Result PairTransIP::evaluate(const torch::Tensor &vectors, const torch::Tensor &numbers,
                                          const torch::Tensor &receivers, const torch::Tensor &senders) {
  if (!fold_images_) return evaluate_by_blocks(vectors, numbers, receivers, senders);
  const auto out = model_.get_method("edge_energy_gradients")({vectors, numbers, receivers, senders, charge_, spin_})
                       .toTuple()->elements();
  Result result;
  result.atom_energies = out[0].toTensor();
  result.edge_grads = out[1].toTensor();
  result.energy = result.atom_energies.sum().item<double>();
  return result;
}

// Several ranks: the artifact's halo methods, block by block, as the recipe in export/halo.py says. Each block's inputs are fresh
// leaves, so the backward runs block by block too, and the gradient that reaches a ghost's token goes back to
// its owner before the owner's previous block is differentiated.
PairTransIP::Result PairTransIP::evaluate_by_blocks(const torch::Tensor &vectors, const torch::Tensor &numbers,
                                                    const torch::Tensor &receivers, const torch::Tensor &senders) {
  const int64_t nlocal = atom->nlocal;
  const auto tokens = model_.get_method("halo_tokens")({vectors, numbers, receivers, senders, nlocal, charge_, spin_})
                          .toTuple()->elements();
  const torch::Tensor h0 = tokens[0].toTensor(), bias = tokens[1].toTensor(), env = tokens[2].toTensor(),
                      values = tokens[3].toTensor(), repulsion = tokens[4].toTensor();
  const torch::Tensor bias_leaf = bias.detach().requires_grad_(true), env_leaf = env.detach().requires_grad_(true),
                      values_leaf = values.detach().requires_grad_(true);
  std::vector<torch::Tensor> local_in, ghost_in, out;
  torch::Tensor h = h0;
  for (int64_t layer = 0; layer < num_layers_; ++layer) {
    local_in.push_back(h.detach().requires_grad_(true));
    ghost_in.push_back(ghost_tokens(local_in.back()).requires_grad_(true));
    const torch::Tensor all = torch::cat({local_in.back(), ghost_in.back()});
    h = model_.get_method("halo_block")({layer, all, bias_leaf[layer], env_leaf, values_leaf, receivers, senders,
                                         nlocal})
            .toTensor();
    out.push_back(h);
  }
  const torch::Tensor last = h.detach().requires_grad_(true);
  Result result;
  const torch::Tensor learned = model_.get_method("halo_energies")({last, numbers.slice(0, 0, nlocal)}).toTensor();
  torch::Tensor grad = torch::autograd::grad({learned.sum()}, {last})[0];
  result.atom_energies = (learned + repulsion).detach();
  torch::Tensor grad_bias = torch::zeros_like(bias), grad_env = torch::zeros_like(env),
                grad_values = torch::zeros_like(values);
  for (int64_t layer = num_layers_ - 1; layer >= 0; --layer) {
    const auto grads = torch::autograd::grad(
        {out[layer]}, {local_in[layer], ghost_in[layer], bias_leaf, env_leaf, values_leaf}, {grad}, false, false, true);
    grad = sum_onto_owners(grads[0].defined() ? grads[0] : torch::zeros_like(local_in[layer]), grads[1]);
    if (grads[2].defined()) grad_bias += grads[2];
    if (grads[3].defined()) grad_env += grads[3];
    if (grads[4].defined()) grad_values += grads[4];
  }
  std::vector<torch::Tensor> outputs{h0, bias, env}, seeds{grad, grad_bias, grad_env};
  if (values.requires_grad()) {  // not for a model without block geometry
    outputs.push_back(values);
    seeds.push_back(grad_values);
  }
  if (repulsion.requires_grad()) {  // not for a model without repulsion
    outputs.push_back(repulsion);
    seeds.push_back(torch::ones_like(repulsion));
  }
  const auto edge_grads = torch::autograd::grad(outputs, {vectors}, seeds, false, false, true);
  result.edge_grads = edge_grads[0].defined() ? edge_grads[0] : torch::zeros_like(vectors);
  result.energy = result.atom_energies.sum().item<double>();
  return result;
}

void PairTransIP::compute(int eflag, int vflag) {
  ev_init(eflag, vflag);
  const int nlocal = atom->nlocal;
  const int *type = atom->type;
  build_graph();
  const int64_t edges = static_cast<int64_t>(graph_.receivers.size());
  const auto dtype = float64_ ? torch::kFloat64 : torch::kFloat32;
  torch::Tensor numbers = torch::empty({graph_.atoms}, torch::kInt64);
  for (int i = 0; i < graph_.atoms; ++i)
    numbers.data_ptr<int64_t>()[i] = type_number_[type[i < nlocal ? i : graph_.ghosts[i - nlocal]]];
  const torch::Tensor receivers = torch::from_blob(graph_.receivers.data(), {edges}, torch::kInt64);
  const torch::Tensor senders = torch::from_blob(graph_.senders.data(), {edges}, torch::kInt64);
  const torch::Tensor vectors =
      torch::from_blob(graph_.vectors.data(), {edges, 3}, torch::kFloat64).to(dtype).requires_grad_(true);

  Result result;
  double offset = 0.0;
  try {
    result = evaluate(vectors, numbers, receivers, senders);
    // The structure's charge/spin energy offset is added once, by rank 0.
    if (comm->me == 0) offset = model_.get_method("energy_offset")({charge_, spin_}).toTensor().item<double>();
  } catch (const std::exception &e) {
    error->one(FLERR, "pair_style transip: model evaluation failed: {}", transip::exception_message(e));
  }

  tally_edge_gradients(result.edge_grads);
  if (eflag_global) eng_vdwl += energy_scale_ * (result.energy + offset);
  if (eflag_atom) {
    const torch::Tensor atom_energies = result.atom_energies.detach().to(torch::kFloat64).contiguous();
    for (int i = 0; i < nlocal; ++i) eatom[i] += energy_scale_ * atom_energies.data_ptr<double>()[i];
  }
}

// Forces and virial from the edge gradients g = dE/dr, r = x_sender - x_receiver (as reference_edge_forces and
// edge_virial in Python): F_receiver += g, F_sender -= g, virial -sum_e g_e (x) r_e. Senders may be
// ghosts (several ranks): LAMMPS sums their forces and per-atom virials back onto the owners (newton on).
void PairTransIP::tally_edge_gradients(const torch::Tensor &edge_grads) {
  double **f = atom->f;
  const torch::Tensor g = edge_grads.to(torch::kFloat64).contiguous();
  const double *ge = g.data_ptr<double>(), *r = graph_.vectors.data();
  double w[9] = {0, 0, 0, 0, 0, 0, 0, 0, 0};  // row-major
  for (size_t e = 0; e < graph_.receivers.size(); ++e, ge += 3, r += 3) {
    const int i = graph_.receivers[e], j = graph_.sender_atoms[e];
    double we[9];
    for (int a = 0; a < 3; ++a) {
      f[i][a] += energy_scale_ * ge[a];
      f[j][a] -= energy_scale_ * ge[a];
      for (int b = 0; b < 3; ++b) we[3 * a + b] = -ge[a] * r[b];
    }
    for (int k = 0; k < 9; ++k) w[k] += we[k];
    if (vflag_atom)  // each edge's virial shared equally by its two atoms
      for (int atom_index : {i, j}) add_voigt(vatom[atom_index], we, 0.5 * energy_scale_);
  }
  if (vflag_global) add_voigt(virial, w, energy_scale_);
}

// Adds scale x the symmetric part of the row-major 3x3 `w` to `target` in LAMMPS's order xx, yy, zz, xy, xz, yz.
// The model's virial is not exactly symmetric (rotation symmetry is learned), and LAMMPS stores six components.
void PairTransIP::add_voigt(double *target, const double *w, double scale) {
  target[0] += scale * w[0];
  target[1] += scale * w[4];
  target[2] += scale * w[8];
  target[3] += scale * 0.5 * (w[1] + w[3]);
  target[4] += scale * 0.5 * (w[2] + w[6]);
  target[5] += scale * 0.5 * (w[5] + w[7]);
}
