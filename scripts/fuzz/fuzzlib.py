"""Differential fuzzing helpers: random workloads, fast vs forced-slow engines, stream interrupts."""
import json
import math
import os
import signal
from collections import Counter

import torch

from nanovllm import LLM, SamplingParams
from nanovllm.engine.decode_inputs import DecodeInputs
from nanovllm.engine.model_runner import ModelRunner
from nanovllm.sampling.batch import SamplingBatch
from nanovllm.sampling.penalties import PenaltyState
from nanovllm.testing.checkpoints import make_random_checkpoint
from nanovllm.testing.tokenizer import train_tokenizer

# Failing workloads are saved here, and the tiny random model lives here (built on first use).
WORK_DIR = os.environ.get("NANOVLLM_FUZZ_DIR", "/tmp/nanovllm-fuzz")
MODEL = os.path.join(WORK_DIR, "tiny")
VOCAB = 512
FREQUENT = [93, 281, 260, 388, 81, 74, 269, 142, 304, 130, 311]

# ---- workers of a tensor-parallel engine: forced slow when the env var says so at spawn time ----
if os.environ.get("FUZZ_WORKER_SLOW") == "1":
    _orig_rws = ModelRunner.run_without_sampling

    def _slow_rws(self, seqs, is_prefill, draw=None):
        self.decode_inputs.sampled = None
        self.decode_inputs.seq_ids = None
        return _orig_rws(self, seqs, is_prefill, draw)

    ModelRunner.run_without_sampling = _slow_rws

# ---- coverage counters (rank 0 only) ----
COVER = Counter()


def _count(cls, name, key=None, when=lambda r: True):
    orig = getattr(cls, name)

    def wrapper(*a, **k):
        r = orig(*a, **k)
        if when(r):
            COVER[key or f"{cls.__name__}.{name}"] += 1
        return r

    setattr(cls, name, wrapper)


_count(DecodeInputs, "_keep_rows")
_count(DecodeInputs, "_advance")
_count(DecodeInputs, "_write")
_count(DecodeInputs, "_open_blocks")
_count(SamplingBatch, "keep_rows", "SamplingBatch.keep_rows->batch", lambda r: r is not None)
_count(PenaltyState, "_keep_rows")
_count(PenaltyState, "_carry_over", "PenaltyState._carry_over->rows", lambda r: r is not None)


def engine(cfg, tp=1, slow_workers=False):
    if tp > 1:
        os.environ["FUZZ_WORKER_SLOW"] = "1" if slow_workers else "0"
    cfg = {"max_model_len": 256} | {k: v for k, v in cfg.items() if k != "max_prompt_len"}
    if not os.path.exists(os.path.join(MODEL, "config.json")):
        make_random_checkpoint(MODEL, "tiny", dtype=torch.float32)
        train_tokenizer(MODEL)
    return LLM(MODEL, device="cpu", kvcache_block_size=16, enforce_eager=True, tensor_parallel_size=tp, **cfg)


def force_slow(llm):
    llm.async_scheduling = False  # each step waits for its tokens and is scheduled from them
    runner = llm.model_runner
    orig = runner.run

    def run(seqs, is_prefill):
        runner.decode_inputs.sampled = None
        runner.decode_inputs.seq_ids = None
        runner.sampler.last_batch = None
        runner.sampler.penalty_state.last_recorded = False
        return orig(seqs, is_prefill)

    runner.run = run
    return llm


