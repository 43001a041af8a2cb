"""CUDA graphs for decode: one graph per batch size bucket, all sharing one memory pool.

Replaying a graph removes the per-kernel launch cost that dominates a small decode step. The graphs
read the decode inputs' persistent buffers (decode_inputs.py); rows past the real batch are padding
(slot -1, context length 0) and their outputs are ignored.
"""
import torch
from torch import nn

from nanovllm.engine.decode_inputs import DecodeInputs
from nanovllm.utils.context import AttentionMetadata, set_context

MAX_GRAPH_BATCH = 512


def capture_sizes(max_num_seqs: int) -> list[int]:
    limit = min(max_num_seqs, MAX_GRAPH_BATCH)
    return [b for b in (1, 2, 4, 8) if b <= limit] + list(range(16, limit + 1, 16))


class DecodeGraphs:
    def __init__(self, model: nn.Module, inputs: DecodeInputs, max_num_seqs: int, hidden_size: int,
                 max_model_len: int):
        """Captures over inputs' persistent buffers: a step that wrote its batch there (padded to
        its bucket) replays with no copies."""
        self.model = model
        self.inputs = inputs
        self.sizes = capture_sizes(max_num_seqs)
        self.max_model_len = max_model_len
        self.hidden = torch.zeros(self.sizes[-1], hidden_size)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._capture_all()

    def _meta(self, batch_size: int) -> AttentionMetadata:
        inputs = self.inputs
        return AttentionMetadata(is_prefill=False, slot_mapping=inputs.slots[:batch_size],
                                 context_lens=inputs.context_lens[:batch_size],
                                 block_tables=inputs.block_tables[:batch_size], max_context_len=self.max_model_len)

    def _run_model(self, batch_size: int):
        self.hidden[:batch_size] = self.model(self.inputs.input_ids[:batch_size], self.inputs.positions[:batch_size])

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

    def release(self) -> None:
        """Free every graph now. Graphs that captured NCCL collectives hold references on the
        communicator, and NCCL's shutdown waits until they are gone."""
        for graph in self.graphs.values():
            graph.reset()
        self.graphs.clear()

    def fits(self, batch_size: int) -> bool:
        return batch_size <= self.sizes[-1]

    def bucket(self, batch_size: int) -> int:
        """The captured size that serves batch_size rows (those past it are padding)."""
        return next(size for size in self.sizes if size >= batch_size)

    def replay(self, batch_size: int) -> torch.Tensor:
        """Run the decode step whose inputs (batch_size rows, padded to the bucket) are in place
        -> hidden [batch_size, hidden]."""
        self.graphs[self.bucket(batch_size)].replay()
        return self.hidden[:batch_size]
