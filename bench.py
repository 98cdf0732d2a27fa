"""
bench.py -- speed benchmarks for nsr, one function per benchmark, one subcommand each.

  python bench.py sampler   tokens/s of sample.generate (hand-written, KV cache) vs transformers'
                            model.generate(do_sample=True): same prompts, temperature, top-p and
                            max_new_tokens, run alternately in one process, median of several repeats, on
                              (a) a ~1M-parameter random Qwen2 with a char-sized vocabulary, 256 rollouts
                                  = 32 prompts x 8 (--toy: toy.py's model on its test_easy prompts --
                                  trained from runs/toy-base-s0 when built, else freshly initialised);
                              (b) a ~100M-parameter random Qwen2, 16 rollouts = 4 prompts x 4.
                            Targets: ratio >= 2.0 on (a) with --toy, >= 1.3 on (b).
                            Full run: nice -n 10 python bench.py sampler   (40 s - 1.5 min on a busy 2-core CPU)
  python bench.py eval      tokens/s of passk.evaluate on runs/toy-base-s0's first 32 test_hard problems x
                            n = 256: the current code (with and without common random numbers) against the
                            code at EVAL_BASELINE (git), alternately in one process. Target: ratio >= 2.0.
                            Full run: nice -n 10 python bench.py eval
  python bench.py train     see the TRAIN banner below
  python bench.py offload   see the OFFLOAD banner below
  python bench.py gpu       see the GPU banner below (needs CUDA; says so and exits 0 without it)
  python bench.py verifier  the verifier's slowest call on each adversarial input, in ms (test_nsr.py counts
                            the verifier's work in Python lines instead of timing it)

The last line of output is one JSON object with the measured numbers (ratios = ours / transformers).

What "tokens/s" counts: generated tokens up to and including each row's first EOS (what the RL step
and Pass@k actually use), divided by wall time of the whole call (prefill + decoding + bookkeeping).
Where the difference comes from: sample.generate prefills each distinct prompt once and evicts finished
rows from the batch; transformers prefills every row and keeps stepping finished rows until all are done.
For Qwen2/Qwen3/Llama the per-step model call is sample.forward (written out, our preallocated KV cache),
which skips transformers' per-call machinery (mask building, cache classes, logits processors), and a
token is drawn by inverse-CDF sampling instead of torch.multinomial (13x cheaper on CPU at 16 x 32k).

NOTE: CPU timings on a shared machine are noisy; run with `nice` and look at the spread we print.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import statistics
import subprocess
import sys
import time
import types

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import loading
import nsr
import passk
import precision
import runs
import sample
import toy
import verifier

HERE = pathlib.Path(__file__).resolve().parent


# =================================================================================================
# SAMPLER: sample.generate vs transformers' model.generate
# =================================================================================================

def random_qwen2(vocab_size: int, hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int,
                 seed: int):
    """A randomly initialised Qwen2 (eos 2, pad 0, bos 1), fp32, eval mode."""
    config = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).eval()


def random_prompts(n_prompts: int, repeats: int, vocab_size: int, min_len: int, max_len: int, seed: int):
    """n_prompts random prompts (bos + ids >= 3, so no EOS inside), each repeated `repeats` times,
    the way an RL step samples G rollouts per problem."""
    g = torch.Generator().manual_seed(seed)
    prompts = []
    for _ in range(n_prompts):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        prompts.append([1] + torch.randint(3, vocab_size, (length - 1,), generator=g).tolist())
    return [p for p in prompts for _ in range(repeats)]


def toy_model_and_prompts(n_prompts: int, repeats: int):
    """toy.py's model on its test_easy prompts, each repeated `repeats` times: the trained base model from
    runs/toy-base-s0 when it has been built (python toy.py), else the same architecture freshly initialised."""
    base = HERE / toy.base_dir(0)
    if (base / "config.json").is_file():
        model, tokenizer = loading.load_model(str(base), dtype="float32", device="cpu")
        problems = loading.load_problems(base / "test_easy.jsonl")
        label = "a: toy model (trained, runs/toy-base-s0)"
    else:
        recipe, tokenizer = toy.ToyRecipe(), toy.build_tokenizer()
        model = toy.build_model(recipe, tokenizer)
        problems = toy.make_splits(recipe)["test_easy"]
        label = "a: toy model (untrained: runs/toy-base-s0 not built)"
    prompt_ids, _, _ = loading.encode_prompts(tokenizer, problems[:n_prompts])
    return label, model.eval(), [p for p in prompt_ids for _ in range(repeats)]


def count_tokens(rows: list[list[int]], eos_ids: list[int]) -> int:
    """Generated tokens up to and including each row's first EOS."""
    total = 0
    for row in rows:
        cut = [i for i, tok in enumerate(row) if tok in eos_ids]
        total += cut[0] + 1 if cut else len(row)
    return total


