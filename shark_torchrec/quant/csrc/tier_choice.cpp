// Choosing row tiers at memory speed: the per-row error of every tier, each row's Lagrangian
// choices as the price per byte rises, and the exact global price for a byte budget.
//
// The byte-budget assignment (shark_torchrec/quant/budget.py) minimises
// sum_v p[v] * err_tier(v) subject to sum_v bytes_tier(v) <= budget.  For a price lambda per
// byte every row takes the tier minimising p * err + lambda * bytes; as lambda rises a row moves
// to smaller tiers at a few prices, its breakpoints (the lower convex hull of its
// (bytes, cost) points).  So the whole search is: one pass computing every row's errors and
// breakpoints (row_tier_errors, tier_hull), a histogram of the bytes saved at each breakpoint
// to find the lowest price that meets the budget (hull_histogram: the price's float32 bits,
// 16 at a time; the histograms add up over shards and ranks), and one pass reading each row's
// tier at that price (hull_pick).  No pass over all rows per bisection step.
//
// The errors are those of FBGEMM's row-wise quantizers (FloatOrHalfToFusedNBitRowwise-
// QuantizedSBHalf: bias = the row minimum rounded to fp16, scale = range / (2^bits - 1) rounded
// to fp16, q = round-to-nearest-even((x - bias) / scale) clamped; read back as scale * q + bias)
// and of fp16 rounding; DROP's error is the row's squared norm, FP32's is 0.  With `fit`, the
// integer tiers' errors are those of rows fitted by least squares (fit_row, quantize_rows.cpp),
// as the conversion then stores them.
//
// Built with mixed_lookup.cpp by shark_torchrec/quant/cpu_kernel.py; registered as
// torch.ops.shark_torchrec.{row_tier_errors, tier_hull, hull_histogram, hull_pick}.
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

namespace shark_torchrec_fit {
// quantize_rows.cpp: a row's least-squares-fitted scale and bias for `bits`-bit codes; returns
// the squared error.
double fit_row(const float* x, int64_t D, int bits, float* scale_out, float* bias_out);
}  // namespace shark_torchrec_fit

namespace {

using at::Tensor;

constexpr int kMaxTiers = 6;

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#define SHARK_AVX2 1
#endif

inline float round_to_half(float x) {
#ifdef SHARK_AVX2
  return _cvtsh_ss(_cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT));
#else
  return static_cast<float>(c10::Half(x));
#endif
}

// FBGEMM's reference quantizer's parameters (QuantUtils.cc,
// FloatOrHalfToFusedNBitRowwiseQuantizedSBHalfRef): bias, scale and 1 / scale.
inline void nbit_params(float lo, float hi, int b, float* bias, float* scale, float* inv) {
  *bias = round_to_half(lo);
  const float range = hi - *bias;
  *scale = round_to_half(range == 0.f ? 1.f : range / (float)((1 << b) - 1));
  if (*scale == 0.f) *scale = 1.f;
  *inv = 1.f / *scale;
  if (std::isinf(*inv)) {
    *scale = 1.f;
    *inv = 1.f;
  }
}

