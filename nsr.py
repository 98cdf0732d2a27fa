"""
nsr.py -- RL with verifiable rewards, split by the sign of the reward: the paper's algorithm in one file.

  "The Surprising Effectiveness of Negative Reinforcement in LLM Reasoning"
  (Zhu, Xia, Wei, Chen, Chen, Meng; NeurIPS 2025, arXiv 2506.01347).

THE IDEA
  For a problem x the policy pi_theta samples G responses y_1..y_G; the verifier gives r_i = 1 if the
  final \\boxed{} answer equals the gold answer, else 0. Every method is ONE loss with a per-sample
  weight w_i:

    L(theta) = -(1/Z) * sum_i w_i * sum_t log pi_theta(y_i,t | x, y_i,<t)

      objective     w_i (r_i = 1)   w_i (r_i = 0)
      PSR              +1               0          raise the likelihood of correct samples only
      NSR               0              -1          lower the likelihood of wrong samples only
      W-REINFORCE     +lam             -1          = lam * PSR + NSR, lam = 0.1
      REINFORCE        +1              -1          = PSR + NSR
      GRPO        (r_i - mean_g r) / (std_g r + 1e-6) over the G samples g of the same prompt
      PPO         a per-TOKEN weight A_i,t: a learned critic's GAE advantage, whitened (ppo.py)
    Z = every response token of the mini-batch, weighted or not (the official code's token mean), or a
        constant (--normalizer constant).

  WHAT RUNS BY DEFAULT is the official code's update (rl_step): the objective's subset (PSR the correct
  samples, NSR the wrong ones) in mini-batches of M responses, each ONE optimizer step on the PPO-clipped
  surrogate of L (clip 0.2) minus an entropy bonus (GRPO: plus a KL loss), pi_old recomputed by the training
  forward before the update, so the first mini-batch's gradient is exactly L's (tested, bf16 too);
  --clip-eps 0 --mini-batch-size none --entropy-coef 0 runs L itself.

  The token-level gradient (policy_loss derives it, --demo-gradient shows it, why.py): dL/dz_v = -w (1[v = y] - pi_v).

READ IN THIS ORDER: OBJECTIVES, ONE RL STEP (rl_step), THE LOOP (train), CONFIG, main. The rest is optional
  reading in flat files: sample.py (sampler, log-probs), loading.py (models, prompts, data), verifier.py, passk.py,
  ppo.py (critic), precision.py (fp32 masters, offload, checkpointing), runs.py (run dir, checkpoints),
  settings.py (flags), presets.py (24 GB presets), toy.py (the toy world). Departures: docs/training.md.

COMMANDS
  python nsr.py                          # main job: toy world, PSR and NSR side by side vs the base
  python nsr.py --objective psr          # or nsr, w-reinforce, reinforce, grpo, ppo
  python nsr.py --demo-gradient          # one PSR / NSR / W-REINFORCE step on 5 tokens, as numbers
  python nsr.py --preset qwen2.5-0.5b-instruct --train math_train.jsonl --eval math_test.jsonl  # 24 GB GPU
  python nsr.py ... --resume             # continue a stopped run exactly (same flags)
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

import ppo
import precision
import presets
import runs
import sample
import settings
import verifier
import why

# =================================================================================================
# OBJECTIVES: rewards -> per-sample weights -> ONE policy-gradient loss
# =================================================================================================
# Spinning Up: "the weight for each log-prob is R". Z is fixed per mini-batch BEFORE it is cut into
# micro-batches, so the gradient does not depend on the micro-batch size.
OBJECTIVES = ("psr", "nsr", "w-reinforce", "reinforce", "grpo", "ppo")


# PROBLEM sample_weights (15 points): every objective's per-sample weight w_i (a new objective is one more row)
def sample_weights(rewards, objective: str, lam: float = 0.1, group_size: int = 8) -> torch.Tensor:
    """Per-sample weights w (N,) float32 from rewards r (N,) in {0, 1}: the table of the top docstring.

    rewards: N = num_prompts * group_size values, a prompt's samples contiguous (as rl_step lays them out).
    GRPO: (r - group mean) / (group std + 1e-6), the UNBIASED std (torch's, as verl): an all-correct or
    all-wrong group gets exactly 0. ValueError: a reward not 0 or 1 ("rewards must be 0 or 1"), an unknown
    objective or ppo ("unknown objective"), grpo's group_size < 2 or not dividing N ("group_size").
    """
    r = torch.as_tensor(rewards, dtype=torch.float32).flatten()             # (N,)
    if not bool(((r == 0) | (r == 1)).all()):
        raise ValueError(f"rewards must be 0 or 1 (verifier.reward), got {sorted(set(r.tolist()))}")
    correct = r == 1                                                         # (N,) bool
    #             w if r = 1   w if r = 0
    table = {"psr": (1.0, 0.0), "nsr": (0.0, -1.0), "w-reinforce": (float(lam), -1.0), "reinforce": (1.0, -1.0)}
    if objective in table:
        return torch.where(correct, *table[objective])                      # (N,)
    if objective != "grpo":
        raise ValueError(f"unknown objective {objective!r} for sample_weights; choose one of "
                         f"{', '.join(table)}, grpo (ppo's per-token weights come from ppo.advantages)")
    # grpo: the group-normalised advantage (Shao et al. 2024, DeepSeekMath, outcome supervision)
    if group_size < 2 or r.numel() % group_size != 0:
        raise ValueError(f"grpo needs group_size >= 2 dividing the number of samples; got "
                         f"group_size={group_size} for {r.numel()} samples")
    groups = r.view(-1, group_size)                                          # (num_prompts, G)
    # NOTE: unbiased std (torch's default), as in verl's GRPO advantage that the official code uses.
    # An all-correct or all-wrong group has r - mean = 0 exactly, so its weights are exactly 0.
    w = (groups - groups.mean(dim=1, keepdim=True)) / (groups.std(dim=1, keepdim=True) + 1e-6)
    return w.flatten()                                                       # (N,)


def training_subset(rewards, objective: str) -> list[int]:
    """The samples a rollout batch trains on, as the official code cuts it (`batch.subset`):
    PSR the correct ones, NSR the wrong ones, every other objective all of them. The mini-batches of
    the paper's update are counted AFTER this cut, so the number of optimizer steps per rollout batch
    grows with the subset (at 70% accuracy PSR makes more updates than NSR)."""
    if objective == "psr":
        return [i for i, r in enumerate(rewards) if r == 1]
    if objective == "nsr":
        return [i for i, r in enumerate(rewards) if r == 0]
    return list(range(len(rewards)))


# PROBLEM policy_loss (20 points): the one loss, as the clipped surrogate, and the tokens the clip silences
def policy_loss(logp: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor, normalizer: float,
                old_logp: torch.Tensor | None, clip_low: float, clip_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The ONE policy-gradient loss of every objective: L = -(1/Z) sum_i w_i sum_t log pi(y_i,t), as the
    PPO-clipped surrogate the official code runs (clip_low = clip_high = 0.2 by default):

        per token  -min(rho * w, clip(rho, 1 - clip_low, 1 + clip_high) * w),   rho = pi_theta / pi_old

    In a step's first mini-batch pi_theta = pi_old (log pi_old by the same training forward before the update,
    runs.training_logprobs): rho = 1 exactly, the gradient is -w log pi's (tested in bf16). Later mini-batches
    are off-policy; the clip zeroes the gradient where rho > 1 + clip_high under w > 0 (raised enough: PSR's)
    and rho < 1 - clip_low under w < 0 (lowered enough: NSR's). A side at 0 does not clip; old_logp None: -w log pi.

    logp (N, T) log pi_theta (carries the gradient); weights (N,) w_i, or (N, T) A_i,t (ppo); mask (N, T) 1.0
    on real response tokens; old_logp (N, T) log pi_old. Returns (loss = sum of per-token terms x mask / Z,
    clipped): clipped (N, T) bool, True where the clip zeroed the gradient (not masked; all False if no ratio).

    The token-level gradient (the paper's analysis). At one position with logits z (V,), pi = softmax(z)
    and sampled token y: log pi_y = z_y - logsumexp(z), so d log pi_y / d z_v = 1[v = y] - pi_v, and for
    L = -w log pi_y:   dL/dz_v = -w * (1[v = y] - pi_v).   Gradient DESCENT moves z_v by lr w (1[v=y] - pi_v):
      PSR (w = +1): z_y rises by lr (1 - pi_y), every other z_v falls by lr pi_v  -> sharpens onto y;
      NSR (w = -1): z_y falls by lr (1 - pi_y), every other LOGIT z_v rises by lr pi_v (tested against
                    autograd). In probabilities, to first order dpi_v = lr pi_v (pi_v + pi_y (1 - pi_y) -
                    sum_{u != y} pi_u^2): likely alternatives gain more than in proportion, unlikely ones can
                    LOSE (tested exactly on 5 tokens; docs/why.md says what that means for coverage).
    """
    w = (weights[:, None] if weights.dim() == 1 else weights).to(logp.dtype)   # (N, 1) or (N, T)
    if old_logp is None:                                                     # L itself: -w_i log pi
        return (-w * logp * mask).sum() / normalizer, torch.zeros_like(mask, dtype=torch.bool)
    ratio = torch.exp(logp - old_logp)                                       # (N, T) rho
    low = 1 - clip_low if clip_low > 0 else 0.0                              # 0: the lower side does not clip
    high = 1 + clip_high if clip_high > 0 else math.inf
    per_token = -torch.minimum(ratio * w, ratio.clamp(low, high) * w)        # (N, T) the clipped surrogate
    clipped = ((w > 0) & (ratio > high)) | ((w < 0) & (ratio < low))         # (N, T) zero gradient there
    return (per_token * mask).sum() / normalizer, clipped


def entropy_bonus(entropy: torch.Tensor, mask: torch.Tensor, num_tokens: float) -> torch.Tensor:
    """The mean token entropy H = -sum_v pi_v log pi_v over the mini-batch's response tokens (the loss
    SUBTRACTS entropy_coef times it: a bonus that keeps the policy from collapsing)."""
    return (entropy * mask).sum() / num_tokens


# PROBLEM kl_penalty (5 points): the k3 estimate of KL(pi || pi_ref), clamped as verl's
def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, num_tokens: float) -> torch.Tensor:
    """The mean per-token KL(pi || pi_ref) by the non-negative "k3" estimator (Schulman 2020, as GRPO):
    exp(d) - d - 1, d = log pi_ref - log pi, clamped as verl's low_var_kl (d to [-20, 20], the estimate to
    <= 10: one far-off token cannot dominate), summed where mask is 1, divided by num_tokens."""
    d = (ref_logp - logp).clamp(-20, 20)
    return ((d.exp() - d - 1).clamp(max=10) * mask).sum() / num_tokens


