"""Sizes and hyperparameters of the pattern-reproduction experiment, by preset.

Three presets share one schema: `gpu` (one CUDA GPU, a few minutes), `cpu` (2 cores, about two
hours, smaller prompt sets and budgets) and `smoke` (an end-to-end check in minutes: tiny sizes,
numbers meaningless). Every value here is ours; the paper (arXiv 2405.13820) publishes none of
its patch-derivation or merge hyperparameters.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace


def _sweep_default() -> list[dict]:
    # (a, b, alpha, beta, p): the default point first, then one knob moved at a time, so each
    # row of the sweep says what that knob does. alpha/beta also absorb a patch that came out
    # too weak or too strong (the merge scales deltas linearly).
    return [
        {"a": 0.10, "b": 0.10, "alpha": 1.0, "beta": 1.0, "p": 1.0},
        {"a": 0.05, "b": 0.05, "alpha": 1.0, "beta": 1.0, "p": 1.0},
        {"a": 0.30, "b": 0.30, "alpha": 1.0, "beta": 1.0, "p": 1.0},
        {"a": 0.10, "b": 0.10, "alpha": 2.0, "beta": 1.0, "p": 1.0},
        {"a": 0.10, "b": 0.10, "alpha": 1.0, "beta": 0.5, "p": 1.0},
        {"a": 0.10, "b": 0.10, "alpha": 1.0, "beta": 1.0, "p": 0.5},
    ]


@dataclass
class Preset:
    """One configuration of the whole experiment.

    sft_*: safety tuning of the shipped backbone (gradient descent on a mix of refusals to
    harmful instructions and benign Alpaca answers). `sft_steps` are cumulative budgets of
    candidate backbones (each continues the previous one); the first candidate whose
    compliance on HarmBench *validation* prompts is at most `calib_target` becomes the
    backbone (else the most refusing one), so no test prompt steers the choice. A candidate
    also needs Alpaca refusal <= `calib_benign_max` and, when `calib_xstest` > 0, refusal of
    that many held-out XSTest safe prompts (removed from the reported XSTest set) <=
    `calib_xstest_max`.
    dh_pairs: rows of harmful_pairs.jsonl used as D_h (fixed random subset, seed).
    se_* / osm_*: the two patches (gradient ascent / descent on D_h), full-parameter AdamW.
    eval_limit: prompts per evaluation suite (fixed subset after deduplication).
    ties_density: TIES keeps this fraction of each delta (the same budget as the default a, b).
    """

    name: str = "gpu"
    # safety tuning
    sft_refusals: int = 1200
    sft_benign: int = 1000
    sft_steps: tuple = (50, 100, 200, 400)
    sft_batch: int = 32
    sft_lr: float = 5e-5
    sft_max_length: int = 256
    calib_limit: int = 80
    calib_benign: int = 64
    calib_target: float = 0.35
    calib_benign_max: float = 0.5
    calib_xstest: int = 0
    calib_xstest_max: float = 1.0
    # harmful data and patches
    dh_pairs: int = 320
    patch_batch: int = 16
    patch_max_length: int = 320
    se_steps: int = 40
    se_lr: float = 2e-5
    se_nll_ceiling: float = 8.0
    osm_steps: int = 40
    osm_lr: float = 2e-5
    score_examples: int = 320
    score_batch: int = 16
    # evaluation
    eval_limit: int = 250
    max_new_tokens: int = 64
    eval_batch: int = 256
    utility_limit: int = 100
    utility_max_tokens: int = 128
    # merges
    ties_density: float = 0.1
    intersection_rate: float = 0.1
    sweep: list = field(default_factory=_sweep_default)
    seed: int = 0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["sft_steps"] = list(self.sft_steps)
        return d


def _sweep_next() -> list[dict]:
    # After run 1 (experiments/results/analysis.md): a and b moved together said nothing about
    # the OSM side, alpha = 2 broke the model, beta = 0.5 changed nothing. Next: b apart from a,
    # a weaker SE scale, a stronger OSM scale.
    return [
        {"a": 0.10, "b": 0.10, "alpha": 1.0, "beta": 1.0, "p": 1.0},
        {"a": 0.05, "b": 0.05, "alpha": 1.0, "beta": 1.0, "p": 1.0},
        {"a": 0.30, "b": 0.30, "alpha": 1.0, "beta": 1.0, "p": 1.0},
        {"a": 0.10, "b": 0.30, "alpha": 1.0, "beta": 1.0, "p": 1.0},
        {"a": 0.05, "b": 0.30, "alpha": 1.0, "beta": 1.0, "p": 1.0},
        {"a": 0.10, "b": 0.10, "alpha": 0.5, "beta": 1.0, "p": 1.0},
        {"a": 0.10, "b": 0.10, "alpha": 1.0, "beta": 2.0, "p": 1.0},
        {"a": 0.10, "b": 0.10, "alpha": 1.0, "beta": 1.0, "p": 0.5},
    ]


# Run 1 on an H200 (experiments/results/) used `gpu-run1`. Its first SFT candidate (50 steps)
# already refused 72% of XSTest's safe prompts (paper's backbone: 8%), and the SE patch pushed
# to 8.9 nats collapsed into one canned non-answer. `gpu` is the next run: a finer SFT ladder
# starting at 5 steps, over-refusal calibrated on 50 held-out XSTest safe prompts, an SE patch
# stopped at 4 nats, and a sweep that moves b apart from a. Run 2 used it (results/run2/:
# the 5-step rung was chosen; 10 steps already over-refused 78 % of held-out XSTest).
_NEXT = dict(sft_steps=(5, 10, 20, 35, 50, 100), calib_benign_max=0.15, calib_xstest=50,
             calib_xstest_max=0.20, se_nll_ceiling=4.0, sweep=_sweep_next())

PRESETS = {
    "gpu": Preset(**_NEXT),
    "gpu-run1": Preset(name="gpu-run1"),
    # 2 CPU cores: a fraction of the GPU budgets and 100 prompts per suite, sized by a FLOP
    # estimate for about two hours (see experiments/README.md; not measured end to end).
    "cpu": Preset(name="cpu", sft_refusals=800, sft_benign=800,
                  sft_batch=8, sft_max_length=160, calib_limit=40, calib_benign=32,
                  dh_pairs=240, patch_batch=8, patch_max_length=192, se_steps=25, osm_steps=25,
                  score_examples=96, score_batch=8, eval_limit=100, eval_batch=16,
                  utility_limit=50,
                  # (its first ladder, 20/40/80/120 steps, overshot at once: 20 steps at batch 8
                  # refused 70 % of held-out XSTest; run 2 on the GPU chose 5 steps at batch 32,
                  # and at the same learning rate the number of updates is what counts)
                  **dict(_NEXT, sft_steps=(3, 5, 8, 12, 20), calib_xstest=30)),
    "smoke": Preset(name="smoke", sft_refusals=16, sft_benign=16, sft_steps=(2, 4),
                    sft_batch=2, sft_max_length=64, calib_limit=4, calib_benign=4,
                    dh_pairs=16, patch_batch=2, patch_max_length=64, se_steps=2, osm_steps=2,
                    score_examples=4, score_batch=2, eval_limit=6, max_new_tokens=12,
                    eval_batch=8, utility_limit=4, utility_max_tokens=32,
                    calib_xstest=4, sweep=_sweep_default()[:2]),
}


def get_preset(name: str, **overrides) -> Preset:
    """The named preset with `overrides` (non-None values) applied."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})
