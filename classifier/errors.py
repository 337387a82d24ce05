"""Errors raised by the runtime. Each one maps to one gRPC status / HTTP code in `serving`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class PromptierError(Exception):
    """Base class of every error Promptier raises on purpose."""


class ArtifactError(PromptierError):
    """The artifact directory is missing, incomplete, corrupt or from an incompatible version."""


class ModelError(PromptierError):
    """The model or its tokenizer failed on prompts that passed validation, or scored one with a
    non-finite number: a defect of the artifact or of the runtime, never of the caller's input."""


class InvalidInputError(PromptierError, ValueError):
    """A caller passed something the classifier cannot accept (empty text, wrong type, bad policy)."""


def require(module: str, extra: str) -> None:
    """Fail with the pip command that fixes a missing optional dependency (`promptier[extra]`)."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise PromptierError(f"{module} is not installed; run: pip install 'promptier[{extra}]'")


def validation_problems(error: ValidationError) -> list[str]:
    """Each problem of a pydantic ValidationError as `field.path: message`, in pydantic's order.

    Its str() spreads each problem over lines of pydantic's own (the model's class name, the input's
    repr, a link to pydantic's documentation) that are for the program's authors: whoever wrote the
    config needs the field and what is wrong with it.
    """
    return [f"{'.'.join(str(part) for part in problem['loc']) or '(top level)'}: {problem['msg']}"
            for problem in error.errors(include_url=False)]
