// Row-wise mixed-precision embedding-bag lookup on CPU, in one pass over the ids.
//
// For every bag of every served feature: each id goes through the table's id map (one int32
// per row; tier = which of the table's tier ranges the renumbered row falls in, local row =
// renumbered row - tier start), the row is read from its sub-table inside the FBGEMM TBE's own
// weight buffer (rows as FBGEMM stores them: FP32, FP16, or INT8/INT4/INT2 with an fp16
// scale and bias first), dequantized and added into the bag's sum, which is written once into
// the output.  DROP rows (and tiers a table does not use) have no sub-table: skipped, but still
// counted by MEAN pooling.
//
// Where the time goes, and what the structure answers (tools/bench_lookup.py, BENCHMARKS.md):
// * On big tables every row read is a cache miss: ids are located (id map, tier, address)
//   and their rows prefetched a fixed number of ids ahead of the pooling, across bag
//   boundaries, and id-map entries further ahead still.
// * A bag is added up in input order with one branch per id on its row's storage type; bags of
//   one id (one-hot features) take a shorter path.  (Regrouping a bag's rows by tier first, so
//   the branch would predict, measured no faster on long bags and slower on short ones.)
// * For dims that are multiples of 8 (up to 128) the bag's sum stays in AVX2 registers from
//   the first row to the store; other dims (and CPUs without AVX2/F16C/FMA) sum in memory.
//
// Built at run time by shark_torchrec/quant/cpu_kernel.py (torch.utils.cpp_extension.load) and
// registered as torch.ops.shark_torchrec.mixed_embedding_bag.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#define SHARK_AVX2 1
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
    __m256 x;
    if constexpr (TY == FP32) {
      x = _mm256_loadu_ps(reinterpret_cast<const float*>(row) + d);
    } else if constexpr (TY == FP16) {
      x = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * d)));
    } else {
      __m256i q;
      if constexpr (TY == INT8) {
        q = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + 4 + d)));
      } else if constexpr (TY == INT4) {
        int32_t packed;
        std::memcpy(&packed, row + 4 + d / 2, 4);
        q = _mm256_and_si256(
            _mm256_srlv_epi32(_mm256_set1_epi32(packed), _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)),
            _mm256_set1_epi32(15));
      } else {
        uint16_t packed;
        std::memcpy(&packed, row + 4 + d / 4, 2);
        q = _mm256_and_si256(
            _mm256_srlv_epi32(_mm256_set1_epi32(packed), _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14)),
            _mm256_set1_epi32(3));
      }
      x = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), vscale, vbias);
    }
    _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(vw, x, _mm256_loadu_ps(acc + d)));
  }
#endif
  for (; d < D; ++d) acc[d] = std::fma(w, element<TY>(row, d, scale, bias), acc[d]);
}

struct SubTable {
  const uint8_t* base;  // first row
  int64_t row_bytes;
  int32_t ty;           // Ty, NO_TABLE for DROP and unused tiers
};

struct Feature {
  const int32_t* map;    // the table's slice of the id map
  uint64_t rows;
  const int64_t* start;  // [K + 1] renumbered row where each tier starts
  const SubTable* sub;   // [K]
  int64_t dim, col;
  bool mean;
};

// Rows are located (id map, tier, address) and prefetched kAhead ids before they are added up,
// across bag boundaries (a one-hot bag leaves no time between its own prefetch and read), and
// id-map entries kPrefetch ids before that.  Enough to keep a core's dozen or so outstanding
// misses busy while the rows before are added up; more would only stall on full fill buffers.
constexpr int64_t kAhead = 24;
constexpr int64_t kPrefetch = 64;

#ifdef SHARK_AVX2
// acc[0:CH] += w * row (dequantized), CH chunks of 8 floats held in registers by the caller.
template <int TY, int CH>
__attribute__((always_inline)) inline void add_row(__m256* acc, const uint8_t* __restrict row, float w) {
  const __m256 vw = _mm256_set1_ps(w);
  __m256 vscale, vbias;
  if constexpr (TY != FP32 && TY != FP16) {
    uint16_t sb[2];
    std::memcpy(sb, row, 4);
    vscale = _mm256_set1_ps(_cvtsh_ss(sb[0]));
    vbias = _mm256_set1_ps(_cvtsh_ss(sb[1]));
  }
#pragma GCC unroll 16
  for (int c = 0; c < CH; ++c) {
    __m256 x;
    if constexpr (TY == FP32) {
      x = _mm256_loadu_ps(reinterpret_cast<const float*>(row) + 8 * c);
    } else if constexpr (TY == FP16) {
      x = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * c)));
    } else {
      __m256i q;
      if constexpr (TY == INT8) {
        q = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + 4 + 8 * c)));
      } else if constexpr (TY == INT4) {
        int32_t packed;
        std::memcpy(&packed, row + 4 + 4 * c, 4);
        q = _mm256_and_si256(
            _mm256_srlv_epi32(_mm256_set1_epi32(packed), _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)),
            _mm256_set1_epi32(15));
      } else {
        uint16_t packed;
        std::memcpy(&packed, row + 4 + 2 * c, 2);
        q = _mm256_and_si256(
            _mm256_srlv_epi32(_mm256_set1_epi32(packed), _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14)),
            _mm256_set1_epi32(3));
      }
      x = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), vscale, vbias);
    }
    acc[c] = _mm256_fmadd_ps(vw, x, acc[c]);
  }
}