def run_ours(model, prompts, args, max_new_tokens: int, seed: int) -> tuple[float, int]:
    """One timed call of sample.generate -> (seconds, generated tokens)."""
    g = torch.Generator(device=model.device).manual_seed(seed)         # on the model's device (cuda for `gpu`)
    start = time.perf_counter()
    rollouts = sample.generate(model, prompts, max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            generator=g, chunk_size=args.chunk_size)
    seconds = time.perf_counter() - start
    return seconds, sum(len(row) for row in rollouts.tokens)


def run_transformers(model, prompts, args, max_new_tokens: int, seed: int) -> tuple[float, int]:
    """One timed call of model.generate(do_sample=True) on the same left-padded batch."""
    eos_ids = sample.default_eos_token_ids(model)
    torch.manual_seed(seed)
    start = time.perf_counter()                        # padding is part of the job, so it is timed too
    P = max(len(p) for p in prompts)
    input_ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts], device=model.device)
    attention_mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    with torch.inference_mode():
        # top_k=0 switches off transformers' default top-k so both sample from the same distribution
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True,
                             temperature=args.temperature, top_p=args.top_p, top_k=0,
                             max_new_tokens=max_new_tokens, eos_token_id=eos_ids, pad_token_id=0)
    rows = out[:, P:].tolist()
    seconds = time.perf_counter() - start
    return seconds, count_tokens(rows, eos_ids)


def compare(name: str, model, prompts, args, max_new_tokens: int) -> dict:
    """Alternate ours / transformers (order flipped every repeat), after one untimed warm-up each."""
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[{name}] {n_params / 1e6:.2f}M params, vocab {model.config.vocab_size}, {len(prompts)} rollouts "
          f"({len(set(map(tuple, prompts)))} distinct prompts), prompt len {min(map(len, prompts))}-"
          f"{max(map(len, prompts))}, max_new_tokens {max_new_tokens}, T={args.temperature}, top_p={args.top_p}, "
          f"threads {args.threads}", flush=True)
    run_ours(model, prompts, args, max_new_tokens, seed=12345)
    run_transformers(model, prompts, args, max_new_tokens, seed=12345)
    rates = {"ours": [], "transformers": []}
    for r in range(args.repeats):
        order = [("ours", run_ours), ("transformers", run_transformers)]
        for label, fn in (order if r % 2 == 0 else order[::-1]):
            seconds, n_tokens = fn(model, prompts, args, max_new_tokens, seed=r)
            rates[label].append(n_tokens / seconds)
            print(f"  repeat {r} {label:>12}: {n_tokens:6d} tokens in {seconds:6.2f} s = "
                  f"{n_tokens / seconds:8.1f} tok/s", flush=True)
    ours, theirs = statistics.median(rates["ours"]), statistics.median(rates["transformers"])
    print(f"[{name}] median tok/s: ours {ours:.1f}, transformers {theirs:.1f}, ratio {ours / theirs:.2f}",
          flush=True)
    return {"params_M": round(n_params / 1e6, 2), "rollouts": len(prompts), "max_new_tokens": max_new_tokens,
            "ours_tok_s": round(ours, 1),
            "transformers_tok_s": round(theirs, 1), "ratio": round(ours / theirs, 3),
            "ours_all": [round(x, 1) for x in rates["ours"]],
            "transformers_all": [round(x, 1) for x in rates["transformers"]]}


