"""Inspection: image-grid artifacts, the dashboard in a real browser, plots."""

from __future__ import annotations

import json
import urllib.request

import optuna
import pytest
from optuna.artifacts import get_all_artifact_meta
from PIL import Image

from optsearch.optimize import study as studies
from optsearch.storage.record import DASHBOARD_CONSTRAINTS_KEY
from optsearch.study_spec import load_spec
from tests.conftest import TINY_SPEC, browser_page, dashboard, optsearch_cmd, write_spec

INSPECT_SPEC = (TINY_SPEC.replace("n_trials = 4", "n_trials = 6\nseed = 1")
                .replace("limit = 30.0", "limit = 38.0")
                + "[artifacts]\ngrid_prompts = 2\n")


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory):
    """A real tiny study run to completion on SQLite, with artifacts in ./artifacts."""
    folder = tmp_path_factory.mktemp("inspect")
    spec = write_spec(folder / "tiny.toml", INSPECT_SPEC)
    url = f"sqlite:///{folder / 'study.db'}"
    result = optsearch_cmd("run", str(spec), "--storage", url, "--quiet", cwd=folder)
    assert result.returncode == 0, result.stderr
    (folder / "run.out").write_text(result.stdout)
    return folder, url


def test_the_worker_says_one_line_per_trial_even_when_quiet(finished_study):
    """A long study's log (a pod's, a SLURM task's, run under --quiet) records each trial as it
    ends: its setting, its figures with their intervals, what became of it, and the winner."""
    from optsearch.formatting import format_interval, format_setting, format_speedup
    from optsearch.storage.record import quality_of

    folder, url = finished_study
    study = optuna.load_study(study_name="tiny", storage=url)
    finished = study.get_trials(states=studies.FINISHED)
    worker = finished[0].user_attrs["worker"]
    lines = [line for line in (folder / "run.out").read_text().splitlines()
             if line.startswith(f"{worker}: trial ")]
    assert len(lines) == len(finished) == 6
    spec = load_spec(folder / "tiny.toml")
    verdicts = set()
    for line, trial in zip(lines, finished, strict=True):
        a = trial.user_attrs
        searched = {family: spec.searched_params(family) for family in a["setting"]}
        assert "use_rand" not in line  # fixed by the spec: in the setting, not in the log line
        figures = (f"{worker}: trial {trial.number} {format_setting(a['setting'], searched)}: speedup "
                   f"{format_speedup(a)}, psnr {format_interval(quality_of(a, 'psnr'))}: ")
        assert line.startswith(figures)
        verdict = line.removeprefix(figures).split("; the winner so far")[0]
        if trial.state == optuna.trial.TrialState.PRUNED:
            assert verdict.startswith(f"stopped early ({a['early_stop_reason']}) after "
                                      f"{a['batches_evaluated']} of {a['n_batches']} batches")
        elif a["constraints"]["quality"] > 0:
            assert verdict.split(", the same images as")[0] == "infeasible (quality)"
        else:
            assert verdict.startswith("feasible")
        verdicts.add(verdict.split(" ")[0])
    assert {"feasible", "infeasible"} <= verdicts  # the fixture study holds both
    assert lines[-1].endswith(f"; the winner so far: trial {study.user_attrs['winner']['trial']}")


def test_every_trial_uploads_one_image_grid(finished_study):
    folder, url = finished_study
    study = optuna.load_study(study_name="tiny", storage=url)
    store = optuna.artifacts.FileSystemArtifactStore(str(folder / "artifacts"))
    for trial in study.get_trials(states=studies.FINISHED):
        metas = get_all_artifact_meta(trial, storage=study._storage)
        assert len(metas) == 1 and metas[0].mimetype == "image/png"
        assert f"trial-{trial.number:04d}_deepcache+tome_speedup-" in metas[0].filename
        with store.open_reader(metas[0].artifact_id) as reader:
            grid = Image.open(reader)
            grid.load()
        assert grid.width > 2 * 192 and grid.height > 2 * 192  # 2 prompts x (baseline, trial)
    study_metas = [m.filename for m in get_all_artifact_meta(study, storage=study._storage)]
    assert sorted(name.rsplit(".", 1)[1] for name in study_metas) == ["npz", "png"]


