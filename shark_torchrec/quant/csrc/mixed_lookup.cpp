// Row-wise mixed-precision embedding-bag lookup on CPU, in one pass over the ids.
//
// For every bag of every served feature: each id goes through the table's id map (bit-packed,
// the bits the table's rows need, little-endian, read as one 8-byte load from the byte the
// entry starts in, shifted and masked; tier = which of the table's tier ranges the renumbered row falls in, local row =
// renumbered row - tier start), the row is read from its sub-table inside the FBGEMM TBE's own
// weight buffer (rows as FBGEMM stores them: FP32, FP16, or INT8/INT4/INT2 with an fp16
// scale and bias first), dequantized and added into the bag's sum, which is written once into
// the output.  DROP rows (and tiers a table does not use) have no sub-table: skipped, but still
// counted by MEAN pooling.
//
// Where the time goes, and what the structure answers (tools/bench_lookup.py, BENCHMARKS.md):
// * On big tables every row read is a cache miss: ids are located (id map, tier, address)
//   and their rows prefetched a fixed number of ids ahead of the one being added up, across
//   bag boundaries, and id-map entries further ahead still.  A located row waits in a small
//   ring, not in per-feature arrays.
// * Per id, no branch that depends on the data but the one on the row's storage type: the
//   tier is a vector compare and a popcount, the address one multiply-add from a per-tier
//   origin, and a row's cache lines are prefetched through its first, 65th and last byte
//   (no loop whose length depends on where the row starts).  (Regrouping a bag's rows by tier
//   first, so the type branch would predict, measured no faster on long bags and slower on
//   short ones.)
// * The output lines of the bag kOutAhead bags ahead are prefetched for writing: short bags
//   otherwise wait on store misses where the output is not in cache.
// * A feature's bags are pooled by a function made for its dim: for multiples of 8 up to 128
//   the bag's sum stays in registers from the first row to the store (16-float AVX-512
//   registers where the CPU has them and the dim is a multiple of 16, else 8-float AVX2);
//   other dims (and CPUs without AVX2/F16C/FMA) sum in memory.
//
// Built at run time by shark_torchrec/quant/cpu_kernel.py (torch.utils.cpp_extension.load) and
// registered as torch.ops.shark_torchrec.mixed_embedding_bag.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <vector>

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "id-map entries are read little-endian"
#endif

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#define SHARK_AVX2 1
#endif
#if defined(SHARK_AVX2) && defined(__AVX512F__)
#define SHARK_AVX512 1
#endif

namespace {

using at::Tensor;

// FBGEMM's SparseType values (fbgemm_gpu/split_embedding_configs.py).
enum Ty : int32_t { FP32 = 0, FP16 = 1, INT8 = 2, INT4 = 3, INT2 = 4, NO_TABLE = -1 };

inline float half_to_float(uint16_t h) {
#ifdef SHARK_AVX2
  return _cvtsh_ss(h);
#else
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int e = -1;
      uint32_t m = man;
      do { ++e; m <<= 1; } while (!(m & 0x400));
      bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((m & 0x3ff) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000 | (man << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

// Element d of a row as a float (scalar path, and the tail of rows whose dim is not a multiple
// of 8).  Integer rows: q * scale + bias, as FBGEMM's CPU kernels dequantize them.
template <int TY>
inline float element(const uint8_t* row, int64_t d, float scale, float bias) {
  if constexpr (TY == FP32) {
    float x;
    std::memcpy(&x, row + 4 * d, 4);
    return x;
  } else if constexpr (TY == FP16) {
    uint16_t h;
    std::memcpy(&h, row + 2 * d, 2);
    return half_to_float(h);
  } else {
    constexpr int bits = TY == INT8 ? 8 : (TY == INT4 ? 4 : 2);
    constexpr int per_byte = 8 / bits;
    const uint8_t byte = row[4 + d / per_byte];
    const int q = (byte >> ((d % per_byte) * bits)) & ((1 << bits) - 1);
    return std::fma((float)q, scale, bias);
  }
}

#ifdef SHARK_AVX2
// The vector registers a bag's sum is held in: 8 floats (AVX2) or 16 (AVX-512, half the
// instructions per row).  fp32/fp16/int8/int4/int2(row, c): chunk c of a row's values as floats
// (integer rows: the quantized values, before scale and bias).
struct Avx2 {
  using F = __m256;
  static constexpr int kLanes = 8;
  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float x) { return _mm256_set1_ps(x); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F div(F a, F b) { return _mm256_div_ps(a, b); }
  static void store(float* p, F x) { _mm256_storeu_ps(p, x); }
  static F fp32(const uint8_t* row, int c) { return _mm256_loadu_ps(reinterpret_cast<const float*>(row) + 8 * c); }
  static F fp16(const uint8_t* row, int c) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * c)));
  }
  static F int8(const uint8_t* row, int c) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + 4 + 8 * c))));
  }
  static F int4(const uint8_t* row, int c) {
    int32_t packed;
    std::memcpy(&packed, row + 4 + 4 * c, 4);
    return _mm256_cvtepi32_ps(_mm256_and_si256(
        _mm256_srlv_epi32(_mm256_set1_epi32(packed), _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)),
        _mm256_set1_epi32(15)));
  }
  static F int2(const uint8_t* row, int c) {
    uint16_t packed;
    std::memcpy(&packed, row + 4 + 2 * c, 2);
    return _mm256_cvtepi32_ps(_mm256_and_si256(
        _mm256_srlv_epi32(_mm256_set1_epi32(packed), _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14)),
        _mm256_set1_epi32(3)));
  }
};

