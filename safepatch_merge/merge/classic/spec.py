"""The four classic merges as mergekit 0.1.5 defines them: names, parameters and defaults.

All four are mergekit's "generalized task arithmetic" (merge_methods/generalized_task_arithmetic.py
and registry.py): every non-base model i contributes a delta d_i = θ_i − θ_base, optionally
sparsified per tensor, multiplied by its weight w_i, combined (a plain sum, or TIES's sign
election and disjoint sum), optionally divided by the summed weights, scaled by lambda and
added to the base. See docs/classic_merges.md for the exact arithmetic.

| method          | sparsify          | consensus | normalize | rescale |
|-----------------|-------------------|-----------|-----------|---------|
| task_arithmetic | none              | none      | False     | False   |
| ties            | magnitude (top-k) | sum       | True      | False   |
| dare_ties       | random (Bernoulli)| sum       | False     | True    |
| dare_linear     | random (Bernoulli)| none      | False     | True    |
"""
from __future__ import annotations

from dataclasses import dataclass

SPARSIFY_NONE = None
SPARSIFY_MAGNITUDE = "magnitude"
SPARSIFY_RANDOM = "random"


@dataclass(frozen=True)
class MethodSpec:
    """One classic merge: how deltas are sparsified, whether signs are elected, and the
    defaults of its shared parameters (mergekit's, not ours)."""

    name: str
    sparsify: str | None
    consensus: bool
    default_normalize: bool
    default_rescale: bool
    pretty_name: str
    reference_url: str


METHODS: dict[str, MethodSpec] = {m.name: m for m in (
    MethodSpec("task_arithmetic", SPARSIFY_NONE, False, False, False, "Task Arithmetic",
               "https://arxiv.org/abs/2212.04089"),
    MethodSpec("ties", SPARSIFY_MAGNITUDE, True, True, False, "TIES",
               "https://arxiv.org/abs/2306.01708"),
    MethodSpec("dare_ties", SPARSIFY_RANDOM, True, False, True, "DARE TIES",
               "https://arxiv.org/abs/2311.03099"),
    MethodSpec("dare_linear", SPARSIFY_RANDOM, False, False, True, "Linear DARE",
               "https://arxiv.org/abs/2311.03099"),
)}

# Parameters shared by all inputs of a tensor (mergekit's ParameterScope.SHARED), with the
# value type; defaults of normalize/rescale depend on the method (MethodSpec).
SHARED_PARAMETERS = {"normalize": bool, "rescale": bool, "lambda": float, "int8_mask": bool}
# Parameters of each non-base model (ParameterScope.NON_BASE). weight has no default.
MODEL_PARAMETERS = {"weight": float, "density": float}
DEFAULT_DENSITY = 1.0
DEFAULT_LAMBDA = 1.0


@dataclass(frozen=True)
class TensorParams:
    """Resolved parameters of one output tensor.

    weights, densities: one float per non-base model, in config order. normalize, rescale,
    lam (mergekit's `lambda`): shared. int8_mask is accepted by mergekit as a memory option and
    changes no value, so it is not carried here.
    """

    weights: tuple[float, ...]
    densities: tuple[float, ...]
    normalize: bool
    rescale: bool
    lam: float = DEFAULT_LAMBDA

    def __post_init__(self):
        if len(self.weights) != len(self.densities):
            raise ValueError("weights and densities must have one entry per model")


def get_method(name: str) -> MethodSpec:
    """The MethodSpec called `name`; ValueError listing the known ones otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown classic merge method {name!r}; "
                         f"known: {', '.join(METHODS)}") from None


def default_params(method: str | MethodSpec, weights, densities=None, *, normalize=None,
                   rescale=None, lam: float = DEFAULT_LAMBDA) -> TensorParams:
    """TensorParams with mergekit's defaults for whatever is not given (density 1.0,
    normalize/rescale per method, lambda 1.0)."""
    spec = get_method(method) if isinstance(method, str) else method
    weights = tuple(float(w) for w in weights)
    densities = tuple(float(d) for d in (densities if densities is not None
                                          else [DEFAULT_DENSITY] * len(weights)))
    return TensorParams(weights, densities,
                        spec.default_normalize if normalize is None else bool(normalize),
                        spec.default_rescale if rescale is None else bool(rescale), float(lam))
