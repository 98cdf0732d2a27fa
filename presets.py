"""
presets.py -- one consumer GPU (24 GB): the presets, the published architectures, the memory plan.
OPTIONAL READING, a data file in spirit: `python nsr.py --preset NAME --dry-run` prints a preset's plan.

The numbers are ESTIMATES from the formulas in memory_plan() until measured on a GPU
(docs/real-models.md says what was measured). Bytes per parameter: precision.py's docstring (20 for a
bf16 model with fp32 masters, 16 for fp32; --optimizer-offload moves 16 of them to CPU RAM). ppo doubles
the model state: its critic is a second copy with its own optimizer (same scheme).
On one 24 GiB card (P = parameters): Qwen2.5-0.5B 9.2 GiB and Qwen3-0.6B 11.1 GiB fit in bf16;
Llama-3.2-1B only in fp32 (18.4 GiB); Qwen2.5-Math-1.5B (28.8 GiB in bf16) only with
--optimizer-offload (11.5 GiB of weights, grads and their fp32 sum on the GPU, 23 GiB in CPU RAM);
Qwen2.5-Math-7B (142 GiB) not at all: the paper trains it on 8 GPUs with FSDP (docs/scaling.md).

The paper's own settings (official-recipe.md): 1024 prompts x 8 rollouts per step, prompts <= 1024
and responses <= 3072 tokens, lr 1e-6, mini-batches of 1/4 of the batch, clip 0.2, gradient
checkpointing. The presets keep G = 8, lr 1e-6, temperature 1 and the paper's update, and shrink the
prompts per step (32) and, below 1.5B, the lengths.
"""

from __future__ import annotations

import json
import pathlib

import precision

# Published architecture numbers: each model's config.json on the Hugging Face hub
# (huggingface.co/<name>/blob/main/config.json). Hard-coded because nothing can be downloaded here;
# arch_from_config() reads a local config instead. The parameter counts they give (param_count) are the
# published sizes: 1.54B, 7.62B, 0.49B, 0.60B, 1.24B (checked against transformers in test_nsr.py).
ARCHITECTURES = {
    "Qwen/Qwen2.5-Math-1.5B": dict(hidden=1536, layers=28, heads=12, kv_heads=2, head_dim=128,
                                   intermediate=8960, vocab=151936, tied=True, qkv_bias=True,
                                   qk_norm=False, max_positions=4096),
    "Qwen/Qwen2.5-Math-7B": dict(hidden=3584, layers=28, heads=28, kv_heads=4, head_dim=128,
                                 intermediate=18944, vocab=152064, tied=False, qkv_bias=True,
                                 qk_norm=False, max_positions=4096),
    "Qwen/Qwen2.5-0.5B-Instruct": dict(hidden=896, layers=24, heads=14, kv_heads=2, head_dim=64,
                                       intermediate=4864, vocab=151936, tied=True, qkv_bias=True,
                                       qk_norm=False, max_positions=32768),
    "Qwen/Qwen3-0.6B": dict(hidden=1024, layers=28, heads=16, kv_heads=8, head_dim=128,
                            intermediate=3072, vocab=151936, tied=True, qkv_bias=False,
                            qk_norm=True, max_positions=40960),
    "meta-llama/Llama-3.2-1B-Instruct": dict(hidden=2048, layers=16, heads=32, kv_heads=8, head_dim=64,
                                             intermediate=8192, vocab=128256, tied=True,
                                             qkv_bias=False, qk_norm=False, max_positions=131072),
}

