// The kernels compiled for the avx512 instruction set (flags in CMakeLists.txt).
#define JAXBN_ISA avx512
#include "kernels_impl.inc"