# PROBLEM loss_normalizer (5 points): Z, the token mean of the official code, or a constant
def loss_normalizer(weights: torch.Tensor, lengths, mode: str = "tokens", max_new_tokens: int = 1) -> float:
    """Z of policy_loss for a whole mini-batch (computed once, before micro-batching).

    weights (N,) or (N, T), lengths: response lengths (N,) of every sample of the mini-batch. "tokens": the
    sum of all lengths, weighted or not (the official token mean: a GRPO sample of an all-correct group, w = 0,
    still counts); "micro": the same number (minibatch_backward then takes each micro-batch's own token mean,
    verl's exact form); "weighted": the lengths of the samples with w != 0 only (an (N, T) row carries where any
    token is non-zero; 0.0 when none does); "constant": N * max_new_tokens (independent of what was sampled).
    ValueError for another mode ("normalizer must be one of ...").
    """
    lengths = torch.as_tensor(lengths, dtype=torch.float32)
    if mode in ("tokens", "micro"):
        return float(lengths.sum())
    if mode == "weighted":
        carries = (weights != 0 if weights.dim() == 1 else (weights != 0).any(dim=1)).cpu()   # (N,) bool
        return float(lengths[carries].sum())
    if mode == "constant":
        return float(len(lengths) * max_new_tokens)
    raise ValueError(f"normalizer must be one of {', '.join(settings.NORMALIZERS)}, got {mode!r}")


