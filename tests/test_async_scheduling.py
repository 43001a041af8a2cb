"""Asynchronous scheduling: a decode step's successor is queued before the step's tokens are read. It
must give exactly the outputs of synchronous stepping whatever finishes a sequence (length, a stop
token, a stop string, an abort), and leave nothing behind: no placeholder in any output, no block
held, the engine usable after an interrupt."""
import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.engine.sequence import PLACEHOLDER
from tests.conftest import CPU_ENGINE

PROMPTS = [[(7 * i + j) % 400 + 3 for j in range(5 + 9 * i)] for i in range(10)]


def count_look_aheads(llm) -> dict[str, int]:
    """Counts steps queued ahead, and rows of them whose sequence finished before they were read."""
    counts = {"queued": 0, "wasted rows": 0}
    look_ahead, postprocess = llm.scheduler.look_ahead, llm.scheduler.postprocess

    def counting_look_ahead(seqs):
        following = look_ahead(seqs)
        counts["queued"] += bool(following)
        return following

    def counting_postprocess(seqs, *args):
        counts["wasted rows"] += sum(seq.is_finished for seq in seqs)
        return postprocess(seqs, *args)

    llm.scheduler.look_ahead, llm.scheduler.postprocess = counting_look_ahead, counting_postprocess
    return counts


def mixed_params(stop_ids: list[int]) -> list[SamplingParams]:
    """Per prompt: lengths, stop token ids met mid-decode, a stop string, penalties, logprobs, n > 1."""
    params = []
    for i, stop_id in enumerate(stop_ids):
        extra = [dict(stop_token_ids=[stop_id]), dict(repetition_penalty=1.3, frequency_penalty=0.2),
                 dict(logprobs=2), dict(stop=["e"]), dict(n=2, temperature=1.0, seed=i), {}][i % 6]
        params.append(SamplingParams(**({"temperature": 0, "max_tokens": 6 + 5 * i, "ignore_eos": True} | extra)))
    return params


def without_logprobs(outs: list[dict]) -> list[dict]:
    strip = lambda d: {k: v for k, v in d.items() if k != "logprobs"}  # noqa: E731
    return [strip(out) | {"outputs": [strip(c) for c in out["outputs"]]} for out in outs]


def outputs(tiny_model, params, async_scheduling: bool, **engine):
    with LLM(tiny_model, **(CPU_ENGINE | engine), async_scheduling=async_scheduling) as llm:
        counts = count_look_aheads(llm)
        result = llm.generate(PROMPTS, params, use_tqdm=False)
        assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
    return result, counts


@pytest.mark.parametrize("engine", [{}, {"num_kvcache_blocks": 12, "max_num_batched_tokens": 64}],
                         ids=["roomy cache", "preempting, chunked"])
def test_same_outputs_as_synchronous_steps(tiny_model, engine):
    plain = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)] * len(PROMPTS)
    reference, _ = outputs(tiny_model, plain, False, **engine)
    # Stop ids that the greedy run meets at its 4th token: they end sequences while a step is queued.
    params = mixed_params([out["token_ids"][3] for out in reference])
    sync, sync_counts = outputs(tiny_model, params, False, **engine)
    fast, counts = outputs(tiny_model, params, True, **engine)
    assert without_logprobs(fast) == without_logprobs(sync)
    # A wasted row changes a step's batch size, and with it the float rounding of the logits.
    for fast_out, sync_out in zip(fast, sync):
        for fast_step, sync_step in zip(fast_out["logprobs"] or (), sync_out["logprobs"] or ()):
            assert fast_step == pytest.approx(sync_step, abs=1e-4)
    assert sync_counts["queued"] == 0 and counts["queued"] > 20
    if not engine:  # with a small cache, requests wait until the stopped ones have left
        assert counts["wasted rows"] > 0
    assert any(out["stop_reason"] in (params[i].stop_token_ids or [None])[0:1] for i, out in enumerate(fast)
               if params[i].stop_token_ids)
    assert all(PLACEHOLDER not in c["token_ids"] for out in fast for c in out["outputs"])


