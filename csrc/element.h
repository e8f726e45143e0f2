// The per-element contract of the fused step (docs/design.md, "The fused step"), written once for
// the CPU driver (cpu_driver.cpp) and the CUDA driver (cuda_driver.cu).
//
// Everything here is an inline __host__ __device__ function of plain scalars: the drivers decide
// how elements are walked (chunks, vectors, warps), this header decides what happens to each one.
//
// Floating point: math in fp32, statistics in fp64. No fused multiply-add anywhere: both drivers
// are compiled with contraction off (-ffp-contract=off, nvcc --fmad=false), and exp() is the
// polynomial below rather than a library call, so the CPU and the GPU compute the same bits for
// the same inputs. The torch reference (plain torch ops) agrees to rounding.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define ST_HD __host__ __device__ __forceinline__
#else
#define ST_HD inline __attribute__((always_inline))
#endif

namespace sparsetrain {

// Layouts of sparsetrain/contract.py (the agreement tests against the torch reference fail on a mismatch).
enum Coef : int {
  COEF_L2 = 0, COEF_L1, COEF_SD, COEF_SD_BETA, COEF_THRESHOLD, COEF_PRUNE_COUNT, COEF_TEMPERATURE, COEF_NM
};
constexpr int NUM_COEFS = 8;
enum Stat : int { STAT_ALIVE = 0, STAT_SUM_ABS_W, STAT_SUM_KERNEL, STAT_SUM_ABS_G, STAT_TM };
constexpr int NUM_STATS = 5;
constexpr int NUM_PARTIALS = 4;  // the summed statistics (all but STAT_TM)
// Bit sets of statistics (contract.STATS_*): bit 1 << STAT_x per summed statistic; STAT_TM goes with
// STAT_SUM_KERNEL.
constexpr int STATS_ALIVE = 1 << STAT_ALIVE;
constexpr int STATS_SUM_ABS_W = 1 << STAT_SUM_ABS_W;
constexpr int STATS_SUM_KERNEL = 1 << STAT_SUM_KERNEL;
constexpr int STATS_SUM_ABS_G = 1 << STAT_SUM_ABS_G;
constexpr int STATS_ALL = STATS_ALIVE | STATS_SUM_ABS_W | STATS_SUM_KERNEL | STATS_SUM_ABS_G;
enum Prune : int { PRUNE_NONE = 0, PRUNE_STOCHASTIC, PRUNE_LOW, PRUNE_HIGH, PRUNE_GROUP, PRUNE_NM };

// ---------------------------------------------------------------------------------------------
// Bits of floats (no type punning through unions: memcpy on the host, intrinsics on the device)

ST_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  __builtin_memcpy(&u, &x, 4);
  return u;
#endif
}

ST_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  __builtin_memcpy(&x, &u, 4);
  return x;
#endif
}

ST_HD float fabs_(float x) { return bits_float(float_bits(x) & 0x7fffffffu); }
ST_HD float fmax_(float a, float b) { return a > b ? a : b; }  // NaN in a gives b, as torch.clamp(min=) does not;
ST_HD float fmin_(float a, float b) { return a < b ? a : b; }  // callers pass finite bounds as b
ST_HD float sign_(float x) { return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : 0.0f); }

// c ? a : b, for conditions that are the same for every element (flags, per-tensor scalars). On the
// host it is a bit blend: GCC does not vectorize a float select on a loop-invariant bool, and this
// keeps the CPU driver's element loops vectorizable. Both sides are evaluated; the result is exact.
ST_HD float select_(bool c, float a, float b) {
#if defined(__CUDA_ARCH__)
  return c ? a : b;
#else
  const uint32_t m = 0u - static_cast<uint32_t>(c);
  return bits_float((float_bits(a) & m) | (float_bits(b) & ~m));
#endif
}

