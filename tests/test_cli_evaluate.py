"""`optsearch evaluate` as a user runs it: a real process, a table or JSON, images, bad input."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from tests.conftest import OPTSEARCH, TINY_SPEC, write_spec


def run(*args, cwd=None):
    return subprocess.run([OPTSEARCH, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_evaluate_json_and_images(tmp_path):
    spec = write_spec(tmp_path / "tiny.toml", TINY_SPEC)
    result = run("evaluate", str(spec), "--set", "deepcache.cache_interval=3",
                 "--set", "tome.ratio=0.5", "--json", "--quiet",
                 "--save-images", str(tmp_path / "images"))
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["combo"] == "deepcache+tome"
    # the speedup is the baseline's timed batches against the setting's (equal batch sizes)
    timing = data["per_batch"]
    assert data["seconds_per_image"] == pytest.approx(np.mean(timing["batch_seconds"]))
    assert data["speedup"] == pytest.approx(np.mean(timing["baseline_batch_seconds"])
                                            / np.mean(timing["batch_seconds"]), rel=1e-6)
    assert data["setting"]["tome"]["ratio"] == 0.5
    # what these timings are comparable with (a study's fingerprint of the same conditions)
    from optsearch.measure.fingerprint import fingerprint
    from optsearch.measure.models import load_pipeline

    _, facts = fingerprint(load_pipeline("builtin:tiny", "cpu", "float32"), 2)
    threads = data["measured_with"]["threads"]  # the command's own (this process may set others)
    assert data["measured_with"] == {**facts, "threads": threads} and threads >= 1
    assert len(data["fingerprint"]) == 12
    assert len(data["per_prompt"]["psnr"]) == 4 and data["batches_evaluated"] == 2
    assert 0 < data["speedup_low"] <= data["speedup"] <= data["speedup_high"]
    assert len(data["per_batch"]["batch_seconds"]) == len(data["per_batch"]["baseline_batch_seconds"]) == 2
    names = sorted(p.name for p in (tmp_path / "images").iterdir())
    assert names == [f"{kind}_{i:03d}.png" for kind in ("baseline", "setting") for i in range(4)]


def test_evaluate_table(tmp_path):
    spec = write_spec(tmp_path / "tiny.toml", TINY_SPEC)
    result = run("evaluate", str(spec), "--set", "deepcache.cache_interval=4", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "speedup [95% CI]" in result.stdout and "deepcache" in result.stdout
    assert "baseline" in result.stdout
    row = next(line for line in result.stdout.splitlines() if line.startswith("deepcache"))
    # CLIP loss, PSNR and SSIM each with an interval; the speedup's too, or, from 2 noisy batches,
    # words saying it is too wide to tell
    assert row.count("[") == 4 or (row.count("[") == 3 and "(not measured enough to tell)" in row)


@pytest.mark.parametrize("args, message", [
    (["--set", "tome.ratio=1.5"], "tome.ratio=1.5 must be < 1.0"),
    (["--set", "tome.ratio"], "must look like ACCELERATOR.PARAM=VALUE"),
    (["--set", "warp.speed=9"], "unknown accelerator 'warp'"),
    (["--set", "deepcache.cache_interval=30"], "deepcache.cache_interval=30 must be <= 8 (model.steps)"),
])
def test_evaluate_bad_input_is_one_line_exit_2(tmp_path, args, message):
    spec = write_spec(tmp_path / "tiny.toml", TINY_SPEC)
    result = run("evaluate", str(spec), *args, "--quiet")
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_evaluate_missing_model_folder(tmp_path):
    spec = write_spec(tmp_path / "s.toml", TINY_SPEC.replace("builtin:tiny", "./no-such-model"))
    result = run("evaluate", str(spec), "--quiet")
    assert result.returncode == 2 and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


LONG_PROMPT = "a photograph of " + " and ".join(
    f"a {color} cat on a {color} chair beside a window" for color in
    ["red", "blue", "green", "yellow", "purple", "orange", "pink", "white"])


def test_long_prompts_are_said_once_not_on_every_call(tmp_path):
    """Prompts past CLIP's 77 tokens: one line counting them, not diffusers' cut text (hundreds
    of characters) on every batch of the baseline and the setting."""
    (tmp_path / "long.txt").write_text(f"{LONG_PROMPT}\na dog\n{LONG_PROMPT} again\na cat\n")
    spec = write_spec(tmp_path / "tiny.toml", TINY_SPEC.replace('source = "builtin"',
                                                                 'source = "long.txt"'))
    result = run("evaluate", str(spec), "--set", "deepcache.cache_interval=3", "--quiet",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        "optsearch: warning: 2 of 4 prompts are longer than the CLIP text encoder's 77 tokens: the "
        "pipeline (and the CLIP score) reads their first 77, as when served; diffusers' warning of "
        "the cut is not repeated on every call"]


def test_a_served_pipeline_still_warns_of_the_cut(caplog):
    """The cut is quiet only while optsearch generates: the same pipeline called outside (as
    served, or through optsearch.apply) warns as diffusers does."""
    import logging

    from optsearch.measure.generation import GenerationConfig, generate
    from optsearch.measure.long_prompts import long_prompts
    from optsearch.measure.models import load_pipeline

    pipe = load_pipeline("builtin:tiny", "cpu", "float32")
    prompts = [LONG_PROMPT, "a dog"]
    assert long_prompts(pipe, prompts) == (1, 77)
    assert long_prompts(load_pipeline("builtin:tiny-wan", "cpu", "float32"), prompts) == (0, 0)
    logging.getLogger("diffusers").propagate = True  # diffusers' own handler does not propagate
    try:
        with caplog.at_level(logging.WARNING):
            list(generate(pipe, prompts, GenerationConfig(steps=2, batch_size=2), warmup=False))
            assert not [r for r in caplog.records if "truncated" in r.getMessage()]
            pipe(prompts, num_inference_steps=1, output_type="np")
        assert [r for r in caplog.records if "truncated" in r.getMessage()]
    finally:
        logging.getLogger("diffusers").propagate = False

