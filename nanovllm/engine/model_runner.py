"""Per rank: builds and loads the model, owns the KV cache and CUDA graphs, runs one step."""
import logging
import time
from contextlib import contextmanager

import torch

from nanovllm.attention import create_backend
from nanovllm.config import Config
from nanovllm.engine import kv_cache
from nanovllm.engine.cuda_graph import DecodeGraphs
from nanovllm.engine.decode_inputs import DecodeInputs
from nanovllm.engine.input_batch import InputBuilder
from nanovllm.engine.sequence import Sequence
from nanovllm.layers.attention import Attention
from nanovllm.layers.ops import EAGER_OPS, building_with_ops, cuda_ops
from nanovllm.sampling import Sampler, SamplerOutput
from nanovllm.sampling.batch import SamplingBatch
from nanovllm.sampling.shard_draw import ShardDraw, compile_shard_draw, draw_on_shards, plan_shard_draw
from nanovllm.models.qwen3 import Qwen3ForCausalLM
from nanovllm.utils.context import set_context
from nanovllm.utils.distributed import ParallelGroup, building_with
from nanovllm.utils.loader import checkpoint_numel, load_model
from nanovllm.utils.partial_sums import run_overlapped
from nanovllm.utils.transfer import to_device

logger = logging.getLogger(__name__)


@contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