// exp(x) in fp32: Cody-Waite reduction by ln 2 (the high part has 12 significant bits, so n * LN2_HI
// is exact for |n| < 2^12), a degree-6 polynomial on |r| <= ln2 / 2 (Cephes expf), and the scale by
// 2^n in two steps so that results in the subnormal range are formed too. Within 2 ulp of the
// correctly rounded value; NaN in, NaN out. At most 1 for every x <= 0 (checked over all of them):
// the CPU driver's stochastic decision relies on it.
ST_HD float exp_(float x) {
  const float LOG2E = 1.44269504088896341f;
  const float LN2_HI = 0.693359375f;
  const float LN2_LO = -2.12194440e-4f;
  const float ROUNDER = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  float xc = x > 88.7f ? 88.7f : x;   // NaN compares false and passes through
  xc = xc < -104.0f ? -104.0f : xc;
  const float t = xc * LOG2E + ROUNDER;
  const float n = t - ROUNDER;
  float r = xc - n * LN2_HI;
  r = r - n * LN2_LO;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float r2 = r * r;
  p = p * r2 + r;
  p = p + 1.0f;
  const int32_t ni = static_cast<int32_t>(n);
  const int32_t n1 = ni >> 1;  // floor(n / 2): both halves stay normal for n in [-151, 128]
  const int32_t n2 = ni - n1;
  const float s1 = bits_float(static_cast<uint32_t>(n1 + 127) << 23);
  const float s2 = bits_float(static_cast<uint32_t>(n2 + 127) << 23);
  return x < -104.0f ? 0.0f : p * s1 * s2;
}

// ---------------------------------------------------------------------------------------------
// Random stream: Philox4x32-10 as triton.language.random defines it, one call per 4 elements.
// Element i (index in the unsharded tensor) uses counter ((i >> 2) low, (i >> 2) high, 0, 0),
// key (seed low, seed high), and output word i & 3.

struct Philox4 {
  uint32_t v[4];
};

ST_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// One round with round key (k0, k1); the key schedule adds (0x9E3779B9, 0xBB67AE85) per round.
ST_HD void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
  const uint32_t hi_b = __umulhi(0xCD9E8D57u, c2), lo_b = 0xCD9E8D57u * c2;
  const uint32_t hi_a = __umulhi(0xD2511F53u, c0), lo_a = 0xD2511F53u * c0;
#else  // one 32 x 32 -> 64-bit product gives both halves (one vector multiply on the host)
  const uint64_t pb = static_cast<uint64_t>(0xCD9E8D57u) * c2, pa = static_cast<uint64_t>(0xD2511F53u) * c0;
  const uint32_t hi_b = static_cast<uint32_t>(pb >> 32), lo_b = static_cast<uint32_t>(pb);
  const uint32_t hi_a = static_cast<uint32_t>(pa >> 32), lo_a = static_cast<uint32_t>(pa);
#endif
  c0 = hi_b ^ c1 ^ k0;
  c1 = lo_b;
  c2 = hi_a ^ c3 ^ k1;
  c3 = lo_a;
}
constexpr uint32_t PHILOX_KEY_A = 0x9E3779B9u, PHILOX_KEY_B = 0xBB67AE85u;

ST_HD Philox4 philox4x32_10(uint64_t quad, uint64_t seed) {
  uint32_t c0 = static_cast<uint32_t>(quad), c1 = static_cast<uint32_t>(quad >> 32), c2 = 0, c3 = 0;
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (uint32_t round = 0; round < 10; ++round) {
    philox_round(c0, c1, c2, c3, k0 + round * PHILOX_KEY_A, k1 + round * PHILOX_KEY_B);
  }
  return Philox4{{c0, c1, c2, c3}};
}

