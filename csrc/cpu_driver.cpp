// The CPU driver: one fused pass over all tensors of a call.
//
// The elements of every tensor are cut into chunks of CHUNK_WORDS mask words (65536 elements; the
// last chunk of a tensor may be shorter, an empty tensor has one empty chunk). at::parallel_for
// hands chunks to threads; each chunk walks its mask words, skips dead words without touching their
// elements, runs the element contract (element.h) on the 32 elements of each live word in fixed-size
// loops the compiler vectorizes, and writes its own partial statistics. The partials of a tensor are
// then added in chunk order: statistics (and everything else) do not depend on the thread count.
// A sampling event draws its uniforms and lists its candidates with cpu_simd.h's kernels.
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu_simd.h"
#include "driver.h"

namespace sparsetrain {
namespace {

constexpr int64_t CHUNK_WORDS = 2048;
// lanes of the fp64 statistics sums (two AVX-512 vectors): a block's terms go to lane k mod
// STAT_LANES, a chunk's lanes are added in lane order at its end
constexpr int STAT_LANES = 16;
constexpr int BLOCK_WORDS = 8;  // words handled together: the element loops run over 256 elements
constexpr int BLOCK = BLOCK_WORDS * 32;
#define ST_INLINE inline __attribute__((always_inline))

struct Partials {
  double v[NUM_PARTIALS];
};

// The versions of cpu_simd.h this CPU runs best.
const UniformsFn draw_block = pick_uniforms();
const QuadsFn draw_quads = pick_quads();
const CandidatesFn list_candidates = pick_candidates();

// Uniforms of the BLOCK elements whose global indices start at `first`, for the live elements
// (bits: the block's live bits, num_live of them); the entries of dead elements are left as they are (never read).
// The stream is position-keyed, so only the Philox calls of quads with a live element are made:
// when at most QUAD_DENSE_LIMIT of the block's 64 quads are live (sparse masks), those quads alone,
// else the whole block at once. A shard that starts inside a Philox call takes the aligned blocks
// around its own and the slice between.
constexpr int QUAD_DENSE_LIMIT = 32;
static_assert(BLOCK == SIMD_BLOCK, "a block of the driver is one block of cpu_simd.h");
inline void uniforms_block(uint64_t seed, uint64_t first, const uint32_t* bits, int num_live, float* __restrict u) {
  const int skip = static_cast<int>(first & 3);
  if (skip != 0) {
    alignas(64) float both[2 * SIMD_BLOCK];
    draw_block(seed, first - skip, both);
    draw_block(seed, first - skip + SIMD_BLOCK, both + SIMD_BLOCK);
    for (int k = 0; k < SIMD_BLOCK; ++k) u[k] = both[skip + k];
    return;
  }
  // more than 3/8 of the block live: more than QUAD_DENSE_LIMIT - 8 quads live, and with random
  // masks many more; the whole block is drawn without listing its quads (the live elements get the
  // same uniforms either way)
  if (num_live > 3 * BLOCK / 8) {
    draw_block(seed, first, u);
    return;
  }
  // bit 8i + j: quad j of word i has a live element
  uint64_t quad_mask = 0;
  for (int i = 0; i < BLOCK_WORDS; ++i) {
    const uint32_t w = bits[i];
    const uint32_t x = w | (w >> 1) | (w >> 2) | (w >> 3);
    for (int j = 0; j < 8; ++j) quad_mask |= static_cast<uint64_t>((x >> (4 * j)) & 1u) << (8 * i + j);
  }
  if (__builtin_popcountll(quad_mask) > QUAD_DENSE_LIMIT) {
    draw_block(seed, first, u);
    return;
  }
  if (quad_mask != 0) draw_quads(seed, first >> 2, quad_mask, u);
}

// The statistics terms of a decided block of n elements (keep[k]: the element stays) in fp64, only
// the sums the step computes (W: |w|, G: |g|, kernel_on: the sampling kernel term) of each kept
// element go to lane k mod STAT_LANES, each lane in element order (the same lanes and order for the
// short last block of a tensor). The loads are unconditional: a select, not a branch, keeps the
// loops vectorized.
template <bool W, bool G>
ST_INLINE void add_stats(const TensorScalars& s, bool kernel_on, int n, const float* __restrict pw,
                         const float* __restrict pg, const int32_t* __restrict keep, double* __restrict sum_w,
                         double* __restrict sum_g, double* __restrict sum_kernel) {
  if (n == BLOCK) {
    if (kernel_on) {  // one pass over the block for every sum (each lane's terms in the same order)
      for (int k0 = 0; k0 < BLOCK; k0 += STAT_LANES) {
#pragma omp simd
        for (int j = 0; j < STAT_LANES; ++j) {
          const bool on = keep[k0 + j] != 0;
          const float w = pw[k0 + j];
          if (W) sum_w[j] += static_cast<double>(on ? fabs_(w) : 0.0f);
          if (G) sum_g[j] += static_cast<double>(on ? fabs_(pg[k0 + j]) : 0.0f);
          const float term = kernel_term(s, w);  // computed for every element, then selected
          sum_kernel[j] += static_cast<double>(on ? term : 0.0f);
        }
      }
    } else if (W || G) {
      for (int k0 = 0; k0 < BLOCK; k0 += STAT_LANES) {
#pragma omp simd
        for (int j = 0; j < STAT_LANES; ++j) {
          const bool on = keep[k0 + j] != 0;
          if (W) sum_w[j] += static_cast<double>(on ? fabs_(pw[k0 + j]) : 0.0f);
          if (G) sum_g[j] += static_cast<double>(on ? fabs_(pg[k0 + j]) : 0.0f);
        }
      }
    }
    return;
  }
  for (int k = 0; k < n; ++k) {
    const int j = k % STAT_LANES;
    const bool on = keep[k] != 0;
    if (W) sum_w[j] += static_cast<double>(on ? fabs_(pw[k]) : 0.0f);
    if (G) sum_g[j] += static_cast<double>(on ? fabs_(pg[k]) : 0.0f);
    if (kernel_on) sum_kernel[j] += static_cast<double>(on ? kernel_term(s, pw[k]) : 0.0f);
  }
}

ST_INLINE void add_stats(int bits, const TensorScalars& s, bool kernel_on, int n, const float* __restrict pw,
                         const float* __restrict pg, const int32_t* __restrict keep, double* __restrict sum_w,
                         double* __restrict sum_g, double* __restrict sum_kernel) {
  const bool w = (bits & STATS_SUM_ABS_W) != 0, g = (bits & STATS_SUM_ABS_G) != 0;
  if (w && g) {
    add_stats<true, true>(s, kernel_on, n, pw, pg, keep, sum_w, sum_g, sum_kernel);
  } else if (w) {
    add_stats<true, false>(s, kernel_on, n, pw, pg, keep, sum_w, sum_g, sum_kernel);
  } else if (g) {
    add_stats<false, true>(s, kernel_on, n, pw, pg, keep, sum_w, sum_g, sum_kernel);
  } else {
    add_stats<false, false>(s, kernel_on, n, pw, pg, keep, sum_w, sum_g, sum_kernel);
  }
}

// bf16 / fp16 parameters: the live elements' float copies back, once their block is decided.
template <typename T>
ST_INLINE void store_back(int n, const uint32_t* bits, const float* wbuf, T* param) {
  if constexpr (!std::is_same<T, float>::value) {
    for (int k = 0; k < n; ++k) {
      if (((bits[k >> 5] >> (k & 31)) & 1u) != 0) param[k] = static_cast<T>(wbuf[k]);
    }
  }
}

constexpr int DECIDE_PAD = 16;

// The stochastic decisions of nc candidates (cw: updated weights, cu: uniforms; room for DECIDE_PAD
// more) in whole vectors: ck[j] = 1 where candidate j is kept (the padding is kept).
ST_INLINE void decide_in_vectors(const Flags& f, const TensorScalars& s, int nc, float* __restrict cw,
                                 float* __restrict cu, int32_t* __restrict ck) {
  for (int j = nc; j < nc + DECIDE_PAD; ++j) {
    cw[j] = 0.0f;
    cu[j] = 1.0f;
  }
  for (int j0 = 0; j0 < nc; j0 += DECIDE_PAD) {
#pragma omp simd
    for (int j = j0; j < j0 + DECIDE_PAD; ++j) ck[j] = keep_element<PRUNE_STOCHASTIC>(f, s, cw[j], cu[j], false);
  }
}

// The deferred stochastic decisions of a sampling event that writes no statistics: the candidates
// of many blocks (pos: element offsets from `first`, w: updated weights, u: uniforms; nc of them,
// room for DECIDE_PAD more) are decided together, in whole vectors, and the pruned ones zeroed
// (parameter, states, mask bit) after their blocks were written. Nothing else of those blocks reads
// the decision, so the result is the one a decision inside each block gives. Returns how many were pruned.
template <int STATES>
ST_INLINE int decide_candidates(const Flags& f, const TensorScalars& s, const TensorJob& job, int64_t first, int nc,
                                float* __restrict cw, float* __restrict cu, int32_t* __restrict ck,
                                int32_t* __restrict pos) {
  decide_in_vectors(f, s, nc, cw, cu, ck);
  int np = 0;  // the pruned ones, listed in place, without a branch per candidate
  for (int j = 0; j < nc; ++j) {
    pos[np] = pos[j];
    np += ck[j] ^ 1;
  }
  float* __restrict param = static_cast<float*>(job.param);
  for (int j = 0; j < np; ++j) {  // as the element contract leaves a pruned element
    const int64_t e = first + pos[j];
    param[e] = 0.0f;
    if (STATES >= 1) job.state[0][e] = 0.0f;
    if (STATES >= 2) job.state[1][e] = 0.0f;
    if (STATES >= 3) job.state[2][e] = 0.0f;
    if (f.has_mask) job.mask[e >> 5] &= static_cast<int32_t>(~(1u << (e & 31)));
  }
  return np;
}

// Words [word_begin, word_end) of one tensor. Compile-time: the parameter type, the number of
// optimizer states (SGD: 0 without momentum, 1 with; Adam: 2, 3 with AMSGrad) and the prune mode,
// so that the element loop has no switch and no null state pointer in it; the remaining flags are
// loop-invariant selects. Each block of 256 elements is one fused loop that reads the parameter,
// gradient and states once, runs the element contract and stores every element back (dead ones
// with their own value); then the decisions taken after the loop (stochastic, N:M), the block's
// keep bits (mask words, alive count by popcount) and, when this step writes statistics, one pass
// that adds the kept elements' terms to fixed fp64 lanes (add_stats).
// TRACK: this step decides (a prune mode that decides every step, or a sampling event) or computes
// statistics. Without it a step changes no mask bit and computes no statistic: the element loop is a
// pure streaming loop, without the keep bits and the mask stores. The keep bits of the modes that
// keep every live element in the loop (none, stochastic, N:M) start as the live bits; only the
// elements a later decision prunes clear theirs.
template <typename T, int STATES, int PRUNE, bool TRACK>
__attribute__((target_clones("arch=x86-64-v4", "avx2", "default"))) Partials run_chunk(Flags f, const TensorScalars& s,
                                                                      const TensorJob& job, int64_t word_begin,
                                                                      int64_t word_end) {
  constexpr bool ADAM = STATES >= 2;
  // the modes whose decision the element loop takes (the others keep every live element there)
  constexpr bool LOOP_DECIDES = PRUNE == PRUNE_LOW || PRUNE == PRUNE_HIGH || PRUNE == PRUNE_GROUP;
  f.adam = ADAM;
  f.prune = PRUNE;
  f.momentum = STATES == 1 || ADAM;
  f.amsgrad = STATES == 3;
  T* __restrict param = static_cast<T*>(job.param);
  const T* __restrict grad = static_cast<const T*>(job.grad);
  float* __restrict st0 = job.state[0];
  float* __restrict st1 = job.state[1];
  float* __restrict st2 = job.state[2];
  const bool draw = TRACK && PRUNE == PRUNE_STOCHASTIC && s.sample;
  const bool has_stats = TRACK && f.has_stats && f.stats_out != 0;
  const bool kernel_on = has_stats && (f.stats_out & STATS_SUM_KERNEL) != 0 && s.kernel_on;
  const bool groups = f.has_groups;
  int64_t alive = 0;
  // lane j of a sum adds the terms of the elements k = j mod STAT_LANES of each block, in order
  alignas(64) double sum_w[STAT_LANES] = {}, sum_kernel[STAT_LANES] = {}, sum_g[STAT_LANES] = {};
  alignas(64) float lam[BLOCK], u[BLOCK];
  alignas(64) int32_t flagged[BLOCK];
  for (int k = 0; k < BLOCK; ++k) {
    lam[k] = 0.0f;
    u[k] = 0.0f;
    flagged[k] = 0;
  }
  // a sampling event without statistics on fp32 parameters defers its decisions (decide_candidates)
  // until DEFER_CAP candidates are held or the chunk ends
  constexpr bool MAY_DEFER = TRACK && PRUNE == PRUNE_STOCHASTIC && std::is_same<T, float>::value;
  constexpr int DEFER_CAP = MAY_DEFER ? 2048 : 0;
  const bool defer = MAY_DEFER && draw && !has_stats;
  const int64_t chunk_first = word_begin * 32;
  alignas(64) float dw[DEFER_CAP + DECIDE_PAD], du[DEFER_CAP + DECIDE_PAD];
  alignas(64) int32_t dk[DEFER_CAP + DECIDE_PAD], dpos[DEFER_CAP + COMPACT_SLACK];
  int nd = 0;
  // the keep bits are the live bits when no decision is taken inside a block: the mask words then
  // change only where the bits past a tensor's end are cleared
  const bool keeps_live = !TRACK || (!LOOP_DECIDES && PRUNE != PRUNE_NM && !(draw && !defer));
  for (int64_t block = word_begin; block < word_end; block += BLOCK_WORDS) {
    const int words = static_cast<int>(std::min<int64_t>(BLOCK_WORDS, word_end - block));
    const int64_t base = block * 32;
    const int n = static_cast<int>(std::min<int64_t>(BLOCK, job.numel - base));
    uint32_t bits[BLOCK_WORDS] = {};
    int num_live = 0;
    for (int i = 0; i < words; ++i) {
      bits[i] = f.has_mask ? static_cast<uint32_t>(job.mask[block + i]) : 0xffffffffu;
      const int inside = n - 32 * i;  // elements of word i inside the tensor
      if (inside < 32) {
        bits[i] &= inside > 0 ? (1u << inside) - 1u : 0u;
        // the word as a deciding block stores it: bits past the end cleared
        if (keeps_live && f.has_mask && bits[i] != 0) job.mask[block + i] = static_cast<int32_t>(bits[i]);
      }
      num_live += __builtin_popcount(bits[i]);
    }
    if (num_live == 0) continue;  // dead words: their elements are neither read nor written
    if (groups) {
      for (int k = 0; k < n; ++k) {
        const int64_t j = group_index(job.shard_offset + base + k, job.inner, job.groups);
        lam[k] = job.group[j];
        flagged[k] = job.group[job.groups + j] != 0.0f ? 1 : 0;
      }
    }
    if (draw) {
      uniforms_block(job.seed, static_cast<uint64_t>(job.shard_offset + base), bits, num_live, u);
    }
    // live[k]: element k is live; once the block is decided, that it stays (its keep bit)
    alignas(64) int32_t live[BLOCK];
    for (int i = 0; i < BLOCK_WORDS; ++i) {  // word by word: one broadcast word and shifts, no gather
      const uint32_t word = bits[i];
      for (int j = 0; j < 32; ++j) live[32 * i + j] = static_cast<int32_t>((word >> j) & 1u);
    }
    // fp32 parameters are read and written in place; bf16 / fp16 ones go through float copies
    // (their conversions do not vectorize, the element loop then does)
    constexpr bool F32 = std::is_same<T, float>::value;
    alignas(64) float wbuf[F32 ? 1 : BLOCK], gbuf[F32 ? 1 : BLOCK];
    float* __restrict pw;
    const float* __restrict pg;
    if constexpr (F32) {
      pw = param + base;
      pg = grad + base;
    } else {
      for (int k = 0; k < n; ++k) {
        wbuf[k] = static_cast<float>(param[base + k]);
        gbuf[k] = static_cast<float>(grad[base + k]);
      }
      pw = wbuf;
      pg = gbuf;
    }
    float* __restrict s0 = st0 + base;
    float* __restrict s1 = st1 + base;
    float* __restrict s2 = st2 + base;
    // The stochastic decision is taken after the loop, on the few elements that can be pruned: the
    // loop keeps every live element (it is the loop of a step without decisions), and the candidates
    // are the live elements whose uniform is not at least the sampling constant c. Any other element
    // is kept by the decision: its probability min(c * exp_(x), 1) with x <= 0 is at most c, since
    // exp_ of a non-positive float is at most 1 (or it is NaN, which prunes nothing).
    constexpr int LOOP_PRUNE = PRUNE == PRUNE_STOCHASTIC ? PRUNE_NONE : PRUNE;
#pragma omp simd
    for (int k = 0; k < n; ++k) {
      const float w_old = pw[k];
      const float g = pg[k];
      const float a_old = STATES >= 1 ? s0[k] : 0.0f;
      const float b_old = STATES >= 2 ? s1[k] : 0.0f;
      const float c_old = STATES >= 3 ? s2[k] : 0.0f;
      float w = w_old, a = a_old, b = b_old, c = c_old;
      const bool kept = step_element<LOOP_PRUNE>(f, s, w, g, a, b, c, lam[k], flagged[k] != 0, u[k]);
      (void)kept;  // read only where the loop decides
      const bool on = live[k] != 0;
      pw[k] = on ? w : w_old;  // dead elements are stored back unchanged
      if (STATES >= 1) s0[k] = on ? a : a_old;
      if (STATES >= 2) s1[k] = on ? b : b_old;
      if (STATES >= 3) s2[k] = on ? c : c_old;
      if constexpr (TRACK && LOOP_DECIDES) live[k] = live[k] & static_cast<int32_t>(kept);  // the keep bit
    }
    if constexpr (!TRACK) {
      store_back(n, bits, wbuf, param + base);
      continue;
    }
    // keep bits: the live bits, less what the loop pruned (LOOP_DECIDES) or the decisions below prune
    uint32_t kw[BLOCK_WORDS];
    for (int i = 0; i < BLOCK_WORDS; ++i) {
      if constexpr (LOOP_DECIDES) {
        uint32_t word = 0;
        for (int k = 0; k < 32; ++k) word |= static_cast<uint32_t>(live[32 * i + k]) << k;
        kw[i] = word;
      } else {
        kw[i] = bits[i];
      }
    }
    if constexpr (MAY_DEFER) {
      if (defer) {
        if (nd + BLOCK > DEFER_CAP) {
          alive -= decide_candidates<STATES>(f, s, job, chunk_first, nd, dw, du, dk, dpos);
          nd = 0;
        }
        const int32_t rel = static_cast<int32_t>(base - chunk_first);
        const int nc = list_candidates(u, s.sample_c, bits, rel, dpos + nd);
        for (int j = nd; j < nd + nc; ++j) {
          const int k = dpos[j] - rel;
          dw[j] = pw[k];
          du[j] = u[k];
        }
        nd += nc;
      }
    }
    if constexpr (PRUNE == PRUNE_STOCHASTIC) {
      if (draw && !defer) {
        alignas(64) int32_t where[BLOCK + COMPACT_SLACK];
        alignas(64) float cw[BLOCK + DECIDE_PAD], cu[BLOCK + DECIDE_PAD];
        alignas(64) int32_t ck[BLOCK + DECIDE_PAD];
        const int nc = list_candidates(u, s.sample_c, bits, 0, where);
        for (int j = 0; j < nc; ++j) {
          cw[j] = pw[where[j]];
          cu[j] = u[where[j]];
        }
        decide_in_vectors(f, s, nc, cw, cu, ck);
        for (int j = 0; j < nc; ++j) {  // without a branch on the decision: zeroed by masks
          const int k = where[j];
          const uint32_t m = 0u - static_cast<uint32_t>(ck[j]);
          pw[k] = bits_float(float_bits(pw[k]) & m);
          if (STATES >= 1) s0[k] = bits_float(float_bits(s0[k]) & m);
          if (STATES >= 2) s1[k] = bits_float(float_bits(s1[k]) & m);
          if (STATES >= 3) s2[k] = bits_float(float_bits(s2[k]) & m);
          kw[k >> 5] &= ~(static_cast<uint32_t>(ck[j] ^ 1) << (k & 31));
          live[k] &= ck[j];
        }
      }
    }
    if constexpr (PRUNE == PRUNE_NM) {  // n is a multiple of M: groups never straddle a block (nor a word)
      const int m = s.nm_m, nn = s.nm_n;
      const uint32_t group_bits = m == 32 ? 0xffffffffu : (1u << m) - 1u;
      for (int g0 = 0; g0 < n; g0 += m) {
        float a[32];
        const uint32_t lv = (kw[g0 >> 5] >> (g0 & 31)) & group_bits;
        for (int j = 0; j < m; ++j) a[j] = fabs_(pw[g0 + j]);
        const uint32_t kb = nm_group_keep(a, lv, nn, m);
        if (kb == lv) continue;
        kw[g0 >> 5] &= ~((lv & ~kb) << (g0 & 31));
        for (int j = 0; j < m; ++j) {
          if (((lv & ~kb) >> j) & 1u) {  // pruned as step_element leaves a pruned element
            const int k = g0 + j;
            pw[k] = 0.0f;
            if (STATES >= 1) s0[k] = 0.0f;
            if (STATES >= 2) s1[k] = 0.0f;
            if (STATES >= 3) s2[k] = 0.0f;
            live[k] = 0;
          }
        }
      }
    }
    store_back(n, bits, wbuf, param + base);
    if (keeps_live) {
      alive += num_live;
    } else {
      for (int i = 0; i < words; ++i) {
        if (f.has_mask && bits[i] != 0 && static_cast<uint32_t>(job.mask[block + i]) != kw[i]) {
          job.mask[block + i] = static_cast<int32_t>(kw[i]);
        }
        alive += __builtin_popcount(kw[i]);
      }
    }
    if (has_stats) add_stats(f.stats_out, s, kernel_on, n, pw, pg, live, sum_w, sum_g, sum_kernel);
  }
  if constexpr (MAY_DEFER) {
    if (nd > 0) alive -= decide_candidates<STATES>(f, s, job, chunk_first, nd, dw, du, dk, dpos);
  }
  Partials out{};
  out.v[STAT_ALIVE] = has_stats && (f.stats_out & STATS_ALIVE) != 0 ? static_cast<double>(alive) : 0.0;
  for (int j = 0; j < STAT_LANES; ++j) {
    out.v[STAT_SUM_ABS_W] += sum_w[j];
    out.v[STAT_SUM_KERNEL] += sum_kernel[j];
    out.v[STAT_SUM_ABS_G] += sum_g[j];
  }
  return out;
}

using ChunkFn = Partials (*)(Flags, const TensorScalars&, const TensorJob&, int64_t, int64_t);

// The modes that decide on every step (threshold, group, N:M) are always tracking; none and
// stochastic track only when the chunks compute statistics or a sampling event decides.
template <typename T, int STATES>
ChunkFn pick_prune(int prune, bool track) {
  switch (prune) {
    case PRUNE_STOCHASTIC:
      return track ? &run_chunk<T, STATES, PRUNE_STOCHASTIC, true> : &run_chunk<T, STATES, PRUNE_STOCHASTIC, false>;
    case PRUNE_LOW:
      return &run_chunk<T, STATES, PRUNE_LOW, true>;
    case PRUNE_HIGH:
      return &run_chunk<T, STATES, PRUNE_HIGH, true>;
    case PRUNE_GROUP:
      return &run_chunk<T, STATES, PRUNE_GROUP, true>;
    case PRUNE_NM:
      return &run_chunk<T, STATES, PRUNE_NM, true>;
    default:
      return track ? &run_chunk<T, STATES, PRUNE_NONE, true> : &run_chunk<T, STATES, PRUNE_NONE, false>;
  }
}

template <typename T>
ChunkFn pick(const Flags& f, bool track) {
  if (f.adam) return f.amsgrad ? pick_prune<T, 3>(f.prune, track) : pick_prune<T, 2>(f.prune, track);
  return f.momentum ? pick_prune<T, 1>(f.prune, track) : pick_prune<T, 0>(f.prune, track);
}

// chunk_flags: the flags the chunks run with (has_stats: statistics written by this step, stats_out:
// which).
ChunkFn pick(const Flags& chunk_flags, const TensorScalars& s, at::ScalarType dtype) {
  const bool track = chunk_flags.has_stats || (chunk_flags.prune == PRUNE_STOCHASTIC && s.sample);
  switch (dtype) {
    case at::kBFloat16:
      return pick<c10::BFloat16>(chunk_flags, track);
    case at::kHalf:
      return pick<c10::Half>(chunk_flags, track);
    default:
      return pick<float>(chunk_flags, track);
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
  // the chunks compute the statistics this step writes, only those (the scalars below read the previous ones)
  Flags chunk_flags = f;
  chunk_flags.has_stats = f.has_stats && call.stats_mask != 0;
  chunk_flags.stats_out = chunk_flags.has_stats ? call.stats_mask : 0;
  for (size_t t = 0; t < n; ++t) {
    const TensorJob& job = call.jobs[t];
    scalars[t] = prepare_tensor(f, call.hyper, lr, lr_on_device, job.coefs, job.stats, *job.step);
    if (f.prune == PRUNE_NM) {  // checked for every tensor before any is modified
      const int m = scalars[t].nm_m;
      TORCH_CHECK(m != 0, "sparsetrain: prune='nm' needs an N:M pattern in tensor_coefs[", t,
                  "][COEF_NM] (contract.nm_code(n, m)), got ", job.coefs[COEF_NM]);
      TORCH_CHECK(job.numel % m == 0 && job.shard_offset % m == 0, "sparsetrain: prune='nm' with M=", m,
                  " needs tensors (and shards) whose element count and offset are multiples of M; tensor ", t,
                  " has ", job.numel, " elements at offset ", job.shard_offset);
    }
    fns[t] = pick(chunk_flags, scalars[t], call.dtypes[t]);
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
      partials[c] = fns[t](chunk_flags, scalars[t], job, first_word, last_word);
    }
  });
  for (size_t t = 0; t < n; ++t) {  // fixed-order combine, then this step's scale and the step count
    const TensorJob& job = call.jobs[t];
    if (chunk_flags.has_stats) {
      double sums[NUM_PARTIALS] = {};
      for (int64_t c = first_chunk[t]; c < first_chunk[t + 1]; ++c) {
        for (int i = 0; i < NUM_PARTIALS; ++i) sums[i] += partials[c].v[i];
      }
      for (int i = 0; i < NUM_PARTIALS; ++i) job.stats[i] = sums[i];  // 0 for the statistics not computed
      job.stats[STAT_TM] = (call.stats_mask & STATS_SUM_KERNEL) != 0 ? scalars[t].tm_now : 0.0;
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
                  double dampening, bool nesterov, bool maximize, int64_t prune, bool regularize, bool l1_proximal,
                  int64_t stats_mask) {
  const Flags f = sgd_flags(momentum, nesterov, maximize, prune, regularize, l1_proximal);
  const Hyper h{lr, weight_decay, momentum, dampening, 0.0, 0.0, 0.0};
  Call call = unpack(params, grads, {momentum_buffers}, {f.momentum}, steps, mask_words, stats, tensor_coefs,
                     group_coefs, group_inner, shard_offsets, seeds, found_inf, lr_tensor, f, h);
  call.stats_mask = checked_stats_mask(stats_mask);
  check_cpu(call, params, seeds);
  run(call);
}

void adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                   at::TensorList max_exp_avg_sqs, at::TensorList steps, at::TensorList mask_words,
                   at::TensorList stats, at::TensorList tensor_coefs, at::TensorList group_coefs,
                   at::IntArrayRef group_inner, at::IntArrayRef shard_offsets, const at::Tensor& seeds,
                   const c10::optional<at::Tensor>& found_inf, double lr, const c10::optional<at::Tensor>& lr_tensor,
                   double beta1, double beta2, double eps, double weight_decay, bool decoupled, bool amsgrad,
                   bool maximize, int64_t prune, bool regularize, bool l1_proximal, int64_t stats_mask) {
  const Flags f = adam_flags(decoupled, amsgrad, maximize, prune, regularize, l1_proximal);
  const Hyper h{lr, weight_decay, 0.0, 0.0, beta1, beta2, eps};
  Call call = unpack(params, grads, {exp_avgs, exp_avg_sqs, max_exp_avg_sqs}, {true, true, amsgrad}, steps,
                     mask_words, stats, tensor_coefs, group_coefs, group_inner, shard_offsets, seeds, found_inf,
                     lr_tensor, f, h);
  call.stats_mask = checked_stats_mask(stats_mask);
  check_cpu(call, params, seeds);
  run(call);
}

// Tests of cpu_simd.h: one block of the stream, and one candidate list, by the named version.
void pick_version(const std::string& version, UniformsFn& uniforms, QuadsFn& quads, CandidatesFn& candidates) {
  TORCH_CHECK(simd_version(version, uniforms, quads, candidates), "sparsetrain: no vector version '", version,
              "' on this CPU (the versions: portable, avx2, avx512)");
}

at::Tensor simd_uniforms(int64_t seed, int64_t first, const std::string& version) {
  UniformsFn uniforms;
  QuadsFn quads;
  CandidatesFn candidates;
  pick_version(version, uniforms, quads, candidates);
  TORCH_CHECK(first >= 0 && first % 4 == 0, "sparsetrain: first must be a non-negative multiple of 4, got ", first);
  at::Tensor out = at::empty({SIMD_BLOCK}, at::kFloat);
  uniforms(static_cast<uint64_t>(seed), static_cast<uint64_t>(first), out.data_ptr<float>());
  return out;
}

// The uniforms of the listed quads (in [0, 64)) of the block starting at `first`; the other
// entries NaN.
at::Tensor simd_uniforms_quads(int64_t seed, int64_t first, const at::Tensor& quad_list, const std::string& version) {
  UniformsFn uniforms;
  QuadsFn quads;
  CandidatesFn candidates;
  pick_version(version, uniforms, quads, candidates);
  TORCH_CHECK(first >= 0 && first % 4 == 0, "sparsetrain: first must be a non-negative multiple of 4, got ", first);
  TORCH_CHECK(quad_list.is_cpu() && quad_list.scalar_type() == at::kInt && quad_list.dim() == 1 &&
                  quad_list.numel() >= 1 && quad_list.numel() <= PHILOX_BLOCK_QUADS,
              "sparsetrain: quads must be a 1-d int32 CPU tensor of 1 to ", PHILOX_BLOCK_QUADS, " entries");
  TORCH_CHECK(quad_list.ge(0).logical_and(quad_list.lt(PHILOX_BLOCK_QUADS)).all().item<bool>(),
              "sparsetrain: quads must lie in [0, ", PHILOX_BLOCK_QUADS, ")");
  uint64_t quad_mask = 0;
  const at::Tensor q = quad_list.contiguous();
  for (int64_t j = 0; j < q.numel(); ++j) quad_mask |= uint64_t{1} << q.data_ptr<int32_t>()[j];
  at::Tensor out = at::full({SIMD_BLOCK}, NAN, at::kFloat);
  quads(static_cast<uint64_t>(seed), static_cast<uint64_t>(first) >> 2, quad_mask, out.data_ptr<float>());
  return out;
}

// The candidates of one block: u (SIMD_BLOCK uniforms), c the sampling constant, mask_words the
// block's SIMD_BLOCK / 32 words of live bits; base is added to each position.
at::Tensor simd_candidates(const at::Tensor& u, double c, const at::Tensor& mask_words, int64_t base,
                           const std::string& version) {
  UniformsFn uniforms;
  QuadsFn quads;
  CandidatesFn candidates;
  pick_version(version, uniforms, quads, candidates);
  TORCH_CHECK(u.is_cpu() && u.scalar_type() == at::kFloat && u.numel() == SIMD_BLOCK && u.is_contiguous(),
              "sparsetrain: u must be a contiguous float32 CPU tensor of ", SIMD_BLOCK, " elements");
  TORCH_CHECK(mask_words.is_cpu() && mask_words.scalar_type() == at::kInt && mask_words.numel() == SIMD_BLOCK / 32 &&
                  mask_words.is_contiguous(),
              "sparsetrain: mask_words must be a contiguous int32 CPU tensor of ", SIMD_BLOCK / 32, " words");
  at::Tensor where = at::empty({SIMD_BLOCK + COMPACT_SLACK}, at::kInt);
  const int count = candidates(u.data_ptr<float>(), static_cast<float>(c),
                               reinterpret_cast<const uint32_t*>(mask_words.data_ptr<int32_t>()),
                               static_cast<int32_t>(base), where.data_ptr<int32_t>());
  return where.slice(0, 0, count).clone();
}

}  // namespace
}  // namespace sparsetrain

TORCH_LIBRARY_FRAGMENT(sparsetrain_native, m) {
  m.def("simd_uniforms(int seed, int first, str version) -> Tensor", &sparsetrain::simd_uniforms);
  m.def("simd_uniforms_quads(int seed, int first, Tensor quads, str version) -> Tensor",
        &sparsetrain::simd_uniforms_quads);
  m.def("simd_candidates(Tensor u, float c, Tensor mask_words, int base, str version) -> Tensor",
        &sparsetrain::simd_candidates);
}

TORCH_LIBRARY_IMPL(sparsetrain_native, CPU, m) {
  m.impl("sgd_step_", &sparsetrain::sgd_step_cpu);
  m.impl("adam_step_", &sparsetrain::adam_step_cpu);
}
