// transip._C: importing it loads libtransip_ops (a link-time dependency), which registers the torch.ops.transip
// ops. The tensors themselves go through torch.ops (one way to call each op, the same from Python,
// TorchScript and C++); this module reports how the library was built and where it lives, so that engines
// can load the very same file.
#include <dlfcn.h>
#include <pybind11/pybind11.h>

#include <string>

#ifndef TRANSIP_VERSION
#define TRANSIP_VERSION "unknown"
#endif

namespace transip {
// Defined in ops.cpp's library; any symbol of libtransip_ops serves to locate it.
std::string library_marker();
}  // namespace transip

namespace {
std::string library_path() {
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&transip::library_marker), &info) == 0 || info.dli_fname == nullptr) return "";
  return info.dli_fname;
}
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "TransIP native ops loader: importing it registers torch.ops.transip";
  m.def("library_path", &library_path, "Absolute path of libtransip_ops, the library engines load");
  m.attr("__version__") = TRANSIP_VERSION;
}