def test_streams_equal_generate_and_never_show_a_placeholder(tiny_model):
    params = mixed_params([1] * len(PROMPTS))
    with LLM(tiny_model, **CPU_ENGINE) as llm:
        expected = llm.generate(PROMPTS, params, use_tqdm=False)
        # Two interleaved streams share the engine's steps, and with them its queued step.
        streams = [(llm.stream(PROMPTS[:5], params[:5]), []), (llm.stream(PROMPTS[5:], params[5:]), [])]
        pending = list(streams)
        while pending:
            for stream, events in list(pending):
                event = next(stream, None)
                if event is None:
                    pending.remove((stream, events))
                else:
                    events.append(event)
    for offset, (_, events) in zip((0, 5), streams):
        assert all(PLACEHOLDER not in event["token_ids"] for event in events)
        for event in events:
            event["index"] += offset
        for index in range(offset, offset + 5):
            for sample, completion in enumerate(expected[index]["outputs"]):
                mine = [e for e in events if (e["index"], e["sample_index"]) == (index, sample)]
                assert [t for e in mine for t in e["token_ids"]] == completion["token_ids"]
                assert "".join(e["text"] for e in mine) == completion["text"]


@pytest.mark.parametrize("where", ["queueing the next step", "committing the tokens"])
def test_interrupt_with_a_step_queued_leaves_another_calls_sequences_correct(tiny_model, monkeypatch, where):
    """Ctrl-C while a step is queued ahead: the queued step is dropped with its placeholders, the
    interrupted call's sequences are aborted, and another call's sequences go on as if nothing happened."""
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, repetition_penalty=1.3)
    survivor, dropped = list(range(40, 50)), list(range(5, 30))
    with LLM(tiny_model, **CPU_ENGINE) as llm:
        reference = llm.generate([survivor], params, use_tqdm=False)[0]["token_ids"]
        survivor_stream, tokens = llm.stream([survivor], params), []
        for _ in range(3):
            tokens += next(survivor_stream)["token_ids"]
        dropped_stream = llm.stream([dropped], params)
        next(dropped_stream), next(dropped_stream)  # it joined and decodes alongside the survivor
        assert llm.in_flight is not None
        interrupt = []
        if where == "queueing the next step":
            target, name = llm.model_runner, "run"
        else:
            target, name = llm, "_after_sampling"
        real = getattr(target, name)

        def interrupted(*args):
            result = real(*args)
            if not interrupt:
                interrupt.append(1)
                raise KeyboardInterrupt
            return result

        monkeypatch.setattr(target, name, interrupted)
        with pytest.raises(KeyboardInterrupt):
            next(dropped_stream)
        monkeypatch.undo()
        assert llm.in_flight is None
        tokens += [t for event in survivor_stream for t in event["token_ids"]]
        assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
    assert tokens == reference


def test_a_wasted_row_never_evicts_a_cached_prefix(tiny_model):
    """A stop token ends a sequence just as its next token would open a block, when the only free
    blocks hold a cached prefix: the queued step must not have taken one of them (found in review)."""
    greedy = dict(temperature=0, ignore_eos=True)
    cached_prompt = [(5 * j) % 400 + 3 for j in range(33)]  # two full blocks of 16 stay cached
    with LLM(tiny_model, **(CPU_ENGINE | {"num_kvcache_blocks": 8})) as llm:
        for attempt in range(50):  # a prompt whose 16th generated token has not appeared before it
            prompt = [(11 * j + 7 * attempt) % 400 + 3 for j in range(81)]
            tokens = llm.generate([prompt], SamplingParams(max_tokens=16, **greedy), use_tqdm=False)[0]["token_ids"]
            if tokens[15] not in tokens[:15]:
                break
    cached = {}
    for async_scheduling in (False, True):
        with LLM(tiny_model, **(CPU_ENGINE | {"num_kvcache_blocks": 8}), async_scheduling=async_scheduling) as llm:
            llm.generate([cached_prompt], SamplingParams(max_tokens=1, **greedy), use_tqdm=False)
            # 81 + 15 = 96 tokens: the 16th token would open the 7th block; the stop token ends it.
            out = llm.generate([prompt], SamplingParams(max_tokens=40, stop_token_ids=[tokens[15]], **greedy),
                               use_tqdm=False)[0]
            assert len(out["token_ids"]) == 16 and out["finish_reason"] == "stop"
            again = llm.generate([cached_prompt], SamplingParams(max_tokens=1, **greedy), use_tqdm=False)[0]
            cached[async_scheduling] = again["num_cached_tokens"]
    assert cached == {False: 32, True: 32}

