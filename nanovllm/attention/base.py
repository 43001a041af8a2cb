"""The attention backend contract.

A backend owns two operations over the paged KV cache, laid out per layer as
`k_cache`, `v_cache`: [num_blocks, block_size, Hkv, D].

* `store_kv` writes this step's new keys and values into the cache at `meta.slot_mapping`.
* `forward` attends this step's queries over everything in the cache (cached prefix, earlier
  chunks and the tokens just written), causally: query i of a sequence with q_len queries and
  context_len cached tokens sits at position context_len - q_len + i and sees keys 0..that position.

Prefill and decode both read keys from the cache, so prefix hits and chunked prefill need no copies.
"""
from abc import ABC, abstractmethod

import torch

from nanovllm.utils.context import AttentionMetadata


class AttentionBackend(ABC):
    name: str

    @abstractmethod
    def store_kv(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        """k, v: [N, Hkv, D]; slot_mapping: [N]; a slot of -1 is skipped (padding)."""

    @abstractmethod
    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """q: [N, H, D] -> [N, H, D]. For decode N == B (one query per sequence)."""
