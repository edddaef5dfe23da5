// Converting a table's float rows into a mixed collection's sub-tables in one streaming pass.
//
// Rows are read in order; row r of tier k goes to the next free row of tier k's sub-table
// (inside the FBGEMM TBE's weight buffer, where the lookups read it) and gets the id
// tier_start[k] + (rows of tier k before r) in the id map.  So the table is read sequentially
// and each tier's sub-table written sequentially: no gather of rows by tier, no copy.  Rows
// are stored exactly as FBGEMM's quantizers store them (FloatOrHalfToFusedNBitRowwise-
// QuantizedSBHalf: bias = the row minimum rounded to fp16, scale = range / (2^bits - 1)
// rounded to fp16, q = round-to-nearest-even((x - bias) / scale) clamped; fp16 rows rounded to
// nearest even), in the TBE's layout (integer rows: fp16 scale and bias first, then the codes,
// element j at bit (j * bits) % 8 of byte j * bits / 8).  Tested byte for byte against FBGEMM's
// ops.
//
// With `fit`, integer rows take the scale and bias of fit_row (below) instead of FBGEMM's: the
// same layout, read by the same kernels, with less error.
//
// Multi-threaded over row ranges (each range's first row per tier from a counting pass).
// Built with the other kernels by shark_torchrec/quant/cpu_kernel.py; registered as
// torch.ops.shark_torchrec.quantize_into.
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "id-map entries are written little-endian"
#endif

#if defined(__AVX2__) && (defined(__F16C__) || defined(__FMA__))
#include <immintrin.h>
#endif

namespace shark_torchrec_fit {

// Rounds of fit_row's refit at most (on trained 64-dim rows 8 rounds reach within 1% of the
// error of 16; on Gaussian rows INT8 rows stop after 2.3 refits on average, INT4 after 4.3,
// INT2 after 5.4, when the error no longer falls).
constexpr int kFitRounds = 8;

inline float half_round(float x) { return static_cast<float>(c10::Half(x)); }

// The sums of a row's codes under (scale, bias) that its error and the least-squares refit
// need: sum q, sum q^2 (exact: integers) and sum x q (float64).  Codes as FBGEMM
// computes them: round-to-nearest-even((x - bias) * inv), clamped to [0, top].
struct CodeSums {
  double sq = 0.0, sqq = 0.0, sxq = 0.0;
};

CodeSums code_sums(const float* x, int64_t D, float top, float bias, float inv) {
  CodeSums p;
  int64_t d = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 vb = _mm256_set1_ps(bias), vi = _mm256_set1_ps(inv), vt = _mm256_set1_ps(top),
               vz = _mm256_setzero_ps();
  __m256i sq = _mm256_setzero_si256(), sqq = sq;  // exact in int32 for rows of up to 2^15 values
  __m256d sxq = _mm256_setzero_pd();
  for (; d + 8 <= D && d < (int64_t)1 << 15; d += 8) {  // (the rest of a longer row: below)
    const __m256 xv = _mm256_loadu_ps(x + d);
    const __m256 scaled = _mm256_mul_ps(_mm256_sub_ps(xv, vb), vi);
    const __m256 qv = _mm256_min_ps(
        _mm256_max_ps(_mm256_round_ps(scaled, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), vz), vt);
    const __m256i qi = _mm256_cvtps_epi32(qv);
    sq = _mm256_add_epi32(sq, qi);
    sqq = _mm256_add_epi32(sqq, _mm256_mullo_epi32(qi, qi));
    // x * q is exact in float64 (24 + 8 bits)
    sxq = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(xv)), _mm256_cvtps_pd(_mm256_castps256_ps128(qv)),
                          sxq);
    sxq = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(xv, 1)), _mm256_cvtps_pd(_mm256_extractf128_ps(qv, 1)),
                          sxq);
  }
  int32_t c[8];
  double l[4];
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(c), sq);
  for (int32_t v : c) p.sq += v;
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(c), sqq);
  for (int32_t v : c) p.sqq += v;
  _mm256_storeu_pd(l, sxq);
  p.sxq = (l[0] + l[1]) + (l[2] + l[3]);
#endif
  for (; d < D; ++d) {
    float q = std::nearbyint((x[d] - bias) * inv);
    q = q < 0.f ? 0.f : (q > top ? top : q);
    p.sq += q;
    p.sqq += (double)q * q;
    p.sxq += (double)x[d] * q;
  }
  return p;
}

