// CPU kernels of ms_syncbn, loaded by mindspore.ops.Custom(func_type="aot").
//
// Every kernel follows MindSpore's AOT calling convention:
//   int Kernel(int nparam, void **params, int *ndims, int64_t **shapes,
//              const char **dtypes, void *stream, void *extra)
// where params holds the inputs followed by the outputs, and returns 0
// on success (1 on an unsupported dtype or a malformed call). MindSpore hands
// us dense row-major buffers.
//
// Output shapes. Next to every kernel is its shape function
//   std::vector<int64_t> <Kernel>InferShape(int *ndims, int64_t **shapes, void *extra)
// which MindSpore finds by name when the primitive is created with
// out_shape=None (ms_syncbn/kernels/cpu.py), and calls at compile time and, in
// a graph compiled for dynamic shapes, again at run time with each step's
// input shapes. An unknown dimension is -1 and an unknown rank is the shape
// {-2}; the functions pass them on (a per-channel length of unknown C is -1).
// (A kernel with several outputs -- LocalMoments, BackwardReduce, CombineMoments, ... -- returns
// std::vector<std::vector<int64_t>>, one shape per output, and is registered with
// its outputs: kernels/cpu.py.)
// MindSpore 2.10 cannot call a Python shape function at run time (its kernel
// graph holds a plain Primitive, not the PrimitivePy), hence these.
//
// Layout: x is (N, C, *) and is viewed as (N, C, S) with S = prod(shape[2:])
// (S = 1 for a 2-D input); a "plane" is the contiguous run x[n, c, :] of S
// elements. Per-channel tensors are float32 of shape (C,). Element tensors
// (x, dy, y, dx) are float16, bfloat16, float32 or float64; all arithmetic on
// them is done in float32 (float64 for float64 input), and every reduction
// sums blocks of at most kBlock = 2048 terms in that type and accumulates the
// blocks in double. Kernels never communicate: the collective between
// local_moments and the normalisation are the caller's.
//
// Speed. Each kernel reads its inputs once, in memory order, and writes its
// output once; per-channel coefficients are computed once per call, never per
// element. The element loops work on one-register vectors (GCC vector
// extensions; float16 and bfloat16 are converted a vector at a time), the
// reductions keep four independent vector accumulators and, for short planes,
// carry them from plane to plane instead of summing lanes after each. With
// GCC on x86-64 the kernels are compiled three times -- AVX-512
// (avx512f/bw/vl/dq), AVX2 (avx2, fma, f16c) and the baseline -- and the first
// call picks the best set the CPU supports; elsewhere only the baseline is
// built. Measured by `python -m ms_syncbn.bench` (float32, one thread,
// AVX-512, the benchmark shapes): each kernel moves its bytes at 70-100% of the
// speed of a NumPy copy of as many bytes.
//
// Threads. The kernels are single-threaded on purpose. Measured inside
// MindSpore on a 2-core machine (graph mode, one process, OpenMP over
// channels): a 2-thread team made the whole SyncBatchNorm training step about
// 2x slower with libgomp's default active waiting (its spinning threads compete
// with MindSpore's own), and only ~10% faster with OMP_WAIT_POLICY=passive.
// Under msrun every rank owns its share of the cores anyway. So the kernels
// start no thread, and OMP_NUM_THREADS=1 is honoured trivially.
//
// Source layout: this file includes itself once per instruction set. The
// first part (MSSBN_ISA undefined) holds the shared definitions, the exported
// entry points and the dispatch; the second part (the kernels) is compiled
// inside namespace MSSBN_ISA under the matching `#pragma GCC target`.
#ifndef MSSBN_ISA
// =========================================== part 1: shared definitions ===
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)  // needs `#pragma GCC target`
#define MSSBN_X86_DISPATCH 1
#include <immintrin.h>
#endif

namespace mssbn {

// ---------------------------------------------------------------- dtypes --
struct bf16 { uint16_t bits; };
#if defined(__FLT16_MAX__)
typedef _Float16 f16;
#else
#error "ms_syncbn needs a compiler with _Float16 (GCC >= 12 or Clang >= 15)"
#endif

enum class DType { kF16, kBF16, kF32, kF64, kBad };
inline DType parse_dtype(const char *s) {
  if (std::strcmp(s, "float32") == 0) return DType::kF32;
  if (std::strcmp(s, "float16") == 0) return DType::kF16;
  if (std::strcmp(s, "bfloat16") == 0) return DType::kBF16;
  if (std::strcmp(s, "float64") == 0) return DType::kF64;
  return DType::kBad;
}

// (N, C, S) view of an element tensor.
struct NCS {
  int64_t n, c, s;
};
inline NCS ncs_of(int ndim, const int64_t *shape) {
  NCS v{shape[0], ndim > 1 ? shape[1] : 1, 1};
  for (int i = 2; i < ndim; ++i) v.s *= shape[i];
  return v;
}

// At most this many terms are summed in the compute type before the partial
// sum goes to double: the float32 error stays that of a 2048-term sum however
// large the batch.
constexpr int64_t kBlock = 2048;

// A kernel on one dtype: params in contract order (inputs, then the output).
typedef void (*KernelFn)(void **params, NCS view);
enum Kernel { kLocalMoments, kNormalize, kBackwardReduce, kBackwardElemt, kNumKernels };
// [kernel][dtype] for the four supported dtypes, in DType order.
typedef KernelFn KernelTable[kNumKernels][4];

}  // namespace mssbn

// ------------------------------------- part 2 once per instruction set --
#ifdef MSSBN_X86_DISPATCH
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 false positive in avx512fintrin.h
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prefer-vector-width=512")
#define MSSBN_ISA isa_avx512
#define MSSBN_ISA_LEVEL 2
#include "syncbn_cpu.cc"
#undef MSSBN_ISA_LEVEL
#undef MSSBN_ISA
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define MSSBN_ISA isa_avx2
#define MSSBN_ISA_LEVEL 1
#include "syncbn_cpu.cc"
#undef MSSBN_ISA_LEVEL
#undef MSSBN_ISA
#pragma GCC pop_options
#pragma GCC diagnostic pop
#endif

#define MSSBN_ISA isa_baseline
#define MSSBN_ISA_LEVEL 0
#include "syncbn_cpu.cc"
#undef MSSBN_ISA_LEVEL
#undef MSSBN_ISA

// ------------------------------------------------------------- dispatch --
namespace mssbn {

// The instruction set the kernels run with: the best one the CPU supports,
// or a lower one named by the environment variable MS_SYNCBN_CPU_ISA
// ("avx512", "avx2", "baseline"; read once, at the first kernel call), so the
// tests can check every compiled variant on one machine. A name the CPU does
// not support, or an unknown one, means the best.
struct Isa {
  const char *name;
  const KernelTable *kernels;
};

const Isa &active_isa() {
  static const Isa isa = [] {
    Isa supported[3];  // best first
    int count = 0;
#ifdef MSSBN_X86_DISPATCH
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c");
    if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      supported[count++] = Isa{"avx512", &isa_avx512::kernels};
    if (avx2) supported[count++] = Isa{"avx2", &isa_avx2::kernels};
#endif
    supported[count++] = Isa{"baseline", &isa_baseline::kernels};
    const char *wanted = std::getenv("MS_SYNCBN_CPU_ISA");
    for (int i = 0; wanted != nullptr && i < count; ++i)
      if (std::strcmp(wanted, supported[i].name) == 0) return supported[i];
    return supported[0];
  }();
  return isa;
}

// Run `kernel` on the element dtype `dtype`; 1 on an unsupported dtype so
// MindSpore reports the kernel as failed.
int run(Kernel kernel, const char *dtype, void **params, NCS view) {
  const DType d = parse_dtype(dtype);
  if (d == DType::kBad) return 1;
  (*active_isa().kernels)[kernel][static_cast<int>(d)](params, view);
  return 0;
}

}  // namespace mssbn

