// SafePatching's masked merge of one tensor or chunk, in one pass (docs/design.md §1.5–§1.7, §2):
//   in_X      = key(S_X) >= key_X && key(S_X) > 0       (patch absent -> false; mode none -> true)
//   M_X       = by mode from in_SE, in_OSM
//   applied_X = M_X && philox word < keep_threshold
// Retention before selection (retain_first, modes other than none, p < 1): in_X = selected &&
// kept, applied_X = M_X. With applied_counts, each block adds its applied elements per patch
// (one shared-memory sum per block, one global atomic per block and patch).
//   acc = float(base); acc += c_se * d_se if applied_se; acc += c_osm * d_osm if applied_osm
//   out = acc rounded (nearest even) to out_dtype
// Each thread handles one Philox counter block: the four elements with absolute indices
// 4*blk .. 4*blk+3 (chunk-local i = absolute - offset), so one Philox call per patch serves
// four elements and chunked runs draw exactly what whole-tensor runs draw. Patch values are
// read only for blocks where the patch applies. Arithmetic is fp32 without FMA contraction
// (bit-identical to the reference); inputs of any float dtype mix (dtype codes, no template
// explosion). Vector loads/stores when the chunk starts on a block boundary and all pointers
// are 16-byte aligned.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "../op_checks.h"
#include "common.cuh"
#include "../kernels.h"

namespace safepatch {
namespace cuda {
namespace {

constexpr int kThreads = 256;

struct MergeArgs {
  const void* base;
  const void* patch[2];
  const void* score[2];
  void* out;
  bool* mask[2];  // nullptr unless return_masks
  int dt_base, dt_out;
  int dt_patch[2], dt_score[2];
  bool present[2];
  uint32_t key[2];
  float coeff[2];
  int mode;
  bool draw, deltas, vec;
  bool retain_first;                    // retention folded into in_X (implies draw)
  unsigned long long* counts;           // nullptr unless applied_counts
  uint32_t keep, seed, name_hash;
  int64_t n, offset, blk0, nblk;
};

__global__ void __launch_bounds__(kThreads) merge_kernel(const MergeArgs a) {
  __shared__ unsigned long long block_counts[2];
  unsigned long long counted[2] = {0ull, 0ull};
  if (a.counts != nullptr) {  // uniform over the grid
    if (threadIdx.x == 0) block_counts[0] = block_counts[1] = 0ull;
    __syncthreads();
  }
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < a.nblk;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t blk = a.blk0 + t;
    const int64_t i0 = 4 * blk - a.offset;  // chunk-local index of the block's first element
    const bool full = a.vec && i0 >= 0 && i0 + 4 <= a.n;
    bool valid[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) valid[j] = i0 + j >= 0 && i0 + j < a.n;

    float b[4];
    if (full) {
      load4(a.base, i0, a.dt_base, b);
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = valid[j] ? load1(a.base, i0 + j, a.dt_base) : 0.f;
    }

    bool in[2][4];
#pragma unroll
    for (int x = 0; x < 2; ++x) {
      if (!a.present[x] || a.mode == kNone) {
#pragma unroll
        for (int j = 0; j < 4; ++j) in[x][j] = a.present[x] && valid[j];
        continue;
      }
      float s[4];
      if (full) {
        load4(a.score[x], i0, a.dt_score[x], s);
      } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) s[j] = valid[j] ? load1(a.score[x], i0 + j, a.dt_score[x]) : 0.f;
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint32_t k = key_of(s[j]);
        in[x][j] = valid[j] && k >= a.key[x] && k > 0u;
      }
      if (a.retain_first && (in[x][0] || in[x][1] || in[x][2] || in[x][3])) {
        uint32_t w[4];
        retention_block(static_cast<uint64_t>(blk), a.seed, a.name_hash, static_cast<uint32_t>(x), w);
#pragma unroll
        for (int j = 0; j < 4; ++j) in[x][j] = in[x][j] && w[j] < a.keep;
      }
    }

    bool m[2][4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (a.mode == kDifference) {
        m[0][j] = in[0][j] && !in[1][j];
        m[1][j] = in[1][j] && !in[0][j];
      } else if (a.mode == kIntersection) {
        m[0][j] = m[1][j] = in[0][j] && in[1][j];
      } else {
        m[0][j] = in[0][j];
        m[1][j] = in[1][j];
      }
    }

    float acc[4] = {b[0], b[1], b[2], b[3]};
#pragma unroll
    for (int x = 0; x < 2; ++x) {
      if (!a.present[x]) continue;
      bool any = m[x][0] || m[x][1] || m[x][2] || m[x][3];
      if (any && a.draw && !a.retain_first) {
        uint32_t w[4];
        retention_block(static_cast<uint64_t>(blk), a.seed, a.name_hash, static_cast<uint32_t>(x), w);
#pragma unroll
        for (int j = 0; j < 4; ++j) m[x][j] = m[x][j] && w[j] < a.keep;
        any = m[x][0] || m[x][1] || m[x][2] || m[x][3];
      }
      counted[x] += static_cast<unsigned>(m[x][0]) + m[x][1] + m[x][2] + m[x][3];
      if (!any) continue;
      float d[4];
      if (full) {
        load4(a.patch[x], i0, a.dt_patch[x], d);
      } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) d[j] = m[x][j] ? load1(a.patch[x], i0 + j, a.dt_patch[x]) : 0.f;
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float dj = a.deltas ? d[j] : __fsub_rn(d[j], b[j]);
        const float v = __fadd_rn(acc[j], __fmul_rn(a.coeff[x], dj));
        acc[j] = m[x][j] ? v : acc[j];
      }
    }

    if (full) {
      store4(a.out, i0, a.dt_out, acc);
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j)
        if (valid[j]) store1(a.out, i0 + j, a.dt_out, acc[j]);
    }