// add_row for a row stored as `ty` (nothing for DROP and tiers without rows).
template <int CH>
__attribute__((always_inline)) inline void add_typed_row(int32_t ty, __m256* acc, const uint8_t* row, float w) {
  switch (ty) {
    case FP32: add_row<FP32, CH>(acc, row, w); break;
    case FP16: add_row<FP16, CH>(acc, row, w); break;
    case INT8: add_row<INT8, CH>(acc, row, w); break;
    case INT4: add_row<INT4, CH>(acc, row, w); break;
    case INT2: add_row<INT2, CH>(acc, row, w); break;
    default: break;
  }
}

// A bag of a feature whose dim is 8 * CH: the sum stays in registers from its first row to
// the store (the same fma per element, in the same order, as the generic path below).
template <int CH>
void pool_bag(const Feature& f, const uint8_t* const* rows, const int8_t* tiers, const float* weights,
              int64_t len, float* out) {
  __m256 acc[CH];
  for (int c = 0; c < CH; ++c) acc[c] = _mm256_setzero_ps();
  for (int64_t j = 0; j < len; ++j) {
    const uint8_t* row = rows[j];
    const float w = weights ? weights[j] : 1.f;
    add_typed_row<CH>(f.sub[tiers[j]].ty, acc, row, w);
  }
  if (f.mean && len > 0) {  // divided, not multiplied by 1/n: as FBGEMM and the reference do
    const __m256 vlen = _mm256_set1_ps((float)len);
    for (int c = 0; c < CH; ++c) acc[c] = _mm256_div_ps(acc[c], vlen);
  }
  for (int c = 0; c < CH; ++c) _mm256_storeu_ps(out + 8 * c, acc[c]);
}

// A bag of one id (one-hot features, most bags of most models): its row, dequantized, times
// its weight (MEAN divides by 1: the same value); nullptr (DROP) gives zeros.
template <int CH>
void pool_one(int32_t ty, const uint8_t* row, float w, float* out) {
  __m256 acc[CH];
  for (int c = 0; c < CH; ++c) acc[c] = _mm256_setzero_ps();
  if (row) add_typed_row<CH>(ty, acc, row, w);
  for (int c = 0; c < CH; ++c) _mm256_storeu_ps(out + 8 * c, acc[c]);
}
#endif

// Any dim: the sum in memory, 8 floats at a time where AVX2 is there, then element by element.
void pool_bag_any(const Feature& f, const uint8_t* const* rows, const int8_t* tiers, const float* weights,
                  int64_t len, float* out, std::vector<float>& acc) {
  acc.assign(f.dim, 0.f);
  for (int64_t j = 0; j < len; ++j) {
    const uint8_t* row = rows[j];
    const float w = weights ? weights[j] : 1.f;
    switch (f.sub[tiers[j]].ty) {
      case FP32: accumulate<FP32>(acc.data(), row, f.dim, w); break;
      case FP16: accumulate<FP16>(acc.data(), row, f.dim, w); break;
      case INT8: accumulate<INT8>(acc.data(), row, f.dim, w); break;
      case INT4: accumulate<INT4>(acc.data(), row, f.dim, w); break;
      case INT2: accumulate<INT2>(acc.data(), row, f.dim, w); break;
      default: break;
    }
  }
  if (f.mean && len > 0) {
    const float l = (float)len;
    for (int64_t d = 0; d < f.dim; ++d) out[d] = acc[d] / l;
  } else {
    std::memcpy(out, acc.data(), f.dim * sizeof(float));
  }
}

using PoolFn = void (*)(const Feature&, const uint8_t* const*, const int8_t*, const float*, int64_t, float*);
using PoolOneFn = void (*)(int32_t, const uint8_t*, float, float*);

