"""azr benchmarks: each subcommand runs our implementation side by side with its baseline in one process and
prints a markdown table; `--record` appends it to BENCHMARKS.md with the machine and date.

    python bench.py executor   # executions/s, p50/p95: executor vs `python -I -S -c` per task vs a bare fork floor
    python bench.py sampler    # Sampler vs transformers' generate: protocol, AZR replay, real weights, sm_90 build
    python bench.py kernel     # fwd+bwd time and memory: fused logprob kernel vs naive PyTorch (and Liger)
    python bench.py step       # one full AZR step split into generate / execute / train
    python bench.py gpu        # every CUDA path once against a reference (VERDICT lines), then its figures
"""
import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))
# upstream's full seed file beside the checkout where there is one, else the sample that travels in data/
SEED_FILE = next((p / "shared" / "data" / "3b_coder_seed_io.jsonl" for p in REPO.parents
                  if (p / "shared" / "data" / "3b_coder_seed_io.jsonl").is_file()), REPO / "data" / "sample_seed_io.jsonl")

import kernels  # noqa: E402
import model as M  # noqa: E402
from executor import Executor, parse_args, parse_value, values_equal  # noqa: E402


# --------------------------------------------------------------------------------------------------------------
# bench.py executor
# Executor benchmark (issues 2, 9): executions/s and p50/p95 latency on the seed programs, side by side with
# (a) a fresh `python -I -S -c` per task and (b) a bare fork+pipe floor, for 1 and N workers; per-task
# overhead on a trivial program (executor minus the floor, p50 and p95); and induction-shaped jobs (one
# program, 10 inputs) with and without per-program batching.
#
# All three do the same work per task: run the seed program, call f on the stored input, send back the repr,
# which the benchmark checks against the stored output (`ok` column). The floor is one `python -s -S` process
# per worker that forks per task; the child runs the program and writes the repr into a pipe; the parent
# reads it and reaps the child. No limits, no task dir, no sandbox, no framing, no exec of an interpreter:
# what any fork-per-task design pays at least. Its latency is timed inside that process (no client hop);
# the executor's is timed in the trainer, around `Executor.run`. The machine is shared, so every round
# runs all rows close together and the ratios are taken per round; the table shows medians over rounds.

_FLOOR = r"""
import json, os, sys, time
jobs = json.loads(sys.stdin.read())
times, reprs = [], []
t_all = time.perf_counter()
for program, inputs in jobs:
    t0 = time.perf_counter()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            g = {}
            exec(program + "\n_result = f(" + inputs + "\n)", g)
            os.write(w, repr(g["_result"]).encode()[:65536])
        finally:
            os._exit(0)
    os.close(w)
    out = b""
    while chunk := os.read(r, 65536):
        out += chunk
    os.close(r)
    os.waitpid(pid, 0)
    times.append(time.perf_counter() - t0)
    reprs.append(out.decode(errors="replace"))
print(json.dumps({"wall": time.perf_counter() - t_all, "times": times, "reprs": reprs}))
"""


def _matches(text, stored) -> bool:
    try:
        return values_equal(parse_value(text), parse_value(stored))
    except ValueError:
        return False


def _threads(call, jobs, workers):
    """Run `call(program, inputs, stored) -> ok` over jobs from `workers` threads: (wall s, task s, ok)."""
    times, oks, lock, pending = [], [0], threading.Lock(), iter(jobs)

    def drain():
        while True:
            with lock:
                job = next(pending, None)
            if job is None:
                return
            t0 = time.perf_counter()
            ok = call(*job)
            dt = time.perf_counter() - t0
            with lock:
                times.append(dt)
                oks[0] += ok
    t0 = time.perf_counter()
    threads = [threading.Thread(target=drain) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, times, oks[0]


def _python_c(program, inputs, stored):
    code = f"{program}\nprint(repr(f({inputs}\n)))"
    try:
        out = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, timeout=10)
    except subprocess.TimeoutExpired:
        return False
    lines = out.stdout.decode(errors="replace").splitlines()  # the program's own prints come first
    return out.returncode == 0 and bool(lines) and _matches(lines[-1], stored)


def _floor(jobs, workers):
    chunks = [jobs[i::workers] for i in range(workers)]
    procs = [subprocess.Popen([sys.executable, "-s", "-S", "-c", _FLOOR], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for _ in chunks]
    outs = [json.loads(p.communicate(json.dumps([job[:2] for job in c]))[0]) for p, c in zip(procs, chunks)]
    ok = sum(_matches(text, job[2]) for o, c in zip(outs, chunks) for text, job in zip(o["reprs"], c))
    return max(o["wall"] for o in outs), [t for o in outs for t in o["times"]], ok


def _row(name, workers, wall, times, ok, n):
    q = statistics.quantiles(times, n=20)
    return dict(backend=name, workers=workers, per_s=n / wall, p50=statistics.median(times) * 1e3,
                p95=q[18] * 1e3, ok=ok, n=n)


_TRIVIAL = [("def f(x):\n    return x + 1", str(i), str(i + 1)) for i in range(300)]
_INDUCTION = [(f"def f(x):\n    return [x, x * {k}]", [str(i) for i in range(10)]) for k in range(30)]


def _overhead(executor_cls, workers, jobs=_TRIVIAL) -> dict:
    """Per-task overhead on a trivial program: the executor's p50 and p95 (timed around `run`, in the trainer)
    minus the bare fork floor's, measured back to back. `executor_cls`: any executor with this API (a
    scratch script can pass another version's)."""
    with executor_cls(workers=workers) as ex:
        for program, inputs, _ in jobs[:20]:
            ex.run(program, inputs)  # warm-up

        def run(program, inputs, stored):
            r = ex.run(program, inputs)
            return r.status == "ok" and r.value == stored
        _, times, ok = _threads(run, jobs, workers)
    _floor(jobs[:20], workers)
    _, floor_times, _ = _floor(jobs, workers)
    p95 = lambda t: statistics.quantiles(t, n=20)[18] * 1e3  # noqa: E731
    return dict(p50=(statistics.median(times) - statistics.median(floor_times)) * 1e3,
                p95=p95(times) - p95(floor_times), ok=ok, n=len(jobs))


def _induction(ex) -> dict:
    """Induction-shaped jobs, programs/s: each program's 10 inputs in one task child (batched) vs one task
    per input, and batched with the determinism check (as `azr.validate_proposals` runs them: each `ok` input
    again alone); `ok`: all three give the same, correct results."""
    t0 = time.perf_counter()
    batched = ex.run_batch(_INDUCTION)
    t1 = time.perf_counter()
    single = ex.run_batch([(p, i) for p, xs in _INDUCTION for i in xs])
    t2 = time.perf_counter()
    checked = ex.run_batch(_INDUCTION, check_determinism=True)
    t3 = time.perf_counter()
    flat = [r for rs in batched for r in rs]
    ok = flat == single and checked == batched and all(
        r.value == repr([int(i), int(i) * k]) for k, (_, xs) in enumerate(_INDUCTION) for i, r in zip(xs, batched[k]))
    return dict(batched=len(_INDUCTION) / (t1 - t0), single=len(_INDUCTION) / (t2 - t1),
                checked=len(_INDUCTION) / (t3 - t2), ok=ok)


def _round(jobs, worker_counts, repeat):
    rows, extra = [], {}
    for workers in worker_counts:
        with Executor(workers=workers) as ex:
            layers = ", ".join(ex.layers) or "none"
            for program, inputs, _ in jobs[:5]:
                ex.run(program, inputs)  # warm-up

            def run(program, inputs, stored):
                r = ex.run(program, inputs)
                return r.status == "ok" and _matches(r.value, stored)
            rows.append(_row("executor (hardened)", workers, *_threads(run, jobs * repeat, workers), len(jobs) * repeat))
            ex.run_batch(_INDUCTION[:2], check_determinism=True)  # warm-up, the determinism zygote too
            extra[workers] = _induction(ex)
        extra[workers].update({"over_" + k: v for k, v in _overhead(Executor, workers).items()})
        _threads(_python_c, jobs[:5], workers)  # warm-up
        rows.append(_row("python -I -S -c", workers, *_threads(_python_c, jobs, workers), len(jobs)))
        _floor(jobs[:5], workers)  # warm-up
        rows.append(_row("bare fork+pipe floor", workers, *_floor(jobs * repeat, workers), len(jobs) * repeat))
    return rows, extra, layers


def bench_executor(argv: list[str]) -> str:
    ap = argparse.ArgumentParser(prog="bench.py executor", description=__doc__)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="N for the N-worker rows")
    ap.add_argument("--repeat", type=int, default=2, help="passes over the seed programs per round, executor and floor")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; the table shows the median of each cell")
    args = ap.parse_args(argv)
    jobs = []
    for line in SEED_FILE.read_text().splitlines():
        d = json.loads(line)
        try:
            parse_args(d["input"])
        except ValueError:
            continue  # the executor would refuse it before running: not a fair timing for either side
        jobs.append((d["snippet"], d["input"], d["output"]))
    worker_counts = sorted({1, args.workers})
    rounds, extras, loads = [], [], [os.getloadavg()[0]]
    for _ in range(args.rounds):
        rows, extra, layers = _round(jobs, worker_counts, args.repeat)
        rounds.append({(r["backend"], r["workers"]): r for r in rows})
        extras.append(extra)
        loads.append(os.getloadavg()[0])
    med = lambda key, field: statistics.median(r[key][field] for r in rounds)  # noqa: E731
    head = "| backend | workers | exec/s | p50 ms | p95 ms | ok/n |\n|---|---|---|---|---|---|\n"
    table = head + "".join(
        f"| {name} | {w} | {med((name, w), 'per_s'):.0f} | {med((name, w), 'p50'):.2f} | {med((name, w), 'p95'):.2f} "
        f"| {rounds[0][name, w]['ok']}/{rounds[0][name, w]['n']} |\n"
        for w in worker_counts for name in ("executor (hardened)", "python -I -S -c", "bare fork+pipe floor"))
    ratio = lambda w, field, a, b: [r[a, w][field] / r[b, w][field] for r in rounds]  # noqa: E731
    lines = ""
    for w in worker_counts:
        tput = ratio(w, "per_s", "executor (hardened)", "python -I -S -c")
        p50 = ratio(w, "p50", "executor (hardened)", "bare fork+pipe floor")
        lines += (f"- {w} worker(s): hardened throughput = {statistics.median(tput):.1f}x `python -I -S -c` "
                  f"(rounds: {', '.join(f'{x:.1f}' for x in tput)}; target >= 10x); hardened p50 = "
                  f"{statistics.median(p50):.1f}x the fork floor (rounds: {', '.join(f'{x:.1f}' for x in p50)}; "
                  f"target <= 3x)\n")
    emed = lambda w, k: statistics.median(e[w][k] for e in extras)  # noqa: E731
    table2 = ("| workers | overhead p50 ms | overhead p95 ms | induction programs/s, batched | one task per input "
              "| batching speedup | batched + determinism check | ok |\n|---|---|---|---|---|---|---|---|\n" + "".join(
                  f"| {w} | {emed(w, 'over_p50'):.2f} | {emed(w, 'over_p95'):.2f} | {emed(w, 'batched'):.1f} "
                  f"| {emed(w, 'single'):.1f} | {statistics.median(e[w]['batched'] / e[w]['single'] for e in extras):.1f}x "
                  f"| {emed(w, 'checked'):.1f} "
                  f"| {all(e[w]['ok'] and e[w]['over_ok'] == e[w]['over_n'] for e in extras)} |\n"
                  for w in worker_counts))
    md = (f"### Executor ({datetime.date.today()}, {os.cpu_count()}-core {platform.machine()} "
          f"{platform.system()} {platform.release()}, Python {platform.python_version()}, layers: {layers})\n\n"
          f"{len(jobs)} seed programs from {SEED_FILE.name} (inputs that parse); per round {args.repeat} "
          f"passes for the executor and the floor, 1 for `python -I -S -c`; median of {args.rounds} rounds. "
          f"`ok`: the repr matches the stored output (first round). 1-minute load average before and after "
          f"each round: {', '.join(f'{x:.2f}' for x in loads)}.\n\n{table}\n{lines}\n"
          f"Per-task overhead: {len(_TRIVIAL)} runs of a trivial `f`, the executor's latency minus the fork "
          f"floor's (p50, p95). Induction-shaped: {len(_INDUCTION)} programs x 10 inputs, as "
          f"`run_batch([(program, [10 inputs])])` vs `run_batch` of one job per input, and the batched form with "
          f"`check_determinism=True` (each input runs again alone). Medians of the rounds.\n\n"
          f"{table2}")
    print(md)
    return md



