// Kernels compiled with AVX-512 enabled (CMake adds the flags when the compiler accepts them);
// only called when the CPU reports avx512f at run time.
#define TRANSIP_KERNEL_NAMESPACE avx512
#include "kernels_impl.h"