// The register-accumulating pooling for a dim, if it has one (multiples of 8 up to 128).
std::pair<PoolFn, PoolOneFn> pool_for(int64_t dim) {
#ifdef SHARK_AVX2
  switch (dim) {
    case 8: return {pool_bag<1>, pool_one<1>};
    case 16: return {pool_bag<2>, pool_one<2>};
    case 24: return {pool_bag<3>, pool_one<3>};
    case 32: return {pool_bag<4>, pool_one<4>};
    case 48: return {pool_bag<6>, pool_one<6>};
    case 64: return {pool_bag<8>, pool_one<8>};
    case 96: return {pool_bag<12>, pool_one<12>};
    case 128: return {pool_bag<16>, pool_one<16>};
    default: break;
  }
#endif
  return {nullptr, nullptr};
}

template <typename V, typename O>
int64_t run(const V* values, const O* offsets, const float* weights, const int64_t* key_feature,
            int64_t num_keys, int64_t B, int64_t b0, int64_t b1, const std::vector<Feature>& features,
            int64_t K, float* out, int64_t W, bool check) {
  // Each id's row (nullptr: DROP) and tier position, filled kAhead ids before its bag is added up.
  std::vector<const uint8_t*> row_of;
  std::vector<int8_t> tier;
  std::vector<float> acc;
  for (int64_t key = 0; key < num_keys; ++key) {
    if (key_feature[key] < 0) continue;  // a feature no table of this group serves
    const Feature& f = features[key_feature[key]];
    const auto [pool, pool_single] = pool_for(f.dim);
    const O* off = offsets + key * B;
    const int64_t first = off[b0], last = off[b1];
    row_of.resize(last - first);
    tier.resize(last - first);
    // Ids are checked as they are located (check_ids): an id outside the table stops the read
    // before its map entry is touched (the map prefetches ahead of the check are harmless:
    // a prefetch of a bad address does not fault).
    for (int64_t i = first; i < std::min(first + kPrefetch, last); ++i)
      __builtin_prefetch(f.map + (int64_t)values[i]);
    int64_t located = first;  // ids [first, located) are located and their rows prefetched
    auto locate_to = [&](int64_t upto) -> bool {
      for (; located < upto; ++located) {
        const int64_t i = located;
        if (i + kPrefetch < last) __builtin_prefetch(f.map + (int64_t)values[i + kPrefetch]);
        if (check && (uint64_t)(int64_t)values[i] >= f.rows) return false;  // negative ids wrap to huge
        const int64_t r = f.map[(int64_t)values[i]];
        int64_t k = 0;
        for (int64_t t = 1; t < K; ++t) k += (r >= f.start[t]);
        tier[i - first] = (int8_t)k;
        const SubTable& t = f.sub[k];
        const uint8_t* row = t.ty == NO_TABLE ? nullptr : t.base + (r - f.start[k]) * t.row_bytes;
        row_of[i - first] = row;
        if (row) {  // every cache line the row touches (rows need not start on a line)
          const uintptr_t end = reinterpret_cast<uintptr_t>(row) + t.row_bytes;
          for (uintptr_t l = reinterpret_cast<uintptr_t>(row) & ~(uintptr_t)63; l < end; l += 64)
            __builtin_prefetch(reinterpret_cast<const void*>(l));
        }
      }
      return true;
    };
    if (!locate_to(std::min(first + kAhead, last))) return located;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t s = off[b], len = off[b + 1] - s;
      if (!locate_to(std::min(s + len + kAhead, last))) return located;
      const int8_t* bt = tier.data() + (s - first);
      float* o = out + b * W + f.col;
      if (len == 1 && pool_single) {
        pool_single(f.sub[bt[0]].ty, row_of[s - first], weights ? weights[s] : 1.f, o);
        continue;
      }
      const uint8_t* const* br = row_of.data() + (s - first);
      const float* bw = weights ? weights + s : nullptr;
      if (pool) {
        pool(f, br, bt, bw, len, o);
      } else {
        pool_bag_any(f, br, bt, bw, len, o, acc);
      }
    }
  }
  return -1;
}

