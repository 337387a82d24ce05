"""Errors raised by the runtime. Each one maps to one gRPC status / HTTP code in `serving`."""


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