#ifdef SHARK_AVX2
// The vector registers a row is read in: 8 floats.  (16-float AVX-512 registers measured no
// faster on the AMD EPYC this was written on; the template takes them where they pay.)
struct Avx2 {
  using F = __m256;
  static constexpr int L = 8;
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static F set1(float x) { return _mm256_set1_ps(x); }
  static F zero() { return _mm256_setzero_ps(); }
  static F min(F a, F b) { return _mm256_min_ps(a, b); }
  static F max(F a, F b) { return _mm256_max_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F round(F a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static F via_half(F a) { return _mm256_cvtph_ps(_mm256_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT)); }
  static bool any_nan(F a) { return _mm256_movemask_ps(_mm256_cmp_ps(a, a, _CMP_UNORD_Q)) != 0; }
  static void store(float* p, F a) { _mm256_storeu_ps(p, a); }
};

template <typename V>
inline double hsum(typename V::F a) {
  float l[V::L];
  V::store(l, a);
  double s = 0.0;
  for (int i = 0; i < V::L; ++i) s += l[i];
  return s;
}

// The vector path of row_errors (D a multiple of V::L).  x - x is NaN for NaN and +-inf.
template <typename V>
bool row_errors_vec(const float* x, int64_t D, const int64_t* bits, int K, double* out) {
  using F = typename V::F;
  F vlo = V::load(x), vhi = vlo, vnorm = V::zero(), bad = V::zero();
  for (int64_t d = 0; d < D; d += V::L) {
    const F v = V::load(x + d);
    vlo = V::min(vlo, v);
    vhi = V::max(vhi, v);
    vnorm = V::fma(v, v, vnorm);
    bad = V::add(bad, V::sub(v, v));
  }
  if (V::any_nan(bad)) return false;
  float lo_l[V::L], hi_l[V::L];
  V::store(lo_l, vlo);
  V::store(hi_l, vhi);
  float lo = lo_l[0], hi = hi_l[0];
  for (int i = 1; i < V::L; ++i) {
    lo = std::min(lo, lo_l[i]);
    hi = std::max(hi, hi_l[i]);
  }
  // The four lossy tiers' errors in one pass over the row, one accumulator each: independent
  // chains in registers (a pass per tier waited on its accumulator's latency).  Tiers not
  // asked for cost little and are dropped below.
  float fb[3], fs[3], fi[3];
  const int nbits[3] = {8, 4, 2};
  for (int j = 0; j < 3; ++j) nbit_params(lo, hi, nbits[j], &fb[j], &fs[j], &fi[j]);
  const F b8 = V::set1(fb[0]), s8 = V::set1(fs[0]), i8 = V::set1(fi[0]), t8 = V::set1(255.f);
  const F b4 = V::set1(fb[1]), s4 = V::set1(fs[1]), i4 = V::set1(fi[1]), t4 = V::set1(15.f);
  const F b2 = V::set1(fb[2]), s2 = V::set1(fs[2]), i2 = V::set1(fi[2]), t2 = V::set1(3.f);
  const F zero = V::zero();
  F a16 = zero, a8 = zero, a4 = zero, a2 = zero;
  for (int64_t d = 0; d < D; d += V::L) {
    const F v = V::load(x + d);
    const F e16 = V::sub(v, V::via_half(v));
    a16 = V::fma(e16, e16, a16);
    const F q8 = V::min(V::max(V::round(V::mul(V::sub(v, b8), i8)), zero), t8);
    const F e8 = V::sub(v, V::add(V::mul(s8, q8), b8));
    a8 = V::fma(e8, e8, a8);
    const F q4 = V::min(V::max(V::round(V::mul(V::sub(v, b4), i4)), zero), t4);
    const F e4 = V::sub(v, V::add(V::mul(s4, q4), b4));
    a4 = V::fma(e4, e4, a4);
    const F q2 = V::min(V::max(V::round(V::mul(V::sub(v, b2), i2)), zero), t2);
    const F e2 = V::sub(v, V::add(V::mul(s2, q2), b2));
    a2 = V::fma(e2, e2, a2);
  }
  for (int k = 0; k < K; ++k) {
    switch ((int)bits[k]) {
      case 16: out[k] = hsum<V>(a16); break;
      case 8: out[k] = hsum<V>(a8); break;
      case 4: out[k] = hsum<V>(a4); break;
      case 2: out[k] = hsum<V>(a2); break;
      case 0: out[k] = hsum<V>(vnorm); break;
      default: out[k] = 0.0;  // FP32
    }
  }
  return true;
}
#endif

// Squared error of one row in every tier; bits: 32 FP32, 16 FP16, 8/4/2 INTn, 0 DROP.
// Returns false if the row holds a NaN or an infinity.
bool row_errors_minmax(const float* x, int64_t D, const int64_t* bits, int K, double* out) {
#ifdef SHARK_AVX2
  if (D % 8 == 0) return row_errors_vec<Avx2>(x, D, bits, K, out);
#endif
  float lo = x[0], hi = x[0];
  double norm = 0.0;
  bool finite = true;
  for (int64_t d = 0; d < D; ++d) {
    const float v = x[d];
    finite &= std::isfinite(v);
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
    norm += (double)v * v;
  }
  if (!finite) return false;
  for (int k = 0; k < K; ++k) {
    const int b = (int)bits[k];
    if (b == 16) {
      double acc = 0.0;
      for (int64_t d = 0; d < D; ++d) {
        const float e = x[d] - round_to_half(x[d]);
        acc += (double)e * e;
      }
      out[k] = acc;
    } else if (b == 8 || b == 4 || b == 2) {
      float bias, scale, inv;
      nbit_params(lo, hi, b, &bias, &scale, &inv);
      const float levels = (float)((1 << b) - 1);
      double acc = 0.0;
      for (int64_t d = 0; d < D; ++d) {
        float q = std::nearbyint((x[d] - bias) * inv);
        q = q < 0.f ? 0.f : (q > levels ? levels : q);
        const float e = x[d] - (scale * q + bias);
        acc += (double)e * e;
      }
      out[k] = acc;
    } else {
      out[k] = b == 0 ? norm : 0.0;
    }
  }
  return true;
}

// row_errors_minmax, the integer tiers' errors those of fitted rows with `fit`.  A finite row
// a tier cannot store (values beyond FP16's range: FP16 rows, or an integer row's fp16 bias or
// scale, overflow) gets +inf there, whatever the arithmetic gave (inf, or NaN from inf - inf):
// hull_row closes such tiers.
bool row_errors(const float* x, int64_t D, const int64_t* bits, int K, double* out, bool fit) {
  if (!row_errors_minmax(x, D, bits, K, out)) return false;
  if (fit) {
    float scale, bias;
    for (int k = 0; k < K; ++k)
      if (bits[k] == 8 || bits[k] == 4 || bits[k] == 2) {
        out[k] = shark_torchrec_fit::fit_row(x, D, (int)bits[k], &scale, &bias);
        if (!std::isfinite(round_to_half(scale)) || !std::isfinite(round_to_half(bias)))
          out[k] = std::numeric_limits<double>::infinity();
      }
  }
  for (int k = 0; k < K; ++k)
    if (!std::isfinite(out[k])) out[k] = std::numeric_limits<double>::infinity();
  return true;
}

// err [n, K] float64: row r's squared error in tier k (bits[k]; integer rows fitted with `fit`);
// a row with a NaN or infinity gets NaN in every column.
Tensor row_tier_errors(const Tensor& weights, at::IntArrayRef bits, bool fit) {
  TORCH_CHECK(weights.device().is_cpu() && weights.scalar_type() == at::kFloat && weights.dim() == 2,
              "row_tier_errors: weights must be a float32 [rows, dim] CPU tensor");
  TORCH_CHECK(weights.stride(1) == 1, "row_tier_errors: rows must be contiguous");
  const int K = (int)bits.size();
  TORCH_CHECK(K >= 1 && K <= kMaxTiers, "row_tier_errors: 1 to ", kMaxTiers, " tiers");
  for (int64_t b : bits)
    TORCH_CHECK(b == 32 || b == 16 || b == 8 || b == 4 || b == 2 || b == 0, "row_tier_errors: bits ", b);
  const int64_t n = weights.size(0), D = weights.size(1), stride = weights.stride(0);
  Tensor out = at::empty({n, K}, weights.options().dtype(at::kDouble));
  if (n == 0) return out;
  TORCH_CHECK(D > 0, "row_tier_errors: rows of dim 0");
  const float* w = weights.data_ptr<float>();
  double* o = out.data_ptr<double>();
  const std::vector<int64_t> b(bits.begin(), bits.end());
  at::parallel_for(0, n, 2048, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      if (!row_errors(w + r * stride, D, b.data(), K, o + r * K, fit))
        for (int k = 0; k < K; ++k) o[r * K + k] = std::numeric_limits<double>::quiet_NaN();
    }
  });
  return out;
}

