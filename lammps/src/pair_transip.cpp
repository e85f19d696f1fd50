// pair_style transip: see pair_transip.h and docs/lammps.md.
#include "pair_transip.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <sstream>

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

constexpr double kKcalPerMolPerEv = 23.060547830619026;  // CODATA 2018, as LAMMPS's own unit conversions

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
  torch::jit::ExtraFilesMap extra{{"transip_metadata.json", ""}};
  try {
    model_ = torch::jit::load(path, torch::kCPU, extra);
  } catch (const std::exception &e) {  // c10::Error, and torch::jit::ErrorReport for an op missing at compile
    const auto *c10_error = dynamic_cast<const c10::Error *>(&e);
    std::string what = c10_error ? c10_error->what_without_backtrace() : e.what();
    what.erase(0, what.find_first_not_of('\n'));
    what = what.substr(0, what.find('\n'));
    if (what.find("Unknown builtin op") != std::string::npos)
      error->all(FLERR, "pair_style transip: model file {} calls a native op that this plugin's libtransip_ops {} "
                 "does not have ({}); export the model again with this transip", path, transip::version(),
                 what);
    error->all(FLERR, "pair_style transip: cannot load model file {}: {} (a corrupt or truncated file must be "
               "exported again with transip export)", path, what);
  }
  const std::string &json = extra["transip_metadata.json"];
  if (transip::metadata_value(json, "format") != "transip-artifact")
    error->all(FLERR, "pair_style transip: {} has no TransIP metadata; export the model with `transip export`", path);
  // Native ops are versioned: the artifact records the version it was exported with (empty for reference kernels).
  const std::string ops_version = transip::metadata_value(json, "version");
  if (!ops_version.empty() && ops_version != "null" && ops_version != transip::version())
    error->all(FLERR, "pair_style transip: {} was exported with TransIP native ops {}, but this plugin has "
               "libtransip_ops {}; export the model again with this transip", path, ops_version,
               transip::version());
  if (std::stoi(transip::metadata_value(json, "format_version")) > 1)
    error->all(FLERR, "pair_style transip: {} has format version {}, newer than this plugin reads (1)", path,
               transip::metadata_value(json, "format_version"));
  cutoff_ = std::stod(transip::metadata_value(json, "cutoff"));
  receptive_field_ = std::stod(transip::metadata_value(json, "receptive_field"));
  float64_ = transip::metadata_value(json, "dtype") == "float64";
  model_elements_.clear();
  std::istringstream numbers(transip::metadata_value(json, "atomic_numbers"));
  for (std::string item; std::getline(numbers, item, ',');) model_elements_.push_back(std::stoi(item));
  model_.eval();
}

void PairTransIP::settings(int narg, char **arg) {
  if (narg < 1) error->all(FLERR, "pair_style transip: expected `pair_style transip model.pt [charge Q] [spin S]`");
  const std::string units = update->unit_style;
  if (units == "metal")
    energy_scale_ = 1.0;
  else if (units == "real")
    energy_scale_ = kKcalPerMolPerEv;
  else
    error->all(FLERR, "pair_style transip supports units metal and real only, not units {}", units);
  model_path_ = arg[0];
  for (int i = 1; i < narg; i += 2) {
    const std::string key = arg[i];
    if (i + 1 >= narg) error->all(FLERR, "pair_style transip: option {} needs a value", key);
    if (key == "charge")
      charge_ = utils::inumeric(FLERR, arg[i + 1], false, lmp);
    else if (key == "spin")
      spin_ = utils::inumeric(FLERR, arg[i + 1], false, lmp);
    else
      error->all(FLERR, "pair_style transip: unknown option {} (expected charge or spin)", key);
  }
  load_model(model_path_);
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
    if (z == 0) error->all(FLERR, "pair_coeff for transip: unknown element symbol {} for atom type {}", symbol, t);
    bool known = false;
    for (int e : model_elements_) known = known || e == z;
    if (!known) {
      std::string list;
      for (int e : model_elements_) list += std::string(" ") + transip::kElementSymbols[e];
      error->all(FLERR, "pair_coeff for transip: element {} (atom type {}) is not known to the model {}, which "
                 "knows{}", symbol, t, model_path_, list);
    }
    type_number_[t] = z;
  }
  for (int i = 1; i <= ntypes; ++i)
    for (int j = i; j <= ntypes; ++j) setflag[i][j] = 1;
}

