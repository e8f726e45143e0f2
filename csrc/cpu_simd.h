// Vector kernels of the CPU driver that compilers do not vectorize well by themselves, with x86
// intrinsics versions (AVX2, AVX-512) beside a portable one; the one used is picked once from the
// CPU's features, and every version computes the same result.
//
// The random stream: the uniforms of 256 consecutive elements (64 Philox4x32-10 calls, element.h's
// stream) at once. The work is 32 x 32 -> 64-bit multiplies. Compilers vectorize them as 64 x 64-bit multiplies
// (vpmullq: slow, and only with AVX-512DQ) or not at all, so x86 machines with AVX2 / AVX-512 get
// intrinsics versions: each counter word lives in the low half of a 64-bit lane, where vpmuludq
// multiplies it into both halves of the product in one instruction (the high halves of the lanes
// carry junk that vpmuludq ignores and the final packing drops). Every version computes the same
// bits as philox4x32_10 and uniform (tests/test_philox.py, and the native masks against the torch
// reference).
//
// Candidates: the positions of a block's live elements whose uniform is below the sampling constant
// (the elements a stochastic decision has to look at), in increasing order, without a branch per
// element.
#pragma once

#include <cstdint>
#include <string>

#include "element.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SPARSETRAIN_X86_PHILOX 1
#include <immintrin.h>
#endif

