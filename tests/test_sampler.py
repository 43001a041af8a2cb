"""The sampler on fixed synthetic logits: filters keep exactly the tokens transformers' warpers keep,
penalties change logits exactly as transformers' processors (and OpenAI's formula) do, seeds reproduce
whatever else is in the batch, min_tokens suppresses eos and stop ids, logprobs are the raw model's."""
import pytest
import torch
from transformers import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from nanovllm.engine.sequence import Sequence, SequenceStatus
from nanovllm.sampling import Sampler
from nanovllm.sampling.penalties import PenaltyState
from nanovllm.sampling_params import SamplingParams

V = 64
DRAWS = 3000  # rows of one batch: every token with probability >~ 0.3% shows up


@pytest.fixture(autouse=True)
def fixed_global_seed():
    """Unseeded draws use torch's global generator: fix it so these statistical checks never flake."""
    torch.manual_seed(0)


def seqs_for(params: list[SamplingParams], prompt=(1, 2, 3), generated=()) -> list[Sequence]:
    seqs = []
    for p in params:
        seq = Sequence(list(prompt), p, 16)
        for t in generated:
            seq.append_token(t)
        seqs.append(seq)
    return seqs


def sample(logits: torch.Tensor, seqs: list[Sequence], eos=(), sampler=None) -> list[int]:
    return (sampler or Sampler())(logits.clone(), seqs, eos).token_ids


def draws(row_logits: torch.Tensor, params: SamplingParams) -> set[int]:
    """The tokens DRAWS independent samples of one row of logits produce."""
    return set(sample(row_logits.expand(DRAWS, -1), seqs_for([params] * DRAWS)))


def kept_by_transformers(row_logits: torch.Tensor, temperature: float, **filters) -> set[int]:
    scores = TemperatureLogitsWarper(temperature)(None, row_logits.clone().unsqueeze(0))
    for name, warper in (("top_k", TopKLogitsWarper), ("top_p", TopPLogitsWarper), ("min_p", MinPLogitsWarper)):
        if name in filters:
            scores = warper(filters[name])(None, scores)
    return set(torch.isfinite(scores[0]).nonzero().flatten().tolist())


@pytest.fixture(scope="module")
def flat_logits() -> torch.Tensor:
    """One row whose probabilities fall off slowly: filters cut somewhere in the middle."""
    return torch.linspace(2.0, -2.0, V)[torch.randperm(V, generator=torch.Generator().manual_seed(0))]


def test_greedy_and_top_k_1_are_argmax():
    logits = torch.randn(6, V, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=0)] * 3 + [SamplingParams(temperature=t, top_k=1) for t in (0.5, 1, 2)]
    assert sample(logits, seqs_for(params)) == logits.argmax(-1).tolist()


@pytest.mark.parametrize("filters", [dict(top_k=5), dict(top_k=20), dict(top_p=0.5), dict(top_p=0.9),
                                     dict(top_k=20, top_p=0.6), dict(min_p=0.3), dict(min_p=0.1)],
                         ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.5])
def test_filters_keep_exactly_what_transformers_keeps(flat_logits, filters, temperature):
    kept = draws(flat_logits, SamplingParams(temperature=temperature, **filters))
    assert kept == kept_by_transformers(flat_logits, temperature, **filters)


@pytest.mark.parametrize("top_p,nucleus", [(0.35, {0}), (0.4, {0, 1}), (0.65, {0, 1}), (0.75, {0, 1, 2}),
                                           (0.95, {0, 1, 2, 3})])
def test_top_p_keeps_the_nucleus_including_the_token_that_crosses_top_p(top_p, nucleus):
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1] + [0.0] * (V - 4))
    assert draws(probs.log(), SamplingParams(top_p=top_p)) == nucleus


def test_top_p_redoes_rows_whose_candidates_hold_too_little_mass(flat_logits, monkeypatch):
    """With 4 candidates a flat row's nucleus does not fit; the full-vocabulary redo keeps it exact."""
    monkeypatch.setattr("nanovllm.sampling.batch.TOP_P_CANDIDATES", 4)
    kept = draws(flat_logits, SamplingParams(top_p=0.5))
    assert kept == kept_by_transformers(flat_logits, 1.0, top_p=0.5) and len(kept) > 4


