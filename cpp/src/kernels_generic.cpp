// Kernels for any x86-64 (and any other CPU the compiler targets): the portable fallback.
#define TRANSIP_KERNEL_NAMESPACE generic
#include "kernels_impl.h"
