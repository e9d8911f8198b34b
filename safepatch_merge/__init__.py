"""safepatch_merge: post-safety alignment of LLMs by safety patching (SafePatching, arXiv 2405.13820).

Data flow: harmful data -> derive (two patches) -> score (SNIP saliency) -> merge (exact top-k
thresholds, one streaming masked merge) -> patched checkpoint -> eval -> push.
"""
__version__ = "0.1.0"
