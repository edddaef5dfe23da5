// The field-importance tracker's work per training step, in one pass over its tensors each.
//
// Backward (taylor_sums): for every sample n and feature f (D columns each),
// s[n, f] = <g[n, f], base[f] - e[n, f]> (base: one row for the batch-mean baseline, one row
// per sample for the shuffle baseline, none for the zero baseline, where s = <g, e>) and
// q[n, f] = ||g[n, f]||^2, reduced over the samples into the tracker's sums — without the
// [B, F*D] difference tensor, the float64 copy of g that cost more than the rest of the
// tracker (issue 20), or the dozen small [B, F] tensor ops that followed.
// Forward (column_stats): the batch's column sums, minima and maxima.
//
// Built with the other kernels by shark_torchrec/quant/cpu_kernel.py; registered as
// torch.ops.shark_torchrec.taylor_sums and column_stats.
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

using at::Tensor;

// Per feature f, over the samples: sum_n |s[n, f]| where s is finite and the feature varies
// (varies [F] bool), the number of samples where s is finite, and sum_n q[n, f] where s and q
// are finite — in float64 [F] each (a sample's s and q in float32, as the batched products
// they replace computed them).
std::tuple<Tensor, Tensor, Tensor> taylor_sums(const Tensor& g, const Tensor& e, const std::optional<Tensor>& base,
                                               int64_t dim, const Tensor& varies) {
  TORCH_CHECK(g.device().is_cpu() && g.scalar_type() == at::kFloat && e.scalar_type() == at::kFloat &&
                  g.dim() == 2 && g.sizes() == e.sizes() && g.is_contiguous() && e.is_contiguous(),
              "taylor_sums: g and e must be contiguous float32 [B, F*D] CPU tensors of one shape");
  const int64_t B = g.size(0), C = g.size(1);
  TORCH_CHECK(dim > 0 && C % dim == 0, "taylor_sums: columns ", C, " are not features of dim ", dim);
  const int64_t F = C / dim;
  TORCH_CHECK(varies.scalar_type() == at::kBool && varies.numel() == F && varies.is_contiguous(),
              "taylor_sums: varies must be bool [F]");
  const float* b = nullptr;
  bool per_sample = false;
  if (base.has_value() && base->defined()) {
    TORCH_CHECK(base->scalar_type() == at::kFloat && base->is_contiguous(), "taylor_sums: base must be float32");
    TORCH_CHECK(base->numel() == C || base->numel() == B * C, "taylor_sums: base must be [F*D] or [B, F*D]");
    per_sample = base->numel() == B * C && B > 1;
    b = base->data_ptr<float>();
  }
  const float* gp = g.data_ptr<float>();
  const float* ep = e.data_ptr<float>();
  const bool* vp = varies.data_ptr<bool>();
  const int64_t T = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (B + 63) / 64));
  std::vector<double> acc(3 * T * F, 0.0);  // per thread: |s| sums, counts, q sums
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      double* as = acc.data() + 3 * t * F;
      for (int64_t n = B * t / T; n < B * (t + 1) / T; ++n) {
        const float* gr = gp + n * C;
        const float* er = ep + n * C;
        const float* br = b == nullptr ? nullptr : (per_sample ? b + n * C : b);
        for (int64_t f = 0; f < F; ++f) {
          float acc_s = 0.f, acc_q = 0.f;
          const int64_t c0 = f * dim;
          if (br == nullptr) {  // zero baseline: |<g, 0 - e>| = |<g, e>|
#pragma omp simd reduction(+ : acc_s, acc_q)
            for (int64_t d = 0; d < dim; ++d) {
              acc_s += gr[c0 + d] * er[c0 + d];
              acc_q += gr[c0 + d] * gr[c0 + d];
            }
          } else {
#pragma omp simd reduction(+ : acc_s, acc_q)
            for (int64_t d = 0; d < dim; ++d) {
              acc_s += gr[c0 + d] * (br[c0 + d] - er[c0 + d]);
              acc_q += gr[c0 + d] * gr[c0 + d];
            }
          }
          if (std::isfinite(acc_s)) {
            if (vp[f]) as[f] += std::fabs((double)acc_s);
            as[F + f] += 1.0;
            if (std::isfinite(acc_q)) as[2 * F + f] += (double)acc_q;
          }
        }
      }
    }
  });
  Tensor sums = at::zeros({3, F}, g.options().dtype(at::kDouble));
  double* out = sums.data_ptr<double>();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < 3 * F; ++i) out[i] += acc[3 * t * F + i];
  return {sums[0], sums[1], sums[2]};
}