# =================================================================================================
# ONE RL STEP: sample -> verify -> weight -> subset -> mini-batches (loss -> backward -> optimizer step)
# =================================================================================================

@dataclass
class MiniBatch:
    """The samples of one optimizer step, row-aligned (n rows)."""
    prompts: list                 # prompt token ids
    responses: list               # sampled response token ids
    old_logprobs: list            # log pi_old(y_t) per response token, the clipped ratio's (--old-logprobs)
    weights: torch.Tensor         # (n,) w_i, or (n, T) per-token advantages A_i,t (ppo)
    normalizer: float             # Z of the whole mini-batch (0: only entropy / KL terms, their token mean)
    scale: float = 1.0            # m / M for a last, partial mini-batch of m < M (the official code's)


def minibatch_plan(subset: list[int], weights, cfg: Config) -> list[tuple[list[int], list[int]]]:
    """The update's optimizer steps as (mini, rows): the subset cut into mini-batches of M responses, and the
    rows each loss reads: w != 0, or all when an entropy / KL term, ppo or --normalizer micro reads them."""
    every_row = cfg.entropy_coef > 0 or cfg.kl_coef > 0 or cfg.objective == "ppo" or cfg.normalizer == "micro"
    M = cfg.mini_batch_size or max(len(subset), 1)                  # None: the whole subset in one step
    minis = [subset[start:start + M] for start in range(0, len(subset), M)]
    return [(mini, [i for i in mini if every_row or bool((weights[i] != 0).any())]) for mini in minis]


