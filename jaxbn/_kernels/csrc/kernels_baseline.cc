// The kernels compiled for the baseline instruction set (flags in CMakeLists.txt).
#define JAXBN_ISA baseline
#include "kernels_impl.inc"