// One row's choices (see tier_hull) from its errors e[K]; adds its bytes at price 0 and at
// its last tier to *top and *bottom.  A tier whose error is not finite (one that cannot store
// the row) is closed to it, whatever its priority (0 * inf made it NaN, which no cost beat:
// the first tier kept it).  Returns false if every tier is closed to the row.
inline bool hull_row(const double* e, double p, const int64_t* s, int K, bool drop_unused, int64_t drop_index,
                     int8_t* q, float* b, int64_t* top, int64_t* bottom) {
  double c[kMaxTiers];
  for (int k = 0; k < K; ++k) {
    c[k] = std::isfinite(e[k]) ? p * e[k] : std::numeric_limits<double>::infinity();
    if (drop_unused && k == drop_index && p > 0) c[k] = std::numeric_limits<double>::infinity();
  }
  int cur = 0;
  for (int k = 1; k < K; ++k)
    if (c[k] < c[cur]) cur = k;
  if (!std::isfinite(c[cur])) return false;
  q[0] = (int8_t)cur;
  float last = 0.f;
  for (int m = 0; m < K - 1; ++m) {
    int next = -1;
    double best = std::numeric_limits<double>::infinity();
    for (int j = 0; j < K; ++j) {
      if (s[j] >= s[cur] || !std::isfinite(c[j])) continue;
      const double lam = (c[j] - c[cur]) / (double)(s[cur] - s[j]);
      if (next < 0 || lam < best || (lam == best && s[j] < s[next])) {
        best = lam;
        next = j;
      }
    }
    if (next < 0) break;
    float f = (float)(best > 0 ? best : 0.0);
    if (f < last) f = last;
    last = f;
    b[m] = f;
    q[m + 1] = (int8_t)next;
    cur = next;
  }
  *top += s[q[0]];
  *bottom += s[cur];
  return true;
}

