"""ForwardBatch: the one structure handed to the model for a step (extend, decode or both mixed)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv32.core.ops import AttnMetadata


@dataclass
class ForwardBatch:
    """Flat (ragged) batch of new tokens of B requests.

    input_ids / positions / slots are [T] int64 (slots: physical cache slot each token is written to);
    attn holds per-token request rows, the block table and per-request kv lengths after this step;
    logits_indices [B] picks the token of each request whose next-token logits are wanted (its last).
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    attn: AttnMetadata
    logits_indices: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def max_kv_len(self) -> int:
        return max(self.attn.kv_lens_cpu, default=0)

    @classmethod
    def build(cls, requests: list[tuple[list[int], int, list[int]]], kv_cache, device) -> "ForwardBatch":
        """requests: (new token ids, start position, page list) per request; pages must already cover
        start + len(new tokens) positions."""
        ids, positions, slots, token_req, kv_lens, logits_idx = [], [], [], [], [], []
        offset = 0
        for r, (new_ids, start, pages) in enumerate(requests):
            n = len(new_ids)
            ids.extend(new_ids)
            positions.append(torch.arange(start, start + n))
            slots.append(kv_cache.slots(pages, start, start + n))
            token_req.extend([r] * n)
            kv_lens.append(start + n)
            offset += n
            logits_idx.append(offset - 1)
        as_long = dict(dtype=torch.int64, device=device)
        attn = AttnMetadata(
            token_req=torch.tensor(token_req, **as_long),
            positions=torch.cat(positions).to(device),
            block_table=kv_cache.block_table([p for _, _, p in requests]).to(device),
            kv_lens=torch.tensor(kv_lens, **as_long),
            kv_lens_cpu=kv_lens,
            page_size=kv_cache.page_size,
            is_decode=all(len(new_ids) == 1 for new_ids, _, _ in requests),
        )
        return cls(
            input_ids=torch.tensor(ids, **as_long),
            positions=attn.positions,
            slots=torch.cat(slots).to(device),
            attn=attn,
            logits_indices=torch.tensor(logits_idx, **as_long),
        )
