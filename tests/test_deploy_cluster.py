"""deploy/kubernetes and deploy/slurm: the manifests are valid Kubernetes objects (the schemas
kubernetes-validate bundles, offline), refer only to what exists, and every optsearch command in
them is one optsearch's own parser accepts; the SLURM scripts run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from optsearch.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[1]
KUBE = ROOT / "deploy" / "kubernetes"
SLURM = ROOT / "deploy" / "slurm"
KUBERNETES_VERSION = "1.31.0"  # backoffLimitPerIndex and podFailurePolicy are beta there, GA later


def documents() -> list[tuple[Path, dict]]:
    found = []
    for path in sorted(KUBE.rglob("*.yaml")):
        if path.name != "kustomization.yaml":
            found += [(path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


def by_kind(kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for _, doc in documents() if doc["kind"] == kind}


def containers() -> list[tuple[str, dict, dict, set[str]]]:
    """(object name, pod spec, container, the volume names its pods have) of every workload."""
    found = []
    for _, doc in documents():
        spec = doc.get("spec", {}).get("template", {}).get("spec")
        claims = {t["metadata"]["name"] for t in doc.get("spec", {}).get("volumeClaimTemplates", [])}
        for container in (spec or {}).get("containers", []):
            volumes = {v["name"] for v in spec.get("volumes", [])} | claims
            found.append((doc["metadata"]["name"], spec, container, volumes))
    return found


@pytest.mark.parametrize("path_and_doc", documents(), ids=lambda pd: f"{pd[0].name}:{pd[1]['kind']}")
def test_every_manifest_is_a_valid_kubernetes_object(path_and_doc):
    _, doc = path_and_doc
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)  # raises on any unknown field


def test_an_invalid_manifest_is_caught():
    """The validation can fail: a misspelt field is refused."""
    job = dict(by_kind("Job")["optsearch-workers"])
    job["spec"] = {**job["spec"], "paralellism": 4}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_base_manifest():
    listed = yaml.safe_load((KUBE / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in KUBE.glob("*.yaml") if p.name != "kustomization.yaml")


def test_references_resolve_to_objects_here_or_to_the_secret_the_readme_creates():
    config_maps, claims, services = by_kind("ConfigMap"), by_kind("PersistentVolumeClaim"), by_kind("Service")
    readme = (ROOT / "README.md").read_text()
    for name, pod, container, volumes in containers():
        for source in container.get("envFrom", []):
            assert source["configMapRef"]["name"] in config_maps, name
        for volume in pod.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, name
            if "secret" in volume:
                secret = volume["secret"]["secretName"]
                assert f"create secret generic {secret}" in readme, secret
        assert {m["name"] for m in container.get("volumeMounts", [])} <= volumes, name
    config = config_maps["optsearch"]["data"]
    for url in (config["DATABASE_URL"], config["OPTSEARCH_STORAGE"]):
        host = re.match(r"[a-z+]+://(?:[^@/]*@)?([^:/]+)", url).group(1)
        assert host in services, url
    assert config["OPTSEARCH_STORAGE"].startswith("grpc://")  # workers never hold the password
    assert "password" not in str(config).lower().replace("password_file", "")


def test_every_optsearch_command_parses_with_optsearch_own_parser():
    """The containers' arguments, with the ConfigMap's values put in, are accepted by `optsearch`
    itself (a misspelt option would exit 2 in the pod)."""
    config = by_kind("ConfigMap")["optsearch"]["data"]
    parser = build_parser()
    commands = 0
    for _, _, container, _ in containers():
        if container.get("command") != ["optsearch"]:
            continue
        args = [re.sub(r"\$\((\w+)\)", lambda m: config[m.group(1)], a) for a in container["args"]]
        parsed = parser.parse_args(args)
        commands += 1
        if parsed.handler == "cmd_worker":
            assert parsed.study == config["STUDY_NAME"] and parsed.devices == "all"
    assert commands == 4  # the proxy, the dashboard, study create and the workers
    with pytest.raises(SystemExit):
        parser.parse_args(["worker", "--studdy", "x"])


def test_workers_take_a_gpu_each_and_a_usage_error_is_not_retried():
    job = by_kind("Job")["optsearch-workers"]
    assert job["spec"]["completionMode"] == "Indexed"
    [worker] = job["spec"]["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert {"action": "FailJob", "values": [2]} in [
        {"action": r["action"], "values": r["onExitCodes"]["values"]} for r in rules if "onExitCodes" in r]
    # a storage still starting (exit 75) is retried for the index, never fails the Job at once
    assert not any(75 in r["onExitCodes"]["values"] for r in rules
                   if "onExitCodes" in r and r["action"] == "FailJob")
    create_rules = by_kind("Job")["optsearch-study-create"]["spec"]["podFailurePolicy"]["rules"]
    assert [r["onExitCodes"]["values"] for r in create_rules if r["action"] == "FailJob"] == [[2]]
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"  # podFailurePolicy needs it


def test_slurm_scripts_are_valid_bash_with_sbatch_directives():
    for script in SLURM.glob("*.sbatch"):
        subprocess.run(["bash", "-n", str(script)], check=True)
        directives = [line for line in script.read_text().splitlines() if line.startswith("#SBATCH")]
        assert directives and all(re.match(r"#SBATCH --[a-z-]+(=\S+)?$", d) for d in directives), script
    workers = (SLURM / "workers.sbatch").read_text()
    assert "--requeue" in workers and "--signal=B:TERM" in workers and "--gres=gpu" in workers


def test_slurm_study_create_runs_once_and_is_idempotent(tmp_path):
    """The create script, run for real (as sbatch would, in the submit folder): the study exists,
    a second run joins it, and a missing variable is one line and a non-zero exit."""
    env = {**os.environ, "OPTSEARCH_STORAGE": f"sqlite:///{tmp_path / 'slurm.db'}",
           "STUDY_SPEC": str(ROOT / "studies" / "tiny-demo.toml"),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for _ in range(2):
        done = subprocess.run(["bash", str(SLURM / "study-create.sbatch")], env=env, cwd=tmp_path,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert "study 'tiny-demo' ready" in done.stdout
    missing = subprocess.run(["bash", str(SLURM / "workers.sbatch")], cwd=tmp_path, capture_output=True,
                             text=True, env={k: v for k, v in env.items() if k != "OPTSEARCH_STORAGE"})
    assert missing.returncode != 0 and "OPTSEARCH_STORAGE" in missing.stderr