# Config overrides per preset (`--preset NAME`; flags given on the command line win). Sized with
# memory_plan() to stay under 24 GiB. Every key is a Config field.
PRESETS = {
    "qwen2.5-0.5b-instruct": dict(model="Qwen/Qwen2.5-0.5B-Instruct", template="qwen2.5-math",
                                  dtype="bfloat16", batch_prompts=32, group_size=8, max_prompt_len=512,
                                  max_new_tokens=1536, micro_batch_size=2, grad_checkpointing="on",
                                  chunk_size=128, lr=1e-6, temperature=1.0),
    # Non-thinking mode (the empty think block), as the paper's Qwen3 runs.
    "qwen3-0.6b": dict(model="Qwen/Qwen3-0.6B", template="qwen3", dtype="bfloat16", batch_prompts=32,
                       group_size=8, max_prompt_len=512, max_new_tokens=1536, micro_batch_size=2,
                       grad_checkpointing="on", chunk_size=32, lr=1e-6, temperature=1.0),
    # Beyond Qwen. fp32 weights are their own master (16 instead of 20 bytes/param): the only way
    # 1.24e9 params fit on 24 GiB without offload; fp32 compute is slower. "llama3" renders Llama 3's
    # header format without the date lines of the 3.1+ templates (see loading.py's templates).
    "llama-3.2-1b-instruct": dict(model="meta-llama/Llama-3.2-1B-Instruct", template="llama3",
                                  dtype="float32", batch_prompts=32, group_size=8, max_prompt_len=512,
                                  max_new_tokens=1024, micro_batch_size=1, grad_checkpointing="on",
                                  chunk_size=16, lr=1e-6, temperature=1.0),
    # The paper's model family: its lengths (prompt <= 1024, response <= 3072), G = 8, lr 1e-6, the
    # paper's update (mini-batches of 64 = 1/4 of 32 x 8), and the fp32 state offloaded to CPU RAM.
    "qwen2.5-math-1.5b": dict(model="Qwen/Qwen2.5-Math-1.5B", template="qwen2.5-math", dtype="bfloat16",
                              batch_prompts=32, group_size=8, max_prompt_len=1024, max_new_tokens=3072,
                              micro_batch_size=1, grad_checkpointing="on", chunk_size=32, lr=1e-6,
                              temperature=1.0, mini_batch_size=64, clip_eps=0.2, optimizer_offload=True),
}

GIB = 2 ** 30


def arch_from_config(config) -> dict:
    """Architecture numbers from a transformers config, a config.json dict, or a model directory."""

    if isinstance(config, (str, pathlib.Path)):
        config = json.loads((pathlib.Path(config) / "config.json").read_text())
    elif not isinstance(config, dict):
        config = config.to_dict()
    model_type = config.get("model_type", "")
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    return dict(hidden=hidden, layers=config["num_hidden_layers"], heads=heads,
                kv_heads=config.get("num_key_value_heads") or heads,
                head_dim=config.get("head_dim") or hidden // heads,
                intermediate=config["intermediate_size"], vocab=config["vocab_size"],
                tied=bool(config.get("tie_word_embeddings", False)),
                qkv_bias=model_type == "qwen2" or bool(config.get("attention_bias", False)),
                qk_norm=model_type == "qwen3", max_positions=config.get("max_position_embeddings"))


def param_count(arch: dict) -> int:
    """Exact parameter count of a Qwen2 / Qwen3 / Llama decoder with these numbers."""
    h, q_dim, kv_dim = arch["hidden"], arch["heads"] * arch["head_dim"], arch["kv_heads"] * arch["head_dim"]
    attn = h * q_dim + 2 * h * kv_dim + q_dim * h                  # q, k, v, o projections
    attn += (q_dim + 2 * kv_dim) if arch["qkv_bias"] else 0        # Qwen2: biases on q, k, v
    attn += 2 * arch["head_dim"] if arch["qk_norm"] else 0         # Qwen3: RMSNorm on q and k heads
    mlp = 3 * h * arch["intermediate"]                             # SwiGLU: gate, up, down
    layer = attn + mlp + 2 * h                                     # + two RMSNorms
    embed = arch["vocab"] * h * (1 if arch["tied"] else 2)         # embedding (+ untied lm_head)
    return embed + arch["layers"] * layer + h                      # + final RMSNorm


