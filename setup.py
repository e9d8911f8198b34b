"""Package discovery only (metadata lives in pyproject.toml).

`triton_kernels/` and `csrc/` sit at the top of the repository but install as
`safepatch_merge.triton_kernels` and `safepatch_merge.csrc`: the top-level import name
`triton_kernels` belongs to Triton's own kernel library, so we never claim it.
"""
from setuptools import find_packages, setup

packages = find_packages(include=["safepatch_merge", "safepatch_merge.*"])
packages += ["safepatch_merge.triton_kernels", "safepatch_merge.csrc"]
setup(packages=packages)