namespace sparsetrain {

constexpr int PHILOX_BLOCK_QUADS = 64;  // Philox calls per block: uniforms of 256 elements
constexpr int SIMD_BLOCK = 4 * PHILOX_BLOCK_QUADS;  // elements per block
constexpr int COMPACT_SLACK = 16;  // the candidate lists may write this many entries past their count

// Portable: the 64 calls side by side, one loop per round.
inline void uniforms_portable(uint64_t seed, uint64_t first, float* __restrict u) {
  constexpr int Q = PHILOX_BLOCK_QUADS;
  alignas(64) uint32_t c0[Q], c1[Q], c2[Q], c3[Q];
  const uint64_t quad = first >> 2;
  for (int j = 0; j < Q; ++j) {
    c0[j] = static_cast<uint32_t>(quad + j);
    c1[j] = static_cast<uint32_t>((quad + j) >> 32);
    c2[j] = 0;
    c3[j] = 0;
  }
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (uint32_t round = 0; round < 10; ++round) {
    const uint32_t rk0 = k0 + round * PHILOX_KEY_A, rk1 = k1 + round * PHILOX_KEY_B;
#pragma omp simd
    for (int j = 0; j < Q; ++j) philox_round(c0[j], c1[j], c2[j], c3[j], rk0, rk1);
  }
#pragma omp simd
  for (int j = 0; j < Q; ++j) {
    u[4 * j + 0] = uniform(c0[j]);
    u[4 * j + 1] = uniform(c1[j]);
    u[4 * j + 2] = uniform(c2[j]);
    u[4 * j + 3] = uniform(c3[j]);
  }
}

// The uniforms of some quads of a block only: for each set bit j of quad_mask, the four elements of
// quad quad0 + j go to u[4 * j] .. u[4 * j + 3]; the other entries of u are not written. The stream
// is counter-based, so a quad drawn alone has the bits the whole block gives it. The versions list
// the set bits (in increasing order, padded with copies of the last to a multiple of QUAD_BATCH: a
// padding entry redraws its quad) and draw the listed quads QUAD_BATCH at a time.
constexpr int QUAD_BATCH = 16;
inline void uniforms_quads_portable(uint64_t seed, uint64_t quad0, uint64_t quad_mask, float* __restrict u) {
  for (uint64_t m = quad_mask; m != 0; m &= m - 1) {
    const int j = __builtin_ctzll(m);
    const Philox4 r = philox4x32_10(quad0 + static_cast<uint64_t>(j), seed);
    for (int w = 0; w < 4; ++w) u[4 * j + w] = uniform(r.v[w]);
  }
}

// Writes base + k for the k < SIMD_BLOCK whose element is live (bit k & 31 of bits[k >> 5]) and whose
// uniform is not at least c (!(u[k] >= c)) to `where` in increasing order; returns their count.
// `where` holds count + COMPACT_SLACK entries.
inline int candidates_portable(const float* __restrict u, float c, const uint32_t* __restrict bits, int32_t base,
                               int32_t* __restrict where) {
  int count = 0;
  for (int k = 0; k < SIMD_BLOCK; ++k) {
    where[count] = base + k;
    count += static_cast<int>((bits[k >> 5] >> (k & 31)) & 1u) & static_cast<int>(!(u[k] >= c));
  }
  return count;
}

#if defined(SPARSETRAIN_X86_PHILOX)
// GCC 12 warns of its own intrinsics headers (_mm512_undefined_* feeding the masked builtins)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// AVX-512: G registers of eight Philox4x32-10 calls, counters (the quad numbers) in 64-bit lanes, all
// in flight (G independent chains per round hide the multiply latency; a round is two vpmuludq, two
// shifts and two three-way xors); writes the calls' 32 * G uniforms to `out` in element order.
template <int G>
__attribute__((target("avx512f"), always_inline)) inline void philox_calls_avx512(const __m512i* counters,
                                                                                   uint64_t seed, float* out) {
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const __m512i ka = _mm512_set1_epi64(0xD2511F53u), kb = _mm512_set1_epi64(0xCD9E8D57u);
  __m512i c0[G], c1[G], c2[G], c3[G];
  for (int g = 0; g < G; ++g) {
    c0[g] = counters[g];  // counter low word (the high half is junk)
    c1[g] = _mm512_srli_epi64(counters[g], 32);
    c2[g] = _mm512_setzero_si512();
    c3[g] = _mm512_setzero_si512();
  }
  for (uint32_t round = 0; round < 10; ++round) {
    const __m512i rk0 = _mm512_set1_epi64(k0 + round * PHILOX_KEY_A);
    const __m512i rk1 = _mm512_set1_epi64(k1 + round * PHILOX_KEY_B);
    for (int g = 0; g < G; ++g) {
      const __m512i pb = _mm512_mul_epu32(c2[g], kb), pa = _mm512_mul_epu32(c0[g], ka);
      c0[g] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pb, 32), c1[g], rk0, 0x96);  // hi_b ^ c1 ^ k0
      c2[g] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pa, 32), c3[g], rk1, 0x96);  // hi_a ^ c3 ^ k1
      c1[g] = pb;  // lo_b in the low half
      c3[g] = pa;
    }
  }
  // words (c0, c1, c2, c3) of call j go to elements 4j .. 4j+3: pack pairs into 64-bit lanes, interleave
  const __m512i perm_lo = _mm512_set_epi64(11, 3, 10, 2, 9, 1, 8, 0);
  const __m512i perm_hi = _mm512_set_epi64(15, 7, 14, 6, 13, 5, 12, 4);
  const __m512 scale = _mm512_set1_ps(4.6566127342e-10f);
  for (int g = 0; g < G; ++g) {
    const __m512i a = _mm512_mask_blend_epi32(0xAAAA, c0[g], _mm512_slli_epi64(c1[g], 32));
    const __m512i b = _mm512_mask_blend_epi32(0xAAAA, c2[g], _mm512_slli_epi64(c3[g], 32));
    const __m512i lo = _mm512_permutex2var_epi64(a, perm_lo, b), hi = _mm512_permutex2var_epi64(a, perm_hi, b);
    // uniform(): ~x for negative x (x ^ (x >> 31)), then to float and scaled
    const __m512i xl = _mm512_xor_si512(lo, _mm512_srai_epi32(lo, 31));
    const __m512i xh = _mm512_xor_si512(hi, _mm512_srai_epi32(hi, 31));
    _mm512_storeu_ps(out + 32 * g, _mm512_mul_ps(_mm512_cvtepi32_ps(xl), scale));
    _mm512_storeu_ps(out + 32 * g + 16, _mm512_mul_ps(_mm512_cvtepi32_ps(xh), scale));
  }
}

