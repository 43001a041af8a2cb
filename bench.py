"""Throughput benchmark: nano-vllm's workload (DESIGN.md), or transformers on the same requests.

    python bench.py --random-weights qwen3-0.6b                      # the full workload, random bf16 weights
    python bench.py --model ~/huggingface/Qwen3-0.6B
    python bench.py --random-weights qwen3-0.6b --num-seqs 64 --output-len 256 --backend hf

On CUDA it also measures the device-to-device copy bandwidth and prints the workload's
memory-bandwidth floor and the fraction of it reached.
"""
import argparse
import gc
import logging
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from random import randint, seed

import torch

from nanovllm.testing.checkpoints import SHAPES, make_benchmark_model


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a local checkpoint directory")
    src.add_argument("--random-weights", choices=SHAPES, help="build a random checkpoint of this shape")
    p.add_argument("--backend", choices=["nano", "hf"], default="nano")
    p.add_argument("--num-seqs", type=int, default=256)
    p.add_argument("--max-input-len", type=int, default=1024)
    p.add_argument("--max-output-len", type=int, default=1024)
    p.add_argument("--input-len", type=int, help="fixed prompt length instead of randint(100, max-input-len)")
    p.add_argument("--output-len", type=int, help="fixed output length instead of randint(100, max-output-len)")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1: off)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the most likely (0: off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="transformers' rule (1: off)")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--sync-scheduling", action="store_true",
                   help="async_scheduling=False: each step waits for its tokens before the next is scheduled")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--prefill-overlap-tokens", type=int, default=1024,
                   help="the engine option (tensor parallelism: prefill micro-batches; 0: off)")
    p.add_argument("--max-model-len", type=int, default=4096)
    return p.parse_args(argv)


def workload(args, vocab_size: int) -> tuple[list[list[int]], list[int]]:
    """nano-vllm's bench requests: seed 0, prompt ids randint(0, 10000), lengths randint(100, max)
    (randint(max, max) when max is below 100, for quick small runs)."""
    seed(0)
    max_id = min(10000, vocab_size - 1)
    prompts, output_lens = [], []
    for _ in range(args.num_seqs):
        prompt_len = args.input_len or randint(min(100, args.max_input_len), args.max_input_len)
        prompts.append([randint(0, max_id) for _ in range(prompt_len)])
    for _ in range(args.num_seqs):
        output_lens.append(args.output_len or randint(min(100, args.max_output_len), args.max_output_len))
    return prompts, output_lens


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.randn(256 * 2**20, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * src.numel() * src.element_size() * 20 / (start.elapsed_time(end) / 1e3)


def floor_seconds(prompt_lens, output_lens, weight_bytes, kv_bytes_per_token, bandwidth) -> float:
    """Decode is memory-bound: each step reads every weight once plus each active sequence's KV cache."""
    total, steps = 0, max(output_lens)
    for t in range(steps):
        context = sum(p + t for p, o in zip(prompt_lens, output_lens) if o > t)
        total += weight_bytes + context * kv_bytes_per_token
    return total / bandwidth


@dataclass
class Run:
    tokens: int  # output tokens
    seconds: float
    startup: float
    weight_bytes: int | None = None  # nano-vllm only: what the floor needs
    kv_bytes_per_token: int | None = None
    step_seconds: dict[str, float] | None = None  # nano-vllm only: prefill and decode


def time_steps(llm) -> dict[str, float]:
    """Seconds the engine spends in prefill and in decode steps, added up as it runs them. (A decode
    step's time includes queueing its successor, which runs while the step's tokens are read.)"""
    seconds = {"prefill": 0.0, "decode": 0.0}
    step = llm.step

    def timed_step():
        start = time.perf_counter()
        result = step()
        seconds["prefill" if result[2] else "decode"] += time.perf_counter() - start
        return result

    llm.step = timed_step
    return seconds


@contextmanager
def timing_collections(seconds: dict[str, float]):
    """Adds the garbage collector's pauses inside the block to seconds["gc pause"] (rank 0's only)."""
    seconds["gc pause"], started = 0.0, []

    def on_collection(phase, info):
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            seconds["gc pause"] += time.perf_counter() - started.pop()

    gc.callbacks.append(on_collection)
    try:
        yield
    finally:
        gc.callbacks.remove(on_collection)


def run_nano(path, args, prompts, output_lens):
    from nanovllm import LLM, SamplingParams
    started = time.perf_counter()
    llm = LLM(path, enforce_eager=args.enforce_eager, async_scheduling=not args.sync_scheduling,
              tensor_parallel_size=args.tensor_parallel_size, prefill_overlap_tokens=args.prefill_overlap_tokens,
              max_model_len=args.max_model_len)
    params = [SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                             repetition_penalty=args.repetition_penalty, ignore_eos=True, max_tokens=n)
              for n in output_lens]
    # Warm-up on a few of the workload's own prompts, so first-use costs (kernel compiles for prefill
    # shapes, allocator growth) stay out of the timed run.
    llm.generate(prompts[:8], [replace(p, max_tokens=4) for p in params[:8]], use_tqdm=False)
    startup = time.perf_counter() - started
    step_seconds = time_steps(llm)
    start = time.perf_counter()
    with timing_collections(step_seconds):
        outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    # Rank 0's shard: with tensor parallelism every GPU reads its own shard and KV heads in parallel,
    # so the floor is one rank's bytes over one GPU's bandwidth.
    runner = llm.model_runner
    weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    kv_bytes_per_token = runner.kv_cache[:, :, 0, 0].numel() * runner.kv_cache.element_size()
    llm.exit()  # frees every rank's GPU before the bandwidth probe
    return Run(sum(len(o["token_ids"]) for o in outputs), seconds, startup, weight_bytes, kv_bytes_per_token,
               step_seconds)