#ifdef SHARK_AVX512
struct Avx512 {
  using F = __m512;
  static constexpr int kLanes = 16;
  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float x) { return _mm512_set1_ps(x); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F div(F a, F b) { return _mm512_div_ps(a, b); }
  static void store(float* p, F x) { _mm512_storeu_ps(p, x); }
  static F fp32(const uint8_t* row, int c) { return _mm512_loadu_ps(reinterpret_cast<const float*>(row) + 16 * c); }
  static F fp16(const uint8_t* row, int c) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 32 * c)));
  }
  static F int8(const uint8_t* row, int c) {
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 4 + 16 * c))));
  }
  static F int4(const uint8_t* row, int c) {  // 16 nibbles: 8 from each of two 32-bit words
    int32_t lo, hi;
    std::memcpy(&lo, row + 4 + 8 * c, 4);
    std::memcpy(&hi, row + 8 + 8 * c, 4);
    const __m512i packed = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi32(lo)), _mm256_set1_epi32(hi), 1);
    return _mm512_cvtepi32_ps(_mm512_and_si512(
        _mm512_srlv_epi32(packed, _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28)),
        _mm512_set1_epi32(15)));
  }
  static F int2(const uint8_t* row, int c) {
    int32_t packed;
    std::memcpy(&packed, row + 4 + 4 * c, 4);
    return _mm512_cvtepi32_ps(_mm512_and_si512(
        _mm512_srlv_epi32(_mm512_set1_epi32(packed),
                          _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)),
        _mm512_set1_epi32(3)));
  }
};
#endif

// Chunk c of a row stored as TY, dequantized (integer rows: q * scale + bias, as FBGEMM's CPU
// kernels do).
template <typename Vec, int TY>
__attribute__((always_inline)) inline typename Vec::F dequant(const uint8_t* row, int c, typename Vec::F vscale,
                                                              typename Vec::F vbias) {
  if constexpr (TY == FP32) {
    return Vec::fp32(row, c);
  } else if constexpr (TY == FP16) {
    return Vec::fp16(row, c);
  } else {
    return Vec::fma(TY == INT8 ? Vec::int8(row, c) : TY == INT4 ? Vec::int4(row, c) : Vec::int2(row, c), vscale,
                    vbias);
  }
}
#endif

// acc[0:D] += w * row (dequantized).
template <int TY>
inline void accumulate(float* __restrict acc, const uint8_t* __restrict row, int64_t D, float w) {
  float scale = 0.f, bias = 0.f;
  if constexpr (TY != FP32 && TY != FP16) {
    uint16_t sb[2];
    std::memcpy(sb, row, 4);
    scale = half_to_float(sb[0]);
    bias = half_to_float(sb[1]);
  }
  int64_t d = 0;
#ifdef SHARK_AVX2
  const __m256 vw = _mm256_set1_ps(w);
  const __m256 vscale = _mm256_set1_ps(scale), vbias = _mm256_set1_ps(bias);
  for (; d + 8 <= D; d += 8) {
    const __m256 x = dequant<Avx2, TY>(row, (int)(d / 8), vscale, vbias);
    _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(vw, x, _mm256_loadu_ps(acc + d)));
  }
