"""Check the CUDA kernels of csrc/cuda on a machine without a GPU, by host emulation.

    python tests/cuda_emulation/run.py        # needs a C++ compiler and CUDA's vector_types.h

The .cu sources are copied with their launch syntax and CUDA runtime calls rewritten, compiled
as C++ against torch (CPU) with emu_seq.h (threads run one after another: saliency) or
emu_threads.h (one std::thread per CUDA thread with real barriers: the histogram and the merge,
whose blocks sum their applied counts in shared memory), and their outputs compared bit for bit
with safepatch_merge.ops.reference on CPU tensors: vector and scalar paths, misaligned
pointers, offsets beyond 2^32, every mode and dtype, both retention orders with applied counts,
histograms of retained scores, several rounds of the 16-bit shared counters. Limits: warp ballots see one lane (each thread its own
converged group), warp shuffles are block-wide exchanges (valid where every thread of the
block reaches them together), memory is sequentially consistent, and nothing is timed; a GPU run
(bench/gpu_check.sh) is the real test. Takes a few minutes (three torch-header compiles).
"""
from __future__ import annotations

import itertools
import os
import re
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils import cpp_extension

from safepatch_merge.ops import philox as P
from safepatch_merge.ops import reference as ref
from safepatch_merge.ops.library import SCHEMAS

HERE = Path(__file__).resolve().parent
CSRC = HERE.parents[1] / "csrc"
FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def cuda_include() -> Path:
    for root in (os.environ.get("CUDA_HOME"), cpp_extension.CUDA_HOME, "/usr/local/cuda"):
        if root and (Path(root) / "include" / "vector_types.h").is_file():
            return Path(root) / "include"
    raise SystemExit("CUDA headers (vector_types.h) not found: set CUDA_HOME")


def rewrite(src: str, launch: str) -> str:
    """A .cu source as host C++: CUDA runtime calls dropped, <<<...>>> launches emulated."""
    src = src.replace("#include <cuda_fp16.h>", "")
    src = re.sub(r"#include <c10/cuda/[^>]+>\n", "", src)
    src = re.sub(r".*CUDAGuard guard.*\n", "", src)
    src = re.sub(r".*cudaFuncSetAttribute.*\n", "", src)
    src = src.replace("C10_CUDA_KERNEL_LAUNCH_CHECK();", "")
    src = src.replace("device_attribute(cudaDevAttrMultiProcessorCount)", "2")
    src = src.replace("device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin)", "232448")
    src = src.replace("extern __shared__ uint32_t sh[];", "uint32_t* sh = emu_smem;")
    src = src.replace("__shared__ unsigned long long block_zeros;",
                      "unsigned long long& block_zeros = *emu_shared_u64;")
    src = src.replace("__shared__ unsigned long long block_counts[2];",
                      "unsigned long long* block_counts = emu_shared_u64;")
    src = src.replace('#include "common.cuh"', '#include "common_emu.cuh"')
    src = src.replace('#include "../op_checks.h"', '#include "op_checks.h"')
    src = src.replace('#include "../kernels.h"', '#include "kernels.h"')
    return re.sub(r"(\w+)<<<([^,]+),\s*(\w+),\s*(\w+),\s*c10::cuda::getCurrentCUDAStream\(\)>>>\((.*?)\);",
                  lambda m: f"{launch}({m.group(2)}, {m.group(3)}, {m.group(4)}, [&] {{ {m.group(1)}({m.group(5)}); }});",
                  src, flags=re.S)


def common_emu() -> str:
    s = (CSRC / "cuda" / "common.cuh").read_text()
    s = s.replace("#include <cuda_fp16.h>", "").replace('#include "../philox.h"', '#include "philox.h"')
    s = re.sub(r"#include <c10/cuda/[^>]+>\n", "", s)
    a, b = s.index("// An attribute of the current device"), s.index("}  // namespace cuda")
    return s[:a] + s[b:]


REG = """#include <torch/library.h>
#include "kernels.h"
TORCH_LIBRARY({ns}, m) {{ {defs} }}
TORCH_LIBRARY_IMPL({ns}, CPU, m) {{ {impls} }}
"""