# --------------------------------------------------------------------------------------------------------------
# bench.py sampler
# bench sampler (issues 3, 10): generated tokens/s of model.Sampler vs transformers' generate on the same weights,
# prompts and settings, in one run. protocol: nano-vllm's (CUDA: Qwen2.5-3B-shaped random bf16, 256 prompts of
# 100-1,024 random tokens, 100-1,024 new tokens each, T=0.6, no stop; CPU: `tiny` at small sizes) and batch-1
# greedy decode with the memory bandwidth it achieves (gpt-fast's metric). replay: the AZR-shaped workload (64
# prompts, n=8, long-tailed responses up to 8,096 tokens) with the sampler's counters (keys read / needed in decode
# attention, decoded rows / running sequences, peak concurrency for a fixed KV budget against the old slot-major
# sizing at the paper's lengths). real: the replay scaled down (16 prompts, n=4, responses up to 256) on real
# weights (--model or AZR_TEST_MODEL). sm90: the paged-decode kernels compiled for sm_90 without a GPU.

PEAK_BANDWIDTH = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100-SXM4-80GB": 2.04e12,
                  "A100-PCIE-40GB": 1.56e12, "A100": 1.94e12, "L40S": 0.864e12}


def qwen25_3b_config() -> M.ModelConfig:
    return M.ModelConfig(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_layers=36,
                         num_heads=16, num_kv_heads=2, head_dim=128, rope_theta=1e6, qkv_bias=True,
                         tie_word_embeddings=True, max_position_embeddings=32768, eos_token_id=151643)


def qwen25_05b_config() -> M.ModelConfig:
    """Qwen2.5-0.5B's shape for a step with the byte tokenizer (its EOS id 256), on random weights."""
    return M.ModelConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                         num_kv_heads=2, head_dim=64, rope_theta=1e6, qkv_bias=True, tie_word_embeddings=True,
                         eos_token_id=256)


def random_model(config, device, dtype, seed=0, std=0.02):
    """Random weights made on the device itself (no CPU copy of a 3B model). std 0.02 is a real model's scale; a
    numerical check wants larger (0.05-0.1), or attention is too flat to show an indexing bug."""
    model = M.empty_model(config, device, dtype)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0, std, generator=g)
    return model.eval()


def hf_twin(model):
    """transformers' own model holding a copy of the same weights."""
    from transformers import AutoModelForCausalLM
    w = model.embed_tokens.weight
    with torch.device(w.device):
        hf = AutoModelForCausalLM.from_config(model.config.to_hf(), dtype=w.dtype)
    state = {(k if k == "lm_head.weight" else "model." + k): v for k, v in model.state_dict().items()}
    hf.load_state_dict(state, strict=False)
    hf.generation_config.eos_token_id = None  # the protocol ignores EOS
    return hf.eval()