// ------------------------------------------------------- shape functions --
namespace mssbn {

typedef std::vector<int64_t> Shape;
typedef std::vector<Shape> Shapes;  // one per output, for kernels with several

// The shape of input i, as given (unknown dimensions and rank included).
inline Shape input_shape(const int *ndims, int64_t *const *shapes, int i) {
  return Shape(shapes[i], shapes[i] + ndims[i]);
}

// (scale * L + offset,) with L = shapes[i][dim]: a per-channel vector whose
// length follows C; -1 while L is unknown (or input i's rank is).
inline Shape per_channel(const int *ndims, int64_t *const *shapes, int i, int dim,
                         int64_t scale, int64_t offset) {
  const int64_t length = dim < ndims[i] ? shapes[i][dim] : -1;
  return Shape{length < 0 ? -1 : scale * length + offset};
}

}  // namespace mssbn

// <Kernel>InferShape(ndims, shapes, extra): see "Output shapes" at the top. The
// third argument is MindSpore's AotExtra *, unused. (A C++ type returned from an
// extern "C" function is MindSpore's convention; Clang would warn about it.)
#if defined(__clang__)
#pragma clang diagnostic ignored "-Wreturn-type-c-linkage"
#endif
#define MSSBN_INFER_SHAPE(kernel) \
  extern "C" mssbn::Shape kernel##InferShape(int *ndims, int64_t **shapes, void *)
// The same for a kernel with several outputs: one shape per output.
#define MSSBN_INFER_SHAPES(kernel) \
  extern "C" mssbn::Shapes kernel##InferShape(int *ndims, int64_t **shapes, void *)

// ------------------------------------------------------ exported entries --
// Name of the instruction set in use ("avx512", "avx2" or "baseline").
extern "C" const char *MsSyncBnCpuIsa() { return mssbn::active_isa().name; }

// x is params[1] for the backward kernels (dy first), params[0] otherwise.
// LocalMoments: x (N, C, *), shift (C,) f32 -> mean, var (C,) f32 (local_moments)
extern "C" int LocalMoments(int nparam, void **params, int *ndims, int64_t **shapes,
                            const char **dtypes, void *, void *) {
  if (nparam != 4 || ndims[0] < 2 || ndims[1] != 1 || shapes[1][0] != shapes[0][1] ||
      std::strcmp(dtypes[1], "float32") != 0)
    return 1;
  return mssbn::run(mssbn::kLocalMoments, dtypes[0], params, mssbn::ncs_of(ndims[0], shapes[0]));
}
MSSBN_INFER_SHAPES(LocalMoments) {
  const mssbn::Shape c = mssbn::per_channel(ndims, shapes, 0, 1, 1, 0);
  return mssbn::Shapes{c, c};
}

extern "C" int Normalize(int nparam, void **params, int *ndims, int64_t **shapes,
                         const char **dtypes, void *, void *) {
  if (nparam != 6 || ndims[0] < 2) return 1;
  return mssbn::run(mssbn::kNormalize, dtypes[0], params, mssbn::ncs_of(ndims[0], shapes[0]));
}
// x, mean, invstd, weight, bias -> y like x
MSSBN_INFER_SHAPE(Normalize) { return mssbn::input_shape(ndims, shapes, 0); }

// dy and x: the same dtype and shape; the tensors at `first`..`last` (inputs or
// outputs): per-channel, (C,) float32 with C = x.shape[1].
static bool backward_call_ok(const int *ndims, int64_t *const *shapes, const char **dtypes,
                             int first, int last) {
  if (ndims[1] < 2 || ndims[0] != ndims[1] || std::strcmp(dtypes[0], dtypes[1]) != 0) return false;
  for (int d = 0; d < ndims[1]; ++d)
    if (shapes[0][d] != shapes[1][d]) return false;
  for (int i = first; i <= last; ++i)
    if (ndims[i] != 1 || shapes[i][0] != shapes[1][1] || std::strcmp(dtypes[i], "float32") != 0)
      return false;
  return true;
}

// BackwardReduce: dy, x (N, C, *), mean, invstd (C,) f32
//   -> sum_dy, sum_dy_xmu, grad_weight, grad_bias (C,) f32 (contract: backward_reduce below).
extern "C" int BackwardReduce(int nparam, void **params, int *ndims, int64_t **shapes,
                              const char **dtypes, void *, void *) {
  if (nparam != 8 || !backward_call_ok(ndims, shapes, dtypes, 2, 7)) return 1;
  return mssbn::run(mssbn::kBackwardReduce, dtypes[1], params, mssbn::ncs_of(ndims[1], shapes[1]));
}
// dy, x (N, C, *), mean, invstd -> (C,) x 4
MSSBN_INFER_SHAPES(BackwardReduce) {
  const mssbn::Shape channels = mssbn::per_channel(ndims, shapes, 1, 1, 1, 0);
  return mssbn::Shapes{channels, channels, channels, channels};
}

// BackwardElemt: dy, x (N, C, *), mean, invstd, weight, sum_dy, sum_dy_xmu (C,) f32,
// count (1,) f32 -> dx like x (contract: backward_elemt below).
extern "C" int BackwardElemt(int nparam, void **params, int *ndims, int64_t **shapes,
                             const char **dtypes, void *, void *) {
  if (nparam != 9 || !backward_call_ok(ndims, shapes, dtypes, 2, 6)) return 1;
  if (ndims[7] != 1 || shapes[7][0] != 1 || std::strcmp(dtypes[7], "float32") != 0) return 1;
  return mssbn::run(mssbn::kBackwardElemt, dtypes[1], params, mssbn::ncs_of(ndims[1], shapes[1]));
}
// dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count -> dx like x
MSSBN_INFER_SHAPE(BackwardElemt) { return mssbn::input_shape(ndims, shapes, 1); }

// True if the first `count` tensors of a call are all 1-D float32 (the
// per-channel kernels below take nothing else).
static bool all_1d_float32(int count, const int *ndims, const char **dtypes) {
  for (int i = 0; i < count; ++i)
    if (ndims[i] != 1 || std::strcmp(dtypes[i], "float32") != 0) return false;
  return true;
}