def build(work: Path, ns: str, files: list[str], ops: list[str], prelude: str, std: str):
    d = work / ns
    d.mkdir()
    srcs = []
    for f in files:
        p = d / f"{f}.cpp"
        p.write_text(rewrite((CSRC / "cuda" / f"{f}.cu").read_text(), "emu_launch"))
        srcs.append(str(p))
    (d / "common_emu.cuh").write_text(common_emu())
    reg = d / "reg.cpp"
    reg.write_text(REG.format(ns=ns, defs=" ".join(f'm.def("{o}{SCHEMAS[o]}");' for o in ops),
                              impls=" ".join(f'm.impl("{o}", &safepatch::cuda::{o});' for o in ops)))
    cpp_extension.load(name=ns, sources=srcs + [str(reg)], build_directory=str(d), is_python_module=False,
                       extra_cflags=["-O1", std, "-ffp-contract=off", "-include", str(HERE / prelude), "-w",
                                     "-pthread"],
                       extra_ldflags=["-pthread"],
                       extra_include_paths=[str(d), str(HERE), str(CSRC), str(cuda_include())])
    return getattr(torch.ops, ns)


def check_merge(E, g) -> int:
    cases = 0
    for n, mode, dts, deltas, offset, mis, drop, p, order in itertools.product(
            (1, 5, 1031), range(4),
            ((torch.bfloat16, torch.bfloat16, torch.float32, torch.bfloat16),
             (torch.float16, torch.float32, torch.float16, torch.float16),
             (torch.float32, torch.bfloat16, torch.bfloat16, torch.float32)),
            (True, False), (0, 3, (1 << 33) + 6), (False, True), (None, "se"), (0.6, 1.0),
            ref.RETENTION_ORDERS):
        if order == "before_selection" and p == 1.0:
            continue  # the same merge as after_selection (nothing drawn)
        bdt, pdt, sdt, odt = dts
        base = torch.randn(n + 1, generator=g)
        d = [torch.randn(n + 1, generator=g) * 0.02 for _ in range(2)]
        s = [torch.rand(n + 1, generator=g) * (torch.rand(n + 1, generator=g) > 0.1) for _ in range(2)]
        pt = d if deltas else [base + x for x in d]
        full = [base.to(bdt), pt[0].to(pdt), pt[1].to(pdt), s[0].to(sdt), s[1].to(sdt)]
        ins = [t[1:] if mis else t[:n] for t in full]  # [1:]: misaligned, scalar path
        if drop:
            ins[1] = ins[3] = None
        kw = dict(t_se=0.7, t_osm=0.75, mode=ref.MODES[mode], alpha=1.25, beta=0.75, p=p, rescale=True,
                  seed=2**33 + 5, name="w", offset=offset, patches_are_deltas=deltas, out_dtype=odt,
                  return_masks=True, retention_order=order)
        counts_want, counts_got = torch.zeros(2, dtype=torch.int64), torch.full((2,), 7, dtype=torch.int64)
        want = ref.masked_merge(*ins, **kw, applied_counts=counts_want)
        args = [*ins, ref.threshold_key(0.7), ref.threshold_key(0.75), mode, 1.25 / p, 0.75 / p,
                P.keep_threshold(p), (2**33 + 5) & 0xFFFFFFFF, P.fnv1a32("w"), offset, deltas, odt, True]
        what = (n, mode, dts, deltas, offset, mis, drop, p, order)
        if order == "after_selection" and cases % 2 == 0:  # the original schema's arguments
            got = E.masked_merge(*args)
            counts_got += counts_want
        else:
            got = E.masked_merge(*args, order == "before_selection", counts_got)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), what
        assert torch.equal(counts_got - 7, counts_want), (what, counts_got, counts_want)
        cases += 1
    return cases


def check_saliency(E, g) -> int:
    cases = 0
    for wdt, gdt, mis, n in itertools.product(FLOATS, FLOATS, (False, True), (1, 7, 1001)):
        s = torch.randn(n + 1, generator=g)
        w, gr = torch.randn(n + 1, generator=g).to(wdt), torch.randn(n + 1, generator=g).to(gdt)
        sl = slice(1, None) if mis else slice(0, n)
        want = ref.saliency_accumulate_(s[sl].clone(), w[sl], gr[sl], 0.37)
        got = s[sl].clone()
        E.saliency_accumulate_(got, w[sl], gr[sl], 0.37)
        assert torch.equal(got, want), (wdt, gdt, mis, n)
        cases += 1
    return cases