#endif
  for (; d < D; ++d) acc[d] = std::fma(w, element<TY>(row, d, scale, bias), acc[d]);
}

// A table has one tier per storage type at most (FP32 ... INT2, DROP: 6; SHARED rows have none:
// their id-map entries point at centroids among the FP16 rows); 8 tier starts fill one AVX2
// register.
constexpr int kMaxTiers = 8;

// Where a renumbered row r of tier k lies: origin + r * row_bytes (origin = the sub-table's
// first row - the tier's first renumbered row * row_bytes, so no subtraction per id).  DROP
// and tiers without rows: origin and row_bytes 0, so every row of theirs is at address 0.
struct TierRows {
  uintptr_t origin;
  int64_t row_bytes;
  int64_t mid;  // min(64, row_bytes - 1): with the first and last byte, every line of a row
                // of up to 129 bytes, without a branch on where the row starts
  int32_t ty;
};

struct Feature {
  const uint8_t* map;    // the table's slice of the id map
  int64_t bits;          // bits per entry (1 to 32)
  uint64_t mask;         // the entry's bits, once shifted down
  uint64_t rows;
  int32_t K;
  int32_t last_tier_start[kMaxTiers];  // tier t starts at renumbered row last_tier_start[t-1]+1;
                                       // INT32_MAX past the table's tiers
  TierRows tier[kMaxTiers];
  int64_t dim, col;
  bool mean;
};

// Rows are located (id map, tier, address) and prefetched kAhead ids before they are added up,
// across bag boundaries (a one-hot bag leaves no time between its own prefetch and read), and
// id-map entries kPrefetch ids before that.  Enough to keep a core's dozen or so outstanding
// misses busy while the rows before are added up; more would only stall on full fill buffers.
constexpr int64_t kAhead = 24;
constexpr int64_t kPrefetch = 64;
constexpr int64_t kRing = 32;  // located rows waiting to be added up: > kAhead, a power of two
static_assert(kRing > kAhead && (kRing & (kRing - 1)) == 0, "ring must hold kAhead + 1 rows");
// A bag's output lines are prefetched for writing kOutAhead bags before it is stored.  Each
// bag's store lands a row of the output away from the last (a line or more of its own, which
// the core must own before writing): where the output is not in cache (a fresh allocation, or
// one the rest of the model evicted) one-hot features otherwise wait on those stores — 1.4-1.6x
// slower kernel calls on the pipeline shape with a cold output (BENCHMARKS.md); no change where
// it is warm, or with 20-id bags.  4 to 32 bags ahead measured alike.
constexpr int64_t kOutAhead = 8;

// Asks for the lines of out[b, col : col + dim] in the state a store needs.
inline void prefetch_output(const float* out, int64_t b, int64_t W, int64_t col, int64_t dim) {
  const float* o = out + b * W + col;
  for (int64_t d = 0; d < dim; d += 16) __builtin_prefetch(o + d, 1, 3);
  __builtin_prefetch(o + dim - 1, 1, 3);  // the last line, where the columns do not start on one
}

struct Located {
  const uint8_t* row;  // nullptr for DROP (and tiers without rows): never read
  int32_t ty;
};

// The tier of renumbered row r: how many tier starts after the first are <= r.
inline int tier_of(const Feature& f, int32_t r) {
#ifdef SHARK_AVX2
  const __m256i starts = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(f.last_tier_start));
  const __m256i ge = _mm256_cmpgt_epi32(_mm256_set1_epi32(r), starts);
  return __builtin_popcount(_mm256_movemask_ps(_mm256_castsi256_ps(ge)));
#else
  int k = 0;
  for (int t = 0; t < f.K - 1; ++t) k += (r > f.last_tier_start[t]);
  return k;
#endif
}

// The ids of one feature's bags [b0, b1), located kAhead ids ahead of the one being added up.
template <typename V>
struct Locator {
  const Feature& f;
  const V* values;
  int64_t last;   // end of the feature's ids
  int64_t next;   // first id not located yet
  bool check;
  Located ring[kRing];