void PairTransIP::init_style() {
  if (force->newton_pair == 0) error->all(FLERR, "pair_style transip requires newton on");
  fold_images_ = comm->nprocs == 1;
  if (fold_images_) {
    if (!atom->tag_enable) error->all(FLERR, "pair_style transip requires atom IDs (atom_modify id yes)");
    neighbor->add_request(this, NeighConst::REQ_FULL);
  } else {
    // Local energies depend on atoms out to the receptive field: ghosts must reach that far, with neighbours.
    neighbor->add_request(this, NeighConst::REQ_FULL | NeighConst::REQ_GHOST);
    if (comm->cutghostuser < receptive_field_) comm->cutghostuser = receptive_field_;
  }
}

double PairTransIP::init_one(int, int) { return cutoff_; }

void PairTransIP::image_graph(Graph &graph) {
  const int nlocal = atom->nlocal;
  double **x = atom->x;
  const tagint *tag = atom->tag;
  tagint max_tag = 0;
  for (int i = 0; i < nlocal; ++i) max_tag = std::max(max_tag, tag[i]);
  owner_of_tag_.assign(max_tag + 1, -1);
  for (int i = 0; i < nlocal; ++i) owner_of_tag_[tag[i]] = i;
  graph.atoms = nlocal;
  const double cut2 = cutoff_ * cutoff_;
  for (int ii = 0; ii < list->inum; ++ii) {
    const int i = list->ilist[ii];
    const int *neighbors = list->firstneigh[i];
    for (int jj = 0; jj < list->numneigh[i]; ++jj) {
      const int j = neighbors[jj] & NEIGHMASK;
      const double d[3] = {x[j][0] - x[i][0], x[j][1] - x[i][1], x[j][2] - x[i][2]};
      if (d[0] * d[0] + d[1] * d[1] + d[2] * d[2] >= cut2) continue;
      const int owner = j < nlocal ? j : owner_of_tag_[tag[j]];
      if (owner < 0) error->one(FLERR, "pair_style transip: ghost atom {} has no local owner on one rank", tag[j]);
      row_.emplace_back(owner, j);
    }
    // Senders in atom order: the model gathers their rows, and neighbouring rows share cache lines.
    std::sort(row_.begin(), row_.end());
    for (const auto &[owner, j] : row_) {
      graph.receivers.push_back(i);
      graph.senders.push_back(owner);
      for (int k = 0; k < 3; ++k) graph.shifts.push_back(x[j][k] - x[owner][k]);
    }
    row_.clear();
  }
}

void PairTransIP::ghost_graph(Graph &graph) {
  double **x = atom->x;
  graph.atoms = atom->nlocal + atom->nghost;
  const double cut2 = cutoff_ * cutoff_;
  for (int ii = 0; ii < list->inum + list->gnum; ++ii) {
    const int i = list->ilist[ii];
    const int *neighbors = list->firstneigh[i];
    for (int jj = 0; jj < list->numneigh[i]; ++jj) {
      const int j = neighbors[jj] & NEIGHMASK;
      const double dx = x[j][0] - x[i][0], dy = x[j][1] - x[i][1], dz = x[j][2] - x[i][2];
      if (dx * dx + dy * dy + dz * dz < cut2) {
        graph.receivers.push_back(i);
        graph.senders.push_back(j);
      }
    }
  }
  graph.shifts.assign(3 * graph.receivers.size(), 0.0);  // ghosts are explicit images
}