// Whether a tier that stores rows (any but DROP, bits 0) can store this one (a finite error):
// a row in use that only DROP takes would read as zeros for want of a tier, not by the budget's
// choice, so the caller names it (a row of priority 0 may be dropped).
inline bool stored_somewhere(const double* e, const int64_t* bits, int K) {
  for (int k = 0; k < K; ++k)
    if (bits[k] != 0 && std::isfinite(e[k])) return true;
  return false;
}

Tensor sum_totals(const std::vector<int64_t>& totals, const at::TensorOptions& options) {
  Tensor bytes = at::zeros({2}, options.dtype(at::kLong));
  for (size_t t = 0; t < totals.size(); t += 2) {
    bytes.data_ptr<int64_t>()[0] += totals[t];
    bytes.data_ptr<int64_t>()[1] += totals[t + 1];
  }
  return bytes;
}

// Each row's choices as the price per byte rises from 0: seq [n, K] int8 (tier positions, -1
// after the last) and bp [n, K - 1] float32 (the price at which the row moves from seq[m] to
// seq[m + 1]; +inf after the last).  cost_k = p * err_k; with drop_unused, tier drop_index is
// closed to rows whose priority is > 0.  At price 0 a row takes its least-cost tier (the first
// on ties); then, at each breakpoint, the tier the cost line reaches first (the smallest on
// ties).  Breakpoints are rounded to float32 and never decrease along a row.
// Also returns int64 [2]: the rows' bytes at price 0 and in their last tiers (the most and the
// least a budget can buy).
std::tuple<Tensor, Tensor, Tensor> tier_hull(const Tensor& err, const Tensor& priority, const Tensor& sizes,
                                             bool drop_unused, int64_t drop_index) {
  TORCH_CHECK(err.device().is_cpu() && err.scalar_type() == at::kDouble && err.dim() == 2 && err.is_contiguous(),
              "tier_hull: err must be a contiguous float64 [rows, tiers] CPU tensor");
  TORCH_CHECK(priority.scalar_type() == at::kDouble && priority.is_contiguous() && priority.numel() == err.size(0),
              "tier_hull: priority must be float64, one per row");
  const int64_t n = err.size(0);
  const int K = (int)err.size(1);
  TORCH_CHECK(K >= 1 && K <= kMaxTiers, "tier_hull: 1 to ", kMaxTiers, " tiers");
  TORCH_CHECK(sizes.scalar_type() == at::kLong && sizes.numel() == K, "tier_hull: sizes must be int64 [tiers]");
  Tensor seq = at::full({n, K}, -1, err.options().dtype(at::kChar));
  Tensor bp = at::full({n, std::max(K - 1, 1)}, std::numeric_limits<float>::infinity(),
                       err.options().dtype(at::kFloat));
  const double* e = err.data_ptr<double>();
  const double* p = priority.data_ptr<double>();
  const int64_t* s = sizes.data_ptr<int64_t>();
  int8_t* q = seq.data_ptr<int8_t>();
  float* b = bp.data_ptr<float>();
  const int64_t W = bp.size(1);
  std::vector<int64_t> totals(2 * std::max<int64_t>(1, at::get_num_threads()), 0);
  at::parallel_for(0, n, 4096, [&](int64_t r0, int64_t r1) {
    int64_t top = 0, bottom = 0;
    for (int64_t r = r0; r < r1; ++r)
      hull_row(e + r * K, p[r], s, K, drop_unused, drop_index, q + r * K, b + r * W, &top, &bottom);
    const int t = at::get_thread_num();
    totals[2 * t] += top;
    totals[2 * t + 1] += bottom;
  });
  return {bp, seq, sum_totals(totals, err.options())};
}

