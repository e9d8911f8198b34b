"""The merge's last files: index, copied backbone files, provenance and model card."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping, Sequence

from ..io.checkpoint import Checkpoint

from ..io.writer import OutputBuilder, ShardPlan, index_json
from ..io.links import trusted_target
from ..versions import versions
from .card import COPY_FILES, TOKENIZER_FILES, model_card, provenance, rewrite_config_dtype
from .config import MergeConfig
from .methods import MergeMethod

log = logging.getLogger("safepatch_merge.merge")


def finish_files(cfg: MergeConfig, method: MergeMethod, builder: OutputBuilder,
                 ckpts: Mapping[str, Checkpoint], shards: Sequence[ShardPlan], summary: dict,
                 backend_name: str, plan_id: str,
                 content_sha256: Mapping[Path, str] | None = None) -> None:
    """Add the index (several shards), the backbone's config / generation / tokenizer files
    (config.json with the output dtype), the provenance and the model card to `builder`'s
    OUT.partial. content_sha256: {input file: sha256} with output.hash_inputs."""
    base = ckpts["base"]
    if len(shards) > 1:
        builder.add_file("model.safetensors.index.json", index_json(shards))
    names = COPY_FILES + (TOKENIZER_FILES if cfg.output.copy_tokenizer else ())
    extra = [p.name for p in sorted(base.root.glob("*.jinja"))] if cfg.output.copy_tokenizer else []
    out_dtype = None if cfg.output.dtype == "auto" else cfg.output.dtype
    for fname in list(names) + extra:
        src = base.root / fname
        if not os.path.lexists(src):
            continue
        real = trusted_target(src, base.root, what=f"backbone file {src}")  # the link rule
        if fname == "config.json" and out_dtype is not None:
            builder.add_file(fname, rewrite_config_dtype(real.read_bytes(), out_dtype))
        else:
            builder.copy_file(real, fname)  # a regular file with the target's bytes
    if not (base.root / "config.json").is_file():
        log.warning("backbone %s has no config.json; the output cannot be loaded with "
                    "from_pretrained without one", base.source)
    shard_info = [{"file": s.filename, **builder.done[s.filename]} for s in shards]
    prov = provenance(cfg, method, ckpts, summary, backend_name, plan_id, shard_info, versions(),
                      content_sha256)
    builder.add_file("safepatch_provenance.json", prov)
    if cfg.output.model_card:
        builder.add_file("README.md", model_card(cfg, method, ckpts, summary))
