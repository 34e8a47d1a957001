"""Bad input: one line naming the problem and the fix, exit 2 (3 for nothing to export), no
traceback, no password, and the storage exactly as before."""

from __future__ import annotations

import os
import shutil
import time

import optuna
import pytest

from tests.conftest import ROOT, TINY_SPEC, optsearch_cmd, storage_snapshot

PASSWORD = "s3cret-pw"
UNREACHABLE = f"postgresql+psycopg://optsearch:{PASSWORD}@127.0.0.1:1/optsearch"
UNKNOWN_ROLE = f"postgresql+psycopg://nobody:{PASSWORD}@127.0.0.1:5432/postgres"


@pytest.fixture(scope="module")
def populated(tmp_path_factory):
    """A storage holding a finished 2-trial study, made once; each test works on a copy."""
    folder = tmp_path_factory.mktemp("populated")
    (folder / "tiny.toml").write_text(TINY_SPEC.replace("n_trials = 4", "n_trials = 2"))
    result = optsearch_cmd("run", "tiny.toml", "--storage", "sqlite:///study.db", "--quiet", cwd=folder)
    assert result.returncode == 0, result.stderr
    return folder


def spec_with(text: str) -> str:
    return TINY_SPEC + text


def replaced(old: str, new: str) -> str:
    assert old in TINY_SPEC
    return TINY_SPEC.replace(old, new)