  Locator(const Feature& f_, const V* values_, int64_t first, int64_t last_, bool check_)
      : f(f_), values(values_), last(last_), next(first), check(check_) {
    for (int64_t i = first; i < std::min(first + kPrefetch, last); ++i)
      __builtin_prefetch(f.map + (((int64_t)values[i] * f.bits) >> 3));
  }

  // Locates ids up to `upto` (exclusive); false at an id outside the table (its position is
  // `next`).  Ids are checked as they are located (check_ids): a bad id stops the read before
  // its map entry is touched (map prefetches ahead of the check are harmless: a prefetch of a
  // bad address does not fault).
  __attribute__((always_inline)) inline bool locate_to(int64_t upto) {
    for (; next < upto; ++next) {
      const int64_t i = next;
      if (i + kPrefetch < last) __builtin_prefetch(f.map + (((int64_t)values[i + kPrefetch] * f.bits) >> 3));
      const int64_t v = (int64_t)values[i];
      if (check && (uint64_t)v >= f.rows) return false;  // negative ids wrap to huge
      // One 8-byte load from the entry's first byte whatever the width (an entry of up to 32
      // bits starting at any bit of that byte lies within it; the map's tail keeps the last
      // entry's load inside the buffer): no branch on the width per id.
      const uint64_t bit = (uint64_t)v * (uint64_t)f.bits;
      uint64_t word;
      std::memcpy(&word, f.map + (bit >> 3), 8);
      const int32_t r = (int32_t)((word >> (bit & 7)) & f.mask);
      const TierRows& t = f.tier[tier_of(f, r)];
      const uintptr_t row = t.origin + (uintptr_t)((int64_t)r * t.row_bytes);
      Located& slot = ring[i & (kRing - 1)];
      slot.row = reinterpret_cast<const uint8_t*>(row);
      slot.ty = t.ty;
      // Every cache line the row touches (rows need not start on a line; a line already on
      // its way is not fetched twice).
      __builtin_prefetch(reinterpret_cast<const void*>(row));
      __builtin_prefetch(reinterpret_cast<const void*>(row + t.mid));
      __builtin_prefetch(reinterpret_cast<const void*>(row + t.row_bytes - 1));
      if (t.row_bytes > 129) {  // FP32 / FP16 rows of big dims
        for (uintptr_t l = row + 128; l < row + t.row_bytes - 1; l += 64)
          __builtin_prefetch(reinterpret_cast<const void*>(l));
      }
    }
    return true;
  }

  // Before adding up id j: j is located, and the ids up to kAhead after it.
  __attribute__((always_inline)) inline bool advance(int64_t j) {
    return locate_to(std::min(j + kAhead + 1, last));
  }
  const Located& at(int64_t j) const { return ring[j & (kRing - 1)]; }
};

#ifdef SHARK_AVX2
// acc[0:CH] += w * row (dequantized: q * scale + bias for integer rows, as FBGEMM's CPU
// kernels do), CH registers of Vec::kLanes floats held by the caller.
template <typename Vec, int TY, int CH>
__attribute__((always_inline)) inline void add_row(typename Vec::F* acc, const uint8_t* __restrict row, float w) {
  using F = typename Vec::F;
  const F vw = Vec::set1(w);
  F vscale = Vec::zero(), vbias = Vec::zero();  // integer rows only
  if constexpr (TY != FP32 && TY != FP16) {
    uint16_t sb[2];
    std::memcpy(sb, row, 4);
    vscale = Vec::set1(_cvtsh_ss(sb[0]));
    vbias = Vec::set1(_cvtsh_ss(sb[1]));
  }
#pragma GCC unroll 16
  for (int c = 0; c < CH; ++c) acc[c] = Vec::fma(vw, dequant<Vec, TY>(row, c, vscale, vbias), acc[c]);
}

// add_row for a row stored as `ty` (nothing for DROP and tiers without rows).
template <typename Vec, int CH>
__attribute__((always_inline)) inline void add_typed_row(int32_t ty, typename Vec::F* acc, const uint8_t* row,
                                                         float w) {
  switch (ty) {
    case FP32: add_row<Vec, FP32, CH>(acc, row, w); break;
    case FP16: add_row<Vec, FP16, CH>(acc, row, w); break;
    case INT8: add_row<Vec, INT8, CH>(acc, row, w); break;
    case INT4: add_row<Vec, INT4, CH>(acc, row, w); break;
    case INT2: add_row<Vec, INT2, CH>(acc, row, w); break;
    default: break;
  }
}

