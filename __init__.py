"""dsv32: a serving engine for the DeepSeek-V3.2 family on NVIDIA, AMD and Ascend from one code base.

The repository's top-level folders are mapped into this namespace (core → dsv32.core, backends →
dsv32.backends, server → dsv32.server) by pyproject.toml.
"""

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name):  # lazy: `import dsv32` stays cheap and never imports a vendor library
    if name == "LLM":
        from dsv32.core.llm import LLM

        return LLM
    if name == "SamplingParams":
        from dsv32.core.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'dsv32' has no attribute {name!r}")