# (case id, files to write, command arguments ({db} is the storage), exit code, expected text)
CASES = [
    ("malformed TOML", {"s.toml": "[model\nid = 'x'"}, ["study", "create", "s.toml"], 2,
     "not valid TOML"),
    ("unknown key", {"s.toml": spec_with("[model2]\nx = 1\n")}, ["study", "create", "s.toml"], 2,
     "model2: unknown key"),
    ("a property is not a key", {"s.toml": replaced("[search]", '[search]\ncombos = ["tome"]')},
     ["study", "create", "s.toml"], 2, "search.combos: unknown key"),
    ("unknown CLIP model", {"s.toml": replaced('clip_model = "builtin:tiny"', 'clip_model = "ViT-Q"')},
     ["check", "s.toml"], 2, "quality.clip_model: unknown CLIP model 'ViT-Q': not one of open_clip"),
    ("a study with an unknown CLIP model is never made",
     {"s.toml": replaced('clip_model = "builtin:tiny"', 'clip_model = "ViT-Q"')},
     ["study", "create", "s.toml", "--name", "clip"], 2, "quality.clip_model: unknown CLIP model"),
    ("a compiled study with a backend torch does not know is never made",
     {"s.toml": replaced("steps = 8", 'steps = 8\ncompile = "full"\ncompile_backend = "inductr"')},
     ["study", "create", "s.toml"], 2, "model.compile_backend: Invalid backend: 'inductr', did you "
     "mean: 'inductor'?"),
    ("a compile mode torch does not know",
     {"s.toml": replaced("steps = 8", 'steps = 8\ncompile = "full"\ncompile_mode = "max-autotun"')},
     ["run", "s.toml", "--name", "other"], 2, "model.compile_mode: Unrecognized mode=max-autotun"),
    ("wrong type", {"s.toml": replaced("steps = 8", 'steps = "eight"')},
     ["study", "create", "s.toml"], 2, "model.steps: must be an integer"),
    ("out-of-range parameter", {"s.toml": spec_with("[space.tome]\nratio = [0.2, 1.5]\n")},
     ["study", "create", "s.toml"], 2, "space.tome.ratio: 1.5 must be < 1.0"),
    ("T-GATE without guidance", {"s.toml": replaced('["deepcache", "tome"]', '["tgate"]')
                                 .replace("steps = 8", "steps = 8\nguidance_scale = 1.0")
                                 + "[space.tgate]\ngate_step = [2, 6]\n"},
     ["study", "create", "s.toml"], 2, "tgate needs classifier-free guidance"),
    ("unknown scheduler", {"s.toml": replaced("steps = 8", 'steps = 8\nscheduler = "Warp"')},
     ["study", "create", "s.toml"], 2, "unknown scheduler 'Warp'"),
    ("unknown accelerator", {"s.toml": replaced('["deepcache", "tome"]', '["deepcache", "x"]')},
     ["study", "create", "s.toml"], 2, "unknown accelerator 'x'"),
    ("unknown prompt source", {"s.toml": replaced('source = "builtin"', 'source = "laion"')},
     ["study", "create", "s.toml"], 2, "unknown prompt source 'laion'"),
    ("empty prompt file", {"s.toml": replaced('source = "builtin"', 'source = "empty.txt"'),
                           "empty.txt": ""},
     ["run", "s.toml", "--name", "other"], 2, "empty.txt' is empty"),
    ("missing model folder", {"s.toml": replaced('"builtin:tiny"', '"./missing-model"')},
     ["run", "s.toml", "--name", "other"], 2, "missing-model' does not exist"),
    ("target-speedup without target", {"s.toml": spec_with('[objective]\nmode = "target-speedup"\n')},
     ["study", "create", "s.toml"], 2, "objective.target_speedup: is required"),
    ("unreachable storage: try again", {}, ["study", "list", "--storage", UNREACHABLE], 75,
     "cannot reach storage postgresql+psycopg://optsearch:***@127.0.0.1:1/optsearch"),
    ("a host that does not resolve is a wrong URL", {},
     ["study", "list", "--storage", "postgresql+psycopg://optsearch@no-such-host.invalid/x"], 2,
     "cannot open storage postgresql+psycopg://optsearch@no-such-host.invalid/x: failed to resolve"),
    ("wrong credentials", {}, ["study", "list", "--storage", UNKNOWN_ROLE], 2,
     'role "nobody" does not exist'),
    ("malformed storage URL", {}, ["study", "list", "--storage", "not a url"], 2,
     "malformed storage URL"),
    ("unknown study", {}, ["study", "show", "nope"], 2, "no study named 'nope'"),
    ("worker on unknown study", {}, ["worker", "--study", "nope"], 2, "no study named 'nope'"),
    ("export with no feasible trial", {"s.toml": replaced("limit = 30.0", "limit = 99.0")},
     ["run", "s.toml", "--name", "strict", "--n-trials", "1"], 0, ""),
    ("conflicting create", {"s.toml": replaced("steps = 8", "steps = 9")},
     ["study", "create", "s.toml", "--load-if-exists"], 2,
     "study 'tiny' exists with a different spec (differs in: model.steps"),
    ("existing name", {"s.toml": TINY_SPEC}, ["study", "create", "s.toml"], 2,
     "already exists"),
    ("bad option value", {}, ["worker", "--study", "tiny", "--n-trials", "many"], 2,
     "'many' is not an integer"),
    ("bad --set", {"s.toml": TINY_SPEC}, ["evaluate", "s.toml", "--set", "tome.ratio=fast"], 2,
     "tome.ratio='fast' must be a number"),  # a name only where a parameter takes names
    ("delete unknown study", {}, ["study", "delete", "nope"], 2, "no study named 'nope'"),
    ("changed spec, finished study", {"s.toml": replaced("limit = 30.0", "limit = 40.0")
                                      .replace("n_trials = 4", "n_trials = 2")},
     ["run", "s.toml"], 2, "study 'tiny' exists with a different spec (differs in: quality.limit)"),
    ("more trials by run", {"s.toml": TINY_SPEC}, ["run", "s.toml"], 2,
     "`optsearch study extend tiny --n-trials N` to add trials"),
    ("extend to fewer trials", {}, ["study", "extend", "tiny", "--n-trials", "2"], 2,
     "already has n_trials 2"),
    ("NaN --set", {"s.toml": TINY_SPEC}, ["evaluate", "s.toml", "--set", "tome.ratio=nan"], 2,
     "--set tome.ratio=nan: 'nan' is not a finite number"),
    ("a transformer cache on a UNet", {"s.toml": TINY_SPEC},
     ["evaluate", "s.toml", "--set", "fbcache.threshold=0.1"], 2,
     "--set: fbcache does not apply to this model (unet pipeline"),
    ("blank study name", {"s.toml": TINY_SPEC}, ["study", "create", "s.toml", "--name", "   "], 2,
     "must be printable text, not blank"),
    ("empty study name", {"s.toml": TINY_SPEC}, ["run", "s.toml", "--name", ""], 2,
     "study name '' must be printable text, not blank"),  # not the spec's name in its place
    ("study name with a newline", {"s.toml": TINY_SPEC}, ["run", "s.toml", "--name", "a\nb"], 2,
     "must be printable text, not blank"),
    ("export into a missing folder", {}, ["study", "export", "tiny", "-o", "missing/p.json"], 2,
     "cannot write missing/p.json: folder missing does not exist"),
    ("plots into a file", {"afile": "x"}, ["study", "plot", "tiny", "-o", "afile"], 2,
     "-o afile: cannot make that folder (File exists)"),
    ("images into a file, said before measuring", {"s.toml": TINY_SPEC, "afile": "x"},
     ["evaluate", "s.toml", "--set", "tome.ratio=0.5", "--save-images", "afile/images"], 2,
     "--save-images afile/images: cannot make that folder (Not a directory)"),
    ("a combo listed twice", {"s.toml": replaced('["deepcache", "tome"]', '[["tome"], ["tome"]]')},
     ["study", "create", "s.toml", "--name", "twice"], 2, "combo tome is listed more than once"),
    ("more prompts than the source has", {"s.toml": replaced("num_samples = 4", "num_samples = 500")},
     ["study", "create", "s.toml", "--name", "many"], 2, "prompts.num_samples=500 but source 'builtin'"),
    ("confirmation beyond the source", {"s.toml": spec_with("[confirm]\nnum_samples = 100\n")},
     ["study", "create", "s.toml", "--name", "confirm"], 2, "confirmation needs 100 unseen prompts"),
    ("run --confirm beyond the source", {"s.toml": replaced("num_samples = 4", "num_samples = 40")},
     ["run", "s.toml", "--name", "c", "--confirm", "1"], 2, "confirmation needs 40 unseen prompts"),
    ("check sees the confirmation beyond the source",
     {"s.toml": spec_with("[confirm]\nnum_samples = 100\n")}, ["check", "s.toml"], 2,
     "confirm: confirmation needs 100 unseen prompts"),
    ("PSNR limit on the wrong scale", {"s.toml": replaced("limit = 30.0", "limit = 0.3")},
     ["study", "create", "s.toml", "--name", "scale"], 2, "0.3 dB is below any meaningful PSNR"),
    ("an artifact folder that is a file", {"s.toml": spec_with('[artifacts]\npath = "afile"\n'),
                                           "afile": "x"},
     ["study", "create", "s.toml", "--name", "art"], 2, "afile is a file: name a folder"),
    ("run --artifact-dir into a file: no study made", {"s.toml": TINY_SPEC, "afile": "x"},
     ["run", "s.toml", "--name", "art", "--artifact-dir", "afile"], 2,
     "artifact folder afile: cannot be made (File exists)"),
    ("a DeepCache branch past the UNet's blocks, said by check",
     {"s.toml": spec_with("[space.deepcache]\ncache_branch_id = [0, 50]\n")}, ["check", "s.toml"], 2,
     "deepcache.cache_branch_id=50 is too large for UNet2DConditionModel's 2 down blocks (allowed: "
     "0..5)"),
    ("a PAB window that some trials would draw empty",
     {"s.toml": replaced('["deepcache", "tome"]', '[["pab"]]')
      + "[space.pab]\ntimestep_skip_low = [100, 900]\ntimestep_skip_high = [500, 600]\n"},
     ["study", "create", "s.toml", "--name", "pab"], 2, "space.pab: pab.timestep_skip_low (100..900) "
     "must lie below pab.timestep_skip_high (500..600): every value of the first below every value"),
    ("evaluate --set a PAB window upside down", {"s.toml": replaced('["deepcache", "tome"]', '[["pab"]]')},
     ["evaluate", "s.toml", "--set", "pab.timestep_skip_low=900", "--set", "pab.timestep_skip_high=100"],
     2, "pab.timestep_skip_low (900) must lie below pab.timestep_skip_high (100)"),
    ("evaluate --set a DeepCache branch past the UNet's blocks", {"s.toml": TINY_SPEC},
     ["evaluate", "s.toml", "--set", "deepcache.cache_branch_id=50"], 2,
     "--set: deepcache.cache_branch_id=50 is too large for UNet2DConditionModel's 2 down blocks"),
]