def run_hf(path, args, prompts, output_lens):
    """transformers' continuous batching (generate_batch over a paged sdpa cache)."""
    from transformers import AutoModelForCausalLM, GenerationConfig
    if len(set(output_lens)) > 1:
        raise SystemExit("--backend hf generates one length for all requests: pass --output-len")
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda",
                                                 attn_implementation="paged|sdpa")
    config = GenerationConfig(max_new_tokens=output_lens[0], do_sample=True, temperature=args.temperature,
                              top_p=args.top_p, top_k=args.top_k, min_p=args.min_p or None,
                              repetition_penalty=args.repetition_penalty,
                              eos_token_id=-1, pad_token_id=0)
    model.generate_batch(inputs=prompts[:2], generation_config=config, progress_bar=False)  # warm-up
    startup = time.perf_counter() - started
    start = time.perf_counter()
    outputs = model.generate_batch(inputs=prompts, generation_config=config, progress_bar=False)
    seconds = time.perf_counter() - start
    return Run(sum(len(o.generated_tokens) for o in outputs.values()), seconds, startup)


def main(argv=None):
    args = parse_args(argv)
    # Start-up progress (weights, warm-up, CUDA graphs, per rank) goes to stderr.
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("nanovllm").setLevel(logging.INFO)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if args.random_weights:
            path = make_benchmark_model(tmp, args.random_weights)
        from transformers import AutoConfig
        prompts, output_lens = workload(args, AutoConfig.from_pretrained(path).vocab_size)
        run = run_nano if args.backend == "nano" else run_hf
        result = run(path, args, prompts, output_lens)
    tokens, seconds = result.tokens, result.seconds
    rows = [("backend", args.backend), ("requests", len(prompts)), ("output tokens", tokens),
            ("seconds", f"{seconds:.2f}"), ("output tok/s", f"{tokens / seconds:.0f}"),
            ("prompt+output tok/s", f"{(tokens + sum(map(len, prompts))) / seconds:.0f}"),
            ("tensor parallel size", args.tensor_parallel_size), ("start-up seconds", f"{result.startup:.1f}")]
    if result.step_seconds is not None:
        rows += [(f"{kind} seconds", f"{value:.3f}") for kind, value in result.step_seconds.items()]
    if len(prompts) == 1:  # single-request latency, e.g. --num-seqs 1 --input-len 128 --output-len 512
        rows.append(("ms per output token", f"{seconds * 1e3 / tokens:.2f}"))
    if torch.cuda.is_available() and result.weight_bytes is not None:
        bandwidth = copy_bandwidth()
        floor = floor_seconds(list(map(len, prompts)), output_lens, result.weight_bytes, result.kv_bytes_per_token,
                              bandwidth)
        rows += [("device", torch.cuda.get_device_name()), ("copy bandwidth TB/s", f"{bandwidth / 1e12:.2f}"),
                 ("floor seconds", f"{floor:.2f}"), ("fraction of floor", f"{floor / seconds:.1%}")]
    for name, value in rows:
        print(f"{name:>22}: {value}")


if __name__ == "__main__":
    main()
