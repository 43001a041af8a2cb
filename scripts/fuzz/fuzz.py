"""Randomized differential fuzzer for the engine's carry-over fast paths (CPU, a tiny random model).

    PYTHONPATH=.:scripts/fuzz python scripts/fuzz/fuzz.py KIND FIRST_SEED COUNT [TIME_BUDGET_S]

KIND: gen (fast vs forced-slow vs a big reference engine), stream (interleaved streams with one call
interrupted, against the same requests alone), tp (TP=2 fast vs TP=2 all-slow vs TP=1 fast). Fast and
forced-slow engines run the same batches and must agree exactly. Comparisons against a differently
batched engine ("big-reference", "alone") can also differ where float32 rounding, which depends on the
batch, flips a near-tie of this random model: read those mismatches before calling them bugs.
Failing workloads are saved as JSON under NANOVLLM_FUZZ_DIR (default /tmp/nanovllm-fuzz);
`fuzz.py replay-stream FILE` runs a saved stream workload again."""
import json
import os
import random
import sys
import time
import traceback

from fuzzlib import (WORK_DIR, COVER, compare_loose, diff_exact, diff_stream_runs, engine, force_slow, rand_call, rand_config,
                     rand_stream_workload, rand_style, run_generate_calls, run_streams, save, stream_as_outputs)

BIG = dict(max_num_seqs=256, num_kvcache_blocks=3000, max_num_batched_tokens=8192)


def report(kind, seed, what, details, wl):
    path = os.path.join(WORK_DIR, f"fail_{kind}_{seed}.json")
    save(path, wl)
    print(f"MISMATCH kind={kind} seed={seed} {what} (workload {path})", flush=True)
    for d in details[:8]:
        print("   ", d, flush=True)


def gen_iteration(seed):
    rng = random.Random(seed)
    style = rand_style(rng)
    cfg = rand_config(rng, 120, 60)
    calls = [rand_call(rng, style, cfg=cfg, max_steps=400 if i < 2 else 150)
             for i in range(rng.choice([1, 1, 2, 3, 5]))]
    wl = {"cfg": cfg, "calls": calls}
    fast = engine(cfg)
    a = run_generate_calls(fast, calls)
    pre = fast.scheduler.num_preemptions
    slow = force_slow(engine(cfg))
    b = run_generate_calls(slow, calls)
    bad = 0
    d = diff_exact(a, b)
    if d:
        report("gen", seed, "fast != slow", d, wl)
        bad += 1
    ref = engine(BIG | {"max_model_len": cfg["max_model_len"], "max_prompt_len": 0})
    c = run_generate_calls(ref, calls)
    d = compare_loose(a, c)
    if d:
        d2 = compare_loose(b, c)
        report("gen", seed, f"fast != big-reference (slow also differs from reference: {bool(d2)})", d, wl)
        bad += 1
    for llm in (fast, slow, ref):
        llm.exit()
    return bad, pre


def stream_iteration(seed, tp=False, wl=None):
    """wl: a saved stream workload to replay instead of drawing one from seed."""
    if wl is None:
        rng = random.Random(seed)
        style = rand_style(rng)
        cfg = rand_config(rng, 120, 60)
        wl = rand_stream_workload(rng, style, cfg) | {"cfg": cfg}
    cfg = wl["cfg"]
    bad = 0
    if tp:
        fast = engine(cfg, tp=2)
        slow = force_slow(engine(cfg, tp=2, slow_workers=True))
    else:
        fast = engine(cfg)
        slow = force_slow(engine(cfg))
    a = run_streams(fast, wl)
    pre = fast.scheduler.num_preemptions
    b = run_streams(slow, wl)
    d = diff_stream_runs(a, b)
    if d:
        report("tpstream" if tp else "stream", seed, "fast != slow", d, wl)
        bad += 1
    if a["leftover"] != [0, 0, 0]:
        report("tpstream" if tp else "stream", seed, f"engine not idle/free after: {a['leftover']}", [], wl)
        bad += 1
    fast.exit()
    slow.exit()
    # The continuing stream(s) against the same requests alone (a fresh one-rank engine, same config).
    alone = engine(cfg)
    for name in ("s1", "s2"):
        if name in a["interrupted"] or name + ":closed" in a["interrupted"]:
            continue
        ref = run_generate_calls(alone, [wl[name]])
        got = [stream_as_outputs(a[name], wl[name])]
        d = compare_loose(got, ref) if all(s is not None for r in got[0] for s in r) else ["missing samples"]
        if d:
            report("tpstream" if tp else "stream", seed, f"continuing stream {name} != alone "
                   f"(interrupted={a['interrupted']} fired={a['fired']})", d, wl)
            bad += 1
    if wl.get("after"):
        ref = run_generate_calls(alone, [wl["after"]])
        d = compare_loose([a["after"]], ref)
        if d:
            report("tpstream" if tp else "stream", seed, "generate after the streams != alone", d, wl)
            bad += 1
    alone.exit()
    return bad, pre, a["interrupted"], a["fired"]


