"""Build the csrc extension ahead of time, e.g. when preparing an image or a CI cache:

    python -m safepatch_merge.ops.build

Otherwise the first call that needs the extension builds it (docs/design.md §2, Builds).
Prints where the build lives; exits 1 with the reason when it cannot build or is disabled.
"""
from __future__ import annotations

import sys

from . import _extension


def main() -> int:
    """Build (or find) and load the extension; 0 when its kernels are registered."""
    if _extension.disabled():
        print("error: SAFEPATCH_NO_EXT=1 disables the extension", file=sys.stderr)
        return 1
    if not _extension.load():
        print(f"error: the C++ extension did not build: {_extension.error()}", file=sys.stderr)
        return 1
    kinds = "CPU and CUDA kernels" if _extension.has_cuda() else "CPU kernels"
    print(f"safepatch extension ready ({kinds}): {_extension.library_path()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