def memory_plan(cfg, arch: dict | None = None, gpu_gib: float = 24.0) -> dict:
    """Estimated GPU bytes of one training run, per component (the formulas are in the comments).

    cfg: an nsr.Config (e.g. nsr.Config(**PRESETS[name]), or what --dry-run resolved).
    arch: architecture numbers; default ARCHITECTURES[cfg.model], or the model dir's local config.json.
    Returns the components, "peak", "fits" (peak <= gpu_gib), "cpu_ram" (offloaded state) and
    "ppo_peak" / "ppo_fits" / "ppo_cpu_ram": the same run with ppo's critic added.
    """
    plan = _components(cfg, arch if arch is not None else _architecture(cfg.model))
    return _peaks(plan, gpu_gib)


def _architecture(model: str) -> dict:
    """The architecture numbers of a model: ARCHITECTURES[model], or the model dir's local config.json."""
    if model in ARCHITECTURES:
        return ARCHITECTURES[model]
    if pathlib.Path(str(model)).is_dir():
        return arch_from_config(model)
    raise ValueError(f"no architecture numbers for {model!r}: add it to ARCHITECTURES, "
                     f"or pass a local model directory")


def _components(cfg, arch: dict) -> dict:
    """memory_plan's bytes of each thing a run holds: weights, gradients, fp32 state, activations, logits,
    the KV cache, the prefill transient and the overhead (and the sizes they were computed from)."""
    n = param_count(arch)
    act = 4 if cfg.dtype == "float32" else 2          # bytes per weight/activation ("auto" = bf16 on a GPU)
    h, L, V, I = arch["hidden"], arch["layers"], arch["vocab"], arch["intermediate"]
    q_dim, kv_dim = arch["heads"] * arch["head_dim"], arch["kv_heads"] * arch["head_dim"]
    prompt_len = cfg.max_prompt_len or 1024           # None = no limit: assume 1024 (the paper's)
    T = prompt_len + cfg.max_new_tokens               # the longest sequence (tokens)
    b = cfg.micro_batch_size                          # sequences per forward/backward
    rows = min(cfg.chunk_size, cfg.batch_prompts * cfg.group_size)   # rows sampled at once
    ckpt = precision.checkpointing_on(cfg, n)
    offload = bool(cfg.optimizer_offload)
    plan = {"preset": cfg.preset or cfg.model, "model": cfg.model, "params": n, "dtype": "float32" if act == 4 else "bfloat16",
            "seq_len": T, "micro_batch": b, "rows_in_flight": rows, "grad_checkpointing": ckpt,
            "optimizer_offload": offload}
    # weights and their gradients in the compute dtype: P x 2 bytes each in bf16 (P x 4 in fp32)
    plan["weights"] = plan["gradients"] = n * act
    # fp32 state: masters + their grads (bf16 or offloaded models only) + AdamW's m and v: P x (8 + 8)
    plan["fp32_state"] = n * (8 if act == 2 or offload else 0) + n * 8
    # Activations kept for backward, per token and layer: the block input and its RMSNorm (2h), q, k, v,
    # the attention output (2 q_dim + 2 kv_dim), the residual and its RMSNorm (2h), SwiGLU's gate,
    # silu(gate), up and their product (4 I); SDPA keeps no T x T matrix. With checkpointing: each
    # block's input (h) plus ONE block recomputed in backward.
    per_token_layer = 4 * h + 2 * q_dim + 2 * kv_dim + 4 * I
    plan["activations"] = (b * T * L * h + b * T * per_token_layer) * act if ckpt else b * T * L * per_token_layer * act
    # logits: b x positions x V x (act + 4 + 4) -- the lm_head output, its fp32 log-softmax and that one's
    # gradient; positions = the response (logits_to_keep), or one head_chunk with checkpointing
    positions = min(cfg.head_chunk, cfg.max_new_tokens) if ckpt and cfg.head_chunk > 0 else cfg.max_new_tokens
    plan["logits"] = b * positions * V * (act + 4 + 4)
    # sampling: the KV cache, layers x 2 (k, v) x kv_dim x T x rows, and one block's prefill transient
    plan["kv_cache"] = L * 2 * kv_dim * T * rows * act
    plan["prefill"] = rows * prompt_len * 3 * I * act
    plan["overhead"] = GIB                                # CUDA context + allocator fragmentation: a guess
    return plan


