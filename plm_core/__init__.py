"""plm_core: the PerceptionLM engine — checkpoints, processor, model and generation.

`from plm_core import LLM, SamplingParams` is the offline API; names load lazily so that light
modules (config, checkpoint lookup) import without torch's start-up cost.
"""

from importlib import import_module

_EXPORTS = {
    "LLM": "plm_core.llm",
    "RequestOutput": "plm_core.llm",
    "CompletionOutput": "plm_core.llm",
    "SamplingParams": "plm_core.sampling",
    "StructuredOutput": "plm_core.sampling",
    "MediaOptions": "plm_core.processor",
    "PromptError": "plm_core.processor",
    "MediaError": "plm_core.media.errors",
    "EngineConfig": "plm_core.config",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'plm_core' has no attribute {name!r}")
