"""
sample.py -- the bottom of the stack: load a model, render prompts, read problems, and sample rollouts.

Everything that turns "a model and some problems" into "token ids and sampled responses", shared by
passk.py (evaluation), nsr.py (training) and toy.py (the toy world). It imports only verifier.py, so
the files import one way:   verifier.py, sample.py  <-  passk.py  <-  toy.py  <-  nsr.py  <-  reproduce.py

    load_model(name_or_dir)                  -> (model, tokenizer), eval mode, every end-of-turn id as EOS
    load_problems(path.jsonl)                -> [{"problem", "answer"}], errors name FILE:LINE
    encode_prompts(tokenizer, problems)      -> prompt token ids (the paper's prompt template)
    generate(model, prompt_ids, max_new)     -> Rollouts(tokens, logprobs, truncated, entropies)

Run nothing here directly; `python -m pytest -q test_nsr.py -k sampling` tests it.
"""

from __future__ import annotations

import json
import pathlib
import warnings
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

import verifier

# =================================================================================================
# SAMPLING: prompts -> rollouts (hand-written batched sampling with a KV cache)
# =================================================================================================
#
# A causal LM gives p(y_t | prompt, y_<t). Sampling a rollout = draw y_0, feed it back, draw y_1, ...
# until EOS. Written out (instead of calling `model.generate`) so a student can see three things:
#
# 1. The KV cache. Each attention layer turns every token into a key k and a value v; a new token's
#    output only needs its own query q against the keys/values of all EARLIER tokens, and those never
#    change (causal attention: token i cannot see j > i). So we run the prompt once ("prefill"),
#    keep every layer's keys and values, shape (B, n_kv_heads, T, head_dim), and afterwards feed ONE
#    token per step, appending its k, v. Each step then costs O(T) instead of a full O(T^2) forward,
#    and gives the same logits as a full forward pass over the whole sequence (tested).
# 2. Left padding. Prompts have different lengths; to batch them we pad on the LEFT so every row's
#    newest token sits in the last column. Two things keep padding invisible:
#      attention_mask[b, j] = 0 for pad slots   -> no real token attends to a pad key;
#      position_ids[b, j] = cumsum(mask)[b, j] - 1 -> the first real token is at position 0, as if
#                                                   the row had not been padded (RoPE sees positions).
#    The mask grows by one column per step (the new token is real); the cache slot of a token and
#    its position differ by the row's number of pads, which is exactly why both are needed.
# 3. The sampling distribution. With logits z (V,), temperature T and nucleus top-p:
#      pi_T(y) = softmax(z / T)(y)          T -> 0 is greedy (argmax), T = 0 is treated as greedy;
#      nucleus N_p = smallest set of most likely tokens with sum_{y in N_p} pi_T(y) >= p;
#      q(y) = pi_T(y) / sum_{N_p} pi_T      for y in N_p, else 0;     y_t ~ q.
#    We record log q(y_t) (what the sampler actually did) and the policy's own entropy
#    H_t = -sum_y pi_1(y) log pi_1(y) at temperature 1 without top-p (the paper's entropy metric).
#
# NOTE cache choice: transformers' DynamicCache (grows by torch.cat) vs a preallocated StaticCache;
# see the measurement in the comment inside `_generate_chunk`.


@dataclass
class Rollouts:
    """Sampled continuations, one row per prompt, in input order."""
    tokens: list[list[int]]       # generated ids per row, including the EOS when one was produced
    logprobs: list[list[float]]   # log q(y_t): log-prob of each sampled token under the distribution it was
                                  # sampled from (after temperature and top-p); 0.0 for greedy (a point mass)
    truncated: list[bool]         # True = no EOS within max_new_tokens
    entropies: list[list[float]]  # per generated position: entropy (nats) of softmax(logits) at temperature 1,
                                  # without top-p -- the policy's own entropy, what the paper's metric measures


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability mass reaches top_p.

    logits: (..., V). Returns logits of the same shape with every token outside the nucleus set to -inf,
    so softmax of the result is the renormalised nucleus distribution q above.
    """
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_p == 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)            # (..., V) most likely first
    probs = sorted_logits.softmax(dim=-1)
    # mass of the strictly more likely tokens; a token is in N_p iff that mass has not yet reached p.
    # (The most likely token has mass_before = 0 exactly, so N_p is never empty.)
    mass_before = probs.cumsum(dim=-1) - probs                              # (..., V)
    drop_sorted = mass_before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)   # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def default_eos_token_ids(model) -> list[int]:
    """The model's EOS id(s): generation_config first (chat models list several), then config."""
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        if eos is not None:
            return [eos] if isinstance(eos, int) else list(eos)
    raise ValueError("the model defines no eos_token_id; pass eos_token_ids=[...] to generate()")


