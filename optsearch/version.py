"""The package version, in a module of its own so that any module may read it; and the line
`optsearch --version` prints."""

from __future__ import annotations

import importlib.util
import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

__version__ = "0.1.0"

# The libraries whose versions change what a trial measures (what a bug report needs); accelerate
# moves an offloaded pipeline's weights inside every timed call.
MEASURING_LIBRARIES = ("torch", "diffusers", "transformers", "accelerate", "optuna", "cache-dit",
                       "DeepCache", "tomesd", "tgate", "open_clip_torch")


def versions_line() -> str:
    """optsearch's version and those of the libraries whose versions change what a trial
    measures, read from package metadata (importing torch would take seconds)."""
    def installed(name: str) -> str:
        try:
            found = version(name)
        except PackageNotFoundError:
            return "not installed"
        return _torch_build() or found if name == "torch" else found

    return f"optsearch {__version__} (" + ", ".join(f"{name} {installed(name)}"
                                                     for name in MEASURING_LIBRARIES) + ")"


def _torch_build() -> str | None:
    """torch's version with its build ("2.14.1+cu130", "+cpu"), which its package metadata may
    leave out, read from torch/version.py without importing torch."""
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        return None
    try:
        text = (Path(spec.origin).parent / "version.py").read_text()
    except OSError:
        return None
    match = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
    return match.group(1) if match else None
