// XLA FFI handlers of the batch-norm kernels: operand checks, the split of
// the work into tasks, their execution on XLA's intra-op thread pool and the
// combine of partial sums.
//
// Determinism: the tasks and the partial-sum slots are fixed by the shape
// alone, each slot is written by one task, and the slots are combined in
// their index order (in double). Which thread runs a task, and how many
// threads there are, changes nothing in the result.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "kernels.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jaxbn {

// ---------------------------------------------------------------------------
// Choosing the instruction set, once.

namespace {

bool Supports(const char* isa) {
#if defined(JAXBN_X86_DISPATCH)
  __builtin_cpu_init();
  if (std::strcmp(isa, "avx512") == 0) {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }
  if (std::strcmp(isa, "avx2") == 0) {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  }
#endif
  return std::strcmp(isa, "baseline") == 0;
}

const KernelSet& Choose() {
  const KernelSet* sets[] = {
#if defined(JAXBN_X86_DISPATCH)
      &avx512::kKernels,
      &avx2::kKernels,
#endif
      &baseline::kKernels,
  };
  // JAXBN_KERNEL_ISA=avx2 (or baseline) asks for a lesser set, e.g. to test it.
  const char* wanted = std::getenv("JAXBN_KERNEL_ISA");
  for (const KernelSet* set : sets) {
    if (wanted != nullptr && *wanted != '\0' && std::strcmp(wanted, set->isa) != 0) continue;
    if (Supports(set->isa)) return *set;
  }
  return baseline::kKernels;
}

}  // namespace

const KernelSet& Kernels() {
  static const KernelSet& set = Choose();
  return set;
}

namespace {

// ---------------------------------------------------------------------------
// Tasks: fixed by the shape alone.

// About 128 KiB of float32 input per task: large enough that scheduling costs
// little, small enough for a few dozen tasks on the common shapes.
constexpr int64_t kTaskElements = int64_t{1} << 15;
// Features last: at least this many rows per task, so that the partial sums
// (one per feature and task) stay a small fraction of the input.
constexpr int64_t kMinRows = 64;
// Features last: rows wider than this are split across tasks.
constexpr int64_t kMaxFeatures = 8192;

int64_t CeilDiv(int64_t n, int64_t d) { return (n + d - 1) / d; }

struct Plan {
  Dims dims;
  int64_t rows, features, columns;  // task extents along a, c and b
  int64_t na, nc, nb;               // task counts along a, c and b

  explicit Plan(Dims d) : dims(d) {
    if (d.B == 1) {  // rows of features
      columns = 1;
      features = std::min(d.C, kMaxFeatures);
      rows = std::max(kMinRows, kTaskElements / features);
    } else if (d.B >= kTaskElements) {  // long runs, split
      columns = kTaskElements;
      features = rows = 1;
    } else if (d.C * d.B >= kTaskElements) {  // some runs of one row
      columns = d.B;
      features = std::max<int64_t>(1, kTaskElements / d.B);
      rows = 1;
    } else {  // whole rows of runs
      columns = d.B;
      features = d.C;
      rows = std::max<int64_t>(1, kTaskElements / (d.C * d.B));
    }
    rows = std::min(rows, std::max<int64_t>(d.A, 1));
    na = CeilDiv(d.A, rows);
    nc = CeilDiv(d.C, features);
    nb = CeilDiv(d.B, columns);
  }

  int64_t tasks() const { return dims.G * na * nc * nb; }
  // The partial sums of a feature: one slot per task along a and b.
  int64_t slots() const { return na * nb; }

  Task At(int64_t i) const {
    const int64_t ib = i % nb;
    i /= nb;
    const int64_t ic = i % nc;
    i /= nc;
    const int64_t ia = i % na;
    const int64_t g = i / na;
    return Task{g,
                ia * rows,
                std::min(dims.A, (ia + 1) * rows),
                ic * features,
                std::min(dims.C, (ic + 1) * features),
                ib * columns,
                std::min(dims.B, (ib + 1) * columns),
                ia * nb + ib};
  }
};

// JAXBN_KERNEL_THREADS=n caps the threads a kernel uses (1: the calling thread
// only); unset or 0, it uses XLA's intra-op pool. The results do not change.
int64_t ThreadCap() {
  static const int64_t cap = [] {
    const char* value = std::getenv("JAXBN_KERNEL_THREADS");
    return value == nullptr ? int64_t{0} : std::max<int64_t>(0, std::atoll(value));
  }();
  return cap;
}

// The threads of the latest parallel run (for tests of determinism).
std::atomic<int64_t> threads_used{1};

}  // namespace

int64_t ThreadsUsed() { return threads_used.load(); }

