"""The first real run (issue 11): hub paths proven offline through the libraries' own caches,
your own pipeline as a `module:function` factory, `optsearch.search` in-process, and the
`optsearch check` preflight.

Where the real names come from (fixtures follow these schemas):
- phiyodr/coco2017: splits train/validation, `captions` a list of strings per image, files
  data/<split>-*.parquet (its dataset card, huggingface.co/datasets/phiyodr/coco2017, rev 036f3f8).
- nateraw/parti-prompts: split `train`, columns Prompt, Category, Challenge, Note (its card;
  PrunaAI InferBench benchmark/parti.py reads row["Prompt"] of split "train").
- open_clip ViT-g-14 / laion2b_s34b_b88k: hf_hub "laion/CLIP-ViT-g-14-laion2B-s34B-b88K/"
  (open_clip's own pretrained table, resolved below by open_clip itself).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import warnings

import optuna
import pytest

import optsearch
from optsearch.errors import UsageError
from optsearch.storage.record import is_copy
from optsearch.study_spec import load_spec

from .conftest import ROOT, TINY_SPEC, optsearch_cmd, write_spec
from .hub_cache import cached_dataset, cached_pipeline, snapshot


def offline_python(home, code: str) -> dict:
    """Run `code` in a fresh interpreter with the hub offline and HF_HOME at `home`; it prints
    one JSON object, returned here."""
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_pipelines_load_by_hub_id_from_the_cache_offline(tmp_path):
    """With and without an fp16 variant, with and without a safety checker: one snapshot each."""
    cases = {f"test-org/tiny-{v}-{c}": (v == "fp16", c == "checker")
             for v in ("fp16", "plain") for c in ("checker", "none")}
    for repo_id, (fp16_variant, safety_checker) in cases.items():
        cached_pipeline(tmp_path, repo_id, fp16_variant, safety_checker)
    found = offline_python(tmp_path, f"""
        import json, torch, warnings
        from optsearch.measure.models import _load_pretrained, load_pipeline
        found = {{}}
        for repo_id in {list(cases)!r}:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                half = _load_pretrained(repo_id, torch.float16, "unet")
                pipe = load_pipeline(repo_id, "cpu", "float32")
            found.setdefault("dtype_warnings", []).extend(
                str(w.message) for w in caught if "dtype" in str(w.message))
            images = pipe(["a red bus"], num_inference_steps=2, output_type="np").images
            marked = (half.unet.conv_in.bias.float() - pipe.unet.conv_in.bias).abs().max() > 0.5
            found[repo_id] = {{"half": str(half.unet.dtype), "dtype": str(pipe.unet.dtype),
                              "fp16_files_read": bool(marked),
                              "safety_checker": half.safety_checker is None and pipe.safety_checker is None,
                              "shape": list(images.shape)}}
        print(json.dumps(found))
    """)
    assert found["dtype_warnings"] == []  # "`torch_dtype` is deprecated" on every load, once
    for repo_id, (fp16_variant, _) in cases.items():
        assert found[repo_id] == {"half": "torch.float16", "dtype": "torch.float32",
                                  "fp16_files_read": fp16_variant, "safety_checker": True,
                                  "shape": [1, 32, 32, 3]}, repo_id


def test_the_shipped_offload_factory_loads_flux_dev_group_offloaded_offline(tmp_path):
    """studies/flux-dev-offload.toml's factory, on FLUX.1-dev's hub id (a tiny FLUX in the hub
    cache): built through the spec's own factory path, group-offloaded as built (not moved to the
    device), and it generates."""
    from optsearch.measure.builtin import build_builtin

    build_builtin("builtin:tiny-flux").save_pretrained(
        snapshot(tmp_path, "model", "black-forest-labs/FLUX.1-dev", sha="b" * 40))
    spec = load_spec(ROOT / "studies" / "flux-dev-offload.toml")
    found = offline_python(tmp_path, f"""
        import json
        from optsearch.accelerators import execution_device, offload_of
        from optsearch.measure.models import load_pipeline
        pipe = load_pipeline({spec.model.id!r}, "cpu", "float32", kind={spec.model.kind!r},
                             factory_path={spec.model.factory_path!r})
        images = pipe(["a red bus"], num_inference_steps=2, height=64, width=64,
                      max_sequence_length=32, output_type="np").images
        print(json.dumps({{"pipeline": type(pipe).__name__, "offload": offload_of(pipe),
                          "device": str(execution_device(pipe)), "shape": list(images.shape)}}))
    """)
    assert found == {"pipeline": "FluxPipeline", "offload": "group", "device": "cpu",
                     "shape": [1, 64, 64, 3]}


def test_coco2017_gives_the_first_caption_of_each_validation_image_offline(tmp_path):
    row = dict(license=[1, 2, 3], coco_url=["u"] * 3, height=[480] * 3, width=[640] * 3,
               date_captured=["2013-11-14"] * 3, flickr_url=["f"] * 3, image_id=[1, 2, 3],
               ids=[[10, 11], [12], [13, 14]])
    cached_dataset(tmp_path, "phiyodr/coco2017", {
        "train": {**row, "file_name": ["t1.jpg", "t2.jpg", "t3.jpg"],
                  "captions": [["train one"], ["train two"], ["train three"]]},
        "validation": {**row, "file_name": ["v1.jpg", "v2.jpg", "v3.jpg"],
                       "captions": [["A man on a horse.", "A rider."], ["A red bus."],
                                    ["Two cats.", "Cats asleep."]]},
    })
    found = offline_python(tmp_path, """
        import json
        from optsearch.measure.prompts import load_prompts
        print(json.dumps(load_prompts("coco2017", 3)))
    """)
    assert found == ["A man on a horse.", "A red bus.", "Two cats."]


def test_parti_prompts_read_their_prompt_column_offline(tmp_path):
    cached_dataset(tmp_path, "nateraw/parti-prompts", {"train": {
        "Prompt": ["bond", "a dog on the moon"], "Category": ["Abstract", "Animals"],
        "Challenge": ["Basic", "Imagination"], "Note": ["", ""]}})
    found = offline_python(tmp_path, """
        import json
        from optsearch.measure.prompts import load_prompts
        print(json.dumps(load_prompts("parti", 2)))
    """)
    assert found == ["bond", "a dog on the moon"]


def test_open_clip_resolves_name_and_tag_to_the_cached_weights_file_offline(tmp_path):
    from optsearch.measure.quality import clip_weights_files

    repo, names = clip_weights_files("ViT-g-14", "laion2b_s34b_b88k")
    assert repo == "laion/CLIP-ViT-g-14-laion2B-s34B-b88K"
    weights = snapshot(tmp_path, "model", repo, sha="b" * 40) / names[0]
    weights.write_bytes(b"not gigabytes")
    found = offline_python(tmp_path, """
        import json
        import open_clip
        from open_clip.pretrained import download_pretrained
        from optsearch.measure.quality import check_clip_weights
        check_clip_weights("ViT-g-14", "laion2b_s34b_b88k")  # no error: the file is cached
        path = download_pretrained(open_clip.get_pretrained_cfg("ViT-g-14", "laion2b_s34b_b88k"))
        print(json.dumps(path))
    """)
    assert os.path.samefile(found, weights)


FACTORY = '''
import torch
from diffusers import EulerDiscreteScheduler

from optsearch.measure.builtin import build_builtin


def build(device, dtype):
    """builtin:tiny with another scheduler and a "fused LoRA" (a nudged bias)."""
    pipe = build_builtin("builtin:tiny")
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    with torch.no_grad():
        pipe.unet.conv_in.bias += 0.01
    return pipe.to(device, dtype)


def not_a_pipeline(device, dtype):
    return 42


def offloaded(device, dtype):
    """A pipeline too big for the GPU, as its builder serves it: weights on the host."""
    pipe = build_builtin("builtin:tiny")
    pipe.enable_model_cpu_offload(device=device)
    return pipe


def flux_math_attention(device, dtype):
    """A transformer served with another attention backend than torch's default SDPA kernel."""
    pipe = build_builtin("builtin:tiny-flux").to(device)
    pipe.transformer.set_attention_backend("_native_math")
    return pipe