def release_memory():
    """Call after `del` of a transformers model: it sits in reference cycles, so without a collection its weights
    stay allocated, and a Sampler made next would size its pool around them."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def pool_gib(config, dtype, blocks) -> float:
    """kv_cache_gib that gives a Sampler exactly this many blocks."""
    return blocks * M.BLOCK_SIZE * M.kv_bytes_per_token(config, dtype) / 2 ** 30


def run_ours(sampler, prompts, max_new, temperature, n=1):
    """Seconds, generated tokens and the counters of one call on a kept Sampler, as azr keeps one: graphs captured
    by earlier calls are reused, new buckets are captured inside the timing."""
    sync(sampler.device)
    t = time.perf_counter()
    out = sampler.generate(prompts, n=n, max_new_tokens=max_new, temperature=temperature, seed=0)
    sync(sampler.device)
    return time.perf_counter() - t, sum(len(s.tokens) for s in out), dict(sampler.stats)


def run_hf(hf, prompts, max_new, temperature, batch, n=1):
    """Left-padded batches of `batch` prompts with n return sequences each (max_new: one per sample); transformers
    has one max_new_tokens per batch, so its rows run to the batch's longest and only the requested tokens count.
    Also returns the prompt tokens it prefills (padding and the n copies included)."""
    device, t, useful, prefilled = hf.device, 0.0, 0, 0
    for i in range(0, len(prompts), batch):
        chunk, limits = prompts[i:i + batch], max_new[i * n:(i + batch) * n]
        width = max(map(len, chunk))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        sample = dict(do_sample=True, temperature=temperature, top_k=None, top_p=1.0) if temperature else \
            dict(do_sample=False)
        sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            hf.generate(ids, attention_mask=mask, max_new_tokens=max(limits), min_new_tokens=max(limits),
                        num_return_sequences=n, pad_token_id=0, **sample)
        sync(device)
        t += time.perf_counter() - t0
        useful += sum(limits)
        prefilled += width * len(chunk) * n
    return t, useful, prefilled


def protocol(n_prompts, prompt_len, new_len, vocab, seed=0):
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(*prompt_len))] for _ in range(n_prompts)]
    return prompts, [rng.randint(*new_len) for _ in range(n_prompts)]


# AZR-shaped replay: prompts of 300-3,000 tokens (uniform), n samples each, response lengths log-normal with median
# 700 and sigma 1 (mean ~1,150; 1.4% reach the cap), as the long tail of reasoning responses; the scaled-down
# replay multiplies the lengths by cap / 8,096 (same shape). Lengths are per sample (max_new_tokens, no stop).
REPLAY_MEDIAN, REPLAY_SIGMA, REPLAY_CAP = 700, 1.0, 8096
PAPER_SLOT = 6144 + 8096 + M.SYNC_EVERY  # positions the old slot-major sampler reserved per sequence


def replay(n_prompts, n, cap, vocab, seed=0):
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(300, 3000))] for _ in range(n_prompts)]
    scale = cap / REPLAY_CAP
    lengths = [max(1, min(cap, round(scale * rng.lognormvariate(math.log(REPLAY_MEDIAN), REPLAY_SIGMA))))
               for _ in range(n_prompts * n)]
    return prompts, lengths


def sampler_logprob_error(sampler, prompts, n, max_new, **kw):
    """(mean, max) |logprob - full forward| over every token of one Sampler call at T=1, and its counters: the check
    that decoded samples (graphs on CUDA, refills, bucket changes, preemption in a small pool, n > 1 sharing
    blocks) match a plain causal forward of prompt + sample. bench.py gpu calls it."""
    model, errors = sampler.model, []
    samples = sampler.generate(prompts, n=n, max_new_tokens=max_new, temperature=1.0, seed=0, **kw)
    with torch.inference_mode():
        for k, s in enumerate(samples):
            prompt = prompts[k // n]
            logits = model.lm_head(model(torch.tensor([prompt + s.tokens], device=sampler.device)))
            ref = logits[0, len(prompt) - 1:-1].double().log_softmax(-1).cpu()[torch.arange(len(s.tokens)), s.tokens]
            errors.append((ref - torch.tensor(s.logprobs, dtype=torch.double)).abs())
    errors = torch.cat(errors)
    return errors.mean().item(), errors.max().item(), dict(sampler.stats)


def best_of(repeats, fn):
    return min((fn() for _ in range(repeats)), key=lambda r: r[0])


def decode_rate(fn, short, long, repeats):
    """Seconds per token of steady decode: the difference of two runs cancels prefill (graphs are captured by
    the warm-up)."""
    (t1, *_), (t2, *_) = best_of(repeats, lambda: fn(short)), best_of(repeats, lambda: fn(long))
    return (t2 - t1) / (long - short)


def batch1_decode(model, prompt, repeats):
    """Batch-1 greedy decode on a Sampler of its own: seconds per token (graphs captured by a warm-up run), and
    the bytes one step reads: the weights (of an untied embedding only the one row) and the KV at the mean
    context of the timed runs, 805 tokens."""
    dtype = model.embed_tokens.weight.dtype
    one = M.Sampler(model, kv_cache_gib=pool_gib(model.config, dtype, 8), max_batch_size=1)
    run_ours(one, prompt, [1000], 0.0)  # warm-up: every graph bucket of the timed runs
    spt = decode_rate(lambda m: run_ours(one, prompt, [m], 0.0), 600, 1000, repeats)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights counted once
    if not model.config.tie_word_embeddings:
        weights -= model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()
    return spt, weights + M.kv_bytes_per_token(model.config, dtype) * 805


def throughput_table(runs):
    """runs: (label, seconds, tokens) with ours first; tokens/s and the ratio of ours to each other engine."""
    rows = ["| engine | generated tokens | seconds | tokens/s |", "|---|---|---|---|"]
    rows += [f"| {label} | {tok} | {t:.2f} | {tok / t:.0f} |" for label, t, tok in runs]
    (_, t0, n0), *others = runs
    rows += [""] + [f"**ratio: {(n0 / t0) / (tok / t):.2f}x** the tokens/s of {label}"
                    for label, t, tok in others]
    return rows


def schedule_table(results):
    """results: (label, counters, seconds, tokens) of replay runs of our sampler."""
    rows = ["| run | tokens/s | keys read / needed | decoded rows / running | CUDA-graph rows / running | peak "
            "running | preemptions | prefill tokens | graphs captured |", "|---|---|---|---|---|---|---|---|---|"]
    for label, st, t, tok in results:
        rows.append(f"| {label} | {tok / t:.0f} | {st['keys_read'] / st['keys_needed']:.3f} | "
                    f"{st['decoded_rows'] / st['running_rows']:.3f} | {st['graph_rows'] / st['running_rows']:.3f} | "
                    f"{st['peak_running']} | {st['preemptions']} | {st['prefill_tokens']} | {st['graphs_captured']} |")
    return rows


def bench_replay(model, dtype, n_prompts, n, cap, budgets_gib, hf_prompts, hf_batch, vocab):
    """The replay on our sampler at each KV budget (GiB of Qwen2.5-3B-sized KV: 36 KiB per token, so that the
    old sampler's slot count at the paper's lengths applies), and on transformers (a twin made here, and freed
    before our default pool is sized) for its first hf_prompts."""
    prompts, lengths = replay(n_prompts, n, cap, vocab)
    c, q3b = model.config, M.kv_bytes_per_token(qwen25_3b_config(), torch.bfloat16)
    lines = [f"{n_prompts} prompts of 300-3000 tokens, n={n}, response lengths log-normal (median "
             f"{REPLAY_MEDIAN * cap / REPLAY_CAP:.0f}, sigma {REPLAY_SIGMA}) capped at {cap}: mean "
             f"{statistics.mean(lengths):.0f}, max {max(lengths)}, {sum(x == cap for x in lengths)} at the cap; "
             f"T=1.0, no stop", ""]
    # transformers first: on CUDA our default pool takes the memory that is free when it is made
    hf = hf_twin(model)
    t_hf, tok_hf, prefilled = run_hf(hf, prompts[:hf_prompts], lengths[:hf_prompts * n], 1.0, hf_batch, n)
    del hf
    release_memory()
    results, budget_rows = [], []
    for gib in budgets_gib:
        blocks = int(gib * 2 ** 30 // (M.BLOCK_SIZE * q3b)) if gib else None
        sampler = M.Sampler(model, kv_cache_gib=pool_gib(c, dtype, blocks) if blocks else None)
        run_ours(sampler, prompts[:2], [8] * 4, 1.0, n=2)  # warm-up: kernels, allocator, the smallest graphs
        t, tok, st = run_ours(sampler, prompts, lengths, 1.0, n=n)
        label = f"{gib} GiB (3B-equivalent), {st['num_blocks']} blocks" if gib else \
            f"default pool, {st['num_blocks']} blocks"
        results.append((label, st, t, tok))
        if gib:
            slots = int(gib * 2 ** 30 // (PAPER_SLOT * q3b))
            budget_rows.append(f"| {gib} GiB | {slots} | {st['peak_running']} | {st['peak_running'] / slots:.1f}x | "
                               f"{st['preemptions']} |")
        del sampler
    lines += schedule_table(results)
    if budget_rows:
        lines += ["", f"Peak concurrency for a fixed KV budget (Qwen2.5-3B: {q3b // 1024} KiB per token): the old "
                  f"slot-major sampler reserved prompt 6,144 + response 8,096 positions per sequence "
                  f"({PAPER_SLOT * q3b / 2 ** 20:.0f} MiB); paged, as measured on the replay (at most "
                  f"{min(n_prompts * n, M.MAX_BATCH)} sequences exist):", "",
                  "| KV budget | slot-major slots | paged peak running | ratio | preemptions |",
                  "|---|---|---|---|---|"]
        lines += budget_rows
    label, st, t, tok = results[0]
    lines += ["", *throughput_table([(f"Sampler ({label}), all {n_prompts} prompts", t, tok),
                                     (f"transformers generate (first {hf_prompts} prompts, batches of {hf_batch} "
                                      f"x n={n}, left-padded)", t_hf, tok_hf)]),
              f"\nprompt tokens prefilled for the first {hf_prompts} prompts: transformers {prefilled}, ours "
              f"{sum(len(p) for p in prompts[:hf_prompts])} (each prompt once for its n samples)"]
    return lines


def sm90_build(shapes):
    """Compile the paged-decode kernels ahead of time for sm_90 (no GPU needed): shared memory, registers and
    spills per dtype and shape, as ptxas reports them."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from kernels import paged_attention as PA
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"

    def build(fn, consts, dtypes, warps, stages):
        names = list(fn.arg_names)
        sig = {a: "constexpr" if a in consts else dtypes.get(a, "i32" if a.startswith("stride") else "fp32")
               for a in names}
        attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in names if a.startswith("stride") or "ptr" in a}
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            usage = subprocess.run([str(bin_dir / "cuobjdump"), "--dump-resource-usage", f.name],
                                   capture_output=True, text=True).stdout
        regs, stack = (int(usage.split(f"{key}:")[1].split()[0]) for key in ("REG", "STACK"))
        return k.metadata.shared, regs, stack, "mma" in k.asm["ttgir"], "async_copy" in k.asm["ttgir"]

    rows = [f"triton {triton.__version__}, target sm_90, num_warps 4", "",
            "| kernel | dtype | heads / kv heads | head_dim | shared KiB | registers | spill (stack) bytes | "
            "tensor cores (mma) | cp.async |", "|---|---|---|---|---|---|---|---|---|"]
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float16, "fp16"), (torch.float32, "fp32")):
        for heads, kvh, dim in shapes:
            c = PA.launch_constants(heads, dim, kvh, M.BLOCK_SIZE, dtype)
            elem = {"q_ptr": f"*{name}", "k_ptr": f"*{name}", "v_ptr": f"*{name}", "table_ptr": "*i32",
                    "len_ptr": "*i32", "o_ptr": "*fp32", "ml_ptr": "*fp32"}
            split = build(PA._split_kernel, dict(c, UPCAST=False, PRECISION="ieee" if name == "fp32" else "tf32"),
                          elem, 4, PA.NUM_STAGES)
            merge = build(PA._merge_kernel, {k: c[k] for k in ("G", "BLOCK_G", "D", "BLOCK_D", "SPLIT")},
                          {"o_ptr": "*fp32", "ml_ptr": "*fp32", "len_ptr": "*i32", "out_ptr": f"*{name}"}, 4, 1)
            for kname, (smem, regs, stack, mma, cp) in (("split", split), ("merge", merge)):
                rows.append(f"| {kname} | {name} | {heads}/{kvh} | {dim} | {smem / 1024:.1f} | {regs} | {stack} | "
                            f"{'yes' if mma else 'no'} | {'yes' if cp else 'no'} |")
    return rows


