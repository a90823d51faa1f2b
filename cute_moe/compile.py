"""Compile one specialization (spec, backend config) for the spec's arch, on any machine.

No environment variable is needed: the backend passes the target arch to the DSL per compile.
"""

from typing import Any, Callable

from .arch import get_backend
from .dispatch import problem_of_spec
from .specs import GemmSpec


def compile_gemm(spec: GemmSpec, config: Any) -> Callable:
    """The TVM-FFI function of ``spec`` compiled with ``config`` (refused by the backend when the
    config cannot implement the spec)."""
    backend = get_backend(spec.arch)
    backend.can_implement(problem_of_spec(spec), config)
    return backend.compile(spec, config)