#pragma unroll
    for (int x = 0; x < 2; ++x) {
      if (a.mask[x] == nullptr) continue;
#pragma unroll
      for (int j = 0; j < 4; ++j)
        if (valid[j]) a.mask[x][i0 + j] = m[x][j];
    }
  }
  if (a.counts != nullptr) {
#pragma unroll
    for (int x = 0; x < 2; ++x)
      if (counted[x] != 0ull) atomicAdd(&block_counts[x], counted[x]);
    __syncthreads();
    if (threadIdx.x == 0) {
#pragma unroll
      for (int x = 0; x < 2; ++x)
        if (block_counts[x] != 0ull) atomicAdd(a.counts + x, block_counts[x]);
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_merge(
    const at::Tensor& base, const c10::optional<at::Tensor>& patch_se,
    const c10::optional<at::Tensor>& patch_osm, const c10::optional<at::Tensor>& score_se,
    const c10::optional<at::Tensor>& score_osm, int64_t key_se, int64_t key_osm, int64_t mode,
    double c_se, double c_osm, int64_t keep_threshold, int64_t seed, int64_t name_hash,
    int64_t offset, bool deltas, c10::ScalarType out_dtype, bool return_masks, bool retain_first,
    const c10::optional<at::Tensor>& applied_counts) {
  check_merge_args(base, patch_se, patch_osm, score_se, score_osm, key_se, key_osm, mode,
                   keep_threshold, name_hash, offset, out_dtype);
  check_counts_arg(applied_counts, base);
  const c10::cuda::CUDAGuard guard(base.device());
  at::Tensor out = at::empty(base.sizes(), base.options().dtype(out_dtype));
  const auto mask_opts = base.options().dtype(at::kBool);
  at::Tensor mask_se = return_masks ? at::empty(base.sizes(), mask_opts) : at::empty({0}, mask_opts);
  at::Tensor mask_osm = return_masks ? at::empty(base.sizes(), mask_opts) : at::empty({0}, mask_opts);
  const int64_t n = base.numel();
  if (n == 0) return {out, mask_se, mask_osm};

  MergeArgs a{};
  a.base = base.data_ptr();
  a.dt_base = dtype_code(base.scalar_type());
  a.out = out.data_ptr();
  a.dt_out = dtype_code(out_dtype);
  a.mode = static_cast<int>(mode);
  a.deltas = deltas;
  a.draw = keep_threshold < kKeepAll;
  a.keep = a.draw ? static_cast<uint32_t>(keep_threshold) : 0u;
  // Mode none and p == 1 are the retention-after-selection merge.
  a.retain_first = retain_first && a.draw && mode != kNone;
  a.counts = applied_counts.has_value()
                 ? reinterpret_cast<unsigned long long*>(applied_counts->data_ptr<int64_t>())
                 : nullptr;
  a.seed = static_cast<uint32_t>(static_cast<uint64_t>(seed));
  a.name_hash = static_cast<uint32_t>(name_hash);
  a.n = n;
  a.offset = offset;
  a.blk0 = offset >> 2;
  a.nblk = ((offset + n - 1) >> 2) - a.blk0 + 1;
  bool vec = offset % 4 == 0 && aligned16(a.base) && aligned16(a.out);
  const c10::optional<at::Tensor>* patches[2] = {&patch_se, &patch_osm};
  const c10::optional<at::Tensor>* scores[2] = {&score_se, &score_osm};
  const int64_t keys[2] = {key_se, key_osm};
  const double coeffs[2] = {c_se, c_osm};
  at::Tensor* masks[2] = {&mask_se, &mask_osm};
  for (int x = 0; x < 2; ++x) {
    a.mask[x] = return_masks ? masks[x]->data_ptr<bool>() : nullptr;
    a.present[x] = patches[x]->has_value();
    a.key[x] = static_cast<uint32_t>(keys[x]);
    a.coeff[x] = static_cast<float>(coeffs[x]);  // rounded once, to nearest, like the reference
    a.patch[x] = a.score[x] = nullptr;
    a.dt_patch[x] = a.dt_score[x] = kF32;
    if (!a.present[x]) continue;
    const at::Tensor& p = **patches[x];
    a.patch[x] = p.data_ptr();
    a.dt_patch[x] = dtype_code(p.scalar_type());
    vec = vec && aligned16(a.patch[x]);
    if (mode != kNone) {
      const at::Tensor& s = **scores[x];
      a.score[x] = s.data_ptr();
      a.dt_score[x] = dtype_code(s.scalar_type());
      vec = vec && aligned16(a.score[x]);
    }
  }
  a.vec = vec;
  const int sms = device_attribute(cudaDevAttrMultiProcessorCount);
  const int64_t blocks = std::min<int64_t>(ceil_div(a.nblk, kThreads), int64_t(sms) * 32);
  merge_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, mask_se, mask_osm};
}

}  // namespace cuda
}  // namespace safepatch
