"""Utility proxy: the model's perplexity on benign reference answers.

The default reference answers ship with the package (`data/eval/`, 100 benign instructions
answered by Llama-3-8B-Instruct; licence and attribution in `data/DATA_LICENSES.md`); any
JSONL file with `prompt` and `response` fields can replace them. A patch that damages general
ability raises this number; lm-evaluation-harness remains the real utility measure.
"""
from __future__ import annotations

import math
from importlib import resources
from pathlib import Path

from ..errors import DataError
from .suites import read_records

REFERENCE_NAME = "benign_reference_completions.jsonl"


def default_reference_path() -> Path:
    """The packaged reference answers (JSONL, 100 rows of `prompt`, `response`, `source`)."""
    return Path(str(resources.files("safepatch_merge") / "data" / "eval" / REFERENCE_NAME))


def load_reference(path: str | Path | None = None, limit: int | None = None
                   ) -> list[tuple[str, str]]:
    """(prompt, response) pairs, the first `limit` of the file (its order is fixed)."""
    path = Path(path) if path else default_reference_path()
    if not path.is_file():
        raise DataError(f"{path}: reference answers not found (give --utility-file FILE, or "
                        "--no-utility to skip the perplexity check)")
    rows = read_records(path)
    pairs = [(r.get("prompt"), r.get("response")) for r in rows]
    if not pairs or any(not isinstance(p, str) or not isinstance(c, str) or not c.strip()
                        for p, c in pairs):
        raise DataError(f"{path}: expected rows with non-empty 'prompt' and 'response'")
    return pairs[:limit] if limit else pairs


def reference_perplexity(model, tok, pairs: list[tuple[str, str]], batch_size: int = 4,
                         max_response_tokens: int = 256, chat_template: bool = True,
                         n_boot: int = 1000, seed: int = 0, progress: bool = True) -> dict:
    """Perplexity of the responses given their prompts (response tokens only, prompt in the
    chat template as a user turn), token-weighted over all documents, responses truncated to
    `max_response_tokens`. Returns {n_docs, n_tokens, mean_nll (nats/token), perplexity,
    ci95 (percentile bootstrap over documents, `n_boot` resamples)}."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    docs = []
    for prompt, response in pairs:
        if chat_template:
            if tok.chat_template is None:
                raise DataError("the tokenizer has no chat template; use --no-chat-template")
            head = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)
            p_ids = tok(head, add_special_tokens=False).input_ids
        else:
            p_ids = tok(prompt + "\n", add_special_tokens=True).input_ids
        r_ids = tok(response, add_special_tokens=False).input_ids[:max_response_tokens]
        docs.append((p_ids, r_ids))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    doc_nll, doc_n = [], []
    bar = tqdm(total=len(docs), desc="perplexity", unit="doc", disable=not progress)
    for s in range(0, len(docs), batch_size):
        chunk = docs[s:s + batch_size]
        width = max(len(p) + len(r) for p, r in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        att = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        for i, (p, r) in enumerate(chunk):  # right padding: positions stay 0..len-1
            seq = p + r
            ids[i, :len(seq)] = torch.tensor(seq)
            att[i, :len(seq)] = 1
            labels[i, len(p):len(seq)] = torch.tensor(r)
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=att.to(device)).logits
        logits = logits[:, :-1]
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # the NLL in at least fp32
        tgt = labels[:, 1:].to(device)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                              ignore_index=-100, reduction="none").view(tgt.shape)
        mask = tgt != -100
        doc_nll += (nll * mask).sum(1).double().cpu().tolist()
        doc_n += mask.sum(1).cpu().tolist()
        bar.update(len(chunk))
    bar.close()
    nll_a, n_a = np.array(doc_nll), np.array(doc_n, dtype=np.float64)
    total = float(n_a.sum())
    if total == 0:
        raise DataError("reference responses tokenised to nothing")
    mean = float(nll_a.sum() / total)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(docs), size=(n_boot, len(docs)))
    boot = nll_a[idx].sum(1) / np.maximum(n_a[idx].sum(1), 1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"n_docs": len(docs), "n_tokens": int(total), "mean_nll": mean,
            "perplexity": math.exp(mean), "ci95": [math.exp(lo), math.exp(hi)],
            "max_response_tokens": max_response_tokens}