def tp_gen_iteration(seed):
    rng = random.Random(seed)
    style = rand_style(rng)
    cfg = rand_config(rng, 120, 60)
    calls = [rand_call(rng, style, max_prompts=20, cfg=cfg, max_steps=200) for _ in range(rng.choice([1, 2]))]
    wl = {"cfg": cfg, "calls": calls}
    bad = 0
    fast = engine(cfg, tp=2)
    a = run_generate_calls(fast, calls)
    pre = fast.scheduler.num_preemptions
    fast.exit()
    slow = force_slow(engine(cfg, tp=2, slow_workers=True))
    b = run_generate_calls(slow, calls)
    slow.exit()
    d = diff_exact(a, b)
    if d:
        report("tpgen", seed, "tp2 fast != tp2 slow", d, wl)
        bad += 1
    one = engine(cfg)
    c = run_generate_calls(one, calls)
    one.exit()
    d = compare_loose(a, c)
    if d:
        report("tpgen", seed, f"tp2 fast != tp1 fast (tp2 slow also differs: {bool(compare_loose(b, c))})", d, wl)
        bad += 1
    return bad, pre


def main():
    import torch
    if sys.argv[1] == "replay-stream":  # fuzz.py replay-stream FILE: one saved stream workload again
        with open(sys.argv[2]) as f:
            print("mismatching:", stream_iteration(0, wl=json.load(f))[0])
        return
    if sys.argv[1] != "tp":
        torch.set_num_threads(1)  # two fuzz processes share this 2-core machine
    kind, first, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    budget = float(sys.argv[4]) if len(sys.argv) > 4 else 1e9
    start = time.time()
    done = bad_iters = errors = preempting = 0
    fired = Counter()
    for seed in range(first, first + count):
        if time.time() - start > budget:
            break
        try:
            if kind == "gen":
                bad, pre = gen_iteration(seed)
            elif kind == "stream":
                bad, pre, who, f = stream_iteration(seed)
                fired[f"{'+'.join(who) or 'none'}:{'prefill' if f and f[1] else 'decode' if f else '-'}"] += 1
            elif kind == "tp":
                if seed % 2:
                    bad, pre = tp_gen_iteration(seed)
                else:
                    bad, pre, who, f = stream_iteration(seed, tp=True)
                    fired[f"{'+'.join(who) or 'none'}:{'prefill' if f and f[1] else 'decode' if f else '-'}"] += 1
        except Exception:
            errors += 1
            print(f"ERROR kind={kind} seed={seed}\n{traceback.format_exc()}", flush=True)
            continue
        done += 1
        print(f"  seed={seed} bad={bad} preempt={pre} t={time.time() - start:.0f}s", flush=True)
        bad_iters += bool(bad)
        preempting += pre > 0
    print(f"SUMMARY kind={kind} seeds={first}..{seed} iterations={done} mismatching={bad_iters} errors={errors} "
          f"with_preemption={preempting} interrupts={dict(fired)} elapsed={time.time() - start:.0f}s", flush=True)
    print("COVERAGE", dict(COVER), flush=True)


from collections import Counter

if __name__ == "__main__":
    main()
