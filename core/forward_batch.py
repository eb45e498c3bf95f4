"""ForwardBatch: the one structure handed to the model for a step (extend, decode or both mixed)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv32.core.ops import AttnMetadata


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor → device without waiting for queued device work (a pinned, non-blocking copy), so the next
    batch can be built while the device still runs the current one."""
    if device.type == "cpu":
        return t
    if device.type == "meta":  # shapes only (ahead-of-time compilation)
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


_SMALL = 16  # requests with at most this many new tokens get their positions and slots as Python ints


@dataclass
class ForwardBatch:
    """Flat (ragged) batch of new tokens of B requests.

    input_ids / positions / slots are [T] int64 (slots: physical cache slot each token is written to);
    attn holds per-token request rows, the block table and per-request kv lengths after this step;
    logits_indices [B] picks the token of each request whose next-token logits are wanted (its last).
    num_requests: the real requests; rows past it (when built with pad_to) are padding: pad_tokens tokens at positions
    0.. of a scratch page, whose outputs are discarded.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    attn: AttnMetadata
    logits_indices: torch.Tensor
    num_requests: int = 0
    # tokens of every request when they all have the same number (graph replay needs it), else 0
    tokens_per_request: int = 0
    # With attention data-parallelism: the step's token count per attention group (every group's largest, padded to a
    # multiple of the group's ranks), to which the dense MLP / MoE gather pads each group's tokens. Set by the runner.
    mlp_tokens_per_group: int = 0

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def max_kv_len(self) -> int:
        return max(self.attn.kv_lens_cpu, default=0)

    @classmethod
    def build(cls, requests: list[tuple[list[int], int, list[int]]], kv_cache, device, pad_to: int = 0,
              table_width: int | None = None, pad_tokens: int = 1) -> "ForwardBatch":
        """requests: (new token ids, start position, page list) per request; pages must already cover
        start + len(new tokens) positions. pad_to: add padding requests of pad_tokens tokens (≤ the page size) up to
        this many (graphs);
        table_width: block-table columns (default: the longest page list)."""
        device = torch.device(device)
        ids, positions, slots, token_req, kv_lens, logits_idx = [], [], [], [], [], []
        offset = 0
        scratch = [getattr(kv_cache, "scratch_page", -1)]
        padded = list(requests) + [([0] * pad_tokens, 0, scratch)] * max(0, pad_to - len(requests))
        P = kv_cache.page_size
        small_pos: list[int] = []  # a few tokens per request (decode, verify): plain ints are faster than tensors
        small_slots: list[int] = []

        def flush():
            if small_pos:
                positions.append(torch.tensor(small_pos, dtype=torch.int64))
                slots.append(torch.tensor(small_slots, dtype=torch.int64))
                small_pos.clear()
                small_slots.clear()

        for r, (new_ids, start, pages) in enumerate(padded):
            n = len(new_ids)
            ids.extend(new_ids)
            if n <= _SMALL:
                small_pos.extend(range(start, start + n))
                small_slots.extend(pages[p // P] * P + p % P for p in range(start, start + n))
            else:
                flush()
                positions.append(torch.arange(start, start + n))
                slots.append(kv_cache.slots(pages, start, start + n))
            token_req.extend([r] * n)
            kv_lens.append(start + n)
            offset += n
            logits_idx.append(offset - 1)
        flush()
        # One host tensor, one copy: [ids | positions | slots | token_req | logits_idx | kv_lens]
        T, B = len(ids), len(padded)
        flat = torch.cat([torch.tensor(ids, dtype=torch.int64), *positions, *slots,
                          torch.tensor(token_req, dtype=torch.int64), torch.tensor(logits_idx, dtype=torch.int64),
                          torch.tensor(kv_lens, dtype=torch.int64)])
        flat = to_device(flat, device)
        input_ids, pos, slot, req, logits_indices, kv = flat.split([T, T, T, T, B, B])
        attn = AttnMetadata(
            token_req=req, positions=pos,
            block_table=to_device(kv_cache.block_table([p for _, _, p in padded], table_width), device),
            kv_lens=kv, kv_lens_cpu=kv_lens, page_size=kv_cache.page_size,
            is_decode=all(len(new_ids) == 1 for new_ids, _, _ in padded),
        )
        widths = {len(new_ids) for new_ids, _, _ in padded}
        return cls(input_ids=input_ids, positions=pos, slots=slot, attn=attn, logits_indices=logits_indices,
                   num_requests=len(requests), tokens_per_request=widths.pop() if len(widths) == 1 else 0)