def rl_step(run: runs.Run, cfg: Config, step: int) -> dict:
    """One step of RL with verifiable rewards, every stage in view. Returns the step's metrics line."""
    t0 = time.time()
    # ---- sample: B prompts x G rollouts, the G rows of a prompt contiguous ----
    chosen = runs.prompt_batch(step, len(run.problems), cfg.batch_prompts, cfg.seed)   # B problem indices
    prompts = [run.prompt_ids[i] for i in chosen for _ in range(cfg.group_size)]      # N = B * G token lists
    golds = [run.problems[i]["answer"] for i in chosen for _ in range(cfg.group_size)]
    rollouts = runs.sample_rollouts(run, cfg, prompts, step)     # .tokens, .logprobs (log pi_old), .entropies
    t1 = time.time()
    # ---- verify: r_i = 1 if the last \boxed{} of the response equals the gold answer, else 0 ----
    texts = [run.tokenizer.decode(t, skip_special_tokens=True) for t in rollouts.tokens]
    rewards = true_rewards = [verifier.reward(text, gold) for text, gold in zip(texts, golds)]   # (N,)
    if cfg.reward == "random":    # the control: r_i ~ Bernoulli(p) from the run's generator, whatever the answer
        draws = torch.rand(len(rewards), generator=run.generator, device=run.generator.device)
        rewards = (draws < cfg.random_reward_p).float().tolist()
    # ---- weight: w_i from the objective (ppo: per-token advantages, after the old log-probs below) ----
    weights = None if cfg.objective == "ppo" else sample_weights(rewards, cfg.objective, cfg.lam, cfg.group_size)
    # ---- subset: PSR the correct samples, NSR the wrong ones, the others all; then mini-batches of M ----
    plan = minibatch_plan(training_subset(rewards, cfg.objective), weights, cfg)   # [(mini, rows it trains)]
    # ---- old log-probs: by the TRAINING forward, batched as the update (verl's compute_log_prob): rho = 1 ----
    if cfg.old_logprobs == "training":
        rollouts.logprobs = runs.training_logprobs(run, cfg, prompts, rollouts, [rows for _, rows in plan])
    targets = None
    if cfg.objective == "ppo":                   # A_i,t from the critic (its KL reward reads log pi_old)
        weights, targets = ppo.advantages(run, cfg, prompts, rollouts, rewards)        # (N, T), ppo.Targets
    stats = runs.StepStats()
    for mini, rows in plan:                      # ---- each mini-batch: ONE optimizer step ----
        scale = len(mini) / cfg.mini_batch_size if cfg.mini_batch_size else 1.0      # a last partial one: m / M
        if targets is not None:                                                       # ppo: the critic's step
            stats.critic.append(ppo.critic_step(run, cfg, prompts, rollouts, mini, targets, scale))
        if not rows:
            continue
        lengths = [len(rollouts.tokens[i]) for i in mini]        # Z from ALL samples of the mini-batch
        Z = loss_normalizer(weights[mini], lengths, cfg.normalizer, cfg.max_new_tokens)
        mini_batch = MiniBatch([prompts[i] for i in rows], [rollouts.tokens[i] for i in rows],
                               [rollouts.logprobs[i] for i in rows], weights[rows], Z, scale)
        # ---- loss -> backward (micro-batch by micro-batch) -> ONE optimizer step ----
        loss = minibatch_backward(run, mini_batch, cfg, stats)
        grad_norm = precision.optimizer_step(run.policy, cfg.grad_clip) if loss is not None else None
        if loss is None or not torch.isfinite(grad_norm):
            precision.zero_grads(run.policy)             # drop what the failed micro-batches accumulated
            stats.skipped = True
            break
        stats.losses.append(loss)
        stats.grad_norms.append(grad_norm.item())
        stats.trained, stats.updates = stats.trained + len(rows), stats.updates + 1
    return runs.step_metrics(step, cfg, rewards, true_rewards, rollouts, stats, targets,
                             (t1 - t0, time.time() - t1))


