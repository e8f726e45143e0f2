// The CUDA driver: one multi-tensor launch per parameter dtype for all tensors of a call.
//
// Layout. Every tensor is cut into chunks of CHUNK elements (an empty tensor has one empty chunk);
// one block of THREADS threads handles one chunk, found from a table of tensors (a binary search over
// the tensors' first chunks). A warp walks tiles of 32 * VEC elements: lane l holds elements
// l*VEC .. l*VEC+VEC-1 of the tile, VEC = 16 bytes / sizeof(parameter), so weights and gradients move
// in 16-byte vectors (fp32 states in one or two). A tile whose mask words are all zero costs its warp
// the load of those words and nothing else. The tile's new mask words are formed with warp votes
// (one ballot per element slot). Loads and stores use 16-byte vectors when the tile lies wholly
// inside the tensor and every base address of the tensor is 16-byte aligned (checked on the host);
// otherwise they are predicated per live element.
//
// Statistics. Each block reduces its chunk's partial sums in a fixed order (shuffle tree inside the
// warps, warps in order) and stores them; the last block of a tensor to finish (an integer ticket, so
// no float atomics) adds the tensor's chunk partials in a fixed order, writes the statistics and
// advances the step count, then resets the ticket. Results do not depend on block scheduling, and
// no second launch is needed. Only the statistics of the call's stats_mask are summed (uniform
// branches per statistic); the others are stored as 0. A step that writes no statistics
// (stats_mask 0) still reads the previous ones (selective decay, the sampling constant, the kernel
// scale) but neither sums nor stores any: its blocks only take their tickets, and the last one
// advances the step count.
//
// The launch runs on the current stream under a device guard; every launch is checked.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

#include "driver.h"

namespace sparsetrain {
namespace {

constexpr int THREADS = 256;
constexpr int WARPS = THREADS / 32;
constexpr int64_t CHUNK = 8192;  // elements per block (a multiple of every tile size)
constexpr unsigned FULL_WARP = 0xffffffffu;

struct DeviceTensor {
  TensorJob job;
  int64_t first_chunk;
  int64_t num_chunks;
  int32_t aligned;
};

template <typename T>
struct Vec {
  static constexpr int N = 16 / sizeof(T);
};

template <typename T, int N>
struct alignas(16) Pack {
  T v[N];
};

__device__ __forceinline__ double warp_sum(double x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_down_sync(FULL_WARP, x, offset);
  return x;  // lane 0 holds the sum, formed in a fixed order
}

// Sums v[0..3] over the block in a fixed order; thread 0 gets the result.
__device__ __forceinline__ void block_sum4(double v[NUM_PARTIALS], double (*shared)[NUM_PARTIALS]) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int i = 0; i < NUM_PARTIALS; ++i) v[i] = warp_sum(v[i]);
  __syncthreads();  // the shared buffer may still be read from a previous use
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < NUM_PARTIALS; ++i) shared[warp][i] = v[i];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
#pragma unroll
    for (int i = 0; i < NUM_PARTIALS; ++i) {
      double s = 0.0;
      for (int w = 0; w < WARPS; ++w) s += shared[w][i];
      v[i] = s;
    }
  }
}

// N:M decision for one lane's VEC consecutive elements (the lane's first element index is a multiple
// of VEC, a tile's of 32 * VEC, and M divides 32): groups of M <= VEC lie inside the lane; a group of
// M > VEC spans M / VEC neighbouring lanes, whose magnitudes and live bits come by shuffles. All
// lanes of the warp must call it (M is the same for the whole warp). Returns the new keep bits.
// Groups of M <= VEC inside one lane (fully unrolled: the magnitudes stay in registers).
template <int VEC, int M>
__device__ __forceinline__ uint32_t nm_lane_small(const float* a, uint32_t live, int n) {
  uint32_t keep = 0;
#pragma unroll
  for (int g0 = 0; g0 < VEC; g0 += M) {
#pragma unroll
    for (int j = 0; j < M; ++j) {
      int rank = 0;
#pragma unroll
      for (int k = 0; k < M; ++k) {
        const bool beats = ((live >> (g0 + k)) & 1u) != 0 && (a[g0 + k] > a[g0 + j] || (a[g0 + k] == a[g0 + j] && k < j));
        rank += beats ? 1 : 0;
      }
      keep |= static_cast<uint32_t>(((live >> (g0 + j)) & 1u) != 0 && rank < n) << (g0 + j);
    }
  }
  return keep;
}