// CombineMoments: reduced (C+5,), local_mean, local_var (C,), count (1,),
// expected (3,), if_equal (3,3), if_unequal (3,3), text (T,), all float32
//   -> m2_part, mean (C,), group_count, group_count_less_one, code, increment (1,),
//      all float32.
// The moments protocol's step between its two all-reduces (ms_syncbn/sync_function.py),
// in one call. `reduced` is the group's sum of the first payload,
//   [ sum n_i m_i (C) | N | N - 1 | checks (3) ],
// local_mean, local_var and count are this rank's m_i, biased v_i and n_i. The
// verdict (3,) is, for row r, the minimum over k of
//   checks[k] == expected[k] ? if_equal[r][k] : if_unequal[r][k]
// and is [q, -code, increment] (the caller's tables say which checks give
// which; q is 1, or -inf to stop the step). Per channel, in float32 as the
// composite computes it:
//   mean     = sum n_i m_i / N   (N = 0: NaN, which an empty group never reads)
//   m2_part  = n_i * (v_i + q * (m_i - mean)^2)
// so that a stopped step's m2 (the second all-reduce of m2_part) is -inf or NaN
// on every channel; group_count = N, group_count_less_one = N - 1, code, increment.
// A code other than 0 stops the step here, before the second all-reduce (every
// rank computes the same verdict from the same sums, so every rank stops):
// stop_step below, with the layer's text. A malformed call stops with error 1.
// The composite form: ms_syncbn.kernels.composite.CombineMoments (the same
// float32 values; NaN instead of stopping).
[[noreturn]] static void stop_step(float code, const float *text, int64_t length,
                                   const char *kernel);
extern "C" int CombineMoments(int nparam, void **params, int *ndims, int64_t **shapes,
                              const char **dtypes, void *, void *) {
  bool well_formed = nparam == 14 && all_1d_float32(5, ndims, dtypes) &&
                     std::strcmp(dtypes[5], "float32") == 0 && std::strcmp(dtypes[6], "float32") == 0 &&
                     ndims[5] == 2 && ndims[6] == 2 && all_1d_float32(1, ndims + 7, dtypes + 7);
  const int64_t channels = well_formed ? shapes[1][0] : 0;
  well_formed = well_formed && shapes[0][0] == channels + 5 && shapes[2][0] == channels &&
                shapes[3][0] == 1 && shapes[4][0] == 3;
  for (int i = 5; well_formed && i < 7; ++i)
    well_formed = shapes[i][0] == 3 && shapes[i][1] == 3;
  if (!well_formed) stop_step(1.0f, nullptr, 0, "CombineMoments");
  const float *reduced = static_cast<const float *>(params[0]);
  const float *local_mean = static_cast<const float *>(params[1]);
  const float *local_var = static_cast<const float *>(params[2]);
  const float n_i = *static_cast<const float *>(params[3]);
  const float *expected = static_cast<const float *>(params[4]);
  const float *if_equal = static_cast<const float *>(params[5]);
  const float *if_unequal = static_cast<const float *>(params[6]);
  const float *checks = reduced + channels + 2;
  float verdict[3];
  for (int r = 0; r < 3; ++r) {
    float v = INFINITY;
    for (int k = 0; k < 3; ++k)
      v = std::min(v, checks[k] == expected[k] ? if_equal[3 * r + k] : if_unequal[3 * r + k]);
    verdict[r] = v;
  }
  const float q = verdict[0], code = -verdict[1] + 0.0f;  // + 0.0f: -0 -> 0
  if (code != 0.0f) stop_step(code, static_cast<const float *>(params[7]), shapes[7][0],
                              "CombineMoments");
  const float count = reduced[channels];
  float *m2_part = static_cast<float *>(params[8]);
  float *mean = static_cast<float *>(params[9]);
  for (int64_t c = 0; c < channels; ++c) {
    const float m = reduced[c] / count;
    const float d = local_mean[c] - m;
    mean[c] = m;
    m2_part[c] = (local_var[c] + q * d * d) * n_i;
  }
  *static_cast<float *>(params[10]) = count;
  *static_cast<float *>(params[11]) = reduced[channels + 1];
  *static_cast<float *>(params[12]) = code;
  *static_cast<float *>(params[13]) = verdict[2];
  return 0;
}
// reduced (C+5,), local_mean, local_var (C,), ... -> (C,) x 2, (1,) x 4
MSSBN_INFER_SHAPES(CombineMoments) {
  const mssbn::Shape c = mssbn::per_channel(ndims, shapes, 1, 0, 1, 0);
  return mssbn::Shapes{c, c, {1}, {1}, {1}, {1}};
}

// FinalizeMoments: m2 (C,), group_count (1,), group_count_less_one (1,), eps (1,),
// all float32 -> invstd, var (C,) float32.
// The group's statistics from the all-reduced sum of squared deviations M2
// (CombineMoments' m2_part summed over the group), in float32 as the composite:
//   invstd = 1 / sqrt(M2 / N + eps)     (from the biased variance)
//   var    = M2 / (N - 1)               (the unbiased variance, update_stats' input)
// Non-finite wherever M2 is (a stopped step, an empty group, a NaN or Inf
// channel), which is how the state knows not to move. A malformed call stops
// with error 1. The composite form: ms_syncbn.kernels.composite.FinalizeMoments.
extern "C" int FinalizeMoments(int nparam, void **params, int *ndims, int64_t **shapes,
                               const char **dtypes, void *, void *) {
  bool well_formed = nparam == 6 && all_1d_float32(6, ndims, dtypes);
  for (int i = 1; well_formed && i < 4; ++i) well_formed = shapes[i][0] == 1;
  well_formed = well_formed && shapes[4][0] == shapes[0][0] && shapes[5][0] == shapes[0][0];
  if (!well_formed) stop_step(1.0f, nullptr, 0, "FinalizeMoments");
  const float *m2 = static_cast<const float *>(params[0]);
  const float count = *static_cast<const float *>(params[1]);
  const float count_less_one = *static_cast<const float *>(params[2]);
  const float eps = *static_cast<const float *>(params[3]);
  float *invstd = static_cast<float *>(params[4]);
  float *var = static_cast<float *>(params[5]);
  for (int64_t c = 0; c < shapes[0][0]; ++c) {
    invstd[c] = 1.0f / std::sqrt(m2[c] / count + eps);
    var[c] = m2[c] / count_less_one;
  }
  return 0;
}
// m2 (C,), ... -> (C,), (C,)
MSSBN_INFER_SHAPES(FinalizeMoments) {
  const mssbn::Shape c = mssbn::input_shape(ndims, shapes, 0);
  return mssbn::Shapes{c, c};
}