def minibatch_backward(run: runs.Run, batch: MiniBatch, cfg: Config, stats: runs.StepStats) -> float | None:
    """Accumulate the gradient of one mini-batch's loss, cfg.micro_batch_size sequences at a time (bounded
    memory; Z is the whole mini-batch's, or each micro-batch's with --normalizer micro). Returns the loss,
    or None if not finite (the gradient is dropped)."""
    model, device = run.policy.model, next(run.policy.model.parameters()).device
    num_tokens = float(sum(len(r) for r in batch.responses))                  # the entropy / KL token mean
    kl_coef = 0.0 if cfg.objective == "ppo" else cfg.kl_coef                  # ppo's KL is in its reward
    use_ratio = cfg.clip_low > 0 or cfg.clip_high > 0 or cfg.mini_batch_size is not None   # off-policy mini-batches
    total = torch.zeros((), device=device)
    for part, input_ids, attn, pos, mask in sample.micro_batches(batch.prompts, batch.responses,
                                                                 cfg.micro_batch_size, device, run.pad_id):
        R = mask.shape[1]                                                     # mask (m, R): real response tokens
        logp, entropy = sample.response_logprobs(model, input_ids, attn, pos, R, cfg.temperature,
                                                 with_entropy=cfg.entropy_coef > 0, head_chunk=run.head_chunk)
        w = torch.as_tensor(batch.weights[part], dtype=torch.float32, device=device)   # (m,) or (m, T)
        w = w if w.dim() == 1 else w[:, :R]
        old = sample.pad_rows(batch.old_logprobs[part], R, device) if use_ratio else None   # log pi_old (m, R)
        Z, n = batch.normalizer or num_tokens, num_tokens                    # the means' denominators
        if cfg.normalizer == "micro":   # verl's form: each micro-batch's own token mean x its share of the rows
            Z = n = sum(len(r) for r in batch.responses[part]) * len(batch.responses) / len(mask)
        # ---- the loss terms (a new term is one more line here) ----
        # the policy-gradient term (the objectives): -(1/Z) sum w_i sum_t log pi(y_i,t), clipped
        loss, clipped = policy_loss(logp, w, mask, Z, old, cfg.clip_low, cfg.clip_high)
        if cfg.entropy_coef > 0:                                              # - c_H * mean token entropy
            loss = loss - cfg.entropy_coef * entropy_bonus(entropy, mask, n)
        if kl_coef > 0:                                                       # + beta * mean k3 KL to pi_ref
            with torch.no_grad():
                ref_logp, _ = sample.response_logprobs(run.ref_model, input_ids, attn, pos, R, cfg.temperature,
                                                       head_chunk=run.head_chunk)
            loss = loss + kl_coef * kl_penalty(logp, ref_logp, mask, n)
        loss = loss * batch.scale                                             # a partial mini-batch: m / M
        if not torch.isfinite(loss):
            return None
        loss.backward()
        precision.grads_to_master(run.policy)                                # bf16 grads -> the fp32 masters
        runs.count_clipped(stats, w, clipped, mask)
        total += loss.detach()
    return total.item()


