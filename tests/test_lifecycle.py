"""An LLM's life: exit() and `with`, Ctrl-C in the middle of generate, one engine after another,
and interpreters that exit without exit() while their tensor-parallel workers run (more of tensor
parallelism's cases: test_tensor_parallel)."""
import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import weakref

import pytest

from nanovllm import LLM, SamplingParams
from tests.conftest import CPU_ENGINE

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8], [9] * 30, [11, 12]]


def greedy_tokens(llm) -> list[list[int]]:
    return [o["token_ids"] for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


@pytest.fixture(scope="module")
def llm(tiny_model):
    with LLM(tiny_model, **CPU_ENGINE) as llm:
        yield llm


@pytest.fixture(scope="module")
def expected(llm):
    return greedy_tokens(llm)


def test_exit_frees_the_model_and_later_calls_say_why(tiny_model):
    llm = LLM(tiny_model, **CPU_ENGINE)
    model = weakref.ref(llm.model_runner.model)
    llm.exit()
    assert model() is None
    with pytest.raises(RuntimeError, match="exit()"):
        greedy_tokens(llm)
    llm.exit()  # idempotent


def test_start_up_objects_stay_out_of_collections_until_exit(tiny_model):
    # A full collection mid-run would walk every module and tensor of the engine (a pause of ~0.1 s
    # even for the tiny model); exit() must thaw them, or the engine's reference cycles never go.
    llm = LLM(tiny_model, **CPU_ENGINE)
    model = weakref.ref(llm.model_runner.model)
    assert gc.get_freeze_count() > 0
    llm.exit()
    assert gc.get_freeze_count() == 0 and model() is None


def test_with_block_exits(tiny_model, expected):
    with LLM(tiny_model, **CPU_ENGINE) as llm:
        model = weakref.ref(llm.model_runner.model)
        assert greedy_tokens(llm) == expected
    assert model() is None


def test_ctrl_c_during_generate_leaves_engine_usable(llm, expected, monkeypatch):
    threads_before = set(threading.enumerate())
    real_run, calls = llm.model_runner.run, []

    def interrupted_run(seqs, is_prefill):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real_run(seqs, is_prefill)

    monkeypatch.setattr(llm.model_runner, "run", interrupted_run)
    with pytest.raises(KeyboardInterrupt):
        greedy_tokens(llm)
    monkeypatch.undo()
    # The interrupted call's requests are dropped and their KV blocks freed; nothing else changed.
    assert llm.scheduler.is_finished()
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
    assert set(threading.enumerate()) <= threads_before
    assert greedy_tokens(llm) == expected


def test_interrupted_call_leaves_another_calls_requests_correct(tiny_model, monkeypatch):
    """A stream is mid-prefill (one prompt chunked) when another call's prefill step raises: the stream's
    sequences are prefilled again, not decoded over K/V that was never written, and nothing wrong
    reaches the prefix cache."""
    chunked = CPU_ENGINE | {"max_num_batched_tokens": 48}
    long_prompts = [[(7 * i + j) % 400 + 3 for j in range(40)] for i in range(2)]
    with LLM(tiny_model, **chunked) as llm:
        reference = [o["token_ids"] for o in llm.generate(long_prompts, GREEDY, use_tqdm=False)]
    with LLM(tiny_model, **chunked) as llm:
        stream = llm.stream(long_prompts, GREEDY)
        events = [next(stream)]  # one step: the first prompt and part of the second prefilled
        real_run = llm.model_runner.run

        def fail_once(seqs, is_prefill):
            monkeypatch.setattr(llm.model_runner, "run", real_run)
            raise KeyboardInterrupt

        monkeypatch.setattr(llm.model_runner, "run", fail_once)
        with pytest.raises(KeyboardInterrupt):
            llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)
        events += list(stream)
        streamed = [[t for e in events if e["index"] == i for t in e["token_ids"]] for i in range(2)]
        assert streamed == reference
        assert llm.generate([long_prompts[1]], GREEDY, use_tqdm=False)[0]["token_ids"] == reference[1]


def test_a_step_dropped_after_sampling_leaves_another_calls_requests_correct(tiny_model, monkeypatch):
    """A decode step samples, then its call is interrupted before the tokens are committed (where a
    tensor-parallel engine delivers Ctrl-C). Another call's sequences were in that step: they go on as
    if it never ran. The state carried over on the device (inputs, penalty histories) must notice."""
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, repetition_penalty=1.3)
    survivor, dropped = list(range(40, 50)), list(range(5, 30))
    with LLM(tiny_model, **CPU_ENGINE) as llm:
        reference = llm.generate([survivor], params, use_tqdm=False)[0]["token_ids"]
        real_run, interrupt_next = llm.model_runner.run, []

        def run(seqs, is_prefill):
            result = real_run(seqs, is_prefill)
            if interrupt_next:
                interrupt_next.clear()
                raise KeyboardInterrupt
            return result

        monkeypatch.setattr(llm.model_runner, "run", run)
        survivor_stream, tokens = llm.stream([survivor], params), []
        for _ in range(3):
            tokens += next(survivor_stream)["token_ids"]
        dropped_stream = llm.stream([dropped], params)
        next(dropped_stream), next(dropped_stream)  # it joined and decodes alongside the survivor
        interrupt_next.append(1)
        with pytest.raises(KeyboardInterrupt):
            next(dropped_stream)
        tokens += [t for event in survivor_stream for t in event["token_ids"]]
    assert tokens == reference


def test_dropped_llm_frees_its_memory_for_the_next(tiny_model, expected):
    first = LLM(tiny_model, **CPU_ENGINE)
    model = weakref.ref(first.model_runner.model)
    del first
    second = LLM(tiny_model, **CPU_ENGINE)  # collects the first (its modules hold reference cycles)
    assert model() is None
    assert greedy_tokens(second) == expected
    del second
    gc.collect()


EXIT_WITHOUT_CLEANUP = textwrap.dedent("""
    import sys
    from nanovllm import LLM, SamplingParams
    llm = LLM(sys.argv[1], device="cpu", tensor_parallel_size=2, num_kvcache_blocks=64, max_model_len=256)
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    print(len(out[0]["token_ids"]), *[p.pid for p in llm.workers.processes], flush=True)
    sys.stdin.read()  # stay up until the test closes stdin, then exit without llm.exit()
""")


def test_interpreter_exit_without_exit_call_does_not_hang_or_leak(tiny_model):
    # Two processes, each with a tensor-parallel engine, up at the same time: they must not collide.
    processes = [subprocess.Popen([sys.executable, "-c", EXIT_WITHOUT_CLEANUP, tiny_model], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  cwd=os.path.dirname(os.path.dirname(__file__))) for _ in range(2)]
    try:
        first_lines = [process.stdout.readline() for process in processes]  # both engines are up
        results = [process.communicate(input="", timeout=120) for process in processes]
    finally:
        for process in processes:
            process.kill()
    for process, line, (_, stderr) in zip(processes, first_lines, results):
        assert process.returncode == 0, stderr
        num_tokens, *pids = map(int, line.split())
        assert num_tokens == 4 and len(pids) == 1
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        assert "leaked" not in stderr  # multiprocessing's resource tracker found nothing to clean up
    pids = {process.pid for process in processes}
    assert not [name for name in os.listdir("/dev/shm") if name.startswith("nanovllm_")
                and int(name.split("_")[1]) in pids]