// The bags [b0, b1) of a feature whose dim is CH * Vec::kLanes: each bag's sum stays in
// registers from its first row to the store.  Returns the position of an id outside the
// table, else -1.
template <typename Vec, int CH, typename V, typename O>
int64_t pool_feature(const Feature& f, const V* values, const O* off, const float* weights, int64_t b0,
                     int64_t b1, float* out, int64_t W, bool check) {
  using F = typename Vec::F;
  Locator<V> loc(f, values, off[b0], off[b1], check);
  for (int64_t b = b0; b < std::min(b0 + kOutAhead, b1); ++b) prefetch_output(out, b, W, f.col, f.dim);
  for (int64_t b = b0; b < b1; ++b) {
    if (b + kOutAhead < b1) prefetch_output(out, b + kOutAhead, W, f.col, f.dim);
    const int64_t s = off[b], e = off[b + 1];
    F acc[CH];
    for (int c = 0; c < CH; ++c) acc[c] = Vec::zero();
    for (int64_t j = s; j < e; ++j) {
      if (!loc.advance(j)) return loc.next;
      const Located& x = loc.at(j);
      add_typed_row<Vec, CH>(x.ty, acc, x.row, weights ? weights[j] : 1.f);
    }
    if (f.mean && e > s) {  // divided, not multiplied by 1/n: as FBGEMM and the reference do
      const F vlen = Vec::set1((float)(e - s));
      for (int c = 0; c < CH; ++c) acc[c] = Vec::div(acc[c], vlen);
    }
    float* o = out + b * W + f.col;
    for (int c = 0; c < CH; ++c) Vec::store(o + Vec::kLanes * c, acc[c]);
  }
  return -1;
}
#endif

// Any dim (and CPUs without AVX2/F16C/FMA): each bag's sum in memory, 8 floats at a time where
// AVX2 is there, then element by element; the same fma per element, in the same order.
template <typename V, typename O>
int64_t pool_feature_any(const Feature& f, const V* values, const O* off, const float* weights, int64_t b0,
                         int64_t b1, float* out, int64_t W, bool check) {
  Locator<V> loc(f, values, off[b0], off[b1], check);
  std::vector<float> acc(f.dim);
  for (int64_t b = b0; b < std::min(b0 + kOutAhead, b1); ++b) prefetch_output(out, b, W, f.col, f.dim);
  for (int64_t b = b0; b < b1; ++b) {
    if (b + kOutAhead < b1) prefetch_output(out, b + kOutAhead, W, f.col, f.dim);
    const int64_t s = off[b], e = off[b + 1];
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t j = s; j < e; ++j) {
      if (!loc.advance(j)) return loc.next;
      const Located& x = loc.at(j);
      const float w = weights ? weights[j] : 1.f;
      switch (x.ty) {
        case FP32: accumulate<FP32>(acc.data(), x.row, f.dim, w); break;
        case FP16: accumulate<FP16>(acc.data(), x.row, f.dim, w); break;
        case INT8: accumulate<INT8>(acc.data(), x.row, f.dim, w); break;
        case INT4: accumulate<INT4>(acc.data(), x.row, f.dim, w); break;
        case INT2: accumulate<INT2>(acc.data(), x.row, f.dim, w); break;
        default: break;
      }
    }
    float* o = out + b * W + f.col;
    if (f.mean && e > s) {
      const float l = (float)(e - s);
      for (int64_t d = 0; d < f.dim; ++d) o[d] = acc[d] / l;
    } else {
      std::memcpy(o, acc.data(), f.dim * sizeof(float));
    }
  }
  return -1;
}

