"""The engine: requests and the scheduler's step loop (engine.py), batches and device graphs (runner.py), building a
rank's engine from an EngineConfig (build.py), and the per-rank processes with their control plane (worker.py,
launcher.py)."""

from dsv32.core.engine.engine import Engine, Request, StepOutput

__all__ = ["Engine", "Request", "StepOutput"]