// The squared error sum_d (x_d - (q_d * scale + bias))^2 from the row's sums (sx = sum x,
// sxx = sum x^2) and its codes' (float64; the cancellation costs ~1e-16 of sum x^2, far below
// any error compared).
inline double code_error(const CodeSums& p, double sx, double sxx, int64_t D, double s, double b) {
  return sxx - 2.0 * s * p.sxq - 2.0 * b * sx + s * s * p.sqq + 2.0 * s * b * p.sq + (double)D * b * b;
}

// The scale and bias (fp16 values, as floats) of a `bits`-bit row fitted to the row by least
// squares, and its squared error.  From FBGEMM's parameters (bias = the row's minimum, scale =
// its range / (2^bits - 1)) it alternates: the codes nearest each value, then the scale and
// bias minimising the squared error of those codes (a line fit of x on q, rounded to fp16),
// while the error falls.  Each half-step can only lower the error but for the fp16 rounding, so
// a refit that does not lower it ends the search: never worse than FBGEMM's parameters.  Min/max
// spends the few levels of INT2 on the row's two extremes; the fit halves INT2's squared error
// on trained rows (INT4: -12%, INT8: -7%).  A row holding NaN or an infinity is the caller's.
// The same steps as shark_torchrec/quant/rows.py's fit_scale_bias (tested equal).
double fit_row(const float* x, int64_t D, int bits, float* scale_out, float* bias_out) {
  float lo = x[0], hi = x[0];
  double sx = 0.0, sxx = 0.0;
  int64_t d = 0;
#if defined(__AVX2__) && defined(__FMA__)
  // (a scalar chain of float64 adds here took more time than a refit's pass)
  __m256 vlo = _mm256_set1_ps(x[0]), vhi = vlo;
  __m256d s0 = _mm256_setzero_pd(), s1 = s0, q0 = s0, q1 = s0;
  for (; d + 8 <= D; d += 8) {
    const __m256 v = _mm256_loadu_ps(x + d);
    vlo = _mm256_min_ps(vlo, v);
    vhi = _mm256_max_ps(vhi, v);
    const __m256d a = _mm256_cvtps_pd(_mm256_castps256_ps128(v)), b = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
    s0 = _mm256_add_pd(s0, a);
    s1 = _mm256_add_pd(s1, b);
    q0 = _mm256_fmadd_pd(a, a, q0);  // x * x is exact in float64
    q1 = _mm256_fmadd_pd(b, b, q1);
  }
  if (d > 0) {
    float f[8];
    double l[4];
    _mm256_storeu_ps(f, vlo);
    for (float v : f) lo = std::min(lo, v);
    _mm256_storeu_ps(f, vhi);
    for (float v : f) hi = std::max(hi, v);
    _mm256_storeu_pd(l, _mm256_add_pd(s0, s1));
    sx = (l[0] + l[1]) + (l[2] + l[3]);
    _mm256_storeu_pd(l, _mm256_add_pd(q0, q1));
    sxx = (l[0] + l[1]) + (l[2] + l[3]);
  }
#endif
  for (; d < D; ++d) {
    lo = std::min(lo, x[d]);
    hi = std::max(hi, x[d]);
    sx += x[d];
    sxx += (double)x[d] * x[d];
  }
  const float top = (float)((1 << bits) - 1);
  float bias = half_round(lo);
  const float range = hi - bias;
  float scale = half_round(range == 0.f ? 1.f : range / top);
  if (scale == 0.f) scale = 1.f;
  float inv = 1.f / scale;
  if (std::isinf(inv)) {
    scale = 1.f;
    inv = 1.f;
  }
  CodeSums p = code_sums(x, D, top, bias, inv);
  double err = code_error(p, sx, sxx, D, scale, bias);
  for (int round = 0; round < kFitRounds; ++round) {
    const double den = (double)D * p.sqq - p.sq * p.sq;
    if (!(den > 0.0)) break;  // every code the same: nothing to fit
    const double s = ((double)D * p.sxq - p.sq * sx) / den;
    const double b = (sx - s * p.sq) / (double)D;
    const float s_h = half_round((float)s), b_h = half_round((float)b);
    if (!(s_h > 0.f) || !std::isfinite(s_h) || !std::isfinite(b_h)) break;
    const float inv_h = 1.f / s_h;
    if (std::isinf(inv_h)) break;
    const CodeSums next = code_sums(x, D, top, b_h, inv_h);
    const double next_err = code_error(next, sx, sxx, D, s_h, b_h);
    if (!(next_err < err)) break;
    p = next;
    err = next_err;
    scale = s_h;
    bias = b_h;
  }
  *scale_out = scale;
  *bias_out = bias;
  return std::max(err, 0.0);
}

}  // namespace shark_torchrec_fit