def test_dashboard_constraint_form_matches(finished_study):
    _, url = finished_study
    study = optuna.load_study(study_name="tiny", storage=url)
    finished = study.get_trials(states=studies.FINISHED)
    feasibility = set()
    for trial in finished:
        listed = trial.system_attrs[DASHBOARD_CONSTRAINTS_KEY]
        assert listed == list(trial.user_attrs["constraints"].values())
        feasibility.add(all(v <= 0 for v in listed))
    assert feasibility == {True, False}, "the fixture study should hold feasible and infeasible trials"


def test_study_plot_writes_pngs(finished_study, tmp_path):
    _, url = finished_study
    result = optsearch_cmd("study", "plot", "tiny", "--storage", url, "-o", str(tmp_path / "plots"))
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert names == ["history.png", "importances.png", "speedup_vs_quality.png"]
    for name in names:
        with Image.open(tmp_path / "plots" / name) as image:
            assert image.width >= 600 and image.height >= 400


def test_the_speedup_vs_quality_plot_shows_each_trials_intervals(finished_study):
    """Every figure says how sure it is: each point carries its speedup and quality intervals
    (as the trial recorded them), so two settings the plot shows apart can be told apart."""
    from matplotlib.collections import LineCollection

    from optsearch.cli.plots import speedup_vs_quality
    from optsearch.study_spec import spec_from_dict

    _, url = finished_study
    study = optuna.load_study(study_name="tiny", storage=url)
    spec = spec_from_dict({"name": "tiny", **study.user_attrs["optsearch:spec"]})
    ax = speedup_vs_quality(study, spec).axes[0]
    assert ax.get_title().endswith("bars: 95% intervals)")
    vertical, horizontal = set(), set()
    for bars in (c for c in ax.collections if isinstance(c, LineCollection)):
        for (x0, y0), (x1, y1) in bars.get_segments():
            (vertical if x0 == x1 else horizontal).add(
                (round(x0, 6), round(y0, 6), round(y1, 6)) if x0 == x1 else
                (round(y0, 6), round(x0, 6), round(x1, 6)))
    shown = [t for t in study.get_trials(states=studies.FINISHED) if t.user_attrs.get("speedup")]
    assert shown
    for trial in shown:
        a = trial.user_attrs
        if a.get("speedup_low") is not None:
            assert (round(a["psnr"], 6), round(a["speedup_low"], 6),
                    round(a["speedup_high"], 6)) in vertical
        assert (round(a["speedup"], 6), round(a["psnr_low"], 6), round(a["psnr_high"], 6)) \
            in horizontal


def test_study_plot_of_a_study_not_measured_yet_says_so(tmp_path):
    """No trial measured: one line and exit 3 (as export with no answer), no empty PNGs."""
    url = f"sqlite:///{tmp_path}/p.db"
    spec = write_spec(tmp_path / "t.toml", TINY_SPEC)
    assert optsearch_cmd("study", "create", str(spec), "--storage", url).returncode == 0
    result = optsearch_cmd("study", "plot", "tiny", "--storage", url, "-o", str(tmp_path / "plots"))
    assert result.returncode == 3
    assert result.stderr == ("optsearch: error: study 'tiny' has no measured trial to plot yet "
                             "(`optsearch worker --study tiny` measures them)\n")
    assert not list((tmp_path / "plots").glob("*"))  # -o is checked first: the folder may be made


def test_dashboard_in_headless_chromium(finished_study, tmp_path):
    folder, url = finished_study
    with dashboard(url, folder) as (base, summary, output):
        study_id = summary["study_id"]
        with urllib.request.urlopen(f"{base}/api/studies/{study_id}", timeout=10) as response:
            detail = json.load(response)
        assert all(trial["constraints"] for trial in detail["trials"]), "dashboard sees no constraints"
        with browser_page() as page:
            page.goto(f"{base}/dashboard/studies/{study_id}/trials", wait_until="networkidle")
            page.get_by_text("Trial 5", exact=True).first.wait_for(timeout=30_000)
            page.wait_for_function(
                "Array.from(document.images).some(i => i.src.includes('/artifacts/') && i.complete"
                " && i.naturalWidth > 0)", timeout=30_000)
            page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
            body = page.inner_text("body")
        assert "6 Trials" in body and "Trial 0" in body
        assert (tmp_path / "dashboard.png").stat().st_size > 10_000
    assert f"{base}/" in output[0]  # bound to loopback by default