# What only torch, diffusers or open_clip can tell; every other case is answered before they load
# (a typo must not wait for a 12 GB pipeline to load), which the test proves by making them fail.
NEEDS_TORCH = {"export with no feasible trial", "unknown CLIP model", "a compile mode torch does not know",
               "a compiled study with a backend torch does not know is never made",
               "check sees the confirmation beyond the source",
               "a DeepCache branch past the UNet's blocks, said by check",
               "evaluate --set a DeepCache branch past the UNet's blocks"}


def without_torch(folder) -> dict:
    """An environment where importing torch, diffusers or open_clip fails."""
    for name in ("torch", "diffusers", "open_clip"):
        (folder / name).mkdir(parents=True)
        (folder / name / "__init__.py").write_text(
            f"raise ImportError('{name} loaded before the input was checked')\n")
    paths = (str(folder), os.environ.get("PYTHONPATH"))  # first: shadows the real ones
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path for path in paths if path)}


@pytest.mark.parametrize("files, args, code, expected", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input(populated, tmp_path, files, args, code, expected, request):
    shutil.copy(populated / "study.db", tmp_path / "study.db")
    env = None if request.node.callspec.id in NEEDS_TORCH else without_torch(tmp_path / "no-torch")
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    url = "sqlite:///study.db"
    before = storage_snapshot(f"sqlite:///{tmp_path / 'study.db'}")
    command = args if "--storage" in args or args[0] in ("evaluate", "check") \
        else [*args, "--storage", url]
    if expected == "":  # the export case: a study whose only trial is infeasible
        assert optsearch_cmd(*command, "--quiet", cwd=tmp_path).returncode == 0
        before = storage_snapshot(f"sqlite:///{tmp_path / 'study.db'}")
        command, code, expected = (["study", "export", "strict", "--storage", url, "-o", "out.json"],
                                   3, "no feasible trial yet")
    result = optsearch_cmd(*command, cwd=tmp_path, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == code, output
    assert expected in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in output and PASSWORD not in output
    assert storage_snapshot(f"sqlite:///{tmp_path / 'study.db'}") == before
    assert not (tmp_path / "out.json").exists()


def test_a_worker_on_a_machine_without_the_model_folder_says_so_before_loading(tmp_path):
    """The study was made where its model's folder is; a worker where it is not answers at
    once, before torch loads (on a real pipeline, before minutes of loading), and writes nothing."""
    (tmp_path / "model").mkdir()
    (tmp_path / "s.toml").write_text(replaced('id = "builtin:tiny"', 'id = "./model"'))
    url = f"sqlite:///{tmp_path / 'study.db'}"
    assert optsearch_cmd("study", "create", "s.toml", "--storage", url, cwd=tmp_path).returncode == 0
    (tmp_path / "model").rmdir()
    before = storage_snapshot(url)
    result = optsearch_cmd("worker", "--study", "tiny", "--storage", url,
                           env=without_torch(tmp_path / "no-torch"))
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"optsearch: error: model folder '{tmp_path / 'model'}' does not exist\n"
    assert storage_snapshot(url) == before


def test_a_finished_study_grows_by_extend(populated, tmp_path):
    """`study extend` raises n_trials; the next worker measures only the new trials."""
    shutil.copy(populated / "study.db", tmp_path / "study.db")
    url = "sqlite:///study.db"
    before = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'study.db'}").trials
    done = optsearch_cmd("worker", "--study", "tiny", "--storage", url, cwd=tmp_path)
    assert done.returncode == 0 and "study extend tiny --n-trials N" in done.stdout
    extended = optsearch_cmd("study", "extend", "tiny", "--n-trials", "3", "--storage", url,
                             cwd=tmp_path)
    assert extended.returncode == 0 and "n_trials 2 -> 3" in extended.stdout, extended.stderr
    ran = optsearch_cmd("worker", "--study", "tiny", "--storage", url, "--quiet", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    after = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'study.db'}")
    finished = [t for t in after.trials if t.state.is_finished()]
    assert len(finished) == 3 and after.user_attrs["optsearch:spec"]["search"]["n_trials"] == 3
    assert [(t.number, t.values, t.user_attrs) for t in after.trials[:2]] == \
        [(t.number, t.values, t.user_attrs) for t in before]


def test_delete_refuses_while_a_trial_runs(populated, tmp_path):
    shutil.copy(populated / "study.db", tmp_path / "study.db")
    url = f"sqlite:///{tmp_path / 'study.db'}"
    optuna.load_study(study_name="tiny", storage=url).ask()  # a worker's trial, RUNNING
    before = storage_snapshot(url)
    refused = optsearch_cmd("study", "delete", "tiny", "--storage", url)
    assert refused.returncode == 2 and "1 running trial(s)" in refused.stderr, refused.stderr
    assert storage_snapshot(url) == before
    forced = optsearch_cmd("study", "delete", "tiny", "--force", "-v", "--storage", url)
    assert forced.returncode == 0, forced.stderr
    assert "tiny" not in [s.study_name for s in optuna.get_all_study_summaries(url)]


def test_check_of_a_hub_spec_offline_says_each_missing_piece_once(tmp_path):
    """No network: the hub is tried once, then nothing retries; model, prompts and CLIP weights
    each get one line with the fix (it took 58 s and 48 retry warnings before)."""
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:1", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_OFFLINE", None)
    started = time.monotonic()
    result = optsearch_cmd("check", str(ROOT / "studies" / "sd15-any.toml"), cwd=tmp_path, env=env)
    assert result.returncode == 2, result.stderr
    assert time.monotonic() - started < 40
    lines = result.stderr.strip().splitlines()
    assert all(line.startswith("optsearch: ") for line in lines), result.stderr
    errors = [line for line in lines if line.startswith("optsearch: error: ")]
    assert len(errors) == 3, result.stderr
    for error, fix in zip(errors, ("prompts.source", "set model.id to a local folder",
                                   "quality.clip_pretrained"), strict=True):
        assert "is not in this machine's Hugging Face cache" in error
        assert "127.0.0.1 is unreachable" in error and fix in error