template <typename V, typename O>
int64_t pool_any_dim(const Feature& f, const V* values, const O* off, const float* weights, int64_t b0,
                     int64_t b1, float* out, int64_t W, bool check) {
#ifdef SHARK_AVX512
  using Wide = Avx512;  // dims that are multiples of 16 in 16-float registers
#elif defined(SHARK_AVX2)
  using Wide = Avx2;
#endif
#ifdef SHARK_AVX2
  constexpr int L = Wide::kLanes;
  switch (f.dim) {
    case 8: return pool_feature<Avx2, 1>(f, values, off, weights, b0, b1, out, W, check);
    case 16: return pool_feature<Wide, 16 / L>(f, values, off, weights, b0, b1, out, W, check);
    case 24: return pool_feature<Avx2, 3>(f, values, off, weights, b0, b1, out, W, check);
    case 32: return pool_feature<Wide, 32 / L>(f, values, off, weights, b0, b1, out, W, check);
    case 48: return pool_feature<Wide, 48 / L>(f, values, off, weights, b0, b1, out, W, check);
    case 64: return pool_feature<Wide, 64 / L>(f, values, off, weights, b0, b1, out, W, check);
    case 96: return pool_feature<Wide, 96 / L>(f, values, off, weights, b0, b1, out, W, check);
    case 128: return pool_feature<Wide, 128 / L>(f, values, off, weights, b0, b1, out, W, check);
    default: break;
  }
#endif
  return pool_feature_any(f, values, off, weights, b0, b1, out, W, check);
}

template <typename V, typename O>
int64_t run(const V* values, const O* offsets, const float* weights, const int64_t* key_feature,
            int64_t num_keys, int64_t B, int64_t b0, int64_t b1, const std::vector<Feature>& features,
            float* out, int64_t W, bool check) {
  for (int64_t key = 0; key < num_keys; ++key) {
    if (key_feature[key] < 0) continue;  // a feature no table of this group serves
    const int64_t bad = pool_any_dim(features[key_feature[key]], values, offsets + key * B, weights, b0, b1,
                                     out, W, check);
    if (bad >= 0) return bad;
  }
  return -1;
}

