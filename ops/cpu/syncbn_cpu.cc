// CPU kernels of ms_syncbn, loaded by mindspore.ops.Custom(func_type="aot").
//
// Every kernel follows MindSpore's AOT calling convention:
//   int Kernel(int nparam, void **params, int *ndims, int64_t **shapes,
//              const char **dtypes, void *stream, void *extra)
// where params holds the inputs followed by the single output, and returns 0
// on success. MindSpore hands us dense row-major buffers.
//
// Layout: x is (N, C, *) and is viewed as (N, C, S) with S = prod(shape[2:])
// (S = 1 for a 2-D input). Per-channel tensors are float32 of shape (C,).
// Element tensors (x, dy, y, dx) are float16, bfloat16, float32 or float64;
// all arithmetic on them is done in float32 (float64 for float64 input) and
// all reductions are accumulated in double. Kernels never communicate: the
// collective between local_stats and the normalisation is the caller's.
#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

// ---------------------------------------------------------------- dtypes --
struct bf16 { uint16_t bits; };
#if defined(__FLT16_MAX__)
typedef _Float16 f16;
#else
#error "ms_syncbn needs a compiler with _Float16 (GCC >= 12 or Clang >= 15)"
#endif

inline float to_f(float v) { return v; }
inline double to_f(double v) { return v; }
inline float to_f(f16 v) { return static_cast<float>(v); }
inline float to_f(bf16 v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <typename T> struct compute_type { typedef float type; };
template <> struct compute_type<double> { typedef double type; };

template <typename T> inline T from_f(float v);
template <> inline float from_f<float>(float v) { return v; }
template <> inline f16 from_f<f16>(float v) { return static_cast<f16>(v); }
template <> inline bf16 from_f<bf16>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{static_cast<uint16_t>((u >> 16) | 0x40u)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return bf16{static_cast<uint16_t>(u >> 16)};
}
template <typename T> inline T store(typename compute_type<T>::type v) { return from_f<T>(v); }
template <> inline double store<double>(double v) { return v; }

enum class DType { kF16, kBF16, kF32, kF64, kBad };
DType parse_dtype(const char *s) {
  if (std::strcmp(s, "float32") == 0) return DType::kF32;
  if (std::strcmp(s, "float16") == 0) return DType::kF16;
  if (std::strcmp(s, "bfloat16") == 0) return DType::kBF16;
  if (std::strcmp(s, "float64") == 0) return DType::kF64;
  return DType::kBad;
}

// Dispatch a templated functor on the element dtype; returns 1 on an
// unsupported dtype so MindSpore reports the kernel as failed.
#define MSSBN_DISPATCH(dtype_str, FN, ...)                          \
  switch (parse_dtype(dtype_str)) {                                 \
    case DType::kF32: FN<float>(__VA_ARGS__); return 0;             \
    case DType::kF16: FN<f16>(__VA_ARGS__); return 0;               \
    case DType::kBF16: FN<bf16>(__VA_ARGS__); return 0;             \
    case DType::kF64: FN<double>(__VA_ARGS__); return 0;            \
    default: return 1;                                              \
  }

// (N, C, S) view of an element tensor.
struct NCS {
  int64_t n, c, s;
};
NCS ncs_of(int ndim, const int64_t *shape) {
  NCS v{shape[0], ndim > 1 ? shape[1] : 1, 1};
  for (int i = 2; i < ndim; ++i) v.s *= shape[i];
  return v;
}

inline int threads_for(int64_t work_items, int64_t elements) {
#ifdef _OPENMP
  // Below ~64K elements a parallel region costs more than it saves.
  int64_t by_size = elements / 65536 + 1;
  int64_t t = omp_get_max_threads();
  if (t > by_size) t = by_size;
  if (t > work_items) t = work_items;
  return t < 1 ? 1 : static_cast<int>(t);
#else
  (void)work_items; (void)elements;
  return 1;
#endif
}

// Sums of (v - k) and (v - k)^2 over one contiguous run, in double.
// Blocks of 2048 are summed in the compute type (vectorised), then in double,
// so the error stays that of a 2048-term sum whatever the run length.
template <typename T>
inline void shifted_sums(const T *p, int64_t len, typename compute_type<T>::type k,
                         double *s1, double *s2) {
  typedef typename compute_type<T>::type CT;
  const int64_t kBlock = 2048;
  for (int64_t b = 0; b < len; b += kBlock) {
    const int64_t e = b + kBlock < len ? b + kBlock : len;
    CT a1 = 0, a2 = 0;
#pragma omp simd reduction(+ : a1, a2)
    for (int64_t i = b; i < e; ++i) {
      const CT d = static_cast<CT>(to_f(p[i])) - k;
      a1 += d;
      a2 += d * d;
    }
    *s1 += a1;
    *s2 += a2;
  }
}

// ------------------------------------------------------------ local_stats --
// Contract:
//   in  x      (N, C, *)  f16 | bf16 | f32 | f64
//   in  shift  (C,)       f32   per-channel shift K, identical on every rank
//   out stats  (3C+1,)    f32   [ sum(x-K) (C) | sum((x-K)^2) (C) | n*K (C) | n (1) ]
//                               with n = N * prod(shape[2:]) the local count.
// Sums are exact sums of the local batch (not means), so the caller can
// all-reduce the vector as is; an empty batch (N = 0) yields all zeros.
template <typename T>
void local_stats(const T *x, const float *shift, float *out, NCS v) {
  const int64_t C = v.c;
#pragma omp parallel for schedule(static) num_threads(threads_for(C, v.n * v.c * v.s))
  for (int64_t c = 0; c < C; ++c) {
    typedef typename compute_type<T>::type CT;
    const CT k = static_cast<CT>(shift[c]);
    double s1 = 0.0, s2 = 0.0;
    for (int64_t n = 0; n < v.n; ++n) shifted_sums<T>(x + (n * C + c) * v.s, v.s, k, &s1, &s2);
    const double cnt = static_cast<double>(v.n) * static_cast<double>(v.s);
    out[c] = static_cast<float>(s1);
    out[C + c] = static_cast<float>(s2);
    out[2 * C + c] = static_cast<float>(cnt * static_cast<double>(shift[c]));
  }
  out[3 * C] = static_cast<float>(static_cast<double>(v.n) * static_cast<double>(v.s));
}

// -------------------------------------------------------------- normalize --
// Contract:
//   in  x       (N, C, *)  f16 | bf16 | f32 | f64
//   in  mean    (C,) f32,  invstd (C,) f32,  weight (C,) f32,  bias (C,) f32
//   out y       (N, C, *)  dtype of x
//   y = (x - mean) * invstd * weight + bias, evaluated as (x - mean) * a + bias
//   with a = weight * invstd per channel. Subtracting first keeps large-mean
//   data exact (x - mean is exact when x and mean are close).
template <typename T>
void normalize(const T *x, const float *mean, const float *invstd, const float *weight,
               const float *bias, T *y, NCS v) {
  typedef typename compute_type<T>::type CT;
  const int64_t planes = v.n * v.c;
#pragma omp parallel for schedule(static) num_threads(threads_for(planes, planes * v.s))
  for (int64_t pl = 0; pl < planes; ++pl) {
    const int64_t c = pl % v.c;
    const CT a = static_cast<CT>(weight[c]) * static_cast<CT>(invstd[c]);
    const CT m = static_cast<CT>(mean[c]);
    const CT b = static_cast<CT>(bias[c]);
    const T *src = x + pl * v.s;
    T *dst = y + pl * v.s;
#pragma omp simd
    for (int64_t i = 0; i < v.s; ++i) dst[i] = store<T>((static_cast<CT>(to_f(src[i])) - m) * a + b);
  }
}

// -------------------------------------------------------- backward_reduce --
// Contract:
//   in  dy    (N, C, *)  dtype of x
//   in  x     (N, C, *)  f16 | bf16 | f32 | f64
//   in  mean  (C,)       f32
//   out sums  (2C,)      f32  [ sum(dy) (C) | sum(dy * (x - mean)) (C) ]  local sums
template <typename T>
void backward_reduce(const T *dy, const T *x, const float *mean, float *out, NCS v) {
  typedef typename compute_type<T>::type CT;
  const int64_t C = v.c;
  const int64_t kBlock = 2048;
#pragma omp parallel for schedule(static) num_threads(threads_for(C, v.n * v.c * v.s))
  for (int64_t c = 0; c < C; ++c) {
    const CT m = static_cast<CT>(mean[c]);
    double sdy = 0.0, sdyx = 0.0;
    for (int64_t n = 0; n < v.n; ++n) {
      const T *g = dy + (n * C + c) * v.s;
      const T *p = x + (n * C + c) * v.s;
      for (int64_t b = 0; b < v.s; b += kBlock) {
        const int64_t e = b + kBlock < v.s ? b + kBlock : v.s;
        CT a1 = 0, a2 = 0;
#pragma omp simd reduction(+ : a1, a2)
        for (int64_t i = b; i < e; ++i) {
          const CT gi = static_cast<CT>(to_f(g[i]));
          a1 += gi;
          a2 += gi * (static_cast<CT>(to_f(p[i])) - m);
        }
        sdy += a1;
        sdyx += a2;
      }
    }
    out[c] = static_cast<float>(sdy);
    out[C + c] = static_cast<float>(sdyx);
  }
}

// --------------------------------------------------------- backward_elemt --
// Contract:
//   in  dy      (N, C, *)  dtype of x
//   in  x       (N, C, *)  f16 | bf16 | f32 | f64
//   in  mean, invstd, weight  (C,) f32
//   in  sums    (2C,) f32  [ sum(dy) | sum(dy * (x - mean)) ] over the whole group
//   in  count   (1,)  f32  number of elements per channel over the whole group
//   out dx      (N, C, *)  dtype of x
//   dx = weight * invstd * (dy - sum(dy)/count - (x - mean) * invstd^2 * sum(dy*(x-mean))/count),
//   evaluated as dx = a * dy + p * (x - mean) + q with per-channel a, p, q.
template <typename T>
void backward_elemt(const T *dy, const T *x, const float *mean, const float *invstd,
                    const float *weight, const float *sums, const float *count, T *dx, NCS v) {
  typedef typename compute_type<T>::type CT;
  const int64_t planes = v.n * v.c;
  const double cnt = count[0] > 0.0f ? static_cast<double>(count[0]) : 1.0;
#pragma omp parallel for schedule(static) num_threads(threads_for(planes, planes * v.s))
  for (int64_t pl = 0; pl < planes; ++pl) {
    const int64_t c = pl % v.c;
    const double is = invstd[c];
    const double a = static_cast<double>(weight[c]) * is;
    const double p = -a * is * is * (static_cast<double>(sums[v.c + c]) / cnt);
    const double q = -a * (static_cast<double>(sums[c]) / cnt);
    const CT ac = static_cast<CT>(a), pc = static_cast<CT>(p), qc = static_cast<CT>(q);
    const CT m = static_cast<CT>(mean[c]);
    const T *g = dy + pl * v.s;
    const T *src = x + pl * v.s;
    T *dst = dx + pl * v.s;
#pragma omp simd
    for (int64_t i = 0; i < v.s; ++i)
      dst[i] = store<T>(ac * static_cast<CT>(to_f(g[i])) + pc * (static_cast<CT>(to_f(src[i])) - m) + qc);
  }
}

}  // namespace

