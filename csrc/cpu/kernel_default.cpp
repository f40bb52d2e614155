// The CPU element kernels for default; see kernel.h.
#define CPU_CAPABILITY DEFAULT
#define WAVG_ISA isa_default
#include "kernel.h"
