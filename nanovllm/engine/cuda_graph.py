"""CUDA graphs for decode: one graph per batch size bucket, all sharing one memory pool.

Replaying a graph removes the per-kernel launch cost that dominates a small decode step. Inputs go
through static buffers; rows past the real batch are padding (slot -1, context length 0) and their
outputs are ignored.
"""
import torch
from torch import nn

from nanovllm.engine.input_batch import StepInputs
from nanovllm.utils.context import AttentionMetadata, set_context

MAX_GRAPH_BATCH = 512


def capture_sizes(max_num_seqs: int) -> list[int]:
    limit = min(max_num_seqs, MAX_GRAPH_BATCH)
    return [b for b in (1, 2, 4, 8) if b <= limit] + list(range(16, limit + 1, 16))


class DecodeGraphs:
    def __init__(self, model: nn.Module, max_num_seqs: int, max_blocks_per_seq: int, hidden_size: int,
                 max_model_len: int):
        self.model = model
        self.sizes = capture_sizes(max_num_seqs)
        self.max_model_len = max_model_len
        n = self.sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.int64)
        self.positions = torch.zeros(n, dtype=torch.int64)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64)
        self.context_lens = torch.zeros(n, dtype=torch.int32)
        self.block_tables = torch.full((n, max_blocks_per_seq), -1, dtype=torch.int32)
        self.hidden = torch.zeros(n, hidden_size)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._capture_all()

    def _meta(self, batch_size: int) -> AttentionMetadata:
        return AttentionMetadata(is_prefill=False, slot_mapping=self.slot_mapping[:batch_size],
                                 context_lens=self.context_lens[:batch_size],
                                 block_tables=self.block_tables[:batch_size], max_context_len=self.max_model_len)

    def _run_model(self, batch_size: int):
        self.hidden[:batch_size] = self.model(self.input_ids[:batch_size], self.positions[:batch_size])

    @torch.inference_mode()
    def _capture_all(self):
        pool = None
        # Largest first: later, smaller graphs fit inside the memory the first one reserved.
        for batch_size in reversed(self.sizes):
            graph = torch.cuda.CUDAGraph()
            set_context(self._meta(batch_size))
            self._run_model(batch_size)  # warm-up outside the graph (Triton autotuning, lazy init)
            with torch.cuda.graph(graph, pool):
                self._run_model(batch_size)
            pool = graph.pool() if pool is None else pool
            self.graphs[batch_size] = graph
            set_context(None)
        torch.cuda.synchronize()

    def fits(self, batch_size: int) -> bool:
        return batch_size <= self.sizes[-1]

    def replay(self, inputs: StepInputs) -> torch.Tensor:
        """Run the decode step for inputs (B sequences) -> hidden [B, hidden]."""
        batch_size = inputs.input_ids.shape[0]
        bucket = next(size for size in self.sizes if size >= batch_size)
        meta = inputs.meta
        self.input_ids[:batch_size] = inputs.input_ids
        self.positions[:batch_size] = inputs.positions
        self.slot_mapping[batch_size:bucket] = -1
        self.slot_mapping[:batch_size] = meta.slot_mapping
        self.context_lens[batch_size:bucket] = 0
        self.context_lens[:batch_size] = meta.context_lens
        self.block_tables[:bucket].fill_(-1)
        self.block_tables[:batch_size, :meta.block_tables.shape[1]] = meta.block_tables
        self.graphs[bucket].replay()
        return self.hidden[:batch_size]
