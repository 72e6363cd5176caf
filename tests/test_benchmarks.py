"""The benchmarks and the prepared GPU script run where no test runs them (on a lent GPU, by
hand): every project name they import, at any depth of their code, must exist. A name moved in a
refactor (parse_config went to config_file.py) would otherwise be found only on the device,
with its minutes spent."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
OURS = ("distsearch", "search_spaces")


def _sources() -> dict[str, str]:
    out = {str(p.relative_to(ROOT)): p.read_text() for p in sorted((ROOT / "benchmarks").glob("*.py"))}
    for sh in sorted((ROOT / "benchmarks").glob("*.sh")):  # python heredocs of the shell scripts
        for i, body in enumerate(re.findall(r"<<'?PY'?[^\n]*\n(.*?)\nPY\n", sh.read_text(), flags=re.S)):
            out[f"{sh.relative_to(ROOT)} (heredoc {i})"] = body
    return out


def _project_imports(source: str) -> list[tuple[str, str | None]]:
    """(module, name) of every import of a project module in `source`; name None for `import m`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in OURS:
            found += [(node.module, a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names if a.name.split(".")[0] in OURS]
    return found


@pytest.mark.parametrize("where,source", list(_sources().items()))
def test_benchmark_imports_resolve(where: str, source: str) -> None:
    imports = _project_imports(source)
    assert imports, f"{where}: imports nothing of the project?"
    for module, name in imports:
        mod = importlib.import_module(module)
        assert name is None or hasattr(mod, name) or importlib.util.find_spec(f"{module}.{name}"), (
            f"{where}: `from {module} import {name}`: no such name"
        )


def test_the_gpu_script_has_its_heredoc() -> None:
    assert any("gpu_check.sh" in k for k in _sources()), "the GPU script's Python part was not found"


def test_the_gpu_scripts_smoke_configs_load() -> None:
    """The smoke runs' configs (everything the heredoc sets before its loop) load in this version:
    a renamed or removed config key would fail them only on the device."""
    from distsearch.config_file import parse_config

    body = next(v for k, v in _sources().items() if "gpu_check.sh" in k)
    ns: dict = {}
    exec(body.split("for algo, graph, extra in runs:")[0], ns)  # imports, raw and runs: no run starts
    assert ns["runs"]
    for algo, graph, extra in ns["runs"]:
        parse_config({**ns["raw"], **extra, "algorithm": algo, "cuda_graph": graph, "storage": {"uri": "unused"}})


def test_search_step_builds_every_algorithm() -> None:
    """benchmarks/search_step.py's searchers construct on a tiny supernet (no step is timed here):
    a renamed searcher argument would otherwise surface on the device."""
    import argparse
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import search_step
    finally:
        sys.path.pop(0)
    args = argparse.Namespace(
        channels=1, classes=3, C=2, layers=2, nodes=2, batch=8, channels_last=False, projections=1, bound="ibp"
    )
    for algo in search_step.ALGORITHMS:
        assert search_step.make(algo, args, torch.device("cpu")).model is not None, algo
