// The CPU driver: one fused pass over all tensors of a call.
//
// The elements of every tensor are cut into chunks of CHUNK_WORDS mask words (65536 elements; the
// last chunk of a tensor may be shorter, an empty tensor has one empty chunk). at::parallel_for
// hands chunks to threads; each chunk walks its mask words, skips dead words without touching their
// elements, runs the element contract (element.h) on the 32 elements of each live word in fixed-size
// loops the compiler vectorizes, and writes its own partial statistics. The partials of a tensor are
// then added in chunk order: statistics (and everything else) do not depend on the thread count.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <array>

#include "driver.h"

namespace sparsetrain {
namespace {

constexpr int64_t CHUNK_WORDS = 2048;
constexpr int LANES = 8;
constexpr int BLOCK_WORDS = 8;  // words handled together: the element loops run over 256 elements
constexpr int BLOCK = BLOCK_WORDS * 32;  // independent fp64 accumulators per statistic (fixed order, vectorizable)

struct Partials {
  double v[NUM_PARTIALS];
};

// Uniforms of the 32 elements whose global indices start at `first`: 8 Philox calls side by side
// when `first` is a multiple of 4, else one call per element.
inline void uniforms32(uint64_t seed, uint64_t first, float* u) {
  if ((first & 3) != 0) {
    for (int k = 0; k < 32; ++k) u[k] = uniform_at(seed, first + k);
    return;
  }
  uint32_t c0[8], c1[8], c2[8], c3[8];
  const uint64_t quad = first >> 2;
  for (int j = 0; j < 8; ++j) {
    c0[j] = static_cast<uint32_t>(quad + j);
    c1[j] = static_cast<uint32_t>((quad + j) >> 32);
    c2[j] = 0;
    c3[j] = 0;
  }
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (uint32_t round = 0; round < 10; ++round) {
    const uint32_t rk0 = k0 + round * PHILOX_KEY_A, rk1 = k1 + round * PHILOX_KEY_B;
    for (int j = 0; j < 8; ++j) philox_round(c0[j], c1[j], c2[j], c3[j], rk0, rk1);
  }
  for (int j = 0; j < 8; ++j) {
    u[4 * j + 0] = uniform(c0[j]);
    u[4 * j + 1] = uniform(c1[j]);
    u[4 * j + 2] = uniform(c2[j]);
    u[4 * j + 3] = uniform(c3[j]);
  }
}

// Words [word_begin, word_end) of one tensor. ADAM and PRUNE are compile-time so that the element
// loop has no switch in it; the remaining flags are loop-invariant.
template <typename T, bool ADAM, int PRUNE>
__attribute__((target_clones("avx2", "default"))) Partials run_chunk(Flags f, const TensorScalars& s, const TensorJob& job, int64_t word_begin, int64_t word_end) {
  f.adam = ADAM;
  f.prune = PRUNE;
  T* param = static_cast<T*>(job.param);
  const T* grad = static_cast<const T*>(job.grad);
  const bool draw = PRUNE == PRUNE_STOCHASTIC && s.sample;
  const bool kernel_on = f.has_stats && s.kernel_on;
  int64_t alive = 0;
  double sum_w[LANES] = {}, sum_kernel[LANES] = {}, sum_g[LANES] = {};
  for (int64_t block = word_begin; block < word_end; block += BLOCK_WORDS) {
    const int words = static_cast<int>(std::min<int64_t>(BLOCK_WORDS, word_end - block));
    const int64_t base = block * 32;
    const int n = static_cast<int>(std::min<int64_t>(BLOCK, job.numel - base));
    uint32_t bits[BLOCK_WORDS] = {};
    uint32_t any = 0;
    for (int i = 0; i < words; ++i) {
      bits[i] = f.has_mask ? static_cast<uint32_t>(job.mask[block + i]) : 0xffffffffu;
      const int inside = n - 32 * i;  // elements of word i inside the tensor
      if (inside < 32) bits[i] &= inside > 0 ? (1u << inside) - 1u : 0u;
      any |= bits[i];
    }
    if (any == 0) continue;  // dead words: their elements are neither read nor written
    // per-element flags as int32 (bool arrays keep GCC from vectorizing the selects); a tail block
    // zero-fills past the end so that every loop runs over the whole block
    alignas(64) float w[BLOCK], g[BLOCK], st[3][BLOCK], lam[BLOCK], u[BLOCK], nw[BLOCK];
    alignas(64) int32_t live[BLOCK], flagged[BLOCK], keep[BLOCK];
    for (int k = 0; k < BLOCK; ++k) live[k] = static_cast<int32_t>((bits[k / 32] >> (k % 32)) & 1u);
    if (n < BLOCK) {
      for (int k = n; k < BLOCK; ++k) w[k] = g[k] = st[0][k] = st[1][k] = st[2][k] = 0.0f;
    }
    for (int k = 0; k < n; ++k) {
      w[k] = static_cast<float>(param[base + k]);
      g[k] = static_cast<float>(grad[base + k]);
    }
    for (int i = 0; i < 3; ++i) {
      if (job.state[i] != nullptr) {
        for (int k = 0; k < n; ++k) st[i][k] = job.state[i][base + k];
      } else if (n == BLOCK) {
        for (int k = 0; k < BLOCK; ++k) st[i][k] = 0.0f;
      }
    }
    if (f.has_groups) {
      for (int k = 0; k < BLOCK; ++k) {
        const int64_t j = group_index(job.shard_offset + base + std::min(k, n - 1), job.inner, job.groups);
        lam[k] = job.group[j];
        flagged[k] = job.group[job.groups + j] != 0.0f ? 1 : 0;
      }
    } else {
      for (int k = 0; k < BLOCK; ++k) {
        lam[k] = 0.0f;
        flagged[k] = 0;
      }
    }
    if (draw) {
      for (int i = 0; i < BLOCK / 32; ++i) uniforms32(job.seed, static_cast<uint64_t>(job.shard_offset + base + 32 * i), u + 32 * i);
    } else {
      for (int k = 0; k < BLOCK; ++k) u[k] = 0.0f;
    }
#pragma omp simd
    for (int k = 0; k < BLOCK; ++k) {
      float wk = w[k], a = st[0][k], b = st[1][k], c = st[2][k];
      keep[k] = static_cast<int32_t>(step_element<PRUNE>(f, s, wk, g[k], a, b, c, lam[k], flagged[k] != 0, u[k])) & live[k];
      nw[k] = wk;
      st[0][k] = a;
      st[1][k] = b;
      st[2][k] = c;
    }
    // writes: live elements get their new values (zero when pruned now), dead ones keep theirs
#pragma omp simd
    for (int k = 0; k < n; ++k) {  // unconditional stores of selects: vectorizable
      const T raw = param[base + k];
      param[base + k] = live[k] != 0 ? static_cast<T>(nw[k]) : raw;
    }
    for (int i = 0; i < 3; ++i) {
      float* state = job.state[i];
      if (state == nullptr) continue;
#pragma omp simd
      for (int k = 0; k < n; ++k) {
        const float raw = state[base + k];
        state[base + k] = live[k] != 0 ? st[i][k] : raw;
      }
    }
    for (int i = 0; i < words; ++i) {
      uint32_t keep_bits = 0;
      for (int k = 0; k < 32; ++k) keep_bits |= static_cast<uint32_t>(keep[32 * i + k]) << k;
      if (f.has_mask && bits[i] != 0) job.mask[block + i] = static_cast<int32_t>(keep_bits);
      alive += __builtin_popcount(keep_bits);
    }
    if (f.has_stats) {  // float terms selected first (one vector width), then added in fp64
      alignas(64) float abs_w[BLOCK], abs_g[BLOCK], kernel[BLOCK];
#pragma omp simd
      for (int k = 0; k < BLOCK; ++k) {
        abs_w[k] = keep[k] != 0 ? fabs_(nw[k]) : 0.0f;
        abs_g[k] = keep[k] != 0 ? fabs_(g[k]) : 0.0f;
      }
      for (int k = 0; k < BLOCK; k += LANES) {
#pragma omp simd
        for (int j = 0; j < LANES; ++j) {
          sum_w[j] += static_cast<double>(abs_w[k + j]);
          sum_g[j] += static_cast<double>(abs_g[k + j]);
        }
      }
      if (kernel_on) {
#pragma omp simd
        for (int k = 0; k < BLOCK; ++k) kernel[k] = keep[k] != 0 ? kernel_term(s, nw[k]) : 0.0f;
        for (int k = 0; k < BLOCK; k += LANES) {
#pragma omp simd
          for (int j = 0; j < LANES; ++j) sum_kernel[j] += static_cast<double>(kernel[k + j]);
        }
      }
    }
  }
  Partials out{};
  out.v[STAT_ALIVE] = static_cast<double>(alive);
  for (int j = 0; j < LANES; ++j) {
    out.v[STAT_SUM_ABS_W] += sum_w[j];
    out.v[STAT_SUM_KERNEL] += sum_kernel[j];
    out.v[STAT_SUM_ABS_G] += sum_g[j];
  }
  return out;
}

using ChunkFn = Partials (*)(Flags, const TensorScalars&, const TensorJob&, int64_t, int64_t);

template <typename T, bool ADAM>
ChunkFn pick_prune(int prune) {
  switch (prune) {
    case PRUNE_STOCHASTIC:
      return &run_chunk<T, ADAM, PRUNE_STOCHASTIC>;
    case PRUNE_LOW:
      return &run_chunk<T, ADAM, PRUNE_LOW>;
    case PRUNE_HIGH:
      return &run_chunk<T, ADAM, PRUNE_HIGH>;
    case PRUNE_GROUP:
      return &run_chunk<T, ADAM, PRUNE_GROUP>;
    default:
      return &run_chunk<T, ADAM, PRUNE_NONE>;
  }
}

template <typename T>
ChunkFn pick(const Flags& f) {
  return f.adam ? pick_prune<T, true>(f.prune) : pick_prune<T, false>(f.prune);
}

ChunkFn pick(const Flags& f, at::ScalarType dtype) {
  switch (dtype) {
    case at::kBFloat16:
      return pick<c10::BFloat16>(f);
    case at::kHalf:
      return pick<c10::Half>(f);
    default:
      return pick<float>(f);
  }
}

void run(Call& call) {
  const Flags& f = call.flags;
  if (call.found_inf != nullptr && call.found_inf->item<double>() != 0.0) return;  // a skipped step
  const bool lr_on_device = call.lr_tensor != nullptr;
  const double lr = lr_on_device ? call.lr_tensor->item<double>() : call.hyper.lr;
  const size_t n = call.jobs.size();
  std::vector<TensorScalars> scalars(n);
  std::vector<ChunkFn> fns(n);
  std::vector<int64_t> first_chunk(n + 1, 0);
  for (size_t t = 0; t < n; ++t) {
    const TensorJob& job = call.jobs[t];
    scalars[t] = prepare_tensor(f, call.hyper, lr, lr_on_device, job.coefs, job.stats, *job.step);
    fns[t] = pick(f, call.dtypes[t]);
    const int64_t words = (job.numel + 31) / 32;
    first_chunk[t + 1] = first_chunk[t] + std::max<int64_t>(1, (words + CHUNK_WORDS - 1) / CHUNK_WORDS);
  }
  const int64_t num_chunks = first_chunk[n];
  std::vector<int32_t> chunk_tensor(num_chunks);
  for (size_t t = 0; t < n; ++t) {
    std::fill(chunk_tensor.begin() + first_chunk[t], chunk_tensor.begin() + first_chunk[t + 1],
              static_cast<int32_t>(t));
  }
  std::vector<Partials> partials(num_chunks);
  at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int32_t t = chunk_tensor[c];
      const TensorJob& job = call.jobs[t];
      const int64_t words = (job.numel + 31) / 32;
      const int64_t first_word = (c - first_chunk[t]) * CHUNK_WORDS;
      const int64_t last_word = std::min(words, first_word + CHUNK_WORDS);
      partials[c] = fns[t](f, scalars[t], job, first_word, last_word);
    }
  });
  for (size_t t = 0; t < n; ++t) {  // fixed-order combine, then this step's scale and the step count
    const TensorJob& job = call.jobs[t];
    if (f.has_stats) {
      double sums[NUM_PARTIALS] = {};
      for (int64_t c = first_chunk[t]; c < first_chunk[t + 1]; ++c) {
        for (int i = 0; i < NUM_PARTIALS; ++i) sums[i] += partials[c].v[i];
      }
      for (int i = 0; i < NUM_PARTIALS; ++i) job.stats[i] = sums[i];
      job.stats[STAT_TM] = scalars[t].tm_now;
    }
    *job.step = scalars[t].step;
  }
}

