"""Tensor parallelism on CPU (gloo): the same greedy tokens as one rank and as transformers, across
the cache paths; engines that coexist and follow each other; failures that raise instead of hang;
nothing left behind. Also the call channel and step messages on their own (no processes)."""
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.engine import tp_channel
from nanovllm.engine.model_runner import overlap_cut
from nanovllm.engine.sequence import PLACEHOLDER, Sequence, SequenceStatus
from nanovllm.engine.tp_channel import CallChannel, WorkerGone
from nanovllm.engine.tp_step import SequenceMirror, StepEncoder
from nanovllm.sampling.shard_draw import ShardDraw, best_of_slices, draw_slice
from nanovllm.testing.checkpoints import make_random_checkpoint
from nanovllm.testing.tokenizer import train_tokenizer
from nanovllm.utils.distributed import ParallelGroup
from tests.conftest import CPU_ENGINE, generate_while_killing_worker, hf_greedy
from tests.test_async_scheduling import count_look_aheads

MAX_NEW = 12
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
TP2 = CPU_ENGINE | {"tensor_parallel_size": 2}


def our_shm_segments() -> list[str]:
    # Channel names start with the creating process's pid; other test runs may share this machine.
    return [name for name in os.listdir("/dev/shm") if name.startswith(f"nanovllm_{os.getpid()}_")]


def is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def worker_pids(llm) -> list[int]:
    return [process.pid for process in llm.workers.processes]


def assert_nothing_left(pids: list[int], threads_before: set[int]) -> None:
    assert not any(is_running(pid) for pid in pids)
    assert our_shm_segments() == []
    assert {t.ident for t in threading.enumerate()} <= threads_before


@pytest.fixture(scope="module")
def prompts_and_reference(tiny_model):
    rng = random.Random(5)
    prefix = [rng.randrange(3, 512) for _ in range(40)]
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randint(1, 60))] for _ in range(4)]
    prompts += [prefix + [rng.randrange(3, 512) for _ in range(rng.randint(1, 20))] for _ in range(3)]
    return prompts, hf_greedy(tiny_model, prompts, MAX_NEW)


def greedy_tokens(llm, prompts) -> list[list[int]]:
    return [o["token_ids"] for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


@pytest.fixture(scope="module")
def tp_llm(tiny_model):
    # A tiny channel buffer, so that prefill messages span several chunks.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tp_channel, "DEFAULT_CAPACITY", 256)
        llm = LLM(tiny_model, **TP2)
    yield llm
    llm.exit()


# ---- the engine ---------------------------------------------------------------------------------
def test_two_ranks_match_one_rank_and_transformers(tiny_model, tp_llm, prompts_and_reference):
    prompts, reference = prompts_and_reference
    with LLM(tiny_model, **CPU_ENGINE) as one_rank:
        assert greedy_tokens(one_rank, prompts) == reference
    assert greedy_tokens(tp_llm, prompts) == reference


def test_sequences_that_finish_at_different_steps(tiny_model, tp_llm, prompts_and_reference):
    """Rows leave the batch from its middle: each rank carries the rest over on the device alike."""
    prompts, _ = prompts_and_reference
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (3, 12, 5, 12, 8, 12, 1)]
    with LLM(tiny_model, **CPU_ENGINE) as one_rank:
        reference = [o["token_ids"] for o in one_rank.generate(prompts, params, use_tqdm=False)]
    assert [o["token_ids"] for o in tp_llm.generate(prompts, params, use_tqdm=False)] == reference


def test_steps_queued_ahead_match_one_rank(tiny_model, tp_llm, prompts_and_reference):
    """Asynchronous scheduling across ranks: the messages of queued steps carry placeholders, rank 0
    broadcasts the sampled ids, and sequences that a stop token ends leave wasted rows."""
    prompts, reference = prompts_and_reference
    params = [SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[tokens[2 + i % 4]])
              for i, tokens in enumerate(reference)]
    with LLM(tiny_model, **CPU_ENGINE) as one_rank:
        expected = one_rank.generate(prompts, params, use_tqdm=False)
    counts = count_look_aheads(tp_llm)
    fields = lambda outs: [(o["token_ids"], o["finish_reason"], o["stop_reason"]) for o in outs]  # noqa: E731
    assert fields(tp_llm.generate(prompts, params, use_tqdm=False)) == fields(expected)
    assert counts["queued"] > 0 and counts["wasted rows"] > 0


