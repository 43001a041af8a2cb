"""Per-step attention metadata: the only state shared between the runner and the attention layers.

Glossary: N tokens in the step, B sequences, H / Hkv query / KV heads, D head dim, M max blocks per sequence.
"""
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    is_prefill: bool
    # [N] int64: cache slot (block_id * block_size + offset) where each new token's K/V is written.
    slot_mapping: torch.Tensor
    # [B] int32: tokens in the cache for each sequence once this step's K/V is written.
    context_lens: torch.Tensor
    # [B, M] int32: physical block ids of each sequence, padded with -1.
    block_tables: torch.Tensor
    # [B + 1] int32: prefix sums of query lengths (prefill only; decode has one query per sequence).
    cu_seqlens_q: torch.Tensor | None = None
    max_seqlen_q: int = 1
    max_context_len: int = 0


_context: AttentionMetadata | None = None


def set_context(meta: AttentionMetadata | None) -> None:
    global _context
    _context = meta


def get_context() -> AttentionMetadata:
    if _context is None:
        raise RuntimeError("attention called outside a model-runner step (no attention metadata set)")
    return _context
