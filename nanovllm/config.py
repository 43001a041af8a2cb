import json
import logging
import os
from dataclasses import dataclass, field, fields

import torch
from transformers import AutoConfig, GenerationConfig, PretrainedConfig

from nanovllm.attention import BACKEND_NAMES, resolve_backend_name
from nanovllm.sampling_params import check_number, check_type
from nanovllm.utils.loader import check_safetensors_files

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM",)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEVICES = ("auto", "cuda", "mps", "cpu")


def resolve_device(requested: str) -> str:
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if not available[requested]:
        raise ValueError(f"device={requested!r} is not available on this machine; "
                         f"available: {[d for d, ok in available.items() if ok]} or 'auto'")
    return requested


def check_model_dir(model: str) -> str:
    path = os.path.expanduser(model)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model path {model!r} does not exist; pass a local directory holding "
                                f"config.json and *.safetensors (see README: downloading a model)")
    if not os.path.isdir(path):
        raise ValueError(f"model {model!r} is not a directory; pass the checkpoint's directory")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"model directory {model!r} has no config.json")
    if not any(name.endswith(".safetensors") for name in os.listdir(path)):
        raise FileNotFoundError(f"model directory {model!r} holds no *.safetensors weights "
                                f"(only safetensors are loaded, never pickled .bin files)")
    check_safetensors_files(path)
    return path


def load_hf_config(path: str) -> PretrainedConfig:
    # Check the architecture in the raw JSON first: transformers would otherwise try to resolve an
    # unknown model type, and for a config with custom code (auto_map) ask on stdin whether to run it.
    config_file = os.path.join(path, "config.json")
    try:
        with open(config_file) as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"model config {config_file!r} is not valid JSON: {e}") from e
    architectures = raw.get("architectures") if isinstance(raw, dict) else None
    if not isinstance(architectures, list) or not any(arch in SUPPORTED_ARCHITECTURES for arch in architectures):
        raise ValueError(f"model config {config_file!r} has architectures={architectures!r}; "
                         f"supported: {list(SUPPORTED_ARCHITECTURES)}")
    return AutoConfig.from_pretrained(path, trust_remote_code=False)


# Ranks share token ids as float32 (sampled ids, draws on vocabulary slices), exact up to 2^24.
MAX_PARALLEL_VOCAB = 2 ** 24


@dataclass
class Config:
    """Engine configuration; every field is validated up front, "auto" values resolved once."""
    model: str
    max_num_batched_tokens: int = 16384
    max_num_seqs: int = 512
    max_model_len: int = 4096
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    enforce_eager: bool = False
    # Schedule and queue the next decode step while the current one runs (llm_engine.py).
    async_scheduling: bool = True
    # Tensor parallelism: a prefill step whose sequences split into two micro-batches of at least this
    # many tokens each runs them interleaved, each one's all-reduces hidden behind the other's compute
    # (utils/partial_sums.py); 0: never.
    prefill_overlap_tokens: int = 1024
    kvcache_block_size: int = 256
    num_kvcache_blocks: int = -1
    device: str = "auto"
    dtype: str = "auto"
    attention_backend: str = "auto"
    hf_config: PretrainedConfig | None = field(default=None, repr=False)
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        check_type("model", self.model, (str, os.PathLike), "a path to a model directory")
        check_number("max_num_batched_tokens", self.max_num_batched_tokens, 1, integer=True)
        check_number("max_num_seqs", self.max_num_seqs, 1, integer=True)
        check_number("max_model_len", self.max_model_len, 1, integer=True)
        check_number("gpu_memory_utilization", self.gpu_memory_utilization, 0.0, 1.0, low_open=True)
        check_number("tensor_parallel_size", self.tensor_parallel_size, 1, 8, integer=True)
        check_type("enforce_eager", self.enforce_eager, bool, "a bool")
        check_type("async_scheduling", self.async_scheduling, bool, "a bool")
        check_number("prefill_overlap_tokens", self.prefill_overlap_tokens, 0, integer=True)
        check_number("kvcache_block_size", self.kvcache_block_size, 16, integer=True)
        if self.kvcache_block_size & (self.kvcache_block_size - 1):
            raise ValueError(f"kvcache_block_size must be a power of two >= 16, got {self.kvcache_block_size}")
        check_number("num_kvcache_blocks", self.num_kvcache_blocks, -1, integer=True)
        if self.num_kvcache_blocks == 0:
            raise ValueError("num_kvcache_blocks must be -1 (size from memory) or >= 1, got 0")
        for name, allowed in (("device", DEVICES), ("dtype", ("auto", *DTYPES)),
                              ("attention_backend", BACKEND_NAMES)):
            value = getattr(self, name)
            check_type(name, value, str, f"one of {list(allowed)}")
            if value not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")

        self.model = check_model_dir(os.fspath(self.model))
        self.hf_config = load_hf_config(self.model)
        self._check_parallelism()
        self.eos_token_ids = self._eos_token_ids()
        self.max_model_len = min(self.max_model_len, self.hf_config.max_position_embeddings)
        self.device = resolve_device(self.device)
        if self.device == "cuda" and self.tensor_parallel_size > torch.cuda.device_count():
            raise ValueError(f"tensor_parallel_size={self.tensor_parallel_size} exceeds the "
                             f"{torch.cuda.device_count()} CUDA device(s) available")
        if self.device == "mps" and self.tensor_parallel_size > 1:
            raise ValueError(f"tensor_parallel_size={self.tensor_parallel_size} needs device 'cuda' (one GPU "
                             f"per rank) or 'cpu'; MPS has a single device and no collectives")
        self.dtype = self._resolve_dtype()
        self.attention_backend = resolve_backend_name(self.attention_backend, self.device, self.kvcache_block_size)
        logger.info("nano-vllm: device=%s dtype=%s attention=%s", self.device, self.dtype, self.attention_backend)

    def _check_parallelism(self):
        tp = self.tensor_parallel_size
        heads, kv_heads = self.hf_config.num_attention_heads, self.hf_config.num_key_value_heads
        if heads % tp or kv_heads % tp:
            raise ValueError(f"tensor_parallel_size={tp} must divide num_attention_heads={heads} "
                             f"and num_key_value_heads={kv_heads}")
        if tp > 1 and self.hf_config.vocab_size > MAX_PARALLEL_VOCAB:
            raise ValueError(f"tensor_parallel_size={tp} needs a vocab_size of at most {MAX_PARALLEL_VOCAB}, "
                             f"got {self.hf_config.vocab_size}")

    def _eos_token_ids(self) -> tuple[int, ...]:
        # The model config names one eos; generation_config.json may add more (Qwen3 adds <|endoftext|>).
        ids = []
        for source in (self.hf_config, self._generation_config()):
            value = getattr(source, "eos_token_id", None)
            ids += value if isinstance(value, list) else [] if value is None else [value]
        return tuple(dict.fromkeys(ids))

    def _generation_config(self):
        try:
            return GenerationConfig.from_pretrained(self.model)
        except OSError:  # no generation_config.json
            return None

    def _resolve_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        if self.device == "cpu":
            return "float32"
        checkpoint = getattr(self.hf_config, "dtype", None) or getattr(self.hf_config, "torch_dtype", None)
        name = str(checkpoint).removeprefix("torch.") if checkpoint is not None else "bfloat16"
        return name if name in DTYPES else "bfloat16"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)} - {"model", "hf_config", "eos_token_ids"}