// UpdateStats: mean, var, shift, running_mean, running_var (C,), factor (1,),
// all float32 -> shift', running_mean', running_var' (C,), all float32.
// The layer's state after one training step, in one call, each output a tensor
// of its own. `mean` and `var` are the group's statistics, `var` the UNBIASED
// variance (Bessel's correction is the caller's: FinalizeMoments gives it), and
// non-finite on every channel of a step that must not change the state (a
// stopped step, fewer than 2 values per channel) and wherever mean is not
// finite: so one test decides. Per channel, with change = isfinite(var[c]):
//   shift'[c]        = change ? mean[c]                                 : shift[c]
//   running_mean'[c] = change ? lerp(running_mean[c], mean[c], factor) : running_mean[c]
//   running_var'[c]  = change ? lerp(running_var[c], var[c], factor)   : running_var[c]
// with lerp(a, b, w) = a + w * (b - a) in float32, as ops.lerp computes it (the
// composite form, ms_syncbn.kernels.composite.UpdateStats, is bit for bit the
// same where no FMA contracts the product and the sum: this part of the file is
// compiled without an FMA target on x86-64).
extern "C" int UpdateStats(int nparam, void **params, int *ndims, int64_t **shapes,
                           const char **dtypes, void *, void *) {
  if (nparam != 9 || !all_1d_float32(9, ndims, dtypes)) return 1;
  const int64_t channels = shapes[0][0];
  const int per_channel[] = {0, 1, 2, 3, 4, 6, 7, 8};
  for (int i : per_channel)
    if (shapes[i][0] != channels) return 1;
  if (shapes[5][0] != 1) return 1;
  const float *mean = static_cast<const float *>(params[0]);
  const float *var = static_cast<const float *>(params[1]);
  const float *shift = static_cast<const float *>(params[2]);
  const float *running_mean = static_cast<const float *>(params[3]);
  const float *running_var = static_cast<const float *>(params[4]);
  const float factor = *static_cast<const float *>(params[5]);
  float *shift_out = static_cast<float *>(params[6]);
  float *mean_out = static_cast<float *>(params[7]);
  float *var_out = static_cast<float *>(params[8]);
  for (int64_t c = 0; c < channels; ++c) {
    const bool change = std::isfinite(var[c]);
    shift_out[c] = change ? mean[c] : shift[c];
    mean_out[c] = change ? running_mean[c] + factor * (mean[c] - running_mean[c]) : running_mean[c];
    var_out[c] = change ? running_var[c] + factor * (var[c] - running_var[c]) : running_var[c];
  }
  return 0;
}
// mean (C,), ... -> (C,) x 3
MSSBN_INFER_SHAPES(UpdateStats) {
  const mssbn::Shape channels = mssbn::per_channel(ndims, shapes, 0, 0, 1, 0);
  return mssbn::Shapes{channels, channels, channels};
}

// Fingerprint: invstd (C,), modulus (1,), both float32 -> (1,) float32, an
// integer in [0, modulus).
// Names one application of a layer in one step identically on every rank of the
// group (the statistics are all-reduced, so every rank holds them bit for bit),
// in one call. Over the C values v_i of invstd, in float32 then integers (the
// same arithmetic as the composite form, ms_syncbn.kernels.composite.Fingerprint,
// written for few Ascend kernels):
//   s_i = v_i * 2^12, or 0 if that is not finite
//   b_i = int(s_i - 2^14 * floor(s_i * 2^-14))   (s_i mod 2^14 in [0, 2^14], truncated)
//   fingerprint = (sum_i b_i) mod modulus
// Every float32 step is exact (products by powers of two, an integer multiple of
// 2^14 subtracted from a float32 of the same magnitude) but the first, which is
// correctly rounded; the sum stays below 2^31 while C < 131072. modulus must be an
// integer in [1, 2^24) (the caller keeps group size * modulus < 2^24, so the
// all-reduced sum of W equal fingerprints is exact in float32).
extern "C" int Fingerprint(int nparam, void **params, int *ndims, int64_t **shapes,
                           const char **dtypes, void *, void *) {
  if (nparam != 3 || !all_1d_float32(3, ndims, dtypes)) return 1;
  const int64_t channels = shapes[0][0];
  if (shapes[1][0] != 1 || shapes[2][0] != 1) return 1;
  const float modulus_value = *static_cast<const float *>(params[1]);
  if (!(modulus_value >= 1.0f && modulus_value < 16777216.0f) ||
      modulus_value != std::floor(modulus_value))
    return 1;
  const int64_t modulus = static_cast<int64_t>(modulus_value);
  const float *invstd = static_cast<const float *>(params[0]);
  int64_t digest = 0;
  for (int64_t j = 0; j < channels; ++j) {
    float scaled = invstd[j] * 4096.0f;
    if (!std::isfinite(scaled)) scaled = 0.0f;
    const float wrapped = scaled - 16384.0f * std::floor(scaled * (1.0f / 16384.0f));
    digest += static_cast<int64_t>(wrapped);
  }
  *static_cast<float *>(params[2]) = static_cast<float>(digest % modulus);
  return 0;
}
// invstd, modulus -> (1,)
MSSBN_INFER_SHAPE(Fingerprint) { return mssbn::Shape{1}; }

// Stops the step with guard code `code`: writes the error to stderr and throws a
// std::runtime_error, which MindSpore raises as a RuntimeError whose message
// includes ours. `text` (T >= 0 elements, one UTF-8 byte each; null when the
// call was malformed) is NUL-separated: entry 0 names the layer, entry k says
// what code k means (ms_syncbn.kernels.guard_text builds it from GUARD_MEANINGS,
// the one place the meanings are stated). Without text the message gives the
// code only. A code outside [1, 1000) is reported as 1 (malformed call of
// `kernel`). The message format is ms_syncbn.kernels.guard_message's.
[[noreturn]] static void stop_step(float code, const float *text, int64_t length,
                                   const char *kernel) {
  const int k = code >= 1.0f && code < 1000.0f ? static_cast<int>(code) : 1;
  std::vector<std::string> entries(1);  // entry 0: the layer; entry k: the meaning of code k
  for (int64_t i = 0; text != nullptr && i < length; ++i) {
    const float c = text[i];
    if (c == 0.0f) {
      entries.emplace_back();
    } else if (c > 0.0f && c < 256.0f) {
      entries.back().push_back(static_cast<char>(static_cast<unsigned char>(c)));
    }
  }
  std::string message = "ms_syncbn SyncBatchNorm error " + std::to_string(k);
  if (!entries[0].empty()) message += " in layer " + entries[0];
  message += ": ";
  if (k < static_cast<int>(entries.size()) && !entries[k].empty()) {
    message += entries[k];
  } else if (k == 1) {
    message += std::string("malformed call of the ") + kernel + " kernel";
  } else {
    message += "see ms_syncbn.kernels.GUARD_MEANINGS";
  }
  message += ".";
  std::fprintf(stderr, "%s\n", message.c_str());
  std::fflush(stderr);
  throw std::runtime_error(message);
}