def bench_sampler(argv: list[str]) -> str:
    ap = argparse.ArgumentParser(prog="bench.py sampler", description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--hf-batch", type=int, default=64, help="prompts per transformers generate call (protocol)")
    ap.add_argument("--model", default=os.environ.get("AZR_TEST_MODEL", ""),
                    help="local Hugging Face directory for the scaled-down replay with real weights (CPU)")
    ap.add_argument("--only", default="protocol,replay,real",
                    help="comma list of parts: protocol, replay, real, sm90 (the ahead-of-time kernel build)")
    args = ap.parse_args(argv)
    device, parts = torch.device(args.device), set(args.only.split(","))
    cuda, lines = device.type == "cuda", []
    name = torch.cuda.get_device_name(device) if cuda else f"CPU, 1 thread, load {os.getloadavg()[0]:.2f}"
    if not cuda:
        torch.set_num_threads(1)  # the shared 2-core VMs make multi-threaded timings of tiny ops erratic
    if "protocol" in parts:
        repeats = 1 if cuda else 3
        if cuda:  # nano-vllm's protocol
            model = random_model(qwen25_3b_config(), device, torch.bfloat16)
            prompts, max_new = protocol(256, (100, 1024), (100, 1024), 10000)
            title = "Qwen2.5-3B-shaped random bf16, 256 prompts of 100-1024 tokens, 100-1024 new tokens, T=0.6"
        else:
            model, _ = M.load_model("tiny")
            prompts, max_new = protocol(32, (16, 64), (16, 64), 257)
            title = "tiny (hidden 64, 2 layers), fp32, 32 prompts of 16-64 tokens, 16-64 new tokens, T=0.6"
        hf, prompt = hf_twin(model), [prompts[0][:5]]  # batch 1: greedy from a 5-token prompt, as gpt-fast
        t_hf, n_hf, _ = best_of(repeats, lambda: run_hf(hf, prompts, max_new, 0.6, args.hf_batch))
        theirs = decode_rate(lambda m: run_hf(hf, prompt, [m], 0.0, 1), 600, 1000, repeats)
        del hf  # before our default pool takes the free memory
        release_memory()
        sampler = M.Sampler(model)
        run_ours(sampler, prompts, max_new, 0.6)  # warm-up: kernels and every graph bucket (nano-vllm excludes capture)
        t_ours, n_ours, _ = best_of(repeats, lambda: run_ours(sampler, prompts, max_new, 0.6))
        assert n_ours == n_hf == sum(max_new)  # no stop: both produce exactly the requested tokens
        lines += [f"### sampler throughput, {name}, {time.strftime('%Y-%m-%d')}", "", title, "",
                  *throughput_table([("Sampler.generate (graphs captured by a warm-up call)", t_ours, n_ours),
                                     (f"transformers generate (batches of {args.hf_batch})", t_hf, n_hf)]), ""]
        del sampler
        ours, step_bytes = batch1_decode(model, prompt, repeats)
        peak = next((v for k, v in PEAK_BANDWIDTH.items() if k in name), None) if cuda else None
        lines += ["| batch-1 decode | tokens/s | achieved bandwidth | of peak |", "|---|---|---|---|"]
        for label, spt in (("Sampler.generate", ours), ("transformers generate", theirs)):
            bw = step_bytes / spt
            lines.append(f"| {label} | {1 / spt:.0f} | {bw / 1e9:.3g} GB/s | {f'{bw / peak:.0%}' if peak else 'n/a'} |")
        lines += [f"\nbatch-1 ratio: {theirs / ours:.1f}x; bytes per step = weights + KV at the mean context", ""]
        del model
    if "replay" in parts:  # full size: 64 prompts, n=8, up to 8,096 tokens; pools in GiB of 3B-sized KV (0: default)
        if cuda:
            model = random_model(qwen25_3b_config(), device, torch.bfloat16)
            title, budgets, hf_prompts = "Qwen2.5-3B-shaped random bf16", [0, 4, 16], 8
        else:  # one layer, one kv head: the schedule is the model's, the KV traffic of a CPU run stays small
            config = M.ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=2,
                                   num_kv_heads=1, head_dim=32, rope_theta=1e6, qkv_bias=True,
                                   tie_word_embeddings=True)
            model = random_model(config, device, torch.float32)
            title, budgets, hf_prompts = "small random model (1 layer, 2 heads, 1 kv head, fp32)", [4, 16], 4
        lines += [f"### AZR replay, {title}, {name}, {time.strftime('%Y-%m-%d')}", "",
                  *bench_replay(model, model.embed_tokens.weight.dtype, 64, 8, REPLAY_CAP,
                                budgets, hf_prompts, 4, model.config.vocab_size), ""]
        del model
    if "real" in parts and not cuda and args.model:  # scaled down, real weights (bf16: AMX makes CPU bf16 4x fp32)
        model, tok = M.load_model(args.model, dtype=torch.bfloat16)
        lines += [f"### AZR replay scaled down, {Path(args.model).name} (bf16), {name}, {time.strftime('%Y-%m-%d')}",
                  "", *bench_replay(model.eval(), torch.bfloat16, 16, 4, 256, [0], 16, 4, len(tok)),
                  ""]
        del model
    if "sm90" in parts:
        lines += ["### paged-decode kernels built for sm_90 (no GPU: triton.compile + cuobjdump)", "",
                  *sm90_build([(16, 2, 128), (14, 2, 64), (2, 2, 128)]), ""]
    report = "\n".join(lines)
    print(report)
    return report


# --------------------------------------------------------------------------------------------------------------
# bench.py kernel
# bench.py kernel: forward+backward of the fused LM head -> logprob + entropy (kernels.linear_logprobs) side by
# side with naive PyTorch (bf16 logits, fp32 log_softmax, gather, entropy) and, where importable, Liger-Kernel's
# fused linear cross entropy and torch's linear_cross_entropy (both: summed CE only, no entropy). TFLOP/s count the
# FLOPs each one executes: 8*N*d*V for ours (forward, logit recompute, d_hidden, d_weight), 6*N*d*V for the others
# (they keep or chunk the logits instead of recomputing them), against a measured bf16 matmul peak.
#
# Needs CUDA for the real figures. On the CPU it times the chunked reference (linear_logprobs' CPU path) against
# naive PyTorch at small N in fp32, and says that memory figures need CUDA.

def _naive(hidden, weight, targets):
    logp = torch.log_softmax((hidden @ weight.T).float(), dim=-1)
    return logp.gather(-1, targets[:, None])[:, 0], -(logp.exp() * logp).sum(-1)


def _liger():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    loss_fn = LigerFusedLinearCrossEntropyLoss(reduction="sum")

    def liger(hidden, weight, targets):
        out = loss_fn(weight, hidden, targets)
        return (out[0] if isinstance(out, tuple) else out,)
    return liger


def _torch_linear_ce():
    if not hasattr(torch.nn.functional, "linear_cross_entropy"):  # torch >= 2.13
        return None
    return lambda hidden, weight, targets: (
        torch.nn.functional.linear_cross_entropy(hidden, weight, targets, reduction="sum"),)


