"""Tensor parallelism on two GPUs, step by step with timestamps: start-up, a short greedy generate,
shutdown; eager first, then with CUDA graphs. Where it stops is where a hang is (run it with
scripts/debug_site on PYTHONPATH and STACKS_EVERY_S set to see every process's stacks).

    PYTHONPATH=.:scripts/debug_site STACKS_EVERY_S=45 python scripts/tp_smoke.py
"""
import logging
import sys
import tempfile
import time

from nanovllm import LLM, SamplingParams
from tests.conftest import make_gpu_model


def say(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


def main():
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("nanovllm").setLevel(logging.INFO)
    prompts = [[(7 * i + j) % 1000 + 3 for j in range(20 + 30 * i)] for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    with tempfile.TemporaryDirectory() as tmp:
        model = make_gpu_model(tmp)
        for eager in (True, False):
            say(f"start tp=2 enforce_eager={eager}")
            llm = LLM(model, tensor_parallel_size=2, enforce_eager=eager, kvcache_block_size=16, max_model_len=512,
                      max_num_seqs=16, gpu_memory_utilization=0.3)
            seqs = llm.make_sequences(prompts, params)
            for seq in seqs:
                llm.scheduler.add(seq)
            step = 0
            while not all(seq.is_finished for seq in seqs):
                say(f"step {step}: {'prefill' if llm.scheduler.waiting else 'decode'}")
                llm.step()
                step += 1
            say(f"generated {sum(seq.num_completion_tokens for seq in seqs)} tokens in {step} steps")
            llm.exit()
            say("exited")
    say("tp smoke: ok")


if __name__ == "__main__":
    sys.exit(main())
