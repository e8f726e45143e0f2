// Host-side argument handling shared by the CPU and CUDA drivers: the op's tensor lists are checked
// (before anything is modified) and flattened into one TensorJob per tensor.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <string>
#include <vector>

#include "element.h"

namespace sparsetrain {

struct TensorJob {
  void* param;
  const void* grad;
  float* state[3];         // null where the algorithm has no such state
  int32_t* mask;           // null without masks
  const float* coefs;      // null without coefficients
  double* stats;           // null without statistics
  const float* group;      // [2, groups]: lam row, then prune-flag row; null without groups
  float* step;
  int64_t numel, inner, groups, shard_offset;
  uint64_t seed;
};

struct Call {
  Flags flags;
  Hyper hyper;
  at::ScalarType dtype;  // parameter dtype of the first tensor (the CPU driver dispatches per tensor)
  std::vector<TensorJob> jobs;
  std::vector<at::ScalarType> dtypes;
  const at::Tensor* lr_tensor;
  const at::Tensor* found_inf;
  // the statistics this step computes (STATS_* bits; the others are stored as 0); 0: none, the previous
  // step's are read and left as they are
  int stats_mask = STATS_ALL;
};

// The op's stats_mask (contract.STATS_* bits), checked.
inline int checked_stats_mask(int64_t stats_mask) {
  TORCH_CHECK(stats_mask >= 0 && stats_mask <= STATS_ALL, "sparsetrain: stats_mask must be a bit set of STATS_* (0 to ",
              STATS_ALL, "), got ", stats_mask);
  return static_cast<int>(stats_mask);
}

inline void check_list(const at::TensorList list, size_t n, const char* name, bool may_be_empty) {
  TORCH_CHECK((may_be_empty && list.empty()) || list.size() == n, "sparsetrain: ", name, " has ", list.size(),
              " tensors, expected ", n, may_be_empty ? " (or none)" : "");
}

inline void check_tensor(const at::Tensor& x, const char* name, size_t t, at::ScalarType dtype, int64_t numel,
                         const at::Device& device) {
  TORCH_CHECK(x.scalar_type() == dtype, "sparsetrain: ", name, "[", t, "] has dtype ", x.scalar_type(),
              ", expected ", dtype);
  TORCH_CHECK(x.numel() == numel, "sparsetrain: ", name, "[", t, "] has ", x.numel(), " elements, expected ",
              numel);
  TORCH_CHECK(x.device() == device, "sparsetrain: ", name, "[", t, "] is on ", x.device(), ", expected ",
              device);
  TORCH_CHECK(x.is_contiguous(), "sparsetrain: ", name, "[", t, "] is not contiguous");
}

// The op's switches as the element contract reads them, for SGD and for Adam / AdamW (every
// driver builds its call from these).
inline Flags sgd_flags(double momentum, bool nesterov, bool maximize, int64_t prune, bool regularize,
                       bool l1_proximal) {
  Flags f{};
  f.adam = false;
  f.momentum = momentum != 0.0;
  f.nesterov = nesterov;
  f.maximize = maximize;
  f.prune = static_cast<int>(prune);
  f.regularize = regularize;
  f.l1_proximal = l1_proximal;
  return f;
}

inline Flags adam_flags(bool decoupled, bool amsgrad, bool maximize, int64_t prune, bool regularize,
                        bool l1_proximal) {
  Flags f{};
  f.adam = true;
  f.decoupled = decoupled;
  f.amsgrad = amsgrad;
  f.maximize = maximize;
  f.prune = static_cast<int>(prune);
  f.regularize = regularize;
  f.l1_proximal = l1_proximal;
  return f;
}

// Checks every list and builds the jobs. states: the algorithm's state lists in order (SGD: the
// momentum buffers; Adam: exp_avg, exp_avg_sq, max_exp_avg_sq); state_needed[i] says whether
// list i must hold one tensor per parameter.
inline Call unpack(at::TensorList params, at::TensorList grads, std::vector<at::TensorList> states,
                   std::vector<bool> state_needed, at::TensorList steps, at::TensorList mask_words,
                   at::TensorList stats, at::TensorList tensor_coefs, at::TensorList group_coefs,
                   at::IntArrayRef group_inner, at::IntArrayRef shard_offsets, const at::Tensor& seeds,
                   const c10::optional<at::Tensor>& found_inf, const c10::optional<at::Tensor>& lr_tensor,
                   Flags flags, Hyper hyper) {
  const size_t n = params.size();
  check_list(grads, n, "grads", false);
  check_list(steps, n, "steps", false);
  check_list(mask_words, n, "mask_words", true);
  check_list(stats, n, "stats", true);
  check_list(tensor_coefs, n, "tensor_coefs", true);
  check_list(group_coefs, n, "group_coefs", true);
  TORCH_CHECK(group_coefs.empty() || group_inner.size() == n, "sparsetrain: group_inner has ", group_inner.size(),
              " entries, expected ", n);
  TORCH_CHECK(shard_offsets.empty() || shard_offsets.size() == n, "sparsetrain: shard_offsets has ",
              shard_offsets.size(), " entries, expected ", n, " (or none)");
  TORCH_CHECK(flags.prune >= PRUNE_NONE && flags.prune <= PRUNE_NM, "sparsetrain: unknown prune mode ",
              flags.prune);
  flags.has_mask = !mask_words.empty();
  flags.has_stats = !stats.empty();
  flags.has_groups = !group_coefs.empty();
  TORCH_CHECK(flags.prune != PRUNE_STOCHASTIC || (flags.has_stats && !tensor_coefs.empty()),
              "sparsetrain: stochastic pruning needs stats and tensor_coefs");
  TORCH_CHECK(!(flags.prune == PRUNE_LOW || flags.prune == PRUNE_HIGH) || !tensor_coefs.empty(),
              "sparsetrain: threshold pruning needs tensor_coefs");
  TORCH_CHECK(flags.prune != PRUNE_NM || (!tensor_coefs.empty() && !mask_words.empty()),
              "sparsetrain: N:M pruning needs mask_words and tensor_coefs");
  TORCH_CHECK(flags.prune != PRUNE_GROUP || flags.has_groups, "sparsetrain: group pruning needs group_coefs");
  TORCH_CHECK(!flags.regularize || !tensor_coefs.empty(), "sparsetrain: regularize=True needs tensor_coefs");
  if (flags.prune == PRUNE_STOCHASTIC) {
    TORCH_CHECK(seeds.scalar_type() == at::kLong && seeds.numel() >= static_cast<int64_t>(n),
                "sparsetrain: stochastic pruning needs int64 seeds, one per tensor");
  }
  Call call;
  call.flags = flags;
  call.hyper = hyper;
  call.lr_tensor = lr_tensor.has_value() ? &*lr_tensor : nullptr;
  call.found_inf = found_inf.has_value() ? &*found_inf : nullptr;
  call.jobs.resize(n);
  call.dtypes.resize(n);
  call.dtype = n ? params[0].scalar_type() : at::kFloat;
  // the CPU driver reads the seeds here; the CUDA kernel reads them from device memory
  const bool seeds_on_host = flags.prune == PRUNE_STOCHASTIC && seeds.is_cpu();
  const at::Tensor seeds_cpu = seeds_on_host ? seeds.contiguous() : at::Tensor();
  for (size_t t = 0; t < n; ++t) {
    const at::Tensor& p = params[t];
    const at::ScalarType dtype = p.scalar_type();
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, "sparsetrain: params[", t,
                "] has dtype ", dtype, "; the native backend takes float32, bfloat16 and float16");
    const at::Device device = p.device();
    const int64_t numel = p.numel();
    check_tensor(p, "params", t, dtype, numel, device);
    check_tensor(grads[t], "grads", t, dtype, numel, device);
    check_tensor(steps[t], "steps", t, at::kFloat, 1, device);
    TensorJob& job = call.jobs[t];
    job = TensorJob{};
    job.param = p.data_ptr();
    job.grad = grads[t].data_ptr();
    for (size_t i = 0; i < states.size(); ++i) {
      if (!state_needed[i]) continue;
      check_list(states[i], n, "optimizer state", false);
      check_tensor(states[i][t], "optimizer state", t, at::kFloat, numel, device);
      job.state[i] = states[i][t].data_ptr<float>();
    }
    job.step = steps[t].data_ptr<float>();
    job.numel = numel;
    if (flags.has_mask) {
      check_tensor(mask_words[t], "mask_words", t, at::kInt, (numel + 31) / 32, device);
      job.mask = mask_words[t].data_ptr<int32_t>();
    }
    if (flags.has_stats) {
      check_tensor(stats[t], "stats", t, at::kDouble, NUM_STATS, device);
      job.stats = stats[t].data_ptr<double>();
    }
    if (!tensor_coefs.empty()) {
      check_tensor(tensor_coefs[t], "tensor_coefs", t, at::kFloat, NUM_COEFS, device);
      job.coefs = tensor_coefs[t].data_ptr<float>();
    }
    if (flags.has_groups) {
      const at::Tensor& g = group_coefs[t];
      TORCH_CHECK(g.dim() == 2 && g.size(0) == 2 && g.size(1) > 0, "sparsetrain: group_coefs[", t,
                  "] must have shape [2, G] with G > 0, got ", g.sizes());
      check_tensor(g, "group_coefs", t, at::kFloat, g.numel(), device);
      TORCH_CHECK(group_inner[t] > 0, "sparsetrain: group_inner[", t, "] must be positive, got ", group_inner[t]);
      job.group = g.data_ptr<float>();
      job.groups = g.size(1);
      job.inner = group_inner[t];
    }
    job.shard_offset = shard_offsets.empty() ? 0 : shard_offsets[t];
    TORCH_CHECK(job.shard_offset >= 0, "sparsetrain: shard_offsets[", t, "] is negative");
    if (seeds_on_host) job.seed = static_cast<uint64_t>(seeds_cpu.data_ptr<int64_t>()[t]);
    call.dtypes[t] = dtype;
  }
  return call;
}

}  // namespace sparsetrain