// Writes rows [b0, b1) of the columns of this group's features in `out` [B, W]; returns the
// position in `values` of the first id outside its table (check_ids), else -1.
int64_t mixed_embedding_bag(const Tensor& values, const Tensor& offsets,
                           const std::optional<Tensor>& weights, const Tensor& key_feature,
                           const Tensor& row_map, const Tensor& feature_meta, const Tensor& tier_start,
                           const Tensor& sub_meta, const Tensor& weight_buffer, Tensor out,
                           int64_t b0, int64_t b1, bool check_ids) {
  TORCH_CHECK(values.device().is_cpu() && offsets.device().is_cpu() && out.device().is_cpu() &&
                  row_map.device().is_cpu() && weight_buffer.device().is_cpu(),
              "mixed_embedding_bag: CPU tensors only");
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && out.scalar_type() == at::kFloat,
              "mixed_embedding_bag: out must be a contiguous float [B, W] tensor");
  // (every tensor is read through its data pointer: a strided view would be read as if packed)
  TORCH_CHECK(values.is_contiguous() && offsets.is_contiguous(), "mixed_embedding_bag: values and offsets must be contiguous");
  TORCH_CHECK(key_feature.is_contiguous() && feature_meta.is_contiguous() && tier_start.is_contiguous() &&
                  sub_meta.is_contiguous() && weight_buffer.is_contiguous(),
              "mixed_embedding_bag: metadata tensors and the weight buffer must be contiguous");
  TORCH_CHECK(row_map.scalar_type() == at::kByte && row_map.is_contiguous(), "row_map must be uint8");
  TORCH_CHECK(key_feature.scalar_type() == at::kLong && feature_meta.scalar_type() == at::kLong &&
                  tier_start.scalar_type() == at::kLong && sub_meta.scalar_type() == at::kLong,
              "mixed_embedding_bag: metadata tensors must be int64");
  TORCH_CHECK(weight_buffer.scalar_type() == at::kByte, "weight_buffer must be uint8");
  const int64_t F = feature_meta.size(0), K = tier_start.size(1) - 1;
  const int64_t B = out.size(0), W = out.size(1), num_keys = key_feature.numel();
  TORCH_CHECK(offsets.numel() == num_keys * B + 1, "offsets must be [keys * B + 1]");
  TORCH_CHECK(0 <= b0 && b0 <= b1 && b1 <= B, "bag range out of bounds");
  TORCH_CHECK(feature_meta.dim() == 2 && feature_meta.size(1) == 6, "feature_meta must be [features, 6]");
  TORCH_CHECK(K <= kMaxTiers, "mixed_embedding_bag: at most ", kMaxTiers, " tiers");
  TORCH_CHECK(sub_meta.size(0) == F && sub_meta.size(1) == K && sub_meta.size(2) == 3,
              "sub_meta must be [features, tiers, 3]");
  const float* w = nullptr;
  if (weights.has_value() && weights->defined()) {
    TORCH_CHECK(weights->scalar_type() == at::kFloat && weights->numel() == values.numel() && weights->is_contiguous(),
                "weights must be contiguous float, one per id");
    w = weights->data_ptr<float>();
  }
  // feature_meta [F, 6]: map byte offset, rows, dim, output column, mean, bits per map entry.
  // sub_meta [F, K, 3]: byte offset in weight_buffer, row bytes, FBGEMM SparseType (-1: none).
  const int64_t* fm = feature_meta.data_ptr<int64_t>();
  const int64_t* sm = sub_meta.data_ptr<int64_t>();
  const int64_t* ts = tier_start.data_ptr<int64_t>();
  const uint8_t* buffer = weight_buffer.data_ptr<uint8_t>();
  const uint8_t* map = row_map.data_ptr<uint8_t>();
  std::vector<Feature> features(F);
  for (int64_t f = 0; f < F; ++f) {
    const int64_t* m = fm + 6 * f;
    const int64_t* start = ts + f * (K + 1);
    TORCH_CHECK(m[3] + m[2] <= W, "feature columns outside out");
    // (the renumbered rows: the table's rows, less its SHARED rows, plus their centroids)
    TORCH_CHECK(start[K] >= 0 && start[K] <= INT32_MAX && m[1] <= INT32_MAX,
                "tier starts and table rows must lie below 2^31");
    TORCH_CHECK(m[5] >= 1 && m[5] <= 32, "id-map entries take 1 to 32 bits, not ", m[5]);
    // (every entry's 8-byte load, from its first byte, inside row_map: the map's bytes and 7)
    TORCH_CHECK(m[0] >= 0 && m[1] >= 0 && m[0] + (m[1] * m[5] + 7) / 8 + 7 <= row_map.numel(),
                "a feature's id map lies outside row_map");
    Feature& ft = features[f];
    ft.map = map + m[0];
    ft.bits = m[5];
    ft.mask = ((uint64_t)1 << m[5]) - 1;
    ft.rows = (uint64_t)m[1];
    ft.K = (int32_t)K;
    for (int t = 0; t < kMaxTiers; ++t)
      ft.last_tier_start[t] = t + 1 < K ? (int32_t)(start[t + 1] - 1) : INT32_MAX;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t* s = sm + 3 * (f * K + k);
      const int32_t ty = (int32_t)s[2];
      const int64_t rb = ty == NO_TABLE ? 0 : s[1];
      // Unsigned wrap-around: origin + r * row_bytes lands on the tier's rows for its r.
      const uintptr_t origin = ty == NO_TABLE ? 0
          : reinterpret_cast<uintptr_t>(buffer + s[0]) - (uintptr_t)(start[k] * rb);
      ft.tier[k] = {origin, rb, std::min<int64_t>(64, rb - 1), ty};
    }
    ft.dim = m[2];
    ft.col = m[3];
    ft.mean = m[4] != 0;
  }
  int64_t bad = -1;
  AT_DISPATCH_INDEX_TYPES(values.scalar_type(), "mixed_embedding_bag_values", [&] {
    using value_t = index_t;
    AT_DISPATCH_INDEX_TYPES(offsets.scalar_type(), "mixed_embedding_bag_offsets", [&] {
      bad = run<value_t, index_t>(values.data_ptr<value_t>(), offsets.data_ptr<index_t>(), w,
                                  key_feature.data_ptr<int64_t>(), num_keys, B, b0, b1, features,
                                  out.data_ptr<float>(), W, check_ids);
    });
  });
  return bad;
}

}  // namespace

TORCH_LIBRARY(shark_torchrec, m) {
  m.def("mixed_embedding_bag(Tensor values, Tensor offsets, Tensor? weights, Tensor key_feature, "
        "Tensor row_map, Tensor feature_meta, Tensor tier_start, Tensor sub_meta, "
        "Tensor weight_buffer, Tensor(a!) out, int b0, int b1, bool check_ids) -> int");
}

TORCH_LIBRARY_IMPL(shark_torchrec, CPU, m) {
  m.impl("mixed_embedding_bag", &mixed_embedding_bag);
}