// CheckPairing: values (M,), reduced_tag (1,), tag (1,), group size (1,),
// code (1,), text (T,), all float32 -> values (M,) float32.
// The backward's layer-identity check, in one call after the all-reduce: every
// rank put its layer's tag (the fingerprint, an integer) in the payload, so the
// all-reduced slot is tag * group size exactly when every rank's collective
// belonged to the same layer application (integers below 2^24: exact float32).
//   reduced_tag == tag * group size (float32 product):  values' = values (a copy)
//   otherwise (NaN included): the step stops with error `code` (the caller passes
//     GUARD_MISPAIRED), as CombineMoments stops for its codes (stop_step: the
//     message names the layer, text entry 0, and says what the code means, text
//     entry `code`); the output is then not written.
// A malformed call stops with error 1 ("malformed call of the CheckPairing kernel").
// The composite form: ms_syncbn.kernels.composite.CheckPairing (NaN instead of stopping).
extern "C" int CheckPairing(int nparam, void **params, int *ndims, int64_t **shapes,
                            const char **dtypes, void *, void *) {
  bool well_formed = nparam == 7 && all_1d_float32(7, ndims, dtypes) && shapes[6][0] == shapes[0][0];
  for (int i = 1; well_formed && i < 5; ++i) well_formed = shapes[i][0] == 1;
  if (!well_formed) stop_step(1.0f, nullptr, 0, "CheckPairing");
  const float reduced_tag = *static_cast<const float *>(params[1]);
  const float tag = *static_cast<const float *>(params[2]);
  const float group_size = *static_cast<const float *>(params[3]);
  if (reduced_tag == tag * group_size) {
    std::memcpy(params[6], params[0], static_cast<size_t>(shapes[0][0]) * sizeof(float));
    return 0;
  }
  stop_step(*static_cast<const float *>(params[4]), static_cast<const float *>(params[5]),
            shapes[5][0], "CheckPairing");
}
// values (M,), reduced_tag, tag, group size, code (1,), text (T,) -> values
MSSBN_INFER_SHAPE(CheckPairing) { return mssbn::input_shape(ndims, shapes, 0); }

#else  // MSSBN_ISA
// ======================== part 2: the kernels, for one instruction set ===
namespace mssbn {
namespace MSSBN_ISA {
namespace {

// ------------------------------------------------- element access (Lanes) --
// Vectors are one native register wide: 64 bytes with AVX-512, 32 with AVX2,
// 16 on the baseline (wider generic vectors would be split through memory).
constexpr int kVectorBytes = MSSBN_ISA_LEVEL >= 2 ? 64 : MSSBN_ISA_LEVEL == 1 ? 32 : 16;
typedef float vf32 __attribute__((vector_size(kVectorBytes)));
typedef double vf64 __attribute__((vector_size(kVectorBytes)));
typedef uint32_t vu32 __attribute__((vector_size(kVectorBytes)));
typedef uint16_t vu16 __attribute__((vector_size(kVectorBytes / 2)));  // as many lanes as vf32

// Lanes<T>: compute type CT, its vector V of W lanes, and conversion-on-load /
// rounding-on-store for one element dtype, as a scalar (load(p, CT&)) or as a
// whole vector of W consecutive elements (load(p, V&)).
template <typename T> struct Lanes;

template <> struct Lanes<float> {
  typedef float CT;
  typedef vf32 V;
  static constexpr int W = kVectorBytes / 4;
  static void load(const float *p, CT &v) { v = *p; }
  static void load(const float *p, V &v) { std::memcpy(&v, p, sizeof v); }
  static void store(float *p, CT v) { *p = v; }
  static void store(float *p, V v) { std::memcpy(p, &v, sizeof v); }
};

template <> struct Lanes<double> {
  typedef double CT;
  typedef vf64 V;
  static constexpr int W = kVectorBytes / 8;
  static void load(const double *p, CT &v) { v = *p; }
  static void load(const double *p, V &v) { std::memcpy(&v, p, sizeof v); }
  static void store(double *p, CT v) { *p = v; }
  static void store(double *p, V v) { std::memcpy(p, &v, sizeof v); }
};

// bfloat16 is the top half of a float32: widening is a shift; narrowing
// rounds to nearest even, and a NaN stays a (quiet) NaN.
template <> struct Lanes<bf16> {
  typedef float CT;
  typedef vf32 V;
  static constexpr int W = kVectorBytes / 4;
  static void load(const bf16 *p, CT &v) {
    const uint32_t u = static_cast<uint32_t>(p->bits) << 16;
    std::memcpy(&v, &u, 4);
  }
  static void store(bf16 *p, CT v) {
    uint32_t u;
    std::memcpy(&u, &v, 4);
    const uint32_t high = u >> 16;
    p->bits = static_cast<uint16_t>(v != v ? (high | 0x40u) : ((u + 0x7fffu + (high & 1u)) >> 16));
  }
  static void load(const bf16 *p, V &v) {
#if MSSBN_ISA_LEVEL >= 2  // AVX-512F: zero-extend 16 halves at once
    v = (V)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(p))), 16);
#elif MSSBN_ISA_LEVEL == 1  // AVX2: 8 halves
    v = (V)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p))), 16);
#else
    vu16 h;
    std::memcpy(&h, p, sizeof h);
    const vu32 u = __builtin_convertvector(h, vu32) << 16;
    std::memcpy(&v, &u, sizeof v);
#endif
  }
  static void store(bf16 *p, V v) {
    vu32 u;
    std::memcpy(&u, &v, sizeof u);
    const vu32 high = u >> 16;
    const vu32 rounded = (u + 0x7fffu + (high & 1u)) >> 16;
    const vu32 bits = v != v ? (high | 0x40u) : rounded;  // each < 2^16
#if MSSBN_ISA_LEVEL >= 2  // AVX-512F: narrow 16 x 32 -> 16 x 16 bits
    _mm256_storeu_si256(reinterpret_cast<__m256i *>(p), _mm512_cvtepi32_epi16((__m512i)bits));
#elif MSSBN_ISA_LEVEL == 1  // AVX2: pack the two 128-bit halves
    const __m256i b = (__m256i)bits;
    _mm_storeu_si128(reinterpret_cast<__m128i *>(p),
                     _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1)));
#else
    const vu16 h = __builtin_convertvector(bits, vu16);
    std::memcpy(p, &h, sizeof h);
#endif
  }
};

// float16: the F16C / AVX-512F conversions (round to nearest even, like the
// C cast); the baseline converts lane by lane.
template <> struct Lanes<f16> {
  typedef float CT;
  typedef vf32 V;
  static constexpr int W = kVectorBytes / 4;
  static void load(const f16 *p, CT &v) { v = static_cast<float>(*p); }
  static void store(f16 *p, CT v) { *p = static_cast<f16>(v); }
#if MSSBN_ISA_LEVEL >= 2
  static void load(const f16 *p, V &v) {
    v = (V)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(p)));
  }
  static void store(f16 *p, V v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i *>(p), _mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT));
  }
#elif MSSBN_ISA_LEVEL == 1
  static void load(const f16 *p, V &v) {
    v = (V)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p)));
  }
  static void store(f16 *p, V v) {
    _mm_storeu_si128(reinterpret_cast<__m128i *>(p), _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT));
  }
#else
  static void load(const f16 *p, V &v) {
    for (int j = 0; j < W; ++j) v[j] = static_cast<float>(p[j]);
  }
  static void store(f16 *p, V v) {
    for (int j = 0; j < W; ++j) p[j] = static_cast<f16>(v[j]);
  }
#endif
};

template <typename V> inline auto hsum(V v) -> decltype(v[0] + 0) {
  decltype(v[0] + 0) s = 0;
  for (unsigned j = 0; j < sizeof(V) / sizeof(v[0]); ++j) s += v[j];
  return s;
}