def test_top_p_draws_in_proportion_within_the_nucleus():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1] + [0.0] * (V - 4))
    tokens = sample(probs.log().expand(20000, -1), seqs_for([SamplingParams(top_p=0.75)] * 20000))
    frequency = torch.bincount(torch.tensor(tokens), minlength=V)[:3] / 20000
    assert torch.allclose(frequency, torch.tensor([4, 3, 2]) / 9, atol=0.015)


def test_mixed_batch_each_row_follows_its_own_settings(flat_logits):
    params = [SamplingParams(temperature=0), SamplingParams(top_k=3), SamplingParams(),
              SamplingParams(top_p=0.3), SamplingParams(min_p=0.5)] * 600
    tokens = torch.tensor(sample(flat_logits.expand(len(params), -1), seqs_for(params))).view(-1, 5)
    top3 = set(flat_logits.topk(3).indices.tolist())
    assert set(tokens[:, 0].tolist()) == {flat_logits.argmax().item()}
    assert set(tokens[:, 1].tolist()) == top3
    assert len(set(tokens[:, 2].tolist())) > 40  # plain sampling reaches most of the vocabulary
    assert set(tokens[:, 3].tolist()) == kept_by_transformers(flat_logits, 1.0, top_p=0.3)
    assert set(tokens[:, 4].tolist()) == kept_by_transformers(flat_logits, 1.0, min_p=0.5)


# ---- penalties --------------------------------------------------------------------------------------
PROMPT, GENERATED = [3, 5, 5, 7, 11], [5, 9, 9, 2, 9, 40]


def reference_penalties(logits, tokens, num_prompt, params: SamplingParams) -> torch.Tensor:
    """transformers' repetition processor, then OpenAI's presence / frequency over generated tokens."""
    out = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(torch.tensor([tokens]), logits.clone()[None])[0]
    counts = torch.bincount(torch.tensor(tokens[num_prompt:], dtype=torch.long), minlength=V).float()
    return out - params.frequency_penalty * counts - params.presence_penalty * (counts > 0)


PENALTIES = [dict(repetition_penalty=1.3), dict(repetition_penalty=0.7), dict(presence_penalty=0.8),
             dict(frequency_penalty=-0.6), dict(repetition_penalty=1.5, presence_penalty=-1.0, frequency_penalty=0.4)]


