// The batch-norm kernels: what one chunk of work computes, and the table of
// their versions per instruction set.
//
// Every array is viewed as x[g, a, c, b] with shape (G, A, C, B), row-major:
// the features c sit in one contiguous block between the reduction axes a
// (before them) and b (after them), and g counts independent groups (ghost
// batches, the members of a vmapped ensemble), each with its own statistics.
// Features last (NHWC) is (1, N*H*W, C, 1); NCHW is (1, N, C, H*W).
// Per-feature arrays (K, a, b, the sums) are (G, C); a mask is either a "row"
// mask (G, A, 1, B), the same for every feature, or a full one (G, A, C, B).
//
// This header holds plain data and declarations only: the code that includes
// it is compiled once per instruction set (kernels_impl.inc), and nothing it
// defines may be shared between those copies.

#ifndef JAXBN_KERNELS_H_
#define JAXBN_KERNELS_H_

#include <cstdint>

namespace jaxbn {

enum class DType : int { kF32, kBF16, kF16 };
enum class MaskKind : int { kNone, kRow, kFull };
// The activation z = act(u): u itself, max(u, 0), or u if u > 0 else s u.
enum class Act : int { kIdentity, kRelu, kLeaky };

struct Dims {
  int64_t G, A, C, B;
};

// One unit of work: group g, rows [a0, a1), features [c0, c1), columns
// [b0, b1). A reduction writes its partial sums into slot `slot` of the
// partial-sum buffers, which hold (slots, G, C) floats each.
struct Task {
  int64_t g, a0, a1, c0, c1, b0, b1, slot;
};

// Operands of the two reductions:
//   shifted sums:   p1 = sum m (x - K),   p2 = sum m (x - K)^2
//   weighted sums:  p1 = sum w t,         p2 = sum w t (x - K),
//                   w = m * (z > 0 ? 1 : slope)   (no gate: w = m)
struct ReduceArgs {
  Dims dims;
  DType x_type;
  const void* x;  // the stored input, (G, A, C, B)
  DType t_type;   // kF32 or x_type; weighted sums only
  const void* t;  // (G, A, C, B); weighted sums only
  const void* z;  // the gate, of x_type, (G, A, C, B); nullptr for none
  float slope;
  const float* shift;  // K, (G, C)
  MaskKind mask_kind;
  const uint8_t* mask;
  float* p1;  // partial sums, (slots, G, C)
  float* p2;
};

// Operands of z = act((x - K) a + b + r), z of x_type.
struct AffineArgs {
  Dims dims;
  DType x_type;
  const void* x;
  const float* shift;  // K, a, b: (G, C)
  const float* a;
  const float* b;
  bool has_residual;
  DType r_type;  // kF32 or x_type
  const void* r;
  Act act;
  float slope;
  void* z;
};

struct KernelSet {
  const char* isa;
  void (*shifted_sums)(const ReduceArgs&, const Task&);
  void (*weighted_sums)(const ReduceArgs&, const Task&);
  void (*affine)(const AffineArgs&, const Task&);
};

namespace avx512 {
extern const KernelSet kKernels;
}
namespace avx2 {
extern const KernelSet kKernels;
}
namespace baseline {
extern const KernelSet kKernels;
}

// The fastest version this CPU runs, chosen once.
const KernelSet& Kernels();

// How many threads the latest kernel call with more than one task ran on.
int64_t ThreadsUsed();

}  // namespace jaxbn

#endif  // JAXBN_KERNELS_H_