def test_greedy_decode_steps_draw_on_each_ranks_slice(tp_llm, prompts_and_reference, monkeypatch):
    """Greedy decode steps send rank 0 one (score, token) pair per row from each rank instead of the
    logits, and give the reference tokens; prefill steps and temperature sampling on the CPU gather."""
    prompts, reference = prompts_and_reference
    real_plan, plans = tp_llm.model_runner.plan_draw, []

    def recording_plan(seqs, is_prefill):
        draw, settings = real_plan(seqs, is_prefill)
        plans.append((is_prefill, draw))
        return draw, settings

    monkeypatch.setattr(tp_llm.model_runner, "plan_draw", recording_plan)
    assert greedy_tokens(tp_llm, prompts) == reference
    assert [plan for is_prefill, plan in plans if not is_prefill] == [ShardDraw()] * (MAX_NEW - 1)
    assert all(plan is None for is_prefill, plan in plans if is_prefill)
    plans.clear()
    tp_llm.generate(prompts, SamplingParams(temperature=0.8, max_tokens=4), use_tqdm=False)
    assert plans and all(plan is None for _, plan in plans)


# The race over slices runs only on CUDA with >= 64 rows; here it is forced on the CPU, every rank's
# Triton kernel in the interpreter (set before Triton is imported, hence a process of its own).
RACE_ON_SLICES = textwrap.dedent("""
    import json, os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from nanovllm import LLM, SamplingParams
    from nanovllm.engine import model_runner
    from nanovllm.sampling.shard_draw import ShardDraw, plan_shard_draw

    def race_plan(batch, seqs, device):
        if batch.all_greedy:
            return plan_shard_draw(batch, seqs, device)
        return ShardDraw([seq.sampling_params.temperature for seq in seqs], int(torch.randint(0, 2**31 - 1, ())))

    model_runner.plan_shard_draw = race_plan
    prompts, engine = json.loads(sys.argv[2]), json.loads(sys.argv[3])
    with LLM(sys.argv[1], tensor_parallel_size=2, **engine) as llm:
        runs = [llm.generate(prompts, SamplingParams(temperature=t, max_tokens=8, ignore_eos=True), use_tqdm=False)
                for t in (1e-4, 1.5)]
    print(json.dumps([[o["token_ids"] for o in run] for run in runs]))
""")


def test_race_over_slices_runs_through_the_workers(tiny_model, prompts_and_reference):
    """Every rank races over its slice with the seed and temperatures from rank 0's message: at a
    temperature of 1e-4 the race is the greedy argmax (unless two logits tie within ~1e-3), at 1.5 it
    is not."""
    prompts, reference = prompts_and_reference
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", RACE_ON_SLICES, tiny_model, json.dumps(prompts),
                           json.dumps(CPU_ENGINE)], cwd=root, capture_output=True, text=True, timeout=300,
                          env=os.environ | {"PYTHONPATH": root})
    assert done.returncode == 0, done.stderr[-3000:]
    cold, hot = json.loads(done.stdout.splitlines()[-1])
    assert cold == [tokens[:8] for tokens in reference]
    assert hot != cold


def test_greedy_slices_give_the_first_maximum_of_the_whole_row():
    """Three ranks' slices of a 10-token vocabulary padded to 12: ties within and across slices go to
    the first token, and padding columns never win."""
    torch.manual_seed(0)
    logits = torch.randn(4, 10)
    logits[1, [3, 4]] = 9.0   # across the first two slices
    logits[2, [5, 6]] = 9.0   # within one slice
    logits[3, 9] = 9.0        # the last real token
    padded = torch.cat([logits, torch.full((4, 2), 100.0)], 1)
    pairs = torch.stack([draw_slice(padded[:, start:start + 4], ShardDraw(), start, 10) for start in (0, 4, 8)], 1)
    tokens = best_of_slices(pairs).tolist()
    assert tokens == logits.argmax(-1).tolist() and tokens[1:] == [3, 5, 9]