def bench_sampler(args) -> dict:
    """Benchmark (a) the ~1M char-vocab model (or --toy) with 256 rollouts, (b) a ~100M Qwen2 with 16."""
    torch.set_num_threads(args.threads)
    results = {}
    if "a" in args.only:
        g = args.per_prompt or 8                       # rollouts per prompt (G in an RL step)
        if args.toy:
            label, model, prompts = toy_model_and_prompts(n_prompts=args.rollouts_a // g, repeats=g)
        else:
            # ~1M parameters, 64-token (character-sized) vocabulary
            label = "a: 1M qwen2"
            model = random_qwen2(vocab_size=64, hidden=128, layers=4, intermediate=512, heads=4, kv_heads=2,
                                 seed=0)
            prompts = random_prompts(args.rollouts_a // g, g, vocab_size=64, min_len=20, max_len=40, seed=0)
        results["a"] = compare(label, model, prompts, args, args.new_tokens_a)
    if "b" in args.only:
        # ~100M parameters: 32k vocabulary (untied: 2 x 20M), 12 layers of width 640
        g = args.per_prompt or 4
        model = random_qwen2(vocab_size=32000, hidden=640, layers=12, intermediate=1792, heads=10, kv_heads=2,
                             seed=0)
        prompts = random_prompts(args.rollouts_b // g, g, vocab_size=32000, min_len=20, max_len=40, seed=1)
        results["b"] = compare("b: 100M qwen2", model, prompts, args, args.new_tokens_b)
    summary = {"benchmark": "sampler", "threads": args.threads, "repeats": args.repeats,
               "temperature": args.temperature, "top_p": args.top_p, "per_prompt": args.per_prompt}
    for key, res in results.items():
        summary[f"ratio_{key}"] = res["ratio"]
    summary["target_a"], summary["target_b"] = 2.0, 1.3     # (a): the target is set on --toy
    summary["details"] = results
    return summary


# =================================================================================================
# TRAIN: one RL update with and without gradient checkpointing
# =================================================================================================
#
# python bench.py train   training tokens/s and peak memory of one RL update (nsr.minibatch_backward +
#                         precision.optimizer_step, NSR weights) with and without gradient checkpointing, on a
#                         ~110M-parameter random Qwen2 (vocab 32000, hidden 768, 10 layers), sequences of
#                         1,024 tokens (128 prompt + 896 response). Each mode runs in its own subprocess so
#                         the peaks do not mix: peak resident memory (ru_maxrss) on CPU, CUDA peak allocated
#                         memory on a GPU. Target: >= 2x lower peak memory with checkpointing.
#                         "on" = decoder layers checkpointed AND the output layer + log-softmax computed in
#                         checkpointed chunks of 128 positions (sample.response_logprobs, head_chunk), as
#                         in nsr.train. The peak includes what checkpointing cannot shrink: weights, fp32
#                         gradients and AdamW state (16 bytes per parameter for this fp32 CPU model).

def train_child(args) -> dict:
    """One mode (args.child = "on" / "off") in this process: warm-up step, then timed steps."""

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = random_qwen2(vocab_size=32000, hidden=768, layers=10, intermediate=2048, heads=12, kv_heads=2,
                         seed=0).to(device)
    if device.type == "cuda":
        model = model.to(torch.bfloat16)               # bf16 compute + fp32 masters, as nsr.train on a GPU
    model.train()
    if args.child == "on":
        precision.enable_gradient_checkpointing(model)
    policy = precision.make_trainable(model, nsr.Config(), 1e-6)     # AdamW betas (0.9, 0.999), decay 0.01
    params, master, optimizer = policy.params, policy.master, policy.optimizer
    g = torch.Generator().manual_seed(0)
    n, P, R = args.sequences, 128, args.seq_len - 128
    prompts = [torch.randint(3, 32000, (P,), generator=g).tolist() for _ in range(n)]
    responses = [torch.randint(3, 32000, (R,), generator=g).tolist() for _ in range(n)]
    weights = torch.full((n,), -1.0)                   # NSR: every sample penalised
    Z = nsr.loss_normalizer(weights, [R] * n)
    rss_built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # GiB (Linux: KiB)
    times = []
    for step in range(1 + args.steps):                 # step 0 = warm-up (allocates AdamW state too)
        start = time.perf_counter()
        # "on" = what nsr.train does with checkpointing: layers AND the output layer (Config.head_chunk)
        # the plain -w log pi loss of one on-policy step (no ratio, no entropy or KL term)
        cfg = nsr.Config(micro_batch_size=args.micro_batch, clip_eps=0.0, clip_low=0.0, clip_high=0.0,
                         mini_batch_size=None, entropy_coef=0.0, kl_coef=0.0)
        run = runs.bare_run(policy, head_chunk=cfg.head_chunk if args.child == "on" else 0)
        nsr.minibatch_backward(run, nsr.MiniBatch(prompts, responses, [], weights, Z), cfg, runs.StepStats())
        precision.optimizer_step(policy, grad_clip=1.0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step > 0:
            times.append(time.perf_counter() - start)
        print(f"  [checkpointing {args.child}] step {step}: {time.perf_counter() - start:.1f}s", flush=True)
    # the part of the peak checkpointing cannot shrink, counted from the tensors themselves: weights,
    # fp32 masters (if separate), one gradient per master, AdamW's two moments. (Not RSS after the step:
    # the CPU allocator keeps freed memory mapped, so RSS never goes back down.)
    tensors = list(params) + ([] if master is params else list(master))
    tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    static = (sum(t.numel() * t.element_size() for t in tensors)
              + sum(m.numel() * 4 for m in master)) / 2**30
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"checkpointing": args.child, "device": device.type,
            "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
            "tokens_per_s": round(n * args.seq_len / statistics.median(times), 1),
            "step_s": [round(t, 2) for t in times], "peak_gib": round(peak, 3),
            "static_gib": round(static, 3), "peak_minus_static_gib": round(peak - static, 3),
            "rss_after_build_gib": round(rss_built, 3) if device.type == "cpu" else None}


def bench_train(args) -> dict:
    """Run both modes in subprocesses and compare."""
    if args.child:
        return train_child(args)
    results = {}
    for mode in ("off", "on"):
        cmd = [sys.executable, str(HERE / "bench.py"), "train", "--child", mode, "--steps", str(args.steps),
               "--sequences", str(args.sequences), "--micro-batch", str(args.micro_batch),
               "--seq-len", str(args.seq_len), "--threads", str(args.threads)]
        print(f"[train] gradient checkpointing {mode}: {args.sequences} x {args.seq_len} tokens, "
              f"micro-batch {args.micro_batch}", flush=True)
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"bench train child ({mode}) failed:\n{out.stderr[-3000:]}")
        print("\n".join(out.stdout.strip().splitlines()[:-1]), flush=True)
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  -> {results[mode]['tokens_per_s']} tokens/s, peak {results[mode]['peak_gib']} GiB "
              f"(of which weights + grads + AdamW state {results[mode]['static_gib']} GiB)", flush=True)
    return {"benchmark": "train", "device": results["off"]["device"], "params_M": results["off"]["params_M"],
            "seq_len": args.seq_len, "sequences": args.sequences, "micro_batch": args.micro_batch,
            "tokens_per_s_off": results["off"]["tokens_per_s"], "tokens_per_s_on": results["on"]["tokens_per_s"],
            "peak_gib_off": results["off"]["peak_gib"], "peak_gib_on": results["on"]["peak_gib"],
            # the part checkpointing acts on: activations + logits (+ the process's own ~0.3 GiB on CPU)
            "peak_minus_static_ratio": round(results["off"]["peak_minus_static_gib"]
                                             / results["on"]["peak_minus_static_gib"], 2),
            "memory_ratio": round(results["off"]["peak_gib"] / results["on"]["peak_gib"], 2),
            "speed_ratio_on_over_off": round(results["on"]["tokens_per_s"] / results["off"]["tokens_per_s"], 2),
            "target_memory_ratio": 2.0, "details": results}


# =================================================================================================
# OFFLOAD: one AdamW step on CPU for the fp32 state of a 1.54e9-parameter model (--optimizer-offload)
# =================================================================================================
#
# python bench.py offload   with --optimizer-offload the fp32 masters, their grads and AdamW's m, v live
#                           in CPU RAM and torch's AdamW steps there (precision.make_trainable). This times
#                           step, and two CPU-side passes: an fp32 += bf16 add (what grads_to_master would
#                           cost per micro-batch if the sum lived on the CPU; it lives on the GPU) and
#                           optimizer_step's fp32 master -> bf16 weights copy, on random tensors of
#                           Qwen2.5-Math-1.5B's size. NOTE: the full state is 16 B x 1.54e9 = 24.7 GB, more
#                           than this 24 GB machine has, so --fraction measures a part of it and scales
#                           linearly (AdamW's foreach step is elementwise: memory-bound, linear in size);
#                           two fractions show whether the scaling holds.

QWEN_MATH_1_5B = 1_543_714_304                         # presets.param_count(presets.ARCHITECTURES["Qwen/Qwen2.5-Math-1.5B"])


def bench_offload(args) -> dict:
    torch.set_num_threads(args.threads)
    results = []
    for fraction in args.fractions:
        n = int(QWEN_MATH_1_5B * fraction)
        sizes = [16 * 2 ** 20] * (n // (16 * 2 ** 20)) + [n % (16 * 2 ** 20)]     # 16M-element "layers"
        g = torch.Generator().manual_seed(0)
        master = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in sizes if s]
        for m in master:
            m.grad = torch.randn(m.shape, generator=g) * 1e-3
        bf16_grads = [m.grad.to(torch.bfloat16) for m in master]
        bf16_weights = [m.detach().to(torch.bfloat16) for m in master]
        optimizer = torch.optim.AdamW(master, lr=1e-6, betas=(0.9, 0.999), weight_decay=0.01)
        optimizer.step()                                   # warm-up: allocates m and v
        step_s, add_s, copy_s = [], [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            optimizer.step()
            t1 = time.perf_counter()
            for m, gb in zip(master, bf16_grads):          # fp32 += bf16: one micro-batch's sum, on a CPU
                m.grad.add_(gb)
            t2 = time.perf_counter()
            with torch.no_grad():
                for w, m in zip(bf16_weights, master):     # optimizer_step: bf16 model <- round(master)
                    w.copy_(m)
            t3 = time.perf_counter()
            step_s.append(t1 - t0)
            add_s.append(t2 - t1)
            copy_s.append(t3 - t2)
        scale = QWEN_MATH_1_5B / n
        row = {"fraction": fraction, "params": n, "adamw_step_s": statistics.median(step_s),
               "grad_add_s": statistics.median(add_s), "weight_copy_s": statistics.median(copy_s),
               "adamw_step_s_at_1.54e9": statistics.median(step_s) * scale,
               "grad_add_s_at_1.54e9": statistics.median(add_s) * scale,
               "weight_copy_s_at_1.54e9": statistics.median(copy_s) * scale}
        print(f"  {n / 1e9:.3f}e9 params: AdamW step {row['adamw_step_s']:.2f} s (x{scale:.1f} = "
              f"{row['adamw_step_s_at_1.54e9']:.1f} s at 1.54e9), fp32 += bf16 grad {row['grad_add_s']:.2f} s, "
              f"master -> bf16 {row['weight_copy_s']:.2f} s", flush=True)
        results.append(row)
        del master, bf16_grads, bf16_weights, optimizer
    return {"benchmark": "offload", "threads": args.threads, "results": results}


# =================================================================================================
# GPU: one prepared check of the real-model path on whatever CUDA device is present
# =================================================================================================
#
# python bench.py gpu       the Qwen2.5-Math-1.5B preset's architecture, randomly initialised (nothing is
#                           downloaded), bf16 with fp32 masters and the preset's settings, shrunk in
#                           rollouts and response length so the whole check takes a few minutes:
#                             1. one RL step (nsr.train, reinforce, random rewards so both signs train, one
#                                mini-batch holding the whole batch, clip 0.001): peak GPU memory against
#                                presets.memory_plan of the same config, and the bf16 on-policy check of
#                                --old-logprobs training (clip_frac_pos = clip_frac_neg = 0) vs sampler;
#                             2. tokens/s of sample.generate vs model.generate on the same model.
#                           Without CUDA it says so in one line and exits 0. Budget: <= 8 minutes.

def gpu_world(root: pathlib.Path, arch: dict, dtype: torch.dtype) -> pathlib.Path:
    """A saved random Qwen2 of `arch` + the toy's char tokenizer + 16 one-digit addition problems."""
    from transformers import Qwen2Config
    tokenizer = toy.build_tokenizer()
    config = Qwen2Config(vocab_size=arch["vocab"], hidden_size=arch["hidden"], intermediate_size=arch["intermediate"],
                         num_hidden_layers=arch["layers"], num_attention_heads=arch["heads"],
                         num_key_value_heads=arch["kv_heads"], tie_word_embeddings=arch["tied"],
                         max_position_embeddings=arch["max_positions"], eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    world = root / "model"
    Qwen2ForCausalLM(config).to(dtype).save_pretrained(world)
    tokenizer.save_pretrained(world)
    with (world / "train.jsonl").open("w") as f:
        for a in range(16):
            f.write(json.dumps({"problem": f"{a % 9}+{a // 9 + 1}", "answer": str(a % 9 + a // 9 + 1)}) + "\n")
    return world


def gpu_check(device: str, arch: dict, batch_prompts: int, group_size: int, max_new_tokens: int,
              root: pathlib.Path) -> dict:
    """Steps 1-2 of the banner on `device` (the test runs it on CPU with a tiny arch)."""
    import presets
    cuda = device.startswith("cuda")
    world = gpu_world(root, arch, torch.bfloat16)
    preset = {**presets.PRESETS["qwen2.5-math-1.5b"], "model": str(world)}
    out = {"device": torch.cuda.get_device_name(0) if cuda else device, "arch_params": presets.param_count(arch)}
    for mode in ("training", "sampler"):
        cfg = nsr.Config(**{**preset, "train": str(world / "train.jsonl"), "template": "plain", "steps": 1,
                            "batch_prompts": batch_prompts, "group_size": group_size,
                            "max_new_tokens": max_new_tokens, "mini_batch_size": batch_prompts * group_size,
                            "objective": "reinforce", "reward": "random", "clip_eps": 0.001,
                            "entropy_coef": 0.0, "eval_n": 0, "device": device, "old_logprobs": mode,
                            "optimizer_offload": cuda and preset["optimizer_offload"],
                            "out_dir": str(root / f"run-{mode}")})
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        metrics = nsr.train(cfg)["metrics"]
        out[mode] = {"clip_frac_pos": metrics["clip_frac_pos"], "clip_frac_neg": metrics["clip_frac_neg"],
                     "step_s": round(time.perf_counter() - start, 1), "response_len": metrics["response_len"],
                     "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None}
        if mode == "training":
            plan = presets.memory_plan(runs.resolve(cfg), arch)
            out["plan_peak_gib"] = round(plan["peak"] / 2**30, 2)
    model = loading.load_model(str(world), "bfloat16", torch.device(device))[0]
    prompts = [list(range(10, 10 + 8 + i)) for i in range(batch_prompts) for _ in range(group_size)]
    args = types.SimpleNamespace(temperature=1.0, top_p=1.0, chunk_size=batch_prompts * group_size, repeats=1,
                                 threads=torch.get_num_threads())
    out["generate"] = compare("gpu", model, prompts, args, max_new_tokens)   # ours vs model.generate
    return out


def bench_gpu(args) -> dict | None:
    if not torch.cuda.is_available():
        print("bench.py gpu: no CUDA device on this machine; nothing measured (run it where a GPU is)")
        raise SystemExit(0)
    import presets
    import tempfile
    with tempfile.TemporaryDirectory() as root:
        return {"benchmark": "gpu", **gpu_check("cuda", presets.ARCHITECTURES["Qwen/Qwen2.5-Math-1.5B"],
                                                args.batch_prompts, args.group_size, args.max_new_tokens,
                                                pathlib.Path(root))}


# =================================================================================================
# EVAL: passk.evaluate now vs passk.evaluate as it was before its speed-up (one process, alternating)
# =================================================================================================

# The last commit before passk.evaluate's speed-up and common random numbers: its passk.py and sample.py
# are loaded from git as the "old" path, so the tree keeps one sampler and the baseline is the real code.
EVAL_BASELINE = "edee8c7"


def module_at(rev: str, name: str, **replace) -> types.ModuleType:
    """The module `name`.py as it was at git revision rev (read with `git show`), with its globals named in
    `replace` (e.g. its `sample`) pointed at other modules."""
    try:
        source = subprocess.run(["git", "show", f"{rev}:{name}.py"], cwd=HERE, capture_output=True, text=True,
                                check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit(f"bench.py eval: cannot read {name}.py at revision {rev} with git ({e}); "
                         f"--baseline needs a git checkout that has that commit") from None
    module = types.ModuleType(f"{name}_at_{rev}")
    module.__file__ = str(HERE / f"{name}.py")
    sys.modules[module.__name__] = module              # dataclasses look their module up there
    exec(compile(source, f"{rev}:{name}.py", "exec"), module.__dict__)
    module.__dict__.update(replace)
    return module


def bench_eval(args) -> dict:
    """tokens/s of passk.evaluate (old, new without and with common random numbers) on one model's problems."""
    torch.set_num_threads(args.threads)
    model_dir = pathlib.Path(args.model or HERE / toy.base_dir(0))
    if not (model_dir / "config.json").is_file():
        raise SystemExit(f"bench.py eval: --model {model_dir} has no config.json (build it: python toy.py)")
    data = pathlib.Path(args.data or model_dir / "test_hard.jsonl")
    problems = loading.load_problems(data)[:args.problems]
    model, tokenizer = loading.load_model(str(model_dir), dtype="float32", device="cpu")
    old_sample = module_at(args.baseline, "sample")
    old_passk = module_at(args.baseline, "passk", sample=old_sample)
    runs_ = {"old": lambda **kw: old_passk.evaluate(**kw),
             "new, one generator": lambda **kw: passk.evaluate(common_random_numbers=False, **kw),
             "new": lambda **kw: passk.evaluate(**kw)}
    print(f"[eval] {model_dir} on {len(problems)} problems of {data.name} x n={args.n}, max_new_tokens "
          f"{args.max_new_tokens}, chunk {args.chunk_size}, threads {args.threads}; old = {args.baseline}", flush=True)
    rates = {label: [] for label in runs_}
    for r in range(args.repeats + 1):                  # repeat 0 is an untimed warm-up
        for label, fn in (list(runs_.items()) if r % 2 else list(runs_.items())[::-1]):
            start = time.perf_counter()
            result = fn(model=model, tokenizer=tokenizer, problems=problems, n=args.n, seed=r,
                        max_new_tokens=args.max_new_tokens, chunk_size=args.chunk_size, desc=label)
            seconds = time.perf_counter() - start
            n_tokens = round(result["mean_length"] * result["n"] * result["num_problems"])
            if r > 0:
                rates[label].append(n_tokens / seconds)
                print(f"  repeat {r} {label:>18}: {n_tokens:7d} tokens in {seconds:6.2f} s = "
                      f"{n_tokens / seconds:8.0f} tok/s (Pass@1 {result['curve'][1]:.3f})", flush=True)
    medians = {label: statistics.median(v) for label, v in rates.items()}
    ratio = medians["new"] / medians["old"]
    paired = [new / old for new, old in zip(rates["new"], rates["old"])]    # the same repeat: the same load
    print(f"[eval] median tok/s: " + ", ".join(f"{k} {v:.0f}" for k, v in medians.items())
          + f"; ratio new / old {ratio:.2f} (per repeat {', '.join(f'{r:.2f}' for r in paired)})", flush=True)
    return {"benchmark": "eval", "threads": args.threads, "repeats": args.repeats, "n": args.n,
            "problems": len(problems), "baseline": args.baseline,
            "tok_s": {k: round(v) for k, v in medians.items()}, "ratio": round(ratio, 3), "target": 2.0,
            "ratio_per_repeat": [round(r, 3) for r in paired],
            "all": {k: [round(x) for x in v] for k, v in rates.items()}}


# =================================================================================================
# VERIFIER: worst-case milliseconds on adversarial inputs (the timing the tests leave out)
# =================================================================================================

def bench_verifier(args) -> dict:
    """verifier.worst_case_ms, median of args.repeats runs per input."""
    runs_ms = [verifier.worst_case_ms() for _ in range(args.repeats)]
    result = {name: round(statistics.median(r[name] for r in runs_ms), 1) for name in runs_ms[0]}
    for name, ms in result.items():
        print(f"{name:<34} worst call {ms:6.1f} ms")
    return {"worst_call_ms": result, "max_ms": max(result.values())}


# =================================================================================================
# MAIN
# =================================================================================================

def add_sampling_parsers(sub) -> None:
    """The sampler's and the evaluation's benchmarks."""
    sp = sub.add_parser("sampler", help="sample.generate vs transformers' generate, tokens/s")
    sp.add_argument("--repeats", type=int, default=3, help="timed repeats per sampler (median is reported)")
    sp.add_argument("--new-tokens-a", type=int, default=64, help="max new tokens per rollout on model (a)")
    sp.add_argument("--new-tokens-b", type=int, default=32, help="max new tokens per rollout on model (b)")
    sp.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (both samplers)")
    sp.add_argument("--top-p", type=float, default=1.0, help="nucleus top-p (both samplers)")
    sp.add_argument("--rollouts-a", type=int, default=256, help="rollouts on model (a)")
    sp.add_argument("--rollouts-b", type=int, default=16, help="rollouts on model (b)")
    sp.add_argument("--per-prompt", type=int, default=None,
                    help="rollouts per distinct prompt (default 8 on (a), 4 on (b); 1 = all prompts distinct)")
    sp.add_argument("--chunk-size", type=int, default=256, help="sample.generate chunk size")
    sp.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1 = steadiest timings on a shared machine)")
    sp.add_argument("--only", default="ab", help="which models to run: a, b or ab")
    sp.add_argument("--toy", action="store_true", help="(a) = toy.py's model on its prompts (trained runs/toy-base-s0 if built, "
                                                        "else freshly initialised)")
    sp.set_defaults(fn=bench_sampler)

    sp = sub.add_parser("eval", help="passk.evaluate tokens/s, now vs before its speed-up (git --baseline)")
    sp.add_argument("--model", help="model directory (default runs/toy-base-s0, built by python toy.py)")
    sp.add_argument("--data", help="JSONL problems (default the model's test_hard.jsonl)")
    sp.add_argument("--problems", type=int, default=32, help="first PROBLEMS problems of --data")
    sp.add_argument("--n", type=int, default=256, help="samples per problem")
    sp.add_argument("--max-new-tokens", type=int, default=64, help="response budget (toy.py's is 64)")
    sp.add_argument("--chunk-size", type=int, default=256, help="rows per sampling batch (passk's default)")
    sp.add_argument("--repeats", type=int, default=3, help="timed repeats per path (median is reported)")
    sp.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    sp.add_argument("--baseline", default=EVAL_BASELINE, help="git revision whose passk.py/sample.py are 'old'")
    sp.set_defaults(fn=bench_eval)


def build_parser() -> argparse.ArgumentParser:
    """One subcommand per benchmark, with its knobs."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="benchmark", required=True)
    add_sampling_parsers(sub)
    sp = sub.add_parser("train", help="training tokens/s and peak memory, gradient checkpointing on vs off")
    sp.add_argument("--steps", type=int, default=2, help="timed steps per mode (after one warm-up step)")
    sp.add_argument("--sequences", type=int, default=8, help="sequences per step (the rollout batch)")
    sp.add_argument("--micro-batch", type=int, default=8, help="sequences per forward/backward")
    sp.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (128 prompt + response)")
    sp.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    sp.add_argument("--child", choices=["on", "off"], default=None, help=argparse.SUPPRESS)
    sp.set_defaults(fn=bench_train)

    sp = sub.add_parser("offload", help="one CPU AdamW step for 1.54e9 parameters (--optimizer-offload)")
    sp.add_argument("--fractions", type=float, nargs="+", default=[0.125, 0.25],
                    help="parts of 1.54e9 parameters to allocate (16 bytes each); scaled linearly")
    sp.add_argument("--repeats", type=int, default=3, help="timed steps (median reported)")
    sp.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    sp.set_defaults(fn=bench_offload)

    sp = sub.add_parser("gpu", help="one RL step of the Qwen2.5-Math-1.5B preset (random init) on CUDA: memory, "
                                    "sampler speed, the bf16 on-policy check")
    sp.add_argument("--batch-prompts", type=int, default=4, help="prompts per step")
    sp.add_argument("--group-size", type=int, default=8, help="rollouts per prompt")
    sp.add_argument("--max-new-tokens", type=int, default=256, help="response budget (a random model never stops)")
    sp.set_defaults(fn=bench_gpu)

    sp = sub.add_parser("verifier", help="the verifier's slowest call on adversarial inputs, ms")
    sp.add_argument("--repeats", type=int, default=3, help="runs per input (median reported)")
    sp.set_defaults(fn=bench_verifier)

    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "repeats", 1) < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    result = args.fn(args)
    print(json.dumps(result))                          # last line: one JSON object


if __name__ == "__main__":
    main()