def fold_nan(h: torch.Tensor) -> torch.Tensor:
    """Digit-0 histogram with each sign's NaN bins summed (fp16 NaN payloads depend on the
    widening path, torch's own included)."""
    h = h.clone()
    for lo in (0x7F81, 0xFF81):
        h[lo] = h[lo:lo + 0x7F].sum()
        h[lo + 1:lo + 0x7F] = 0
    return h


def check_histogram(E, g) -> int:
    cases = 0
    for dt, n in itertools.product(FLOATS, (7, 57344 * 2 + 12345)):
        x = (torch.rand(n + 1, generator=g) ** 4 * torch.randint(0, 3, (n + 1,), generator=g)).to(dt)
        x[:8] = torch.tensor([-0.0, 0.0, -1.0, float("inf"), float("nan"), 1e-45, 3e38, -3e-39]).to(dt)
        for xs in (x[:n], x[1:]):
            keys = ref.score_keys(xs)
            finite = keys[keys < 0x7F800000]  # digit 1 under a NaN prefix would depend on payloads
            for digit, prefix in ((0, 0), (1, int(finite[len(finite) // 2]) >> 16), (1, 0)):
                want, got = ref.radix_histogram(xs, prefix, digit), E.radix_histogram(xs, prefix, digit)
                if digit == 0:
                    want, got = fold_nan(want), fold_nan(got)
                assert torch.equal(got, want), (dt, n, digit, prefix)
                cases += 1
    for dt, n, offset, p in itertools.product(FLOATS, (5, 9000), (0, 3, (1 << 33) + 6), (0.3, 0.85)):
        x = (torch.rand(n + 1, generator=g) ** 4 * torch.randint(0, 3, (n + 1,), generator=g)).to(dt)
        x[:4] = torch.tensor([-1.0, float("inf"), 0.0, -0.0]).to(dt)  # invalid keys stay counted
        for xs in (x[:n], x[1:]):  # aligned (vector loads where offset allows) and misaligned
            keys = ref.score_keys(xs)
            pos = keys[(keys > 0) & (keys < 0x7F800000)]
            under = [(1, int(pos[len(pos) // 2]) >> 16)] if len(pos) else []
            for digit, prefix in [(0, 0), (1, 0)] + under:
                kw = dict(p=p, seed=2**33 + 5, name="w", patch_id=digit, offset=offset)
                want = ref.radix_histogram(xs, prefix, digit, **kw)
                got = E.radix_histogram(xs, prefix, digit, P.keep_threshold(p), (2**33 + 5) & 0xFFFFFFFF,
                                        P.fnv1a32("w"), digit, offset)
                assert torch.equal(got, want), ("retained", dt, n, offset, p, digit, prefix)
                cases += 1
    same = torch.full((57344 * 3 + 5,), 0.375)  # one bin over several rounds of 16-bit counters
    assert int(E.radix_histogram(same, 0, 0).max()) == same.numel()
    zeros = torch.zeros(70_001)  # bin 0 is counted per thread and summed per warp and block
    assert int(E.radix_histogram(zeros, 0, 0)[0]) == zeros.numel()
    return cases + 2


def main() -> int:
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="safepatch_cuda_emu_") as tmp:
        work = Path(tmp)
        seq = build(work, "safepatch_emu_seq", ["saliency"], ["saliency_accumulate_"], "emu_seq.h", "-std=c++17")
        print("saliency_accumulate_:", check_saliency(seq, g), "cases identical")
        thr = build(work, "safepatch_emu_threads", ["histogram", "merge"], ["radix_histogram", "masked_merge"],
                    "emu_threads.h", "-std=c++20")
        print("masked_merge:", check_merge(thr, g), "cases identical to the reference")
        print("radix_histogram:", check_histogram(thr, g), "cases identical")
    return 0


if __name__ == "__main__":
    sys.exit(main())