def test_prefix_cache_hits_give_same_tokens(tp_llm, prompts_and_reference):
    prompts, reference = prompts_and_reference
    greedy_tokens(tp_llm, prompts)
    again = tp_llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o["token_ids"] for o in again] == reference
    assert sum(o["num_cached_tokens"] for o in again) >= 3 * 32


def test_prefill_micro_batches_give_same_tokens(tiny_model, prompts_and_reference, monkeypatch):
    """prefill_overlap_tokens=8: prefill steps of several sequences run as two micro-batches, each one's
    all-reduces queued while the other computes (utils/partial_sums.py), with prefix-cache hits and
    prompts chunked over steps (max_num_batched_tokens=64)."""
    prompts, reference = prompts_and_reference
    with LLM(tiny_model, **(TP2 | {"prefill_overlap_tokens": 8, "max_num_batched_tokens": 64})) as llm:
        real, cuts = llm.model_runner._prefill_overlapped, []
        monkeypatch.setattr(llm.model_runner, "_prefill_overlapped",
                            lambda parts, gather: cuts.append([len(p) for p in parts]) or real(parts, gather))
        assert greedy_tokens(llm, prompts) == reference
        again = llm.generate(prompts, GREEDY, use_tqdm=False)
        assert [o["token_ids"] for o in again] == reference
        assert sum(o["num_cached_tokens"] for o in again) >= 3 * 32
    assert len(cuts) >= 4 and all(min(sizes) >= 1 for sizes in cuts)


def test_overlap_cut_evens_the_micro_batches_tokens():
    seqs = lambda *tokens: [SimpleNamespace(num_scheduled_tokens=n) for n in tokens]  # noqa: E731
    assert overlap_cut(seqs(5, 5, 10), 1) == 2
    assert overlap_cut(seqs(30, 1, 1, 2, 30), 30) == 3  # 32 + 32 tokens
    assert overlap_cut(seqs(5, 5, 10), 11) is None  # a micro-batch would fall short
    assert overlap_cut(seqs(100), 1) is None  # one sequence is never cut
    assert overlap_cut(seqs(50, 50), 0) is None  # 0: off


def test_ctrl_c_during_a_step_leaves_engine_usable(tp_llm, prompts_and_reference, monkeypatch):
    prompts, reference = prompts_and_reference
    real_run, calls = tp_llm.model_runner.run, []

    def interrupted_run(*args):
        calls.append(1)
        if len(calls) == 3:  # Ctrl-C while the workers are already computing this step
            os.kill(os.getpid(), signal.SIGINT)
        return real_run(*args)

    monkeypatch.setattr(tp_llm.model_runner, "run", interrupted_run)
    with pytest.raises(KeyboardInterrupt):
        greedy_tokens(tp_llm, prompts)
    # The step finished on every rank before the interrupt was delivered; the call's requests are dropped.
    assert len(calls) == 3 and tp_llm.scheduler.is_finished()
    assert tp_llm.block_manager.num_free_blocks == tp_llm.block_manager.num_blocks
    assert all(process.is_alive() for process in tp_llm.workers.processes)
    assert greedy_tokens(tp_llm, prompts) == reference


