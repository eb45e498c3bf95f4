"""What a backend declares about its device, as data that core only asks (it never checks a vendor itself).

`Ops.platform()` returns one `Platform`; core reads it once at startup to convert FP8 checkpoint weights to the
device's fp8 format (or dequantize them where it has none), choose the KV cache layout, check the page size and
cache dtypes, join the process groups, and decide on device graphs. The rest a backend declares through its ops:
the memory query (`Ops.memory_allocated`, the backend class's `total_memory_bytes`), the graph and event factory
(`Ops.new_graph` / `graph_pool` / `new_event`), the per-batch attention metadata its kernels need
(`Ops.prepare_metadata`: e.g. cumulative query lengths, once per forward instead of once per layer) and its kernel
choices with the reason each can or cannot run (`kernel_choices` on the backend class, `Ops.kernel_options`,
resolved once at startup).

KV cache layouts (the backend's ops read and write them; `KVCache` allocates what the backend prefers):
- "combined": one latent pool per layer, an entry per token holding [c | k_pe] (float), or the fp8 entry
  [c e4m3 | fp32 scale per 128 channels | k_pe bf16] (656 B at V3.2 sizes);
- "split": two pools per layer, c [pages, page, 1, L] and k_pe [pages, page, 1, R] in the model dtype (devices
  whose attention kernels read the latent and rope parts from separate caches).
Indexer keys are per page [page keys × D bytes e4m3 | page × fp32 scales] (fp8 indexer) or [pages, page, D] in
the model dtype (exact indexer).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class PageSizes:
    """The KV page sizes a backend's kernels take."""

    multiple_of: int = 1
    at_most: int | None = None

    def problem(self, page_size: int) -> str:
        """'' when page_size is allowed, else why not."""
        if page_size % self.multiple_of:
            return f"must be a multiple of {self.multiple_of}"
        if self.at_most is not None and page_size > self.at_most:
            return f"must be at most {self.at_most}"
        return ""


@dataclass(frozen=True)
class Platform:
    device_type: str  # torch's device type, as the backend's devices are named ("cpu", ...)
    # The e4m3 variant the device computes in: torch.float8_e4m3fn (OCP, max 448; the checkpoints' format) or
    # torch.float8_e4m3fnuz (max 240: FP8 checkpoint weights are converted at load, scales ×2). None: no fp8 at all
    # (FP8 checkpoint weights are dequantized to the model dtype at load; fp8 caches are refused).
    fp8_dtype: torch.dtype | None = torch.float8_e4m3fn
    latent_layouts: tuple[str, ...] = ("combined",)  # KV latent layouts its ops support, preferred first
    fp8_kv_cache: str = ""  # '' when the fp8 latent cache is supported, else why not
    fp8_indexer: str = ""  # '' when fp8 indexer keys (Hadamard + e4m3) are supported, else why not
    page_sizes: PageSizes = field(default_factory=PageSizes)
    collective_backend: str = "gloo"  # torch.distributed backend for this device's tensors
    graphs: str = "this backend runs eagerly"  # '' when decode steps can be captured as device graphs

    @property
    def fp8_max(self) -> float:
        """The largest finite value of fp8_dtype (448 for e4m3fn, 240 for e4m3fnuz)."""
        return torch.finfo(self.fp8_dtype).max if self.fp8_dtype is not None else 0.0

    def __post_init__(self):
        if self.fp8_dtype is None:  # no fp8: nothing fp8 can be stored either
            if not self.fp8_kv_cache:
                object.__setattr__(self, "fp8_kv_cache", "this device has no fp8")
            if not self.fp8_indexer:
                object.__setattr__(self, "fp8_indexer", "this device has no fp8")
        elif self.fp8_dtype not in (torch.float8_e4m3fn, torch.float8_e4m3fnuz):
            raise ValueError(f"fp8_dtype must be float8_e4m3fn, float8_e4m3fnuz or None, got {self.fp8_dtype}")
        if not self.latent_layouts or set(self.latent_layouts) - {"combined", "split"}:
            raise ValueError(f"latent_layouts must name 'combined' and/or 'split', got {self.latent_layouts}")

    def latent_layout(self, fp8_latent: bool) -> str:
        """The latent layout to allocate: the preferred one that holds the cache dtype (fp8 entries are "combined")."""
        if fp8_latent:
            return "combined"
        return self.latent_layouts[0]

    def kv_problems(self, page_size: int, fp8_latent: bool, fp8_index: bool) -> list[str]:
        """What this platform cannot do of a KV cache configuration (flag-named, for startup errors)."""
        out = []
        why = self.page_sizes.problem(page_size)
        if why:
            out.append(f"--page-size {page_size}: {why} on this backend")
        if fp8_latent and self.fp8_kv_cache:
            out.append(f"--kv-cache-dtype fp8_e4m3: {self.fp8_kv_cache}; use --kv-cache-dtype bfloat16")
        elif fp8_latent and "combined" not in self.latent_layouts:
            out.append("--kv-cache-dtype fp8_e4m3: this backend's kernels read split latent caches, which hold the "
                       "model dtype; use --kv-cache-dtype bfloat16")
        if fp8_index and self.fp8_indexer:
            out.append(f"--indexer-precision fp8: {self.fp8_indexer}; use --indexer-precision exact")
        return out
