// The SHARED tier's assignment of rows to centroids, after the distances' matrix product:
// each row's nearest centroid (the first of least score, as torch.argmin) and its squared
// distance to it, measured in float64, in one pass per row.
//
// shark_torchrec/quant/shared_rows.py computes the scores (|c|^2 - 2 w.c) by one float32 matrix
// product per chunk of rows, then called torch.argmin (a scalar scan: 8 ms for 4,096 rows x 1,024
// centroids, most of a chunk's 12 ms product again) and measured the distances with five float64
// tensor passes.  Here the minimum is a vector pass and the distance a fused loop.  The index is
// the same as torch.argmin's (exact comparisons, the first minimum); the float64 distance sums its
// terms in another order than torch's sum, so it may differ in the last bits of the double, which
// float32 (how the errors are kept) rounds away but for about one row in 2^29.
//
// Built with the other kernels by shark_torchrec/quant/cpu_kernel.py; registered as
// torch.ops.shark_torchrec.nearest_centroid.
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

using at::Tensor;

// The least of s[0..K) (K > 0).  Any NaN among them makes the row's distance NaN anyway (the
// caller raises on it), so only finite scores need the exact minimum.
inline float row_min(const float* s, int64_t K) {
  int64_t j = 0;
  float m = s[0];
#if defined(__AVX2__)
  if (K >= 32) {
    __m256 a = _mm256_loadu_ps(s), b = _mm256_loadu_ps(s + 8), c = _mm256_loadu_ps(s + 16),
           d = _mm256_loadu_ps(s + 24);
    for (j = 32; j + 32 <= K; j += 32) {
      a = _mm256_min_ps(a, _mm256_loadu_ps(s + j));
      b = _mm256_min_ps(b, _mm256_loadu_ps(s + j + 8));
      c = _mm256_min_ps(c, _mm256_loadu_ps(s + j + 16));
      d = _mm256_min_ps(d, _mm256_loadu_ps(s + j + 24));
    }
    a = _mm256_min_ps(_mm256_min_ps(a, b), _mm256_min_ps(c, d));
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, a);
    m = lanes[0];
    for (int l = 1; l < 8; ++l) m = std::min(m, lanes[l]);
  }
#endif
  for (; j < K; ++j) m = std::min(m, s[j]);
  return m;
}

// The first j with s[j] == m (K - 1 where none is).
inline int64_t first_equal(const float* s, int64_t K, float m) {
  int64_t j = 0;
#if defined(__AVX2__)
  const __m256 mv = _mm256_set1_ps(m);
  for (; j + 8 <= K; j += 8) {
    const int hits = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(s + j), mv, _CMP_EQ_OQ));
    if (hits) return j + __builtin_ctz((unsigned)hits);
  }
#endif
  for (; j < K - 1 && !(s[j] == m); ++j) {
  }
  return j;
}

// scores [n, K] float32 (row-contiguous), weights [n, D] float32 (row-contiguous), centroids
// [K, D] float32 (contiguous) -> (index int64 [n], squared distance float64 [n]).
std::tuple<Tensor, Tensor> nearest_centroid(const Tensor& scores, const Tensor& weights, const Tensor& centroids) {
  TORCH_CHECK(scores.device().is_cpu() && weights.device().is_cpu() && centroids.device().is_cpu(),
              "nearest_centroid: CPU tensors");
  TORCH_CHECK(scores.scalar_type() == at::kFloat && weights.scalar_type() == at::kFloat &&
                  centroids.scalar_type() == at::kFloat,
              "nearest_centroid: float32 scores, weights and centroids");
  TORCH_CHECK(scores.dim() == 2 && weights.dim() == 2 && centroids.dim() == 2, "nearest_centroid: 2-d tensors");
  const int64_t n = scores.size(0), K = scores.size(1), D = weights.size(1);
  TORCH_CHECK(weights.size(0) == n && centroids.size(0) == K && centroids.size(1) == D && K > 0,
              "nearest_centroid: scores [n, K], weights [n, D], centroids [K, D]");
  TORCH_CHECK(scores.stride(1) == 1 && weights.stride(1) == 1 && centroids.is_contiguous(),
              "nearest_centroid: rows must be contiguous");
  Tensor index = at::empty({n}, scores.options().dtype(at::kLong));
  Tensor error = at::empty({n}, scores.options().dtype(at::kDouble));
  const float* S = scores.data_ptr<float>();
  const float* W = weights.data_ptr<float>();
  const float* C = centroids.data_ptr<float>();
  const int64_t ss = scores.stride(0), ws = weights.stride(0);
  int64_t* I = index.data_ptr<int64_t>();
  double* E = error.data_ptr<double>();
  at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* s = S + r * ss;
      const float m = row_min(s, K);
      const int64_t best = first_equal(s, K, m);  // the first minimum (as torch.argmin)
      const float* w = W + r * ws;
      const float* c = C + best * D;
      double acc[4] = {0.0, 0.0, 0.0, 0.0};
      int64_t k = 0;
      for (; k + 4 <= D; k += 4)
        for (int l = 0; l < 4; ++l) {
          const double t = (double)w[k + l] - (double)c[k + l];
          acc[l] += t * t;
        }
      for (; k < D; ++k) {
        const double t = (double)w[k] - (double)c[k];
        acc[0] += t * t;
      }
      I[r] = best;
      E[r] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    }
  });
  return {index, error};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(shark_torchrec, m) {
  m.def("nearest_centroid(Tensor scores, Tensor weights, Tensor centroids) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(shark_torchrec, CPU, m) {
  m.impl("nearest_centroid", &nearest_centroid);
}
