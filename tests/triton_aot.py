"""Compile the Triton kernels for sm_90 (Hopper) without a GPU; run as a script.

Used by tests/test_triton_ops.py in a subprocess without TRITON_INTERPRET (the interpreter
replaces @triton.jit functions, so nothing could be compiled in the test process). Catches
what the interpreter cannot: code that does not lower to PTX, and arguments Triton
specialises into constants (ints equal to 1). Exits non-zero on the first failure.
"""
import sys
import warnings

warnings.filterwarnings("ignore")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from safepatch_merge.triton_kernels import histogram, masked_merge, philox, saliency  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def compile_one(fn, sig: dict, consts: dict, num_warps: int = 8) -> None:
    """Compile once as given, and once with every specialisable int argument equal to 1
    (Triton makes those compile-time constants at launch)."""
    _compile(fn, sig, consts, num_warps)
    ones = {p.name for p in fn.params if sig.get(p.name) in ("i32", "i64") and not p.do_not_specialize}
    _compile(fn, {k: "constexpr" if k in ones else t for k, t in sig.items()},
             {**consts, **{k: 1 for k in ones}}, num_warps)


def _compile(fn, sig: dict, consts: dict, num_warps: int) -> None:
    attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(sig.values()) if t.startswith("*")}
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs), target=TARGET,
                   options={"num_warps": num_warps})


def main() -> int:
    merge_cases = [  # HAS_SE, HAS_OSM, MODE, DRAW, RETAIN_FIRST, DELTAS, MASKS, COUNT, SHIFT, out
        (True, True, 0, True, False, True, False, False, 0, "bf16"),
        (True, True, 1, True, False, False, True, True, 3, "fp16"),
        (True, False, 2, False, False, True, True, False, 1, "fp32"),
        (False, True, 3, False, False, False, True, True, 0, "fp16"),
        (True, True, 0, False, True, True, False, True, 2, "bf16"),  # retention before selection
        (True, False, 1, False, True, False, False, False, 0, "fp32"),
    ]
    for has_se, has_osm, mode, draw, first, deltas, masks, count, shift, out in merge_cases:
        sig = {"base_ptr": "*bf16", "pse_ptr": "*fp32", "posm_ptr": "*fp16", "sse_ptr": "*fp16",
               "sosm_ptr": "*bf16", "out_ptr": f"*{out}", "mse_ptr": "*u8", "mosm_ptr": "*u8",
               "counts_ptr": "*i64", "n": "i64", "blk0": "i64",
               "key_se": "i32", "key_osm": "i32", "c_se": "fp32", "c_osm": "fp32", "keep_i32": "i32",
               "seed_i32": "i32", "hash_i32": "i32"}
        consts = dict(HAS_SE=has_se, HAS_OSM=has_osm, MODE=mode, DRAW=draw, RETAIN_FIRST=first,
                      DELTAS=deltas, MASKS=masks, COUNT=count, SHIFT=shift,
                      ROWS=256)  # the launcher's default launch: rows=256, 4 warps
        sig.update({k: "constexpr" for k in consts})
        compile_one(masked_merge._masked_merge_kernel, sig, consts, num_warps=4)
    for dt, digit in (("fp32", 0), ("bf16", 1), ("fp16", 1)):
        sig = {"x_ptr": f"*{dt}", "hist_ptr": "*i32", "n": "i64", "prefix": "i32",
               "DIGIT": "constexpr", "COPIES": "constexpr", "BLOCK": "constexpr"}
        consts = dict(DIGIT=digit, COPIES=4, BLOCK=4096)
        compile_one(histogram._histogram_kernel, sig, consts)
        sig = {"x_ptr": f"*{dt}", "hist_ptr": "*i32", "n": "i64", "blk0": "i64", "prefix": "i32",
               "keep_i32": "i32", "seed_i32": "i32", "hash_i32": "i32", "DIGIT": "constexpr",
               "PATCH_ID": "constexpr", "COPIES": "constexpr", "SHIFT": "constexpr",
               "ROWS": "constexpr"}
        consts = dict(DIGIT=digit, PATCH_ID=digit, COPIES=4, SHIFT=digit * 3, ROWS=1024)
        compile_one(histogram._histogram_retained_kernel, sig, consts)
    for w, g in (("bf16", "fp16"), ("fp32", "fp32")):
        sig = {"score_ptr": "*fp32", "w_ptr": f"*{w}", "g_ptr": f"*{g}", "n": "i64", "scale": "fp32",
               "ROWS": "constexpr"}
        compile_one(saliency._saliency_kernel, sig, {"ROWS": 1024})
    sig = {"out_ptr": "*i64", "n": "i64", "blk0": "i64", "seed_i32": "i32", "name_hash_i32": "i32",
           "PATCH_ID": "constexpr", "SHIFT": "constexpr", "ROWS": "constexpr"}
    compile_one(philox._retention_words_kernel, sig, {"PATCH_ID": 1, "SHIFT": 3, "ROWS": 256})
    print("compiled all kernels for", TARGET)
    return 0


if __name__ == "__main__":
    sys.exit(main())
