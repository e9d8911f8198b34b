"""Model card (README.md) and provenance file of a merged checkpoint.

Both are deterministic (no timestamps, no absolute machine state), so the same config and
inputs give byte-identical output directories.
"""
from __future__ import annotations

import json

from .config import HUB_ID

# Copied from the backbone when present; the tokenizer set (chat template included) only when
# output.copy_tokenizer is true. *.jinja chat templates are copied with the tokenizer too.
COPY_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.json", "vocab.txt", "spiece.model")


def rewrite_config_dtype(raw: bytes, dtype: str) -> bytes:
    """config.json bytes with its dtype fields (torch_dtype, dtype) set to `dtype`."""
    cfg = json.loads(raw)
    keys = [k for k in ("torch_dtype", "dtype") if k in cfg] or ["torch_dtype"]
    for k in keys:
        cfg[k] = dtype
    return (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode()


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.6g}"
    return str(x)


def model_card(cfg, method, ckpts, summary: dict) -> bytes:
    """README.md: YAML front matter (base_model when the backbone is a Hub id, tags, library)
    and the method's parameters, thresholds and achieved densities."""
    import yaml

    front = {}
    if HUB_ID.match(cfg.backbone) and not cfg.backbone.startswith((".", "/")):
        front["base_model"] = cfg.backbone
    front["tags"] = list(method.card_tags) + ["safepatch_merge"]
    front["library_name"] = "transformers"
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "",
             f"# Merged with safepatch_merge (method: {cfg.method})", "",
             f"Backbone: `{cfg.backbone}`", ""]
    for role, ck in ckpts.items():
        if role != "base":
            lines.append(f"- {role}: `{ck.source}`")
    lines += ["", "## Parameters", "", "| parameter | value |", "|---|---|"]
    for k, v in (summary.get("parameters") or {}).items():
        lines.append(f"| {k} | {_fmt(v)} |")
    sel = summary.get("selection") or {}
    if sel:
        lines += ["", "## Thresholds and achieved densities", "",
                  "| patch | group | threshold | k | scored | selected | density |",
                  "|---|---|---|---|---|---|---|"]
        for side, s in sel.items():
            for g, r in s["groups"].items():
                lines.append(f"| {side} | {g} | {_fmt(r['threshold'])} | {r['k']} | {r['n']} | "
                             f"{r['selected']} | {r['density']:.6f} |")
            lines.append(f"| {side} | (all) | | | {s['n']} | {s['selected']} | "
                         f"{s['density']:.6f} |")
        short = [(side, g, r) for side, s in sel.items() for g, r in s["groups"].items()
                 if r.get("shortfall")]
        if short:
            lines += ["", "Retention before selection: these groups have fewer retained positive "
                      "scores than k, so every retained positive element is selected:", ""]
            lines += [f"- {side} {g}: {r['selected']} of k = {r['k']} (short by {r['shortfall']})"
                      for side, g, r in short]
    lines += _applied_lines(summary)
    lines += _trim_lines(summary)
    if cfg.method == "safepatch":
        note = ("Defaults of unset parameters are safepatch_merge's own choices: the SafePatching "
                "paper (arXiv 2405.13820) publishes none.")
    else:
        note = ("Defaults of unset parameters are mergekit 0.1.5's for this method (marked "
                "\"mergekit default\" above).")
    lines += ["", note,
              "Full provenance (inputs, hashes, versions): `safepatch_provenance.json`.", ""]
    return "\n".join(lines).encode()


def _trim_lines(summary: dict) -> list[str]:
    """The card's magnitude-trim section (classic merges that trim by magnitude)."""
    trim = summary.get("trim") or {}
    if not trim:
        return []
    lines = ["", "## Magnitude trim", "",
             "Entries kept per model, summed over the merged tensors: mergekit's k per tensor "
             "exactly (ties at a tensor's threshold taken in element-index order; fewer only "
             "where a tensor has fewer than k non-zero deltas).", "",
             "| model | k | kept | elements | density |", "|---|---|---|---|---|"]
    for role, r in trim.items():
        lines.append(f"| {role} | {r['k']} | {r['kept']} | {r['n']} | {r['density']:.6f} |")
    return lines


def _applied_lines(summary: dict) -> list[str]:
    """The card's applied-density section (none when the summary has no applied counts)."""
    applied = summary.get("applied") or {}
    if not applied:
        return []
    before = (summary.get("parameters") or {}).get("retention_order") == "before_selection"
    what = ("M_X (retention before selection: T_X already holds the retained elements R_X)"
            if before else "R_X ⊙ M_X (retention after selection)")
    lines = ["", "## Applied densities", "",
             f"Elements whose patch term was added, {what}, per scored or patched element.", "",
             "| patch | group | elements | applied | density |", "|---|---|---|---|---|"]
    for side, a in applied.items():
        for g, r in a["groups"].items():
            lines.append(f"| {side} | {g} | {r['n']} | {r['applied']} | {r['density']:.6f} |")
        lines.append(f"| {side} | (all) | {a['n']} | {a['applied']} | {a['density']:.6f} |")
    return lines


def provenance(cfg, method, ckpts, summary: dict, backend: str, plan_id: str, shards: list,
               versions: dict, content_sha256: dict | None = None) -> bytes:
    """safepatch_provenance.json: config, inputs (sources, Hub commits, per-file sizes, header
    sha256, the Hub's blob sha256 and, with output.hash_inputs, content sha256), parameters
    and results, backend, output shard sha256s, package versions."""
    def source(ck):
        rec = {"source": ck.source, "files": ck.identity(content_sha256)}
        commit = ck.hub_commit()
        if commit:
            rec["hub_commit"] = commit
        return rec

    doc = {
        "format": "safepatch-merge-provenance", "version": 1, "method": cfg.method,
        "config": cfg.raw,
        "inputs": {role: source(ck) for role, ck in ckpts.items()},
        "result": summary, "seed": (summary.get("parameters") or {}).get("seed"),
        "backend": backend, "plan_id": plan_id, "output_shards": shards, "versions": versions,
    }
    return (json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n").encode()
