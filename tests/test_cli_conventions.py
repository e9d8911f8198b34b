"""What every `safepatch` command shares: --version and --help without torch, -o/--output,
-q/--quiet, -v/--verbose, --progress/--no-progress, and usage errors with exit status 2."""
import json
import subprocess
import sys

import pytest

from safepatch_merge import __version__
from safepatch_merge.cli import COMMANDS, build_parser
from safepatch_merge.cli.options import resolve

# commands that write something, and the attribute their output path lands in
WRITERS = {"derive": "out", "score": "out", "merge": "out_dir", "eval": "out", "judge": "out",
           "run": "out_dir", "sweep": "out", "demo": "out"}
MINIMAL = {"derive": ["BB", "--data", "D", "--objective", "ga"], "score": ["P"],
           "merge": ["C.yaml"], "eval": ["M"], "judge": ["IN"], "push": ["DIR", "org/x"],
           "run": ["C.yaml"], "sweep": [], "demo": []}

# Runs in a fresh interpreter: --version, --help and each command's --help, then reports which
# heavy modules they imported.
PROBE = """
import json, subprocess, sys
from safepatch_merge.cli import COMMANDS, main
out = {}
for argv in [["--version"], ["--help"]] + [[c, "--help"] for c in COMMANDS]:
    try:
        main(argv)
        code = None
    except SystemExit as e:
        code = e.code
    out[" ".join(argv)] = code
print(json.dumps({"codes": out, "torch": "torch" in sys.modules,
                  "transformers": "transformers" in sys.modules}))
"""


def test_version_and_help_import_no_torch():
    res = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    *text, last = res.stdout.strip().splitlines()
    got = json.loads(last)
    assert got["torch"] is False and got["transformers"] is False
    assert set(got["codes"].values()) == {0}
    assert len(got["codes"]) == 2 + len(COMMANDS)
    assert f"safepatch {__version__}" in text


def test_version_from_the_module_entry_point():
    res = subprocess.run([sys.executable, "-m", "safepatch_merge", "--version"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == f"safepatch {__version__}"


def test_no_ghost_commands():
    parser = build_parser()
    assert tuple(parser.commands) == COMMANDS
    assert "bench" not in COMMANDS


def _parse(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    resolve(args, parser.commands[args.command])
    return args


@pytest.mark.parametrize("command", sorted(WRITERS))
def test_output_is_dash_o_and_double_dash_output(command):
    for flag in ("-o", "--output"):
        args = _parse([command, *MINIMAL[command], flag, "X"])
        assert getattr(args, WRITERS[command]) == "X"


@pytest.mark.parametrize("command", ["merge", "run"])
def test_positional_output_or_dash_o_but_not_both(command, capsys):
    assert _parse([command, "C.yaml", "OUT"]).out_dir == "OUT"
    for argv in ([command, "C.yaml", "OUT", "-o", "OTHER"], [command, "C.yaml"]):
        with pytest.raises(SystemExit) as e:
            _parse(argv)
        assert e.value.code == 2
    assert "OUT_DIR" in capsys.readouterr().err


@pytest.mark.parametrize("command", COMMANDS)
def test_quiet_verbose_progress_on_every_command(command, capsys):
    base = [command, *MINIMAL[command]] + (["-o", "X"] if command in ("derive", "score", "eval",
                                                                     "judge", "sweep") else [])
    if command in ("merge", "run"):
        base.append("OUT")
    # stderr is not a terminal under pytest: no bars unless asked
    args = _parse(base)
    assert (args.quiet, args.verbose, args.progress) == (False, False, False)
    assert _parse(base + ["--progress"]).progress is True
    assert _parse(base + ["--no-progress"]).progress is False
    q = _parse(base + ["-q"])
    assert q.quiet is True and q.progress is False
    assert _parse(base + ["--verbose"]).verbose is True
    assert _parse(["-q", *base]).quiet is True  # before the command too
    with pytest.raises(SystemExit) as e:
        _parse(base + ["-q", "-v"])
    assert e.value.code == 2
    assert "exclude each other" in capsys.readouterr().err


def test_cli_choices_are_the_library_s():
    """derive and score take their choices from the torch-free config modules that the
    library itself checks against: one spelling each."""
    from safepatch_merge.derive import behaviour, objectives, train
    from safepatch_merge.score import api, distributed, snip

    parser = build_parser()
    derive = {a.dest: a for a in parser.commands["derive"]._actions}
    score = {a.dest: a for a in parser.commands["score"]._actions}
    assert derive["objective"].choices == tuple(objectives.OBJECTIVES)
    assert derive["precision"].choices == train.PRECISIONS
    assert derive["stop_on"].choices == train.STOP_ON
    assert all(m in derive["stop_when"].help for m in behaviour.METRICS)
    assert score["loss"].choices == api.LOSSES and score["split"].choices == api.SPLITS
    assert score["saliency_on"].choices == tuple(api.SALIENCY_ON)
    assert score["parallel"].choices == distributed.PARALLEL
    assert score["accumulation"].choices == snip.ACCUMULATIONS
    assert score["score_buffers"].choices == snip.BUFFERS