// Partial sums of u and u*w over elements [0, len) of one plane, where
// term(i, u, w) produces u and w for element i (as scalars, or as a vector of
// elements i..i+W-1). Whole vectors are added into v1/v2, the remaining
// elements into t1/t2; four vector accumulators keep the adds independent.
// The caller bounds the number of terms (kBlock) before going to double.
template <typename T, typename Term>
inline void plane_partial_sums(int64_t len, const Term &term, typename Lanes<T>::V &v1,
                               typename Lanes<T>::V &v2, typename Lanes<T>::CT &t1,
                               typename Lanes<T>::CT &t2) {
  typedef Lanes<T> L;
  typedef typename L::V V;
  constexpr int W = L::W;
  V a1[4] = {}, a2[4] = {};
  int64_t i = 0;
  for (; i + 4 * W <= len; i += 4 * W) {
    for (int k = 0; k < 4; ++k) {
      V u, w;
      term(i + k * W, u, w);
      a1[k] += u;
      a2[k] += u * w;
    }
  }
  for (; i + W <= len; i += W) {
    V u, w;
    term(i, u, w);
    a1[0] += u;
    a2[0] += u * w;
  }
  v1 += (a1[0] + a1[1]) + (a1[2] + a1[3]);
  v2 += (a2[0] + a2[1]) + (a2[2] + a2[3]);
  for (; i < len; ++i) {
    typename L::CT u, w;
    term(i, u, w);
    t1 += u;
    t2 += u * w;
  }
}

// Per-channel sums of u and u*w over all planes of an (N, C, S) tensor with
// S > 1, in memory order: s1[c] += sum u, s2[c] += sum u*w (double).
// plane_term(n, c) returns the term function of plane (n, c) (see
// plane_partial_sums). Per-channel partial sums stay in vectors across planes
// and go to double every kBlock terms, so short planes (S = 7, 196, ...) cost
// no horizontal sum each.
template <typename T, typename PlaneTerm>
void plane_sums(NCS v, const PlaneTerm &plane_term, double *s1, double *s2) {
  typedef Lanes<T> L;
  typedef typename L::CT CT;
  typedef typename L::V V;
  const int64_t C = v.c, S = v.s;
  if (S >= kBlock) {  // long planes: go to double after each block of a plane
    for (int64_t n = 0; n < v.n; ++n) {
      for (int64_t c = 0; c < C; ++c) {
        const auto term = plane_term(n, c);
        for (int64_t b = 0; b < S; b += kBlock) {
          V v1 = {}, v2 = {};
          CT t1 = 0, t2 = 0;
          plane_partial_sums<T>(std::min(kBlock, S - b), [&term, b](int64_t i, auto &u, auto &w) {
            term(b + i, u, w);
          }, v1, v2, t1, t2);
          s1[c] += hsum(v1) + t1;
          s2[c] += hsum(v2) + t2;
        }
      }
    }
    return;
  }
  // Per-channel vector partial sums live in plain CT arrays (W lanes per
  // channel; std::vector does not promise the 64-byte alignment of V).
  constexpr int W = L::W;
  const int64_t rows_per_block = kBlock / S;  // >= 1
  std::vector<CT> lane_sums(2 * C * W);      // [ u | u*w ], W lanes per channel
  std::vector<CT> tail_sums(2 * C);
  for (int64_t n0 = 0; n0 < v.n; n0 += rows_per_block) {
    std::fill(lane_sums.begin(), lane_sums.end(), CT(0));
    std::fill(tail_sums.begin(), tail_sums.end(), CT(0));
    const int64_t n1 = std::min(n0 + rows_per_block, v.n);
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t c = 0; c < C; ++c) {
        V v1, v2;
        std::memcpy(&v1, &lane_sums[c * W], sizeof(V));
        std::memcpy(&v2, &lane_sums[(C + c) * W], sizeof(V));
        plane_partial_sums<T>(S, plane_term(n, c), v1, v2, tail_sums[c], tail_sums[C + c]);
        std::memcpy(&lane_sums[c * W], &v1, sizeof(V));
        std::memcpy(&lane_sums[(C + c) * W], &v2, sizeof(V));
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      CT l1 = 0, l2 = 0;
      for (int j = 0; j < W; ++j) {
        l1 += lane_sums[c * W + j];
        l2 += lane_sums[(C + c) * W + j];
      }
      s1[c] += static_cast<double>(l1) + tail_sums[c];
      s2[c] += static_cast<double>(l2) + tail_sums[C + c];
    }
  }
}

// The same sums when S = 1: row n holds one element per channel, so the
// channels are the vector lanes and the sums run down the rows.
// term(n, c, u, w) produces u and w for x[n, c] (or channels c..c+W-1).
template <typename T, typename Term>
inline void column_sums(int64_t rows, int64_t channels, const Term &term, double *s1, double *s2) {
  typedef Lanes<T> L;
  typedef typename L::CT CT;
  typedef typename L::V V;
  constexpr int W = L::W;
  std::vector<CT> a1(channels), a2(channels);
  for (int64_t b = 0; b < rows; b += kBlock) {
    const int64_t e = std::min(b + kBlock, rows);
    std::fill(a1.begin(), a1.end(), CT(0));
    std::fill(a2.begin(), a2.end(), CT(0));
    for (int64_t n = b; n < e; ++n) {
      int64_t c = 0;
      for (; c + W <= channels; c += W) {
        V u, w, acc1, acc2;
        term(n, c, u, w);
        std::memcpy(&acc1, &a1[c], sizeof(V));
        std::memcpy(&acc2, &a2[c], sizeof(V));
        acc1 += u;
        acc2 += u * w;
        std::memcpy(&a1[c], &acc1, sizeof(V));
        std::memcpy(&a2[c], &acc2, sizeof(V));
      }
      for (; c < channels; ++c) {
        CT u, w;
        term(n, c, u, w);
        a1[c] += u;
        a2[c] += u * w;
      }
    }
    for (int64_t c = 0; c < channels; ++c) {
      s1[c] += a1[c];
      s2[c] += a2[c];
    }
  }
}

// y[i] = f(i) for i in [0, len), a vector at a time; f(i, v) computes element
// i (or elements i..i+W-1) of the output in the compute type.
template <typename T, typename Elem>
inline void elementwise(int64_t len, T *y, const Elem &f) {
  typedef Lanes<T> L;
  constexpr int W = L::W;
  int64_t i = 0;
  for (; i + W <= len; i += W) {
    typename L::V v;
    f(i, v);
    L::store(y + i, v);
  }
  for (; i < len; ++i) {
    typename L::CT v;
    f(i, v);
    L::store(y + i, v);
  }
}

// ------------------------------------------------------------ shifted sums --
// Per-channel sums of x-K and (x-K)^2 over the local batch, in double, for a
// per-channel K in the compute type (sums[0:C] and sums[C:2C]). One pass over
// x, in memory order; x-K is formed in the compute type, the sums accumulate as
// described at the top (blocks of kBlock in the compute type, then double).
template <typename T>
void shifted_sums(const T *x, const std::vector<typename Lanes<T>::CT> &k, double *sums, NCS v) {
  typedef Lanes<T> L;
  typedef typename L::CT CT;
  const int64_t C = v.c, S = v.s;
  const CT *kp = k.data();
  std::fill(sums, sums + 2 * C, 0.0);
  if (S == 1) {
    column_sums<T>(v.n, C, [x, kp, C](int64_t n, int64_t c, auto &u, auto &w) {
      typedef typename std::remove_reference<decltype(u)>::type U;
      U kv;
      std::memcpy(&kv, kp + c, sizeof kv);
      L::load(x + n * C + c, u);
      u -= kv;
      w = u;
    }, sums, sums + C);
  } else {
    plane_sums<T>(v, [x, kp, C, S](int64_t n, int64_t c) {
      const T *p = x + (n * C + c) * S;
      const CT kc = kp[c];
      return [p, kc](int64_t i, auto &u, auto &w) {
        L::load(p + i, u);
        u -= kc;
        w = u;
      };
    }, sums, sums + C);
  }
}

