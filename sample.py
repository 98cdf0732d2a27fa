"""
sample.py -- the sampler: sample rollouts with a KV cache, and score responses (their log-probs with
gradient, for training).

Everything that turns "a model and prompt token ids" into "sampled responses and their log-probs",
shared by passk.py (evaluation), nsr.py (training) and toy.py (the toy world). Loading a model, rendering
prompts and reading problems live in loading.py. It imports nothing of ours, so the files import one way
(README: "The files").

    generate(model, prompt_ids, max_new)     -> Rollouts(tokens, logprobs, truncated, entropies)
    response_logprobs(model, *pack(...), R)  -> log pi_theta(y_t | x, y_<t) (n, R) with gradient, entropy

What is ours and what is transformers': for Qwen2, Qwen3 and Llama the whole sampler is ours -- the
decode loop, the KV cache (KVCache) and the forward pass (forward), written out in torch and reading
the transformers model's own parameters. transformers only builds the model and holds its weights.
Any other architecture falls back to transformers' forward and DynamicCache (a warning says so).
docs/sampling.md explains the design and lists the parity tests and speed measurements.

Run nothing here directly; this tests it:
    python -m pytest -q test_nsr.py -k "kv_cache or generate or top_p or forward or sample_from or sampler"
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from transformers import DynamicCache

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
#    token per step, writing its k, v into the next slot. Each step then costs O(T) instead of a full
#    O(T^2) forward, and gives the same logits as a full forward pass over the whole sequence (tested).
#    See KVCache and forward() in the DECODER section below.
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
# Speed tricks, each visible and switched off by generate(..., fast=False) (tested to change nothing
# but speed): one cache row, and one forward row per step, per DISTINCT prefix (the prompt once for all its
# rollouts, then the sampled tokens so far: rows that drew the same tokens share a row until they differ),
# eviction of finished rows, and on a GPU the fused attention kernel (scaled_dot_product_attention instead
# of the written-out softmax(q k^T / sqrt(d)) v).


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
    mass = sorted_logits.softmax(dim=-1).cumsum(dim=-1)                     # (..., V) mass of tokens 0..i
    # token i is in N_p iff the tokens before it have not yet reached p: mass[i - 1] < p. At an exact
    # boundary (mass[i - 1] == p) token i is dropped, so N_p is the SMALLEST set reaching p. The most likely
    # token has nothing before it and is always kept (p > 0), so N_p is never empty.
    # NOTE: mass[i] - probs[i] would be the same number in exact arithmetic, but in float32 it is often one
    # rounding step off mass[i - 1], which keeps or drops a token at the boundary by accident (tested).
    drop_sorted = torch.zeros_like(mass, dtype=torch.bool)
    drop_sorted[..., 1:] = mass[..., :-1] >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)   # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def sample_from(q: torch.Tensor, generator: torch.Generator | None = None,
                u: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row from probabilities q (b, V) (rows sum to 1; zeros are never drawn) -> ids (b,).

    Inverse-CDF sampling: with Q_v = q_0 + ... + q_v, draw u ~ Uniform[0, 1) and take the first token with
    Q_v > u, i.e. token v iff Q_{v-1} <= u < Q_v -- an interval of width q_v, so P(v) = q_v.
    u: (b,) uniforms in [0, 1) to use instead of drawing them from the generator (common random numbers:
    two models handed the same u take the same token wherever their CDFs agree; see passk.evaluate).
    NOTE float64: in float32 the running sum over a 150k vocabulary drifts by up to ~V * 6e-8, more than a
    rare token's own probability; in float64 by ~1e-11. One random number per row and no device->host sync
    (torch.multinomial's input check calls .item() on a GPU); on CPU it is also 4x faster than an
    exponential race over all V logits and 13x faster than torch.multinomial (16 x 32k logits, one thread).
    Non-finite q (a diverged model) is not checked here; train() checks the returned log-probs.
    """
    cdf = q.double().cumsum(dim=-1)                                                     # (b, V) Q_v
    if u is None:
        u = torch.rand((q.shape[0], 1), dtype=torch.float64, generator=generator, device=q.device)
    else:
        u = u.to(device=q.device, dtype=torch.float64)[:, None]                         # (b, 1)
    u = u * cdf[:, -1:]                                  # (b, 1), scaled by the row's mass (1 up to rounding)
    # clamp: u < Q_{V-1} always, unless the float64 product rounds up (probability ~1e-16)
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=q.shape[-1] - 1)   # (b,)


def default_eos_token_ids(model) -> list[int]:
    """The model's EOS id(s): generation_config first (chat models list several), then config."""
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        if eos is not None:
            return [eos] if isinstance(eos, int) else list(eos)
    raise ValueError("the model defines no eos_token_id; pass eos_token_ids=[...] to generate()")


