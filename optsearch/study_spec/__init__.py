"""The study spec: one TOML file that describes one search (schema, reading, checks)."""

from optsearch.errors import SpecError
from optsearch.study_spec.checks import check_device, check_setting, notes
from optsearch.study_spec.reading import load_spec, spec_from_dict
from optsearch.study_spec.schema import SECTIONS, PromptSpec, StudySpec

__all__ = ["SECTIONS", "PromptSpec", "SpecError", "StudySpec", "check_device", "check_setting", "notes",
           "load_spec", "spec_from_dict"]
