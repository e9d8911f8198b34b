"""A merge killed with SIGKILL at random points and resumed gives byte-identical output;
before completion nothing exists at OUT. Also: writer-level resume bookkeeping."""
from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from merge_helpers import build_inputs, dir_bytes, env_with_min_chunk, write_config
from safepatch_merge.io.writer import MANIFEST, OutputError
from safepatch_merge.merge import merge

PARAMS = {"top_rate_se": 0.2, "top_rate_osm": 0.25, "retention": 0.7, "rescale": True, "seed": 5}
# Retention before selection adds a pre-pass (retained histograms, cached in the work dir) and
# its result must be the brute-force merge's after any kills.
PARAMS_BEFORE = {**PARAMS, "retention_order": "before_selection", "granularity": "layer"}


def _start(cfg, out, resume):
    cmd = [sys.executable, "-m", "safepatch_merge", "merge", str(cfg), str(out), "--no-progress",
           "--max-memory", "1KB"] + (["--resume"] if resume else [])
    return subprocess.Popen(cmd, env=env_with_min_chunk(200), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


@pytest.mark.parametrize("params", [PARAMS, PARAMS_BEFORE], ids=["after", "before"])
def test_sigkill_and_resume_is_byte_identical(tmp_path, params):
    paths = build_inputs(tmp_path / "in", hidden=48)
    cfg = write_config(tmp_path / "c.yaml", paths, params, output={"max_shard_size": "24KB"})
    merge(cfg, tmp_path / "ref")  # uninterrupted, in-process, big chunks
    ref = dir_bytes(tmp_path / "ref")
    if params is PARAMS_BEFORE:
        import retention_brute_force as brute
        from merge_helpers import load_dir

        want, _ = brute.merge(paths, params)
        got = load_dir(tmp_path / "ref")
        assert all(torch.equal(got[n].view(torch.int16), want[n].view(torch.int16)) for n in want)
    assert sum(f.endswith(".safetensors") for f in ref) >= 5

    out, partial = tmp_path / "out", tmp_path / "out.partial"

    def manifest_inode(part):
        try:
            return os.stat(part / MANIFEST).st_ino
        except FileNotFoundError:
            return None

    def wait_for_manifest(proc, part, old=None):
        """Until this run has opened OUT.partial: a manifest other than `old` (the one an
        interrupted run left; every manifest write is a rename, so a new inode), so kill
        times count from the start of this run's work, not from its interpreter start-up."""
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline and \
                manifest_inode(part) in (None, old):
            time.sleep(0.002)
        return time.time()

    # Calibrate: how long the merge works after it opens OUT.partial on this machine, so kill
    # times land inside the work whether the machine is idle or loaded.
    cal_out = tmp_path / "cal"
    proc = _start(cfg, cal_out, resume=False)
    t_open = wait_for_manifest(proc, tmp_path / "cal.partial")
    proc.communicate(timeout=300)
    work = max(time.time() - t_open, 0.05)
    assert dir_bytes(cal_out) == ref

    rng = random.Random(1234)
    kills = mid_shard = 0
    resume = False
    for attempt in range(24):  # ends at the first success; more tries only on a loaded host
        t_start, old_manifest = time.time(), manifest_inode(partial)
        proc = _start(cfg, out, resume=resume)

        def fresh_inprogress():
            found = False
            for p in partial.glob("*.inprogress"):
                try:
                    found |= p.stat().st_mtime >= t_start
                except FileNotFoundError:
                    pass
            return found

        done = kills >= 2 and mid_shard >= 1
        t_work = time.time()
        if not done:
            # Even attempts: kill at a random point of the work (often in the threshold pass);
            # odd ones: right after this run started writing a shard.
            t_work = wait_for_manifest(proc, partial, old_manifest)
            if attempt % 2 == 1:
                deadline = time.time() + work
                while proc.poll() is None and time.time() < deadline and not fresh_inprogress():
                    time.sleep(0.001)
            else:
                time.sleep(rng.uniform(0.05, 0.7) * work)
        if not done and proc.poll() is None:
            inprog = fresh_inprogress()
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            if out.exists():
                # The kill came after the atomic rename: the output is complete and must be
                # exactly the uninterrupted one; start over to get the kills we need.
                assert not partial.exists() and dir_bytes(out) == ref
                shutil.rmtree(out)
                resume, kills, mid_shard = False, 0, 0
                work = max(0.05, min(work, 0.8 * (time.time() - t_work)))  # it was faster
                continue
            kills += 1
            mid_shard += inprog
            assert not out.exists()
            resume = True
            continue
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-2000:]
        if done:
            break
        # finished before we could kill it: a complete, correct output; start over, with kill
        # times scaled to this run (the calibration can overestimate on a loaded host)
        work = max(0.05, min(work, 0.8 * (time.time() - t_work)))
        assert dir_bytes(out) == ref
        shutil.rmtree(out)
        resume, kills, mid_shard = False, 0, 0
    assert kills >= 2 and mid_shard >= 1, (kills, mid_shard)
    assert out.exists() and not partial.exists()
    assert dir_bytes(out) == ref


def test_resume_refuses_a_changed_config(tmp_path):
    paths = build_inputs(tmp_path / "in")
    cfg = write_config(tmp_path / "c.yaml", paths, PARAMS)
    out = tmp_path / "out"
    partial = tmp_path / "out.partial"
    partial.mkdir()
    (partial / MANIFEST).write_text('{"plan_id": "something else", "shards": {}}')
    with pytest.raises(OutputError, match="different merge"):
        merge(cfg, out, resume=True)
    with pytest.raises(OutputError, match="--resume"):
        merge(cfg, out)
    merge(cfg, out, overwrite=True)  # starts over
    assert out.exists() and not partial.exists()


def test_resume_skips_finished_shards_and_redoes_corrupt_ones(tmp_path, monkeypatch):
    paths = build_inputs(tmp_path / "in")
    cfg = write_config(tmp_path / "c.yaml", paths, PARAMS, output={"max_shard_size": "24KB"})
    merge(cfg, tmp_path / "ref")
    ref = dir_bytes(tmp_path / "ref")

    # Simulate a crash right after the third shard: stop the writer there.
    from safepatch_merge.io import writer as wmod

    calls = {"n": 0}
    real_record = wmod.OutputBuilder._record

    def crash_after_three(self, *a):
        real_record(self, *a)
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(wmod.OutputBuilder, "_record", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        merge(cfg, tmp_path / "out")
    monkeypatch.setattr(wmod.OutputBuilder, "_record", real_record)
    partial = tmp_path / "out.partial"
    done = sorted(p.name for p in partial.glob("model-*.safetensors"))
    assert len(done) == 3 and not (tmp_path / "out").exists()
    # Corrupt one finished shard: resume must notice (sha256) and rewrite it.
    victim = partial / done[1]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    written = []
    real_shard = wmod.OutputBuilder.shard
    monkeypatch.setattr(wmod.OutputBuilder, "shard",
                        lambda self, s: written.append(s.filename) or real_shard(self, s))
    merge(cfg, tmp_path / "out", resume=True)
    assert done[1] in written and done[0] not in written and done[2] not in written
    assert dir_bytes(tmp_path / "out") == ref
