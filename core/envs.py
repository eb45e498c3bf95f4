"""Every environment variable dsv32 reads, read here and nowhere else."""

from __future__ import annotations

import os


def backend_override() -> str | None:
    """DSV32_BACKEND: force a backend by name (same as --backend / LLM(backend=...))."""
    return os.environ.get("DSV32_BACKEND") or None


def cache_dir() -> str:
    """DSV32_CACHE_DIR: where generated artifacts (demo model, kernel caches) live."""
    return os.environ.get("DSV32_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "dsv32")


def triton_interpret() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run on the CPU interpreter (slow; used to test kernels without a GPU)."""
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


def dense_attn_kv_len_threshold(index_topk: int) -> int:
    """DSV32_DSA_PREFILL_DENSE_ATTN_KV_LEN_THRESHOLD (default: index_topk = 2048): batches whose longest request has
    at most this many keys skip the indexer and attend to every key (dense). Values above index_topk are clamped
    (dense attention over more keys than the indexer would select changes the output); 0 forces the sparse path."""
    raw = os.environ.get("DSV32_DSA_PREFILL_DENSE_ATTN_KV_LEN_THRESHOLD", "")
    if raw == "":
        return index_topk
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"DSV32_DSA_PREFILL_DENSE_ATTN_KV_LEN_THRESHOLD must be an integer, got {raw!r}") from None
    if value > index_topk:
        import logging

        logging.getLogger("dsv32").warning(
            "DSV32_DSA_PREFILL_DENSE_ATTN_KV_LEN_THRESHOLD=%d is above index_topk=%d: clamped to %d (dense attention "
            "beyond the top-k would change the model's output)", value, index_topk, index_topk)
    return max(0, min(value, index_topk))


def check_rank_agreement() -> bool:
    """DSV32_CHECK_RANK_AGREEMENT=1: ranks of an attention group compare each step's batch (token ids, positions,
    cache slots) and every layer's indexer top-k, and stop on any difference (a debugging aid: their schedulers and
    indexers must agree; costs a broadcast per step and per layer)."""
    return os.environ.get("DSV32_CHECK_RANK_AGREEMENT", "") not in ("", "0")


def debug_eager_graphs() -> bool:
    """DSV32_DEBUG_EAGER_GRAPHS=1: where the backend has no device graphs (the CPU), decode steps still go through
    the graph path with EagerGraph, which re-runs the captured step on its static buffers — so tests exercise graph
    plumbing (padding, common sizes across attention groups) in rank processes without a GPU."""
    return os.environ.get("DSV32_DEBUG_EAGER_GRAPHS", "") not in ("", "0")


def debug_force_overlap() -> bool:
    """DSV32_DEBUG_FORCE_OVERLAP=1: run the overlap scheduler even where the device is synchronous (the CPU), so tests
    exercise it (step N+1 launched before N's tokens are read) in rank processes."""
    return os.environ.get("DSV32_DEBUG_FORCE_OVERLAP", "") not in ("", "0")