def _step(fn, hidden, weight, targets, g_logprobs, g_entropy):
    hidden.grad = weight.grad = None
    outs = fn(hidden, weight, targets)
    loss = outs[0] if len(outs) == 1 else (g_logprobs * outs[0] + g_entropy * outs[1]).sum()
    loss.backward()


def _time(fn, args, repeats, cuda):
    _step(fn, *args)  # warm-up: autotuning, allocator
    if not cuda:
        start = time.perf_counter()
        for _ in range(repeats):
            _step(fn, *args)
        return (time.perf_counter() - start) / repeats * 1e3, None
    args[0].grad = args[1].grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        _step(fn, *args)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats, (torch.cuda.max_memory_allocated() - base) / 2**20


def _matmul_peak_tflops(n=8192, repeats=20):
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (start.elapsed_time(end) * 1e-3) / 1e12


def bench_kernel(argv):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="bench.py kernel", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[4096, 16384, 32768] if cuda else [256])
    p.add_argument("--d", type=int, default=2048 if cuda else 256)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--repeats", type=int, default=5 if cuda else 1)
    args = p.parse_args(argv)
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    impls = {"fused (ours)": kernels.linear_logprobs, "naive": _naive, "liger FLCE (CE only)": _liger(),
             "torch linear_cross_entropy (CE only)": _torch_linear_ce()}
    impls = {name: fn for name, fn in impls.items() if fn is not None}
    if cuda:
        peak = _matmul_peak_tflops()
        where = f"{torch.cuda.get_device_name()}, bf16, measured bf16 matmul peak {peak:.0f} TFLOP/s"
    else:
        impls = {name: impls[name] for name in ("fused (ours)", "naive")}  # fused = the chunked reference on CPU
        where = "CPU, fp32: 'fused' is the chunked PyTorch reference; memory figures need CUDA"
    print(f"# bench kernel: d={args.d}, V={args.vocab}, {where}")
    rows = ["| implementation | N | fwd+bwd ms | TFLOP/s (executed) | % of peak | peak MiB above inputs | memory vs naive |",
            "|---|---|---|---|---|---|---|"]
    print("\n".join(rows))
    gen = torch.Generator(device=device).manual_seed(0)
    for n in args.n:
        hidden = (torch.randn(n, args.d, device=device, generator=gen) * 0.5).to(dtype).requires_grad_()
        weight = (torch.randn(args.vocab, args.d, device=device, generator=gen) * 0.05).to(dtype).requires_grad_()
        targets = torch.randint(0, args.vocab, (n,), device=device, generator=gen)
        g_lp, g_ent = torch.randn(2, n, device=device, generator=gen)
        results = {}
        for name, fn in impls.items():
            try:
                results[name] = _time(fn, (hidden, weight, targets, g_lp, g_ent), args.repeats, cuda)
            except torch.OutOfMemoryError:
                results[name] = None
            hidden.grad = weight.grad = None
            if cuda:
                torch.cuda.empty_cache()
        naive_mem = results["naive"][1] if results.get("naive") else None
        for name, result in results.items():
            if result is None:
                row = f"| {name} | {n} | OOM | | | | |"
            else:
                ms, mem = result
                tflops = (8 if name == "fused (ours)" else 6) * n * args.d * args.vocab / (ms * 1e-3) / 1e12
                pct = f"{100 * tflops / peak:.0f}%" if cuda else "n/a"
                mem_s = f"{mem:.0f}" if mem is not None else "n/a"
                ratio = f"{100 * mem / naive_mem:.1f}%" if mem is not None and naive_mem else "n/a"
                row = f"| {name} | {n} | {ms:.1f} | {tflops:.3g} | {pct} | {mem_s} | {ratio} |"
            rows.append(row)
            print(row)
        del hidden, weight
    return "\n".join([where, "", *rows])



# --------------------------------------------------------------------------------------------------------------
# bench.py step