def generate(model, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, eos_token_ids=None, generator: torch.Generator | None = None,
             chunk_size: int = 256) -> Rollouts:
    """Sample one continuation per prompt with a KV cache (see the comment block above).

    prompt_ids: token-id lists of any lengths (left-padded here). Rows are processed in chunks of at most
    chunk_size rows, which bounds memory (the cache is chunk_size x (prompt + max_new_tokens) tokens).
    temperature 0 = greedy. generator: a torch.Generator on the model's device (None = torch's global RNG).
    Each row stops at its FIRST GENERATED EOS (an EOS inside the prompt does not count).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    for i, row in enumerate(prompt_ids):
        if len(row) == 0:
            raise ValueError(f"prompt_ids[{i}] is empty; every prompt needs at least one token (e.g. BOS)")
    if eos_token_ids is None:
        eos_token_ids = default_eos_token_ids(model)
    elif isinstance(eos_token_ids, int):
        eos_token_ids = [eos_token_ids]

    out = Rollouts(tokens=[], logprobs=[], truncated=[], entropies=[])
    # NOTE: sampling must not use dropout, and gradient checkpointing switches the cache off in train
    # mode, so we sample in eval mode and restore the caller's mode afterwards.
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(prompt_ids), chunk_size):
                chunk = _generate_chunk(model, prompt_ids[start:start + chunk_size], max_new_tokens,
                                        temperature, top_p, eos_token_ids, generator)
                for name in ("tokens", "logprobs", "truncated", "entropies"):
                    getattr(out, name).extend(getattr(chunk, name))
    finally:
        model.train(was_training)
    return out


def left_pad(prompt_ids: list[list[int]], max_new_tokens: int, device, pad_id: int = 0):
    """Left-pad prompts into a batch.

    Returns input_ids (B, P) with pad_id in pad slots (any valid id: they are masked out), attention_mask
    (B, P + max_new_tokens) with 0 for pads and 1 for prompt tokens AND every future generated slot (so
    the mask for decoding step t is just mask[:, :P + t]), and position_ids (B, P): the number of real
    tokens before each prompt token, i.e. cumsum(mask) - 1, with pads clamped to 0.
    """
    B, P = len(prompt_ids), max(len(row) for row in prompt_ids)
    input_ids = torch.full((B, P), pad_id, dtype=torch.long)
    mask = torch.zeros((B, P + max_new_tokens), dtype=torch.long)
    for b, row in enumerate(prompt_ids):
        input_ids[b, P - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[b, P - len(row):] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    position_ids = (mask[:, :P].cumsum(dim=-1) - 1).clamp(min=0)          # (B, P)
    return input_ids, mask, position_ids


def next_token_logits(model, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
    """Run new tokens (B, S) through the model on top of the cache; return the last position's logits.

    attention_mask covers the cached tokens plus the new ones: (B, cache_len + S). The cache is updated
    in place with the new tokens' keys and values. Returns (B, V) in float32 (sampling math in fp32 even
    for a bf16 model: a bf16 softmax over 150k tokens loses the tail).
    """
    # logits_to_keep=1: only the last position's logits are needed (saves a (B, S, V) projection at prefill)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].float()


def _generate_chunk(model, prompt_ids, max_new_tokens, temperature, top_p, eos_token_ids, generator):
    """One batch of rows through prefill + cached decoding. Called under inference_mode by generate()."""
    device = next(model.parameters()).device
    B, P, N = len(prompt_ids), max(len(row) for row in prompt_ids), max_new_tokens

    eos = torch.tensor(eos_token_ids, dtype=torch.long, device=device)

    tokens = torch.zeros((B, N), dtype=torch.long, device=device)         # (B, N) sampled ids
    logprobs = torch.zeros((B, N), dtype=torch.float32, device=device)     # (B, N) log q(y_t)
    entropies = torch.zeros((B, N), dtype=torch.float32, device=device)    # (B, N) H_t at temperature 1
    alive = torch.ones(B, dtype=torch.bool, device=device)                 # (B,) no EOS generated yet
    lengths = torch.zeros(B, dtype=torch.long, device=device)              # (B,) tokens recorded per row
    # Finished rows are evicted from the batch (and the cache), so later steps only pay for live rows.
    # rows[i] = which output row the i-th row of the shrinking batch belongs to.
    rows = torch.arange(B, device=device)                                  # (b,), b <= B live rows

    # The cache holds, for every layer, keys and values of all tokens seen so far: (b, kv_heads, T, hd).
    # NOTE: DynamicCache (torch.cat per step) vs a StaticCache preallocated to P + N: on bench.py's models
    # (CPU, 1 thread, median of 4) we measured 6255 vs 6043 tok/s on the 1M model (256 rows) and 178 vs
    # 172 tok/s on the 100M model (16 rows) -- no clear difference, so we keep the simpler dynamic one
    # (it also lets us evict finished rows with one call).
    cache = DynamicCache(config=model.config)
    # Stopping (and evicting) needs to know which rows are done: a device->host sync. On CPU that sync is
    # free (ops are synchronous); on a GPU it stops the CPU from queueing the next step's kernels ahead,
    # so there we only look every few steps (a finished row then rides along for <= 3 unrecorded steps).
    check_every = 1 if device.type == "cpu" else 4

    # ---- prefill: each DISTINCT prompt once, then copy its cache rows to all its rollouts ---------------
    # An RL step samples G rollouts per problem and Pass@k samples n per problem, so most rows share a
    # prompt; the prompt's keys/values do not depend on what is sampled later, so computing them once
    # per distinct prompt gives the same cache at a fraction of the cost.
    distinct = list(dict.fromkeys(tuple(row) for row in prompt_ids))      # U distinct prompts, in order
    index = {row: u for u, row in enumerate(distinct)}
    inverse = torch.tensor([index[tuple(row)] for row in prompt_ids], device=device)   # (B,) row -> u
    input_ids, mask, position_ids = left_pad(distinct, N, device)         # (U, P), (U, P + N), (U, P)
    logits = next_token_logits(model, input_ids, mask[:, :P], position_ids, cache)[inverse]   # (B, V)
    if len(distinct) < B:
        cache.batch_select_indices(inverse)                  # (U, kv_heads, P, hd) -> (B, kv_heads, P, hd)
    mask, step_pos = mask[inverse], position_ids[inverse, -1:]          # (B, P + N), (B, 1) last position

    for t in range(N):
        if t > 0:
            # feed y_{t-1} at the next position of each row; the cache holds P + t - 1 tokens and the
            # mask column P + t - 1 (the new token) is already 1
            logits = next_token_logits(model, next_ids[:, None], mask[:, :P + t], step_pos, cache)  # (b, V)

        # H_t = -sum_y pi_1(y) log pi_1(y): the policy's entropy at temperature 1, no top-p
        logp_policy = logits.log_softmax(dim=-1)                              # (b, V)
        entropy = -(logp_policy.exp() * logp_policy).sum(dim=-1)              # (b,)

        if temperature == 0:
            # greedy: the sampling distribution is a point mass on the argmax, so log q(y_t) = 0
            next_ids = logits.argmax(dim=-1)                                  # (b,)
            logq_next = torch.zeros_like(entropy)
        else:
            # q = softmax(top_p_filter(z / T)); reuse log pi_1 when neither knob changes it
            if temperature == 1.0 and top_p == 1.0:
                logq = logp_policy
            else:
                logq = top_p_filter(logits / temperature, top_p).log_softmax(dim=-1)   # (b, V)
            # y_t ~ q by the "exponential race": with E_v ~ Exp(1) i.i.d., argmax_v q_v / E_v is
            # distributed as q. It is what torch.multinomial(q, 1) computes internally (same generator
            # -> the same samples; checked on torch 2.13 CPU), minus multinomial's input check, which
            # calls .item() -- a device->host sync on EVERY token on a GPU. Non-finite logits are
            # caught after sampling instead (train() checks the returned log-probs).
            q = logq.exp()                                                              # (b, V)
            race = torch.empty_like(q).exponential_(1, generator=generator)            # (b, V) E_v
            next_ids = (q / race).argmax(dim=-1)                                       # (b,) y_t ~ q
            logq_next = logq.gather(1, next_ids[:, None]).squeeze(1)                   # (b,) log q(y_t)

        # record step t; a row that already finished is not extended (its length stops counting)
        live = alive[rows]                                                     # (b,)
        tokens[rows, t], logprobs[rows, t], entropies[rows, t] = next_ids, logq_next, entropy
        lengths[rows] += live.long()
        alive[rows] = live & ~torch.isin(next_ids, eos)      # the row's first generated EOS ends it
        if (t + 1) % check_every == 0:
            keep = alive[rows].nonzero().squeeze(1)          # host sync: which batch rows are still live
            if keep.numel() == 0:
                break                                        # every row has produced its EOS
            # evict finished rows from batch and cache once they are >= 1/8 of the batch: an eviction
            # copies the whole cache, so evicting rows one by one would cost about as much as it saves
            if rows.numel() - keep.numel() >= max(1, rows.numel() // 8):
                cache.batch_select_indices(keep)
                rows, mask, step_pos, next_ids = rows[keep], mask[keep], step_pos[keep], next_ids[keep]
        step_pos = step_pos + 1                                                # (b, 1) position of y_t

    lengths, truncated = lengths.tolist(), alive.tolist()    # the only other host syncs: once per chunk
    tokens, logprobs, entropies = tokens.tolist(), logprobs.tolist(), entropies.tolist()
    return Rollouts(tokens=[row[:n] for row, n in zip(tokens, lengths)],
                    logprobs=[row[:n] for row, n in zip(logprobs, lengths)],
                    truncated=truncated,
                    entropies=[row[:n] for row, n in zip(entropies, lengths)])



# =================================================================================================
# MODELS, PROMPTS AND DATA: load a model, render the official prompt templates, read JSONL problems
# =================================================================================================
#
# The paper (and its official code, github.com/TianHongZXY/RLVR-Decomposed: eval.py and
# verl/utils/dataset/rl_dataset.py, `qwen_boxed_prompt`) prompts every model with the Qwen2.5-Math
# evaluation prompt: the system line SYSTEM, then the problem followed by INSTRUCTION, in ChatML. The reward only reads the last \boxed{...} of the
# response, so the instruction matters: without it a model often answers in prose and scores 0.
#
# Templates (`--template`), each rendered to ONE string that ends where the assistant starts writing:
#   "qwen2.5-math"  <|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{problem}{INSTRUCTION}
#                   <|im_end|>\n<|im_start|>assistant\n          (ChatML, Qwen2.5 / Qwen2.5-Math)
#   "qwen3"         the same, then the empty think block "<think>\n\n</think>\n\n": this is exactly
#                   what Qwen3's own chat template appends after "<|im_start|>assistant\n" when it is
#                   called with enable_thinking=False (non-thinking mode); source: "chat_template" in
#                   huggingface.co/Qwen/Qwen3-0.6B/blob/main/tokenizer_config.json. NOTE: the paper's
#                   code (verl/utils/dataset/rl_dataset.py, commented-out Qwen3 line) ends the block
#                   with ONE "\n"; we follow Qwen3's template (two), which is what the model was tuned on.
#   "llama3"        <|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{SYSTEM}<|eot_id|>
#                   <|start_header_id|>user<|end_header_id|>\n\n{problem}{INSTRUCTION}<|eot_id|>
#                   <|start_header_id|>assistant<|end_header_id|>\n\n   (the Llama 3 header format,
#                   Meta-Llama-3-8B-Instruct's template). Llama 3.1/3.2's templates also write
#                   "Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n" at the top of the
#                   system turn, where 3.2 fills in TODAY's date: a prompt that changes with the calendar
#                   breaks reproducibility, so "llama3" leaves both lines out (and "auto" keeps them).
#   "plain"         "{problem}{INSTRUCTION}\n"  (no chat markup at all; for base models without a
#                   chat template, e.g. the toy model if it had none)
#   "auto"          the tokenizer's own chat template when it has one (apply_chat_template with
#                   [system, user] messages and add_generation_prompt=True), else "plain".
# Line breaks above are only for reading; the real strings contain exactly the "\n"s shown.

SYSTEM = "You are a helpful assistant."
INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."
TEMPLATES = ("auto", "plain", "qwen2.5-math", "qwen3", "llama3")

# Tokens that end an assistant turn in the chat formats above. A base model (Qwen2.5-Math-1.5B has
# eos = <|endoftext|>) prompted in ChatML ends its answer with <|im_end|>, so sampling must stop on
# both; the official Qwen2.5-Math evaluation stops on the same pair. load_model adds those of
# these tokens that exist in the vocabulary to model.generation_config.eos_token_id.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<|eom_id|>")


def load_model(name_or_dir, dtype="auto", device=None):
    """Load (model, tokenizer) with AutoModelForCausalLM / AutoTokenizer .from_pretrained.

    name_or_dir: a hub name ("Qwen/Qwen2.5-Math-1.5B") or a local directory (e.g. runs/toy-base or a
    checkpoint written by train). A local directory is loaded with local_files_only=True, so no
    network access is attempted for it.
    dtype: "auto" = bfloat16 on CUDA and float32 on CPU (NOTE: this is OUR "auto", not transformers'
    "use the checkpoint's dtype"), or "float32" / "bfloat16" / "float16".
    device: default "cuda" when available, else "cpu".
    The model is returned in eval mode; the caller switches to train() when training.
    """
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif dtype in dtypes:
        torch_dtype = dtypes[dtype]
    else:
        raise ValueError(f"dtype must be one of auto, {', '.join(dtypes)}; got {dtype!r}")

    local = pathlib.Path(str(name_or_dir)).is_dir()
    # transformers 5.x takes `dtype=` (the old `torch_dtype=` is deprecated).
    model = AutoModelForCausalLM.from_pretrained(str(name_or_dir), dtype=torch_dtype,
                                                 local_files_only=local)
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_dir), local_files_only=local)
    model.to(device).eval()

    # Our sampler and loss pad by themselves, but several tokenizer calls (batch encoding, collators)
    # need a pad id to exist; Llama 3 ships none. The eos token is the usual stand-in: padded
    # positions are always masked, so which id fills them does not matter.
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token

    # Stop sampling on every end-of-turn token the vocabulary has (see END_OF_TURN_TOKENS).
    stop_ids = model.generation_config.eos_token_id
    stop_ids = [] if stop_ids is None else [stop_ids] if isinstance(stop_ids, int) else list(stop_ids)
    if tokenizer.eos_token_id is not None:
        stop_ids.append(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    stop_ids += [vocab[t] for t in END_OF_TURN_TOKENS if t in vocab]
    model.generation_config.eos_token_id = sorted(set(stop_ids)) or None
    return model, tokenizer


def render_prompt(tokenizer, problem: str, template: str = "auto") -> str:
    """Render one problem as the prompt string the model continues (see the table above)."""
    user = problem + INSTRUCTION
    if template == "auto":
        if getattr(tokenizer, "chat_template", None):
            messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
            # enable_thinking=False puts Qwen3 in non-thinking mode (as the paper's Qwen3 runs);
            # templates that do not use the variable ignore it, so it is safe for every model.
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                 enable_thinking=False)
        template = "plain"
    if template == "plain":
        return user + "\n"
    if template in ("qwen2.5-math", "qwen3"):
        # ChatML as written by Qwen2.5's chat template (system given explicitly, so its default
        # system line is not used).
        text = (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
                f"<|im_start|>user\n{user}<|im_end|>\n"
                f"<|im_start|>assistant\n")
        if template == "qwen3":
            text += "<think>\n\n</think>\n\n"
        return text
    if template == "llama3":
        return (f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{SYSTEM}<|eot_id|>"
                f"<|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|>"
                f"<|start_header_id|>assistant<|end_header_id|>\n\n")
    raise ValueError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")


def load_problems(path, problem_field: str = "problem", answer_field: str = "answer") -> list[dict]:
    """Read a JSONL file of problems -> [{"problem": str, "answer": str}, ...] in file order.

    One JSON object per line (blank lines are ignored). A record whose `answer_field` is missing or
    empty but that has a MATH-style "solution" gets its answer from the solution's last \\boxed{...}
    (verifier.extract_answer). Errors (malformed JSON, a missing field) name the file and the
    1-based line number and stop: a wrong field name should fail loudly, not train on nothing.

    A record that still has no answer is SKIPPED with a warning naming file:line. NOTE: the MATH
    train split has exactly such records (lines 5342 and 5344 of math_train.jsonl: "answer" is ""
    and the solution ends in an empty \\boxed{}). A problem without a gold answer can never be
    rewarded, so every sample of it would count as wrong -- under NSR that pushes down correct
    reasoning -- so it must not be trained on.
    """

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    problems, unanswered = [], []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            if problem_field not in record:
                raise ValueError(f"{path}:{lineno}: missing field {problem_field!r} "
                                 f"(fields present: {', '.join(record) or 'none'})")
            if answer_field not in record and "solution" not in record:
                raise ValueError(f"{path}:{lineno}: missing field {answer_field!r} and no 'solution' "
                                 f"to take it from (fields present: {', '.join(record)})")
            # Answers are compared as strings by the verifier; JSON numbers (27 for "27") too, and a
            # whole float (27.0, as numeric dataset columns export) becomes "27", not "27.0".
            answer = record.get(answer_field)
            if isinstance(answer, float) and answer.is_integer():
                answer = int(answer)
            answer = "" if answer is None else str(answer).strip()
            if not answer and "solution" in record:
                answer = (verifier.extract_answer(str(record["solution"])) or "").strip()
            if not answer:
                unanswered.append(lineno)
                continue
            problems.append({"problem": str(record[problem_field]), "answer": answer})
    if unanswered:
        warnings.warn(f"{path}: skipped {len(unanswered)} record(s) without an answer, at line(s) "
                      f"{', '.join(map(str, unanswered))}", stacklevel=2)
    if not problems:
        raise ValueError(f"{path}: no problems (the file is empty or no record has an answer)")
    return problems


def encode_prompts(tokenizer, problems, template: str = "auto", max_prompt_len=None):
    """Render and tokenize problems -> (prompt_ids, kept, n_skipped).

    prompt_ids[i] are the token ids of render_prompt(kept[i]["problem"]); problems whose prompt is
    longer than max_prompt_len tokens are skipped (not truncated: a cut-off problem cannot be solved)
    and counted in n_skipped.
    """
    prompt_ids, kept = [], []
    for problem in problems:
        text = render_prompt(tokenizer, problem["problem"], template)
        # A chat-rendered string already carries its special tokens (Llama's <|begin_of_text|> is in
        # the template), so the tokenizer must not add a second BOS. Plain text gets the tokenizer's
        # usual specials (a BOS for Llama-style tokenizers, nothing for Qwen).
        chat = template != "plain" and not (template == "auto" and not getattr(tokenizer, "chat_template", None))
        ids = tokenizer(text, add_special_tokens=not chat)["input_ids"]
        if max_prompt_len is not None and len(ids) > max_prompt_len:
            continue
        prompt_ids.append(list(ids))
        kept.append(problem)
    return prompt_ids, kept, len(problems) - len(kept)