template <int VEC>
__device__ __forceinline__ uint32_t nm_lane_keep(const float* w, uint32_t live, int n, int m, int lane) {
  float a[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) a[k] = fabs_(w[k]);
  if (m == 2) return nm_lane_small<VEC, 2>(a, live, n);
  if (m == 4) return nm_lane_small<VEC, 4>(a, live, n);
  if (m == 8 && VEC >= 8) return nm_lane_small<VEC, (VEC >= 8 ? 8 : 4)>(a, live, n);
  const int lanes = m / VEC;                  // lanes per group
  const int first_lane = lane - lane % lanes;  // the group's first lane
  const int mine = (lane % lanes) * VEC;       // index in the group of this lane's element 0
  int rank[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) rank[j] = 0;
  for (int r = 0; r < 32 / VEC; ++r) {  // a fixed trip count: every lane shuffles the same number of times
    const int src = first_lane + (r < lanes ? r : 0);
    const uint32_t their_live = __shfl_sync(FULL_WARP, live, src);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float ak = __shfl_sync(FULL_WARP, a[k], src);
      const int index = r * VEC + k;
      const bool counted = r < lanes && ((their_live >> k) & 1u) != 0;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const bool beats = ak > a[j] || (ak == a[j] && index < mine + j);
        rank[j] += (counted && beats) ? 1 : 0;
      }
    }
  }
  uint32_t keep = 0;
#pragma unroll
  for (int j = 0; j < VEC; ++j) keep |= static_cast<uint32_t>(((live >> j) & 1u) != 0 && rank[j] < n) << j;
  return keep;
}

