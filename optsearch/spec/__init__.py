"""The study spec: one TOML file that describes one search (schema, reading, checks)."""

from optsearch.errors import SpecError
from optsearch.spec.checks import check_device, check_setting
from optsearch.spec.reading import load_spec, spec_from_dict
from optsearch.spec.schema import SECTIONS, PromptSpec, StudySpec

__all__ = ["SECTIONS", "PromptSpec", "SpecError", "StudySpec", "check_device", "check_setting",
           "load_spec", "spec_from_dict"]