// ---------------------------------------------------------- local_moments --
// Contract:
//   in  x      (N, C, *)  f16 | bf16 | f32 | f64
//   in  shift  (C,)       f32   a hint: a value near each channel's mean (the
//                               layer's previous group mean); any finite value works
//   out mean   (C,)       f32   the local mean m = sum(x) / n
//   out var    (C,)       f32   the local biased variance sum((x-m)^2) / n
// with n = N * prod(shape[2:]); zeros for an empty batch. Both are as exact as
// two passes around the mean, whatever the hint: one pass gives the shifted
// sums around K = shift (d = sum(x-K)/n, var = sum((x-K)^2)/n - d^2, in double);
// the subtraction loses about d^2 / var of the precision of the sums, so a channel
// with d^2 > kRecentreRatio * var (+ a tolerance for a constant channel) is summed
// again around K = its mean (a second pass over x, taken inside the kernel: no
// branch in the caller's graph). A hint so far off that the first pass's mean is
// itself inaccurate (|K - mean| beyond ~1e6 standard deviations) needs more such
// passes, each ~2^-20 closer, and a hint so far off that the shifted sums overflow
// float32 (|K| > ~1e19) a pass around 0 first; kMaxPasses bounds them. A NaN or Inf
// in a channel gives a NaN variance there (and a non-finite mean).
constexpr double kRecentreRatio = 64.0;          // 8 standard deviations: ~6 bits
constexpr double kRecentreMeanTolerance = 0x1p-20;  // of |mean|, for var = 0
constexpr int kMaxPasses = 6;  // 1, or 2 for a hint off by > 8 std: more only for absurd hints
template <typename T>
void local_moments(const T *x, const float *shift, float *mean, float *var, NCS v) {
  typedef typename Lanes<T>::CT CT;
  const int64_t C = v.c;
  const double n = static_cast<double>(v.n) * static_cast<double>(v.s);
  if (n == 0) {
    std::fill(mean, mean + C, 0.0f);
    std::fill(var, var + C, 0.0f);
    return;
  }
  std::vector<double> sums(2 * C);
  std::vector<CT> k(C);
  for (int64_t c = 0; c < C; ++c) k[c] = static_cast<CT>(std::isfinite(shift[c]) ? shift[c] : 0.0f);
  bool again = true;
  for (int pass = 0; pass < kMaxPasses && again; ++pass) {
    shifted_sums<T>(x, k, sums.data(), v);
    again = false;
    for (int64_t c = 0; c < C; ++c) {
      const double d = sums[c] / n;
      const double m = static_cast<double>(k[c]) + d;
      const double vb = std::max(sums[C + c] / n - d * d, 0.0);  // rounding; NaN stays NaN
      const double tol = kRecentreMeanTolerance * m;
      CT next = k[c];
      if (!std::isfinite(m)) {
        // The sums around K overflowed, or the data are not finite: then the sums
        // around 0 are not finite either, and the pass after keeps K = 0.
        next = static_cast<CT>(0);
      } else if (!std::isfinite(vb) || d * d > kRecentreRatio * vb + tol * tol) {
        next = static_cast<CT>(m);  // the squares overflowed, or K is too far off
      }
      if (next != k[c]) {
        k[c] = next;
        again = true;
      }
      mean[c] = static_cast<float>(m);
      var[c] = static_cast<float>(vb);
    }
  }
}

// -------------------------------------------------------------- normalize --
// Contract:
//   in  x       (N, C, *)  f16 | bf16 | f32 | f64
//   in  mean    (C,) f32,  invstd (C,) f32,  weight (C,) f32,  bias (C,) f32
//   out y       (N, C, *)  dtype of x
//   y = (x - mean) * invstd * weight + bias, evaluated as (x - mean) * a + bias
//   with a = weight * invstd per channel (in the compute type). Subtracting
//   first keeps large-mean data exact (x - mean is exact when x and mean are
//   close).
template <typename T>
void normalize(const T *x, const float *mean, const float *invstd, const float *weight,
               const float *bias, T *y, NCS v) {
  typedef Lanes<T> L;
  typedef typename L::CT CT;
  const int64_t C = v.c, S = v.s;
  std::vector<CT> coef(3 * C);  // [ a | mean | bias ]
  CT *a = coef.data(), *m = a + C, *b = m + C;
  for (int64_t c = 0; c < C; ++c) {
    a[c] = static_cast<CT>(weight[c]) * static_cast<CT>(invstd[c]);
    m[c] = static_cast<CT>(mean[c]);
    b[c] = static_cast<CT>(bias[c]);
  }
  if (S == 1) {
    for (int64_t n = 0; n < v.n; ++n) {
      const T *src = x + n * C;
      elementwise<T>(C, y + n * C, [src, a, m, b](int64_t c, auto &out) {
        typedef typename std::remove_reference<decltype(out)>::type U;
        U xv, av, mv, bv;
        L::load(src + c, xv);
        std::memcpy(&av, a + c, sizeof av);
        std::memcpy(&mv, m + c, sizeof mv);
        std::memcpy(&bv, b + c, sizeof bv);
        out = (xv - mv) * av + bv;
      });
    }
    return;
  }
  for (int64_t n = 0; n < v.n; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t off = (n * C + c) * S;
      const T *src = x + off;
      const CT ac = a[c], mc = m[c], bc = b[c];
      elementwise<T>(S, y + off, [src, ac, mc, bc](int64_t i, auto &out) {
        L::load(src + i, out);
        out = (out - mc) * ac + bc;
      });
    }
  }
}