# =================================================================================================
# THE LOOP: evaluate the start, cfg.steps RL steps (log, evaluate, checkpoint), evaluate the end
# =================================================================================================

def train(cfg: Config) -> dict:
    """Run the whole job. Returns {"run_dir", "step", "metrics" (the last step's line), "evals"
    ({set: {step: result}}), "table" (the Pass@k table of the first vs the last evaluation of every set)}."""
    cfg, run = runs.start(cfg, OBJECTIVES)      # check every input, then the run dir, models, data (resume)
    if run.eval_sets and run.start_step == 0:
        runs.evaluate(run, cfg, 0)                                            # ---- evaluate the start ----
    metrics = {}
    bar = tqdm(range(run.start_step, cfg.steps), initial=run.start_step, total=cfg.steps, desc=cfg.objective,
               dynamic_ncols=True)
    for step in bar:
        metrics = rl_step(run, cfg, step)       # sample -> verify -> weight -> subset -> mini-batch updates
        runs.append_jsonl(run.dir / "metrics.jsonl", metrics)   # ---- log: one line per step, fixed keys ----
        bar.set_postfix(reward=f"{metrics['reward']:.3f}", len=f"{metrics['response_len']:.0f}",
                        ent=f"{metrics['entropy']:.2f}", updates=metrics["updates"],
                        gnorm="skip" if metrics["skipped"] else f"{metrics['grad_norm']:.3f}")
        run.nonfinite_streak = run.nonfinite_streak + 1 if metrics["skipped"] else 0   # saved in checkpoints
        if metrics["skipped"]:
            runs.nonfinite_stop(step, run.nonfinite_streak, cfg)              # stops after cfg.max_nonfinite
        done = step + 1                                                       # ---- evaluate / checkpoint ----
        if run.eval_sets and cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
            runs.evaluate(run, cfg, done)
        if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps:
            runs.save_checkpoint(run, done)
    bar.close()
    table = runs.finish(run, cfg)                                             # ---- evaluate the end ----
    return {"run_dir": str(run.dir), "step": cfg.steps, "metrics": metrics, "evals": run.evals, "table": table}


# =================================================================================================
# CONFIG: every knob of a run (`python nsr.py --help` lists them with these comments)
# =================================================================================================

