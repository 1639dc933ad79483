// The kernels compiled for the avx2 instruction set (flags in CMakeLists.txt).
#define JAXBN_ISA avx2
#include "kernels_impl.inc"