// -------------------------------------------------------- backward_reduce --
// Contract:
//   in  dy          (N, C, *)  dtype of x
//   in  x           (N, C, *)  f16 | bf16 | f32 | f64
//   in  mean        (C,)       f32
//   in  invstd      (C,)       f32
//   out sum_dy      (C,)       f32  sum(dy)                local sums
//   out sum_dy_xmu  (C,)       f32  sum(dy * (x - mean))
//   out grad_weight (C,)       f32  sum_dy_xmu * invstd    (float32 product of the two
//                                                          float32 values)
//   out grad_bias   (C,)       f32  sum_dy                 (a copy)
// One pass over dy and x; an empty batch yields zeros (all four outputs). The weight and bias
// gradients are the local ones (data parallelism sums them over the ranks).
template <typename T>
void backward_reduce(const T *dy, const T *x, const float *mean, const float *invstd,
                     float *sum_dy_out, float *sum_dy_xmu_out, float *grad_weight_out,
                     float *grad_bias_out, NCS v) {
  typedef Lanes<T> L;
  typedef typename L::CT CT;
  const int64_t C = v.c, S = v.s;
  std::vector<double> sums(2 * C, 0.0);  // [ sum(dy) | sum(dy*(x-mean)) ]
  std::vector<CT> m(C);
  for (int64_t c = 0; c < C; ++c) m[c] = static_cast<CT>(mean[c]);
  if (S == 1) {
    const CT *mp = m.data();
    column_sums<T>(v.n, C, [dy, x, mp, C](int64_t n, int64_t c, auto &u, auto &w) {
      typedef typename std::remove_reference<decltype(u)>::type U;
      U mv;
      std::memcpy(&mv, mp + c, sizeof mv);
      L::load(dy + n * C + c, u);
      L::load(x + n * C + c, w);
      w -= mv;
    }, sums.data(), sums.data() + C);
  } else {
    const CT *mp = m.data();
    plane_sums<T>(v, [dy, x, mp, C, S](int64_t n, int64_t c) {
      const int64_t off = (n * C + c) * S;
      const T *g = dy + off;
      const T *p = x + off;
      const CT mc = mp[c];
      return [g, p, mc](int64_t i, auto &u, auto &w) {
        L::load(g + i, u);
        L::load(p + i, w);
        w -= mc;
      };
    }, sums.data(), sums.data() + C);
  }
  for (int64_t c = 0; c < C; ++c) {
    const float sum_dy = static_cast<float>(sums[c]);
    const float sum_dy_xmu = static_cast<float>(sums[C + c]);
    sum_dy_out[c] = sum_dy;
    sum_dy_xmu_out[c] = sum_dy_xmu;
    // An empty batch gives zeros whatever invstd is (NaN when the whole group is empty).
    grad_weight_out[c] = v.n == 0 || S == 0 ? 0.0f : sum_dy_xmu * invstd[c];
    grad_bias_out[c] = sum_dy;
  }
}

// --------------------------------------------------------- backward_elemt --
// Contract:
//   in  dy      (N, C, *)  dtype of x
//   in  x       (N, C, *)  f16 | bf16 | f32 | f64
//   in  mean, invstd, weight  (C,) f32
//   in  sum_dy      (C,) f32  sum(dy) over the whole group
//   in  sum_dy_xmu  (C,) f32  sum(dy * (x - mean)) over the whole group
//   in  count   (1,)  f32  number of elements per channel over the whole group
//                          (a count <= 0 is treated as 1)
//   out dx      (N, C, *)  dtype of x
//   dx = weight * invstd * (dy - sum(dy)/count - (x - mean) * invstd^2 * sum(dy*(x-mean))/count),
//   evaluated as dx = a * dy + p * (x - mean) + q with per-channel a, p, q
//   computed in double once per call and rounded to the compute type.
template <typename T>
void backward_elemt(const T *dy, const T *x, const float *mean, const float *invstd,
                    const float *weight, const float *sum_dy, const float *sum_dy_xmu,
                    const float *count, T *dx, NCS v) {
  typedef Lanes<T> L;
  typedef typename L::CT CT;
  const int64_t C = v.c, S = v.s;
  const double cnt = count[0] > 0.0f ? static_cast<double>(count[0]) : 1.0;
  std::vector<CT> coef(4 * C);  // [ a | p | q | mean ]
  CT *a = coef.data(), *p = a + C, *q = p + C, *m = q + C;
  for (int64_t c = 0; c < C; ++c) {
    const double is = invstd[c];
    const double ad = static_cast<double>(weight[c]) * is;
    a[c] = static_cast<CT>(ad);
    p[c] = static_cast<CT>(-ad * is * is * (static_cast<double>(sum_dy_xmu[c]) / cnt));
    q[c] = static_cast<CT>(-ad * (static_cast<double>(sum_dy[c]) / cnt));
    m[c] = static_cast<CT>(mean[c]);
  }
  if (S == 1) {
    for (int64_t n = 0; n < v.n; ++n) {
      const T *g = dy + n * C;
      const T *src = x + n * C;
      elementwise<T>(C, dx + n * C, [g, src, a, p, q, m](int64_t c, auto &out) {
        typedef typename std::remove_reference<decltype(out)>::type U;
        U gv, xv, av, pv, qv, mv;
        L::load(g + c, gv);
        L::load(src + c, xv);
        std::memcpy(&av, a + c, sizeof av);
        std::memcpy(&pv, p + c, sizeof pv);
        std::memcpy(&qv, q + c, sizeof qv);
        std::memcpy(&mv, m + c, sizeof mv);
        out = av * gv + pv * (xv - mv) + qv;
      });
    }
    return;
  }
  for (int64_t n = 0; n < v.n; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t off = (n * C + c) * S;
      const T *g = dy + off;
      const T *src = x + off;
      const CT ac = a[c], pc = p[c], qc = q[c], mc = m[c];
      elementwise<T>(S, dx + off, [g, src, ac, pc, qc, mc](int64_t i, auto &out) {
        typedef typename std::remove_reference<decltype(out)>::type U;
        U gv;
        L::load(g + i, gv);
        L::load(src + i, out);
        out = ac * gv + pc * (out - mc) + qc;
      });
    }
  }
}

// ------------------------------------------------------ per-dtype entries --
template <typename T> T *as(void *p) { return static_cast<T *>(p); }

// Parameter order is the contract order above: inputs, then the output.
template <typename T> void run_local_moments(void **p, NCS v) {
  local_moments<T>(as<const T>(p[0]), as<const float>(p[1]), as<float>(p[2]), as<float>(p[3]), v);
}
template <typename T> void run_normalize(void **p, NCS v) {
  normalize<T>(as<const T>(p[0]), as<const float>(p[1]), as<const float>(p[2]),
               as<const float>(p[3]), as<const float>(p[4]), as<T>(p[5]), v);
}
template <typename T> void run_backward_reduce(void **p, NCS v) {
  backward_reduce<T>(as<const T>(p[0]), as<const T>(p[1]), as<const float>(p[2]),
                     as<const float>(p[3]), as<float>(p[4]), as<float>(p[5]), as<float>(p[6]),
                     as<float>(p[7]), v);
}
template <typename T> void run_backward_elemt(void **p, NCS v) {
  backward_elemt<T>(as<const T>(p[0]), as<const T>(p[1]), as<const float>(p[2]),
                    as<const float>(p[3]), as<const float>(p[4]), as<const float>(p[5]),
                    as<const float>(p[6]), as<const float>(p[7]), as<T>(p[8]), v);
}

}  // namespace

// [kernel][dtype], dtypes in DType order: f16, bf16, f32, f64.
#define MSSBN_ROW(fn) {fn<f16>, fn<bf16>, fn<float>, fn<double>}
extern const KernelTable kernels = {MSSBN_ROW(run_local_moments), MSSBN_ROW(run_normalize),
                                    MSSBN_ROW(run_backward_reduce), MSSBN_ROW(run_backward_elemt)};
#undef MSSBN_ROW

}  // namespace MSSBN_ISA
}  // namespace mssbn
#endif  // MSSBN_ISA
