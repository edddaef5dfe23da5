// Adding training steps' row increments into RowPriority's counts in one pass.
//
// counts [R, C] float64 (a row's C channels side by side: one cache line serves them all);
// for every occurrence i: counts[row[i], c] += w[step[i], positive[i], c], where w [S, 2, C]
// holds each buffered step's increment per label and channel ((alpha | beta) times the step's
// stored scale).  Replaces, per channel, a where, a gather, a multiply, a cast and an
// index_add over every occurrence (issue 20: the row counters cost 15% of a training step).
//
// Built with the other kernels by shark_torchrec/quant/cpu_kernel.py; registered as
// torch.ops.shark_torchrec.row_counts_add and row_counts_add_batch.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

namespace {

using at::Tensor;

void row_counts_add(Tensor counts, const Tensor& rows, const Tensor& positive, const Tensor& step,
                    const Tensor& w) {
  TORCH_CHECK(counts.device().is_cpu() && counts.scalar_type() == at::kDouble && counts.dim() == 2 &&
                  counts.is_contiguous(),
              "row_counts_add: counts must be a contiguous float64 [rows, channels] CPU tensor");
  const int64_t R = counts.size(0), C = counts.size(1), n = rows.numel();
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.is_contiguous(), "row_counts_add: rows must be int64");
  TORCH_CHECK(positive.scalar_type() == at::kBool && positive.is_contiguous() && positive.numel() == n,
              "row_counts_add: positive must be bool, one per row");
  TORCH_CHECK(step.scalar_type() == at::kLong && step.is_contiguous() && step.numel() == n,
              "row_counts_add: step must be int64, one per row");
  TORCH_CHECK(w.scalar_type() == at::kDouble && w.is_contiguous() && w.dim() == 3 && w.size(1) == 2 &&
                  w.size(2) == C,
              "row_counts_add: w must be float64 [steps, 2, channels]");
  const int64_t S = w.size(0);
  double* out = counts.data_ptr<double>();
  const int64_t* r = rows.data_ptr<int64_t>();
  const bool* p = positive.data_ptr<bool>();
  const int64_t* s = step.data_ptr<int64_t>();
  const double* wp = w.data_ptr<double>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(r[i] >= 0 && r[i] < R && s[i] >= 0 && s[i] < S, "row_counts_add: row ", r[i], " or step ",
                s[i], " out of range");
  // Rows are random: each update is a cache miss, prefetched (for writing) kAhead ids before.
  constexpr int64_t kAhead = 16;
  for (int64_t i = 0; i < n; ++i) {
    if (i + kAhead < n) __builtin_prefetch(out + r[i + kAhead] * C, 1, 3);
    const double* inc = wp + (s[i] * 2 + (p[i] ? 0 : 1)) * C;
    double* dst = out + r[i] * C;
    for (int64_t c = 0; c < C; ++c) dst[c] += inc[c];
  }
}

// The same straight from a batch (one process, nothing to route): values / lengths [F * B]
// of a KeyedJaggedTensor, key_base [F] (the counts row of each key's table's row 0),
// positive [B] the samples' labels, w [1, 2, C] this step's increments.  Ids are assumed
// inside their tables (checked before).
void row_counts_add_batch(Tensor counts, const Tensor& values, const Tensor& lengths, const Tensor& key_base,
                          const Tensor& positive, const Tensor& w) {
  TORCH_CHECK(counts.scalar_type() == at::kDouble && counts.dim() == 2 && counts.is_contiguous(),
              "row_counts_add_batch: counts must be a contiguous float64 [rows, channels] tensor");
  const int64_t C = counts.size(1), F = key_base.numel(), B = positive.numel();
  TORCH_CHECK(lengths.numel() == F * B && lengths.is_contiguous() && values.is_contiguous() &&
                  key_base.scalar_type() == at::kLong && positive.scalar_type() == at::kBool &&
                  positive.is_contiguous() && w.scalar_type() == at::kDouble && w.numel() == 2 * C,
              "row_counts_add_batch: lengths [F * B], key_base int64 [F], positive bool [B], w [1, 2, C]");
  double* out = counts.data_ptr<double>();
  const int64_t* kb = key_base.data_ptr<int64_t>();
  const bool* p = positive.data_ptr<bool>();
  const double* wp = w.data_ptr<double>();
  constexpr int64_t kAhead = 16;
  AT_DISPATCH_INDEX_TYPES(values.scalar_type(), "row_counts_add_batch_values", [&] {
    using value_t = index_t;
    const value_t* v = values.data_ptr<value_t>();
    const int64_t n = values.numel();
    AT_DISPATCH_INDEX_TYPES(lengths.scalar_type(), "row_counts_add_batch_lengths", [&] {
      const index_t* len = lengths.data_ptr<index_t>();
      int64_t i = 0, total = 0;
      for (int64_t b = 0; b < F * B; ++b) total += len[b];
      TORCH_CHECK(total == n, "row_counts_add_batch: lengths add up to ", total, ", ", n, " ids given");
      // the counts row of id j, for prefetching ahead across bags
      std::vector<int64_t> row(n);
      for (int64_t f = 0, j = 0; f < F; ++f)
        for (int64_t b = 0; b < B; ++b)
          for (int64_t k = 0; k < len[f * B + b]; ++k, ++j) row[j] = kb[f] + (int64_t)v[j];
      for (int64_t f = 0; f < F; ++f) {
        for (int64_t b = 0; b < B; ++b) {
          const double* inc = wp + (p[b] ? 0 : 1) * C;
          for (int64_t k = 0; k < len[f * B + b]; ++k, ++i) {
            if (i + kAhead < n) __builtin_prefetch(out + row[i + kAhead] * C, 1, 3);
            double* dst = out + row[i] * C;
            for (int64_t c = 0; c < C; ++c) dst[c] += inc[c];
          }
        }
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(shark_torchrec, m) {
  m.def("row_counts_add(Tensor(a!) counts, Tensor rows, Tensor positive, Tensor step, Tensor w) -> ()");
  m.def("row_counts_add_batch(Tensor(a!) counts, Tensor values, Tensor lengths, Tensor key_base, "
        "Tensor positive, Tensor w) -> ()");
}

TORCH_LIBRARY_IMPL(shark_torchrec, CPU, m) {
  m.impl("row_counts_add", &row_counts_add);
  m.impl("row_counts_add_batch", &row_counts_add_batch);
}
