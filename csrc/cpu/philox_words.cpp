// The retention words of elements offset .. offset+numel-1 (for tests against ops/philox.py).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>

#include "../op_checks.h"
#include "../philox.h"
#include "hugepages.h"
#include "../kernels.h"
#include "philox_lanes.h"

namespace safepatch {
namespace cpu {

at::Tensor philox_words(int64_t offset, int64_t numel, int64_t seed, int64_t name_hash,
                        int64_t patch_id) {
  TORCH_CHECK(offset >= 0 && numel >= 0, "safepatch::philox_words: offset and numel must be >= 0, got ",
              num(offset), " and ", num(numel));
  TORCH_CHECK(name_hash >= 0 && name_hash < (int64_t(1) << 32),
              "safepatch::philox_words: name_hash must be a uint32, got ", num(name_hash));
  // SafePatching draws with ids 0 (SE) and 1 (OSM); DARE with one id per model.
  TORCH_CHECK(patch_id >= 0 && patch_id < (int64_t(1) << 32),
              "safepatch::philox_words: patch_id must be a uint32, got ", num(patch_id));
  at::Tensor out = at::empty({numel}, at::TensorOptions().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  advise_huge_pages(o, static_cast<size_t>(out.nbytes()));
  const uint32_t k0 = static_cast<uint32_t>(static_cast<uint64_t>(seed));
  const uint32_t k1 = static_cast<uint32_t>(name_hash);
  constexpr int L = 64;
  constexpr int64_t kTile = 4 * L;
  at::parallel_for(0, numel, 1 << 14, [&](int64_t lo, int64_t hi) {
    alignas(64) uint32_t words[kTile];
    int64_t j = lo;
    while (j < hi) {
      const uint64_t a = static_cast<uint64_t>(offset + j);
      const uint64_t tile0 = a / kTile * kTile;  // tiles aligned to absolute element indices
      const int64_t end = std::min<int64_t>(hi, static_cast<int64_t>(tile0 + kTile) - offset);
      philox_words_lanes<L>(tile0 >> 2, k0, k1, static_cast<uint32_t>(patch_id), words);
      for (int64_t q = j; q < end; ++q) o[q] = words[static_cast<uint64_t>(offset + q) - tile0];
      j = end;
    }
  });
  return out;
}

}  // namespace cpu
}  // namespace safepatch
