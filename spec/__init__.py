"""grapefx's spec layer: what a model (and its run) is.

YAML in, typed frozen dataclasses out (``load_spec``), with validation messages of the form
``FILE: key.path: message``, derived facts (``spec.derive``) and Megatron-LM recipe import and
export (``spec.megatron``). Nothing here imports torch.
"""

from spec.errors import GrapefxError, SpecError
from spec.load import dump_spec, load_spec, spec_from_dict
from spec.schema import Spec
from spec.validate import SpecProblems, validate

__all__ = ["load_spec", "spec_from_dict", "dump_spec", "validate", "Spec", "SpecError", "SpecProblems",
           "GrapefxError"]