def int8_unet(device, dtype):
    """A UNet served quantized: torch's dynamic int8 quantization of its linear layers."""
    pipe = build_builtin("builtin:tiny").to(device)
    torch.ao.quantization.quantize_dynamic(pipe.unet, {torch.nn.Linear}, dtype=torch.qint8,
                                           inplace=True)
    return pipe


def group_offloaded(device, dtype):
    pipe = build_builtin("builtin:tiny")
    pipe.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"),
                              offload_type="block_level", num_blocks_per_group=1)
    return pipe
'''


def test_a_factory_pipeline_is_searched_by_several_worker_processes(tmp_path):
    (tmp_path / "my_pipes.py").write_text(FACTORY)
    text = TINY_SPEC.replace('id = "builtin:tiny"', 'id = "my_pipes:build"') \
        .replace("n_trials = 4", "n_trials = 2\nwarm_start = []")
    write_spec(tmp_path / "factory.toml", text)
    elsewhere = tmp_path / "elsewhere"  # the module is beside the spec, not in the cwd
    elsewhere.mkdir()
    url = f"sqlite:///{tmp_path}/f.db"
    first = optsearch_cmd("run", "../factory.toml", "--storage", url, "--n-trials", "1", "--quiet",
                          cwd=elsewhere)
    assert first.returncode == 0, first.stderr
    assert "estimate: " in first.stdout  # run shows what the study will cost when it starts
    second = optsearch_cmd("worker", "--study", "tiny", "--storage", url, "--quiet", cwd=elsewhere)
    assert second.returncode == 0, second.stderr
    study = optuna.load_study(study_name="tiny", storage=url)
    trials = study.get_trials()
    assert len(trials) == 2 and len({t.user_attrs["worker"] for t in trials}) == 2
    assert all(t.state.name == "COMPLETE" for t in trials)
    stored = study.user_attrs["optsearch:spec"]
    assert stored["model"]["factory_path"] == str(tmp_path)
    assert stored["artifacts"]["path"] == str(tmp_path / "artifacts")  # beside the spec
    assert len(list((tmp_path / "artifacts").rglob("*"))) > 0 and not list(elsewhere.iterdir())
    from optsearch.cli.dashboard import stored_artifact_dir
    assert stored_artifact_dir(study._storage) == str(tmp_path / "artifacts")


def test_an_offloaded_factory_pipeline_is_measured_as_built(tmp_path):
    """A factory that offloads (a GPU that cannot hold the pipeline) is measured as it was built:
    never moved with `.to(device)` (which undoes diffusers' model offload and refuses the
    sequential one), timed where it computes, its offload part of the device fingerprint and of
    the deployment context the export records, so serving it without offload warns."""
    (tmp_path / "my_pipes.py").write_text(FACTORY)
    group = write_spec(tmp_path / "group.toml", TINY_SPEC.replace(
        'id = "builtin:tiny"', 'id = "my_pipes:group_offloaded"'))
    checked = optsearch_cmd("check", str(group), cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert "is group offloaded and moving it" not in checked.stderr  # it was moved before
    assert "8 steps (DDIMScheduler), guidance 7.5, group offload" in checked.stdout

    text = TINY_SPEC.replace('id = "builtin:tiny"', 'id = "my_pipes:offloaded"') \
        .replace('accelerators = ["deepcache", "tome"]', 'accelerators = ["steps"]') \
        .replace("limit = 30.0", "limit = 10.0") \
        .replace("n_trials = 4", "n_trials = 1\nwarm_start = []\n[space.steps]\n"
                 "num_inference_steps = [2, 3]")  # 3x-4x faster: feasible on any load
    url = f"sqlite:///{tmp_path}/o.db"
    ran = optsearch_cmd("run", str(write_spec(tmp_path / "model.toml", text)), "--storage", url,
                        "--quiet", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    study = optuna.load_study(study_name="tiny", storage=url)

    from optsearch.optimize.study import baselines

    baseline, = baselines(study).values()
    assert baseline["offload"] == "model" and baseline["device"].startswith("cpu:")
    assert f"{baseline['device']} (model offload) " in ran.stdout  # run ends with study show
    exported = tmp_path / "params.json"
    done = optsearch_cmd("study", "export", "tiny", "--storage", url, "-o", str(exported))
    assert done.returncode == 0, done.stderr
    deployment = json.loads(exported.read_text())["deployment"]
    assert deployment["offload"] == "model"

    from optsearch.measure.models import load_pipeline

    plain = load_pipeline("builtin:tiny", "cpu", "float32")
    with pytest.warns(UserWarning, match="measured at offload = model; called with none"):
        with optsearch.apply(plain, str(exported)) as fast:
            fast(["a red bus", "a cat"], num_inference_steps=8, output_type="np")


@pytest.mark.parametrize("factory, model, limit, key, value, context, shown, plain_id, scheduler", [
    ("flux_math_attention", 'kind = "transformer"\nguidance_scale = 3.5', "10.0", "attention",
     "_native_math", "8 steps (FlowMatchEulerDiscreteScheduler), guidance 3.5, attention _native_math",
     "(attention _native_math)", "builtin:tiny-flux", "FlowMatchEulerDiscreteScheduler"),
    ("int8_unet", "", "5.0", "quantization", "torch.ao dynamic",
     "8 steps (DDIMScheduler), guidance 7.5, quantized (torch.ao dynamic)",
     "(quantized: torch.ao dynamic)", "builtin:tiny", "DDIMScheduler"),
])
def test_how_a_factory_serves_its_denoiser_is_measured_and_exported(tmp_path, factory, model, limit,
                                                                   key, value, context, shown,
                                                                   plain_id, scheduler):
    """A factory that sets diffusers' attention backend (flash, sage: what a server picks) or
    quantizes the denoiser (int8, for a server short of memory) is measured so: the backend or
    quantization is part of the fingerprint, of `check`'s context line, of `study show`'s
    baseline and of the export's deployment, so serving the setting on the plain pipeline warns
    (either changes what a skipped block saves)."""
    (tmp_path / "my_pipes.py").write_text(FACTORY)
    text = TINY_SPEC.replace('id = "builtin:tiny"', f'id = "my_pipes:{factory}"') \
        .replace("steps = 8", f"steps = 8\n{model}") \
        .replace('accelerators = ["deepcache", "tome"]', 'accelerators = ["steps"]') \
        .replace("limit = 30.0", f"limit = {limit}") \
        .replace("n_trials = 4", "n_trials = 1\nwarm_start = []\n[space.steps]\n"
                 "num_inference_steps = [2, 3]")  # 3x-4x faster: feasible on any load
    spec = write_spec(tmp_path / "served.toml", text)
    checked = optsearch_cmd("check", str(spec), cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert context in checked.stdout
    url = f"sqlite:///{tmp_path}/a.db"
    ran = optsearch_cmd("run", str(spec), "--storage", url, "--quiet", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    from optsearch.optimize.study import baselines

    baseline, = baselines(optuna.load_study(study_name="tiny", storage=url)).values()
    assert baseline[key] == value  # in the fingerprint's facts
    assert baseline["scheduler"] == scheduler  # the deployment's
    assert f"{baseline['device']} {shown}" in ran.stdout  # study show's baseline
    exported = tmp_path / "params.json"
    assert optsearch_cmd("study", "export", "tiny", "--storage", url, "-o", str(exported)).returncode == 0
    deployment = json.loads(exported.read_text())["deployment"]
    assert deployment[key] == value and deployment["scheduler"] == scheduler  # from the baseline

    from optsearch.measure.models import load_pipeline

    plain = load_pipeline(plain_id, "cpu", "float32")
    served = "native" if key == "attention" else "none"
    with pytest.warns(UserWarning, match=f"measured at {key} = {value}; called with {served}"):
        with optsearch.apply(plain, str(exported)) as fast:
            fast(["a red bus", "a cat"], num_inference_steps=8, output_type="np",
                 **({"guidance_scale": 3.5} if key == "attention" else {}))


@pytest.mark.parametrize("model_id, message", [
    ("nope_module:build", "cannot import 'nope_module' (from the working directory or PYTHONPATH)"),
    ("my_pipes:missing", "'my_pipes' has no function 'missing'"),
    ("my_pipes:not_a_pipeline", "the factory returned int, not a diffusers pipeline"),
])
def test_a_bad_factory_is_a_model_load_error(tmp_path, monkeypatch, model_id, message):
    """A ModelLoadError: one line, exit 2, on the command line (test_check_lists_every_problem)."""
    from optsearch.measure.models import ModelLoadError, load_pipeline

    (tmp_path / "my_pipes.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "my_pipes", raising=False)
    with pytest.raises(ModelLoadError, match=re.escape(message)):
        load_pipeline(model_id, "cpu", "float32")


def test_search_runs_a_worker_over_a_pipeline_built_in_this_process(tmp_path, tiny_pipe, capsys):
    spec = {"name": "notebook", "model": {"id": "builtin:tiny", "device": "cpu", "steps": 8},
            "prompts": {"source": "builtin", "num_samples": 4, "batch_size": 2},
            "quality": {"clip_model": "builtin:tiny", "clip_pretrained": "none",
                        "metric": "psnr", "limit": 20.0},
            "search": {"accelerators": ["deepcache"], "n_trials": 9, "warm_start": []},
            "artifacts": {"path": str(tmp_path / "art")}}
    url = f"sqlite:///{tmp_path}/nb.db"
    with pytest.warns(UserWarning, match="4 in batches of 2 is 2 batches a pass"):  # run's note
        exported = optsearch.search(tiny_pipe, spec, storage=url, n_trials=2, progress=False)
    assert exported["study"] == "notebook" and exported["spec"]["search"]["n_trials"] == 2
    assert " trial 0 " not in capsys.readouterr().out  # progress=False: no line per trial either
    best = exported["best"]
    assert best["combo"] == "deepcache"
    recorded = optuna.load_study(study_name="notebook", storage=url).trials[best["trial"]].user_attrs
    assert best["metrics"]["speedup"] == recorded["speedup"] == pytest.approx(
        recorded["baseline_seconds_per_image"] / recorded["seconds_per_image"], rel=1e-6)
    assert exported["spec"]["model"]["kind"] == "unet"  # told by the pipeline, stored for others
    import diffusers
    import torch

    # the versions that measured (the baseline's), torch with its build ("+cu130", "+cpu")
    assert exported["provenance"]["torch"] == torch.__version__
    assert exported["provenance"]["diffusers"] == diffusers.__version__
    assert exported["deployment"]["dtype"] == "float32"
    shown = optsearch_cmd("study", "show", "notebook", "--storage", url)
    assert shown.returncode == 0 and "2/2 trials measured" in shown.stdout
    # more trials grow the study; another spec under the same name is the caller's error
    optsearch.search(tiny_pipe, spec, storage=url, n_trials=3, progress=False)
    grown = optuna.load_study(study_name="notebook", storage=url)
    # measured: a sampler's repeat is a free copy and takes none of n_trials (a full suite run
    # drew two repeats of the 28 settings here)
    assert len([t for t in grown.trials if t.state.is_finished() and not is_copy(t)]) == 3
    with pytest.raises(UsageError, match=r"differs in: quality.limit.*name="):
        optsearch.search(tiny_pipe, {**spec, "quality": {**spec["quality"], "limit": 25.0}},
                         storage=url, progress=False)


def test_search_confirms_on_the_pipeline_it_was_given(tmp_path, tiny_pipe):
    """`confirm=K` re-measures the best on unseen prompts with the caller's own pipeline (the CLI's
    `study confirm` would load model.id, which need not be it): the export comes back confirmed,
    its winner chosen by the confirmed rule. A bad `repeats` is refused before any search."""
    spec = {"name": "confirmed", "model": {"id": "builtin:tiny", "device": "cpu", "steps": 8},
            "prompts": {"source": "builtin", "num_samples": 4, "batch_size": 2},
            "quality": {"clip_model": "builtin:tiny", "clip_pretrained": "none",
                        "metric": "psnr", "limit": 20.0},
            "search": {"accelerators": ["steps"], "n_trials": 2, "warm_start": []},
            "space": {"steps": {"num_inference_steps": [3, 5]}},  # faster, feasible, any load
            "artifacts": {"path": str(tmp_path / "art")}}
    url = f"sqlite:///{tmp_path}/confirmed.db"
    with pytest.raises(UsageError, match="repeats >= 2"):
        optsearch.search(tiny_pipe, spec, storage=url, confirm=1, repeats=1, progress=False)
    assert optuna.get_all_study_summaries(url) == []  # refused before anything was made
    exported = optsearch.search(tiny_pipe, spec, storage=url, confirm=1, repeats=2, progress=False)
    confirmed = exported["best"]["confirmed"]
    assert confirmed is not None and confirmed["num_samples"] == 4
    assert confirmed["repeats"] == 2 and confirmed["speedup_low"] is not None
    assert not set(confirmed["prompts"]) & set(exported["prompts"]["texts"])  # unseen ones
    assert "confirmed lower speedup bound" in exported["winner_rule"]


def test_check_reports_what_a_study_will_cost(tmp_path):
    spec = write_spec(tmp_path / "t.toml", TINY_SPEC)
    result = optsearch_cmd("check", str(spec), "--workers", "3")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "model builtin:tiny on cpu (float32); unet pipeline" in out
    assert "prompts: 4 from builtin" in out and "s/image at batch size 2, 8 steps" in out
    assert "memory: peak" in out and "estimate: 4 trials x 4 prompts x" in out
    assert "on 1 worker" in out and "on 3 (" in out and "ready" in out
    assert "deployment context (what the figures will hold for; serve at it): batch 2, 32x32, " \
           "8 steps (DDIMScheduler), guidance 7.5" in out  # the size the pipeline chose


def test_check_lists_every_problem_one_line_each(tmp_path):
    text = TINY_SPEC.replace('"builtin:tiny"\n', '"nope_module:build"\n', 1) \
        .replace("num_samples = 4", "num_samples = 100000")
    spec = write_spec(tmp_path / "t.toml", text)
    result = optsearch_cmd("check", str(spec), cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("optsearch: error: prompts: prompts.num_samples=100000")
    assert "model: model.id 'nope_module:build': cannot import" in lines[1]


def test_check_names_a_scheduler_the_model_does_not_list(tmp_path):
    """A flow-matching FLUX given SD's Euler scheduler: a warning naming what the model lists,
    then the pipeline's own failure as one line, without the out-of-memory advice (lowering the
    batch size would not help)."""
    text = TINY_SPEC.replace('"builtin:tiny"\n', '"builtin:tiny-flux"\nscheduler = "EulerDiscrete"\n', 1) \
        .replace('accelerators = ["deepcache", "tome"]', 'accelerators = ["fbcache"]')
    result = optsearch_cmd("check", str(write_spec(tmp_path / "t.toml", text)))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "optsearch: warning: model.scheduler = 'EulerDiscrete': the model's "
        "FlowMatchEulerDiscreteScheduler does not list EulerDiscreteScheduler among the schedulers "
        "compatible with it (FlowMatchEulerDiscreteScheduler): the pipeline may refuse it",
        "optsearch: error: baseline batch: TypeError: EulerDiscreteScheduler.set_timesteps() got "
        "an unexpected keyword argument 'mu'"]


def test_check_counts_long_prompts_and_shortens_its_sample(tmp_path):
    long_prompt = "a photograph of " + " and ".join(f"a cat number {i} on a chair" for i in range(30))
    (tmp_path / "long.txt").write_text(f"{long_prompt}\na dog\na cat\na bird\n")
    text = TINY_SPEC.replace('source = "builtin"', 'source = "long.txt"')
    result = optsearch_cmd("check", str(write_spec(tmp_path / "t.toml", text)), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"e.g. '{long_prompt[:97]}...'" in result.stdout
    assert "1 of 4 prompts are longer than the CLIP text encoder's 77 tokens" in result.stdout
    assert "truncated" not in result.stderr + result.stdout


def test_version_names_the_libraries_a_bug_report_needs():
    """`optsearch --version`: one line, exit 0, optsearch's version and the installed versions of
    the libraries that change what a trial measures."""
    import diffusers
    import torch

    result = optsearch_cmd("--version")
    assert result.returncode == 0 and result.stderr == ""
    assert len(result.stdout.splitlines()) == 1
    assert result.stdout.startswith(f"optsearch {optsearch.__version__} (torch {torch.__version__}")
    assert f"diffusers {diffusers.__version__}" in result.stdout
    assert f"optuna {optuna.__version__}" in result.stdout
    import accelerate

    assert f"accelerate {accelerate.__version__}" in result.stdout  # offloaded pipelines' mover


STEPS_SPEC = TINY_SPEC.replace('accelerators = ["deepcache", "tome"]', 'accelerators = ["steps"]') \
    .replace("limit = 30.0", "limit = 10.0") \
    .replace("n_trials = 4", "n_trials = 1\nwarm_start = []\n[space.steps]\nnum_inference_steps = [3, 5]")


def test_an_edited_factory_cannot_join_the_study_of_the_old_pipeline(tmp_path):
    """The factory's LoRA retrained (its weights changed) under the same spec: a worker or confirm
    would score against the stored baseline images of the old pipeline. One line, exit 2, the
    storage untouched."""
    from .conftest import storage_snapshot

    (tmp_path / "my_pipes.py").write_text(FACTORY)
    spec = write_spec(tmp_path / "s.toml", STEPS_SPEC.replace('id = "builtin:tiny"', 'id = "my_pipes:build"'))
    url = f"sqlite:///{tmp_path}/f.db"
    assert optsearch_cmd("run", str(spec), "--storage", url, "--quiet", cwd=tmp_path).returncode == 0
    assert optsearch_cmd("study", "extend", "tiny", "--n-trials", "2", "--storage", url).returncode == 0
    (tmp_path / "my_pipes.py").write_text(FACTORY.replace("bias += 0.01", "bias += 0.02"))
    before = storage_snapshot(url)
    for command in (["worker", "--study", "tiny"], ["study", "confirm", "tiny", "--top", "1"]):
        result = optsearch_cmd(*command, "--storage", url, "--quiet", cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("optsearch: error")]
        assert len(errors) == 1 and errors[0].startswith(  # (the factory's .to() warns first)
            "optsearch: error: this pipeline is not the one study 'tiny' measured: its weights or "
            "scheduler differ"), result.stderr
    assert storage_snapshot(url) == before
    (tmp_path / "my_pipes.py").write_text(FACTORY)  # the pipeline it measured joins again
    assert optsearch_cmd("worker", "--study", "tiny", "--storage", url, "--quiet",
                         cwd=tmp_path).returncode == 0


def test_prompts_edited_since_the_study_cannot_join_it(tmp_path):
    """A prompt file edited after the study's baseline was stored (or another copy of it on a
    worker's machine): its trials would be scored against the stored images of other prompts.
    One line, exit 2, the storage untouched; the prompts it measured join again."""
    from optsearch.measure.models import load_pipeline
    from optsearch.measure.prompts import prompts_digest

    from .conftest import storage_snapshot

    prompts = tmp_path / "prompts.txt"
    texts = [f"a photo of a cat number {i}" for i in range(4)]
    prompts.write_text("\n".join(texts))
    spec_path = write_spec(tmp_path / "s.toml", STEPS_SPEC.replace('source = "builtin"',
                                                                   'source = "prompts.txt"'))
    url = f"sqlite:///{tmp_path}/p.db"
    pipe = load_pipeline("builtin:tiny", "cpu", "float32")
    optsearch.search(pipe, load_spec(spec_path), storage=url, progress=False)
    assert optsearch_cmd("study", "extend", "tiny", "--n-trials", "2", "--storage", url).returncode == 0
    prompts.write_text("\n".join([texts[0], "a photo of a dog", *texts[2:]]))
    before = storage_snapshot(url)
    with pytest.raises(UsageError, match="this worker's prompts are not the ones study 'tiny' "
                                         "measured: their texts or images differ"):
        optsearch.search(pipe, load_spec(spec_path), storage=url, n_trials=2, progress=False)
    result = optsearch_cmd("worker", "--study", "tiny", "--storage", url, "--quiet", cwd=tmp_path)
    errors = [line for line in result.stderr.splitlines() if line.startswith("optsearch: error")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr
    assert storage_snapshot(url) == before
    prompts.write_text("\n".join(texts))
    optsearch.search(pipe, load_spec(spec_path), storage=url, n_trials=2, progress=False)
    # an image's pixels count as much as its text: the same texts, one image changed
    from PIL import Image

    from optsearch.measure.prompts import ConditionedPrompt

    def digest(image=None) -> str:
        return prompts_digest(["edit" if image is None else ConditionedPrompt("edit", image)])

    red, blue = Image.new("RGB", (4, 4), (255, 0, 0)), Image.new("RGB", (4, 4), (0, 0, 255))
    assert digest(red) == digest(red.copy()) != digest(blue)
    assert digest() != digest(red)


def test_search_refuses_a_pipeline_changed_since_its_study(tmp_path):
    """In a notebook: a LoRA fused into the pipeline after a search (W += scale * B @ A, what
    diffusers' fuse_lora does), then the same call again. The finished study would have handed
    back the old pipeline's answer; a grown one, scored new trials against its images."""
    import torch

    from optsearch.measure.models import load_pipeline

    from .conftest import storage_snapshot

    pipe = load_pipeline("builtin:tiny", "cpu", "float32")
    spec = load_spec(write_spec(tmp_path / "s.toml", STEPS_SPEC))
    url = f"sqlite:///{tmp_path}/nb.db"
    exported = optsearch.search(pipe, spec, storage=url, progress=False)
    with warnings.catch_warnings():  # served on the pipeline it measured: no word of weights
        warnings.simplefilter("error")
        optsearch.apply(pipe, exported).restore()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, module in pipe.unet.named_modules():
            if name.endswith(("to_q", "to_k")):
                out_features, in_features = module.weight.shape
                down = torch.randn(4, in_features, generator=generator) / 4
                up = torch.randn(out_features, 4, generator=generator) / 4
                module.weight += 0.8 * up @ down
    before = storage_snapshot(url)
    for n_trials in (None, 2):
        with pytest.raises(UsageError, match="this pipeline is not the one study 'tiny' measured"):
            optsearch.search(pipe, spec, storage=url, n_trials=n_trials, progress=False)
    assert storage_snapshot(url) == before
    with pytest.warns(UserWarning, match="this pipeline is not the one the setting was measured on"):
        optsearch.apply(pipe, exported).restore()  # served on the changed one: said at apply
