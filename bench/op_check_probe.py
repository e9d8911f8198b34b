"""Call the C++ ops directly (torch.ops.safepatch) with good and bad arguments, each call in its
own process, and say which calls return, which raise and which crash (signal: negative rc).

    python3 bench/op_check_probe.py          # run by bench/gpu_check.sh; CUDA cases need a GPU

Why: on the first H200 run, test_cpp_op_checks_its_own_arguments died with SIGSEGV at the
first call that must raise (CPU tensors, a NaN threshold key), which killed the whole pytest
process. Comparing a C++ op's TORCH_CHECK with torch's own shape check, on CPU and CUDA
tensors, tells a crash in our checks from one in raising C++ errors out of the extension.
"""
from __future__ import annotations

import subprocess
import sys

import torch

PRE = """\
import torch
from safepatch_merge.ops import _extension
assert _extension.load(), _extension.error()
b = lambda d: torch.zeros(10, dtype=torch.bfloat16, device=d)
s = lambda d: torch.ones(10, device=d)
mm = lambda d, k: torch.ops.safepatch.masked_merge(b(d), b(d), None, s(d), None, k, 0, 2, 1.0, 1.0,
                                                   1 << 32, 0, 0, 0, True, torch.bfloat16, False)
"""

CASES = {
    "cpu torch's own check": "torch.ones(3) + torch.ones(4)",
    "cpu merge ok": "mm('cpu', 0)",
    "cpu merge NaN key": "mm('cpu', 0x7FC00000)",
    "cpu histogram digit 2": "torch.ops.safepatch.radix_histogram(s('cpu'), 0, 2)",
    "cpu philox_words patch_id -1": "torch.ops.safepatch.philox_words(0, 4, 0, 0, -1)",
}
CUDA_CASES = {
    "cuda merge ok": "mm('cuda', 0)",
    "cuda merge NaN key": "mm('cuda', 0x7FC00000)",
    "cuda histogram digit 2": "torch.ops.safepatch.radix_histogram(s('cuda'), 0, 2)",
    "cuda merge cpu patch": ("torch.ops.safepatch.masked_merge(b('cuda'), b('cpu'), None, s('cuda'), None, 0, 0,"
                             " 2, 1.0, 1.0, 1 << 32, 0, 0, 0, True, torch.bfloat16, False)"),
}


def script(stmt: str) -> str:
    return (PRE + "try:\n    " + stmt + "\n    torch.cuda.synchronize() if torch.cuda.is_available() else None\n"
            "    print('RETURNED')\nexcept Exception as e:\n"
            "    print('RAISED', type(e).__name__, (str(e).splitlines() or [''])[0][:160])\n")


def main() -> int:
    cases = dict(CASES, **(CUDA_CASES if torch.cuda.is_available() else {}))
    procs = {k: subprocess.Popen([sys.executable, "-X", "faulthandler", "-c", script(v)],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for k, v in cases.items()}
    crashed = 0
    for k, p in procs.items():
        out = p.communicate()[0].strip().splitlines()
        print(f"probe {k:30s} rc={p.returncode:4d}  {out[-1] if out else ''}")
        if p.returncode != 0:
            crashed += 1
            print("    " + "\n    ".join(out[-15:]))
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
