"""Deployment files parsed and checked (no Docker engine runs here), and README coverage."""

from __future__ import annotations

import dataclasses
import re
import tomllib

import yaml

from optsearch.accelerators import REGISTRY
from optsearch.cli.main import build_parser
from optsearch.study_spec import SECTIONS
from tests.conftest import ROOT

COMPOSE = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())


def test_compose_services_and_dependencies():
    services = COMPOSE["services"]
    assert set(services) == {"postgres", "init", "dashboard", "worker"}
    assert "test" in services["postgres"]["healthcheck"]
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    for name in ("init", "dashboard", "worker"):
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["worker"]["depends_on"]["init"]["condition"] == "service_completed_successfully"
    assert services["init"]["command"][:2] == ["study", "create"]
    assert "--load-if-exists" in services["init"]["command"]


def test_worker_runs_one_process_per_gpu_and_restarts_boundedly():
    worker = COMPOSE["services"]["worker"]
    device = worker["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["count"] == "all" and device["capabilities"] == ["gpu"]
    assert worker["command"][0] == "worker"
    assert worker["command"][worker["command"].index("--devices") + 1] == "all"
    assert worker["restart"] == "on-failure:5"  # bounded
    entrypoint = (ROOT / "docker" / "entrypoint.sh").read_text()
    assert '"$code" -eq 2' in entrypoint and "exit 0" in entrypoint  # usage errors: no restart loop


def test_password_is_a_secret_file_never_in_an_environment():
    services = COMPOSE["services"]
    assert "ports" not in services["postgres"]
    assert services["dashboard"]["ports"] == ["127.0.0.1:8080:8080"]
    assert COMPOSE["secrets"]["postgres_password"]["file"] == "./postgres_password.txt"
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_password"
    text = (ROOT / "docker" / "compose.yaml").read_text()
    assert "POSTGRES_PASSWORD:" not in text and "${POSTGRES_PASSWORD" not in text
    for name, service in services.items():
        environment = service.get("environment", {})
        assert "POSTGRES_PASSWORD" not in environment
        storage = environment.get("OPTSEARCH_STORAGE", "")
        assert ":" not in storage.split("://", 1)[-1].split("@")[0], name  # no password in the URL
        if storage:
            assert environment["OPTSEARCH_STORAGE_PASSWORD_FILE"] == "/run/secrets/postgres_password"
            assert service["secrets"] == ["postgres_password"]
    assert "PASSWORD" not in (ROOT / "docker" / ".env.example").read_text().split("\n", 3)[-1]
    ignored = (ROOT / ".gitignore").read_text()
    assert "docker/.env" in ignored and "docker/postgres_password.txt" in ignored


def test_dockerfile_matches_the_package_and_builds_lean():
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert 'ENTRYPOINT ["optsearch-entrypoint"]' in dockerfile
    assert "optsearch" in project["scripts"]
    assert re.search(r"^FROM pytorch/pytorch:[\d.]+-cuda", dockerfile, re.MULTILINE)
    # torch pinned to the base image's; dependencies in a layer before the code
    assert "torch=={torch.__version__}" in dockerfile and "-c /opt/constraints.txt" in dockerfile
    assert dockerfile.index("-r /opt/requirements.txt") < dockerfile.index("COPY optsearch ./optsearch")
    assert re.search(r"^RUN pip install -c /opt/constraints.txt --no-deps \.$", dockerfile, re.MULTILINE)
    assert re.search(r"^USER optsearch$", dockerfile, re.MULTILINE)  # not root
    ignored = (ROOT / ".dockerignore").read_text().split()
    for heavy_or_secret in (".venv", "*.db", "docker/.env", "docker/*.txt", ".git", "artifacts"):
        assert heavy_or_secret in ignored


def _commands(parser, prefix=""):
    for action in parser._actions:
        if hasattr(action, "choices") and isinstance(action.choices, dict):
            for name, sub in action.choices.items():
                yield f"{prefix}{name}"
                yield from _commands(sub, f"{prefix}{name} ")


def test_readme_covers_every_command_and_spec_key():
    readme = (ROOT / "README.md").read_text()
    assert readme.lstrip().startswith("# optsearch")
    head = readme[:600]
    assert "make demo" in head and "make test" in head
    for command in _commands(build_parser()):
        assert f"optsearch {command}" in readme, f"README lacks `optsearch {command}`"
    for section, cls in SECTIONS.items():
        assert f"[{section}]" in readme
        for field in dataclasses.fields(cls):
            found = re.search(rf"^{field.name} = ", readme, re.MULTILINE)
            assert found, f"README lacks {section}.{field.name}"
    for name, module in REGISTRY.items():
        assert f"[space.{name}]" in readme
        for param in module.PARAMS:
            assert re.search(rf"^{param.name} = ", readme, re.MULTILINE), f"README lacks {name}.{param.name}"