// The fused pass of a chunk of rows: their errors (row_errors; plus extra_err [n, K] from
// column blocks held elsewhere, when defined) and choices (hull_row) without an errors tensor.
// Returns (bp, seq, bytes [2], first row holding NaN or Inf or -1).
std::tuple<Tensor, Tensor, Tensor, int64_t> row_choices(const Tensor& weights, at::IntArrayRef bits,
                                                       const Tensor& priority, const Tensor& sizes,
                                                       const std::optional<Tensor>& extra_err, bool drop_unused,
                                                       int64_t drop_index, bool fit) {
  TORCH_CHECK(weights.device().is_cpu() && weights.scalar_type() == at::kFloat && weights.dim() == 2 &&
                  weights.stride(1) == 1,
              "row_choices: weights must be a float32 [rows, dim] CPU tensor with contiguous rows");
  const int64_t n = weights.size(0), D = weights.size(1), stride = weights.stride(0);
  const int K = (int)bits.size();
  TORCH_CHECK(K >= 1 && K <= kMaxTiers, "row_choices: 1 to ", kMaxTiers, " tiers");
  TORCH_CHECK(priority.scalar_type() == at::kDouble && priority.is_contiguous() && priority.numel() == n,
              "row_choices: priority must be float64, one per row");
  TORCH_CHECK(sizes.scalar_type() == at::kLong && sizes.numel() == K, "row_choices: sizes must be int64 [tiers]");
  const double* extra = nullptr;
  if (extra_err.has_value() && extra_err->defined()) {
    TORCH_CHECK(extra_err->scalar_type() == at::kDouble && extra_err->is_contiguous() && extra_err->size(0) == n &&
                    extra_err->size(1) == K,
                "row_choices: extra_err must be float64 [rows, tiers]");
    extra = extra_err->data_ptr<double>();
  }
  Tensor seq = at::full({n, K}, -1, weights.options().dtype(at::kChar));
  Tensor bp = at::full({n, std::max(K - 1, 1)}, std::numeric_limits<float>::infinity(),
                       weights.options().dtype(at::kFloat));
  const float* w = weights.data_ptr<float>();
  const double* p = priority.data_ptr<double>();
  const int64_t* s = sizes.data_ptr<int64_t>();
  int8_t* q = seq.data_ptr<int8_t>();
  float* b = bp.data_ptr<float>();
  const int64_t W = bp.size(1);
  const std::vector<int64_t> bv(bits.begin(), bits.end());
  std::vector<int64_t> totals(2 * std::max<int64_t>(1, at::get_num_threads()), 0);
  std::vector<int64_t> bad(std::max<int64_t>(1, at::get_num_threads()), -1);
  if (n > 0) TORCH_CHECK(D > 0, "row_choices: rows of dim 0");
  at::parallel_for(0, n, 2048, [&](int64_t r0, int64_t r1) {
    double e[kMaxTiers];
    int64_t top = 0, bottom = 0;
    const int t = at::get_thread_num();
    for (int64_t r = r0; r < r1; ++r) {
      if (!row_errors(w + r * stride, D, bv.data(), K, e, fit)) {
        if (bad[t] < 0 || r < bad[t]) bad[t] = r;
        continue;
      }
      if (extra != nullptr)
        for (int k = 0; k < K; ++k) e[k] += extra[r * K + k];
      if (!hull_row(e, p[r], s, K, drop_unused, drop_index, q + r * K, b + r * W, &top, &bottom) ||
          (p[r] > 0 && !stored_somewhere(e, bv.data(), K)))
        if (bad[t] < 0 || r < bad[t]) bad[t] = r;
    }
    totals[2 * t] += top;
    totals[2 * t + 1] += bottom;
  });
  int64_t first_bad = -1;
  for (int64_t x : bad)
    if (x >= 0 && (first_bad < 0 || x < first_bad)) first_bad = x;
  return {bp, seq, sum_totals(totals, weights.options()), first_bad};
}

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// Bytes saved at each breakpoint, binned by 16 bits of its float32 pattern (non-negative
// floats order as their bit patterns): prefix < 0 bins by the high 16 bits; otherwise only
// breakpoints whose high 16 bits equal prefix count, binned by the low 16.  int64 [65536].
Tensor hull_histogram(const Tensor& bp, const Tensor& seq, const Tensor& sizes, int64_t prefix) {
  TORCH_CHECK(bp.scalar_type() == at::kFloat && seq.scalar_type() == at::kChar && bp.is_contiguous() &&
                  seq.is_contiguous() && bp.size(0) == seq.size(0),
              "hull_histogram: bp float32 [rows, K-1] and seq int8 [rows, K] from tier_hull");
  const int64_t n = seq.size(0), K = seq.size(1), W = bp.size(1);
  TORCH_CHECK(sizes.scalar_type() == at::kLong && sizes.numel() == K, "hull_histogram: sizes int64 [K]");
  Tensor hist = at::zeros({65536}, seq.options().dtype(at::kLong));
  int64_t* h = hist.data_ptr<int64_t>();
  const float* b = bp.data_ptr<float>();
  const int8_t* q = seq.data_ptr<int8_t>();
  const int64_t* s = sizes.data_ptr<int64_t>();
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t m = 0; m + 1 < K && m < W; ++m) {
      const int8_t to = q[r * K + m + 1];
      if (to < 0) break;
      const uint32_t u = float_bits(b[r * W + m]);
      const int64_t saved = s[q[r * K + m]] - s[to];
      if (prefix < 0) {
        h[u >> 16] += saved;
      } else if ((int64_t)(u >> 16) == prefix) {
        h[u & 0xffff] += saved;
      }
    }
  }
  return hist;
}