// Triton's uint_to_uniform_float: the word read as int32, ~x when negative, times 4.6566127342e-10f.
ST_HD float uniform(uint32_t word) {
  int32_t x = static_cast<int32_t>(word);
  x = x < 0 ? ~x : x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

ST_HD float uniform_at(uint64_t seed, uint64_t index) {
  return uniform(philox4x32_10(index >> 2, seed).v[index & 3]);
}

// ---------------------------------------------------------------------------------------------
// Per-call switches and per-tensor scalars

struct Flags {
  bool adam;  // Adam / AdamW; otherwise SGD
  bool momentum;
  bool nesterov;
  bool maximize;
  bool decoupled;
  bool amsgrad;
  bool has_mask;
  bool has_stats;   // the call has statistics (read: selective decay, sampling, this step's kernel scale)
  int stats_out;    // the statistics this step computes (STATS_* bits; 0 with has_stats false)
  bool regularize;
  bool l1_proximal;
  bool has_groups;
  int prune;
};

struct Hyper {  // the call's hyperparameters (fp64 as Python passes them)
  double lr, weight_decay, momentum, dampening, beta1, beta2, eps;
};

// Everything an element of tensor t needs besides its own values, computed once per tensor (or per
// CUDA block) from the tensor's coefficients, last step's statistics and its step count.
struct TensorScalars {
  float lr, weight_decay, momentum, one_minus_dampening;
  float beta2, one_minus_beta1, one_minus_beta2, eps, decay_factor, step_size, bias_correction2_sqrt;
  float l2, l1, l1_shrink, sd, sd_scale;
  float sample_c, tm, threshold, tm_now_f, inv_tm_now;
  double tm_now;
  int nm_n, nm_m;  // N:M pattern (prune == PRUNE_NM); nm_m == 0 when tensor_coefs[COEF_NM] holds none
  float step;  // after this step's increment
  bool first, sample, kernel_on;
};

// N:M pattern from tensor_coefs[COEF_NM] = m * 64 + n (contract.nm_code); m = 0 when it holds none.
ST_HD void nm_decode(float code, int& n, int& m) {
  const int value = code >= 0.0f && code < 4096.0f ? static_cast<int>(code) : 0;
  n = value % 64;
  m = value / 64;
  const bool valid = static_cast<float>(value) == code && (m == 2 || m == 4 || m == 8 || m == 16 || m == 32) &&
                     n >= 1 && n < m;
  if (!valid) n = m = 0;
}

// lr_value: the learning rate (from lr_tensor when one is given, else hyper.lr); coefs / stats may be
// null (no coefficients / no statistics); step_before: the tensor's step count before this call.
ST_HD TensorScalars prepare_tensor(const Flags& f, const Hyper& h, double lr_value, bool lr_on_device,
                                   const float* coefs, const double* stats, float step_before) {
  TensorScalars s{};
  s.lr = static_cast<float>(lr_value);
  s.weight_decay = static_cast<float>(h.weight_decay);
  s.momentum = static_cast<float>(h.momentum);
  s.one_minus_dampening = static_cast<float>(1.0 - h.dampening);
  s.beta2 = static_cast<float>(h.beta2);
  s.one_minus_beta1 = static_cast<float>(1.0 - h.beta1);
  s.one_minus_beta2 = static_cast<float>(1.0 - h.beta2);
  s.eps = static_cast<float>(h.eps);
  s.step = step_before + 1.0f;
  s.first = s.step == 1.0f;
  // decoupled decay factor: fp64 from a Python lr, fp32 from an lr tensor (as the reference does)
  s.decay_factor = 1.0f;
  if (f.adam && f.decoupled && h.weight_decay != 0.0) {
    s.decay_factor = lr_on_device ? 1.0f - s.lr * s.weight_decay : static_cast<float>(1.0 - lr_value * h.weight_decay);
  }
  if (f.adam) {
    const double step = static_cast<double>(s.step);
    const double bias_correction1 = 1.0 - pow(h.beta1, step);
    s.bias_correction2_sqrt = static_cast<float>(sqrt(1.0 - pow(h.beta2, step)));
    s.step_size = lr_on_device ? s.lr / static_cast<float>(bias_correction1)
                               : static_cast<float>(lr_value / bias_correction1);
  }
  if (f.regularize && coefs != nullptr) {
    s.l2 = coefs[COEF_L2];
    s.l1 = coefs[COEF_L1];
    s.l1_shrink = s.lr * s.l1;
    if (f.has_stats) {  // selective decay: relevance 1 - |g| / (beta * mean |g| of the last step)
      const double alive = stats[STAT_ALIVE];
      const float gbar = static_cast<float>(stats[STAT_SUM_ABS_G] / (alive > 1.0 ? alive : 1.0));
      s.sd_scale = coefs[COEF_SD_BETA] * gbar;
      s.sd = s.sd_scale > 0.0f ? coefs[COEF_SD] : 0.0f;
    }
  }
  if (f.prune == PRUNE_STOCHASTIC) {
    const float count = coefs[COEF_PRUNE_COUNT];
    const float kernel_sum = static_cast<float>(stats[STAT_SUM_KERNEL]);
    s.tm = static_cast<float>(stats[STAT_TM]);
    s.sample = count > 0.0f && kernel_sum > 0.0f && s.tm > 0.0f;
    s.sample_c = s.sample ? count / kernel_sum : 0.0f;
  }
  if (f.prune == PRUNE_LOW || f.prune == PRUNE_HIGH) s.threshold = coefs[COEF_THRESHOLD];
  if (f.prune == PRUNE_NM) nm_decode(coefs[COEF_NM], s.nm_n, s.nm_m);
  if (f.has_stats) {  // this step's kernel scale: temperature * mean |w| of the last step
    const double prev_alive = stats[STAT_ALIVE];
    const double temperature = coefs != nullptr ? static_cast<double>(coefs[COEF_TEMPERATURE]) : 0.0;
    s.tm_now = prev_alive > 0.0 ? temperature * stats[STAT_SUM_ABS_W] / prev_alive : 0.0;
    s.kernel_on = s.tm_now > 0.0;
    s.tm_now_f = static_cast<float>(s.tm_now);
    s.inv_tm_now = s.kernel_on ? fmin_(1.0f / s.tm_now_f, 3.4028235e38f) : 0.0f;  // finite: 0 * it is 0
  }
  return s;
}

// ---------------------------------------------------------------------------------------------
// The element

ST_HD int64_t group_index(int64_t global_index, int64_t inner, int64_t groups) {
  return (global_index / inner) % groups;
}

// r = lam[j]*w + l2*w [+ l1*sign(w) unless proximal] + sd*w*max(0, 1 - |g|/(beta*gbar)), in this order.
ST_HD float regularization(const Flags& f, const TensorScalars& s, float w, float g_raw, float lam) {
  float r = select_(f.has_groups, lam * w, 0.0f);
  r = select_(f.regularize, r + s.l2 * w, r);
  r = select_(f.regularize && !f.l1_proximal, r + s.l1 * sign_(w), r);
  const float x = 1.0f - fabs_(g_raw) / s.sd_scale;  // clamp(min=0) as torch: a NaN (NaN or inf / inf) stays
  const float relevance = x < 0.0f ? 0.0f : x;
  return select_(f.regularize && s.sd != 0.0f, r + s.sd * w * relevance, r);
}

// sign(w) * clamp(|w| - shrink, min=0), with torch.clamp's NaN: a NaN weight stays NaN (sign_ gives 0, 0 * NaN).
ST_HD float proximal_l1(float w, float shrink) {
  const float m = fabs_(w) - shrink;
  return sign_(w) * (m < 0.0f ? 0.0f : m);
}

// torch.lerp(start, end, weight) with a scalar weight, as ATen computes it.
ST_HD float lerp_(float start, float end, float weight) {
  return select_(weight < 0.5f, start + weight * (end - start), end - (end - start) * (1.0f - weight));
}

// SGD: g' = g + wd*w + r; buf = g' on the first step, else momentum*buf + (1-dampening)*g';
// w -= lr * (g' + momentum*buf if nesterov else buf). Returns the updated w.
ST_HD float sgd_update(const Flags& f, const TensorScalars& s, float w, float g, float r, float& buf) {
  g = select_(s.weight_decay != 0.0f, g + s.weight_decay * w, g);
  g = select_(f.regularize || f.has_groups, g + r, g);
  const float next = select_(s.first, g, buf * s.momentum + s.one_minus_dampening * g);
  buf = select_(f.momentum, next, buf);
  g = select_(f.momentum, select_(f.nesterov, g + s.momentum * next, next), g);
  return w - s.lr * g;
}

// Adam / AdamW with torch.optim's single-tensor order of operations.
ST_HD float adam_update(const Flags& f, const TensorScalars& s, float w, float g, float r, float& m, float& v,
                        float& vmax) {
  w = w * s.decay_factor;  // 1 unless decoupled weight decay is on (w * 1 == w, NaN included)
  g = select_(s.weight_decay != 0.0f && !f.decoupled, g + s.weight_decay * w, g);
  g = select_(f.regularize || f.has_groups, g + r, g);
  m = lerp_(m, g, s.one_minus_beta1);
  v = v * s.beta2 + s.one_minus_beta2 * g * g;
  vmax = select_(f.amsgrad, (v > vmax) | (v != v) ? v : vmax, vmax);  // torch.maximum: NaN from either side
  const float denom = sqrtf(select_(f.amsgrad, vmax, v)) / s.bias_correction2_sqrt + s.eps;
  return w - s.step_size * m / denom;
}

// The pruning decision on the updated weight of a live element: true = keep. PRUNE is the mode when
// known at compile time (the CPU driver: no switch inside its vectorized loops), -1 to read f.prune.
template <int PRUNE = -1>
ST_HD bool keep_element(const Flags& f, const TensorScalars& s, float w, float u, bool group_flagged) {
  const int prune = PRUNE >= 0 ? PRUNE : f.prune;
  if (prune == PRUNE_STOCHASTIC) {  // q = clamp(c * exp(-|w| / tm), max=1): a NaN q prunes nothing, as in the reference
    const float p = s.sample_c * exp_(-fabs_(w) / s.tm);
    const float q = p > 1.0f ? 1.0f : p;
    return !(s.sample & (u < q));
  }
  if (prune == PRUNE_LOW) return !(fabs_(w) < s.threshold);
  if (prune == PRUNE_HIGH) return !(fabs_(w) > s.threshold);
  if (prune == PRUNE_GROUP) return !group_flagged;
  return true;  // none, and N:M (decided per group by the drivers after the element step: nm_group_keep)
}

// N:M decision of one group of m <= 32 elements: a[k] = |w_k| of the updated weights, bit k of
// `live` set for live elements. Element j stays when it is live and fewer than n live elements of
// the group outrank it (larger |w|, or equal |w| and a lower index). Returns the keep bits.
ST_HD uint32_t nm_group_keep(const float* a, uint32_t live, int n, int m) {
  uint32_t keep = 0;
  for (int j = 0; j < m; ++j) {
    int rank = 0;
    for (int k = 0; k < m; ++k) {
      const bool beats = ((live >> k) & 1u) != 0 && (a[k] > a[j] || (a[k] == a[j] && k < j));
      rank += beats ? 1 : 0;
    }
    keep |= static_cast<uint32_t>(((live >> j) & 1u) != 0 && rank < n) << j;
  }
  return keep;
}

// One live element, all of it: regularize, update, proximal L1, decide, mask. w and the states are
// updated in place (zero when pruned now); returns whether the element stays alive. u is this
// element's uniform (read only by stochastic pruning), lam / group_flagged its group's values.
template <int PRUNE = -1>
ST_HD bool step_element(const Flags& f, const TensorScalars& s, float& w, float g_raw, float& s1, float& s2,
                        float& s3, float lam, bool group_flagged, float u) {
  const float g = select_(f.maximize, -g_raw, g_raw);
  const float r = regularization(f, s, w, g_raw, lam);
  float nw = f.adam ? adam_update(f, s, w, g, r, s1, s2, s3) : sgd_update(f, s, w, g, r, s1);
  nw = select_(f.regularize && f.l1_proximal, proximal_l1(nw, s.l1_shrink), nw);
  const bool keep = keep_element<PRUNE>(f, s, nw, u, group_flagged);
  w = keep ? nw : 0.0f;
  s1 = keep ? s1 : 0.0f;
  s2 = keep ? s2 : 0.0f;
  s3 = keep ? s3 : 0.0f;
  return keep;
}

// This element's term of STAT_SUM_KERNEL (the sampling kernel at this step's scale). A statistic,
// not a decision: the scale is applied as a multiplication by its reciprocal (within one ulp of the
// division the reference does, well inside the statistics' tolerance, and much cheaper).
ST_HD float kernel_term(const TensorScalars& s, float w) { return exp_(-fabs_(w) * s.inv_tm_now); }

}  // namespace sparsetrain