// Per column of a step's pooled embeddings e [B, C], in one pass: the sum (accumulated in
// float64: for the batch-mean baseline, whose gap to a near-constant field's rows is tiny — a
// float32 running sum over 2^18 rows put that field's mean off by more than the gap, and its
// score off by up to 3x), the minimum and
// the maximum (a column whose minimum equals its maximum
// holds a constant field: its score is 0).
std::tuple<Tensor, Tensor, Tensor> column_stats(const Tensor& e) {
  TORCH_CHECK(e.device().is_cpu() && e.scalar_type() == at::kFloat && e.dim() == 2 && e.is_contiguous(),
              "column_stats: e must be a contiguous float32 [B, C] CPU tensor");
  const int64_t B = e.size(0), C = e.size(1);
  Tensor sum = at::zeros({C}, e.options().dtype(at::kDouble));
  Tensor lo = at::full({C}, std::numeric_limits<float>::infinity(), e.options());
  Tensor hi = at::full({C}, -std::numeric_limits<float>::infinity(), e.options());
  const float* ep = e.data_ptr<float>();
  double* sp = sum.data_ptr<double>();
  float* lp = lo.data_ptr<float>();
  float* hp = hi.data_ptr<float>();
  // Row by row (e streams through once), into per-thread accumulators the size of a row (in
  // L1/L2), combined at the end.  (Walking down columns instead strides a row apart per load:
  // 4x slower here.)
  const int64_t T = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (B + 255) / 256));
  std::vector<double> S(T * C, 0.0);
  std::vector<float> L(T * C, std::numeric_limits<float>::infinity());
  std::vector<float> H(T * C, -std::numeric_limits<float>::infinity());
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      double* st = S.data() + t * C;
      float* lt = L.data() + t * C;
      float* ht = H.data() + t * C;
      for (int64_t n = B * t / T; n < B * (t + 1) / T; ++n) {
        const float* row = ep + n * C;
        int64_t c = 0;
#if defined(__AVX2__)
        for (; c + 8 <= C; c += 8) {
          const __m256 v = _mm256_loadu_ps(row + c);
          _mm256_storeu_pd(st + c, _mm256_add_pd(_mm256_loadu_pd(st + c), _mm256_cvtps_pd(_mm256_castps256_ps128(v))));
          _mm256_storeu_pd(st + c + 4, _mm256_add_pd(_mm256_loadu_pd(st + c + 4), _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1))));
          _mm256_storeu_ps(lt + c, _mm256_min_ps(_mm256_loadu_ps(lt + c), v));
          _mm256_storeu_ps(ht + c, _mm256_max_ps(_mm256_loadu_ps(ht + c), v));
        }
#endif
        for (; c < C; ++c) {
          const float v = row[c];
          st[c] += (double)v;
          lt[c] = v < lt[c] ? v : lt[c];
          ht[c] = v > ht[c] ? v : ht[c];
        }
      }
    }
  });
  for (int64_t t = 0; t < T; ++t)
    for (int64_t c = 0; c < C; ++c) {
      sp[c] += S[t * C + c];
      lp[c] = std::min(lp[c], L[t * C + c]);
      hp[c] = std::max(hp[c], H[t * C + c]);
    }
  for (int64_t c = 0; c < C; ++c) {  // NaN anywhere in a column: a NaN range (never constant)
    if (std::isnan(sp[c])) {
      lp[c] = std::numeric_limits<float>::quiet_NaN();
      hp[c] = std::numeric_limits<float>::quiet_NaN();
    }
  }
  return {sum, lo, hi};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(shark_torchrec, m) {
  m.def("taylor_sums(Tensor g, Tensor e, Tensor? base, int dim, Tensor varies) -> (Tensor, Tensor, Tensor)");
  m.def("column_stats(Tensor e) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(shark_torchrec, CPU, m) {
  m.impl("taylor_sums", &taylor_sums);
  m.impl("column_stats", &column_stats);
}