namespace {

using at::Tensor;

constexpr int kTiers = 7;  // TIER_ORDER: FP32, FP16, INT8, INT4, INT2, SHARED, DROP
enum Ty : int32_t { FP32 = 0, FP16 = 1, INT8 = 2, INT4 = 3, INT2 = 4, NO_TABLE = -1 };

inline uint16_t to_half(float x) { return c10::Half(x).x; }
inline float from_half(uint16_t h) { return static_cast<float>(c10::Half(h, c10::Half::from_bits())); }
// Whether x reads back finite from fp16 (|x| below 65520, which rounds to inf).
inline bool fits_half(float x) { return std::isfinite(from_half(to_half(x))); }

// FBGEMM's row-wise quantization parameters: the fp16 bias and scale, and 1 / scale.
inline void nbit_params(float lo, float hi, int bits, uint16_t* bias_h, float* bias, float* scale, float* inv) {
  *bias_h = to_half(lo);
  *bias = from_half(*bias_h);
  const float range = hi - *bias;
  *scale = from_half(to_half(range == 0.f ? 1.f : range / (float)((1 << bits) - 1)));
  if (*scale == 0.f) *scale = 1.f;
  *inv = 1.f / *scale;
  if (std::isinf(*inv)) {
    *scale = 1.f;
    *inv = 1.f;
  }
}

// A row's parameters: FBGEMM's, or with `fit` those of shark_torchrec_fit::fit_row.
inline void nbit_row_params(const float* x, int64_t D, float lo, float hi, int bits, bool fit, uint16_t* bias_h,
                            float* bias, float* scale, float* inv) {
  if (!fit) return nbit_params(lo, hi, bits, bias_h, bias, scale, inv);
  shark_torchrec_fit::fit_row(x, D, bits, scale, bias);
  *bias_h = to_half(*bias);
  *inv = 1.f / *scale;
}

#if defined(__AVX2__) && defined(__F16C__)
// The same for D a multiple of 8, the arithmetic in 8-float vectors (FBGEMM's AVX2 quantizer
// computes the codes the same way: (x - bias) * inv, rounded to nearest even).
bool store_row_avx2(const float* x, int64_t D, int32_t ty, uint8_t* dst, bool fit) {
  __m256 lo_v = _mm256_loadu_ps(x), hi_v = lo_v, nan_v = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 8) {
    const __m256 v = _mm256_loadu_ps(x + d);
    lo_v = _mm256_min_ps(lo_v, v);
    hi_v = _mm256_max_ps(hi_v, v);
    nan_v = _mm256_add_ps(nan_v, _mm256_sub_ps(v, v));  // NaN for NaN and +-inf
  }
  if (_mm256_movemask_ps(_mm256_cmp_ps(nan_v, nan_v, _CMP_UNORD_Q))) return false;
  if (ty == FP32) {
    std::memcpy(dst, x, 4 * D);
    return true;
  }
  float l8[8], h8[8];
  _mm256_storeu_ps(l8, lo_v);
  _mm256_storeu_ps(h8, hi_v);
  float lo = l8[0], hi = h8[0];
  for (int i = 1; i < 8; ++i) {
    lo = std::min(lo, l8[i]);
    hi = std::max(hi, h8[i]);
  }
  if (ty == FP16) {
    if (!fits_half(lo) || !fits_half(hi)) return false;
    for (int64_t d = 0; d < D; d += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 2 * d),
                       _mm256_cvtps_ph(_mm256_loadu_ps(x + d), _MM_FROUND_TO_NEAREST_INT));
    return true;
  }
  const int bits = ty == INT8 ? 8 : (ty == INT4 ? 4 : 2);
  uint16_t bias_h;
  float bias, scale, inv;
  nbit_row_params(x, D, lo, hi, bits, fit, &bias_h, &bias, &scale, &inv);
  uint16_t sb[2] = {to_half(scale), bias_h};
  if (!fits_half(scale) || !fits_half(bias)) return false;
  std::memcpy(dst, sb, 4);
  uint8_t* q = dst + 4;
  const __m256 b_v = _mm256_set1_ps(bias), i_v = _mm256_set1_ps(inv);
  const __m256i top = _mm256_set1_epi32((1 << bits) - 1), zero = _mm256_setzero_si256();
  alignas(32) int32_t c[8];
  for (int64_t d = 0; d < D; d += 8) {
    __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + d), b_v), i_v));
    _mm256_store_si256(reinterpret_cast<__m256i*>(c), _mm256_min_epi32(_mm256_max_epi32(v, zero), top));
    if (bits == 8) {
      for (int j = 0; j < 8; ++j) q[d + j] = (uint8_t)c[j];
    } else if (bits == 4) {
      for (int j = 0; j < 8; j += 2) q[(d + j) / 2] = (uint8_t)(c[j] | (c[j + 1] << 4));
    } else {
      q[d / 4] = (uint8_t)(c[0] | (c[1] << 2) | (c[2] << 4) | (c[3] << 6));
      q[d / 4 + 1] = (uint8_t)(c[4] | (c[5] << 2) | (c[6] << 4) | (c[7] << 6));
    }
  }
  return true;
}
#endif

