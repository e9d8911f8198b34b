"""Runs `safepatch` commands in one process of a multi-process launch (torchrun or accelerate
launch) and records, per rank, what each command returned and printed on stderr, the world
size, and which training examples the rank's derive loop saw. Used by test_distributed.py.

    python dist_driver.py JOB.json OUT_DIR

JOB.json: {"commands": [[argv...], ...], "fail": {"command": i, "rank": r} (optional)}.
"fail" makes the loss of rank r's first training batch in command i raise a DataError (a
stand-in for a failure that happens on one rank only). OUT_DIR/rank<R>.json receives
{"rank", "world_size", "results": [{"rc", "stderr", "train_batches"}, ...]}, where
train_batches lists, per micro-batch, the response tokens of each example.
"""
import contextlib
import io
import json
import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    import logging

    import transformers

    import safepatch_merge.derive.train as train
    from safepatch_merge.cli import main as cli
    from safepatch_merge.derive.dataset import IGNORE_INDEX
    from safepatch_merge.errors import DataError

    rank = int(os.environ["RANK"])
    fail = job.get("fail") or {}
    orig = train.batch_loss
    state = {"batches": [], "fail": False}

    def recording_loss(objective, model, batch, *args, **kwargs):
        """The training step's loss (held-out evaluation does not go through it)."""
        if state["fail"]:
            raise DataError("injected failure in this rank's training batch")
        state["batches"].append([row[row != IGNORE_INDEX].tolist() for row in batch["labels"]])
        return orig(objective, model, batch, *args, **kwargs)

    train.batch_loss = recording_loss
    # logs and progress bars go to the real stderr; a command's captured stderr is its own
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    transformers.utils.logging.disable_progress_bar()
    results = []
    for i, argv in enumerate(job["commands"]):
        state["batches"] = []
        state["fail"] = fail.get("command") == i and fail.get("rank") == rank
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = cli(argv)
        results.append({"rc": rc, "stderr": err.getvalue(), "train_batches": state["batches"]})
    ws = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    (out / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "world_size": ws,
                                                      "results": results}))


if __name__ == "__main__":
    main()