@pytest.mark.parametrize("same_rows", [False, True], ids=["new-row-list", "same-row-list"])
@pytest.mark.parametrize("penalties", PENALTIES, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()))
def test_penalties_change_logits_as_transformers_and_openai_define_them(penalties, same_rows):
    """Step by step: the device history grows with each recorded token and matches the reference, whether
    each step passes the same row list as the last (a reused SamplingBatch) or a new list of the same rows;
    either way the rows are carried over on the device."""
    params = SamplingParams(**penalties)
    plain = SamplingParams()
    seqs = seqs_for([plain, params, plain, params], prompt=PROMPT)
    state = PenaltyState()
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(2)) * 3
    penalized = [(1, seqs[1]), (3, seqs[3])]
    advanced_steps = 0
    for step, token in enumerate(GENERATED):
        rows = state.prepare(penalized if same_rows else list(penalized), V, torch.device("cpu"))
        advanced_steps += state.steps_advanced > 0
        out = logits.clone()
        state.apply(out, rows)
        expected = reference_penalties(logits[1], seqs[1].token_ids, len(PROMPT), params)
        torch.testing.assert_close(out[1], expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(out[3], reference_penalties(logits[3], seqs[3].token_ids, len(PROMPT), params),
                                   rtol=0, atol=1e-6)
        torch.testing.assert_close(out[[0, 2]], logits[[0, 2]], rtol=0, atol=0)
        sampled = torch.tensor([0, token, 0, GENERATED[-1 - step]])
        state.record(rows, sampled)
        seqs[1].append_token(token)
        seqs[3].append_token(GENERATED[-1 - step])
    # Carrying over stops where the history must grow (a full prepare copies it into a wider buffer).
    assert advanced_steps >= 3


def test_penalty_slots_are_freed_when_sequences_finish():
    state = PenaltyState()
    params = SamplingParams(repetition_penalty=1.2)
    first = seqs_for([params] * 3)
    state.prepare(list(enumerate(first)), V, torch.device("cpu"))
    for seq in first:
        seq.status = SequenceStatus.FINISHED
    state.prepare(list(enumerate(seqs_for([params] * 3))), V, torch.device("cpu"))
    assert len(state.entries) == 3 and state.history.shape[0] == 8


# ---- seeds ------------------------------------------------------------------------------------------
SEEDED = [SamplingParams(seed=7), SamplingParams(seed=7, top_k=10), SamplingParams(seed=7, top_p=0.8),
          SamplingParams(seed=7, min_p=0.1, temperature=0.8),
          SamplingParams(seed=7, top_k=30, top_p=0.9, repetition_penalty=1.2, presence_penalty=0.5)]
OTHERS = [SamplingParams(temperature=0), SamplingParams(top_k=3), SamplingParams(seed=1, top_p=0.5),
          SamplingParams(frequency_penalty=1.0)]


def run_steps(flat_logits, params_per_row: list[SamplingParams], row: int, steps: int = 12) -> list[int]:
    """Sample `steps` tokens for every row (each row appends its own), return row `row`'s tokens."""
    seqs, sampler = seqs_for(params_per_row), Sampler()
    for _ in range(steps):
        for seq, token in zip(seqs, sample(flat_logits.expand(len(seqs), -1), seqs, sampler=sampler)):
            seq.append_token(token)
    return seqs[row].completion_token_ids


@pytest.mark.parametrize("params", SEEDED, ids=range(len(SEEDED)))
def test_seeded_request_gives_the_same_tokens_whatever_else_is_in_the_batch(flat_logits, params):
    alone = run_steps(flat_logits, [params], 0)
    assert run_steps(flat_logits, OTHERS[:2] + [params] + OTHERS[2:], 2) == alone
    assert run_steps(flat_logits, [params] + OTHERS[::-1], 0) == alone
    assert len(set(alone)) > 1  # it did sample


def test_different_seeds_and_sample_indices_differ(flat_logits):
    runs = {tuple(run_steps(flat_logits, [SamplingParams(seed=s)], 0)) for s in range(4)}
    seqs = seqs_for([SamplingParams(seed=0)] * 4)
    for i, seq in enumerate(seqs):
        seq.sample_index = i
    siblings = {sample(flat_logits.expand(4, -1), seqs)[i] for i in range(4)}
    assert len(runs) == 4 and len(siblings) > 1


def test_unseeded_runs_differ(flat_logits):
    assert len({tuple(run_steps(flat_logits, [SamplingParams()], 0)) for _ in range(3)}) == 3


def test_seeded_noise_samples_the_right_distribution():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    tokens = sample(probs.log().expand(20000, -1), seqs_for([SamplingParams(seed=s) for s in range(20000)]))
    frequency = torch.bincount(torch.tensor(tokens), minlength=4) / 20000
    assert torch.allclose(frequency, probs, atol=0.015)


# ---- min_tokens and logprobs --------------------------------------------------------------------------
@pytest.mark.parametrize("generated,suppressed", [((), True), ((9,), True), ((9, 9), False)])
def test_min_tokens_suppresses_eos_and_stop_token_ids(generated, suppressed):
    logits = torch.zeros(3, V)
    logits[:, 50], logits[:, 51], logits[:, 20] = 10.0, 9.0, 8.0  # 50 = eos, 51 = a stop id
    params = [SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[51]),
              SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[51], ignore_eos=True),
              SamplingParams(min_tokens=2, stop_token_ids=[51], top_k=3)]
    tokens = sample(logits, seqs_for(params, generated=generated), eos=(50,))
    assert tokens == ([20, 50, 20] if suppressed else [50, 50, tokens[2]])


def test_logprobs_are_the_raw_models_log_softmax():
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(3))
    params = [SamplingParams(logprobs=3, temperature=0.5, repetition_penalty=2.0), SamplingParams(),
              SamplingParams(logprobs=0, top_k=2)]
    output = Sampler()(logits.clone(), seqs_for(params, generated=(7, 8)), ())
    reference = logits.log_softmax(-1)
    first, missing, only_sampled = output.logprobs
    token = output.token_ids[0]
    top3 = reference[0].topk(3).indices.tolist()
    assert list(first)[0] == token and set(first) == {token, *top3}
    assert all(abs(first[t] - reference[0, t].item()) < 1e-6 for t in first)
    assert missing is None and list(only_sampled) == [output.token_ids[2]]