// Each row's tier position at price bits `price` (a float32 bit pattern; -1: price 0 before any
// breakpoint at 0, i.e. every row's least-cost tier): the last seq entry whose breakpoint is
// <= the price.  Returns (positions int8 [rows], rows per position int64 [K]).
std::tuple<Tensor, Tensor> hull_pick(const Tensor& bp, const Tensor& seq, int64_t price) {
  TORCH_CHECK(bp.scalar_type() == at::kFloat && seq.scalar_type() == at::kChar && bp.is_contiguous() &&
                  seq.is_contiguous() && bp.size(0) == seq.size(0),
              "hull_pick: bp float32 [rows, K-1] and seq int8 [rows, K] from tier_hull");
  const int64_t n = seq.size(0), K = seq.size(1), W = bp.size(1);
  Tensor pick = at::empty({n}, seq.options());
  Tensor counts = at::zeros({K}, seq.options().dtype(at::kLong));
  int8_t* out = pick.data_ptr<int8_t>();
  int64_t* c = counts.data_ptr<int64_t>();
  const float* b = bp.data_ptr<float>();
  const int8_t* q = seq.data_ptr<int8_t>();
  for (int64_t r = 0; r < n; ++r) {
    int64_t m = 0;
    if (price >= 0) {
      while (m + 1 < K && m < W && q[r * K + m + 1] >= 0 && (int64_t)float_bits(b[r * W + m]) <= price) ++m;
    }
    out[r] = q[r * K + m];
    ++c[q[r * K + m]];
  }
  return {pick, counts};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(shark_torchrec, m) {
  m.def("row_tier_errors(Tensor weights, int[] bits, bool fit=False) -> Tensor");
  m.def("tier_hull(Tensor err, Tensor priority, Tensor sizes, bool drop_unused, int drop_index) -> (Tensor, Tensor, Tensor)");
  m.def("row_choices(Tensor weights, int[] bits, Tensor priority, Tensor sizes, Tensor? extra_err, "
        "bool drop_unused, int drop_index, bool fit=False) -> (Tensor, Tensor, Tensor, int)");
  m.def("hull_histogram(Tensor bp, Tensor seq, Tensor sizes, int prefix) -> Tensor");
  m.def("hull_pick(Tensor bp, Tensor seq, int price) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(shark_torchrec, CPU, m) {
  m.impl("row_tier_errors", &row_tier_errors);
  m.impl("tier_hull", &tier_hull);
  m.impl("row_choices", &row_choices);
  m.impl("hull_histogram", &hull_histogram);
  m.impl("hull_pick", &hull_pick);
}