# ---- random workloads (plain JSON-able dicts) ----
def rand_config(rng, max_prompt_len, max_tokens_hi):
    max_model_len = 128 if rng.random() < 0.15 else 256
    if max_model_len == 256 and rng.random() < 0.15:
        max_prompt_len = 250  # sequences that run into max_model_len
    need = -(-min(max_prompt_len + max_tokens_hi, max_model_len) // 16)
    return dict(max_prompt_len=min(max_prompt_len, max_model_len - 1), max_model_len=max_model_len, max_num_seqs=rng.choice([1, 2, 3, 4, 8, 16, 40, 64]),
                num_kvcache_blocks=rng.choice([need, need + 1, need + 3, need * 2, need * 4, 400]),
                max_num_batched_tokens=rng.choice([7, 16, 33, 64, 128, 256, 1024, 4096]))


def rand_params(rng, style):
    p = {}
    p["max_tokens"] = rng.randint(1, 60)
    if rng.random() >= style["seeded"]:
        p["temperature"] = 0.0
    else:
        p["temperature"] = rng.choice([0.8, 0.8, 1.3, 0.3])
        p["seed"] = rng.randrange(1 << 30)
    if rng.random() < style["filters"]:
        if rng.random() < 0.5:
            p["top_k"] = rng.choice([1, 2, 5, 20, 100, 600])
        if rng.random() < 0.5:
            p["top_p"] = rng.choice([0.3, 0.7, 0.9, 0.99])
        if rng.random() < 0.3:
            p["min_p"] = rng.choice([0.01, 0.1, 0.3])
    if rng.random() < style["penalties"]:
        if rng.random() < 0.6:
            p["repetition_penalty"] = rng.choice([0.7, 1.2, 1.5, 2.0])
        if rng.random() < 0.5:
            p["presence_penalty"] = rng.choice([-1.0, 0.5, 1.5, 2.0])
        if rng.random() < 0.5:
            p["frequency_penalty"] = rng.choice([-0.5, 0.5, 1.0, 2.0])
    if rng.random() < style["min_tokens"]:
        p["min_tokens"] = rng.randint(0, p["max_tokens"])
    if rng.random() < style["stop"]:
        p["stop_token_ids"] = rng.sample(FREQUENT, rng.randint(1, 3)) + [rng.randrange(VOCAB)]
    if rng.random() < style["stop"] * 0.4:
        p["stop"] = rng.sample(["{", "ou", "en", " la", "er", "He", "Un", "o{", "h"], rng.randint(1, 2))
        p["include_stop_str_in_output"] = rng.random() < 0.5
    if rng.random() < 0.2:
        p["ignore_eos"] = True
    if rng.random() < style["logprobs"]:
        p["logprobs"] = rng.choice([0, 1, 3, 5, 20])
    if rng.random() < style["n"]:
        p["n"] = rng.randint(2, 3)
    return p


def rand_prompts(rng, num, max_len):
    prompts = []
    prefixes = [[rng.randrange(VOCAB) for _ in range(rng.randint(8, max_len))] for _ in range(rng.randint(1, 3))]
    for _ in range(num):
        r = rng.random()
        if r < 0.35 and prompts and rng.random() < 0.3:
            prompts.append(list(rng.choice(prompts)))  # an exact duplicate
        elif r < 0.6:
            pre = rng.choice(prefixes)
            cut = rng.randint(1, len(pre))
            tail = [rng.randrange(VOCAB) for _ in range(rng.randint(0, 30))]
            prompts.append((pre[:cut] + tail)[:max_len])
        else:
            prompts.append([rng.randrange(VOCAB) for _ in range(rng.randint(1, max_len))])
    return prompts


def rand_style(rng):
    return {k: rng.choice([0.0, 0.3, 0.7, 1.0]) for k in ("filters", "penalties", "min_tokens", "stop", "logprobs")} | \
        {"n": rng.choice([0.0, 0.0, 0.2, 0.5]), "seeded": rng.choice([0.0, 0.0, 0.5, 1.0])}


def est_steps(call, cfg):
    width = min(cfg["max_num_seqs"], cfg["max_num_batched_tokens"])
    decode = sum(p.get("n", 1) * p["max_tokens"] for p in call["params"]) / width
    prefill = sum(len(p) for p in call["prompts"]) / cfg["max_num_batched_tokens"] + len(call["prompts"])
    return decode + prefill


def rand_call(rng, style, max_prompts=40, max_len=120, cfg=None, max_steps=500):
    if cfg is not None:
        max_len = cfg["max_prompt_len"]
    num = rng.randint(1, max_prompts)
    prompts = rand_prompts(rng, num, max_len)
    uniform = rng.random() < 0.2
    if uniform:
        params = [rand_params(rng, style)] * num
    else:
        params = [rand_params(rng, style) for _ in range(num)]
    call = {"prompts": prompts, "params": params}
    while cfg is not None and len(call["prompts"]) > 1 and est_steps(call, cfg) > max_steps:
        call = {"prompts": call["prompts"][:-1], "params": call["params"][:-1]}
    return call


def sps(params):
    return [SamplingParams(**p) for p in params]


# ---- running and comparing ----
def norm_output(out, exact=True):
    comps = []
    for c in out["outputs"]:
        comps.append({"token_ids": c["token_ids"], "finish_reason": c["finish_reason"],
                      "stop_reason": c["stop_reason"], "text": c["text"],
                      "num_cached_tokens": c["num_cached_tokens"] if exact else None,
                      "logprobs": [list(d.items()) for d in c["logprobs"]] if c["logprobs"] is not None else None})
    return comps


def run_generate_calls(llm, calls):
    return [[norm_output(o) for o in llm.generate(c["prompts"], sps(c["params"]), use_tqdm=False)] for c in calls]


def logprobs_close(a, b, tol=1e-3):
    if a is None or b is None:
        return a is b
    if len(a) != len(b):
        return False
    for da, db in zip(a, b):
        if [t for t, _ in da][:1] != [t for t, _ in db][:1]:
            return False
        mb = dict(db)
        for t, v in da:
            if t in mb and not (abs(v - mb[t]) <= tol or (math.isinf(v) and v == mb[t])):
                return False
    return True


def diff_exact(a, b, path="", limit=5):
    """Human-readable differences between two nested structures."""
    out = []

    def rec(x, y, p):
        if len(out) >= limit:
            return
        if type(x) != type(y):
            out.append(f"{p}: {x!r:.200} != {y!r:.200}")
        elif isinstance(x, dict):
            for k in x.keys() | y.keys():
                rec(x.get(k), y.get(k), f"{p}.{k}")
        elif isinstance(x, (list, tuple)):
            if len(x) != len(y) and not all(isinstance(v, (list, dict)) for v in x):
                out.append(f"{p}: len {len(x)} vs {len(y)}: {x!r:.300} != {y!r:.300}")
                return
            for i, (u, v) in enumerate(zip(x, y)):
                rec(u, v, f"{p}[{i}]")
            if len(x) != len(y):
                out.append(f"{p}: len {len(x)} vs {len(y)}")
        elif isinstance(x, float):
            # Asynchronous scheduling adds rows of finished sequences to some steps, and the batch
            # size changes the float rounding of the logits.
            if abs(x - y) > 1e-4:
                out.append(f"{p}: {x!r} != {y!r}")
        elif x != y:
            out.append(f"{p}: {x!r:.200} != {y!r:.200}")

    rec(a, b, path)
    return out


def diff_stream_runs(a, b):
    """Differences between two run_streams results of engines that may schedule differently (with and
    without asynchronous scheduling: a request that arrives while a step is queued ahead is prefilled
    one step later), so an interrupt can land at a different point of the interrupted call. Streams
    interrupted in either run must agree as prefixes (per sample, one's tokens start the other's);
    everything else exactly (floats within rounding), except the prefix-cache hits a request found,
    which depend on what other requests had computed when it was admitted."""
    out = []
    for name in ("s1", "s2", "mid"):
        cut = any(x == name or x == name + ":closed" for x in a["interrupted"] + b["interrupted"])
        if not cut:
            out += [d for d in diff_exact(a[name], b[name], f".{name}") if ".num_cached_tokens:" not in d]
            continue
        if name == "mid":
            continue
        for key in a[name].keys() | b[name].keys():
            x = (a[name].get(key) or {}).get("token_ids", [])
            y = (b[name].get(key) or {}).get("token_ids", [])
            if x[:len(y)] != y[:len(x)]:
                out.append(f".{name}.{key} (interrupted): {x} and {y} are not prefixes of one another")
    out += diff_exact(a["after"], b["after"], ".after") + diff_exact(a["leftover"], b["leftover"], ".leftover")
    return out


def compare_loose(a, b):
    """Token ids / finish reason exactly, logprobs within tolerance (different batch shapes)."""
    out = []
    for ci, (ca, cb) in enumerate(zip(a, b)):
        for oi, (oa, ob) in enumerate(zip(ca, cb)):
            for si, (sa, sb) in enumerate(zip(oa, ob)):
                where = f"call{ci}.req{oi}.sample{si}"
                for k in ("token_ids", "finish_reason", "stop_reason", "text"):
                    if sa[k] != sb[k]:
                        out.append(f"{where}.{k}: {sa[k]!r:.300} != {sb[k]!r:.300}")
                if not logprobs_close(sa["logprobs"], sb["logprobs"]):
                    out.append(f"{where}.logprobs not close")
    return out


# ---- streams with an interrupt ----
class Interrupter:
    """Interrupts one step, once: the first step numbered >= at_call run while `current` is `target` (and,
    if decode_only, a decode step), after it sampled and before its tokens are committed.

    One rank: a KeyboardInterrupt raised as the scheduler is about to commit the tokens; steps are
    counted by those commits, so engines with and without asynchronous scheduling are interrupted at
    the same step. Tensor parallelism: a SIGINT sent after rank 0's model call, which the pool defers
    until the step ends on every rank."""

    def __init__(self, llm, at_call, decode_only, target="s1"):
        self.calls = 0
        self.current = None
        self.target = target
        self.at_call = at_call
        self.fired = None
        if llm.workers is None:
            scheduler = llm.scheduler
            orig_postprocess = scheduler.postprocess

            def postprocess(seqs, *args):
                is_prefill = not all(seq.num_scheduled_tokens == 1 and seq.num_completion_tokens for seq in seqs)
                if self._fires(is_prefill, decode_only, len(seqs)):
                    raise KeyboardInterrupt
                return orig_postprocess(seqs, *args)

            scheduler.postprocess = postprocess
            return
        runner = llm.model_runner
        orig_run = runner.run

        def run(seqs, is_prefill):
            result = orig_run(seqs, is_prefill)
            if self._fires(is_prefill, decode_only, len(seqs)):
                os.kill(os.getpid(), signal.SIGINT)
            return result

        runner.run = run

    def _fires(self, is_prefill, decode_only, num_seqs) -> bool:
        self.calls += 1
        if self.fired is None and self.calls >= self.at_call and self.current == self.target \
                and not (decode_only and is_prefill):
            self.fired = (self.calls, is_prefill, num_seqs)
            return True
        return False


def collect(events, acc):
    for e in events:
        key = (e["index"], e["sample_index"])
        d = acc.setdefault(key, {"token_ids": [], "logprobs": None, "finish_reason": None, "stop_reason": None,
                                 "text": "", "finished": False})
        d["token_ids"] += e["token_ids"]
        if e["logprobs"] is not None:
            d["logprobs"] = (d["logprobs"] or []) + [list(x.items()) for x in e["logprobs"]]
        d["text"] += e["text"]
        if e["finished"]:
            d["finished"] = True
            d["finish_reason"], d["stop_reason"] = e["finish_reason"], e["stop_reason"]


def run_streams(llm, wl):
    """wl: {"s1": call, "s2": call, "schedule": [...], "at_call": k, "decode_only": b, "mid_generate": call|None,
    "mid_at": i, "after": call|None}. Returns a JSON-able result."""
    intr = Interrupter(llm, wl["at_call"], wl["decode_only"], wl.get("target", "s1"))
    gens = {"s1": llm.stream(wl["s1"]["prompts"], sps(wl["s1"]["params"])),
            "s2": llm.stream(wl["s2"]["prompts"], sps(wl["s2"]["params"]))}
    acc = {"s1": {}, "s2": {}}
    alive = {"s1": True, "s2": True}
    interrupted = []
    mid = None
    i = 0
    while alive["s1"] or alive["s2"]:
        pick = wl["schedule"][i % len(wl["schedule"])]
        if not alive[pick]:
            pick = "s2" if pick == "s1" else "s1"
        if wl.get("mid_generate") and i == wl["mid_at"] and mid is None:
            intr.current = "mid"
            try:
                mid = [norm_output(o) for o in llm.generate(wl["mid_generate"]["prompts"],
                                                            sps(wl["mid_generate"]["params"]), use_tqdm=False)]
            except KeyboardInterrupt:
                interrupted.append("mid")
                mid = "interrupted"
        if wl.get("close_at") is not None and i == wl["close_at"] and alive["s1"]:
            gens["s1"].close()  # a stream closed early: its requests are dropped between steps
            alive["s1"] = False
            interrupted.append("s1:closed")
            i += 1
            continue
        i += 1
        intr.current = pick
        try:
            collect([next(gens[pick])], acc[pick])
        except StopIteration:
            alive[pick] = False
        except KeyboardInterrupt:
            interrupted.append(pick)
            alive[pick] = False
    intr.current = "after"
    after = None
    if wl.get("after"):
        after = [norm_output(o) for o in llm.generate(wl["after"]["prompts"], sps(wl["after"]["params"]),
                                                      use_tqdm=False)]
    s = llm.scheduler
    leftover = (len(s.waiting), len(s.running), llm.block_manager.num_free_blocks - llm.block_manager.num_blocks)
    return {"s1": {repr(k): v for k, v in sorted(acc["s1"].items())},
            "s2": {repr(k): v for k, v in sorted(acc["s2"].items())},
            "interrupted": interrupted, "fired": list(intr.fired) if intr.fired else None, "mid": mid,
            "after": after, "leftover": list(leftover)}


def stream_as_outputs(res_stream, call):
    """The continuing stream's accumulated events in generate()'s normalized shape (for the alone check)."""
    out = []
    for i, p in enumerate(call["params"]):
        samples = []
        for j in range(p.get("n", 1)):
            d = res_stream.get(repr((i, j)))
            samples.append({"token_ids": d["token_ids"], "finish_reason": d["finish_reason"],
                            "stop_reason": d["stop_reason"], "text": d["text"], "num_cached_tokens": None,
                            "logprobs": d["logprobs"] if p.get("logprobs") is not None else None}
                           if d else None)
        out.append(samples)
    return out


def rand_stream_workload(rng, style, cfg):
    s1 = rand_call(rng, style, max_prompts=rng.choice([3, 10, 20]), cfg=cfg, max_steps=250)
    s2 = rand_call(rng, style, max_prompts=rng.choice([3, 10, 20]), cfg=cfg, max_steps=250)
    wl = {"s1": s1, "s2": s2,
          "schedule": [rng.choice(["s1", "s2"]) if rng.random() < 0.7 else "s1" for _ in range(rng.randint(1, 50))],
          "at_call": rng.randint(1, 40), "decode_only": rng.random() < 0.7,
          "mid_generate": rand_call(rng, style, max_prompts=5, cfg=cfg, max_steps=100) if rng.random() < 0.2 else None,
          "mid_at": rng.randint(0, 30),
          "after": rand_call(rng, style, max_prompts=8, cfg=cfg, max_steps=100) if rng.random() < 0.5 else None,
          "close_at": rng.randint(1, 25) if rng.random() < 0.25 else None}
    if wl["close_at"] is not None:
        wl["at_call"] = 10 ** 9
    if wl["mid_generate"] is not None and rng.random() < 0.4:
        wl["target"] = "mid"
        wl["at_call"] = rng.randint(1, 15)
    return wl


def save(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)


# ---- mutants, to check that the fuzzer notices bugs (FUZZ_MUTANT=A|B|C) ----
_MUT = os.environ.get("FUZZ_MUTANT", "")
if "A" in _MUT:  # decode inputs: no check that kept sequences grew by one token
    _orig_prepare = DecodeInputs.prepare

    def _prep(self, seqs, padded_rows, input_ids=None):
        if self.seq_ids is not None:
            by_id = {s.seq_id: len(s) for s in seqs}
            self.next_lengths = [by_id.get(i, -1) for i in self.seq_ids]
        return _orig_prepare(self, seqs, padded_rows, input_ids)

    DecodeInputs.prepare = _prep
if "B" in _MUT:  # penalties: no such check either
    _orig_pprep = PenaltyState.prepare

    def _pprep(self, penalized, vocab_size, device):
        if self.last_penalized is not None:
            by_id = {s.seq_id: len(s) for _, s in penalized}
            self.next_lengths = [by_id.get(s.seq_id, -1) for _, s in self.last_penalized]
        return _orig_pprep(self, penalized, vocab_size, device)

    PenaltyState.prepare = _pprep
if "C" in _MUT:  # sampling settings: logprob rows not renumbered when rows leave
    from dataclasses import replace as _replace
    _orig_keep = SamplingBatch.keep_rows

    def _keep(self, kept, device):
        b = _orig_keep(self, kept, device)
        if b is None:
            return b
        rows = [r for r in self.logprob_rows if r < len(kept)]
        return _replace(b, logprob_rows=rows, logprob_counts=self.logprob_counts[:len(rows)])

    SamplingBatch.keep_rows = _keep
