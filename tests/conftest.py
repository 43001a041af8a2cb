import pytest
import torch
from transformers import Qwen3ForCausalLM

from nanovllm.testing.checkpoints import make_random_checkpoint
from nanovllm.testing.tokenizer import train_tokenizer

# Small engine settings for CPU tests: 16-token blocks so short prompts span several blocks.
CPU_ENGINE = dict(device="cpu", kvcache_block_size=16, max_model_len=512, max_num_seqs=16, num_kvcache_blocks=256)



@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A tiny random Qwen3 (tied embeddings, GQA 2) with a trained tokenizer."""
    path = str(tmp_path_factory.mktemp("tiny"))
    make_random_checkpoint(path)
    train_tokenizer(path)
    return path


def hf_greedy(path: str, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Transformers' greedy generate, one prompt at a time (no padding), never stopping at eos."""
    model = Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    outputs = []
    for prompt in prompts:
        ids = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
        outputs.append(ids[0, len(prompt):].tolist())
    return outputs