// One row, stored as FBGEMM stores it, at dst.  Returns false for a NaN or an infinity, and
// for a finite row its tier cannot store (values beyond FP16's range: an FP16 row, or an
// integer row's fp16 scale or bias, would read as inf or NaN).
bool store_row(const float* x, int64_t D, int32_t ty, uint8_t* dst, bool fit) {
#if defined(__AVX2__) && defined(__F16C__)
  if (D % 8 == 0) return store_row_avx2(x, D, ty, dst, fit);
#endif
  for (int64_t d = 0; d < D; ++d)
    if (!std::isfinite(x[d])) return false;
  if (ty == FP32) {
    std::memcpy(dst, x, 4 * D);
  } else if (ty == FP16) {
    for (int64_t d = 0; d < D; ++d)
      if (!fits_half(x[d])) return false;
    uint16_t* h = reinterpret_cast<uint16_t*>(dst);
    for (int64_t d = 0; d < D; ++d) h[d] = to_half(x[d]);
  } else {
    const int bits = ty == INT8 ? 8 : (ty == INT4 ? 4 : 2);
    float lo = x[0], hi = x[0];
    for (int64_t d = 1; d < D; ++d) {
      lo = std::min(lo, x[d]);
      hi = std::max(hi, x[d]);
    }
    uint16_t bias_h;
    float bias, scale, inv;
    nbit_row_params(x, D, lo, hi, bits, fit, &bias_h, &bias, &scale, &inv);
    uint16_t sb[2] = {to_half(scale), bias_h};
    if (!fits_half(scale) || !fits_half(bias)) return false;
    std::memcpy(dst, sb, 4);
    uint8_t* q = dst + 4;
    const int per_byte = 8 / bits;
    const int top = (1 << bits) - 1;
    std::memset(q, 0, (D + per_byte - 1) / per_byte);
    for (int64_t d = 0; d < D; ++d) {
      long v = std::lrintf((x[d] - bias) * inv);
      v = v < 0 ? 0 : (v > top ? top : v);
      q[d / per_byte] |= (uint8_t)(v << ((d % per_byte) * bits));
    }
  }
  return true;
}

// Sets entry i of a bit-packed map to `value`: only the bytes the entry spans are touched, and
// only its bits in them, so ranges of entries that start and end on byte boundaries (a multiple
// of 8 entries) can be written by different threads.
inline void put_entry(uint8_t* map, int64_t i, int64_t bits, uint64_t value) {
  const uint64_t bit = (uint64_t)i * (uint64_t)bits;
  const uint64_t mask = (((uint64_t)1 << bits) - 1) << (bit & 7);
  const uint64_t v = value << (bit & 7);
  uint8_t* at = map + (bit >> 3);
  const int64_t span = (int64_t)(((bit & 7) + bits + 7) / 8);
  for (int64_t j = 0; j < span; ++j) {
    const uint8_t m = (uint8_t)(mask >> (8 * j));
    at[j] = (uint8_t)((at[j] & ~m) | ((uint8_t)(v >> (8 * j)) & m));
  }
}

