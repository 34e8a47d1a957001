"""The prepared GPU check runs code no CPU session ever measures: every `benchmarks/gpu_*.sh` and
`benchmarks/gpu_timing.py`. Each runs here with `--smoke` (the same code, CPU, tiny sizes), exactly
as the check calls it, so a broken script is found before a GPU session spends its minutes on it."""

from __future__ import annotations

import importlib
import re
import shlex
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCRIPTS = sorted((ROOT / "benchmarks").glob("gpu_*.sh"))


def check_command(script) -> list[str]:
    """The `python3 -m benchmarks NAME ...` line of a gpu_*.sh, with this interpreter."""
    line = next(line for line in script.read_text().splitlines() if "python3 -m benchmarks" in line)
    return [sys.executable, *shlex.split(line.split("python3", 1)[1])]


def settings_of(command: list[str]) -> list[str]:
    from benchmarks import BENCHMARKS

    module = importlib.import_module(f"benchmarks.{BENCHMARKS[command[3]].module}")
    return [name for name, *_ in module.SETTINGS]


def run_smoke(command: list[str]) -> str:
    result = subprocess.run([*command, "--smoke"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def test_the_check_finds_the_prepared_scripts():
    assert [s.name for s in SCRIPTS] == ["gpu_flux.sh", "gpu_flux_compiled.sh", "gpu_wan.sh"]
    assert all(s.stat().st_mode & 0o111 for s in SCRIPTS)  # the check runs only executable ones


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.name)
def test_each_gpu_script_runs_its_settings_on_the_cpu(script):
    command = check_command(script)
    out = run_smoke(command)
    assert "# SMOKE (CPU" in out
    rows = {line.split("  ")[0] for line in out.splitlines()}
    assert set(settings_of(command)) <= rows, out
    if "--compile" in command:  # compiled: each setting's compile counts beside its speedup
        assert re.search(r"warm-up s \(compile\)\s+graphs compiled\s+graph breaks", out), out
    elif script.name == "gpu_flux.sh":  # eager: may workers of one GPU share baseline images?
        assert re.search(r"determinism: two plain calls' latents (bit-identical|differ)", out), out


def test_gpu_timing_runs_as_the_check_calls_it():
    out = run_smoke([sys.executable, "benchmarks/gpu_timing.py"])
    from benchmarks.gpu_timing import SETTINGS

    assert "# SMOKE (CPU" in out
    assert {name for name, *_ in SETTINGS} <= {line.split("  ")[0] for line in out.splitlines()}


def test_past_its_budget_a_script_starts_no_setting_and_still_prints_its_table(capsys):
    from benchmarks import gpu_wan

    gpu_wan.main(smoke=True, budget_s=1e-3)  # the baseline always runs; nothing after it
    out = capsys.readouterr().out
    skipped = [name for name, _ in gpu_wan.SETTINGS[1:]]
    assert all(f"{name}: skipped, past the time budget" in out for name in skipped)
    table = out.split("# SMOKE", 1)[1].splitlines()
    assert any(line.startswith("baseline ") for line in table)
    assert not any(line.startswith(name) for line in table for name in skipped)


def test_random_gpu_models_keep_in_float32_what_a_loaded_one_keeps():
    """The GPU scripts cast their random transformers to bf16 as `from_pretrained(torch_dtype=)`
    loads a real one: Wan's rope, time embedder and norms stay float32 (a plain `.to()` casts
    them all), and the mixed model still runs."""
    import torch

    from benchmarks import gpu_wan

    size = {**gpu_wan.SMOKE, "dtype": torch.bfloat16}
    pipe = gpu_wan.build(size)
    dtypes = {name: tensor.dtype for name, tensor in [*pipe.transformer.named_parameters(),
                                                       *pipe.transformer.named_buffers()]}
    kept = {name for name, dtype in dtypes.items() if dtype == torch.float32}
    assert {"rope.freqs_cos", "scale_shift_table", "blocks.0.norm2.weight"} <= kept
    assert all(".time_embedder." in name or name.split(".")[-1] == "scale_shift_table"
               or ".norm" in name or name.startswith("rope.") for name in kept)
    assert dtypes["blocks.0.attn1.to_q.weight"] == torch.bfloat16
    embeds = torch.randn(1, 16, size["text_dim"], dtype=torch.bfloat16)
    video = pipe(prompt_embeds=embeds, negative_prompt_embeds=embeds, height=32, width=32,
                 num_frames=5, num_inference_steps=1, output_type="latent").frames
    assert video.dtype == torch.bfloat16 and torch.isfinite(video.float()).all()
