"""derive and score in two processes (gloo, on the CPU) equal one process.

- derive under `accelerate launch` (DDP): GA, GD and LoRA-GD patches, per-process batch 2
  against one process with batch 4, on a training set that is a multiple of the global batch;
- score under `torchrun`: data-parallel and FSDP2 (`fully_shard`) against one process, and the
  merges made from those score directories against the single-process merge;
- a failure on one rank (a non-finite loss in scoring, an error in one rank's training batch)
  ends both ranks with the same one-line error and no output.

Each launch starts two Python processes that import torch and transformers; the commands of a
test run inside one launch (tests/dist_driver.py) to pay that once.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from derive_helpers import PAIRS, tiny_setup, write_pairs
from safepatch_merge.cli import main as cli
from safepatch_merge.derive.dataset import IGNORE_INDEX
from safepatch_merge.ops import radix_histogram
from safepatch_merge.merge.select import select_thresholds

WORLD = 2
DRIVER = Path(__file__).with_name("dist_driver.py")
LAUNCH_TIMEOUT = 600  # s, a launch that hangs fails the test instead of the suite
# 6 prompts, 12 pairs; held-out 0.3 keeps 4 prompts = 8 training examples: two global batches
DERIVE = ["--lr", "1e-2", "--max-steps", "3", "--heldout", "0.3", "--eval-every", "3",
          "--max-length", "96", "--seed", "0", "--device", "cpu", "--no-progress"]
# 12 examples in batches of 5: batches 0 and 2 (5 and 2 examples) on rank 0, batch 1 on rank 1
SCORE = ["--batch-size", "5", "--max-length", "96", "--device", "cpu", "--no-progress"]
TOP_RATE = 0.2

# Tolerances (the tests print the measured differences: pytest -s).
# Derive: |P_ddp - P_1| <= RTOL_DERIVE * (|P_1| + max|P_1|) per tensor, P = patched - backbone.
# Two processes average their gradients in the all-reduce instead of one mean over 4 examples:
# fp32 rounding (a few 1e-8 of a 0.03 update after 3 Adam steps); Adam divides each gradient by
# its RMS, so an element whose gradient is near 0 shows that rounding as a relative change.
RTOL_DERIVE = 1e-4
# Score: |S_par - S_1| <= RTOL_SCORE * (|S_1| + max|S_1|) per tensor. The same signed sums added
# in another order (per rank, then across ranks; FSDP also scales each loss before its
# backward): fp32 rounding of the largest terms, and |.| of a sum that cancels near 0 has no
# relative accuracy, hence the term in the tensor's largest score.
RTOL_SCORE = 1e-5


def _env(**extra):
    # CPU and gloo even where a GPU exists: two ranks may not share one device
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": "", **extra}
    env.pop("SAFEPATCH_TEST_SHARD", None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(launcher: str, commands: list, out: Path,
            fail: dict | None = None) -> tuple[dict, float]:
    """Run dist_driver.py in WORLD processes; returns ({rank: its record}, wall seconds)."""
    out.mkdir(parents=True, exist_ok=True)
    job = out / "job.json"
    job.write_text(json.dumps({"commands": [[str(a) for a in c] for c in commands],
                               "fail": fail}))
    if launcher == "accelerate":
        # ACCELERATE_USE_CPU + --multi_gpu: real DDP over gloo on the CPU (--cpu starts one process)
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
               "--num_processes", str(WORLD), "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
        env = _env(ACCELERATE_USE_CPU="true")
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(WORLD)]
        env = _env()
    t0 = time.monotonic()
    proc = subprocess.run([*cmd, str(DRIVER), str(job), str(out)], env=env, capture_output=True,
                          text=True, timeout=LAUNCH_TIMEOUT)
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = {r: json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)}
    return ranks, wall


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        if f.name != "histograms.safetensors":
            out.update(load_file(f))
    return out


def _assert_close(got, want, rtol, what):
    """|got - want| <= rtol * (|want| + max|want|) per tensor; returns the largest
    |got - want| / max|want| over the tensors."""
    assert got.keys() == want.keys(), what
    worst = 0.0
    for k, w in want.items():
        g, w = got[k].double(), w.double()
        scale = float(w.abs().max())
        err = (g - w).abs()
        assert bool((err <= rtol * (w.abs() + scale)).all()), f"{what} {k}: {float(err.max())}"
        worst = max(worst, float(err.max()) / scale if scale else float(err.max()))
    return worst


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_setup(tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="module")
def single(setup, tmp_path_factory):
    """One process, batch 4 (= 2 processes x 2): GA, GD and LoRA-GD patches and the training
    examples of every step."""
    import safepatch_merge.derive.train as train

    bb, data = setup
    root = tmp_path_factory.mktemp("single")
    seen = {}
    orig = train.batch_loss
    for name, extra in (("ga", ["--objective", "ga"]), ("gd", ["--objective", "gd"]),
                        ("lora", ["--objective", "gd", "--lora", "--lora-r", "4"])):
        batches = seen[name] = []

        def recording(objective, model, batch, *args, batches=batches, **kwargs):
            batches.append([row[row != IGNORE_INDEX].tolist() for row in batch["labels"]])
            return orig(objective, model, batch, *args, **kwargs)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(train, "batch_loss", recording)
            assert cli(["derive", str(bb), "--data", str(data), "-o", str(root / name),
                        "--batch-size", "4", *extra, *DERIVE]) == 0
    return root, seen


@pytest.fixture(scope="module")
def ddp(setup, tmp_path_factory):
    """Two processes under accelerate launch, batch 2 each: GA, GD, LoRA-GD, then a GD run
    whose rank 1 fails in its first training batch."""
    bb, data = setup
    root = tmp_path_factory.mktemp("ddp")
    cmds = [["derive", bb, "--data", data, "-o", root / name, "--batch-size", "2", *extra, *DERIVE]
            for name, extra in (("ga", ["--objective", "ga"]), ("gd", ["--objective", "gd"]),
                                ("lora", ["--objective", "gd", "--lora", "--lora-r", "4"]),
                                ("fail", ["--objective", "gd"]))]
    ranks, wall = _launch("accelerate", cmds, root / "run", fail={"command": 3, "rank": 1})
    return root, ranks, wall


def test_ddp_derive_runs_two_processes_on_disjoint_batches(ddp, single):
    root, ranks, _ = ddp
    _, seen = single
    for name, i in (("ga", 0), ("gd", 1), ("lora", 2)):
        assert all(ranks[r]["world_size"] == WORLD and ranks[r]["results"][i]["rc"] == 0
                   for r in range(WORLD))
        rec = json.loads((root / name / "derive_record.json").read_text())
        assert rec["throughput"]["num_processes"] == WORLD and rec["steps"] == 3
        per_rank = [ranks[r]["results"][i]["train_batches"] for r in range(WORLD)]
        assert [len(b) for b in per_rank] == [3, 3]  # one micro-batch per step and rank
        for step in range(3):
            mine = [sorted(map(tuple, per_rank[r][step])) for r in range(WORLD)]
            assert all(len(m) == 2 for m in mine)
            assert not set(mine[0]) & set(mine[1])  # disjoint shards
            # together they are the single process's batch of that step
            assert sorted(mine[0] + mine[1]) == sorted(map(tuple, seen[name][step]))
        epoch = {tuple(x) for r in range(WORLD) for step in range(2) for x in per_rank[r][step]}
        assert len(epoch) == rec["data"]["train_examples"] == 8


@pytest.mark.parametrize("name", ["ga", "gd", "lora"])
def test_ddp_derive_equals_single_process(ddp, single, setup, name):
    """The patch of two DDP processes is the single-process patch within RTOL_DERIVE, saved in
    the same format (same files, tensor names, dtypes)."""
    bb, _ = setup
    root, _, _ = ddp
    one, two = single[0] / name, root / name
    rec1 = json.loads((one / "derive_record.json").read_text())
    rec2 = json.loads((two / "derive_record.json").read_text())
    assert rec1["outputs"] == rec2["outputs"]
    for k in ("initial_heldout_nll", "final_heldout_nll", "final_train_nll"):
        assert rec2[k] == pytest.approx(rec1[k], rel=1e-5), k
    base, p1, p2 = _tensors(bb), _tensors(one), _tensors(two)
    assert all(p1[k].dtype == p2[k].dtype for k in p1)
    d1 = {k: p1[k] - base[k] for k in base}
    d2 = {k: p2[k] - base[k] for k in base}
    assert any(float(d.abs().max()) > 1e-3 for d in d1.values())  # the patch moved
    worst = _assert_close(d2, d1, RTOL_DERIVE, f"{name} patch")
    print(f"{name}: max |P_ddp - P_1| / max |P_1| over tensors = {worst:.2e}")
    if name == "lora":
        a1 = load_file(one / "adapter" / "adapter_model.safetensors")
        a2 = load_file(two / "adapter" / "adapter_model.safetensors")
        _assert_close(a2, a1, RTOL_DERIVE, "adapter")


def test_ddp_derive_failure_on_one_rank_ends_both(ddp):
    root, ranks, _ = ddp
    for r in range(WORLD):
        res = ranks[r]["results"][3]
        errors = [ln for ln in res["stderr"].splitlines() if ln.startswith("safepatch ")]
        assert res["rc"] == 1 and "Traceback" not in res["stderr"]
        assert errors == ["safepatch derive: error: rank 1 of 2: injected failure in this "
                          "rank's training batch"], (r, res["stderr"])
    assert not (root / "fail").exists()


# -- scoring -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scores(single, setup, tmp_path_factory):
    """Score directories of the single-process GA (SE) and GD (OSM) patches: one process,
    data-parallel and FSDP in two processes (sharded output, to check the index)."""
    _, data = setup
    patches = {"se": single[0] / "ga", "osm": single[0] / "gd"}
    root = tmp_path_factory.mktemp("scores")
    for side, patch in patches.items():
        assert cli([str(a) for a in ["score", patch, "--data", data, "-o", root / f"one_{side}",
                                     *SCORE]]) == 0
    assert cli([str(a) for a in ["score", patches["se"], "--data", data, "-o", root / "one_abs",
                                 "--accumulation", "abs_per_batch", *SCORE]]) == 0
    cmds = [["score", patches[side], "--data", data, "-o", root / f"{mode}_{side}", "--parallel",
             mode, "--max-shard-size", "40KB", *SCORE]
            for mode in ("data", "fsdp") for side in ("se", "osm")]
    cmds.append(["score", patches["se"], "--data", data, "-o", root / "data_abs",
                 "--accumulation", "abs_per_batch", *SCORE])
    ranks, wall = _launch("torchrun", cmds, root / "run")
    return root, patches, ranks, wall


@pytest.mark.parametrize("mode", ["data", "fsdp"])
def test_parallel_scores_equal_single_process(scores, mode):
    root, _, ranks, _ = scores
    for r in range(WORLD):
        assert ranks[r]["world_size"] == WORLD
        assert all(res["rc"] == 0 for res in ranks[r]["results"])
    for side in ("se", "osm"):
        d, one = root / f"{mode}_{side}", root / f"one_{side}"
        info = json.loads((d / "score_info.json").read_text())
        assert info["distributed"]["mode"] == mode and info["distributed"]["world_size"] == WORLD
        per_rank = info["distributed"]["batches_per_rank"]
        assert info["num_batches"] == 3 and per_rank == [[0, 2], [1]]
        assert not set(per_rank[0]) & set(per_rank[1])
        assert sorted(per_rank[0] + per_rank[1]) == list(range(info["num_batches"]))
        # written once, whole: sharded with an index that names every tensor, and histograms
        index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
        s1, s2 = _tensors(one), _tensors(d)
        assert set(index) == set(s2) == set(s1)
        hist = load_file(d / "histograms.safetensors")
        assert hist.keys() == s2.keys()
        assert all(torch.equal(hist[k], radix_histogram(s2[k], 0, 0)) for k in s2)
        worst = _assert_close(s2, s1, RTOL_SCORE, f"{mode} {side} scores")
        print(f"{mode} {side}: max |S_par - S_1| / max |S_1| over tensors = {worst:.2e}")


def test_data_parallel_abs_per_batch_equals_single_process(scores):
    """The named alternative (sum of per-batch |.|) adds up across processes the same way."""
    root, _, _, _ = scores
    info = json.loads((root / "data_abs" / "score_info.json").read_text())
    assert info["accumulation"] == "abs_per_batch" and info["distributed"]["mode"] == "data"
    s1, s2 = _tensors(root / "one_abs"), _tensors(root / "data_abs")
    _assert_close(s2, s1, RTOL_SCORE, "abs_per_batch scores")
    signed = _tensors(root / "one_se")
    w = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.allclose(s2[w], signed[w], rtol=1e-3)


def _merge(root: Path, bb: Path, patches: dict, score_dirs: dict, name: str) -> dict:
    cfg = {"backbone": str(bb), "patches": {k: str(v) for k, v in patches.items()},
           "scores": {k: str(v) for k, v in score_dirs.items()},
           "parameters": {"top_rate_se": TOP_RATE, "top_rate_osm": TOP_RATE, "alpha": 1.0,
                          "beta": 1.0}}
    (root / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    assert cli(["merge", str(root / f"{name}.yaml"), str(root / name), "--no-progress"]) == 0
    return _tensors(root / name)


@pytest.mark.parametrize("mode", ["data", "fsdp"])
def test_merge_from_parallel_scores_equals_single_process(scores, setup, mode, tmp_path):
    """The merged model differs from the single-process merge only at elements whose
    single-process score lies within the score tolerance (plus the threshold's own shift) of
    the SE or OSM threshold; those are counted and bounded."""
    bb, _ = setup
    root, patches, _, _ = scores
    one = _merge(tmp_path, bb, patches, {s: root / f"one_{s}" for s in patches}, "one")
    par = _merge(tmp_path, bb, patches, {s: root / f"{mode}_{s}" for s in patches}, mode)
    band = {}
    for side in patches:
        s1, s2 = _tensors(root / f"one_{side}"), _tensors(root / f"{mode}_{side}")
        t1 = select_thresholds(s1, TOP_RATE)["*"].threshold
        t2 = select_thresholds(s2, TOP_RATE)["*"].threshold
        tol = {k: RTOL_SCORE * (s.double().abs() + float(s.abs().max())) for k, s in s1.items()}
        # the k-th largest moves at most as far as the scores do
        assert abs(t2 - t1) <= max(float(t.max()) for t in tol.values())
        band[side] = {k: (s1[k].double() - t1).abs() <= tol[k] + abs(t2 - t1) for k in s1}
    n = sum(t.numel() for t in one.values())
    mismatched = in_band = 0
    for k, m1 in one.items():
        diff = m1 != par[k]
        near = torch.zeros_like(diff)
        for side in patches:
            if k in band[side]:
                near |= band[side][k].view_as(diff)
        assert not bool((diff & ~near).any()), f"{k}: differs away from the thresholds"
        mismatched += int(diff.sum())
        in_band += int(near.sum())
    assert in_band <= 1e-3 * n, in_band  # the exception is a handful of elements
    assert mismatched <= in_band
    print(f"{mode}: {mismatched} of {n} merged elements differ; {in_band} lie in the band")


# -- failure on one rank -------------------------------------------------------------------


def test_score_failure_on_one_rank_ends_both_within_timeout(single, setup, tmp_path):
    """A data row that makes only rank 1's batch non-finite (its byte's embedding row is NaN in
    the patch) ends both ranks with the same one-line error and writes nothing, in both
    modes, well inside the collective timeout."""
    from safepatch_merge.testing import make_tiny_tokenizer

    patch = tmp_path / "nan_patch"
    shutil.copytree(single[0] / "ga", patch)
    w = load_file(patch / "model.safetensors")
    z = make_tiny_tokenizer().convert_tokens_to_ids("Z")
    w["model.embed_tokens.weight"][z] = float("nan")
    save_file(w, str(patch / "model.safetensors"), metadata={"format": "pt"})
    # rows 10 and 11 form batch 5 (of 2) -> rank 1; no other row contains a 'Z'
    rows = PAIRS[:11] + [{"prompt": "question Z?", "response": "Zzz."}] + PAIRS[11:]
    data = write_pairs(tmp_path / "bad.jsonl", rows)
    cmds = [["score", patch, "--data", data, "-o", tmp_path / f"out_{mode}", "--parallel", mode,
             "--batch-size", "2", "--max-length", "96", "--device", "cpu", "--no-progress",
             "--dist-timeout", "60"]
            for mode in ("data", "fsdp")]
    ranks, wall = _launch("torchrun", cmds, tmp_path / "run")
    assert wall < 180
    want = ("safepatch score: error: rank 1 of 2: the patched model's response_nll is not finite "
            "on scoring batch 5 (a diverged patch?)")
    for r in range(WORLD):
        for res in ranks[r]["results"]:
            errors = [ln for ln in res["stderr"].splitlines() if ln.startswith("safepatch ")]
            assert res["rc"] == 1 and errors == [want] and "Traceback" not in res["stderr"], res
    for mode in ("data", "fsdp"):
        assert not (tmp_path / f"out_{mode}").exists()
        assert not (tmp_path / f"out_{mode}.partial").exists()


# -- in one process ------------------------------------------------------------------------


def test_collective_check_in_one_process_is_plain():
    from safepatch_merge import dist
    from safepatch_merge.errors import DataError

    dist.agree(None)
    with pytest.raises(DataError, match="^bad row$"):
        dist.agree(DataError("bad row"))
    with pytest.raises(ValueError, match="x"), dist.collective_errors():
        raise ValueError("x")
    assert dist.one_line(ValueError("a\n  b")) == "ValueError: a b"
    assert dist.one_line(DataError("a\nb")) == "a b"


def test_batches_of_rank_are_disjoint_and_cover():
    from safepatch_merge.score.distributed import batches_of_rank

    for nb, world in ((7, 2), (3, 4), (9, 3)):
        parts = [batches_of_rank(nb, r, world) for r in range(world)]
        assert sorted(b for p in parts for b in p) == list(range(nb))


@pytest.mark.parametrize("opts, msg", [
    ({"loss": "magnitude"}, "one process"),
    ({"parallel": "fsdp", "score_buffers": "host"}, "data-parallel"),
    ({"parallel": "fsdp", "accumulation": "abs_per_batch"}, "each batch's own gradient"),
])
def test_options_several_processes_refuse(monkeypatch, opts, msg):
    """Refused under a launcher before any process group is joined."""
    from safepatch_merge.errors import ConfigError
    from safepatch_merge.score.api import ScoreConfig
    from safepatch_merge.score.distributed import scoring_processes

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=msg):
        scoring_processes(ScoreConfig(**opts))


def test_fsdp_without_a_launcher_is_a_config_error(setup, tmp_path, capsys):
    bb, data = setup
    for k in ("RANK", "WORLD_SIZE"):
        assert k not in os.environ
    rc = cli(["score", str(bb), "--data", str(data), "-o", str(tmp_path / "s"), "--parallel",
              "fsdp", "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err.count("\n") == 0 and "torchrun --nproc-per-node" in err
    assert not (tmp_path / "s").exists()