@dataclass
class Config:
    """23 fields a student changes first, then the system fields. None = the official recipe's value (runs.resolve)."""
    # ---- the objective and the update ----
    objective: str = "nsr"        # psr, nsr, w-reinforce, reinforce, grpo, ppo; a comma list: each, side by side
    lam: float = 0.1              # lambda of w-reinforce: weight of correct samples (the paper: 0.1)
    steps: int = 100              # training steps (one rollout batch each)
    batch_prompts: int = 32       # B: prompts per step
    group_size: int = 8           # G: rollouts per prompt
    lr: float = 1e-6              # constant AdamW learning rate (the paper: 1e-6)
    clip_eps: float = 0.2         # PPO ratio clipping epsilon, both sides (the paper: 0.2); 0 = no clipping
    clip_low: float | None = None   # the ratio's lower bound 1 - clip_low (acts on w < 0); None = clip_eps; 0 = none
    clip_high: float | None = None  # the ratio's upper bound 1 + clip_high (acts on w > 0); None = clip_eps; 0 = none
    mini_batch_size: int | None = 64  # M: responses per optimizer step, after the subset; none = the subset in one
    entropy_coef: float = 0.001   # entropy bonus: loss -= entropy_coef * mean token entropy (official yaml 1e-3)
    kl_coef: float | None = None  # KL to the initial model; None: 0.001 for grpo (k3 loss) and ppo (reward), else 0
    max_new_tokens: int = 1024    # response length limit while training (longer = truncated)
    temperature: float = 1.0      # sampling temperature of training rollouts (the paper: 1.0)
    top_p: float = 1.0            # nucleus top-p of training rollouts (the paper: 1.0)
    # ---- model, data, seed, run directory ----
    model: str = ""               # HF hub name or local dir of the policy; "" = the toy base (toy.ensure_base)
    toy_seed: int = 0             # recipe seed of the toy base when --model is not given (runs/toy-base-s<seed>)
    train: str = ""               # JSONL file of training problems; "" = the toy world's train.jsonl
    eval: list = field(default_factory=list)  # JSONL eval set, repeatable; [] with the toy = its test splits
    eval_n: int = 64              # samples per eval problem (Pass@k for k <= eval_n); 0 = no evaluation
    seed: int = 0                 # seeds sampling, data order and evaluation
    out_dir: str = "runs/nsr"     # run directory: config.json, metrics.jsonl, eval.jsonl, eval/, checkpoint-*
    resume: bool = False          # continue from out_dir's latest checkpoint (same flags, exactly the same run)
    # ==== SYSTEM FIELDS: they can be skipped on a first read ====
    # ---- research instruments (docs/experiments.md) ----
    normalizer: str = "tokens"    # Z: tokens (the mini-batch's, verl's mean), micro (verl's form), weighted, constant
    old_logprobs: str = "training"  # log pi_old: training (a forward before the update, verl's) or sampler (bf16: off)
    reward: str = "verifier"      # verifier, or random: the control r_i ~ Bernoulli(random_reward_p), answer unseen
    random_reward_p: float = 0.5  # P(r_i = 1) under --reward random
    optimizer: str = "adamw"      # adamw (the paper's), or sgd: plain SGD at --lr (an ablation: no per-weight scaling)
    # ---- evaluation ----
    eval_every: int = 0           # also evaluate every this many steps; 0 = only before and after training
    eval_temperature: float = 0.6  # the paper's evaluation: 0.6
    eval_top_p: float = 0.95      # the paper's evaluation: 0.95
    eval_limit: int | None = None  # evaluate only the first this many problems of each eval set; None = all
    eval_max_new_tokens: int | None = None  # response limit while evaluating; None = max_new_tokens
    # ---- prompts ----
    template: str = "auto"        # prompt template: auto, plain, qwen2.5-math, qwen3, llama3
    problem_field: str = "problem"  # JSONL field holding the problem text
    answer_field: str = "answer"  # JSONL field holding the gold answer
    max_prompt_len: int | None = None  # skip (and count) prompts longer than this many tokens; None = no limit
    # ---- ppo's critic (ppo.py) ----
    critic_lr: float = 1e-5       # the critic's AdamW learning rate (the paper: 1e-5 = 10 x lr)
    value_clip: float = 0.5       # a value may move at most this far from the one that made the advantages
    gae_gamma: float = 1.0        # GAE discount gamma (verl's default, the paper's)
    gae_lam: float = 1.0          # GAE lambda (verl's default, the paper's)
    # ---- the optimizer step ----
    weight_decay: float = 0.01    # AdamW weight decay
    adam_beta1: float = 0.9       # AdamW beta1
    adam_beta2: float = 0.999     # AdamW beta2
    grad_clip: float = 1.0        # clip the global gradient norm to this; 0 = no clipping
    # ---- memory and devices (precision.py, presets.py) ----
    preset: str = ""              # presets.PRESETS name for one 24 GB GPU: its values become defaults (flags win)
    chunk_size: int = 256         # rows sampled at once (bounds the KV-cache memory)
    micro_batch_size: int = 8     # sequences per forward/backward (gradient accumulation over the mini-batch)
    dtype: str = "auto"           # auto (bf16 on CUDA, fp32 on CPU), float32 or bfloat16 (precision.py)
    optimizer_offload: bool = False  # fp32 masters, their grads and AdamW state in CPU RAM; AdamW steps on CPU
    grad_checkpointing: str = "auto"  # on, off, or auto = on for models above checkpointing_min_params
    checkpointing_min_params: int = 100_000_000  # the size above which auto turns checkpointing on
    head_chunk: int = 128         # with checkpointing: output layer + log-softmax in chunks of this many positions
    device: str = "auto"          # auto (cuda if available), cpu, cuda, cuda:1, ...
    threads: int | None = None    # torch CPU threads (torch.set_num_threads); None = leave torch's default
    # ---- run control ----
    save_every: int = 0           # also checkpoint every this many steps; 0 = only at the end
    max_nonfinite: int = 3        # stop after this many consecutive steps with a non-finite loss or gradient
    dry_run: bool = False         # print the memory plan of the resolved config and exit
    demo_gradient: bool = False   # print the one-step PSR / NSR / W-REINFORCE example on 5 tokens and exit


