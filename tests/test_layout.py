"""The house: the package's imports form layers (no circle), modules stay readable, the trial
record and the metric registry say one thing everywhere, and the benchmarks have one entry point."""

from __future__ import annotations

import ast
import math
import subprocess
import sys

import optuna
import pytest

from optsearch.measure.metrics import METRICS, Interval, past_limit, quality_margin, unsafe_side
from optsearch.storage.record import SHOWN_KEYS, interval_attrs, quality_of, speedup_of, trial_metrics
from tests.conftest import ROOT

PACKAGE = ROOT / "optsearch"


def _module_name(path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Each optsearch module and the optsearch modules it imports (anywhere in the file)."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("optsearch"):
                for alias in node.names:
                    child = f"{node.module}.{alias.name}"
                    found.add(child if child in modules else node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("optsearch")}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def test_the_package_has_no_import_circle():
    graph = _imports()
    # a package's face (__init__) re-exports its modules: count its arrows as its modules' own
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for child in graph[node]:
            if child.startswith(node + "."):
                continue  # a package importing its own modules
            if state.get(child) == 1:
                pytest.fail("import circle: " + " -> ".join([*path, node, child]))
            if child not in state:
                visit(child, [*path, node])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [])


def test_the_light_commands_never_import_torch_or_diffusers():
    """`import optsearch` (what `optsearch.apply` and every command start with) and the commands
    that only read a study answer in under a second: torch and diffusers (4 s here) load only
    when a command needs a model. Once, a helper moved beside the model loader put them on the
    path of `study show` (0.7 s -> 5.6 s)."""
    code = ("import sys, optsearch, optsearch.cli.show, optsearch.deployment, "
            "optsearch.optimize.deploy, optsearch.optimize.export, optsearch.storage.rdb; "
            "print(sorted({'torch', 'diffusers'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_no_module_is_longer_than_a_reader_can_hold():
    lengths = {path.relative_to(ROOT): len(path.read_text(encoding="utf-8").splitlines())
               for path in PACKAGE.rglob("*.py")}
    assert max(lengths.values()) <= 400, sorted(lengths.items(), key=lambda kv: -kv[1])[:3]
    assert lengths[PACKAGE.relative_to(ROOT) / "optimize" / "worker.py"] <= 250


def test_each_metric_knows_which_way_is_better():
    """A loss fails above its limit, PSNR and SSIM below; `bound` judges the unsafe end."""
    loss, psnr = Interval(0.5, 0.2, 0.8), Interval(30.0, 28.0, 32.0)
    assert METRICS["clip_loss"].direction == "minimize" and METRICS["psnr"].direction == "maximize"
    assert quality_margin(loss, "clip_loss", 0.6) < 0 < quality_margin(loss, "clip_loss", 0.6, "bound")
    assert quality_margin(psnr, "psnr", 29.0) < 0 < quality_margin(psnr, "psnr", 29.0, "bound")
    assert unsafe_side(loss, "clip_loss", "bound") == 0.8 and unsafe_side(psnr, "psnr", "bound") == 28.0
    assert past_limit(loss, "clip_loss", 0.1) and not past_limit(loss, "clip_loss", 0.3)
    assert past_limit(psnr, "psnr", 33.0) and not past_limit(psnr, "psnr", 31.0)
    assert quality_margin(Interval(30.0), "psnr", 29.0, "bound") == 1e9  # no bound: never feasible


def test_the_trial_record_reads_back_what_it_wrote():
    """Flat user attrs (JSON: an infinite bound is stored as None) read back as the same Interval;
    a confirmation's nested form and a summary's Interval read the same way."""
    interval = Interval(31.5, 30.25, math.inf)
    attrs = {**interval_attrs("psnr", interval), "speedup": 2.0, "speedup_low": 1.5,
             "speedup_high": None, "constraints": {"quality": -1.5}, "combo": "deepcache"}
    assert attrs["psnr_high"] is None
    assert quality_of(attrs, "psnr") == interval
    assert quality_of({"psnr": interval.to_dict()}, "psnr") == interval
    assert quality_of({"psnr": interval}, "psnr") is interval
    assert quality_of(attrs, "ssim") is None
    speedup = speedup_of(attrs)
    assert (speedup.speedup, speedup.low, speedup.high) == (2.0, 1.5, None)
    trial = optuna.trial.create_trial(value=2.0, user_attrs=attrs)
    shown = trial_metrics(trial)
    assert set(shown) == {*SHOWN_KEYS, "trial", "state", "feasible"}
    assert shown["feasible"] and shown["psnr_low"] == 30.25 and shown["state"] == "COMPLETE"


def test_benchmarks_have_one_entry_point():
    """Every benchmark script is listed with its question, and its options have --help."""
    from benchmarks import BENCHMARKS

    shared = {"__init__", "__main__", "common", "replay"}
    scripts = {path.stem for path in (ROOT / "benchmarks").glob("*.py")} - shared
    assert {b.module for b in BENCHMARKS.values()} == scripts
    results = (ROOT / "benchmarks" / "RESULTS.md").read_text(encoding="utf-8")
    assert all(f"## {b.section}\n" in results for b in BENCHMARKS.values())
    listed = subprocess.run([sys.executable, "-m", "benchmarks", "--list"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and all(name in listed.stdout for name in BENCHMARKS)
    helped = subprocess.run([sys.executable, "-m", "benchmarks", "search-cost", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "--seeds" in helped.stdout and "--limit" in helped.stdout
    unknown = subprocess.run([sys.executable, "-m", "benchmarks", "nope"], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    assert unknown.returncode == 2 and "unknown benchmark" in unknown.stderr