// AVX-512: the block's 64 calls in eight registers, all in flight.
__attribute__((target("avx512f"))) inline void uniforms_avx512(uint64_t seed, uint64_t first, float* __restrict u) {
  constexpr int G = PHILOX_BLOCK_QUADS / 8;
  const uint64_t quad = first >> 2;
  const __m512i lane = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
  __m512i counters[G];
  for (int g = 0; g < G; ++g) {
    counters[g] = _mm512_add_epi64(_mm512_set1_epi64(static_cast<long long>(quad + 8 * g)), lane);
  }
  philox_calls_avx512<G>(counters, seed, u);
}

// AVX-512, listed quads: QUAD_BATCH calls per pass (two registers), the counters from the list.
__attribute__((target("avx512f,popcnt"))) inline void uniforms_quads_avx512(uint64_t seed, uint64_t quad0,
                                                                            uint64_t quad_mask, float* __restrict u) {
  constexpr int G = QUAD_BATCH / 8;
  alignas(64) int32_t quads[PHILOX_BLOCK_QUADS + QUAD_BATCH];
  int nq = 0;
  __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  for (int p = 0; p < PHILOX_BLOCK_QUADS; p += 16) {  // one vpcompressd per 16 quads
    const __mmask16 m = static_cast<__mmask16>(quad_mask >> p);
    _mm512_storeu_si512(quads + nq, _mm512_maskz_compress_epi32(m, iota));
    nq += _mm_popcnt_u32(m);
    iota = _mm512_add_epi32(iota, _mm512_set1_epi32(16));
  }
  if (nq == 0) return;
  _mm512_storeu_si512(quads + nq, _mm512_set1_epi32(quads[nq - 1]));
  for (int j0 = 0; j0 < nq; j0 += QUAD_BATCH) {
    __m512i counters[G];
    for (int g = 0; g < G; ++g) {
      const __m256i listed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(quads + j0 + 8 * g));
      counters[g] = _mm512_add_epi64(_mm512_set1_epi64(static_cast<long long>(quad0)), _mm512_cvtepi32_epi64(listed));
    }
    alignas(64) float out[4 * QUAD_BATCH];
    philox_calls_avx512<G>(counters, seed, out);
    for (int j = 0; j < QUAD_BATCH; ++j) {
      _mm_storeu_ps(u + 4 * quads[j0 + j], _mm_load_ps(out + 4 * j));
    }
  }
}

// AVX2: G registers of four Philox4x32-10 calls, counters (the quad numbers) in 64-bit lanes, all in
// flight; writes the calls' 16 * G uniforms to `out` in element order.
template <int G>
__attribute__((target("avx2"), always_inline)) inline void philox_calls_avx2(const __m256i* counters, uint64_t seed,
                                                                              float* out) {
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const __m256i ka = _mm256_set1_epi64x(0xD2511F53u), kb = _mm256_set1_epi64x(0xCD9E8D57u);
  const __m256 scale = _mm256_set1_ps(4.6566127342e-10f);
  __m256i c0[G], c1[G], c2[G], c3[G];
  for (int g = 0; g < G; ++g) {
    c0[g] = counters[g];
    c1[g] = _mm256_srli_epi64(counters[g], 32);
    c2[g] = _mm256_setzero_si256();
    c3[g] = _mm256_setzero_si256();
  }
  for (uint32_t round = 0; round < 10; ++round) {
    const __m256i rk0 = _mm256_set1_epi64x(k0 + round * PHILOX_KEY_A);
    const __m256i rk1 = _mm256_set1_epi64x(k1 + round * PHILOX_KEY_B);
    for (int g = 0; g < G; ++g) {
      const __m256i pb = _mm256_mul_epu32(c2[g], kb), pa = _mm256_mul_epu32(c0[g], ka);
      c0[g] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pb, 32), c1[g]), rk0);
      c2[g] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pa, 32), c3[g]), rk1);
      c1[g] = pb;
      c3[g] = pa;
    }
  }
  for (int g = 0; g < G; ++g) {
    const __m256i a = _mm256_blend_epi32(c0[g], _mm256_slli_epi64(c1[g], 32), 0xAA);
    const __m256i b = _mm256_blend_epi32(c2[g], _mm256_slli_epi64(c3[g], 32), 0xAA);
    const __m256i l = _mm256_unpacklo_epi64(a, b), h = _mm256_unpackhi_epi64(a, b);  // calls 0, 2 | 1, 3
    const __m256i lo = _mm256_permute2x128_si256(l, h, 0x20), hi = _mm256_permute2x128_si256(l, h, 0x31);
    const __m256i xl = _mm256_xor_si256(lo, _mm256_srai_epi32(lo, 31));
    const __m256i xh = _mm256_xor_si256(hi, _mm256_srai_epi32(hi, 31));
    _mm256_storeu_ps(out + 16 * g, _mm256_mul_ps(_mm256_cvtepi32_ps(xl), scale));
    _mm256_storeu_ps(out + 16 * g + 8, _mm256_mul_ps(_mm256_cvtepi32_ps(xh), scale));
  }
}