def generate(model, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, eos_token_ids=None, generator: torch.Generator | None = None,
             chunk_size: int = 256, fast: bool = True, uniforms: torch.Tensor | None = None) -> Rollouts:
    """Sample one continuation per prompt with a KV cache (see the comment block above).

    prompt_ids: token-id lists of any lengths (left-padded here). Rows are processed in chunks of at most
    chunk_size rows, which bounds memory (the cache is chunk_size x (prompt + max_new_tokens) tokens).
    temperature 0 = greedy. generator: a torch.Generator on the model's device (None = torch's global RNG).
    Each row stops at its FIRST GENERATED EOS (an EOS inside the prompt does not count).
    uniforms: None, or a (len(prompt_ids), max_new_tokens) tensor of numbers in [0, 1): row r's token at
    step t is then drawn with uniforms[r, t] (sample_from's u) instead of the generator, so the draws do
    not depend on chunking, eviction or which other rows share the batch (common random numbers).
    fast=False switches the speed tricks off (every row prefilled, finished rows kept in the batch,
    written-out attention on a GPU too): the plain path, for reading and for checking the tricks.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if uniforms is not None and tuple(uniforms.shape) != (len(prompt_ids), max_new_tokens):
        raise ValueError(f"uniforms must have shape (len(prompt_ids), max_new_tokens) = "
                         f"({len(prompt_ids)}, {max_new_tokens}), got {tuple(uniforms.shape)}")
    for i, row in enumerate(prompt_ids):
        if len(row) == 0:
            raise ValueError(f"prompt_ids[{i}] is empty; every prompt needs at least one token (e.g. BOS)")
    if eos_token_ids is None:
        eos_token_ids = default_eos_token_ids(model)
    elif isinstance(eos_token_ids, int):
        eos_token_ids = [eos_token_ids]
    fallback = why_not_our_decoder(model)
    if fallback is not None:
        # the one branch where transformers runs the model; Python shows a given warning once per process
        warnings.warn(f"sample.generate: {fallback}, so it samples with transformers' forward and "
                      f"DynamicCache instead of our decoder", stacklevel=2)

    out = Rollouts(tokens=[], logprobs=[], truncated=[], entropies=[])
    # NOTE: sampling must not use dropout, and gradient checkpointing switches the cache off in train
    # mode, so we sample in eval mode and restore the caller's mode afterwards.
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(prompt_ids), chunk_size):
                rows = slice(start, start + chunk_size)
                draws = generator if uniforms is None else uniforms[rows]     # a Generator or (b, N) uniforms
                chunk = _generate_chunk(model, prompt_ids[rows], max_new_tokens, temperature, top_p,
                                        eos_token_ids, draws, fast, ours=fallback is None)
                for name in ("tokens", "logprobs", "truncated", "entropies"):
                    getattr(out, name).extend(getattr(chunk, name))
    finally:
        model.train(was_training)
    return out


def left_pad(prompt_ids: list[list[int]], max_new_tokens: int, device, pad_id: int = 0, responses=None):
    """Batch prompts LEFT-padded to P columns, so every row's last prompt token sits in column P - 1.

    Sampling (responses None): input_ids (B, P) with pad_id in pad slots (any valid id: they are masked
    out); attention_mask (B, P + max_new_tokens), 0 for pads and 1 for prompt tokens AND every future
    generated slot (so the mask for decoding step t is just mask[:, :P + t]); position_ids (B, P).
    Training (responses given, max_new_tokens 0): each row's response follows its prompt, RIGHT-padded to
    R = max(1, longest) columns, so every response starts at column P; all three are (B, P + R).
    position_ids = the number of real tokens before each token, cumsum(mask) - 1, with pads clamped to 0:
    the same positions for a token whether it was sampled or is scored again in training.
    """
    R = 0 if responses is None else max(1, max(map(len, responses)))
    responses = responses or [[] for _ in prompt_ids]
    B, P = len(prompt_ids), max(len(row) for row in prompt_ids)
    input_ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    mask = torch.zeros((B, P + R + max_new_tokens), dtype=torch.long)
    for b, (row, response) in enumerate(zip(prompt_ids, responses)):
        input_ids[b, P - len(row):P] = torch.tensor(row, dtype=torch.long)
        input_ids[b, P:P + len(response)] = torch.tensor(response, dtype=torch.long)
        mask[b, P - len(row):P + len(response)] = 1
        mask[b, P + R:] = 1                                                # future generated slots
    input_ids, mask = input_ids.to(device), mask.to(device)
    position_ids = (mask[:, :P + R].cumsum(dim=-1) - 1).clamp(min=0)     # (B, P + R)
    return input_ids, mask, position_ids


def pack(prompt_ids: list[list[int]], responses: list[list[int]], device, pad_id: int = 0):
    """Prompt + response rows for a training forward pass (left_pad with the responses): input_ids,
    attention_mask, position_ids (n, P + R) and response_mask (n, R) float, 1.0 on real response tokens."""
    input_ids, mask, position_ids = left_pad(prompt_ids, 0, device, pad_id, responses)
    R = max(1, max(map(len, responses)))
    return input_ids, mask, position_ids, mask[:, -R:].float()


def micro_batches(prompt_ids: list[list[int]], responses: list[list[int]], size: int, device, pad_id: int = 0):
    """Training rows in consecutive micro-batches of `size` (bounded memory): yields (rows, input_ids,
    attention_mask, position_ids, response_mask), rows the slice of the inputs each one packs."""
    for start in range(0, len(prompt_ids), size):
        rows = slice(start, start + size)
        yield (rows, *pack(prompt_ids[rows], responses[rows], device, pad_id))


def pad_rows(rows: list[list[float]], width: int, device) -> torch.Tensor:
    """Ragged per-token values (e.g. the sampler's log-probs) -> (n, width) fp32, 0.0 past each row's end."""
    out = torch.zeros((len(rows), width), dtype=torch.float32)
    for b, row in enumerate(rows):
        out[b, :len(row)] = torch.tensor(row[:width], dtype=torch.float32)
    return out.to(device)


# PROBLEM decode_step (15 points): one step of sampling: temperature, top-p, the draw, log q, entropy, EOS
def decode_step(logits: torch.Tensor, temperature: float, top_p: float, eos: torch.Tensor,
                generator: torch.Generator | None = None, u: torch.Tensor | None = None):
    """One decoding step for b rows: the logits z (b, V) of the next token y_t -> (y_t (b,) ids, log q(y_t)
    (b,), H_t (b,), ends (b,) bool: y_t is one of the eos ids).

    q = softmax(top_p_filter(z / T)) is the sampling distribution (section comment above); y_t is drawn from
    it with sample_from(q, generator, u), one random number per row (u (b,): given ones instead of the
    generator's); T = 0 is greedy: y_t = argmax z, a point mass, so log q(y_t) = 0.
    H_t = -sum_y pi_1(y) log pi_1(y) is the policy's own entropy at temperature 1 without top-p (the paper's
    entropy metric), whatever T and top_p are.
    """
    # H_t = -sum_y pi_1(y) log pi_1(y): the policy's entropy at temperature 1, no top-p
    logp_policy = logits.log_softmax(dim=-1)                              # (b, V)
    p_policy = logp_policy.exp()                                          # (b, V)
    entropy = -(p_policy * logp_policy).sum(dim=-1)                       # (b,)
    if temperature == 0:
        # greedy: the sampling distribution is a point mass on the argmax, so log q(y_t) = 0
        next_ids = logits.argmax(dim=-1)                                  # (b,)
        logq_next = torch.zeros_like(entropy)
    else:
        # q = softmax(top_p_filter(z / T)); reuse pi_1 when neither knob changes it
        if temperature == 1.0 and top_p == 1.0:
            logq, q = logp_policy, p_policy
        else:
            logq = top_p_filter(logits / temperature, top_p).log_softmax(dim=-1)   # (b, V)
            q = logq.exp()                                                          # (b, V)
        next_ids = sample_from(q, generator, u)                                     # (b,) y_t ~ q
        logq_next = logq.gather(1, next_ids[:, None]).squeeze(1)                   # (b,) log q(y_t)
    return next_ids, logq_next, entropy, torch.isin(next_ids, eos)


def _prefill(model, prompt_ids, max_new_tokens: int, fast: bool, ours: bool, fused: bool):
    """The prompts through the model, filling the cache's first P slots -> (cache, logits_of, logits (U, V),
    mask (U, P + N), step_pos (U, 1): each cache row's last prompt position, node (B,): row -> cache row).

    Plain: every row is prefilled (U = B, node = identity). Fast: each DISTINCT prompt once (U of them);
    rows that share a prompt share its cache row (node), until their samples differ (_branch).
    """
    device = next(model.parameters()).device
    B, P, N = len(prompt_ids), max(len(row) for row in prompt_ids), max_new_tokens
    if fast:
        distinct = list(dict.fromkeys(tuple(row) for row in prompt_ids))  # U distinct prompts, in order
        index = {row: u for u, row in enumerate(distinct)}
        node = torch.tensor([index[tuple(row)] for row in prompt_ids], device=device)   # (B,) row -> u
    else:
        distinct, node = prompt_ids, torch.arange(B, device=device)       # U = B: every row prefilled
    input_ids, mask, position_ids = left_pad(distinct, N, device)         # (U, P), (U, P + N), (U, P)
    if ours:
        # our decoder: our preallocated cache (room for B rows, U of them in use), our forward
        cache, logits_of = KVCache(model, batch=len(distinct), max_len=P + N, capacity=B), forward
    else:
        # the fallback (generate() warned): transformers' forward and its growing DynamicCache
        cache, logits_of = DynamicCache(config=model.config), next_token_logits
    logits = logits_of(model, input_ids, mask[:, :P], position_ids, cache, fused=fused)     # (U, V)
    return cache, logits_of, logits, mask, position_ids[:, -1:], node


def _branch(node: torch.Tensor, next_ids: torch.Tensor, live: torch.Tensor, vocab: int):
    """Shared prefixes after a step: rows whose prefixes were equal (one cache row, node) and that sampled
    the same token still share one. node, next_ids, live: (b,) -> (node (b,): each live row's new cache row,
    0 for finished rows; parent (d,): the old cache row each new one continues; token (d,): its new token).
    torch.unique sorts the (parent, token) pairs, so when no prefix splits and none ends, parent = 0..d-1."""
    pairs, child = torch.unique((node * vocab + next_ids)[live], return_inverse=True)   # (d,), (live rows,)
    node = torch.zeros_like(node).masked_scatter(live, child)
    return node, pairs // vocab, pairs % vocab


def _generate_chunk(model, prompt_ids, max_new_tokens, temperature, top_p, eos_token_ids, draws, fast, ours):
    """One batch of rows through prefill + cached decoding. Called under inference_mode by generate().
    draws: the torch.Generator (or None) that decode_step draws from, or a (B, N) tensor of uniforms."""
    device = next(model.parameters()).device
    B, P, N = len(prompt_ids), max(len(row) for row in prompt_ids), max_new_tokens
    eos = torch.tensor(eos_token_ids, dtype=torch.long, device=device)
    uniforms = draws.to(device) if isinstance(draws, torch.Tensor) else None    # (B, N) or None
    generator = None if uniforms is not None else draws
    tokens = torch.zeros((B, N), dtype=torch.long, device=device)         # (B, N) sampled ids
    logprobs = torch.zeros((B, N), dtype=torch.float32, device=device)     # (B, N) log q(y_t)
    entropies = torch.zeros((B, N), dtype=torch.float32, device=device)    # (B, N) H_t at temperature 1
    alive = torch.ones(B, dtype=torch.bool, device=device)                 # (B,) no EOS generated yet
    lengths = torch.zeros(B, dtype=torch.long, device=device)              # (B,) tokens recorded per row
    # rows[i] = which output row the i-th row of the batch is; node[i] = which cache row holds its prefix.
    # Fast: rows with equal prefixes (the same prompt and the same tokens so far) share ONE cache row, run
    # through the model once per step (a Pass@k problem's n samples repeat a few answers: measured 8x fewer
    # forward rows than samples on the toy's hard split); finished rows leave the batch.
    rows = torch.arange(B, device=device)                                  # (b,), b <= B rows in the batch
    # Fused attention on a GPU only. NOTE: on CPU, torch's fused kernel is SLOWER than the written-out
    # softmax for the short sequences we decode (measured ~500 vs ~380 us a layer at 256 rows x 60 tokens,
    # one thread), while on a GPU the fused kernel is the one that does not materialise the scores.
    fused = fast and device.type != "cpu"
    cache, logits_of, logits, mask, step_pos, node = _prefill(model, prompt_ids, N, fast, ours, fused)

    for t in range(N):
        if t > 0:
            # feed each cache row's newest token at its next position: its k, v go to cache slot P + t - 1,
            # and the mask column P + t - 1 is already 1. One token per cache row, not the whole sequence.
            logits = logits_of(model, step_ids[:, None], mask[:, :P + t], step_pos, cache, fused=fused)  # (d, V)
        u = None if uniforms is None else uniforms[rows, t]                    # (b,) this step's uniforms
        next_ids, logq_next, entropy, ends = decode_step(logits[node], temperature, top_p, eos, generator, u)

        # record step t; a row that already finished is not extended (its length stops counting)
        live = alive[rows]                                                     # (b,)
        tokens[rows, t], logprobs[rows, t], entropies[rows, t] = next_ids, logq_next, entropy
        lengths[rows] += live.long()
        alive[rows] = live & ~ends                           # the row's first generated EOS ends it
        keep = alive[rows].nonzero().squeeze(1)              # host sync: which batch rows are still live
        if keep.numel() == 0:
            break                                            # every row has produced its EOS
        if not fast:
            step_ids = next_ids                              # plain: every row keeps its own cache row
        else:
            # drop finished rows once they are >= 1/8 of the batch (NOTE: the schedule of the older cache
            # eviction, kept because a generator hands out one number per batch row: the same rows in the
            # same order draw the same numbers as before), then branch the shared prefixes
            if rows.numel() - keep.numel() >= max(1, rows.numel() // 8):
                rows, node, next_ids = rows[keep], node[keep], next_ids[keep]
            node, parent, step_ids = _branch(node, next_ids, alive[rows], logits.shape[-1])
            unchanged = parent.numel() == logits.shape[0] and torch.equal(parent, torch.arange(len(parent),
                                                                                              device=device))
            if not unchanged:                                # a prefix split or ended: one cache row per prefix
                cache.batch_select_indices(parent)
                mask, step_pos = mask[parent], step_pos[parent]
        step_pos = step_pos + 1                                                # (d, 1) position of y_t
    return _as_rollouts(tokens, logprobs, entropies, lengths, alive)


def _as_rollouts(tokens, logprobs, entropies, lengths, alive) -> Rollouts:
    """(B, N) tensors and (B,) lengths -> Rollouts of python lists, each row cut at its length. The only
    host syncs besides the stopping checks: once per chunk."""
    lengths, truncated = lengths.tolist(), alive.tolist()
    tokens, logprobs, entropies = tokens.tolist(), logprobs.tolist(), entropies.tolist()
    return Rollouts(tokens=[row[:n] for row, n in zip(tokens, lengths)],
                    logprobs=[row[:n] for row, n in zip(logprobs, lengths)],
                    truncated=truncated,
                    entropies=[row[:n] for row, n in zip(entropies, lengths)])


# =================================================================================================
# SCORING: log pi_theta of GIVEN responses, with gradient (the training forward pass)
# =================================================================================================
#
# The sampler above records log q(y_t) without a gradient; training needs log pi_theta(y_t | x, y_<t) of
# the same tokens WITH one. That is one ordinary forward pass over prompt + response (pack() lays them
# out with the sampler's positions), reading the logits of the response positions. At the first
# mini-batch of a step both numbers are the same (tested), which is what makes the clipped ratio 1 there.

# PROBLEM logprobs (10 points): log pi(y) and the entropy of every position, from the logits
def token_logprobs(logits, targets, temperature: float = 1.0, with_entropy: bool = False):
    """logits (n, R, V) any dtype, targets (n, R) -> log pi_T(target) (n, R) fp32, entropy (n, R) or None.

    pi_T = softmax(z / T), computed in fp32 (the logits are cast first); with_entropy: the entropy of pi_T
    at each position, H = -sum_v pi_T(v) log pi_T(v) (at the same temperature), else None.
    """
    logits = logits.float()                                                  # fp32 softmax math
    if temperature != 1.0:
        logits = logits / temperature                                        # pi_T = softmax(z / T)
    # log pi(y) = z_y - logsumexp(z): cross_entropy computes exactly -log softmax(z)[y], fused
    logp = -F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
    entropy = None
    if with_entropy:
        # H = -sum_v pi_v log pi_v (from the log-softmax: no cancellation when pi is sharp)
        log_pi = logits.log_softmax(-1)                                      # (n, R, V)
        entropy = -(log_pi.exp() * log_pi).sum(-1)                           # (n, R)
    return logp, entropy


def response_logprobs(model, input_ids, attention_mask, position_ids, response_len: int,
                      temperature: float = 1.0, with_entropy: bool = False, head_chunk: int = 0):
    """log pi(y_t | x, y_<t) of the last response_len tokens of each row: (n, R), and their entropy (n, R).

    Logits at column j predict the token at column j + 1, so the R response tokens are predicted by
    the R columns before them: keep the last R + 1 columns' logits and drop the final one.

    head_chunk > 0: the memory-saving path used with gradient checkpointing. The (n, R, V) logits are
    the largest tensors of a step (V = 152k for Qwen: 0.6 MB per token per fp32 copy, and the loss
    keeps ~3 copies alive through the backward pass), and layer checkpointing does not touch them. So
    we run the decoder alone, then the output layer + log-softmax over chunks of head_chunk positions,
    each under torch.utils.checkpoint: only one chunk's logits ever exist, recomputed in the backward
    pass. Assumes logits = lm_head(final hidden state), true for Qwen2, Qwen3 and Llama (tested).
    """
    R = response_len
    targets = input_ids[:, -R:]                                              # (n, R)
    if head_chunk <= 0:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    use_cache=False, logits_to_keep=R + 1)
        logits = out.logits[:, :-1]                                          # (n, R, V)
        del out   # NOTE: keep no extra reference to the biggest tensor of the step
        return token_logprobs(logits, targets, temperature, with_entropy)
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 use_cache=False).last_hidden_state[:, -R - 1:-1]   # (n, R, H)
    head = model.get_output_embeddings()

    def chunk_logprobs(h, y):                                                # (n, c, H), (n, c)
        return token_logprobs(head(h), y, temperature, with_entropy)

    pieces = [torch.utils.checkpoint.checkpoint(chunk_logprobs, hidden[:, s:s + head_chunk],
                                                targets[:, s:s + head_chunk], use_reentrant=False)
              for s in range(0, R, head_chunk)]
    logp = torch.cat([lp for lp, _ in pieces], dim=1)                        # (n, R)
    entropy = torch.cat([e for _, e in pieces], dim=1) if with_entropy else None
    return logp, entropy


# =================================================================================================
# DECODER: Qwen2 / Qwen3 / Llama written out in torch, on the transformers model's own parameters
# =================================================================================================
#
# For the three architectures this project trains, one forward pass is a few dozen lines of torch. We
# write them out, reading the parameters of the transformers model we are given (layer.self_attn.q_proj
# .weight, ...: the very tensors the trainer updates, no copy, no extra memory), so a student sees every
# operation between a token id and its logits. One decoder layer (pre-norm, x: (B, S, D)):
#
#   x = x + Attn(RMSNorm(x));   x = x + MLP(RMSNorm(x))
#   RMSNorm(x) = w * x / sqrt(mean(x^2) + eps)               computed in fp32, as transformers does
#   q, k, v = x Wq + bq, x Wk + bk, x Wv + bv                 biases: Qwen2 always, Llama/Qwen3 if configured
#   q, k = RMSNorm_q(q), RMSNorm_k(k), over each head          Qwen3 only
#   q, k = RoPE(q, pos), RoPE(k, pos)                          rotate pair (i, i + d/2) by pos * inv_freq_i
#   Attn = softmax(q k^T / sqrt(d) + mask) v  Wo               n_heads / n_kv_heads query heads share a kv head
#   MLP(x) = (silu(x Wgate) * (x Wup)) Wdown                   SwiGLU
#   logits = RMSNorm(x_L) Whead                                Whead IS Wembed when the embeddings are tied
#
# inv_freq and the attention scaling of RoPE come from the model's own rotary module (transformers
# computed them from the config: for Llama 3.1/3.2's rope_type "llama3" the long wavelengths are already
# stretched by `factor`). Anything else -- another architecture, sliding-window layers, a rope type whose
# frequencies change with the sequence length -- falls back to transformers (why_not_our_decoder).

OUR_ARCHITECTURES = ("qwen2", "qwen3", "llama")     # config.model_type values forward() is written for
OUR_ROPE_TYPES = ("default", "llama3")              # rope types whose inv_freq is fixed and tested


def why_not_our_decoder(model) -> str | None:
    """None when forward() below computes this model exactly, else why generate() falls back."""
    config = model.config
    if config.model_type not in OUR_ARCHITECTURES:
        return f"model_type {config.model_type!r} is not one of {', '.join(OUR_ARCHITECTURES)}"
    if config.hidden_act != "silu":
        return f"hidden_act {config.hidden_act!r} is not silu"
    rope_type = model.model.rotary_emb.rope_type
    if rope_type not in OUR_ROPE_TYPES:
        return f"rope_type {rope_type!r} is not one of {', '.join(OUR_ROPE_TYPES)}"
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or []):
        return "the model has sliding-window attention layers"
    return None


class KVCache:
    """Keys and values of every token seen so far, for every layer, preallocated.

    k[layer], v[layer]: (B, kv_heads, max_len, head_dim). Slot j of row b holds the key / value of column j
    of the left-padded batch: a pad (masked out), a prompt token, or generated token j - P. Prefill writes
    slots [0, P); decoding step t writes slot P + t - 1. Slots beyond the last write are never read.

    Why a cached step equals a full forward pass: attention is causal, so token j's hidden state entering
    any layer depends only on tokens <= j, and so do that layer's k_j and v_j: once written, they never
    change. A full forward over the sequence would recompute exactly these keys and values and give the
    newest token softmax(q k^T / sqrt(d)) v over them; a cached step computes only the newest token's
    q, k, v and reads the rest from here. Same numbers, O(T) work per step instead of O(T^2).
    """

    def __init__(self, model, batch: int, max_len: int, capacity: int | None = None):
        attn, weight = model.model.layers[0].self_attn, model.model.embed_tokens.weight
        capacity = batch if capacity is None else capacity          # rows batch_select_indices may grow to
        shape = (capacity, model.config.num_key_value_heads, max_len, attn.head_dim)
        # the storage, allocated once; k[layer] / v[layer] are views of its first `batch` rows
        # NOTE torch.empty, not zeros: a slot is always written (prefill, a step, or a row copy) before it is read
        self.k_store = [torch.empty(shape, dtype=weight.dtype, device=weight.device) for _ in model.model.layers]
        self.v_store = [torch.empty(shape, dtype=weight.dtype, device=weight.device) for _ in model.model.layers]
        self.k = [store[:batch] for store in self.k_store]
        self.v = [store[:batch] for store in self.v_store]
        self.filled = 0                                  # slots [0, filled) hold tokens

    # PROBLEM kv_cache (10 points): write a step's keys and values into the cache, read back every token's
    def update(self, layer: int, slot: int, k: torch.Tensor, v: torch.Tensor):
        """Write the new tokens' k, v (B, kv_heads, S, hd) of one layer at slots [slot, slot + S), set
        self.filled = slot + S, and return the keys and values of every token so far of that layer,
        (B, kv_heads, slot + S, hd) each (views of self.k[layer] / self.v[layer], not copies)."""
        end = slot + k.shape[2]
        self.k[layer][:, :, slot:end] = k
        self.v[layer][:, :, slot:end] = v
        self.filled = end
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def batch_select_indices(self, rows: torch.Tensor):
        """Keep (or repeat, up to the capacity) batch rows, rows: (b,) indices. Named as DynamicCache's
        method, so the decode loop drives both caches the same way. In place: row i of the storage gets old
        row rows[i], filled slots only (the gather makes a temporary of those slots, one layer at a time), and
        k[layer] / v[layer] become views of the first b rows. NOTE: it used to allocate a new zeroed cache per
        call; the profile of passk.evaluate put ~5% of its time in that new_zeros."""
        b = rows.shape[0]
        for views, stores in ((self.k, self.k_store), (self.v, self.v_store)):
            for layer, store in enumerate(stores):
                store[:b, :, :self.filled] = views[layer][rows, :, :self.filled]
                views[layer] = store[:b]


def linear(x: torch.Tensor, layer) -> torch.Tensor:
    """x W^T + b with an nn.Linear's own weight and bias (bias None = no bias)."""
    return F.linear(x, layer.weight, layer.bias)


def rms_norm(x: torch.Tensor, norm) -> torch.Tensor:
    """RMSNorm(x) = w * x / sqrt(mean(x^2) + eps) over the last dim, in fp32 and back to x's dtype before
    the weight multiplies (transformers' order: it matters in bf16)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * x32.to(x.dtype)


def rope(rotary_emb, position_ids: torch.Tensor, dtype):
    """cos, sin of RoPE's angles, each (B, 1, S, head_dim), from the model's rotary module's inv_freq."""
    angles = position_ids[..., None].float() * rotary_emb.inv_freq.float()  # (B, S, hd/2): pos * inv_freq_i
    angles = torch.cat([angles, angles], dim=-1)[:, None]                    # (B, 1, S, hd): i and i + hd/2
    scale = rotary_emb.attention_scaling                                        # 1.0 for default and llama3
    return (angles.cos() * scale).to(dtype), (angles.sin() * scale).to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on x (B, H, S, hd): (x_i, x_{i + hd/2}) -> (x_i cos - x_{i + hd/2} sin, x_{i + hd/2} cos + x_i sin)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def attention(attn, x, cos, sin, mask, cache: KVCache, layer: int, slot: int, fused: bool) -> torch.Tensor:
    """Grouped-query self-attention of the new tokens x (B, S, D) over every cached token and themselves."""
    B, S, _ = x.shape
    q = linear(x, attn.q_proj).view(B, S, -1, attn.head_dim)                # (B, S, H, hd)
    k = linear(x, attn.k_proj).view(B, S, -1, attn.head_dim)                # (B, S, Hkv, hd)
    v = linear(x, attn.v_proj).view(B, S, -1, attn.head_dim)                # (B, S, Hkv, hd)
    if hasattr(attn, "q_norm"):                                             # Qwen3: RMSNorm of each head
        q, k = rms_norm(q, attn.q_norm), rms_norm(k, attn.k_norm)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)       # (B, heads, S, hd)
    q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    k, v = cache.update(layer, slot, k, v)                                  # (B, Hkv, T, hd), T = slot + S
    # GQA: query heads j*G .. j*G + G-1 all read kv head j, so we stack them as G * S queries of kv head j
    # (a reshape; transformers repeats each kv head G times instead -- the same numbers, but a copy of the
    # cache per layer per step). The mask's S query rows repeat to match; one new token's row broadcasts.
    H, Hkv = q.shape[1], k.shape[1]
    q = q.reshape(B, Hkv, (H // Hkv) * S, -1)                               # (B, Hkv, G*S, hd)
    mask = mask if S == 1 else mask.repeat(1, 1, H // Hkv, 1)               # (B, 1, G*S or 1, T)
    if not fused:
        # softmax(q k^T / sqrt(d) + mask) v, the softmax in fp32 as transformers does
        scores = (q @ k.transpose(-1, -2)) * attn.scaling + mask            # (B, Hkv, G*S, T), 1/sqrt(hd)
        out = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype) @ v   # (B, Hkv, G*S, hd)
    else:
        # the same math in one fused kernel (flash / memory-efficient attention on a GPU)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling)
    out = out.reshape(B, H, S, -1)                                          # (B, H, S, hd)
    return linear(out.transpose(1, 2).reshape(B, S, -1), attn.o_proj)      # (B, S, D)


def mlp(m, x: torch.Tensor) -> torch.Tensor:
    """SwiGLU: (silu(x Wgate) * (x Wup)) Wdown."""
    return linear(F.silu(linear(x, m.gate_proj)) * linear(x, m.up_proj), m.down_proj)


def forward(model, input_ids, attention_mask, position_ids, cache: KVCache, fused: bool = True) -> torch.Tensor:
    """Our forward pass: new tokens (B, S) on top of the cache -> the last position's logits (B, V), fp32.

    The same contract as next_token_logits (transformers' forward): attention_mask (B, slot + S) covers
    the cached slots plus the new tokens (0 = pad), position_ids (B, S) are the new tokens' positions, and
    the cache gets the new tokens' keys and values at slots [slot, slot + S). fused: attention by
    torch's scaled_dot_product_attention kernel instead of the written-out softmax (same numbers).
    """
    B, S = input_ids.shape
    slot = attention_mask.shape[1] - S                  # slots already filled = where the new tokens go
    base = model.model                                   # the decoder stack inside ...ForCausalLM
    x = F.embedding(input_ids, base.embed_tokens.weight)                    # (B, S, D)
    cos, sin = rope(base.rotary_emb, position_ids, x.dtype)                 # (B, 1, S, hd) each
    # new token i (at slot slot + i) may read slot j iff j is not in its future and j is a real token. A pad
    # may also read itself: a pad with nothing to read would give softmax(all -inf) = NaN, and 0 * NaN in
    # the next layer's attention would leak into real tokens. mask = 0 where allowed, -inf elsewhere: it is
    # ADDED to the attention scores, so exp() gives the forbidden slots weight 0.
    new = torch.arange(slot, slot + S, device=input_ids.device)[:, None]    # (S, 1)
    seen = torch.arange(slot + S, device=input_ids.device)[None]            # (1, T)
    allowed = ((seen <= new) & (attention_mask.bool()[:, None] | (seen == new)))[:, None]   # (B, 1, S, T)
    mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(~allowed, float("-inf"))
    for i, layer in enumerate(base.layers):
        h = rms_norm(x, layer.input_layernorm)
        x = x + attention(layer.self_attn, h, cos, sin, mask, cache, i, slot, fused)
        x = x + mlp(layer.mlp, rms_norm(x, layer.post_attention_layernorm))
    x = rms_norm(x[:, -1], base.norm)                   # (B, D): only the last position is sampled from
    # fp32 logits: the sampling math runs in fp32 even for a bf16 model (a bf16 softmax over 150k tokens
    # loses the tail)
    return linear(x, model.lm_head).float()             # (B, V); lm_head.weight IS embed_tokens.weight if tied


def next_token_logits(model, input_ids, attention_mask, position_ids, cache, fused: bool = True) -> torch.Tensor:
    """The fallback: transformers' own forward and DynamicCache, with forward()'s contract.

    Runs new tokens (B, S) through model(...) on top of the cache (updated in place) and returns the last
    position's logits (B, V) in float32. `fused` is unused (transformers picks its own attention kernel).
    """
    # transformers 5.x renamed past_key_values to cache (the old name warns, and goes in 5.40)
    cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    # logits_to_keep=1: only the last position's logits are needed (saves a (B, S, V) projection at prefill)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=True, logits_to_keep=1, **{cache_kwarg: cache})
    return out.logits[:, -1].float()
