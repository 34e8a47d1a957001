"""Helpers shared by the benchmark scripts: a scratch folder, a study from a spec, machine facts."""

from __future__ import annotations

import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{platform.machine()}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}, "
            f"{datetime.date.today().isoformat()}")


def scratch() -> Path:
    """A temporary working folder (SQLite file and artifacts go there)."""
    return Path(tempfile.mkdtemp(prefix="optsearch-bench-"))


def run_study(spec, folder: Path, n_trials: int | None = None, enqueue=(), progress=False,
              url: str | None = None):
    """Create a study from `spec` on `url` (default: SQLite in `folder`) and run one worker to
    completion."""
    from optsearch.optimize.create import create_study
    from optsearch.optimize.worker import Worker, WorkerOptions
    from optsearch.storage.rdb import open_storage

    url = url or f"sqlite:///{folder / 'bench.db'}"
    study = create_study(spec, open_storage(url, heartbeat_interval=None))
    for params in enqueue:
        study.enqueue_trial(params)
    worker = Worker(url, spec.name, WorkerOptions(progress=progress, n_trials=n_trials,
                                                  artifact_dir=str(folder / "artifacts")))
    worker.run()
    return worker


def ab_rounds(pipe, run, setting: dict, repeats: int):
    """`repeats` rounds of the plain call and the setting's, A B A B (the machine's drift hits
    both sides alike): the speedups of the rounds, and the setting's last images and computed
    share. `run(applied=None)` returns (images, seconds)."""
    from optsearch.accelerators import AppliedSetting

    ratios = []
    for _ in range(repeats):
        _, base_seconds = run()
        with AppliedSetting(pipe, setting) as applied:
            images, seconds = run(applied)
            computed = applied.computed_fraction()
        ratios.append(base_seconds / seconds)
    return ratios, images, computed


def table(headers, rows) -> str:
    from optsearch.formatting import table as render

    return render(headers, rows)


def synchronize() -> None:
    """Wait for the GPU's queued work before reading the clock (nothing to wait for on a CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def size_for(script: str, smoke: bool, full: dict, small: dict) -> dict:
    """A GPU script's sizes: `small` on the CPU for --smoke, else `full`, which needs CUDA."""
    if not smoke and not torch.cuda.is_available():
        sys.exit(f"{script} needs a CUDA GPU (--smoke runs its code on the CPU at a tiny size)")
    return small if smoke else full


def cast_as_loaded(model: torch.nn.Module, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """`model` on `device` in `dtype`, but for the parts its class keeps in float32
    (`_keep_in_fp32_modules`: Wan's rope, time embedder and norms), as `from_pretrained(...,
    torch_dtype=dtype)` loads it: a random model then runs in the dtypes a served one does."""
    torch.nn.Module.to(model, device, dtype)  # not ModelMixin.to: it warns of what we do next
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    if dtype != torch.float32 and keep:
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if keep & set(name.split(".")) and tensor.is_floating_point():
                tensor.data = tensor.data.float()
    return model


def at_steps(settings, steps: int) -> list:
    """The GPU scripts' settings for a run of `steps` steps: "fewer steps" is always half of them
    (28 -> 14, 50 -> 25 as the names say; a --smoke run's few steps halved too)."""
    return [(name, {**setting, "steps": {"num_inference_steps": max(1, steps // 2)}}
             if "steps" in setting else setting) for name, setting in settings]


def time_cache_settings(pipe, call, settings, steps: int, warmup: int = 3, repeats: int = 1,
                        compiles: dict | None = None,
                        deadline: float | None = None) -> list[tuple[str, float, str, float | None]]:
    """The GPU scripts' loop: each (name, setting) applied, warmed up for `warmup` steps, timed
    with `call(target)` (seconds; the least of `repeats` calls); MagCache's ratios and DBCache's
    calibrated range measured first (a DBCache setting given as {} runs at the calibrated range's
    top: "skips nearly everything").
    Returns (name, seconds, computed share, peak GiB: the most CUDA memory allocated over the
    setting's timed calls, None off CUDA). `compiles`, when given, receives each setting's
    torch.compile counts over its warm-up and timed calls (graphs compiled, graph breaks) and
    its warm-up's seconds. Past `deadline` (time.perf_counter()) no further setting starts, so a
    script inside a device call's time limit still prints its table of what it measured."""
    from optsearch.accelerators import AppliedSetting, dbcache, magcache
    from optsearch.measure.compiling import CompileCounter

    ratios = magcache.measure(pipe, steps, lambda: call(pipe))["mag_ratios"]
    top = dbcache.calibrate(pipe, lambda: call(pipe))["auto"]["residual_diff_threshold"][1]
    rows = []
    for name, setting in settings:
        if rows and deadline is not None and time.perf_counter() > deadline:
            print(f"{name}: skipped, past the time budget", flush=True)
            continue
        if setting.get("dbcache") == {}:
            setting = {"dbcache": {"residual_diff_threshold": top}}
        counter = CompileCounter() if compiles is not None else None
        with AppliedSetting(pipe, setting, {"magcache": {"mag_ratios": ratios}}) as applied:
            warm = call(applied, warmup)
            if counter is not None:
                counter.warmed_up()
            cuda = torch.cuda.is_available() and pipe.device.type == "cuda"
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            seconds = min(call(applied) for _ in range(repeats))
            peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
            computed = applied.computed_fraction()
        counts = ""
        if counter is not None:
            compiles[name] = {**counter.counts(), "warmup_seconds": warm}
            counts = f" (warm-up {warm:.1f} s; {compiles[name]})"
        rows.append((name, seconds, "-" if computed is None else f"{100 * computed:.0f}%", peak))
        print(f"{name}: {seconds:.3f} s{counts}", flush=True)
    return rows


PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def pg_database(prefix: str = "optsearch_bench") -> tuple[str, str]:
    """A scratch database on the local PostgreSQL: (its name, its storage URL)."""
    import uuid

    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    return name, f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


def drop_pg_database(name: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