void check_cpu(const Call& call, at::TensorList params, const at::Tensor& seeds) {
  for (size_t t = 0; t < params.size(); ++t) {
    TORCH_CHECK(params[t].is_cpu(), "sparsetrain: the CPU driver got params[", t, "] on ", params[t].device());
  }
  TORCH_CHECK(call.lr_tensor == nullptr || call.lr_tensor->numel() == 1, "sparsetrain: lr_tensor must hold one value");
  TORCH_CHECK(call.found_inf == nullptr || call.found_inf->numel() == 1, "sparsetrain: found_inf must hold one value");
  TORCH_CHECK(call.flags.prune != PRUNE_STOCHASTIC || seeds.is_cpu(), "sparsetrain: seeds must be on the CPU");
}

void sgd_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                  at::TensorList steps, at::TensorList mask_words, at::TensorList stats,
                  at::TensorList tensor_coefs, at::TensorList group_coefs, at::IntArrayRef group_inner,
                  at::IntArrayRef shard_offsets, const at::Tensor& seeds, const c10::optional<at::Tensor>& found_inf,
                  double lr, const c10::optional<at::Tensor>& lr_tensor, double weight_decay, double momentum,
                  double dampening, bool nesterov, bool maximize, int64_t prune, bool regularize, bool l1_proximal) {
  Flags f{};
  f.adam = false;
  f.momentum = momentum != 0.0;
  f.nesterov = nesterov;
  f.maximize = maximize;
  f.prune = static_cast<int>(prune);
  f.regularize = regularize;
  f.l1_proximal = l1_proximal;
  const Hyper h{lr, weight_decay, momentum, dampening, 0.0, 0.0, 0.0};
  Call call = unpack(params, grads, {momentum_buffers}, {f.momentum}, steps, mask_words, stats, tensor_coefs,
                     group_coefs, group_inner, shard_offsets, seeds, found_inf, lr_tensor, f, h);
  check_cpu(call, params, seeds);
  run(call);
}

void adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                   at::TensorList max_exp_avg_sqs, at::TensorList steps, at::TensorList mask_words,
                   at::TensorList stats, at::TensorList tensor_coefs, at::TensorList group_coefs,
                   at::IntArrayRef group_inner, at::IntArrayRef shard_offsets, const at::Tensor& seeds,
                   const c10::optional<at::Tensor>& found_inf, double lr, const c10::optional<at::Tensor>& lr_tensor,
                   double beta1, double beta2, double eps, double weight_decay, bool decoupled, bool amsgrad,
                   bool maximize, int64_t prune, bool regularize, bool l1_proximal) {
  Flags f{};
  f.adam = true;
  f.decoupled = decoupled;
  f.amsgrad = amsgrad;
  f.maximize = maximize;
  f.prune = static_cast<int>(prune);
  f.regularize = regularize;
  f.l1_proximal = l1_proximal;
  const Hyper h{lr, weight_decay, 0.0, 0.0, beta1, beta2, eps};
  Call call = unpack(params, grads, {exp_avgs, exp_avg_sqs, max_exp_avg_sqs}, {true, true, amsgrad}, steps,
                     mask_words, stats, tensor_coefs, group_coefs, group_inner, shard_offsets, seeds, found_inf,
                     lr_tensor, f, h);
  check_cpu(call, params, seeds);
  run(call);
}

}  // namespace
}  // namespace sparsetrain

TORCH_LIBRARY_IMPL(sparsetrain_native, CPU, m) {
  m.impl("sgd_step_", &sparsetrain::sgd_step_cpu);
  m.impl("adam_step_", &sparsetrain::adam_step_cpu);
}
