"""Qwen3 for causal LM, built from the tensor-parallel layers."""
import torch
from torch import nn
from transformers import PretrainedConfig

from nanovllm.layers.attention import Attention
from nanovllm.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from nanovllm.layers.ops import current_ops
from nanovllm.layers.layernorm import RMSNorm
from nanovllm.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear,
                                    RowParallelLinear)
from nanovllm.layers.rotary_embedding import RotaryEmbedding
from nanovllm.utils.distributed import current_group
from nanovllm.utils.partial_sums import PartialSum, PartialSums, run_reducing


def rope_theta(config: PretrainedConfig) -> float:
    # transformers 5 keeps it in rope_parameters, older versions as a top-level field.
    parameters = getattr(config, "rope_parameters", None) or {}
    return float(parameters.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


class Qwen3Attention(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, bias=config.attention_bias)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size,
                                        bias=False)
        self.rotary_emb = RotaryEmbedding(self.head_dim, config.max_position_embeddings, rope_theta(config))
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim ** -0.5, self.num_kv_heads)
        # q_norm and k_norm hold the weights; forward applies them with the rotary embedding and writes k
        # and v into the cache (ops.qk_norm_rotate_store).
        self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.ops = current_ops()

    def forward(self, positions: torch.Tensor, qkv: torch.Tensor) -> torch.Tensor:
        """qkv: [N, (H + 2 Hkv) D], qkv_proj's product (run with the norm before it where the partial sum
        before it is completed, utils/partial_sums.py) -> [N, hidden], this rank's partial sum of o_proj."""
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], -1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k, v = (x.view(-1, self.num_kv_heads, self.head_dim) for x in (k, v))
        q = self.ops.qk_norm_rotate_store(positions, q, k, v, self.q_norm.weight, self.k_norm.weight,
                                          self.q_norm.eps, self.rotary_emb.cos_sin_cache, self.attn)
        o = self.attn(q)
        return self.o_proj(o.flatten(1))


class Qwen3MLP(nn.Module):
    """The MLP's weights; gate_up_proj runs with the norm before it (utils/partial_sums.py), and down_proj
    applies the SiLU-and-multiply activation to [gate | up] itself, fused where it can."""

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size)


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.self_attn = Qwen3Attention(config)
        self.mlp = Qwen3MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def partial_sums(self, positions: torch.Tensor, qkv: torch.Tensor, residual: torch.Tensor,
                     next_norm: RMSNorm, next_linear: ColumnParallelLinear | None):
        """The layer from its qkv product (qkv_proj of its normed input) as a generator
        (utils/partial_sums.py): it yields its two row-parallel partial sums, each with the norm and
        column-parallel projection that follow it: its own MLP's, then next_norm and next_linear (the
        next layer's input norm and qkv_proj; the final norm and None). Returns (next_linear's
        product, or the final norm's output, and the residual)."""
        partial = self.self_attn(positions, qkv)
        gate_up, residual = yield PartialSum(partial, residual, self.post_attention_layernorm, self.mlp.gate_up_proj)
        partial = self.mlp.down_proj(gate_up, gated=True)
        return (yield PartialSum(partial, residual, next_norm, next_linear))


class Qwen3Model(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([Qwen3DecoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def partial_sums(self, input_ids: torch.Tensor, positions: torch.Tensor) -> PartialSums:
        """The forward pass as a generator of partial sums (utils/partial_sums.py): the embedding's, then
        each layer's; returns the hidden states after the final norm."""
        first = self.layers[0]
        x, residual = yield PartialSum(self.embed_tokens(input_ids), None, first.input_layernorm,
                                       first.self_attn.qkv_proj)
        for layer, following in zip(self.layers, [*self.layers[1:], None]):
            norm, linear = (self.norm, None) if following is None else \
                (following.input_layernorm, following.self_attn.qkv_proj)
            x, residual = yield from layer.partial_sums(positions, x, residual, norm, linear)
        return x


class Qwen3ForCausalLM(nn.Module):
    # checkpoint name fragment -> (our fused parameter, shard id)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.tp = current_group()
        self.model = Qwen3Model(config)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [N] -> hidden states [N, hidden]."""
        return run_reducing(self.partial_sums(input_ids, positions), self.tp)

    def partial_sums(self, input_ids: torch.Tensor, positions: torch.Tensor) -> PartialSums:
        return self.model.partial_sums(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor, gather: bool = True) -> torch.Tensor | None:
        """hidden: [B, hidden] (one row per sampled sequence) -> [B, vocab] on rank 0 (None on the others);
        gather=False: every rank's [B, vocab / N] slice (ParallelLMHead)."""
        return self.lm_head(hidden, gather)