def bench_step(argv):
    """Wall time of full AZR steps split by phase (generate / execute / train). CPU: `tiny`. CUDA: a
    Qwen2.5-0.5B-shaped model with random weights (no download) in bf16 compute, at reduced lengths."""
    import azr

    p = argparse.ArgumentParser(prog="bench.py step")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=0, help="0: 4 on CPU, 64 on CUDA")
    p.add_argument("--max-response-tokens", type=int, default=0, help="0: 32 on CPU, 1024 on CUDA")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    cfg = azr.Config(model="tiny", device="cuda" if cuda else "cpu", steps=args.steps,
                     batch_size=args.batch_size or (64 if cuda else 4), n_learnability=8 if cuda else 2,
                     max_response_tokens=args.max_response_tokens or (1024 if cuda else 32),
                     max_prompt_tokens=4096, seed_file=str(SEED_FILE), save_every=0)
    if cuda:
        model = random_model(qwen25_05b_config(), torch.device("cuda"), torch.float32).train()
        tokenizer = M.byte_tokenizer()
        name = "Qwen2.5-0.5B-shaped"
    else:
        (model, tokenizer), name = M.load_model("tiny"), "tiny"
    for block in model.layers:
        block.checkpointing = cfg.grad_checkpoint
    policy = azr.Policy(model, tokenizer, cfg, (0, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = random.Random(0)
    rows = []
    with azr.make_executor(cfg) as ex:
        buffers = azr.init_buffers(policy, ex, cfg, rng, (0, 1))
        for step in range(1, cfg.steps + 1):
            t0 = time.perf_counter()
            m = azr.azr_step(step, policy, optimizer, ex, buffers, cfg, rng)
            m["time/step"] = time.perf_counter() - t0
            rows.append(m)
            print(f"step {step}: " + "  ".join(f"{k} {m[k]:.2f}s" for k in sorted(m) if k.startswith("time/")))
    steady = rows[1:] or rows  # the first step includes warm-up (graph capture, allocator)
    med = {k: statistics.median(r[k] for r in steady) for k in ("time/generate", "time/execute", "time/train", "time/step")}
    tok = statistics.median(r["tokens_per_s"] for r in steady)
    device = torch.cuda.get_device_name() if cuda else "CPU"
    table = ("| model | device | batch/role | N | max response | generate s | execute s | train s | step s | gen tok/s |\n"
             "|---|---|---|---|---|---|---|---|---|---|\n"
             f"| {name} | {device} | {cfg.batch_size} | {cfg.n_learnability} | {cfg.max_response_tokens} | "
             f"{med['time/generate']:.2f} | {med['time/execute']:.2f} | {med['time/train']:.2f} | "
             f"{med['time/step']:.2f} | {tok:.0f} |\n")
    print(table)
    return table



# --------------------------------------------------------------------------------------------------------------
# bench.py gpu (issue 11): the one prepared command for a lent GPU. GPU time is rare and short, so one command
# runs every CUDA path once against a reference, printing `VERDICT name pass|FAIL detail`, then its benchmark
# rows. Each check runs in a process of its own with a time cap, so an OOM, a hang or a CUDA error that poisons
# the context fails that check only and the next one still runs. Only the repository and the machine's packages
# are needed (the seed sample in data/). `--cpu-dry-run` runs every check end to end on the CPU at small shapes
# (a test does, in CI). Figures go to BENCHMARKS.md, and with `--out DIR` the verdicts, the markdown, the raw
# figures and each check's log go to DIR (on a lent machine only that folder comes back).

def _rel_err(got, ref):
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def check_kernel(dry):
    """The Triton logprob kernel, forward and backward, against the fp32 chunked reference at the paper's LM-head
    shape (N*V > 2^31, so int64 offsets matter); then its time, TFLOP/s and memory beside naive PyTorch."""
    from kernels import fused_logprobs, reference
    device, dtype = ("cpu", torch.float32) if dry else ("cuda", torch.bfloat16)
    n, d, V, vocab = (48, 32, 700, 650) if dry else (16384, 2048, 151936, 151665)
    g = torch.Generator(device=device).manual_seed(0)
    hidden = (torch.randn(n, d, device=device, generator=g) * 0.5).to(dtype)
    weight = (torch.randn(V, d, device=device, generator=g) * 0.05).to(dtype)
    weight[vocab:] = 1.0  # padded LM-head rows: they would dominate every softmax if they leaked in
    targets = torch.randint(0, vocab, (n,), device=device, generator=g)
    g_lp, g_ent = torch.randn(2, n, device=device, generator=g)

    def run(fn, h, w):
        h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
        lp, ent = fn(h, w, targets, 0.7, vocab)
        (g_lp * lp + g_ent * ent).sum().backward()
        return dict(logprobs=lp.detach(), entropy=ent.detach(), d_hidden=h.grad, d_weight=w.grad)
    got = run(fused_logprobs.linear_logprobs_triton, hidden, weight)
    ref = run(reference.linear_logprobs_reference, hidden.float(), weight.float())
    err = {k: _rel_err(got[k], ref[k]) for k in got}
    limits = dict(logprobs=1e-3, entropy=1e-3, d_hidden=3e-2, d_weight=3e-2)
    pad_zero = bool((got["d_weight"][vocab:] == 0).all())
    ok = pad_zero and all(err[k] < limits[k] for k in err)
    verdicts = [("kernel", ok, f"N={n} d={d} V={V} vocab={vocab} {str(dtype)[6:]}: rel err "
                 + " ".join(f"{k} {v:.1e}" for k, v in err.items()) + f"; padded rows' grad zero {pad_zero}")]
    del got, ref
    rows = ["| implementation | N | fwd+bwd ms | TFLOP/s (executed) | peak MiB above inputs |", "|---|---|---|---|---|"]
    figures = {}
    for name, fn, flops in (("fused (ours)", kernels.linear_logprobs, 8), ("naive", _naive, 6)):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        try:
            ms, mib = _time(fn, (h, w, targets, g_lp, g_ent), 1 if dry else 3, not dry)
        except torch.OutOfMemoryError:
            rows.append(f"| {name} | {n} | OOM | | |")
            continue
        tflops = flops * n * d * V / (ms * 1e-3) / 1e12
        figures[name] = dict(ms=ms, tflops=tflops, peak_mib=mib)
        rows.append(f"| {name} | {n} | {ms:.1f} | {tflops:.3g} | {'n/a' if mib is None else f'{mib:.0f}'} |")
        del h, w
        if not dry:
            torch.cuda.empty_cache()
    return verdicts, "\n".join(rows), figures


def check_paged_attention(dry):
    """The Triton paged decode kernel against its PyTorch reference and against SDPA over each sequence's gathered
    keys (fp32), on ragged lengths up to 8k in shuffled blocks at Qwen2.5-3B's head shape; then its time beside the
    masked SDPA over a batch padded to its longest sequence (what the slot-major sampler ran)."""
    from kernels import paged_attention, paged_reference
    device, dtype = ("cpu", torch.float32) if dry else ("cuda", torch.bfloat16)
    B, H, kvh, D, page = (3, 4, 2, 16, 16) if dry else (64, 16, 2, 128, M.BLOCK_SIZE)
    g = torch.Generator().manual_seed(0)
    lengths = [1, page, 2 * page + 3] if dry else [int(2 ** (13 * torch.rand(1, generator=g).item())) for _ in range(B)]
    width = max(-(-n // page) for n in lengths)
    blocks = torch.randperm(B * width, generator=g)  # each sequence's blocks scattered over the pool
    table = blocks.view(B, width).int()
    k_pool, v_pool = (torch.randn(B * width, page, kvh, D, generator=g).to(device=device, dtype=dtype) for _ in range(2))
    q = torch.randn(B, H, D, generator=g).to(device=device, dtype=dtype)
    lens, table = torch.tensor(lengths, dtype=torch.int32, device=device), table.to(device)
    got = paged_attention.paged_attention_triton(q, k_pool, v_pool, table, lens, max(lengths))
    ref = paged_reference.paged_attention_reference(q, k_pool, v_pool, table, lens)
    sdpa = []
    for b, n in enumerate(lengths):  # independent: gather the sequence's keys in order, then plain attention
        rows = table[b, :-(-n // page)].long()
        k, v = (pool[rows].reshape(-1, kvh, D)[:n].float().transpose(0, 1) for pool in (k_pool, v_pool))
        sdpa.append(torch.nn.functional.scaled_dot_product_attention(q[b].float().view(kvh, H // kvh, D), k, v)
                    .reshape(H, D))
    sdpa = torch.stack(sdpa)
    e_ref, e_sdpa = _rel_err(got.float(), ref.float()), _rel_err(got.float(), sdpa)
    limit = 1e-4 if dtype == torch.float32 else 2e-2
    verdicts = [("paged_attention", e_ref < limit and e_sdpa < limit,
                 f"B={B} H={H}/{kvh} D={D} block {page} {str(dtype)[6:]}, lengths {min(lengths)}-{max(lengths)}: "
                 f"rel err vs reference {e_ref:.1e}, vs SDPA on gathered keys {e_sdpa:.1e}")]
    if dry:
        return verdicts, "", dict(err_reference=e_ref, err_sdpa=e_sdpa)
    L = max(lengths)
    kc, vc = (torch.randn(B, kvh, L, D, device=device, dtype=dtype) for _ in range(2))
    mask = (torch.arange(L, device=device) < lens[:, None])[:, None, None]
    qg = q.view(B, kvh, H // kvh, D)

    def timed(fn, repeats=20):
        fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / repeats * 1e3
    ms_paged = timed(lambda: paged_attention.paged_attention_triton(q, k_pool, v_pool, table, lens, L))
    ms_padded = timed(lambda: torch.nn.functional.scaled_dot_product_attention(qg, kc, vc, attn_mask=mask))
    needed = 2 * sum(lengths) * kvh * D * dtype.itemsize
    rows = ["| decode attention, one layer | ms | GB/s of needed K/V |", "|---|---|---|",
            f"| paged Triton kernel | {ms_paged:.3f} | {needed / ms_paged / 1e6:.0f} |",
            f"| masked SDPA, batch padded to {L} keys | {ms_padded:.3f} | {needed / ms_padded / 1e6:.0f} |"]
    return verdicts, "\n".join(rows), dict(ms_paged=ms_paged, ms_padded=ms_padded, needed_bytes=needed)


def check_sampler(dry):
    """Logprobs of decoded samples (graphs on CUDA, refills, bucket changes, preemption in a small pool, n > 1
    sharing prompt blocks) against a full forward of prompt + sample, on a random model with weights large enough
    that attention is not flat; then batch-1 decode bandwidth on a Qwen2.5-3B-shaped model against the measured
    copy bandwidth of this device."""
    device = torch.device("cpu" if dry else "cuda")
    dtype = torch.float32 if dry else torch.bfloat16
    config = M.ModelConfig(vocab_size=1024, hidden_size=128 if dry else 1024, intermediate_size=256 if dry else 2816,
                           num_layers=2 if dry else 4, num_heads=4 if dry else 16, num_kv_heads=2,
                           head_dim=32 if dry else 64, rope_theta=1e6, qkv_bias=True, tie_word_embeddings=True)
    model = random_model(config, device, dtype, std=0.1)
    g = random.Random(0)
    prompts = [[g.randrange(1024) for _ in range(g.randint(5, 40 if dry else 700))] for _ in range(6 if dry else 24)]
    limits = [g.randint(4, 24 if dry else 600) for _ in prompts]
    # a pool of a few blocks per running sequence and a small batch cap: refills, bucket changes and preemptions
    page = 16 if dry else M.BLOCK_SIZE
    per_block = page * M.kv_bytes_per_token(config, dtype) / 2 ** 30
    sampler = M.Sampler(model, kv_cache_gib=per_block * (6 if dry else 24), block_size=page,
                        max_batch_size=4 if dry else 16)
    mean_err, max_err, stats = sampler_logprob_error(sampler, prompts, 2, limits)
    limit = (1e-4, 1e-3) if dry else (0.05, 1.0)
    verdicts = [("sampler", mean_err < limit[0] and max_err < limit[1] and stats["blocks_in_use"] == 0,
                 f"|logprob - full forward| mean {mean_err:.2e} max {max_err:.2e} over {len(prompts)} prompts x n=2 "
                 f"({stats['preemptions']} preemptions, {stats.get('graphs_captured', 0)} graphs, "
                 f"{stats['blocks_in_use']} blocks left in use)")]
    del sampler, model
    if dry:
        return verdicts, "", dict(mean_err=mean_err, max_err=max_err, stats=stats)
    torch.cuda.empty_cache()
    x = torch.empty(2 ** 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    copy_bw = 2 * 2 ** 30 * 10 / (time.perf_counter() - t)  # each copy reads and writes the GiB
    del x, y
    model = random_model(qwen25_3b_config(), device, torch.bfloat16)
    spt, step_bytes = batch1_decode(model, [[1, 2, 3, 4, 5]], 1)
    bw = step_bytes / spt
    rows = ["| batch-1 greedy decode, Qwen2.5-3B-shaped bf16 | tokens/s | bandwidth | of copy bandwidth |",
            "|---|---|---|---|", f"| Sampler.generate | {1 / spt:.0f} | {bw / 1e9:.0f} GB/s | {bw / copy_bw:.0%} |",
            f"\nmeasured device copy bandwidth {copy_bw / 1e9:.0f} GB/s (1 GiB read + written)"]
    return verdicts, "\n".join(rows), dict(mean_err=mean_err, max_err=max_err, tokens_per_s=1 / spt,
                                           bandwidth=bw, copy_bandwidth=copy_bw)


def check_memory(dry):
    """The order a self-play run takes, on the real path: azr.Policy (fp32 master weights, bf16 sampling copy, one
    Sampler whose pool leaves trainer_reserve_gib) generates, policy_update allocates gradients and AdamW state,
    then generate and update again. The predicted failure was an OOM at the second generate (gpu-review.md 1)."""
    import azr
    device = "cpu" if dry else "cuda"
    cfg = azr.Config(model="random", device=device, micro_batch_tokens=512 if dry else 16384)
    shape = M.tiny_config() if dry else qwen25_3b_config()
    model = random_model(shape, torch.device(device), torch.float32).train()
    for block in model.layers:
        block.checkpointing = True
    tok = M.byte_tokenizer()
    policy = azr.Policy(model, tok, cfg, (0, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    g = random.Random(0)
    # a learnability phase's shape: 64 prompts of ~1,000 tokens, n=8, so the decode batch ramps to 512 rows and
    # every graph bucket on the way is captured
    prompts = [[g.randrange(256) for _ in range(g.randint(50, 100 if dry else 1500))] for _ in range(4 if dry else 64)]
    n = 2 if dry else 8
    phases = []
    try:
        for phase in range(2):
            outs = policy.sample(prompts, n=n, seed=phase, max_new_tokens=16 if dry else 1024)
            phases.append(f"generate {phase + 1}")
            rollouts = [azr.Rollout("solve_x", prompts[k // n], s.tokens, s.logprobs, advantage=g.uniform(-1, 1))
                        for k, (s, _) in enumerate(outs[:len(outs) // 4])]
            azr.policy_update(policy.trainable, optimizer, rollouts, cfg)
            policy.refresh_sampler()
            phases.append(f"update {phase + 1}")
        ok, failure = True, ""
    except torch.OutOfMemoryError as e:
        ok, failure = False, f"; OOM after {', '.join(phases) or 'nothing'}: {str(e).splitlines()[0][:200]}"
    cache = policy.sampler.cache  # sized at creation on CUDA, so known after an OOM too
    pool = cache.num_blocks * policy.sampler.block_bytes / 2 ** 30 if cache is not None else 0.0
    cuda = not dry
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else 0.0
    held = torch.cuda.max_memory_reserved() / 2 ** 30 if cuda else 0.0  # CUDA-graph pools included
    total = torch.cuda.get_device_properties(0).total_memory / 2 ** 30 if cuda else 0.0
    graphs = sum(seg["total_size"] for seg in torch.cuda.memory_snapshot()
                 if tuple(seg.get("segment_pool_id", (0, 0))) != (0, 0)) / 2 ** 30 if cuda else 0.0
    detail = (f"{'tiny' if dry else 'Qwen2.5-3B-shaped'} fp32 + bf16 copy: KV pool {pool:.1f} GiB, reserve "
              f"{azr.trainer_reserve_gib(model, cfg, 1):.1f} GiB, graph pools {graphs:.1f} GiB, peak allocated "
              f"{peak:.1f} and reserved {held:.1f} of {total:.0f} GiB{failure}")
    return [("memory", ok, detail)], "", dict(pool_gib=pool, peak_gib=peak, reserved_gib=held, graph_gib=graphs,
                                              phases=phases)


def check_throughput(dry):
    """Tokens/s of the kept Sampler against transformers' generate in the same run, Qwen2.5-3B-shaped random bf16:
    nano-vllm's protocol (256 prompts of 100-1,024 tokens, 100-1,024 new, T=0.6; transformers on the first 64, and
    ours on the same 64 for the like-for-like ratio) and the AZR replay scaled to responses of at most 2,048 tokens
    (transformers on the first 4 prompts x n=8; its timing includes the captures of buckets not seen before)."""
    device = torch.device("cpu" if dry else "cuda")
    if dry:
        model, _ = M.load_model("tiny")
        prompts, max_new = protocol(8, (16, 32), (8, 16), 257)
        k = 4
    else:
        model = random_model(qwen25_3b_config(), device, torch.bfloat16)
        prompts, max_new = protocol(256, (100, 1024), (100, 1024), 10000)
        k = 64
    hf = hf_twin(model)
    t_hf, n_hf, _ = run_hf(hf, prompts[:k], max_new[:k], 0.6, k)
    del hf
    release_memory()
    sampler = M.Sampler(model)
    run_ours(sampler, prompts, max_new, 0.6)  # warm-up: capture every graph bucket, as nano-vllm excludes capture
    t_all, n_all, _ = run_ours(sampler, prompts, max_new, 0.6)
    t_k, n_k, _ = run_ours(sampler, prompts[:k], max_new[:k], 0.6)
    del sampler
    release_memory()
    ratio = (n_k / t_k) / (n_hf / t_hf)
    lines = ["nano-vllm protocol:", "", *throughput_table([
        (f"Sampler.generate, all {len(prompts)} prompts (graphs captured by a warm-up call)", t_all, n_all),
        (f"Sampler.generate, first {k} prompts", t_k, n_k),
        (f"transformers generate, first {k} prompts in one batch", t_hf, n_hf)]), "", "AZR replay:", "",
        *bench_replay(model, model.embed_tokens.weight.dtype, 8 if dry else 64, 2 if dry else 8,
                      64 if dry else 2048, [0], 2 if dry else 4, 4, model.config.vocab_size)]
    # the verdict: our sampler produced exactly the requested tokens (no stop); the ratio is a figure
    return [("throughput", n_all == sum(max_new) and n_k == sum(max_new[:k]),
             f"nano-vllm protocol: {n_all / t_all:.0f} tokens/s on {len(prompts)} prompts; on the first {k}: "
             f"{ratio:.1f}x transformers' {n_hf / t_hf:.0f}")], \
        "\n".join(lines), dict(ours=n_all / t_all, ours_k=n_k / t_k, hf=n_hf / t_hf)


def check_train_attention(dry):
    """Decoder gradients through the training path (TokenLogprobs) in fp32 with whatever SDPA backend the build
    picks, and under bf16 autocast as azr trains, against fp32 with the math backend; names the backend chosen. The
    LM head runs the chunked PyTorch reference here (check_kernel covers the Triton kernel; its fp32 autotuning
    alone would take a minute), so the differences are the attention's and the decoder's."""
    import azr
    from kernels import reference
    from torch.nn.attention import SDPBackend, sdpa_kernel
    azr.linear_logprobs = reference.linear_logprobs_reference
    device = "cpu" if dry else "cuda"
    config = M.ModelConfig(vocab_size=1024, hidden_size=128 if dry else 896, intermediate_size=256 if dry else 4864,
                           num_layers=2, num_heads=4 if dry else 14, num_kv_heads=2, head_dim=32 if dry else 64,
                           rope_theta=1e6, qkv_bias=True, tie_word_embeddings=True)
    model = random_model(config, torch.device(device), torch.float32, std=0.08).train()
    policy = azr.TokenLogprobs(model, config.vocab_size)
    g = torch.Generator(device=device).manual_seed(1)
    B, T = (2, 64) if dry else (4, 1024)
    ids = torch.randint(0, config.vocab_size, (B, T), device=device, generator=g)
    mask = torch.zeros(B, T, dtype=torch.bool, device=device)
    mask[:, T // 4:-1] = True
    targets = ids[:, 1:][mask[:, :-1]]
    adv = torch.randn(targets.shape[0], device=device, generator=g)

    def grads(autocast, backends):
        model.zero_grad(set_to_none=True)
        ctx = torch.autocast(device, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with ctx, sdpa_kernel(backends):
            logp, ent = policy(ids, mask, targets, 1.0)
        (-(adv * logp).sum() - 0.01 * ent.sum()).backward()
        return {k: p.grad.clone() for k, p in model.named_parameters()}
    everything = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                  SDPBackend.MATH]
    ref = grads(False, [SDPBackend.MATH])
    fp32 = grads(False, everything)
    bf16 = grads(True, everything)
    worst = lambda got: max((_rel_err(got[k], ref[k]), k) for k in ref)  # noqa: E731
    (e32, k32), (e16, k16) = worst(fp32), worst(bf16)
    q = torch.randn(1, config.num_heads, 16, config.head_dim, device=device, dtype=torch.bfloat16)
    kv = torch.randn(1, config.num_kv_heads, 16, config.head_dim, device=device, dtype=torch.bfloat16)
    try:
        backend = {0: "math", 1: "flash", 2: "efficient", 3: "cudnn"}.get(
            int(torch._fused_sdp_choice(q, kv, kv, is_causal=True, enable_gqa=True)), "other")
    except (RuntimeError, TypeError, AttributeError) as e:
        backend = f"unknown ({type(e).__name__})"
    return [("train_attention", e32 < 1e-3 and e16 < 5e-2,
             f"worst grad rel err vs fp32 math: fp32 {e32:.1e} ({k32}), bf16 autocast {e16:.1e} ({k16}); "
             f"bf16 causal GQA SDPA picks {backend}")], "", dict(fp32=e32, bf16=e16, backend=backend)


def check_step(dry):
    """One full self-play step (azr.azr_step: propose, validate, learnability, solve, grade, update, refresh) on
    the tiny model and on a Qwen2.5-0.5B-shaped random model, with phase times, MFU and the PPO health figures
    (on GPUs log pi_old comes from the bf16 sampling copy, the update from fp32 master weights)."""
    import azr
    device = "cpu" if dry else "cuda"
    rows = ["| model | generate s | execute s | train s | step s | gen tok/s | MFU | clip fraction | max abs dlogp |",
            "|---|---|---|---|---|---|---|---|---|"]
    verdicts, figures = [], {}
    shapes = [("tiny", None)] + ([] if dry else [("Qwen2.5-0.5B-shaped", qwen25_05b_config())])
    for name, shape in shapes:
        cfg = azr.Config(model="tiny", device=device, steps=1, batch_size=4 if dry else 32,
                         n_learnability=2 if dry else 8, max_response_tokens=32 if dry else 512,
                         max_prompt_tokens=4096, seed_file=str(REPO / "data" / "sample_seed_io.jsonl"), save_every=0,
                         exec_workers=2 if dry else min(16, os.cpu_count() or 1))
        if shape is None:
            model, tokenizer = M.load_model("tiny", device=device)
        else:
            model, tokenizer = random_model(shape, torch.device(device), torch.float32).train(), M.byte_tokenizer()
        for block in model.layers:
            block.checkpointing = cfg.grad_checkpoint
        policy = azr.Policy(model, tokenizer, cfg, (0, 1))
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        try:
            ex, note = azr.make_executor(cfg), ""
        except SystemExit as e:  # the GPU paths are the point here: run the random model's tasks without the uid
            cfg.exec_unsafe, note = True, f" (executor without the uid layer: {e})"
            ex = azr.make_executor(cfg)
        with ex:
            buffers = azr.init_buffers(policy, ex, cfg, random.Random(0), (0, 1))
            t0 = time.perf_counter()
            m = azr.azr_step(1, policy, optimizer, ex, buffers, cfg, random.Random(0))
            step_s = time.perf_counter() - t0
        peak = azr.peak_flops(cfg)
        mfu = azr.step_flops(sum(p.numel() for p in model.parameters()), m) / (step_s * peak) if peak else None
        health = [m["clip_fraction"], m["max_abs_log_ratio"], m["loss"], m["grad_norm"]]
        ok = all(math.isfinite(x) for x in health)
        verdicts.append((f"step.{'tiny' if shape is None else 'qwen2.5-0.5b'}", ok, f"{name}: {step_s:.1f} s, loss {m['loss']:.3g}, "
                         f"grad norm {m['grad_norm']:.3g}, clip fraction {m['clip_fraction']:.4f}, "
                         f"max |dlogp| {m['max_abs_log_ratio']:.3g}{note}"))
        figures[name] = {k: v for k, v in m.items() if isinstance(v, (int, float))}
        rows.append(f"| {name} | {m['time/generate']:.2f} | {m['time/execute']:.2f} | {m['time/train']:.2f} | "
                    f"{step_s:.2f} | {m['tokens_per_s']:.0f} | {'n/a' if mfu is None else f'{mfu:.1%}'} | "
                    f"{m['clip_fraction']:.4f} | {m['max_abs_log_ratio']:.3g} |")
        del model, policy, optimizer
        if not dry:
            torch.cuda.empty_cache()
    return verdicts, "\n".join(rows), figures


# name -> (check, seconds it may take on the GPU, compilation included), most telling first; a check also stops
# at the 8-minute deadline of the whole run (GPU_DEADLINE_S), so a slow one cannot starve the rest for long
GPU_CHECKS = dict(kernel=(check_kernel, 90), paged_attention=(check_paged_attention, 45),
                  sampler=(check_sampler, 90), memory=(check_memory, 150), step=(check_step, 150),
                  train_attention=(check_train_attention, 60), throughput=(check_throughput, 200))
GPU_DEADLINE_S = 470


def _gpu_check_child(name, dry, result_path):
    """Runs one check in this process and writes its verdicts, markdown and figures as JSON."""
    fn, _ = GPU_CHECKS[name]
    verdicts, markdown, figures = fn(dry)
    Path(result_path).write_text(json.dumps(dict(verdicts=verdicts, markdown=markdown, figures=figures), default=str))


def bench_gpu(argv):
    ap = argparse.ArgumentParser(prog="bench.py gpu", description="Every GPU path once against a reference, then "
                                 "its benchmark rows, in one command (issue 11).")
    ap.add_argument("--cpu-dry-run", action="store_true", help="run every check on the CPU at small shapes")
    ap.add_argument("--out", default="", help="folder for verdicts.txt, gpu.md, figures.json and each check's log")
    ap.add_argument("--only", default="", help="comma list of checks to run (default: all)")
    ap.add_argument("--child", nargs=2, metavar=("CHECK", "RESULT_JSON"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    dry = args.cpu_dry_run
    if args.child:
        return _gpu_check_child(args.child[0], dry, args.child[1])
    if not dry and not torch.cuda.is_available():
        raise SystemExit("bench.py gpu: no CUDA device here; use --cpu-dry-run to exercise the checks on the CPU")
    names = [n for n in args.only.split(",") if n] or list(GPU_CHECKS)
    unknown = set(names) - set(GPU_CHECKS)
    if unknown:
        raise SystemExit(f"bench.py gpu: unknown checks {sorted(unknown)}; choose from {', '.join(GPU_CHECKS)}")
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    import triton
    device = "CPU (dry run)" if dry else torch.cuda.get_device_name()
    head = (f"{device}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
            f"Python {platform.python_version()}, {datetime.date.today()}")
    print(f"# bench.py gpu: {head}", flush=True)
    env = dict(os.environ, TRITON_INTERPRET="1") if dry else dict(os.environ)
    verdict_lines, sections, figures, t_start = [], [], {}, time.monotonic()
    for name in names:
        cap = GPU_CHECKS[name][1] * 3 if dry else min(GPU_CHECKS[name][1], GPU_DEADLINE_S - (time.monotonic() - t_start))
        if cap < 10:
            lines = [f"VERDICT {name} FAIL not run: the 8-minute budget was spent"]
            print(lines[0], flush=True)
            verdict_lines += lines
            continue
        result = Path(tempfile.mkdtemp(prefix="azr-gpu-")) / "result.json"
        cmd = [sys.executable, str(REPO / "bench.py"), "gpu", "--child", name, str(result)] + (["--cpu-dry-run"] if dry else [])
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=cap)
            log, failure = proc.stdout + proc.stderr, None if proc.returncode == 0 else f"exit status {proc.returncode}"
        except subprocess.TimeoutExpired as e:
            log, failure = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace"), \
                f"over its {cap} s cap"
        seconds = time.monotonic() - t0
        if out:
            (out / f"{name}.log").write_text(log)
        if failure is None and result.is_file():
            r = json.loads(result.read_text())
            lines = [f"VERDICT {v} {'pass' if ok else 'FAIL'} {detail}" for v, ok, detail in r["verdicts"]]
            if r["markdown"]:
                sections.append(f"### {name} ({seconds:.0f} s)\n\n{r['markdown']}")
            figures[name] = r["figures"]
        else:
            last = next((line for line in reversed(log.strip().splitlines()) if line.strip()), "no output")
            lines = [f"VERDICT {name} FAIL {failure}: {last[:300]}"]
        shutil.rmtree(result.parent, ignore_errors=True)
        for line in lines:
            print(line, flush=True)
        verdict_lines += lines
    total = time.monotonic() - t_start
    report = (f"{head}; {total:.0f} s in all\n\n" + "\n".join(f"- `{v}`" for v in verdict_lines) + "\n\n"
              + "\n\n".join(sections) + "\n")
    print("\n" + report)
    if out:
        (out / "verdicts.txt").write_text("\n".join(verdict_lines) + "\n")
        (out / "gpu.md").write_text(report)
        (out / "figures.json").write_text(json.dumps(figures, indent=1, default=str))
    if not dry:
        with open(REPO / "BENCHMARKS.md", "a") as f:
            f.write(f"\n## bench.py gpu -- {device} -- {datetime.date.today()}\n\n{report}")
    return report


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    benches = dict(executor=bench_executor, sampler=bench_sampler, kernel=bench_kernel, step=bench_step, gpu=bench_gpu)
    if not argv or argv[0] not in benches:
        raise SystemExit(f"usage: python bench.py {{{'|'.join(benches)}}} [--record] [options]")
    record = "--record" in argv and argv[0] != "gpu"  # gpu writes BENCHMARKS.md itself
    report = benches[argv[0]]([a for a in argv[1:] if a != "--record"])
    if record:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else \
            f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, no GPU"
        with open(REPO / "BENCHMARKS.md", "a") as f:
            f.write(f"\n## bench.py {argv[0]} -- {device} -- {datetime.date.today()}\n\n{report}\n")


if __name__ == "__main__":
    main()