# The main job (`python nsr.py`, no --model), 2 CPU cores: PSR and NSR side by side from one base, one thread,
# M = 1/4 of the batch (the paper's), critic_lr 1e-3; eval_n = 256 = 4 x the table's largest k (docs/passk.md).
TOY_DEFAULTS = dict(objective="psr,nsr", out_dir="runs/nsr-toy", steps=100, batch_prompts=16, group_size=8,
                    max_new_tokens=64, lr=5e-5, critic_lr=1e-3, mini_batch_size=32, micro_batch_size=64, eval_n=256,
                    eval_temperature=1.0, eval_top_p=1.0, threads=1)


def train_side_by_side(cfg: Config, objectives: list[str]) -> dict:
    """The main job: one run per objective from the same base, seed and settings, in <out_dir>/<objective>,
    every config checked before the first run starts (runs.side_configs) -> {objective: train()'s result}."""
    return {objective: train(c) for objective, c in runs.side_configs(cfg, objectives, OBJECTIVES).items()}


def main(argv=None) -> None:
    cfg = settings.parse_config(Config, argv, TOY_DEFAULTS)
    objectives = cfg.objective.split(",")
    try:
        if cfg.demo_gradient:
            print(why.gradient_demo())
        elif cfg.dry_run:
            print(presets.format_memory_plan(presets.memory_plan(runs.resolve_for_plan(cfg, OBJECTIVES))))
        elif len(objectives) > 1 or (not cfg.model and cfg.out_dir == TOY_DEFAULTS["out_dir"]):
            results = train_side_by_side(cfg, objectives)
            print("\n" + runs.side_by_side_table(results, cfg.eval_n))
            print("run directories: " + ", ".join(r["run_dir"] for r in results.values())
                  + " (config.json, metrics.jsonl, eval.jsonl, eval/, checkpoint)")
        else:
            result = train(cfg)
            if result["table"]:
                print("\nPass@k (%) before and after training (eval sets: " + ", ".join(result["evals"]) + ")")
                print(result["table"])
            print(f"run directory: {result['run_dir']} (config.json, metrics.jsonl, eval.jsonl, eval/, checkpoint)")
    except settings.UserError as e:                  # bad input: one line, exit status 2 (a traceback = a bug)
        print(f"nsr.py: error: {e}", file=sys.stderr)
        sys.exit(2)

if __name__ == "__main__":
    main()