def _peaks(plan: dict, gpu_gib: float) -> dict:
    """memory_plan's sums: what is on the GPU at once while sampling and while training, with ppo's
    critic, in CPU RAM, and whether each fits gpu_gib."""
    n, act, offload = plan["params"], 4 if plan["dtype"] == "float32" else 2, plan["optimizer_offload"]
    on_gpu = 0 if offload else plan["fp32_state"]
    # while sampling every gradient is freed (zero_grads); while training, everything at the end of a
    # micro-batch's backward. ppo adds a critic of the same size, trained one model at a time.
    master_grads = n * 4 if act == 2 and not offload else 0                  # freed while sampling
    plan["peak_sampling"] = (plan["weights"] + on_gpu - master_grads + plan["kv_cache"] + plan["prefill"]
                             + plan["overhead"])
    # with offload the GPU still sums each micro-batch's grads in fp32 (grads_to_master): + P x 4 bytes
    plan["grad_sum"] = n * 4 if offload else 0
    plan["peak_training"] = (plan["weights"] + plan["gradients"] + on_gpu + plan["grad_sum"] + plan["activations"]
                             + plan["logits"] + plan["overhead"])
    plan["peak"] = max(plan["peak_sampling"], plan["peak_training"])
    plan["cpu_ram"] = plan["fp32_state"] if offload else 0
    critic = plan["weights"] + on_gpu                     # the critic's weights and its fp32 state (on the GPU)
    plan["ppo_peak"] = max(plan["peak_sampling"], plan["peak_training"]) + critic
    plan["ppo_cpu_ram"] = 2 * plan["cpu_ram"]
    plan["budget"] = int(gpu_gib * GIB)
    plan["fits"], plan["ppo_fits"] = plan["peak"] <= plan["budget"], plan["ppo_peak"] <= plan["budget"]
    return plan


def format_memory_plan(plan: dict) -> str:
    """The plan as a small text table (what --dry-run prints)."""
    rows = [(f"weights ({plan['dtype']})", "weights"), ("gradients", "gradients"),
            ("fp32 masters + grads + AdamW m, v", "fp32_state"),
            ("fp32 grad sum on the GPU (offload)", "grad_sum"),
            (f"activations (checkpointing {'on' if plan['grad_checkpointing'] else 'off'})", "activations"),
            ("logits (head_chunk or response)", "logits"),
            ("KV cache while sampling", "kv_cache"), ("prefill transient", "prefill"),
            ("CUDA context etc. (guess)", "overhead"),
            ("PEAK while sampling", "peak_sampling"), ("PEAK while training", "peak_training")]
    lines = [f"memory plan (ESTIMATE until measured on a GPU): {plan['preset']}",
             f"  {plan['params'] / 1e9:.3f}B params, {plan['seq_len']}-token sequences, micro-batch "
             f"{plan['micro_batch']}, {plan['rows_in_flight']} rows sampled at once"]
    for label, key in rows:
        note = "  (CPU RAM)" if key == "fp32_state" and plan["optimizer_offload"] else ""
        lines.append(f"  {label:<36}{plan[key] / GIB:>8.2f} GiB{note}")
    verdict = "fits" if plan["fits"] else "DOES NOT FIT"
    lines.append(f"  {'budget':<36}{plan['budget'] / GIB:>8.2f} GiB  -> {verdict}")
    if plan["cpu_ram"]:
        lines.append(f"  {'CPU RAM for the offloaded state':<36}{plan['cpu_ram'] / GIB:>8.2f} GiB")
    lines.append(f"  {'with --objective ppo (+ critic)':<36}{plan['ppo_peak'] / GIB:>8.2f} GiB  -> "
                 f"{'fits' if plan['ppo_fits'] else 'DOES NOT FIT'}"
                 + (f", CPU RAM {plan['ppo_cpu_ram'] / GIB:.2f} GiB" if plan["ppo_cpu_ram"] else ""))
    return "\n".join(lines)