// Writes every row of `weights` (integer rows fitted with `fit`) into its tier's sub-table in `buffer` and its renumbered row
// into `row_map` (uint8, `bits` bits per entry, packed little-endian: entry i is bits i*bits.. of the map); returns the first row holding a NaN or an infinity (then nothing is promised
// about what was written), else -1.
//   tiers [n] int8: TIER_ORDER index of each row.
//   sub_meta [7, 3] int64: per TIER_ORDER tier, byte offset of the table's sub-table in
//     buffer, bytes per stored row, FBGEMM SparseType (-1: no sub-table, e.g. DROP).
//   tier_start [7] int64: the first id of each tier's rows.
int64_t quantize_into(const Tensor& weights, const Tensor& tiers, const Tensor& sub_meta, const Tensor& tier_start,
                      Tensor buffer, Tensor row_map, int64_t bits, bool fit) {
  TORCH_CHECK(weights.device().is_cpu() && weights.scalar_type() == at::kFloat && weights.dim() == 2 &&
                  weights.stride(1) == 1,
              "quantize_into: weights must be float32 [rows, dim] with contiguous rows");
  const int64_t n = weights.size(0), D = weights.size(1), stride = weights.stride(0);
  TORCH_CHECK(tiers.scalar_type() == at::kChar && tiers.is_contiguous() && tiers.numel() == n,
              "quantize_into: tiers must be int8, one per row");
  TORCH_CHECK(sub_meta.scalar_type() == at::kLong && sub_meta.is_contiguous() && sub_meta.numel() == 3 * kTiers &&
                  tier_start.scalar_type() == at::kLong && tier_start.numel() == kTiers,
              "quantize_into: sub_meta int64 [7, 3] and tier_start int64 [7]");
  TORCH_CHECK(buffer.scalar_type() == at::kByte && buffer.is_contiguous(), "quantize_into: buffer must be uint8");
  TORCH_CHECK(bits >= 1 && bits <= 32, "quantize_into: id-map entries take 1 to 32 bits");
  TORCH_CHECK(row_map.scalar_type() == at::kByte && row_map.is_contiguous() && row_map.numel() == (n * bits + 7) / 8,
              "quantize_into: row_map must be uint8, bits bits per row");
  const float* w = weights.data_ptr<float>();
  const int8_t* t = tiers.data_ptr<int8_t>();
  const int64_t* sm = sub_meta.data_ptr<int64_t>();
  const int64_t* ts = tier_start.data_ptr<int64_t>();
  uint8_t* buf = buffer.data_ptr<uint8_t>();
  uint8_t* map = row_map.data_ptr<uint8_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(t[i] >= 0 && t[i] < kTiers, "quantize_into: tier ", (int)t[i], " of row ", i);
  // Rows per tier in each range, so that ranges can be written in parallel.
  // (a multiple of 8 rows: each range's map entries start and end on byte boundaries, so the
  // ranges write their map bytes in parallel, put_entry)
  const int64_t chunk = 16384;
  const int64_t chunks = (n + chunk - 1) / chunk;
  std::vector<int64_t> first(std::max<int64_t>(chunks, 1) * kTiers, 0);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c)
      for (int64_t i = c * chunk; i < std::min(n, (c + 1) * chunk); ++i) ++first[c * kTiers + t[i]];
  });
  int64_t running[kTiers] = {};
  for (int64_t c = 0; c < chunks; ++c)
    for (int k = 0; k < kTiers; ++k) {
      const int64_t count = first[c * kTiers + k];
      first[c * kTiers + k] = running[k];
      running[k] += count;
    }
  const int64_t most = bits == 32 ? INT32_MAX : (int64_t)1 << bits;
  for (int k = 0; k < kTiers; ++k) {
    TORCH_CHECK(running[k] == 0 || ts[k] + running[k] <= most, "quantize_into: renumbered rows do not fit ",
                bits, "-bit id-map entries");
    if (running[k] == 0 || sm[3 * k + 2] == NO_TABLE) continue;
    TORCH_CHECK(sm[3 * k] >= 0 && sm[3 * k] + running[k] * sm[3 * k + 1] <= buffer.numel(),
                "quantize_into: tier ", k, "'s sub-table lies outside the buffer");
  }
  std::vector<int64_t> bad(std::max<int64_t>(chunks, 1), -1);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t next[kTiers];
      for (int k = 0; k < kTiers; ++k) next[k] = first[c * kTiers + k];
      for (int64_t i = c * chunk; i < std::min(n, (c + 1) * chunk); ++i) {
        const int k = t[i];
        const int64_t local = next[k]++;
        put_entry(map, i, bits, (uint64_t)(ts[k] + local));
        const int32_t ty = (int32_t)sm[3 * k + 2];
        if (ty == NO_TABLE) {  // DROP: no stored row, but the row must still be finite
          for (int64_t d = 0; d < D; ++d)
            if (!std::isfinite(w[i * stride + d])) {
              if (bad[c] < 0) bad[c] = i;
              break;
            }
          continue;
        }
        if (!store_row(w + i * stride, D, ty, buf + sm[3 * k] + local * sm[3 * k + 1], fit) && bad[c] < 0)
          bad[c] = i;
      }
    }
  });
  for (int64_t b : bad)
    if (b >= 0) return b;
  return -1;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(shark_torchrec, m) {
  m.def("quantize_into(Tensor weights, Tensor tiers, Tensor sub_meta, Tensor tier_start, Tensor(a!) buffer, "
        "Tensor(b!) row_map, int bits, bool fit=False) -> int");
}

TORCH_LIBRARY_IMPL(shark_torchrec, CPU, m) {
  m.impl("quantize_into", &quantize_into);
}