namespace {

// Runs body(0), ..., body(n - 1) on the calling thread and up to
// pool.num_threads() - 1 helpers. Each thread claims the next task index; the
// caller waits only for tasks that were claimed, never for a helper that has
// not started (the pool may be busy, or be running the caller itself).
void ParallelFor(ffi::ThreadPool& pool, int64_t n, const std::function<void(int64_t)>& body) {
  const int64_t threads = ThreadCap() > 0 ? ThreadCap() : pool.num_threads();
  const int64_t workers = std::min(n, threads);
  if (n > 1) threads_used.store(std::max<int64_t>(workers, 1));
  if (workers <= 1) {
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
  struct Shared {
    std::atomic<int64_t> next{0}, done{0};
    int64_t n;
    const std::function<void(int64_t)>* body;  // valid until every task is done
    std::mutex mutex;
    std::condition_variable finished;
  };
  auto shared = std::make_shared<Shared>();
  shared->n = n;
  shared->body = &body;
  auto work = [shared] {
    for (int64_t i; (i = shared->next.fetch_add(1)) < shared->n;) {
      (*shared->body)(i);
      if (shared->done.fetch_add(1) + 1 == shared->n) {
        std::lock_guard<std::mutex> lock(shared->mutex);
        shared->finished.notify_all();
      }
    }
  };
  for (int64_t w = 1; w < workers; ++w) pool.Schedule([work] { work(); });
  work();
  std::unique_lock<std::mutex> lock(shared->mutex);
  shared->finished.wait(lock, [&] { return shared->done.load() == shared->n; });
}

// p1, p2 -> out1, out2: per feature, the slots added in their order, in double.
void Reduce(ffi::ThreadPool& pool, ReduceArgs args,
            void (*kernel)(const ReduceArgs&, const Task&), float* out1, float* out2) {
  const Dims d = args.dims;
  const int64_t features = d.G * d.C;
  if (features == 0) return;
  if (d.A * d.B == 0) {
    std::fill(out1, out1 + features, 0.0f);
    std::fill(out2, out2 + features, 0.0f);
    return;
  }
  const Plan plan(d);
  std::vector<float> partial;
  if (plan.slots() == 1) {  // every task owns its features' final sums
    args.p1 = out1;
    args.p2 = out2;
  } else {
    partial.resize(2 * plan.slots() * features);
    args.p1 = partial.data();
    args.p2 = args.p1 + plan.slots() * features;
  }
  ParallelFor(pool, plan.tasks(), [&](int64_t i) { kernel(args, plan.At(i)); });
  if (plan.slots() == 1) return;
  std::vector<double> total(features);
  for (auto [p, out] : {std::make_pair(args.p1, out1), std::make_pair(args.p2, out2)}) {
    std::fill(total.begin(), total.end(), 0.0);
    for (int64_t slot = 0; slot < plan.slots(); ++slot) {
      const float* sums = p + slot * features;
      for (int64_t f = 0; f < features; ++f) total[f] += sums[f];
    }
    for (int64_t f = 0; f < features; ++f) out[f] = static_cast<float>(total[f]);
  }
}

// ---------------------------------------------------------------------------
// Operands.

std::optional<DType> KernelType(ffi::DataType type) {
  switch (type) {
    case ffi::DataType::F32:
      return DType::kF32;
    case ffi::DataType::BF16:
      return DType::kBF16;
    case ffi::DataType::F16:
      return DType::kF16;
    default:
      return std::nullopt;
  }
}

std::string Describe(ffi::AnyBuffer::Dimensions dims) {
  std::string text = "(";
  for (size_t i = 0; i < dims.size(); ++i) text += (i ? ", " : "") + std::to_string(dims[i]);
  return text + ")";
}

ffi::Error InvalidArgument(const std::string& message) {
  return ffi::Error::InvalidArgument("jaxbn kernels: " + message);
}

// The (G, A, C, B) view of the input. Python passes arrays without their
// size-1 axes; bit 8 >> k of `view` says whether the k-th of G, A, C, B is
// among the buffer's axes. C == 1 becomes one run per group.
ffi::Error ReadInput(const ffi::AnyBuffer& x, int64_t view, Dims* dims, DType* type) {
  const auto shape = x.dimensions();
  int64_t sizes[4];
  size_t next = 0;
  for (int k = 0; k < 4; ++k) {
    const bool present = (view >> (3 - k)) & 1;
    if (present && next == shape.size()) break;
    sizes[k] = present ? shape[next++] : 1;
  }
  if (next != shape.size() || static_cast<size_t>(__builtin_popcountll(view & 15)) != next) {
    return InvalidArgument("the input of shape " + Describe(shape) +
                           " does not match the view " + std::to_string(view));
  }
  const auto kernel_type = KernelType(x.element_type());
  if (!kernel_type) return InvalidArgument("the input must be float32, bfloat16 or float16");
  *type = *kernel_type;
  *dims = Dims{sizes[0], sizes[1], sizes[2], sizes[3]};
  if (dims->C == 1) *dims = Dims{dims->G, 1, 1, dims->A * dims->B};
  return ffi::Error::Success();
}

template <class Buffer>
ffi::Error CheckCount(const Buffer& operand, int64_t count, const char* name) {
  if (static_cast<int64_t>(operand.element_count()) != count) {
    return InvalidArgument(std::string(name) + " must hold " + std::to_string(count) +
                           " values, got shape " + Describe(operand.dimensions()));
  }
  return ffi::Error::Success();
}

int64_t Size(const Dims& d) { return d.G * d.A * d.C * d.B; }

// A full mask (G, A, C, B), or a row mask (G, A, 1, B) for every feature.
ffi::Error ReadMask(const ffi::AnyBuffer& mask, bool row, ReduceArgs* args) {
  if (mask.element_type() != ffi::DataType::PRED) return InvalidArgument("the mask must be bool");
  const Dims& d = args->dims;
  if (ffi::Error error = CheckCount(mask, row ? d.G * d.A * d.B : Size(d), "the mask");
      error.failure()) {
    return error;
  }
  args->mask_kind = row && d.C != 1 ? MaskKind::kRow : MaskKind::kFull;
  args->mask = static_cast<const uint8_t*>(mask.untyped_data());
  return ffi::Error::Success();
}

#define JAXBN_RETURN_IF_ERROR(expr)                   \
  do {                                                \
    if (ffi::Error error = (expr); error.failure()) { \
      return error;                                   \
    }                                                 \
  } while (0)

// ---------------------------------------------------------------------------
// Handlers.

// The operands of every reduction: the input, K and the two sums.
ffi::Error ReadReduction(const ffi::AnyBuffer& x, int64_t view, const ffi::Buffer<ffi::F32>& shift,
                         const ffi::Buffer<ffi::F32>& s1, const ffi::Buffer<ffi::F32>& s2,
                         ReduceArgs* args) {
  JAXBN_RETURN_IF_ERROR(ReadInput(x, view, &args->dims, &args->x_type));
  const int64_t features = args->dims.G * args->dims.C;
  JAXBN_RETURN_IF_ERROR(CheckCount(shift, features, "the shift"));
  JAXBN_RETURN_IF_ERROR(CheckCount(s1, features, "the first sum"));
  JAXBN_RETURN_IF_ERROR(CheckCount(s2, features, "the second sum"));
  args->x = x.untyped_data();
  args->shift = shift.typed_data();
  return ffi::Error::Success();
}

// The mask among a handler's optional operands, at `index`.
ffi::Error ReadMaskAt(const ffi::RemainingArgs& optional, size_t index, bool row,
                      ReduceArgs* args) {
  auto mask = optional.get<ffi::AnyBuffer>(index);
  if (mask.has_error()) return mask.error();
  return ReadMask(*mask, row, args);
}

ffi::Error ShiftedSumsImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> shift,
                           ffi::RemainingArgs mask, int64_t view, bool row_mask,
                           ffi::ResultBuffer<ffi::F32> s1, ffi::ResultBuffer<ffi::F32> s2) {
  ReduceArgs args{};
  JAXBN_RETURN_IF_ERROR(ReadReduction(x, view, shift, *s1, *s2, &args));
  if (mask.size() == 1) JAXBN_RETURN_IF_ERROR(ReadMaskAt(mask, 0, row_mask, &args));
  Reduce(pool, args, Kernels().shifted_sums, s1->typed_data(), s2->typed_data());
  return ffi::Error::Success();
}

// Operands after (t, x, shift): the mask if `masked`, then the gate z if `gated`.
ffi::Error WeightedSumsImpl(ffi::ThreadPool pool, ffi::AnyBuffer t, ffi::AnyBuffer x,
                            ffi::Buffer<ffi::F32> shift, ffi::RemainingArgs rest, int64_t view,
                            float slope, bool masked, bool gated, bool row_mask,
                            ffi::ResultBuffer<ffi::F32> s1, ffi::ResultBuffer<ffi::F32> s2) {
  ReduceArgs args{};
  JAXBN_RETURN_IF_ERROR(ReadReduction(x, view, shift, *s1, *s2, &args));
  JAXBN_RETURN_IF_ERROR(CheckCount(t, Size(args.dims), "the weighted operand"));
  const auto t_type = KernelType(t.element_type());
  if (!t_type || (*t_type != DType::kF32 && *t_type != args.x_type)) {
    return InvalidArgument("the weighted operand must be float32 or of the input's dtype");
  }
  if (rest.size() != static_cast<size_t>(masked) + static_cast<size_t>(gated)) {
    return InvalidArgument("expected " + std::to_string(masked + gated) +
                           " optional operands, got " + std::to_string(rest.size()));
  }
  args.t_type = *t_type;
  args.t = t.untyped_data();
  args.slope = slope;
  if (masked) JAXBN_RETURN_IF_ERROR(ReadMaskAt(rest, 0, row_mask, &args));
  if (gated) {
    auto z = rest.get<ffi::AnyBuffer>(masked ? 1 : 0);
    if (z.has_error()) return z.error();
    JAXBN_RETURN_IF_ERROR(CheckCount(*z, Size(args.dims), "the gate"));
    if (z->element_type() != x.element_type()) {
      return InvalidArgument("the gate must have the input's dtype");
    }
    args.z = z->untyped_data();
  }
  Reduce(pool, args, Kernels().weighted_sums, s1->typed_data(), s2->typed_data());
  return ffi::Error::Success();
}

// Operands after (x, shift, a, b): the residual, if any.
ffi::Error ShiftedAffineImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> shift,
                             ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                             ffi::RemainingArgs residual, int64_t view, float slope,
                             int64_t activation, ffi::Result<ffi::AnyBuffer> z) {
  AffineArgs args{};
  JAXBN_RETURN_IF_ERROR(ReadInput(x, view, &args.dims, &args.x_type));
  const int64_t features = args.dims.G * args.dims.C;
  JAXBN_RETURN_IF_ERROR(CheckCount(shift, features, "the shift"));
  JAXBN_RETURN_IF_ERROR(CheckCount(a, features, "a"));
  JAXBN_RETURN_IF_ERROR(CheckCount(b, features, "b"));
  JAXBN_RETURN_IF_ERROR(CheckCount(*z, Size(args.dims), "the output"));
  if (z->element_type() != x.element_type()) {
    return InvalidArgument("the output must have the input's dtype");
  }
  if (activation < 0 || activation > static_cast<int64_t>(Act::kLeaky)) {
    return InvalidArgument("unknown activation " + std::to_string(activation));
  }
  args.x = x.untyped_data();
  args.shift = shift.typed_data();
  args.a = a.typed_data();
  args.b = b.typed_data();
  args.act = static_cast<Act>(activation);
  args.slope = slope;
  args.z = z->untyped_data();
  if (residual.size() == 1) {
    auto r = residual.get<ffi::AnyBuffer>(0);
    if (r.has_error()) return r.error();
    JAXBN_RETURN_IF_ERROR(CheckCount(*r, Size(args.dims), "the residual"));
    const auto r_type = KernelType(r->element_type());
    if (!r_type || (*r_type != DType::kF32 && *r_type != args.x_type)) {
      return InvalidArgument("the residual must be float32 or of the input's dtype");
    }
    args.has_residual = true;
    args.r_type = *r_type;
    args.r = r->untyped_data();
  }
  if (Size(args.dims) == 0) return ffi::Error::Success();
  const Plan plan(args.dims);
  const KernelSet& kernels = Kernels();
  ParallelFor(pool, plan.tasks(), [&](int64_t i) { kernels.affine(args, plan.At(i)); });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jaxbn

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbnShiftedSums, jaxbn::ShiftedSumsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()          // x, as stored
                                  .Arg<ffi::Buffer<ffi::F32>>()  // K
                                  .RemainingArgs()                // [mask]
                                  .Attr<int64_t>("view")
                                  .Attr<bool>("row_mask")
                                  .Ret<ffi::Buffer<ffi::F32>>()  // S1
                                  .Ret<ffi::Buffer<ffi::F32>>()  // S2
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbnWeightedSums, jaxbn::WeightedSumsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()          // t
                                  .Arg<ffi::AnyBuffer>()          // x, as stored
                                  .Arg<ffi::Buffer<ffi::F32>>()  // K
                                  .RemainingArgs()                // [mask], [z]
                                  .Attr<int64_t>("view")
                                  .Attr<float>("slope")
                                  .Attr<bool>("masked")
                                  .Attr<bool>("gated")
                                  .Attr<bool>("row_mask")
                                  .Ret<ffi::Buffer<ffi::F32>>()  // sum(w t)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // sum(w t (x - K))
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbnShiftedAffine, jaxbn::ShiftedAffineImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()          // x, as stored
                                  .Arg<ffi::Buffer<ffi::F32>>()  // K
                                  .Arg<ffi::Buffer<ffi::F32>>()  // a
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b
                                  .RemainingArgs()                // [residual]
                                  .Attr<int64_t>("view")
                                  .Attr<float>("slope")
                                  .Attr<int64_t>("activation")
                                  .Ret<ffi::AnyBuffer>()  // z
);
