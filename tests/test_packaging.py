"""Packaging metadata agrees with the code: every third-party import of the installed package
is a declared dependency or extra, the licence file matches the declared licence, and the
files pyproject declares as package data exist."""
import ast
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# import name -> distribution name, where they differ
DIST_OF = {"yaml": "pyyaml"}


def _dist(req: str) -> str:
    return re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0].lower().replace("_", "-")


def _imports(folder: Path) -> set[str]:
    found = set()
    for p in folder.rglob("*.py"):
        for n in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(n, ast.Import):
                found |= {a.name.split(".")[0] for a in n.names}
            elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module:
                found.add(n.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"safepatch_merge"}


def test_every_third_party_import_is_declared():
    proj = PYPROJECT["project"]
    declared = {_dist(r) for r in proj["dependencies"]}
    extras = proj["optional-dependencies"]
    for name, reqs in extras.items():
        declared |= {_dist(r) for r in reqs if not r.startswith("safepatch-merge")}
    used = set()
    for folder in ("safepatch_merge", "triton_kernels", "csrc"):
        used |= _imports(ROOT / folder)
    missing = {DIST_OF.get(m, m).replace("_", "-") for m in used} - declared
    assert missing == set(), f"imported but not declared in pyproject.toml: {sorted(missing)}"
    assert {"triton", "gguf", "datasets"} <= set(extras)


def test_dev_extra_reuses_the_other_extras():
    dev = PYPROJECT["project"]["optional-dependencies"]["dev"]
    assert "safepatch-merge[triton,gguf]" in dev
    pinned_elsewhere = {_dist(r) for k, v in PYPROJECT["project"]["optional-dependencies"].items()
                        if k != "dev" for r in v}
    assert not pinned_elsewhere & {_dist(r) for r in dev if not r.startswith("safepatch-merge")}


def test_licence_file_matches_the_declared_licence():
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_declared_package_data_exists():
    data = PYPROJECT["tool"]["setuptools"]["package-data"]["safepatch_merge"]
    assert "py.typed" in data and (ROOT / "safepatch_merge" / "py.typed").is_file()
    licences = (ROOT / "safepatch_merge" / "data" / "DATA_LICENSES.md").read_text()
    for f in (ROOT / "safepatch_merge" / "data").rglob("*.jsonl"):
        assert f.name in licences, f"{f.name} has no entry in DATA_LICENSES.md"
    assert "Built with Meta Llama 3" in licences


def test_version_has_one_source():
    import safepatch_merge

    assert PYPROJECT["project"]["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "safepatch_merge.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", safepatch_merge.__version__)