class ModelRunner:
    def __init__(self, config: Config, group: ParallelGroup = ParallelGroup()):
        self.config = config
        self.group = group
        hf = config.hf_config
        self.device = torch.device(config.device, group.rank if config.device == "cuda" else None)
        started = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            itemsize = torch.empty((), dtype=config.torch_dtype).element_size()
            kv_cache.check_weights_fit_cuda(config, checkpoint_numel(config.model) * itemsize // group.world_size)
        # Layers are built directly on the device in the model's dtype, so they never pass device=.
        ops = cuda_ops() if self.device.type == "cuda" and not config.enforce_eager else EAGER_OPS
        with torch.device(self.device), default_dtype(config.torch_dtype), building_with(group), \
                building_with_ops(ops):
            self.model = Qwen3ForCausalLM(hf)
            self.sampler = Sampler()
        load_model(self.model, config.model)
        head = self.model.lm_head
        if self.device.type == "cuda" and group.rank == 0:  # rank 0 samples from gathered logits
            # logits: [B, vocab], a slice of the padded vocabulary's rows
            self.sampler.compile_kernels(head.vocab_size, head.padded_vocab_size, config.torch_dtype, self.device)
        if self.device.type == "cuda" and group.world_size > 1:  # every rank draws over its vocabulary slice
            compile_shard_draw(head, config.torch_dtype, self.device)
        logger.info("rank %d: model built and loaded in %.1f s", group.rank, time.perf_counter() - started)
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        backend = create_backend(config.attention_backend)
        for layer in self.attention_layers:
            layer.backend = backend
        self.inputs = InputBuilder(config.kvcache_block_size, self.device)
        self.second_inputs = InputBuilder(config.kvcache_block_size, self.device)  # prefill's second micro-batch
        self.decode_inputs = DecodeInputs(config.max_num_seqs, self.max_blocks_per_seq, config.kvcache_block_size,
                                          self.device)
        self.num_kvcache_blocks = self._allocate_kv_cache()
        self.graphs = None
        if self.device.type == "cuda" and not config.enforce_eager:
            captured = time.perf_counter()
            with torch.device(self.device), default_dtype(config.torch_dtype):
                self.graphs = DecodeGraphs(self.model, self.decode_inputs, config.max_num_seqs, hf.hidden_size,
                                           config.max_model_len)
            logger.info("rank %d: %d decode CUDA graphs captured in %.1f s", group.rank, len(self.graphs.sizes),
                        time.perf_counter() - captured)

    def release_graphs(self) -> None:
        """Free the CUDA graphs; decode runs eagerly afterwards. Needed before a tensor-parallel
        group shuts down (see DecodeGraphs.release)."""
        if self.graphs is not None:
            self.graphs.release()
            self.graphs = None

    @property
    def max_blocks_per_seq(self) -> int:
        return -(-self.config.max_model_len // self.config.kvcache_block_size)

    def _bind_kv_cache(self, cache: torch.Tensor) -> None:
        for i, layer in enumerate(self.attention_layers):
            layer.k_cache, layer.v_cache = cache[0, i], cache[1, i]

    def _new_kv_cache(self, num_blocks: int) -> torch.Tensor:
        layer = self.attention_layers[0]
        return kv_cache.allocate(num_blocks, len(self.attention_layers), self.config.kvcache_block_size,
                                 layer.num_kv_heads, layer.head_dim, self.config.torch_dtype, self.device)

    def _allocate_kv_cache(self) -> int:
        config, layer = self.config, self.attention_layers[0]
        per_block = kv_cache.block_bytes(config, len(self.attention_layers), layer.num_kv_heads, layer.head_dim)
        num_blocks = config.num_kvcache_blocks
        if num_blocks == -1:
            if self.device.type == "cuda":
                warm_up_started = time.perf_counter()
                activation_peak = self._warm_up()
                logger.info("rank %d: warm-up at the largest prefill in %.1f s (activation peak %.2f GiB)",
                            self.group.rank, time.perf_counter() - warm_up_started, activation_peak / 2**30)
                num_blocks = kv_cache.blocks_that_fit_cuda(config, per_block, activation_peak)
            else:
                weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
                # The ranks of a CPU engine share one host's RAM: budget for all their equal shards.
                world = self.group.world_size
                num_blocks = kv_cache.blocks_that_fit_host(config, per_block * world, weights * world)
            num_blocks = min(num_blocks, kv_cache.blocks_for_all_sequences(config))
        if self.group.world_size > 1:  # every rank must hold the same number: the smallest
            count = torch.tensor([num_blocks], device=self.device)
            torch.distributed.all_reduce(count, torch.distributed.ReduceOp.MIN, group=self.group.group)
            num_blocks = int(count.item())
        self.kv_cache = self._new_kv_cache(num_blocks)
        self._bind_kv_cache(self.kv_cache)
        logger.info("KV cache: %d blocks of %d tokens (%.2f GiB)", num_blocks, config.kvcache_block_size,
                    num_blocks * per_block / 2**30)
        return num_blocks

    def _warm_up(self) -> int:
        """Run the largest prefill once, on a temporary cache; returns its activation peak in bytes
        (what it allocated beyond the weights and that cache)."""
        config = self.config
        num_tokens = min(config.max_num_batched_tokens, config.max_num_seqs * config.max_model_len)
        lengths = [config.max_model_len] * (num_tokens // config.max_model_len)
        lengths += [num_tokens % config.max_model_len] if num_tokens % config.max_model_len else []
        seqs, next_block = [], 0
        for length in lengths:
            seq = Sequence([0] * length, None, config.kvcache_block_size)
            seq.block_table = list(range(next_block, next_block + seq.num_blocks))
            seq.num_scheduled_tokens = length
            next_block += seq.num_blocks
            seqs.append(seq)
        self._bind_kv_cache(self._new_kv_cache(next_block))
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated()
        self._forward_logits(seqs, is_prefill=True)
        activation_peak = torch.cuda.max_memory_allocated() - resident
        self._bind_kv_cache(torch.empty(2, len(self.attention_layers), 0))
        torch.cuda.empty_cache()
        return activation_peak

    @torch.inference_mode()
    def _forward_logits(self, seqs: list[Sequence], is_prefill: bool, decode_input_ids: torch.Tensor | None = None,
                        gather: bool = True):
        graphed = not is_prefill and self.graphs is not None and self.graphs.fits(len(seqs))
        if is_prefill and self.group.world_size > 1:
            cut = overlap_cut(seqs, self.config.prefill_overlap_tokens)
            if cut is not None:
                return self._prefill_overlapped([seqs[:cut], seqs[cut:]], gather)
        if is_prefill:
            inputs = self.inputs.prefill(seqs)
        else:
            if self.group.world_size > 1 and seqs[0].has_placeholder:
                self._share_sampled_ids()
            inputs = self.decode_inputs.prepare(seqs, self.graphs.bucket(len(seqs)) if graphed else len(seqs),
                                                decode_input_ids)
        set_context(inputs.meta)
        try:
            if graphed:
                hidden = self.graphs.replay(len(seqs))
            else:
                hidden = self.model(inputs.input_ids, inputs.positions)
            if inputs.logits_indices is not None:
                hidden = hidden[inputs.logits_indices]
            return self.model.compute_logits(hidden, gather), inputs.sampled
        finally:
            set_context(None)

    def _prefill_overlapped(self, micro_batches: list[list[Sequence]], gather: bool):
        """A tensor-parallel prefill step as micro-batches whose all-reduces overlap each other's compute
        (utils/partial_sums.py); returns what _forward_logits does, rows in the step's order."""
        # Each micro-batch uploads through its own staging buffer: a second upload through one buffer
        # would wait for the first to leave it.
        parts = [inputs.prefill(seqs) for inputs, seqs in zip((self.inputs, self.second_inputs), micro_batches)]
        try:
            hiddens = run_overlapped([(self.model.partial_sums(part.input_ids, part.positions), part.meta)
                                      for part in parts], self.group)
        finally:
            set_context(None)
        hidden = torch.cat([h[part.logits_indices] for h, part in zip(hiddens, parts)])
        return self.model.compute_logits(hidden, gather), [ok for part in parts for ok in part.sampled]

    def run_without_sampling(self, seqs: list[Sequence], is_prefill: bool, draw: ShardDraw | None = None) -> None:
        """Ranks > 0: the step's forward pass, which its collectives need, and its draw over this rank's
        slice of the vocabulary if rank 0 planned one; rank 0 samples. A decode
        step's input ids (what rank 0 sampled last, from its message) go to the device as such, so
        that a step of the same batch advances its inputs there, as rank 0's does. A step scheduled
        ahead has no ids in its message (placeholders): rank 0 shares the ids it sampled."""
        known_ids = not is_prefill and not seqs[0].has_placeholder
        input_ids = to_device([seq.token_ids[-1] for seq in seqs], torch.int64, self.device) if known_ids else None
        logits, _ = self._forward_logits(seqs, is_prefill, input_ids, gather=draw is None)
        if draw is not None:
            draw_on_shards(logits, draw, self.model.lm_head, self.group)

    def plan_draw(self, seqs: list[Sequence], is_prefill: bool) -> tuple[ShardDraw | None, SamplingBatch | None]:
        """Rank 0, before a tensor-parallel step is sent: whether every rank draws the step's tokens
        over its slice of the vocabulary (sampling/shard_draw.py), and how; decode steps only. Also
        returns the sampling settings the plan was made from, for run(), so they are built once."""
        if self.group.world_size == 1 or is_prefill:
            return None, None
        settings = self.sampler.settings(seqs, self.config.eos_token_ids, self.model.lm_head.vocab_size, self.device)
        return plan_shard_draw(settings, seqs, self.device), settings

    def _share_sampled_ids(self) -> None:
        """Every rank's decode_inputs.sampled becomes rank 0's: the ids of the last decode step, the
        input ids of a step scheduled ahead (all of whose sequences end with a placeholder). The
        other ranks hold one id per row of their last decode batch, as rank 0 sampled. They arrive by
        an all-reduce to which the others add zeros, in float32 (exact below MAX_PARALLEL_VOCAB): the
        peer all-reduce's kernel where it serves, not a NCCL broadcast and its host-side launch."""
        if self.group.rank == 0:
            ids = self.decode_inputs.sampled.float()
        else:
            ids = torch.zeros(len(self.decode_inputs.seq_ids), dtype=torch.float32, device=self.device)
        self.decode_inputs.sampled = self.group.all_reduce(ids).long()

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], is_prefill: bool, draw: ShardDraw | None = None,
            settings: SamplingBatch | None = None) -> "StepOutput":
        """Queue one model step on the device. Its tokens are read from the returned StepOutput, which
        waits for them: the caller may queue the next step first (asynchronous scheduling).
        draw, settings: plan_draw's plan, sent to the other ranks with the step, and its settings."""
        logits, sampled = self._forward_logits(seqs, is_prefill, gather=draw is None)
        if draw is not None:  # a decode step: every sequence samples, with settings' device temperatures
            output = SamplerOutput(draw_on_shards(logits, draw, self.model.lm_head, self.group,
                                                  settings.params.temperature), None)
        else:
            sampling_seqs = [seq for seq, ok in zip(seqs, sampled) if ok]
            if not sampling_seqs:
                return StepOutput(sampled, None)
            output = self.sampler(logits, sampling_seqs, self.config.eos_token_ids, settings)
        if not is_prefill:  # the next decode step of the same batch takes its input ids from here
            self.decode_inputs.sampled = output.device_token_ids
        return StepOutput(sampled, output)


def overlap_cut(seqs: list[Sequence], min_tokens: int) -> int | None:
    """Where to cut a prefill step's sequences into two micro-batches of scheduled tokens as equal as
    sequence boundaries allow; None unless both get at least min_tokens (min_tokens 0: never)."""
    tokens = [seq.num_scheduled_tokens for seq in seqs]
    total, before, best = sum(tokens), 0, None
    for cut in range(1, len(seqs)):
        before += tokens[cut - 1]
        if best is None or abs(total - 2 * before) < abs(total - 2 * best[1]):
            best = cut, before
    if min_tokens == 0 or best is None or min(best[1], total - best[1]) < min_tokens:
        return None
    return best[0]


class StepOutput:
    """A queued step's results, read from the device when asked for."""

    def __init__(self, sampled: list[bool], output: SamplerOutput | None):
        self.sampled = sampled  # [B]: whether the step samples a token for each sequence
        self.output = output

    def read(self) -> tuple[list[int | None], list[dict[int, float] | None] | None]:
        """Each sequence's next token (None for an unfinished prefill chunk) and, when some sequence
        asked for logprobs, each one's {token_id: logprob} (else None). Waits for the device."""
        sampled, output = self.sampled, self.output
        if output is None:
            return [None] * len(sampled), None
        token_ids, logprobs = iter(output.token_ids), iter(output.logprobs or ())
        return ([next(token_ids) if ok else None for ok in sampled],
                [next(logprobs) if ok else None for ok in sampled] if output.logprobs else None)
