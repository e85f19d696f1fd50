// pair_style transip: a TransIP artifact (transip export) as a LAMMPS pair style, loaded as a plugin.
//
//   pair_style transip model.pt [charge Q] [spin S] [untrained error|warn]
//   pair_coeff * * El1 El2 ...          (one element per atom type)
//
// Charge and spin are checked at pair_style time against the model's range (charge_spin in its metadata) and,
// with elements at pair_coeff time, against what it was trained on (trained_domain); `untrained warn` turns the
// second check into one warning per value.
//
// Requires newton on and atom IDs. Ghosts reach one cutoff (plus skin). On one rank every ghost is a periodic image
// of a local atom, so the model sees local atoms only, with the images' displacements. On several ranks each
// block's tokens of the ghosts come from their owners (forward communication) and the gradients that reach them
// go back (reverse communication), so the model's receptive field never widens the ghost shell.
// units metal (eV, Angstrom) natively, units real converted (kcal/mol); other unit styles are refused.
#pragma once

#include <torch/csrc/autograd/autograd.h>
#include <torch/script.h>

#include <string>
#include <vector>

#include "pair.h"

namespace LAMMPS_NS {

class PairTransIP : public Pair {
 public:
  explicit PairTransIP(class LAMMPS *);
  ~PairTransIP() override;
  void compute(int, int) override;
  void settings(int, char **) override;
  void coeff(int, char **) override;
  void init_style() override;
  double init_one(int, int) override;
  int pack_forward_comm(int, int *, double *, int, int *) override;
  void unpack_forward_comm(int, int, double *) override;
  int pack_reverse_comm(int, int, double *) override;
  void unpack_reverse_comm(int, int *, double *) override;

 private:
  // The model's graph: edges (receiver, sender) within the cutoff; receivers are local atoms, in order.
  struct Graph {
    int atoms = 0;            // atoms the model sees: local, then the ghosts that send (several ranks)
    std::vector<int> ghosts;  // LAMMPS index of each of the model's ghost rows
    std::vector<int64_t> receivers, senders;  // model rows
    std::vector<int64_t> sender_atoms;        // LAMMPS index of each sender (forces go there)
    std::vector<double> vectors;  // (edges, 3) x_sender - x_receiver with the image LAMMPS gave, Angstrom
  };
  struct Result {
    double energy = 0.0;         // sum of this rank's atom energies, eV
    torch::Tensor atom_energies;  // (nlocal,)
    torch::Tensor edge_grads;     // (edges, 3) dE/dr
  };

  void allocate();
  void load_model(const std::string &path);
  void check_charge_spin();
  void untrained(const std::string &command, const std::string &problem);  // refuse, or warn once (untrained warn)
  void build_graph();
  Result evaluate(const torch::Tensor &vectors, const torch::Tensor &numbers, const torch::Tensor &receivers,
                  const torch::Tensor &senders);  // one pass (one rank) or block by block (several ranks)
  Result evaluate_by_blocks(const torch::Tensor &vectors, const torch::Tensor &numbers,
                            const torch::Tensor &receivers, const torch::Tensor &senders);
  torch::Tensor ghost_tokens(const torch::Tensor &local);  // forward communication of one block's input
  torch::Tensor sum_onto_owners(const torch::Tensor &local_grad, const torch::Tensor &ghost_grad);  // reverse
  void tally_edge_gradients(const torch::Tensor &edge_grads);  // forces, global and per-atom virial
  static void add_voigt(double *target, const double *w, double scale);

  torch::jit::Module model_;
  std::string model_path_;
  std::vector<int64_t> model_elements_;  // atomic numbers the model knows
  // The model's input range (charge_spin) and what its training data held (trained_domain; absent in artifacts
  // exported before it was recorded, then only the range is checked).
  int64_t max_abs_charge_ = 0, max_multiplicity_ = 0;
  bool has_trained_domain_ = false;
  std::vector<int64_t> trained_elements_, trained_charges_, trained_spins_;
  bool untrained_warn_ = false;          // `untrained warn`: warn once and run outside the trained domain
  std::vector<std::string> warned_;      // problems already warned about
  std::vector<int64_t> type_number_;  // atomic number per LAMMPS type (1-based)
  double cutoff_ = 0.0;               // Angstrom
  double receptive_field_ = 0.0;      // Angstrom
  int64_t num_layers_ = 0;
  int token_width_ = 0;  // d_model: doubles per atom in each communication
  bool float64_ = true;
  int64_t charge_ = 0;
  int64_t spin_ = 1;
  double energy_scale_ = 1.0;  // eV -> the unit style's energy unit
  bool fold_images_ = false;   // set by init_style: one rank
  Graph graph_;
  std::vector<int> owner_of_tag_;
  std::vector<int> row_of_ghost_;  // model row of each LAMMPS ghost, -1 if it sends to no local atom
  std::vector<std::pair<int, int>> row_;  // (sender, LAMMPS index) of one receiver's neighbours
  std::vector<double> tokens_, token_grads_;  // (atoms, token_width) buffers of the communication
};

}  // namespace LAMMPS_NS
