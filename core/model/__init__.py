"""DeepSeek-V3.2: the model graph (model.py, layers.py), what the checkpoint holds (specs.py), which part of it each
rank keeps (plan.py) and the adapter that reads that part (checkpoint.py)."""

from dsv32.core.model.model import DeepseekV32

__all__ = ["DeepseekV32"]