void PairTransIP::compute(int eflag, int vflag) {
  ev_init(eflag, vflag);
  const int nlocal = atom->nlocal;
  double **x = atom->x;
  double **f = atom->f;
  const int *type = atom->type;

  Graph graph;
  if (fold_images_)
    image_graph(graph);
  else
    ghost_graph(graph);
  const int ntotal = graph.atoms;
  const int64_t edges = static_cast<int64_t>(graph.receivers.size());
  torch::Tensor positions = torch::empty({ntotal, 3}, torch::kFloat64);
  torch::Tensor numbers = torch::empty({ntotal}, torch::kInt64);
  double *p = positions.data_ptr<double>();
  int64_t *z = numbers.data_ptr<int64_t>();
  for (int i = 0; i < ntotal; ++i) {
    for (int k = 0; k < 3; ++k) p[3 * i + k] = x[i][k];
    z[i] = type_number_[type[i]];
  }
  torch::Tensor edge_index = torch::empty({2, edges}, torch::kInt64);
  std::copy(graph.receivers.begin(), graph.receivers.end(), edge_index.data_ptr<int64_t>());
  std::copy(graph.senders.begin(), graph.senders.end(), edge_index.data_ptr<int64_t>() + edges);
  torch::Tensor shifts = torch::from_blob(graph.shifts.data(), {edges, 3}, torch::kFloat64);

  c10::IValue result;
  try {
    // The structure's charge/spin energy offsets are added once, by rank 0.
    result = model_.get_method("compute_with_neighbors")({positions, numbers, edge_index, shifts,
                                                          static_cast<int64_t>(nlocal), charge_, spin_, comm->me == 0,
                                                          static_cast<bool>(vflag_global),
                                                          static_cast<bool>(vflag_atom)});
  } catch (const c10::Error &e) {
    const std::string what = e.what_without_backtrace();
    error->one(FLERR, "pair_style transip: model evaluation failed: {}", what.substr(0, what.find('\n')));
  }
  const auto out = result.toGenericDict();
  const torch::Tensor forces = out.at("forces").toTensor().to(torch::kFloat64).contiguous();
  const double *fm = forces.data_ptr<double>();
  for (int i = 0; i < ntotal; ++i)
    for (int k = 0; k < 3; ++k) f[i][k] += energy_scale_ * fm[3 * i + k];
  if (eflag_global) eng_vdwl += energy_scale_ * out.at("energy").toTensor().to(torch::kFloat64).item<double>();
  if (eflag_atom) {
    const torch::Tensor atom_energies = out.at("atom_energies").toTensor().to(torch::kFloat64).contiguous();
    for (int i = 0; i < nlocal; ++i) eatom[i] += energy_scale_ * atom_energies.data_ptr<double>()[i];
  }
  if (vflag_global) {
    const torch::Tensor w = out.at("virial").toTensor().to(torch::kFloat64).contiguous();
    const double *v = w.data_ptr<double>();
    // LAMMPS order: xx, yy, zz, xy, xz, yz
    virial[0] += energy_scale_ * v[0];
    virial[1] += energy_scale_ * v[4];
    virial[2] += energy_scale_ * v[8];
    virial[3] += energy_scale_ * 0.5 * (v[1] + v[3]);
    virial[4] += energy_scale_ * 0.5 * (v[2] + v[6]);
    virial[5] += energy_scale_ * 0.5 * (v[5] + v[7]);
  }
  if (vflag_atom) {  // ghosts too: LAMMPS sums their share back onto the owners (newton on)
    const torch::Tensor w = out.at("atom_virial").toTensor().to(torch::kFloat64).contiguous();
    const double *v = w.data_ptr<double>();
    for (int i = 0; i < ntotal; ++i, v += 9) {
      vatom[i][0] += energy_scale_ * v[0];
      vatom[i][1] += energy_scale_ * v[4];
      vatom[i][2] += energy_scale_ * v[8];
      vatom[i][3] += energy_scale_ * 0.5 * (v[1] + v[3]);
      vatom[i][4] += energy_scale_ * 0.5 * (v[2] + v[6]);
      vatom[i][5] += energy_scale_ * 0.5 * (v[5] + v[7]);
    }
  }
}