template <typename T, bool ADAM>
__global__ void __launch_bounds__(THREADS) fused_step_kernel(const DeviceTensor* __restrict__ table, int num_tensors,
                                                             Flags flags, Hyper hyper, int stats_mask,
                                                             const double* lr_ptr, const float* found_inf,
                                                             const int64_t* seeds, double* __restrict__ partials,
                                                             int* tickets) {
  constexpr int VEC = Vec<T>::N;
  constexpr int TILE = 32 * VEC;
  constexpr int WORDS_PER_TILE = VEC;  // 32 * VEC elements = VEC mask words
  constexpr int LANES_PER_WORD = 32 / VEC;
  flags.adam = ADAM;
  if (found_inf != nullptr && *found_inf != 0.0f) return;  // a skipped step: nothing at all changes

  __shared__ TensorScalars scalars_shared;
  __shared__ double reduce_shared[WARPS][NUM_PARTIALS];
  __shared__ int is_last;

  // which tensor this chunk belongs to: the last tensor whose first chunk is <= blockIdx.x
  const int64_t chunk = blockIdx.x;
  int lo = 0, hi = num_tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (table[mid].first_chunk <= chunk) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const int t = lo;
  const DeviceTensor& entry = table[t];
  const TensorJob& job = entry.job;
  if (threadIdx.x == 0) {
    const bool lr_on_device = lr_ptr != nullptr;
    scalars_shared = prepare_tensor(flags, hyper, lr_on_device ? *lr_ptr : hyper.lr, lr_on_device, job.coefs,
                                    job.stats, *job.step);
  }
  __syncthreads();
  const TensorScalars s = scalars_shared;
  const int64_t numel = job.numel;
  const int64_t chunk_begin = (chunk - entry.first_chunk) * CHUNK;
  const int64_t chunk_end = chunk_begin + CHUNK < numel ? chunk_begin + CHUNK : numel;
  const int64_t num_words = (numel + 31) / 32;
  const bool draw = flags.prune == PRUNE_STOCHASTIC && s.sample;
  // statistics summed and stored by this step, only those of stats_mask (prepare_tensor above read the
  // previous ones either way)
  const bool stats_out = flags.has_stats && stats_mask != 0;
  const bool sum_alive = stats_out && (stats_mask & STATS_ALIVE) != 0;
  const bool sum_w = stats_out && (stats_mask & STATS_SUM_ABS_W) != 0;
  const bool sum_g = stats_out && (stats_mask & STATS_SUM_ABS_G) != 0;
  const bool sum_kernel = stats_out && (stats_mask & STATS_SUM_KERNEL) != 0 && s.kernel_on;
  const uint64_t seed = draw ? static_cast<uint64_t>(seeds[t]) : 0;
  const bool quads_aligned = (job.shard_offset & 3) == 0;
  T* param = static_cast<T*>(job.param);
  const T* grad = static_cast<const T*>(job.grad);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  double acc[NUM_PARTIALS] = {0.0, 0.0, 0.0, 0.0};
  for (int64_t tile = chunk_begin + static_cast<int64_t>(warp) * TILE; tile < chunk_end;
       tile += static_cast<int64_t>(WARPS) * TILE) {
    const int64_t word0 = tile / 32;
    // lane j < VEC holds the tile's mask word j; lane l's elements lie in word l / LANES_PER_WORD
    uint32_t old_word = 0xffffffffu;
    if (flags.has_mask) {
      old_word = (lane < WORDS_PER_TILE && word0 + lane < num_words) ? static_cast<uint32_t>(job.mask[word0 + lane]) : 0u;
    }
    const uint32_t my_word = __shfl_sync(FULL_WARP, old_word, lane / LANES_PER_WORD);
    const int64_t first = tile + static_cast<int64_t>(lane) * VEC;  // this lane's first element
    uint32_t live_bits = (my_word >> ((lane * VEC) % 32)) & ((1u << VEC) - 1u);
    if (first >= numel) {
      live_bits = 0;
    } else if (first + VEC > numel) {
      live_bits &= (1u << (numel - first)) - 1u;
    }
    if (!__any_sync(FULL_WARP, live_bits != 0)) continue;  // a dead tile: its mask words were all it read

    const bool vector_io = entry.aligned && tile + TILE <= numel;
    float w[VEC], g[VEC], st[3][VEC];
    T w_raw[VEC];
    if (vector_io) {
      const Pack<T, VEC> wp = *reinterpret_cast<const Pack<T, VEC>*>(param + first);
      const Pack<T, VEC> gp = *reinterpret_cast<const Pack<T, VEC>*>(grad + first);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        w_raw[k] = wp.v[k];
        w[k] = static_cast<float>(wp.v[k]);
        g[k] = static_cast<float>(gp.v[k]);
      }
#pragma unroll
      for (int i = 0; i < 3; ++i) {
        if (job.state[i] != nullptr) {
          const Pack<float, VEC> sp = *reinterpret_cast<const Pack<float, VEC>*>(job.state[i] + first);
#pragma unroll
          for (int k = 0; k < VEC; ++k) st[i][k] = sp.v[k];
        } else {
#pragma unroll
          for (int k = 0; k < VEC; ++k) st[i][k] = 0.0f;
        }
      }
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const bool live = (live_bits >> k) & 1u;
        w_raw[k] = live ? param[first + k] : T(0.0f);
        w[k] = static_cast<float>(w_raw[k]);
        g[k] = live ? static_cast<float>(grad[first + k]) : 0.0f;
#pragma unroll
        for (int i = 0; i < 3; ++i) st[i][k] = (live && job.state[i] != nullptr) ? job.state[i][first + k] : 0.0f;
      }
    }
    float u[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) u[k] = 0.0f;
    if (draw && live_bits != 0) {
      const uint64_t global_first = static_cast<uint64_t>(job.shard_offset + first);
      if (quads_aligned) {
#pragma unroll
        for (int q = 0; q < VEC / 4; ++q) {
          const Philox4 r = philox4x32_10((global_first >> 2) + q, seed);
#pragma unroll
          for (int m = 0; m < 4; ++m) u[4 * q + m] = uniform(r.v[m]);
        }
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) u[k] = uniform_at(seed, global_first + k);
      }
    }
    uint32_t keep_bits = 0;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      if ((live_bits >> k) & 1u) {
        float lam = 0.0f;
        bool flagged = false;
        if (flags.has_groups) {
          const int64_t j = group_index(job.shard_offset + first + k, job.inner, job.groups);
          lam = job.group[j];
          flagged = job.group[job.groups + j] != 0.0f;
        }
        const bool keep = step_element(flags, s, w[k], g[k], st[0][k], st[1][k], st[2][k], lam, flagged, u[k]);
        keep_bits |= static_cast<uint32_t>(keep) << k;
        if (stats_out && keep && flags.prune != PRUNE_NM) {  // N:M: counted after its decision
          if (sum_alive) acc[STAT_ALIVE] += 1.0;
          if (sum_w) acc[STAT_SUM_ABS_W] += static_cast<double>(fabs_(w[k]));
          if (sum_g) acc[STAT_SUM_ABS_G] += static_cast<double>(fabs_(g[k]));
          if (sum_kernel) acc[STAT_SUM_KERNEL] += static_cast<double>(kernel_term(s, w[k]));
        }
      }
    }
    if (flags.prune == PRUNE_NM && s.nm_m != 0) {  // warp-uniform: every lane takes part in the shuffles
      keep_bits = nm_lane_keep<VEC>(w, keep_bits, s.nm_n, s.nm_m, lane);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const bool keep = (keep_bits >> k) & 1u;
        if (((live_bits >> k) & 1u) && !keep) {
          w[k] = 0.0f;
#pragma unroll
          for (int i = 0; i < 3; ++i) st[i][k] = 0.0f;
        }
        if (stats_out && keep) {
          if (sum_alive) acc[STAT_ALIVE] += 1.0;
          if (sum_w) acc[STAT_SUM_ABS_W] += static_cast<double>(fabs_(w[k]));
          if (sum_g) acc[STAT_SUM_ABS_G] += static_cast<double>(fabs_(g[k]));
          if (sum_kernel) acc[STAT_SUM_KERNEL] += static_cast<double>(kernel_term(s, w[k]));
        }
      }
    }
    // writes: live elements take their new values (zero when pruned now), dead ones keep theirs
    if (vector_io) {
      Pack<T, VEC> wp;
#pragma unroll
      for (int k = 0; k < VEC; ++k) wp.v[k] = ((live_bits >> k) & 1u) ? static_cast<T>(w[k]) : w_raw[k];
      *reinterpret_cast<Pack<T, VEC>*>(param + first) = wp;
#pragma unroll
      for (int i = 0; i < 3; ++i) {
        if (job.state[i] == nullptr) continue;
        Pack<float, VEC> sp;
        const Pack<float, VEC> old = *reinterpret_cast<const Pack<float, VEC>*>(job.state[i] + first);
#pragma unroll
        for (int k = 0; k < VEC; ++k) sp.v[k] = ((live_bits >> k) & 1u) ? st[i][k] : old.v[k];
        *reinterpret_cast<Pack<float, VEC>*>(job.state[i] + first) = sp;
      }
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        if ((live_bits >> k) & 1u) {
          param[first + k] = static_cast<T>(w[k]);
#pragma unroll
          for (int i = 0; i < 3; ++i) {
            if (job.state[i] != nullptr) job.state[i][first + k] = st[i][k];
          }
        }
      }
    }
    if (flags.has_mask) {
      // ballot k: bit l = keep of element l*VEC + k. Word j, bit p is element j*32 + p, i.e. lane
      // (j*32 + p) / VEC, slot p % VEC.
      uint32_t ballots[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) ballots[k] = __ballot_sync(FULL_WARP, (keep_bits >> k) & 1u);
      if (lane < WORDS_PER_TILE && old_word != 0u) {
        uint32_t word = 0;
#pragma unroll
        for (int p = 0; p < 32; ++p) word |= ((ballots[p % VEC] >> ((lane * 32 + p) / VEC)) & 1u) << p;
        job.mask[word0 + lane] = static_cast<int32_t>(word);
      }
    }
  }

  // this chunk's partials, then the tensor's last block combines them in chunk order (stats_out is
  // the same for every block: the block-wide sums are skipped by all threads or by none)
  if (stats_out) block_sum4(acc, reduce_shared);
  if (threadIdx.x == 0) {
    if (stats_out) {
#pragma unroll
      for (int i = 0; i < NUM_PARTIALS; ++i) partials[chunk * NUM_PARTIALS + i] = acc[i];
    }
    __threadfence();
    const int ticket = atomicAdd(&tickets[t], 1);
    is_last = ticket == entry.num_chunks - 1;
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  double total[NUM_PARTIALS] = {0.0, 0.0, 0.0, 0.0};
  if (stats_out) {
    for (int64_t c = entry.first_chunk + threadIdx.x; c < entry.first_chunk + entry.num_chunks; c += THREADS) {
#pragma unroll
      for (int i = 0; i < NUM_PARTIALS; ++i) total[i] += __ldcg(partials + c * NUM_PARTIALS + i);
    }
    block_sum4(total, reduce_shared);
  }
  if (threadIdx.x == 0) {
    if (stats_out) {
#pragma unroll
      for (int i = 0; i < NUM_PARTIALS; ++i) job.stats[i] = total[i];  // 0 for the statistics not computed
      job.stats[STAT_TM] = (stats_mask & STATS_SUM_KERNEL) != 0 ? s.tm_now : 0.0;
    }
    *job.step = s.step;
    tickets[t] = 0;  // ready for the next launch
  }
}

