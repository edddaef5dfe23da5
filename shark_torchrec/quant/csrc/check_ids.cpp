// Checking a KeyedJaggedTensor's ids against their tables' rows in one pass, without
// allocating: the position of the first id outside [0, rows of its feature's table), or -1.
// Used by the sharded mixed collection before it sends ids anywhere (a per-feature min/max in
// torch cost a few host round trips per feature: 0.5 ms a batch at 26 features).
//
// Built with the other kernels by shark_torchrec/quant/cpu_kernel.py; registered as
// torch.ops.shark_torchrec.first_id_outside.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstdint>

namespace {

using at::Tensor;

// values: the ids, feature after feature; length_per_key [F] int64; rows [F] int64.
int64_t first_id_outside(const Tensor& values, const Tensor& length_per_key, const Tensor& rows) {
  TORCH_CHECK(values.device().is_cpu() && values.is_contiguous(), "first_id_outside: contiguous CPU ids");
  TORCH_CHECK(length_per_key.scalar_type() == at::kLong && rows.scalar_type() == at::kLong &&
                  length_per_key.numel() == rows.numel(),
              "first_id_outside: length_per_key and rows must be int64, one per feature");
  const int64_t F = rows.numel();
  const int64_t* len = length_per_key.data_ptr<int64_t>();
  const int64_t* n = rows.data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t f = 0; f < F; ++f) total += len[f];
  TORCH_CHECK(total == values.numel(), "first_id_outside: ", total, " ids by the lengths, ", values.numel(),
              " given");
  int64_t bad = -1;
  AT_DISPATCH_INDEX_TYPES(values.scalar_type(), "first_id_outside", [&] {
    const index_t* v = values.data_ptr<index_t>();
    int64_t start = 0;
    for (int64_t f = 0; f < F && bad < 0; ++f) {
      const uint64_t limit = (uint64_t)n[f];
      for (int64_t i = start; i < start + len[f]; ++i)
        if ((uint64_t)(int64_t)v[i] >= limit) {  // negative ids wrap to huge values
          bad = i;
          break;
        }
      start += len[f];
    }
  });
  return bad;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(shark_torchrec, m) {
  m.def("first_id_outside(Tensor values, Tensor length_per_key, Tensor rows) -> int");
}

TORCH_LIBRARY_IMPL(shark_torchrec, CPU, m) {
  m.impl("first_id_outside", &first_id_outside);
}
