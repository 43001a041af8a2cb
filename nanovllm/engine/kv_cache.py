"""Sizing and allocating the paged KV cache."""
import logging
import os

import torch

from nanovllm.config import Config

logger = logging.getLogger(__name__)


def block_bytes(config: Config, num_layers: int, num_kv_heads: int, head_dim: int) -> int:
    """Bytes of one block across all layers, keys and values (for this rank's KV heads)."""
    itemsize = torch.empty((), dtype=config.torch_dtype).element_size()
    return 2 * num_layers * config.kvcache_block_size * num_kv_heads * head_dim * itemsize


def blocks_for_all_sequences(config: Config) -> int:
    """Enough blocks for max_num_seqs sequences of max_model_len: more is never used."""
    return config.max_num_seqs * -(-config.max_model_len // config.kvcache_block_size)


def check_weights_fit_cuda(config: Config, weight_bytes: int) -> None:
    """Before any weight is placed: a gpu_memory_utilization budget that cannot hold this rank's
    weights gets a clear error instead of an out-of-memory error halfway through loading."""
    free, total = torch.cuda.mem_get_info()
    used = total - free
    budget = int(total * config.gpu_memory_utilization) - used
    if weight_bytes > budget:
        raise ValueError(
            f"gpu_memory_utilization={config.gpu_memory_utilization} of this GPU's {total / 2**30:.2f} GiB, less "
            f"{used / 2**30:.2f} GiB already in use, leaves {max(budget, 0) / 2**30:.2f} GiB, but the weights need "
            f"{weight_bytes / 2**30:.2f} GiB per GPU; raise gpu_memory_utilization (at most 1.0) or shard the "
            f"model with tensor_parallel_size")


def blocks_that_fit_cuda(config: Config, bytes_per_block: int, activation_peak: int) -> int:
    """activation_peak: the most memory the largest step allocates beyond what stays allocated (the
    warm-up measures it)."""
    free, total = torch.cuda.mem_get_info()
    used = total - free
    available = int(total * config.gpu_memory_utilization) - used - activation_peak
    if available < bytes_per_block:
        raise ValueError(
            f"gpu_memory_utilization={config.gpu_memory_utilization} leaves no room for the KV cache: "
            f"{total / 2**30:.2f} GiB total, {used / 2**30:.2f} GiB in use (weights and others), "
            f"{activation_peak / 2**30:.2f} GiB activation peak, one block needs {bytes_per_block / 2**20:.2f} MiB; "
            f"raise gpu_memory_utilization or lower max_num_batched_tokens")
    return available // bytes_per_block


def blocks_that_fit_host(config: Config, bytes_per_block: int, weight_bytes: int) -> int:
    """CPU and MPS share host RAM: a gpu_memory_utilization share of it, less the weights."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    available = int(ram * config.gpu_memory_utilization) - weight_bytes
    if available < bytes_per_block:
        raise ValueError(f"gpu_memory_utilization={config.gpu_memory_utilization} of {ram / 2**30:.1f} GiB RAM "
                         f"leaves no room for the KV cache after {weight_bytes / 2**30:.2f} GiB of weights")
    return available // bytes_per_block


def allocate(num_blocks: int, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
             dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[2 (keys, values), num_layers, num_blocks, block_size, Hkv, D]. Left uninitialized: attention
    reads only slots that were written."""
    return torch.empty(2, num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