// Per device and stream: one int ticket per tensor, kept at zero between launches by the kernel
// itself. Launches on one stream run in order and can share them; launches on two streams may run
// at the same time, so each stream has its own (allocated on that stream, so that the caching
// allocator orders their reuse with it).
at::Tensor tickets_for(const c10::cuda::CUDAStream& stream, int64_t n) {
  static std::mutex lock;
  static std::map<std::pair<c10::DeviceIndex, c10::StreamId>, at::Tensor> cache;
  std::lock_guard<std::mutex> guard(lock);
  at::Tensor& tickets = cache[{stream.device_index(), stream.id()}];
  if (!tickets.defined() || tickets.numel() < n) {
    tickets = at::zeros({std::max<int64_t>(n, 1024)}, at::TensorOptions().dtype(at::kInt).device(stream.device()));
  }
  return tickets;
}

template <typename T>
void launch_dtype(const Call& call, const std::vector<size_t>& members, const at::Device& device,
                  const double* lr_ptr, const float* found_inf, const int64_t* seeds) {
  std::vector<DeviceTensor> host(members.size());
  int64_t chunks = 0;
  for (size_t m = 0; m < members.size(); ++m) {
    const TensorJob& job = call.jobs[members[m]];
    DeviceTensor& d = host[m];
    std::memset(&d, 0, sizeof(d));
    d.job = job;
    d.first_chunk = chunks;
    d.num_chunks = std::max<int64_t>(1, (job.numel + CHUNK - 1) / CHUNK);
    bool aligned = reinterpret_cast<uintptr_t>(job.param) % 16 == 0 && reinterpret_cast<uintptr_t>(job.grad) % 16 == 0;
    for (int i = 0; i < 3; ++i) aligned = aligned && reinterpret_cast<uintptr_t>(job.state[i]) % 16 == 0;
    d.aligned = aligned;
    chunks += d.num_chunks;
  }
  TORCH_CHECK(chunks < (int64_t{1} << 31), "sparsetrain: too many elements for one launch");
  const int64_t bytes = static_cast<int64_t>(host.size() * sizeof(DeviceTensor));
  at::Tensor table_host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(table_host.data_ptr(), host.data(), bytes);
  at::Tensor table = table_host.to(device, /*non_blocking=*/true);
  // the chunks' partial statistics (none when this step writes no statistics)
  const bool stats_out = call.flags.has_stats && call.stats_mask != 0;
  at::Tensor partials;
  if (stats_out) partials = at::empty({chunks * NUM_PARTIALS}, at::TensorOptions().dtype(at::kDouble).device(device));
  double* partials_ptr = stats_out ? partials.data_ptr<double>() : nullptr;
  const c10::cuda::CUDAStream current = c10::cuda::getCurrentCUDAStream(device.index());
  at::Tensor tickets = tickets_for(current, static_cast<int64_t>(host.size()));
  const cudaStream_t stream = current.stream();
  const auto* table_ptr = reinterpret_cast<const DeviceTensor*>(table.data_ptr());
  const int n = static_cast<int>(host.size());
  if (call.flags.adam) {
    fused_step_kernel<T, true><<<static_cast<unsigned>(chunks), THREADS, 0, stream>>>(
        table_ptr, n, call.flags, call.hyper, call.stats_mask, lr_ptr, found_inf, seeds, partials_ptr,
        tickets.data_ptr<int>());
  } else {
    fused_step_kernel<T, false><<<static_cast<unsigned>(chunks), THREADS, 0, stream>>>(
        table_ptr, n, call.flags, call.hyper, call.stats_mask, lr_ptr, found_inf, seeds, partials_ptr,
        tickets.data_ptr<int>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void run(Call& call, at::TensorList params, const at::Tensor& seeds) {
  const at::Device device = params[0].device();
  for (size_t t = 0; t < params.size(); ++t) {
    TORCH_CHECK(params[t].is_cuda() && params[t].device() == device, "sparsetrain: the CUDA driver got params[", t,
                "] on ", params[t].device(), ", expected ", device);
  }
  const c10::cuda::CUDAGuard guard(device);
  at::Tensor lr, found_inf, seeds_device;
  if (call.lr_tensor != nullptr) {
    TORCH_CHECK(call.lr_tensor->numel() == 1, "sparsetrain: lr_tensor must hold one value");
    lr = call.lr_tensor->to(device, at::kDouble);
  }
  if (call.found_inf != nullptr) {
    TORCH_CHECK(call.found_inf->numel() == 1, "sparsetrain: found_inf must hold one value");
    found_inf = call.found_inf->to(device, at::kFloat);
  }
  if (call.flags.prune == PRUNE_STOCHASTIC) seeds_device = seeds.to(device, at::kLong).contiguous();
  const double* lr_ptr = lr.defined() ? lr.data_ptr<double>() : nullptr;
  const float* inf_ptr = found_inf.defined() ? found_inf.data_ptr<float>() : nullptr;
  const int64_t* seeds_ptr = seeds_device.defined() ? seeds_device.data_ptr<int64_t>() : nullptr;
  for (const at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    std::vector<size_t> members;
    for (size_t t = 0; t < call.jobs.size(); ++t) {
      if (call.dtypes[t] == dtype) members.push_back(t);
    }
    if (members.empty()) continue;
    // seeds are indexed by position in the call; the kernel indexes by position in its table
    const int64_t* member_seeds = seeds_ptr;
    at::Tensor picked;
    if (seeds_ptr != nullptr && members.size() != call.jobs.size()) {
      at::Tensor index = at::empty({static_cast<int64_t>(members.size())}, at::TensorOptions().dtype(at::kLong));
      std::copy(members.begin(), members.end(), index.data_ptr<int64_t>());
      picked = seeds_device.index_select(0, index.to(device));
      member_seeds = picked.data_ptr<int64_t>();
    }
    if (dtype == at::kFloat) {
      launch_dtype<float>(call, members, device, lr_ptr, inf_ptr, member_seeds);
    } else if (dtype == at::kBFloat16) {
      launch_dtype<c10::BFloat16>(call, members, device, lr_ptr, inf_ptr, member_seeds);
    } else {
      launch_dtype<c10::Half>(call, members, device, lr_ptr, inf_ptr, member_seeds);
    }
  }
}

void sgd_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
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
  if (!params.empty()) run(call, params, seeds);
}

void adam_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
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
  if (!params.empty()) run(call, params, seeds);
}

}  // namespace
}  // namespace sparsetrain

TORCH_LIBRARY_IMPL(sparsetrain_native, CUDA, m) {
  m.impl("sgd_step_", &sparsetrain::sgd_step_cuda);
  m.impl("adam_step_", &sparsetrain::adam_step_cuda);
}