// AVX2: four calls per register, eight in flight per pass (sixteen registers).
__attribute__((target("avx2"))) inline void uniforms_avx2(uint64_t seed, uint64_t first, float* __restrict u) {
  constexpr int G = 2;
  const uint64_t quad = first >> 2;
  const __m256i lane = _mm256_set_epi64x(3, 2, 1, 0);
  for (int j0 = 0; j0 < PHILOX_BLOCK_QUADS; j0 += 4 * G) {
    __m256i counters[G];
    for (int g = 0; g < G; ++g) {
      counters[g] = _mm256_add_epi64(_mm256_set1_epi64x(static_cast<long long>(quad + j0 + 4 * g)), lane);
    }
    philox_calls_avx2<G>(counters, seed, u + 4 * j0);
  }
}

// AVX-512: one compare under the live bits and one vpcompressd per 16 elements (into a register:
// stored whole, the count advances).
__attribute__((target("avx512f,popcnt"))) inline int candidates_avx512(const float* __restrict u, float c,
                                                                        const uint32_t* __restrict bits, int32_t base,
                                                                        int32_t* __restrict where) {
  __m512i index = _mm512_add_epi32(_mm512_set1_epi32(base),
                                   _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0));
  const __m512i step = _mm512_set1_epi32(16);
  const __m512 cv = _mm512_set1_ps(c);
  int count = 0;
  for (int k = 0; k < SIMD_BLOCK; k += 16) {
    const __mmask16 live = static_cast<__mmask16>(bits[k >> 5] >> (k & 31));
    const __mmask16 m = _mm512_mask_cmp_ps_mask(live, _mm512_loadu_ps(u + k), cv, _CMP_NGE_UQ);
    _mm512_storeu_si512(where + count, _mm512_maskz_compress_epi32(m, index));
    count += _mm_popcnt_u32(m);
    index = _mm512_add_epi32(index, step);
  }
  return count;
}

// AVX2: eight elements at a time, the lanes gathered by a permutation from a table of the 256 masks.
struct CompactTable {
  uint8_t lanes[256][8];
  constexpr CompactTable() : lanes() {
    for (int m = 0; m < 256; ++m) {
      int j = 0;
      for (int b = 0; b < 8; ++b) {
        if ((m >> b) & 1) lanes[m][j++] = static_cast<uint8_t>(b);
      }
    }
  }
};
inline constexpr CompactTable COMPACT_TABLE{};