// ------------------------------------------------------ exported entries --
// Parameter order is the contract order above: inputs, then the output.
namespace {
template <typename T> T *as(void *p) { return static_cast<T *>(p); }

template <typename T> void run_local_stats(void **p, NCS v) {
  local_stats<T>(as<const T>(p[0]), as<const float>(p[1]), as<float>(p[2]), v);
}
template <typename T> void run_normalize(void **p, NCS v) {
  normalize<T>(as<const T>(p[0]), as<const float>(p[1]), as<const float>(p[2]),
               as<const float>(p[3]), as<const float>(p[4]), as<T>(p[5]), v);
}
template <typename T> void run_backward_reduce(void **p, NCS v) {
  backward_reduce<T>(as<const T>(p[0]), as<const T>(p[1]), as<const float>(p[2]), as<float>(p[3]), v);
}
template <typename T> void run_backward_elemt(void **p, NCS v) {
  backward_elemt<T>(as<const T>(p[0]), as<const T>(p[1]), as<const float>(p[2]),
                    as<const float>(p[3]), as<const float>(p[4]), as<const float>(p[5]),
                    as<const float>(p[6]), as<T>(p[7]), v);
}
}  // namespace

// x is always params[1] for the backward kernels (dy first), params[0] otherwise.
extern "C" int LocalStats(int nparam, void **params, int *ndims, int64_t **shapes,
                          const char **dtypes, void *, void *) {
  if (nparam != 3 || ndims[0] < 2) return 1;
  MSSBN_DISPATCH(dtypes[0], run_local_stats, params, ncs_of(ndims[0], shapes[0]));
}

extern "C" int Normalize(int nparam, void **params, int *ndims, int64_t **shapes,
                         const char **dtypes, void *, void *) {
  if (nparam != 6 || ndims[0] < 2) return 1;
  MSSBN_DISPATCH(dtypes[0], run_normalize, params, ncs_of(ndims[0], shapes[0]));
}

extern "C" int BackwardReduce(int nparam, void **params, int *ndims, int64_t **shapes,
                              const char **dtypes, void *, void *) {
  if (nparam != 4 || ndims[1] < 2) return 1;
  if (std::strcmp(dtypes[0], dtypes[1]) != 0) return 1;
  MSSBN_DISPATCH(dtypes[1], run_backward_reduce, params, ncs_of(ndims[1], shapes[1]));
}

extern "C" int BackwardElemt(int nparam, void **params, int *ndims, int64_t **shapes,
                             const char **dtypes, void *, void *) {
  if (nparam != 8 || ndims[1] < 2) return 1;
  if (std::strcmp(dtypes[0], dtypes[1]) != 0) return 1;
  MSSBN_DISPATCH(dtypes[1], run_backward_elemt, params, ncs_of(ndims[1], shapes[1]));
}
