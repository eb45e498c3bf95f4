"""Paged KV cache: per-layer pools for the MLA latent and the indexer keys, a page allocator with
reference counts, and per-request page lists turned into block tables.

A token at position pos of a request lives at physical slot block_table[pos // P] * P + pos % P (P = page size).
The byte layouts belong to the backend (core/platform.py names them; its ops read and write them); this module
allocates them:
- latent, "combined" layout: float [pages, P, L+R] in the cache dtype = [c | k_pe]; or fp8: uint8
  [pages, P, L + 4·ceil(L/128) + 2R] (656 B/token at V3.2 sizes) = [c e4m3 | fp32 scale per 128 elements | k_pe bf16];
- latent, "split" layout: c [pages, P, 1, L] and k_pe [pages, P, 1, R] in the cache dtype (SplitLatent);
- index keys, fp8 mode: uint8 [pages, P·(D+4)] = per page all D-byte e4m3 keys, then all fp32 scales (132 B/token);
- index keys, exact mode: [pages, P, D] in the model dtype.
The model reads and writes KV only through these pools and the ops that own their layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch


def latent_scale_blocks(kv_lora_rank: int) -> int:
    return math.ceil(kv_lora_rank / 128)


def latent_entry_bytes(kv_lora_rank: int, rope_dim: int) -> int:
    """Bytes per token of the fp8 latent entry: 656 for kv_lora_rank 512, rope 64."""
    return kv_lora_rank + 4 * latent_scale_blocks(kv_lora_rank) + 2 * rope_dim


def index_key_bytes(index_head_dim: int) -> int:
    """Bytes per token of an fp8 indexer key with its fp32 scale: 132 for head dim 128."""
    return index_head_dim + 4


class SplitLatent(NamedTuple):
    """One layer's latent cache in the "split" layout: c [pages, P, 1, L] and k_pe [pages, P, 1, R]."""

    nope: torch.Tensor
    rope: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        """The nope pool's shape: [pages, P, 1, L] (pages × P slots, as the combined pool's first two dims)."""
        return self.nope.shape


class OutOfPagesError(RuntimeError):
    """Raised when an allocation asks for more pages than are free (the scheduler preempts on it)."""


class PageAllocator:
    """Free list plus a reference count per page (a page shared by several requests through a prefix
    cache is freed when the last holder releases it)."""

    def __init__(self, num_pages: int):
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low page ids first
        self._refs = [0] * num_pages

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfPagesError(f"need {n} KV pages, {len(self._free)} free of {self.num_pages}")
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self._refs[p] = 1
        return pages

    def incref(self, page: int) -> None:
        if self._refs[page] <= 0:
            raise ValueError(f"page {page} is not allocated")
        self._refs[page] += 1

    def release(self, pages: list[int]) -> None:
        for p in pages:
            if self._refs[p] <= 0:
                raise ValueError(f"double free of page {p}")
            self._refs[p] -= 1
            if self._refs[p] == 0:
                self._free.append(p)

    def refcount(self, page: int) -> int:
        return self._refs[page]


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_pages: int
    page_size: int
    kv_lora_rank: int
    rope_dim: int
    index_head_dim: int
    latent_dtype: torch.dtype | str  # a float dtype, or "fp8_e4m3"
    index_fp8: bool  # fp8 keys + scales (132 B/token) vs keys in index_dtype
    index_dtype: torch.dtype
    latent_layout: str = "combined"  # or "split" (core/platform.py)

    def latent_bytes_per_token(self) -> int:
        if self.latent_dtype == "fp8_e4m3":
            return latent_entry_bytes(self.kv_lora_rank, self.rope_dim)
        return (self.kv_lora_rank + self.rope_dim) * torch.empty((), dtype=self.latent_dtype).element_size()

    def index_bytes_per_token(self) -> int:
        if self.index_fp8:
            return index_key_bytes(self.index_head_dim)
        return self.index_head_dim * torch.empty((), dtype=self.index_dtype).element_size()

    def bytes_per_page(self) -> int:
        return self.num_layers * self.page_size * (self.latent_bytes_per_token() + self.index_bytes_per_token())


class KVCache:
    """Owns the pools and the allocator; hands out pages to requests and builds block tables."""

    def __init__(self, spec: KVCacheSpec, device: torch.device | str):
        self.spec = spec
        self.device = torch.device(device)
        # One physical page past the allocator's: the scratch page that padding rows of a graph-replayed batch write
        # to and read from, so they never touch a request's keys.
        self.scratch_page = spec.num_pages
        P, n = spec.page_size, spec.num_pages + 1
        if spec.latent_layout == "split":
            if spec.latent_dtype == "fp8_e4m3":
                raise ValueError("the split latent layout holds the model dtype, not fp8")
            self.latent = [SplitLatent(torch.zeros(n, P, 1, spec.kv_lora_rank, dtype=spec.latent_dtype, device=self.device),
                                       torch.zeros(n, P, 1, spec.rope_dim, dtype=spec.latent_dtype, device=self.device))
                           for _ in range(spec.num_layers)]
        elif spec.latent_layout != "combined":
            raise ValueError(f"unknown latent layout {spec.latent_layout!r}")
        elif spec.latent_dtype == "fp8_e4m3":
            shape = (n, P, latent_entry_bytes(spec.kv_lora_rank, spec.rope_dim))
            self.latent = [torch.zeros(shape, dtype=torch.uint8, device=self.device) for _ in range(spec.num_layers)]
        else:
            shape = (n, P, spec.kv_lora_rank + spec.rope_dim)
            self.latent = [torch.zeros(shape, dtype=spec.latent_dtype, device=self.device)
                           for _ in range(spec.num_layers)]
        if spec.index_fp8:
            ishape, idtype = (n, P * index_key_bytes(spec.index_head_dim)), torch.uint8
        else:
            ishape, idtype = (n, P, spec.index_head_dim), spec.index_dtype
        self.index_keys = [torch.zeros(ishape, dtype=idtype, device=self.device) for _ in range(spec.num_layers)]
        self.allocator = PageAllocator(spec.num_pages)

    @property
    def page_size(self) -> int:
        return self.spec.page_size

    def pages_needed(self, num_tokens: int, have_pages: int = 0) -> int:
        return max(0, math.ceil(num_tokens / self.page_size) - have_pages)

    def grow(self, pages: list[int], num_tokens: int) -> None:
        """Extend a request's page list in place so it can hold num_tokens tokens."""
        need = self.pages_needed(num_tokens, len(pages))
        if need:
            pages.extend(self.allocator.alloc(need))

    def free(self, pages: list[int]) -> None:
        self.allocator.release(pages)
        pages.clear()

    def slots(self, pages: list[int], start: int, end: int) -> torch.Tensor:
        """Physical slots of positions [start, end) of a request holding `pages`."""
        pos = torch.arange(start, end)
        page_ids = torch.tensor(pages, dtype=torch.int64)[pos // self.page_size]
        return page_ids * self.page_size + pos % self.page_size

    def block_table(self, page_lists: list[list[int]], width: int | None = None) -> torch.Tensor:
        width = width or max((len(p) for p in page_lists), default=0) or 1
        if any(len(p) > width for p in page_lists):
            raise ValueError(f"a request holds more pages than the block table's {width} columns")
        # one tensor from padded rows (a tensor per row costs more than the whole table at decode batch sizes)
        return torch.tensor([pages[:width] + [-1] * (width - len(pages)) for pages in page_lists],
                            dtype=torch.int32).view(len(page_lists), width)