__attribute__((target("avx2,popcnt"))) inline int candidates_avx2(const float* __restrict u, float c,
                                                                  const uint32_t* __restrict bits, int32_t base,
                                                                  int32_t* __restrict where) {
  __m256i index = _mm256_add_epi32(_mm256_set1_epi32(base), _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0));
  const __m256i step = _mm256_set1_epi32(8);
  const __m256 cv = _mm256_set1_ps(c);
  int count = 0;
  for (int k = 0; k < SIMD_BLOCK; k += 8) {
    const int below = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(u + k), cv, _CMP_NGE_UQ));
    const int m = below & static_cast<int>((bits[k >> 5] >> (k & 31)) & 0xffu);
    uint64_t packed;
    __builtin_memcpy(&packed, COMPACT_TABLE.lanes[m], 8);
    const __m256i perm = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(packed)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(where + count), _mm256_permutevar8x32_epi32(index, perm));
    count += _mm_popcnt_u32(static_cast<unsigned>(m));
    index = _mm256_add_epi32(index, step);
  }
  return count;
}
// AVX2, listed quads: eight calls per pass (two registers of four), the counters from the list.
__attribute__((target("avx2,popcnt"))) inline void uniforms_quads_avx2(uint64_t seed, uint64_t quad0,
                                                                       uint64_t quad_mask, float* __restrict u) {
  constexpr int G = 2;
  alignas(32) int32_t quads[PHILOX_BLOCK_QUADS + QUAD_BATCH];
  int nq = 0;
  __m256i iota = _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0);
  for (int p = 0; p < PHILOX_BLOCK_QUADS; p += 8) {  // eight quads at a time, as candidates_avx2
    const int m = static_cast<int>((quad_mask >> p) & 0xffu);
    uint64_t packed;
    __builtin_memcpy(&packed, COMPACT_TABLE.lanes[m], 8);
    const __m256i perm = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(packed)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(quads + nq), _mm256_permutevar8x32_epi32(iota, perm));
    nq += _mm_popcnt_u32(static_cast<unsigned>(m));
    iota = _mm256_add_epi32(iota, _mm256_set1_epi32(8));
  }
  if (nq == 0) return;
  for (int j = nq; j < nq + QUAD_BATCH; ++j) quads[j] = quads[nq - 1];
  for (int j0 = 0; j0 < nq; j0 += 4 * G) {
    __m256i counters[G];
    for (int g = 0; g < G; ++g) {
      const __m256i idx = _mm256_cvtepi32_epi64(_mm_loadu_si128(reinterpret_cast<const __m128i*>(quads + j0 + 4 * g)));
      counters[g] = _mm256_add_epi64(_mm256_set1_epi64x(static_cast<long long>(quad0)), idx);
    }
    alignas(32) float out[16 * G];
    philox_calls_avx2<G>(counters, seed, out);
    for (int j = 0; j < 4 * G; ++j) _mm_storeu_ps(u + 4 * quads[j0 + j], _mm_load_ps(out + 4 * j));
  }
}

#pragma GCC diagnostic pop
#endif

using CandidatesFn = int (*)(const float* __restrict u, float c, const uint32_t* __restrict bits, int32_t base,
                             int32_t* __restrict where);

inline CandidatesFn pick_candidates() {
#if defined(SPARSETRAIN_X86_PHILOX)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return &candidates_avx512;
  if (__builtin_cpu_supports("avx2")) return &candidates_avx2;
#endif
  return &candidates_portable;
}

using UniformsFn = void (*)(uint64_t seed, uint64_t first, float* __restrict u);
using QuadsFn = void (*)(uint64_t seed, uint64_t quad0, uint64_t quad_mask, float* __restrict u);

inline QuadsFn pick_quads() {
#if defined(SPARSETRAIN_X86_PHILOX)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return &uniforms_quads_avx512;
  if (__builtin_cpu_supports("avx2")) return &uniforms_quads_avx2;
#endif
  return &uniforms_quads_portable;
}

// The fastest version this CPU runs.
inline UniformsFn pick_uniforms() {
#if defined(SPARSETRAIN_X86_PHILOX)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return &uniforms_avx512;
  if (__builtin_cpu_supports("avx2")) return &uniforms_avx2;
#endif
  return &uniforms_portable;
}

// A version by name ("portable", "avx2", "avx512"), for the tests that compare every version this
// CPU runs with the torch reference; false when the name is unknown or the CPU lacks the features.
inline bool simd_version(const std::string& name, UniformsFn& uniforms, QuadsFn& quads, CandidatesFn& candidates) {
  if (name == "portable") {
    uniforms = &uniforms_portable;
    quads = &uniforms_quads_portable;
    candidates = &candidates_portable;
    return true;
  }
#if defined(SPARSETRAIN_X86_PHILOX)
  __builtin_cpu_init();
  if (name == "avx2" && __builtin_cpu_supports("avx2")) {
    uniforms = &uniforms_avx2;
    quads = &uniforms_quads_avx2;
    candidates = &candidates_avx2;
    return true;
  }
  if (name == "avx512" && __builtin_cpu_supports("avx512f")) {
    uniforms = &uniforms_avx512;
    quads = &uniforms_quads_avx512;
    candidates = &candidates_avx512;
    return true;
  }
#endif
  return false;
}

}  // namespace sparsetrain