def test_a_create_refused_for_its_spec_leaves_no_new_storage_behind(tmp_path):
    (tmp_path / "s.toml").write_text(replaced('clip_model = "builtin:tiny"', 'clip_model = "ViT-Q"'))
    result = optsearch_cmd("study", "create", "s.toml", "--storage", "sqlite:///new.db", cwd=tmp_path)
    assert result.returncode == 2 and "unknown CLIP model 'ViT-Q'" in result.stderr
    assert not (tmp_path / "new.db").exists()


def test_export_to_stdout_with_a_dash(populated, tmp_path):
    import json

    shutil.copy(populated / "study.db", tmp_path / "study.db")
    result = optsearch_cmd("study", "export", "tiny", "--storage", "sqlite:///study.db", "-o", "-",
                           cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["study"] == "tiny"  # stdout holds the export alone
    assert result.stderr.startswith("wrote stdout: winner trial")
    assert not (tmp_path / "-").exists()


def test_a_dashboard_port_in_use_is_one_line_before_the_server_starts(populated):
    """The web server used to print its banner, then fail with OSError and exit 1."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as holder:
        port = holder.getsockname()[1]
        result = optsearch_cmd("dashboard", "--storage", "sqlite:///study.db", "--port", str(port),
                               cwd=populated)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"optsearch: error: cannot listen on 127.0.0.1:{port}: "
                                     "Address already in use (--host, --port)")
    assert "optuna-dashboard for" not in result.stdout


def test_confirm_with_nothing_to_confirm_answers_before_torch_loads(tmp_path):
    """An unknown study, or one with no feasible trial yet, needs no model to say so: one line,
    before torch and the pipeline load (minutes on a real model), and the storage unchanged."""
    (tmp_path / "s.toml").write_text(TINY_SPEC)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    assert optsearch_cmd("study", "create", "s.toml", "--storage", url, cwd=tmp_path).returncode == 0
    before = storage_snapshot(url)
    env = without_torch(tmp_path / "no-torch")
    for name, code, expected in (("tiny", 3, "study 'tiny' has no feasible trial to confirm yet"),
                                 ("tiyn", 2, "tiyn")):
        for command in (["study", "confirm", name], ["study", "confirm", name, "--top", "2"]):
            result = optsearch_cmd(*command, "--storage", url, env=env)
            assert result.returncode == code, result.stderr
            assert expected in result.stderr and len(result.stderr.splitlines()) == 1, result.stderr
    assert storage_snapshot(url) == before
