"""Deployment files parsed and checked (no Docker engine runs here), and README coverage."""

from __future__ import annotations

import dataclasses
import re
import tomllib

import yaml

from optsearch.accelerators import REGISTRY
from optsearch.cli import build_parser
from optsearch.spec import SECTIONS
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


def test_worker_reserves_one_gpu_and_can_scale():
    worker = COMPOSE["services"]["worker"]
    device = worker["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["count"] == 1 and device["capabilities"] == ["gpu"]
    assert "container_name" not in worker and "ports" not in worker  # --scale worker=N works
    assert worker["command"][0] == "worker"


def test_postgres_is_private_and_passwords_are_not_literal():
    services = COMPOSE["services"]
    assert "ports" not in services["postgres"]
    assert services["dashboard"]["ports"] == ["127.0.0.1:8080:8080"]
    text = (ROOT / "docker" / "compose.yaml").read_text()
    assert "POSTGRES_PASSWORD:" not in text.replace("${POSTGRES_PASSWORD:?", "")
    for service in services.values():
        environment = service.get("environment", {})
        assert "POSTGRES_PASSWORD" not in environment
        storage = environment.get("OPTSEARCH_STORAGE", "")
        assert not storage or "${POSTGRES_PASSWORD" in storage
    assert "POSTGRES_PASSWORD=" in (ROOT / "docker" / ".env.example").read_text()
    assert "docker/.env" in (ROOT / ".gitignore").read_text()


def test_dockerfile_matches_the_package():
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert 'ENTRYPOINT ["optsearch"]' in dockerfile
    assert "optsearch" in project["scripts"]
    assert re.search(r"^RUN pip install \.$", dockerfile, re.MULTILINE)
    assert re.search(r"^FROM pytorch/pytorch:[\d.]+-cuda", dockerfile, re.MULTILINE)
    assert "COPY optsearch ./optsearch" in dockerfile


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