def test_kv_cache_is_what_the_smallest_rank_can_hold(tiny_model, prompts_and_reference, tmp_path, monkeypatch):
    prompts, reference = prompts_and_reference
    # The worker is a spawned interpreter, so a sitecustomize on its PYTHONPATH runs in it alone: there
    # host memory fits 40 blocks, while rank 0 (this process) fits every sequence's 16 x 32 = 512.
    (tmp_path / "sitecustomize.py").write_text(
        "from nanovllm.engine import kv_cache\n"
        "kv_cache.blocks_that_fit_host = lambda config, bytes_per_block, weight_bytes: 40\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    with LLM(tiny_model, **(TP2 | {"num_kvcache_blocks": -1})) as llm:
        assert llm.block_manager.num_blocks == 40
        assert llm.model_runner.kv_cache.shape[2] == 40  # rank 0 allocated no more than the worker
        assert greedy_tokens(llm, prompts) == reference


def test_two_engines_at_once_with_chunked_prefill_and_preemption(tiny_model, tp_llm, prompts_and_reference):
    prompts, reference = prompts_and_reference
    # 6 blocks of 16 tokens hold one long sequence (up to 72 tokens): the rest are preempted and recomputed.
    constrained = LLM(tiny_model, **(TP2 | {"max_num_batched_tokens": 7, "num_kvcache_blocks": 6}))
    assert constrained.workers.channel.shm.name != tp_llm.workers.channel.shm.name
    assert greedy_tokens(constrained, prompts) == reference
    assert constrained.scheduler.num_preemptions > 0
    assert greedy_tokens(tp_llm, prompts) == reference
    pids = worker_pids(constrained)
    del constrained  # dropping the last reference shuts its workers down, not the other engine's
    assert not any(is_running(pid) for pid in pids)
    assert greedy_tokens(tp_llm, prompts) == reference


def test_killed_worker_raises_within_seconds(tiny_model, prompts_and_reference, monkeypatch):
    # Also an engine that follows another: the test above dropped its second engine.
    prompts, reference = prompts_and_reference
    threads_before = {t.ident for t in threading.enumerate()}
    with LLM(tiny_model, **TP2) as llm:
        assert greedy_tokens(llm, prompts) == reference
        pids = worker_pids(llm)
        # The worker dies in the middle of a step.
        outcome, seconds = generate_while_killing_worker(llm, monkeypatch, lambda: greedy_tokens(llm, prompts),
                                                         pids[0], kill_at_call=2, deadline=30)
        assert seconds < 10
        assert outcome and "rank 1" in str(outcome[0]) and "SIGKILL" in str(outcome[0])
        with pytest.raises(RuntimeError, match="rank 1"):  # and it stays failed, clearly
            greedy_tokens(llm, prompts)
    assert_nothing_left(pids, threads_before)


class AbortThatHangs:
    """A process group whose abort() blocks until released, as NCCL's did on 2 x H100 while kernels
    waited on a dead rank; then it aborts for real."""

    def __init__(self, group):
        self.group, self.released = group, threading.Event()

    def abort(self):
        self.released.wait()
        self.group.abort()


def test_killed_worker_raises_even_when_the_group_abort_hangs(tiny_model, prompts_and_reference, monkeypatch):
    prompts, _ = prompts_and_reference
    threads_before = {t.ident for t in threading.enumerate()}
    with LLM(tiny_model, **TP2) as llm:
        pids = worker_pids(llm)
        pool = llm.workers
        hanging = AbortThatHangs(pool.group.group)
        # The watchdog aborts the group on CUDA only (gloo notices a dead peer by itself).
        monkeypatch.setattr(pool, "device", torch.device("cuda"))
        monkeypatch.setattr(pool, "group", ParallelGroup(0, 2, hanging))
        outcome, seconds = generate_while_killing_worker(llm, monkeypatch, lambda: greedy_tokens(llm, prompts),
                                                         pids[0], kill_at_call=2, deadline=30)
        assert seconds < 15
        assert outcome and "rank 1" in str(outcome[0])
        hanging.released.set()  # the abort returns at last; the watchdog thread ends
        pool._watchdog.join(10)
    assert_nothing_left(pids, threads_before)


def test_construction_error_leaves_nothing_behind(tiny_model, tmp_path):
    # Weights that do not fit the config (a wider hidden size): every rank fails while loading.
    bad = make_random_checkpoint(str(tmp_path))
    train_tokenizer(bad)
    with open(os.path.join(bad, "config.json")) as f:
        config = json.load(f) | {"hidden_size": 96}
    with open(os.path.join(bad, "config.json"), "w") as f:
        json.dump(config, f)
    threads_before = {t.ident for t in threading.enumerate()}
    with pytest.raises(ValueError, match="does not fit"):  # rank 0's own error, not a worker's death
        LLM(bad, **TP2)
    assert_nothing_left([], threads_before)


# ---- the call channel and step messages, in one process ------------------------------------------
def test_channel_delivers_messages_larger_than_its_buffer():
    channel = CallChannel(num_workers=2, capacity=64)
    messages = [b"", b"x" * 63, b"y" * 64, b"z" * 65, list(range(3000)), {"step": 7}]
    received = [[], []]

    def read(endpoint, into, pause):
        endpoint.attach()
        for _ in messages:
            into.append(endpoint.receive())
            time.sleep(pause)  # a slow reader: the writer must wait for it, never overwrite

    readers = [threading.Thread(target=read, args=(e, r, p)) for e, r, p in
               zip(channel.endpoints, received, (0, 0.01))]
    for reader in readers:
        reader.start()
    channel.wait_for_attach()
    assert our_shm_segments() == []  # unlinked as soon as every worker has attached
    for message in messages:
        channel.send(message)
    for reader in readers:
        reader.join()
    assert received == [messages, messages]
    channel.close()


def test_channel_reports_a_worker_that_is_gone():
    channel = CallChannel(num_workers=1, capacity=64)
    channel.endpoints[0].conn.close()
    with pytest.raises(WorkerGone):
        channel.send("step")
        channel.wait_for_acks()
    channel.close()
    assert our_shm_segments() == []


def test_step_messages_carry_only_what_changed():
    encoder, mirror = StepEncoder(), SequenceMirror(block_size=4)
    seq = Sequence(list(range(10, 20)), None, 4)
    seq.block_table, seq.num_scheduled_tokens = [7, 3, 5], 10
    first = encoder.encode([seq], is_prefill=True)
    assert first.updates[0][2] == seq.token_ids and first.updates[0][4] == [7, 3, 5]
    [copy] = mirror.apply(first)

    seq.num_computed_tokens, seq.num_scheduled_tokens = 10, 1
    seq.append_token(99)
    decode = encoder.encode([seq], is_prefill=False)
    assert decode.updates[0][1:5] == (10, [99], 3, [])  # one new token, no block-table entries
    mirror.apply(decode)
    assert copy.token_ids == seq.token_ids and copy.block_table == seq.block_table

    # A step scheduled ahead: the placeholder travels as such, and the next message replaces it.
    seq.num_computed_tokens = 11
    seq.append_placeholder()
    ahead = encoder.encode([seq], is_prefill=False)
    assert ahead.updates[0][1:3] == (11, [PLACEHOLDER])
    mirror.apply(ahead)
    assert copy.has_placeholder and copy.token_ids == seq.token_ids
    seq.append_token(42)  # the token it stood for
    seq.num_computed_tokens = 12
    seq.append_placeholder()
    mirror.apply(encoder.encode([seq], is_prefill=False))
    assert copy.token_ids[-2:] == [42, PLACEHOLDER] and copy.token_ids == seq.token_ids
    seq.drop_placeholder()  # the queued step was dropped (Ctrl-C): the position is sent again
    mirror.apply(encoder.encode([seq], is_prefill=False))
    assert copy.token_ids == seq.token_ids and not copy.has_placeholder

    seq.block_table = [1, 2, 4]  # preempted and readmitted elsewhere: a new table, sent whole
    readmitted = encoder.encode([seq], is_prefill=True)
    assert readmitted.updates[0][3:5] == (0, [1, 2, 4])
    mirror.apply(readmitted)
    assert copy.block_table == [1, 2, 4]

    seq.status = SequenceStatus.FINISHED
    assert encoder.encode([], is_prefill=False).forget == [seq.seq_id]