def test_greedy_row_with_top_p_never_redoes_the_full_vocabulary(monkeypatch):
    """A greedy row takes the argmax whatever its nucleus: a flat distribution (whose top candidates hold
    too little mass) must not send it through the full-vocabulary fallback."""
    from nanovllm.sampling import sampler as sampler_module
    calls = []
    real = sampler_module.sample_from_candidates

    def counting(logits, *args):
        calls.append(logits.shape[0])
        return real(logits, *args)

    monkeypatch.setattr(sampler_module, "sample_from_candidates", counting)
    torch.manual_seed(0)
    logits = torch.randn(3, 4096) * 0.1  # flat rows
    logits[2, 7] = 50.0  # a peaked row: its candidates hold all the mass
    seqs = [Sequence([1, 2, 3], SamplingParams(temperature=0.0, top_p=0.9), 16),
            Sequence([1, 2, 3], SamplingParams(temperature=0.7, top_p=0.9, top_k=50), 16),
            Sequence([1, 2, 3], SamplingParams(temperature=0.7, top_p=0.95), 16)]
    tokens = sample(logits.clone(), seqs)
    assert tokens[0] == int(logits[0].argmax()) and tokens[2] == 7
    assert len(calls) == 1  # the candidate pass only; no redo


@pytest.mark.parametrize("params, reused", [(SamplingParams(top_k=5, repetition_penalty=1.2), True),
                                            (SamplingParams(seed=3), False), (SamplingParams(min_tokens=2), False)])
def test_a_steps_settings_are_reused_only_when_nothing_in_them_changes_per_step(params, reused):
    """Seeded rows need a new uniform each step and min_tokens rows a new suppression set; the rest of
    the settings carry over to the next step of the same sequences."""
    sampler, seqs = Sampler(), seqs_for([params, SamplingParams()])
    first = sampler._batch(seqs, (0,), V, torch.device("cpu"))
    assert (sampler._batch(seqs, (0,), V, torch.device("cpu")) is first) == reused
    assert sampler._batch(seqs[:1], (0,), V, torch.device("cpu")) is not first  # another batch


def test_penalty_rows_of_a_batch_that_lost_rows_carry_over():
    """Sequences finish between steps: the rows left carry their histories over on the device and still
    get exactly the reference penalties."""
    params = SamplingParams(repetition_penalty=1.5, presence_penalty=-1.0, frequency_penalty=0.4)
    batch = seqs_for([params] * 3, prompt=PROMPT)
    state = PenaltyState()
    carried = []
    keep_rows = state._keep_rows
    state._keep_rows = lambda *args: carried.append(1) or keep_rows(*args)
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(3)) * 3
    for step in range(len(GENERATED)):
        if step in (2, 4):  # the first, then the middle sequence finished
            batch = batch[1:] if step == 2 else batch[:1] + batch[2:]
        rows = state.prepare(list(enumerate(batch)), V, torch.device("cpu"))
        out = logits[:len(batch)].clone()
        state.apply(out, rows)
        for row, seq in enumerate(batch):
            torch.testing.assert_close(out[row], reference_penalties(logits[row], seq.token_ids, len(PROMPT), params),
                                       rtol=0, atol=1e-6)
        sampled = [GENERATED[(step + row) % len(GENERATED)] for row in range(len(batch))]
        state.record(rows, torch.tensor(sampled))
        for seq, token in zip(batch, sampled):
            seq.append_token(token)
    assert len(carried) >= 2


def test_settings_of_a_batch_that_lost_rows_equal_freshly_built_ones():
    from nanovllm.sampling.batch import SamplingBatch
    params = [SamplingParams(top_k=5, repetition_penalty=1.2, logprobs=2), SamplingParams(temperature=0.5, top_k=3),
              SamplingParams(top_k=7, top_p=0.8, logprobs=1)]
    seqs, sampler, cpu = seqs_for(params), Sampler(), torch.device("cpu")
    sampler._batch(seqs, (0,), V, cpu)
    derived = sampler._batch([seqs[0], seqs[2]], (0,), V, cpu)
    built = SamplingBatch.build([seqs[0], seqs[2]], (0,), V, cpu)
    for name in ("temperature", "top_k", "top_p", "min_p"):
        assert torch.equal(getattr(derived.params, name), getattr(built.params, name)), name
    assert derived.penalized == built.penalized
    assert (derived.logprob_rows, derived.logprob_counts) == (built.logprob_rows, built.logprob_counts) == ([0, 1], [2, 1])