// Writes rows [b0, b1) of the columns of this group's features in `out` [B, W]; returns the
// position in `values` of the first id outside its table (check_ids), else -1, as a tensor.
Tensor mixed_embedding_bag(const Tensor& values, const Tensor& offsets,
                           const std::optional<Tensor>& weights, const Tensor& key_feature,
                           const Tensor& row_map, const Tensor& feature_meta, const Tensor& tier_start,
                           const Tensor& sub_meta, const Tensor& weight_buffer, Tensor out,
                           int64_t b0, int64_t b1, bool check_ids) {
  TORCH_CHECK(values.device().is_cpu() && out.device().is_cpu(), "mixed_embedding_bag: CPU tensors only");
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && out.scalar_type() == at::kFloat,
              "mixed_embedding_bag: out must be a contiguous float [B, W] tensor");
  TORCH_CHECK(row_map.scalar_type() == at::kInt && row_map.is_contiguous(), "row_map must be int32");
  TORCH_CHECK(key_feature.scalar_type() == at::kLong && feature_meta.scalar_type() == at::kLong &&
                  tier_start.scalar_type() == at::kLong && sub_meta.scalar_type() == at::kLong,
              "mixed_embedding_bag: metadata tensors must be int64");
  TORCH_CHECK(weight_buffer.scalar_type() == at::kByte, "weight_buffer must be uint8");
  const int64_t F = feature_meta.size(0), K = tier_start.size(1) - 1;
  const int64_t B = out.size(0), W = out.size(1), num_keys = key_feature.numel();
  TORCH_CHECK(offsets.numel() == num_keys * B + 1, "offsets must be [keys * B + 1]");
  TORCH_CHECK(0 <= b0 && b0 <= b1 && b1 <= B, "bag range out of bounds");
  TORCH_CHECK(feature_meta.dim() == 2 && feature_meta.size(1) == 5, "feature_meta must be [features, 5]");
  TORCH_CHECK(K <= 127, "mixed_embedding_bag: at most 127 tiers");
  TORCH_CHECK(sub_meta.size(0) == F && sub_meta.size(1) == K && sub_meta.size(2) == 3,
              "sub_meta must be [features, tiers, 3]");
  const float* w = nullptr;
  if (weights.has_value() && weights->defined()) {
    TORCH_CHECK(weights->scalar_type() == at::kFloat && weights->numel() == values.numel(),
                "weights must be float, one per id");
    w = weights->data_ptr<float>();
  }
  // feature_meta [F, 5]: map base, rows, dim, output column, mean.
  // sub_meta [F, K, 3]: byte offset in weight_buffer, row bytes, FBGEMM SparseType (-1: none).
  const int64_t* fm = feature_meta.data_ptr<int64_t>();
  const int64_t* sm = sub_meta.data_ptr<int64_t>();
  const int64_t* ts = tier_start.data_ptr<int64_t>();
  const uint8_t* buffer = weight_buffer.data_ptr<uint8_t>();
  std::vector<SubTable> subs(F * K);
  for (int64_t i = 0; i < F * K; ++i) {
    const int32_t ty = (int32_t)sm[3 * i + 2];
    subs[i] = {ty == NO_TABLE ? nullptr : buffer + sm[3 * i], sm[3 * i + 1], ty};
  }
  std::vector<Feature> features(F);
  for (int64_t f = 0; f < F; ++f) {
    const int64_t* m = fm + 5 * f;
    TORCH_CHECK(m[3] + m[2] <= W, "feature columns outside out");
    features[f] = {row_map.data_ptr<int32_t>() + m[0], (uint64_t)m[1], ts + f * (K + 1),
                   subs.data() + f * K, m[2], m[3], m[4] != 0};
  }
  int64_t bad = -1;
  AT_DISPATCH_INDEX_TYPES(values.scalar_type(), "mixed_embedding_bag_values", [&] {
    using value_t = index_t;
    AT_DISPATCH_INDEX_TYPES(offsets.scalar_type(), "mixed_embedding_bag_offsets", [&] {
      bad = run<value_t, index_t>(values.data_ptr<value_t>(), offsets.data_ptr<index_t>(), w,
                                  key_feature.data_ptr<int64_t>(), num_keys, B, b0, b1, features, K,
                                  out.data_ptr<float>(), W, check_ids);
    });
  });
  Tensor result = at::empty({1}, values.options().dtype(at::kLong));
  result.data_ptr<int64_t>()[0] = bad;
  return result;
}

}  // namespace

TORCH_LIBRARY(shark_torchrec, m) {
  m.def("mixed_embedding_bag(Tensor values, Tensor offsets, Tensor? weights, Tensor key_feature, "
        "Tensor row_map, Tensor feature_meta, Tensor tier_start, Tensor sub_meta, "
        "Tensor weight_buffer, Tensor(a!) out, int b0, int b1, bool check_ids) -> Tensor");
}

TORCH_LIBRARY_IMPL(shark_torchrec, CPU, m) {
  m.impl("mixed_embedding_bag", &mixed_embedding_bag);
}
