// pair_style transip: a TransIP artifact (transip export) as a LAMMPS pair style, loaded as a plugin.
//
//   pair_style transip model.pt [charge Q] [spin S]
//   pair_coeff * * El1 El2 ...          (one element per atom type)
//
// Requires newton on. On one rank every ghost is a periodic image of a local atom, so the model sees local atoms
// only, with periodic shifts (the ghost cutoff stays at the model cutoff). On several ranks the model is
// evaluated on local and ghost atoms, with ghosts out to the model's receptive field.
// units metal (eV, Angstrom) natively, units real converted (kcal/mol); other unit styles are refused.
#pragma once

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

 private:
  void allocate();
  void load_model(const std::string &path);
  // The graph handed to the model: edges (receiver, sender) within the cutoff, over `atoms` LAMMPS atoms.
  struct Graph {
    int atoms = 0;
    std::vector<int64_t> receivers, senders;
    std::vector<double> shifts;  // (edges, 3) periodic shift of each sender, Angstrom (metal and real alike)
  };
  void image_graph(Graph &graph);  // one rank: ghosts folded onto their owners as periodic shifts
  void ghost_graph(Graph &graph);  // several ranks: local and ghost receivers, no shifts

  torch::jit::Module model_;
  std::string model_path_;
  std::vector<int> model_elements_;   // atomic numbers the model knows
  std::vector<int64_t> type_number_;  // atomic number per LAMMPS type (1-based)
  double cutoff_ = 0.0;               // Angstrom
  double receptive_field_ = 0.0;      // Angstrom
  bool float64_ = true;
  int64_t charge_ = 0;
  int64_t spin_ = 1;
  double energy_scale_ = 1.0;  // eV -> the unit style's energy unit
  bool fold_images_ = false;   // set by init_style: one rank
  std::vector<int> owner_of_tag_;
  std::vector<std::pair<int, int>> row_;  // (owner, LAMMPS index) of one receiver's neighbours
};

}  // namespace LAMMPS_NS
