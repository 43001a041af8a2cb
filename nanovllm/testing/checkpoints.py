"""Random-weight Qwen3 checkpoints in the Hugging Face layout (config.json + safetensors)."""
import json
import os
from importlib import resources

import torch
from safetensors.torch import save_file

from nanovllm.testing.tokenizer import train_tokenizer

TINY_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False,
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000, "tie_word_embeddings": True, "hidden_act": "silu",
    "bos_token_id": 0, "eos_token_id": 2, "torch_dtype": "float32",
}
SHAPES = ("tiny", "qwen3-0.6b", "qwen3-8b")
MAX_SHARD_BYTES = 2 * 2**30


def shape_config(shape: str) -> dict:
    if shape == "tiny":
        return dict(TINY_CONFIG)
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    return json.loads(resources.files("nanovllm.testing").joinpath(f"configs/{shape}.json").read_text())


def random_state_dict(config: dict, dtype: torch.dtype, device: str, std: float, seed: int, head_spread: float = 0.0):
    """Hugging Face tensor names -> random tensors. Norm weights are ~1, as in trained models.
    head_spread: the untied LM head's rows get norms exp(head_spread * N(0, 1)), so a few tokens lead
    each distribution clearly (peaky logits, as in trained models); 0 leaves every row alike."""
    gen = torch.Generator(device).manual_seed(seed)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q_out, kv_out = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim

    def normal(*shape, scale=std):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)

    def norm_weight(size):
        return (1 + torch.randn(size, generator=gen, device=device) * 0.1).to(dtype)

    tensors = {"model.embed_tokens.weight": normal(config["vocab_size"], hidden, scale=1.0),
               "model.norm.weight": norm_weight(hidden)}
    if not config.get("tie_word_embeddings", False):
        row_scale = torch.exp(head_spread * torch.randn(config["vocab_size"], 1, generator=gen, device=device))
        tensors["lm_head.weight"] = normal(config["vocab_size"], hidden, scale=row_scale)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors |= {
            p + "self_attn.q_proj.weight": normal(q_out, hidden), p + "self_attn.k_proj.weight": normal(kv_out, hidden),
            p + "self_attn.v_proj.weight": normal(kv_out, hidden), p + "self_attn.o_proj.weight": normal(hidden, q_out),
            p + "self_attn.q_norm.weight": norm_weight(head_dim), p + "self_attn.k_norm.weight": norm_weight(head_dim),
            p + "mlp.gate_proj.weight": normal(inter, hidden), p + "mlp.up_proj.weight": normal(inter, hidden),
            p + "mlp.down_proj.weight": normal(hidden, inter),
            p + "input_layernorm.weight": norm_weight(hidden), p + "post_attention_layernorm.weight": norm_weight(hidden),
        }
        if config.get("attention_bias"):
            tensors |= {p + f"self_attn.{n}_proj.bias": normal(size) for n, size in
                        (("q", q_out), ("k", kv_out), ("v", kv_out))}
    return tensors


def save_sharded(tensors: dict, path: str, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """One model.safetensors, or shards plus model.safetensors.index.json past max_shard_bytes."""
    shards, current, size = [], {}, 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name], size = tensor.contiguous().cpu(), size + nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, file)
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def make_random_checkpoint(path: str, shape: str = "tiny", dtype: torch.dtype = torch.float32,
                           overrides: dict | None = None, device: str = "cpu", std: float = 0.3,
                           seed: int = 0, max_shard_bytes: int = MAX_SHARD_BYTES, head_spread: float = 0.0) -> str:
    """Write config.json and random safetensors weights for a Qwen3 of the given shape to path.

    std scales the projection weights; embeddings use std 1 so logits are peaked (few near-ties),
    which keeps greedy comparisons between implementations meaningful; head_spread (untied heads)
    makes them peakier still (see random_state_dict).
    """
    config = shape_config(shape) | (overrides or {})
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_sharded(random_state_dict(config, dtype, device, std, seed, head_spread), path, max_shard_bytes)
    return path


def make_benchmark_model(path: str, shape: str) -> str:
    """The random model the benchmark and profiling scripts run: bf16 built on the GPU where there is
    one, float32 on the CPU, projection std 0.02, with a trained tokenizer. Returns path."""
    on_cuda = torch.cuda.is_available()
    make_random_checkpoint(path, shape, dtype=torch.bfloat16 if on_cuda else torch.float32,
                           device="cuda" if on_cuda else "cpu", std=0.02)
    train_tokenizer(path)
    return path
