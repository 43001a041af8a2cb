import os
import signal
import threading
import time

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


# For GPU tests: real attention shapes (head_dim 128, GQA 2); two layers with moderate weights and a
# 1024-token vocabulary keep bf16 near-ties between the two best tokens rare.
GPU_MODEL_SHAPE = {"hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 2, "num_attention_heads": 8,
                   "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 1024, "max_position_embeddings": 4096,
                   "tie_word_embeddings": False}


def make_gpu_model(path: str) -> str:
    # head_spread: peaky logits, so that bf16 rounding flips few greedy choices (near-ties are rare).
    make_random_checkpoint(path, overrides=GPU_MODEL_SHAPE, dtype=torch.bfloat16, device="cuda", std=0.05,
                           head_spread=1.0)
    train_tokenizer(path)
    return path


def generate_while_killing_worker(llm, monkeypatch, generate, worker_pid: int, kill_at_call: int,
                                  deadline: float) -> tuple[list[BaseException], float]:
    """Run generate() in a daemon thread (so a hang fails the test, not the whole run), SIGKILL the worker
    during rank 0's kill_at_call-th model call, and wait up to deadline seconds.
    Returns (the RuntimeErrors raised, seconds until generate returned)."""
    real_run, calls, outcome = llm.model_runner.run, [], []

    def run_and_kill_worker(*args):
        calls.append(1)
        if len(calls) == kill_at_call:
            os.kill(worker_pid, signal.SIGKILL)
        return real_run(*args)

    def target():
        try:
            generate()
        except RuntimeError as error:
            outcome.append(error)

    monkeypatch.setattr(llm.model_runner, "run", run_and_kill_worker)
    start = time.monotonic()
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout=deadline)
    assert not thread.is_alive(), "generate hung after a worker died"
    return outcome, time.monotonic() - start
