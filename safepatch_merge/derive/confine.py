"""Confinement: which parameters a derivation may change.

Patterns are shell-style globs (fnmatch) over checkpoint tensor names, e.g.
`model.embed_tokens.weight`, `lm_head.weight`, `model.layers.3.input_layernorm.weight`.
A parameter trains iff (no include pattern is given, or one matches one of its names) and no
exclude pattern matches any of its names; a tied parameter (embeddings shared with the output
head) has both names, so excluding either freezes both. With LoRA the adapter matrices of a
module answer to the module's weight name (`...q_proj.lora_A.default.weight` to
`...q_proj.weight`), so excluding a layer's weight also freezes its adapter: its B matrix
stays zero and the saved merged weight is the backbone's, byte for byte.

Freezing the embeddings, output head and norms (`--train-exclude 'model.embed_tokens.*'
'lm_head.*' '*norm*'`) keeps an ascent objective from moving the token geometry and the scale
of every layer, the parameters through which it most easily wrecks the whole model.
"""
from __future__ import annotations

import re
from fnmatch import fnmatchcase

import torch

from ..errors import ConfigError

_PEFT_PREFIX = "base_model.model."
_LORA_PART = re.compile(r"\.(lora_[AB]|lora_embedding_[AB]|lora_magnitude_vector)\.[^.]+(\.weight)?$")


def stored_name(module_name: str) -> str:
    """The checkpoint tensor name a (PEFT-wrapped, LoRA) parameter name answers to."""
    n = module_name[len(_PEFT_PREFIX):] if module_name.startswith(_PEFT_PREFIX) else module_name
    n = n.replace(".base_layer.", ".")
    if _LORA_PART.search(n):
        n = _LORA_PART.sub("", n) + ".weight"
    return n


def confine(model: torch.nn.Module, include: list[str] | None, exclude: list[str] | None
            ) -> dict:
    """Freeze the parameters the patterns leave out (requires_grad False); among the
    parameters that were trainable, keep the rest trainable.

    Returns {"trainable": n elements, "frozen": n elements, "frozen_tensors": [names]}
    (stored names, sorted). Raises ConfigError if a pattern matches no parameter of the model
    (a typo would otherwise silently train everything) or nothing is left to train.
    """
    include, exclude = list(include or []), list(exclude or [])
    names_of: dict[int, set] = {}
    param_of: dict[int, torch.nn.Parameter] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), set()).add(stored_name(name))
        param_of[id(p)] = p
    all_names = set().union(*names_of.values()) if names_of else set()
    for pat in include + exclude:
        if not any(fnmatchcase(n, pat) for n in all_names):
            raise ConfigError(f"trainable-parameter pattern {pat!r} matches no parameter of the "
                              "model (names look like model.layers.0.mlp.up_proj.weight)")
    frozen, trained, frozen_names = 0, 0, set()
    for pid, p in param_of.items():
        if not p.requires_grad:
            continue
        names = names_of[pid]
        keep = (not include or any(fnmatchcase(n, pat) for n in names for pat in include)) and \
            not any(fnmatchcase(n, pat) for n in names for pat in exclude)
        if keep:
            trained += p.numel()
        else:
            p.requires_grad_(False)
            frozen += p.numel()
            frozen_names |= names
    if trained == 0:
        raise ConfigError("the trainable-parameter patterns leave nothing to train")
    return {"trainable": trained, "frozen": frozen, "frozen_tensors": sorted(frozen_names)}
