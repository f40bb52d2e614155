// The CPU element kernels for AVX2; see kernel.h. The pragma is what -mavx2 would do for
// this file only, and the macros are what that flag would define (at::vec and sleef test them).
#pragma GCC target("avx2,fma,f16c")
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#define CPU_CAPABILITY_AVX2
#define CPU_CAPABILITY AVX2
#define WAVG_ISA isa_avx2
#include "kernel.h"
