"""
nsr.py -- RL with verifiable rewards, split by the sign of the reward.

A small, readable implementation of
  "The Surprising Effectiveness of Negative Reinforcement in LLM Reasoning"
  (Zhu, Xia, Wei, Chen, Chen, Meng; NeurIPS 2025, arXiv 2506.01347).

THE IDEA
  For a problem x the policy pi_theta samples G responses y_1..y_G; the verifier gives r_i = 1 if the
  final \\boxed{} answer equals the gold answer, else 0. Every method is ONE loss with a per-sample
  weight w_i (section OBJECTIVES):

    L(theta) = -(1/Z) * sum_i w_i * sum_t log pi_theta(y_i,t | x, y_i,<t)

      PSR          w_i = r_i                        only correct samples, pushed up
      NSR          w_i = -(1 - r_i)                 only wrong samples, pushed down
      W-REINFORCE  w_i = lam * r_i - (1 - r_i)      = lam * PSR + NSR, lam = 0.1
      REINFORCE    w_i = 2 r_i - 1                  = PSR + NSR (+1 / -1)
      GRPO         w_i = (r_i - mean_g r) / (std_g r + 1e-6) over the G samples g of the same prompt
      PPO          w_i,t = A_i,t: a learned critic's GAE advantage per token, whitened (section CRITIC)
    Z = number of response tokens of the samples with w_i != 0 in the mini-batch (a token mean, as the
        official code), fixed before micro-batching; or a constant (--normalizer constant).
    The paper's update (section TRAINING): PSR trains on the correct samples only, NSR on the wrong ones;
    that subset is cut into mini-batches of M responses, each one optimizer step on the PPO-clipped
    surrogate of this loss (clip 0.2), minus an entropy bonus.

  The token-level gradient (the paper's analysis): at one position with logits z, pi = softmax(z)
  and sampled token y,   dL/dz_v = -w * (1[v = y] - pi_v).
  NSR (w = -1) lowers z_y by (1 - pi_y) and raises every other z_v by pi_v: the freed probability
  goes where the model's prior already puts it. PSR (w = +1) sharpens onto y. See --demo-gradient.

THE PIPELINE (one banner per stage in train()): sample (sample.generate) -> verify (verifier.reward)
  -> weight (sample_weights; ppo: ppo_advantages) -> loss (policy_loss, in update()) -> step (AdamW on
  fp32 master weights) -> log / evaluate (passk.evaluate) / checkpoint.
READ IN THIS ORDER: OBJECTIVES (sample_weights, policy_loss), CRITIC (ppo only), TRAINING (train(),
  then the helpers it calls: sample_rollouts, update, backward_on_batch, optimizer_step), PRESETS.

DEVIATIONS from the paper and its official code (github.com/TianHongZXY/RLVR-Decomposed, built on verl):
  1. One GPU, one process: a hand-written KV-cache sampler instead of vLLM; no FSDP, no Ray.
  2. The update is the official code's (section TRAINING): the objective's subset, mini-batches of
     --mini-batch-size responses counted after it (a last partial one scaled by its size / M), the
     clipped surrogate (clip 0.2), an entropy bonus (1e-3, the official yaml; the paper's text says
     1e-4). Their issue #6 reports that NSR's gains depended on clipping and several mini-batches.
     --clip-eps 0 --mini-batch-size 0 --entropy-coef 0 gives one exactly on-policy -w log pi step.
     Our token mean runs over the whole mini-batch (verl's over each micro-batch, then summed with
     weights len(micro) / M): the same for equal micro-batches, and independent of micro_batch_size.
     GRPO's token mean counts only the samples with a non-zero weight (verl's counts all of them).
  3. The "old" log-probs of the clipped ratio are the sampler's (Rollouts.logprobs), not a second
     forward pass of the policy as in verl; the two can differ in the last bits (kernels, bf16).
  4. A step in which no sample carries a weight (e.g. NSR when every answer was right) makes no
     optimizer step; a framework would still step AdamW with a zero gradient (momentum and weight
     decay would move the weights).
  5. Precision: a bf16 model with fp32 master weights and fp32 gradient accumulation (section
     TRAINING) instead of FSDP mixed precision; both update fp32 weights.
  6. The main job (`python nsr.py`) runs on the toy world (toy.py) with toy-sized settings
     (TOY_DEFAULTS: 100 steps of 16 prompts x 8 at lr 2e-4, 64 response tokens, ...), not the paper's (lr 1e-6, MATH, long responses).
  7. KL: none for PSR, NSR, W-REINFORCE, REINFORCE and GRPO by default (the paper's GRPO uses a k3 KL
     loss of 0.001: --kl-coef 0.001); PPO's is a reward penalty of 0.001, as the paper's. The KL
     reward uses the sampler's log-probs as log pi_old. Weight decay applies to every parameter.
  8. PPO's critic takes one optimizer step per policy mini-batch (verl's critic mini-batches are
     counted differently; docs/scaling.md), and its value head starts random (seeded).

COMMANDS
  python nsr.py                          # main job: toy world, NSR, Pass@k table of base vs trained
  python nsr.py --objective psr          # or nsr, w-reinforce, reinforce, grpo, ppo
  python nsr.py --clip-eps 0 --mini-batch-size 0 --entropy-coef 0   # one on-policy -w log pi step per batch
  python nsr.py --demo-gradient          # one PSR / NSR / W-REINFORCE step on 5 tokens, as numbers
  python nsr.py --preset qwen2.5-0.5b-instruct --train math_train.jsonl --eval math_test.jsonl \\
                --out-dir runs/qwen-nsr     # a real model on one 24 GB GPU (see PRESETS, --dry-run)
  python nsr.py --preset qwen2.5-math-1.5b --dry-run   # the paper's family on 24 GB (--optimizer-offload)
  python nsr.py ... --resume             # continue a stopped run exactly (same flags)
  python nsr.py --help                   # every Config field, with its comment
  python -m pytest -q test_nsr.py        # the tests
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import pathlib
import re
import shutil
import time
from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForTokenClassification

import passk
import sample
import toy
import verifier

# =================================================================================================
# OBJECTIVES: rewards -> per-sample weights -> ONE policy-gradient loss
# =================================================================================================
#
# Every method of the paper is the same policy-gradient loss with a different weight w_i per sample
# (Spinning Up: "the weight for each log-prob is R"). With r_i in {0, 1} from the verifier:
#
#   objective     w_i (r_i = 1)   w_i (r_i = 0)
#   psr              +1               0          raise the likelihood of correct samples only
#   nsr               0              -1          lower the likelihood of wrong samples only
#   w-reinforce     +lam             -1          lam * PSR + NSR, lam = 0.1 in the paper
#   reinforce        +1              -1          PSR + NSR
#   grpo        (r_i - mean_g r) / (std_g r + 1e-6) within the G samples g of the same prompt
#   ppo         a per-TOKEN weight A_i,t: the critic's GAE advantage (section CRITIC), whitened
#
#   L(theta) = -(1 / Z) * sum_i w_i * sum_t log pi_theta(y_i,t | x_i, y_i,<t)
#
# Which samples a step trains on (the official code's `batch.subset`, training_subset below):
#   psr: only the correct ones, nsr: only the wrong ones, every other objective: all of them.
#
# Z is a normaliser fixed for the whole batch BEFORE it is cut into micro-batches (so the gradient
# does not depend on the micro-batch size): by default the number of response tokens of the samples
# that carry a non-zero weight (the official code's token mean over the trained samples), or a
# constant (number of samples x max_new_tokens) with --normalizer constant.
#
# ----- STUDENT REGION: a new objective is a new row in sample_weights, nothing else changes. -----


OBJECTIVES = ("psr", "nsr", "w-reinforce", "reinforce", "grpo", "ppo")


def sample_weights(rewards, objective: str, lam: float = 0.1, group_size: int = 8) -> torch.Tensor:
    """Per-sample weights w (N,) from rewards r (N,) in {0, 1}; the table above.

    rewards: N = num_prompts * group_size values, the group_size samples of one prompt contiguous
    (that is how the training loop lays them out); only GRPO looks at the groups.
    """
    r = torch.as_tensor(rewards, dtype=torch.float32).flatten()             # (N,)
    if objective not in OBJECTIVES or objective == "ppo":
        raise ValueError(f"unknown objective {objective!r} for sample_weights; choose one of "
                         f"{', '.join(OBJECTIVES[:-1])} (ppo's per-token weights come from ppo_advantages)")
    if not bool(((r == 0) | (r == 1)).all()):
        raise ValueError(f"rewards must be 0 or 1 (verifier.reward), got {sorted(set(r.tolist()))}")
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    correct = r == 1                                                         # (N,) bool
    if objective == "psr":
        return torch.where(correct, 1.0, 0.0)
    if objective == "nsr":
        return torch.where(correct, 0.0, -1.0)
    if objective == "w-reinforce":
        return torch.where(correct, float(lam), -1.0)
    if objective == "reinforce":
        return torch.where(correct, 1.0, -1.0)
    # grpo: the group-normalised advantage (Shao et al. 2024, DeepSeekMath, eq. for outcome supervision)
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
    the paper's update (--mini-batch-size) are counted AFTER this cut, so the number of optimizer steps
    per rollout batch grows with the subset (at 70% accuracy PSR makes more updates than NSR)."""
    if objective == "psr":
        return [i for i, r in enumerate(rewards) if r == 1]
    if objective == "nsr":
        return [i for i, r in enumerate(rewards) if r == 0]
    return list(range(len(rewards)))


def policy_loss(logp: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor, normalizer: float,
                old_logp: torch.Tensor | None = None, clip_eps: float = 0.0) -> torch.Tensor:
    """The ONE policy-gradient loss of every objective.  L = -(1/Z) sum_i w_i sum_t log pi(y_i,t).

    logp:     (N, T) log pi_theta of each response token (carries the gradient)
    weights:  (N,)   w_i from sample_weights, or (N, T) per-token advantages A_i,t (ppo)
    mask:     (N, T) 1.0 on real response tokens, 0.0 on padding
    normalizer: Z, a number fixed for the whole batch before micro-batching (see the section comment)
    old_logp: (N, T) log-probs under the policy that SAMPLED the tokens; only for clip_eps > 0
    clip_eps: PPO ratio clipping (Config default 0.2; 0 = off: the plain -w log pi, for one on-policy step)

    Token-level gradient (why NSR "redistributes along the prior"). At one position with logits z
    (V,), pi = softmax(z) and sampled token y: log pi_y = z_y - logsumexp(z), so
        d log pi_y / d z_v = 1[v = y] - pi_v   and for  L = -w * log pi_y:
        dL/dz_v = -w * (1[v = y] - pi_v).
    Gradient DESCENT moves z_v by -lr * dL/dz_v = lr * w * (1[v = y] - pi_v):
      PSR (w = +1): z_y rises by lr (1 - pi_y), every other z_v falls by lr pi_v  -> sharpens onto y;
      NSR (w = -1): z_y falls by lr (1 - pi_y), every other z_v RISES by lr pi_v, in proportion to the
                    model's own prior pi_v -> the mass taken from the wrong answer goes to what the
                    model already found plausible, so NSR refines rather than collapses the model.
    (Tested against autograd in test_nsr.py.)
    """
    w = (weights[:, None] if weights.dim() == 1 else weights).to(logp.dtype)   # (N, 1) or (N, T)
    if clip_eps > 0:
        # PPO clipped surrogate with advantage w: -min(rho * w, clip(rho, 1-eps, 1+eps) * w),
        # rho = pi_theta / pi_old. At rho = 1 its gradient is -w * grad log pi: the same as below.
        # Its gradient is 0 exactly where the clipped term is the smaller one and constant: rho > 1 + eps
        # under w > 0 (already raised enough) and rho < 1 - eps under w < 0 (already lowered enough).
        assert old_logp is not None, "clip_eps > 0 needs old_logp (the sampler's log-probs)"
        ratio = torch.exp(logp - old_logp)                                   # (N, T) rho
        per_token = -torch.minimum(ratio * w, ratio.clamp(1 - clip_eps, 1 + clip_eps) * w)
    else:
        per_token = -w * logp                                                # (N, T) -w_i log pi
    return (per_token * mask).sum() / normalizer                             # scalar


def loss_normalizer(weights: torch.Tensor, lengths, mode: str = "tokens", max_new_tokens: int = 1) -> float:
    """Z of policy_loss for a whole batch (computed once, before micro-batching).

    weights (N,) or (N, T), lengths: response lengths (N,). "tokens": sum of lengths of samples with
    w != 0 (the official token mean); "constant": N * max_new_tokens (independent of what was sampled).
    Returns 0.0 when no sample carries a weight (update() then skips the rows, or, when an entropy or KL
    term is on, uses their token mean).
    """
    lengths = torch.as_tensor(lengths, dtype=torch.float32)
    carries = (weights != 0 if weights.dim() == 1 else (weights != 0).any(dim=1)).cpu()   # (N,) bool
    if mode == "tokens":
        return float(lengths[carries].sum())
    if mode == "constant":
        return float(len(lengths) * max_new_tokens) if bool(carries.any()) else 0.0
    raise ValueError(f"normalizer must be 'tokens' or 'constant', got {mode!r}")


def demo_gradient(lr: float = 1.0, lam: float = 0.1) -> str:
    """The token-level gradient as numbers: one SGD step on the logits of a 5-token distribution.

    Returns the printed table: the probabilities before, after one PSR step and one NSR step on the
    same sampled token y, and after one W-REINFORCE step on two samples (y judged wrong, y2 correct).
    """
    names = ["a", "b", "c", "d", "e"]
    prior = torch.tensor([0.40, 0.25, 0.20, 0.10, 0.05])
    y, y2 = 1, 0                                       # sampled token "b"; for W-REINFORCE also "a"

    def step(samples):                                 # samples: [(token, weight)], one position each
        z = prior.log().clone().requires_grad_(True)   # logits (V,) whose softmax is the prior
        logp = torch.log_softmax(z, dim=-1)
        tokens = torch.tensor([t for t, _ in samples])
        weights = torch.tensor([w for _, w in samples])
        loss = policy_loss(logp[tokens][:, None], weights, torch.ones(len(samples), 1), len(samples))
        loss.backward()
        with torch.no_grad():
            return torch.softmax(z - lr * z.grad, dim=-1), -lr * z.grad  # SGD on the logits

    psr, nsr = step([(y, 1.0)]), step([(y, -1.0)])
    wr = step([(y, -1.0), (y2, lam)])
    rows = [("probabilities before", prior),
            (f"after PSR on {names[y]} (w=+1)", psr[0]),
            (f"after NSR on {names[y]} (w=-1)", nsr[0]),
            (f"after W-REINFORCE: {names[y]} wrong (w=-1), {names[y2]} right (w=+{lam})", wr[0]),
            ("NSR logit change = -lr*(1[v=y]-pi_v)", nsr[1])]
    width = max(len(label) for label, _ in rows)
    lines = [f"one SGD step (lr={lr}) on the logits z of pi = softmax(z); sampled token y = {names[y]!r}",
             " " * width + "  " + "  ".join(f"{n:>6}" for n in names)]
    for label, values in rows:
        lines.append(f"{label:<{width}}  " + "  ".join(f"{v:+6.3f}" if label.startswith("NSR logit")
                                                      else f"{v:6.3f}" for v in values.tolist()))
    lines.append("PSR sharpens onto y. NSR lowers z_y by lr*(1-pi_y) and raises every other logit by lr*pi_v,\n"
                 "its prior: the freed mass goes mostly to the likeliest alternatives (a).")
    return "\n".join(lines)


# =================================================================================================
# CRITIC (ppo only): a learned baseline -> per-token GAE advantages -> the clipped value loss
# =================================================================================================
#
# PPO (Schulman et al. 2017) as the official code runs it (RLVR-Decomposed run_qwen2.5-math-7b_ppo.sh;
# verl/trainer/ppo/core_algos.py: compute_gae_advantage_return, masked_whiten, compute_value_loss):
#   critic      V_phi(x, y_<t): a second copy of the base model whose output layer is a ONE-output
#               head (transformers' token classification, as verl), its own AdamW (--critic-lr)
#   rewards     r_i,t = -beta * (log pi_old(y_i,t) - log pi_ref(y_i,t))   on every response token
#                       + r_i                                             on the LAST response token
#               (the paper's PPO: a KL reward penalty to the frozen initial policy, beta = --kl-coef)
#   GAE         delta_t = r_t + gamma * V_{t+1} - V_t          (V past a response's end = 0)
#               A_t     = delta_t + gamma * lam * A_{t+1}      returns R_t = A_t + V_t
#               gamma = lam = 1 (verl's defaults, the paper's): A_t = sum_{s >= t} r_s - V_t
#   whitening   A <- (A - mean A) / sqrt(var A + 1e-8) over the batch's response tokens
#   value loss  0.5 * token-mean of max((V - R)^2, (V_old + clip(V - V_old, -0.5, 0.5) - R)^2)
# The policy then uses A_i,t as a per-token weight in the SAME policy_loss as every other objective.
#
# ----- STUDENT REGION: the critic's advantage and loss -----


def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                   lam: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded rows -> (advantages, returns), all (N, T).

    rewards, values, mask: (N, T); positions with mask 0 are ignored (their reward and value count as 0,
    so a row's last real token sees V_{t+1} = 0) and come back as 0.
    """
    rewards, values = rewards * mask, values * mask                          # (N, T)
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])                             # (N,) V_{t+1}
    next_advantage = torch.zeros_like(rewards[:, 0])                         # (N,) A_{t+1}
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]            # (N,) TD error
        next_advantage = delta + gamma * lam * next_advantage                # (N,) A_t
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    advantages = advantages * mask
    return advantages, (advantages + values) * mask                          # A (N, T), R = A + V (N, T)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the positions where mask is 1 (unbiased var, as verl); 0 elsewhere."""
    count = mask.sum()
    mean = (x * mask).sum() / count
    var = (((x - mean) ** 2) * mask).sum() / (count - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               normalizer: float, clip: float = 0.5) -> torch.Tensor:
    """0.5 * sum_t max((V - R)^2, (V_clipped - R)^2) / Z: PPO's clipped value loss, all (N, T).

    V_clipped = V_old + clip(V - V_old, -clip, clip): a value may move at most `clip` from the one
    that computed the advantages; past that, only the unclipped error can still pull it further.
    """
    clipped = old_values + (values - old_values).clamp(-clip, clip)         # (N, T)
    per_token = torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return 0.5 * (per_token * mask).sum() / normalizer


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) over the masked tokens: 1 = the critic predicts the returns, 0 = no better
    than their mean, < 0 = worse. A healthy PPO run climbs from ~0 towards 1 as the critic learns."""
    count = mask.sum()

    def var(x):
        mean = (x * mask).sum() / count
        return float((((x - mean) ** 2) * mask).sum() / count)

    total = var(returns)
    return 1.0 - var(returns - values) / total if total > 0 else 0.0


def critic_values(critic, input_ids, attention_mask, position_ids, response_len: int) -> torch.Tensor:
    """V(x, y_<t) for the last response_len tokens of each row: (n, R) fp32. The value of token t is read
    at the column BEFORE it (the state the policy was in when it chose y_t), as the log-probs are."""
    out = critic(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                 use_cache=False)
    return out.logits[:, -response_len - 1:-1, 0].float()                   # (n, R)


# =================================================================================================
# TRAINING: config, the loop (sample -> verify -> weight -> loss -> step -> evaluate), checkpoints
# =================================================================================================
#
# One step:  B prompts x G rollouts --generate--> responses --verifier.reward--> r in {0,1}
#            --sample_weights--> w --training_subset--> the samples to train on
#            --mini-batches of M (the paper's update)--> policy_loss --> AdamW --> theta
# THE PAPER'S UPDATE (official-recipe.md; verl's dp_actor.update_policy): the subset is cut into chunks
# of --mini-batch-size M responses, each chunk ONE optimizer step on the clipped surrogate (ratio
# against the rollout policy: the first chunk is exactly on-policy, later ones are not), a last
# partial chunk of m < M responses steps too with its loss scaled by m / M; minus an entropy bonus.
# So PSR makes ceil(#correct / M) updates per rollout batch and NSR ceil(#wrong / M).
# Precision: on a GPU the model computes in bf16, but an AdamW step at lr 1e-6 moves a weight of
# size 0.02 by ~1e-6, far below bf16's resolution there (one bf16 step at 0.02 is 2^-13 = 1.2e-4),
# so a bf16-only update rounds back to the old weight and training silently does nothing. We keep
# fp32 MASTER weights: the optimizer owns fp32 copies, bf16 grads are accumulated into fp32 grads
# after every micro-batch, AdamW updates the fp32 copy, and the bf16 model gets round(master).
# Memory per parameter: 2 (bf16 weight) + 2 (bf16 grad) + 4 (master) + 4 (master grad) + 8 (AdamW m, v)
# = 20 bytes. With an fp32 model (CPU default) the model's own weights are the master (16 bytes).
# --optimizer-offload keeps the 16 bytes of masters, their grads and AdamW's m, v in CPU RAM instead.


@dataclass
class Config:
    """Every knob of a run. `python nsr.py --help` lists them with these comments."""
    # ---- model and data ("" = the toy world of toy.py) ----
    model: str = ""               # HF hub name or local dir of the policy; "" = the toy base (toy.ensure_base)
    toy_seed: int = 0             # recipe seed of the toy base when --model is not given (runs/toy-base-s<seed>)
    train: str = ""               # JSONL file of training problems; "" = the toy world's train.jsonl
    eval: list = field(default_factory=list)  # JSONL eval set, repeatable; [] with the toy = its test splits
    template: str = "auto"        # prompt template: auto, plain, qwen2.5-math, qwen3, llama3
    problem_field: str = "problem"  # JSONL field holding the problem text
    answer_field: str = "answer"  # JSONL field holding the gold answer
    max_prompt_len: int = 0       # skip (and count) prompts longer than this many tokens; 0 = no limit
    preset: str = ""              # PRESETS name for one 24 GB GPU: its values become defaults (explicit flags win)
    dry_run: bool = False         # print the memory plan of the resolved config and exit
    demo_gradient: bool = False   # print the one-step PSR / NSR / W-REINFORCE example on 5 tokens and exit
    # ---- objective and the update ----
    objective: str = "nsr"        # psr, nsr, w-reinforce, reinforce, grpo or ppo (the OBJECTIVES table)
    lam: float = 0.1              # lambda of w-reinforce: weight of correct samples (the paper: 0.1)
    normalizer: str = "tokens"    # Z of the loss: tokens (response tokens of weighted samples) or constant
    clip_eps: float = 0.2         # PPO ratio clipping epsilon (the paper: 0.2); 0 = plain -w log pi, on-policy only
    mini_batch_size: int = 64     # M: responses per optimizer step, counted after the objective's subset;
                                  # 0 = the whole subset in one step (the paper: 1/4 of a full batch)
    entropy_coef: float = 0.001   # entropy bonus: loss -= entropy_coef * mean token entropy (official yaml 1e-3)
    kl_coef: float = -1.0         # KL to the frozen initial model; -1 = the paper's: 0.001 for ppo (a reward
                                  # penalty), 0 for the rest (for them a k3 loss term, as GRPO's)
    critic_lr: float = 1e-5       # ppo: the critic's AdamW learning rate (the paper: 1e-5 = 10 x lr)
    value_clip: float = 0.5       # ppo: a value may move at most this far from the one that made the advantages
    gae_gamma: float = 1.0        # ppo: GAE discount gamma (verl's default, the paper's)
    gae_lam: float = 1.0          # ppo: GAE lambda (verl's default, the paper's)
    # ---- rollouts ----
    steps: int = 100              # training steps (one rollout batch each)
    batch_prompts: int = 32       # B: prompts per step
    group_size: int = 8           # G: rollouts per prompt
    max_new_tokens: int = 1024    # response length limit while training (longer = truncated)
    temperature: float = 1.0      # sampling temperature of training rollouts (the paper: 1.0)
    top_p: float = 1.0            # nucleus top-p of training rollouts (the paper: 1.0)
    chunk_size: int = 256         # rows sampled at once (bounds the KV-cache memory)
    # ---- optimisation ----
    lr: float = 1e-6              # constant AdamW learning rate (the paper: 1e-6)
    weight_decay: float = 0.01    # AdamW weight decay
    adam_beta1: float = 0.9       # AdamW beta1
    adam_beta2: float = 0.999     # AdamW beta2
    grad_clip: float = 1.0        # clip the global gradient norm to this; 0 = no clipping
    micro_batch_size: int = 8     # sequences per forward/backward (gradient accumulation over the batch)
    dtype: str = "auto"           # auto (bf16 on CUDA, fp32 on CPU), float32 or bfloat16
    optimizer_offload: bool = False  # fp32 masters, their grads and AdamW state in CPU RAM; AdamW steps on CPU
    grad_checkpointing: str = "auto"  # on, off, or auto = on for models above checkpointing_min_params
    checkpointing_min_params: int = 100_000_000  # the size above which auto turns checkpointing on
    head_chunk: int = 128         # with checkpointing: output layer + log-softmax in chunks of this many positions
    device: str = "auto"          # auto (cuda if available), cpu, cuda, cuda:1, ...
    threads: int = 0              # torch CPU threads (torch.set_num_threads); 0 = leave torch's default
    seed: int = 0                 # seeds sampling, data order and evaluation
    # ---- evaluation (passk.evaluate) ----
    eval_n: int = 64              # samples per eval problem (Pass@k for k <= eval_n); 0 = no evaluation
    eval_every: int = 0           # also evaluate every this many steps; 0 = only before and after training
    eval_limit: int = 0           # evaluate only the first this many problems of each eval set; 0 = all
    eval_temperature: float = 0.6  # the paper's evaluation: 0.6
    eval_top_p: float = 0.95      # the paper's evaluation: 0.95
    eval_max_new_tokens: int = 0  # response limit while evaluating; 0 = max_new_tokens
    # ---- run directory and checkpoints ----
    out_dir: str = "runs/nsr"     # run directory: config.json, metrics.jsonl, eval.jsonl, eval/, checkpoint-*
    save_every: int = 0           # also checkpoint every this many steps; 0 = only at the end
    resume: bool = False          # continue from out_dir's latest checkpoint (same flags, exactly the same run)
    max_nonfinite: int = 3        # stop after this many consecutive steps with a non-finite loss or gradient


# The main job (`python nsr.py`, no --model): values sized for the toy world on 2 CPU cores.
# Applied under --preset and explicit flags. A real model without a preset uses the Config defaults.
# threads=1: the toy model is so small that a second CPU thread only adds synchronisation; on a busy
# 2-core machine 2 threads made sampling 10-40x slower than 1 (OpenMP threads waiting for each other).
# mini_batch_size 32 = a quarter of the 16 x 8 batch (the paper's ratio); critic_lr = 10 x lr (the paper's).
TOY_DEFAULTS = dict(out_dir="runs/nsr-toy", steps=100, batch_prompts=16, group_size=8, max_new_tokens=64,
                    lr=2e-4, critic_lr=2e-3, mini_batch_size=32, micro_batch_size=64, eval_n=64,
                    eval_temperature=1.0, eval_top_p=1.0, threads=1)


def kl_coef(cfg: Config) -> float:
    """The KL coefficient in force: --kl-coef, or the paper's (-1): 0.001 for ppo, 0 otherwise."""
    return cfg.kl_coef if cfg.kl_coef >= 0 else (0.001 if cfg.objective == "ppo" else 0.0)


def _field_help() -> dict[str, str]:
    """The comment after each Config field, for --help (read from the source: one place to document)."""
    help_text, name = {}, None
    for line in inspect.getsource(Config).splitlines():
        m = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.*)$", line)
        more = re.match(r"\s+#\s*(.*)$", line)
        if m:
            name, help_text[m.group(1)] = m.group(1), m.group(2)
        elif more and name and not more.group(1).startswith("----"):
            help_text[name] += " " + more.group(1)     # a comment continued on the next line
        else:
            name = None
    return help_text


def parse_config(argv=None) -> Config:
    """argv -> a validated Config. Precedence: Config defaults < TOY_DEFAULTS (no --model) < --preset
    < explicit flags. Every Config field is a flag (--batch-prompts for batch_prompts)."""

    parser = argparse.ArgumentParser(
        prog="nsr.py", description="PSR / NSR / W-REINFORCE / REINFORCE / GRPO / PPO with verifiable rewards. "
        "No arguments: the main job on the toy world.", argument_default=argparse.SUPPRESS)
    help_text = _field_help()
    for f in dataclasses.fields(Config):
        flag, h = "--" + f.name.replace("_", "-"), help_text.get(f.name, "")
        if f.type == "bool":
            parser.add_argument(flag, action="store_true", help=h)
        elif f.type == "list":
            parser.add_argument(flag, action="append", metavar="FILE", help=h)
        else:
            kind = {"int": int, "float": float, "str": str}[f.type]
            parser.add_argument(flag, type=kind, help=f"{h} (default: {f.default})")
    given = vars(parser.parse_args(argv))

    preset = {}
    if given.get("preset"):
        # PRESETS: a read-only table defined in the PRESETS section below (it exists by call time)
        if given["preset"] not in PRESETS:
            parser.error(f"unknown --preset {given['preset']!r}; choose one of {', '.join(PRESETS)}")
        preset = PRESETS[given["preset"]]
    toy_world = not (given.get("model") or preset.get("model"))
    values = {**(TOY_DEFAULTS if toy_world else {}), **preset, **given}
    cfg = Config(**values)
    problems = config_problems(cfg)
    if problems:
        parser.error("invalid configuration:\n  " + "\n  ".join(problems))
    return cfg


def config_problems(cfg: Config) -> list[str]:
    """Everything wrong with a config, as messages (empty = valid). Checked before any work starts."""
    bad = []
    if cfg.objective not in OBJECTIVES:
        bad.append(f"--objective {cfg.objective!r} is unknown; choose one of {', '.join(OBJECTIVES)}")
    if cfg.lam < 0:
        bad.append(f"--lam must be >= 0 (weight of correct samples in w-reinforce), got {cfg.lam}")
    if cfg.objective == "grpo" and cfg.group_size < 2:
        bad.append(f"--group-size must be >= 2 for grpo (a group std needs two samples), got {cfg.group_size}")
    for name in ("steps", "batch_prompts", "group_size", "max_new_tokens", "chunk_size", "micro_batch_size",
                 "max_nonfinite"):
        if getattr(cfg, name) < 1:
            bad.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("max_prompt_len", "eval_n", "eval_every", "eval_limit", "eval_max_new_tokens", "save_every",
                 "grad_clip", "weight_decay", "entropy_coef", "clip_eps", "checkpointing_min_params",
                 "head_chunk", "threads", "mini_batch_size", "value_clip"):
        if getattr(cfg, name) < 0:
            bad.append(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if cfg.kl_coef < 0 and cfg.kl_coef != -1:
        bad.append(f"--kl-coef must be >= 0, or -1 for the paper's default, got {cfg.kl_coef}")
    for name in ("lr", "critic_lr"):
        if not getattr(cfg, name) > 0:
            bad.append(f"--{name.replace('_', '-')} must be > 0, got {getattr(cfg, name)}")
    for name in ("gae_gamma", "gae_lam"):
        if not 0 <= getattr(cfg, name) <= 1:
            bad.append(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(cfg, name)}")
    if cfg.objective == "ppo" and cfg.clip_eps == 0:
        bad.append("--objective ppo needs --clip-eps > 0 (the paper: 0.2)")
    if not 0 < cfg.temperature:
        bad.append(f"--temperature must be > 0 for training (the loss needs a sampling distribution), "
                   f"got {cfg.temperature}")
    for name in ("top_p", "eval_top_p"):
        if not 0 < getattr(cfg, name) <= 1:
            bad.append(f"--{name.replace('_', '-')} must be in (0, 1], got {getattr(cfg, name)}")
    if cfg.eval_temperature < 0:
        bad.append(f"--eval-temperature must be >= 0, got {cfg.eval_temperature}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(cfg, name) < 1:
            bad.append(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(cfg, name)}")
    if cfg.normalizer not in ("tokens", "constant"):
        bad.append(f"--normalizer must be 'tokens' or 'constant', got {cfg.normalizer!r}")
    if cfg.dtype not in ("auto", "float32", "bfloat16"):
        bad.append(f"--dtype must be auto, float32 or bfloat16, got {cfg.dtype!r}")
    if cfg.grad_checkpointing not in ("auto", "on", "off"):
        bad.append(f"--grad-checkpointing must be auto, on or off, got {cfg.grad_checkpointing!r}")
    if cfg.template not in sample.TEMPLATES:
        bad.append(f"--template {cfg.template!r} is unknown; choose one of {', '.join(sample.TEMPLATES)}")
    if cfg.mini_batch_size > 0 and cfg.clip_eps == 0:
        bad.append("--mini-batch-size > 0 needs --clip-eps > 0: every mini-batch after the first is off-policy "
                   "(use --mini-batch-size 0 for one on-policy step)")
    if cfg.clip_eps > 0 and cfg.top_p < 1:
        bad.append("--clip-eps needs --top-p 1: the ratio uses the sampler's log-probs, which top-p truncates")
    if cfg.train and not pathlib.Path(cfg.train).is_file():
        bad.append(f"--train {cfg.train}: no such file")
    for path in cfg.eval:
        if not pathlib.Path(path).is_file():
            bad.append(f"--eval {path}: no such file")
    if cfg.model and not cfg.train and not cfg.dry_run:
        bad.append("--model is given but --train is not: a real model needs --train FILE.jsonl")
    if cfg.device != "auto" and cfg.device.startswith("cuda") and not torch.cuda.is_available():
        bad.append(f"--device {cfg.device}: CUDA is not available on this machine")
    return bad


# ---- sample -------------------------------------------------------------------------------------

def prompt_batch(step: int, num_problems: int, batch_prompts: int, seed: int) -> list[int]:
    """Indices of the B training problems of a step (0-based). Epochs are reshuffled with a generator
    seeded by (seed, epoch), so a step's batch is a pure function of the step: resuming needs no state."""
    indices, perms = [], {}
    for i in range(step * batch_prompts, (step + 1) * batch_prompts):
        epoch, j = divmod(i, num_problems)
        if epoch not in perms:
            g = torch.Generator().manual_seed(seed * 100_003 + epoch)
            perms[epoch] = torch.randperm(num_problems, generator=g).tolist()
        indices.append(perms[epoch][j])
    return indices


# ---- loss: pack the sequences, score them, the loss terms (in backward_on_batch) --------------------

def pack_sequences(prompts: list[list[int]], responses: list[list[int]], device, pad_id: int = 0):
    """Batch prompt + response rows for the training forward pass.

    Layout: prompts LEFT-padded to P columns (as in the sampler), responses RIGHT-padded to R columns,
    so every response starts at column P and the model only has to produce logits for the last R + 1
    columns (logits_to_keep). Returns input_ids (n, P+R), attention_mask (n, P+R), position_ids
    (n, P+R) = cumsum(mask) - 1 (the same positions the sampler used), response_mask (n, R) float.
    """
    n, P, R = len(prompts), max(map(len, prompts)), max(1, max(map(len, responses)))
    input_ids = torch.full((n, P + R), pad_id, dtype=torch.long)
    mask = torch.zeros((n, P + R), dtype=torch.long)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        input_ids[b, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        input_ids[b, P:P + len(r)] = torch.tensor(r, dtype=torch.long)
        mask[b, P - len(p):P + len(r)] = 1
    position_ids = (mask.cumsum(dim=-1) - 1).clamp(min=0)
    return (input_ids.to(device), mask.to(device), position_ids.to(device),
            mask[:, P:].to(device=device, dtype=torch.float32))


def token_logprobs(logits, targets, temperature: float = 1.0, with_entropy: bool = False):
    """logits (n, R, V) any dtype, targets (n, R) -> log pi_T(target) (n, R) fp32, entropy (n, R) or None."""
    logits = logits.float()                                                  # fp32 softmax math
    if temperature != 1.0:
        logits = logits / temperature                                        # pi_T = softmax(z / T)
    # log pi(y) = z_y - logsumexp(z): cross_entropy computes exactly -log softmax(z)[y], fused
    logp = -torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                              reduction="none").view(targets.shape)   # (n, R)
    entropy = None
    if with_entropy:
        # H = -sum_v pi_v log pi_v = logsumexp(z) - sum_v pi_v z_v
        entropy = logits.logsumexp(-1) - (logits.softmax(-1) * logits).sum(-1)   # (n, R)
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

    pieces = [checkpoint(chunk_logprobs, hidden[:, s:s + head_chunk], targets[:, s:s + head_chunk],
                         use_reentrant=False) for s in range(0, R, head_chunk)]
    logp = torch.cat([lp for lp, _ in pieces], dim=1)                        # (n, R)
    entropy = torch.cat([e for _, e in pieces], dim=1) if with_entropy else None
    return logp, entropy


def grads_to_master(t: "Trainable") -> None:
    """After a micro-batch's backward: add each model grad (bf16) into an fp32 sum and free it. On-device,
    the sum is the master's own .grad; with --optimizer-offload it is an fp32 buffer on the model's
    device (t.accum), moved to the CPU master once, in optimizer_step: the same fp32 additions in the same
    order (so the same result, bit for bit), without a PCIe transfer and a CPU pass per micro-batch.
    No-op where the model's weights are their own master (fp32, on-device)."""
    for i, (p, m) in enumerate(zip(t.params, t.master)):
        if p is m or p.grad is None:
            continue
        if t.accum is not None:                                              # offload: sum on the GPU
            t.accum[i] = p.grad.float() if t.accum[i] is None else t.accum[i].add_(p.grad)
        else:
            m.grad = p.grad.float() if m.grad is None else m.grad.add_(p.grad)   # accumulate in fp32
        p.grad = None


def backward_on_batch(model, prompts, responses, weights, normalizer: float, *, micro_batch_size: int,
                      temperature: float = 1.0, clip_eps: float = 0.0, old_logprobs=None,
                      entropy_coef: float = 0.0, kl_coef: float = 0.0, ref_model=None,
                      trainable=None, pad_id: int = 0, head_chunk: int = 0, scale: float = 1.0):
    """Accumulate the gradient of one mini-batch's loss, micro-batch by micro-batch. Returns the loss
    (a float), or None if it was not finite (the caller then discards the gradient).

    prompts/responses: token-id lists (n rows); weights (n,) per sample or (n, T) per token (ppo);
    normalizer Z for the WHOLE mini-batch, so the sum of the micro-batch losses is the mini-batch loss and
    its gradient is independent of micro_batch_size. old_logprobs: per-row lists of the sampler's
    log-probs (for clip_eps > 0). trainable: where the grads go (grads_to_master); None = leave them in
    the model's .grad. scale: m / M for a last, partial mini-batch of m < M responses (the
    official code's len(micro) / ppo_mini_batch_size). head_chunk: see response_logprobs (0 = plain forward).
    """
    device = next(model.parameters()).device
    num_tokens = float(sum(len(r) for r in responses))                      # for entropy / KL means
    total = torch.zeros((), device=device)
    for start in range(0, len(prompts), micro_batch_size):
        rows = slice(start, start + micro_batch_size)
        input_ids, attn, pos, mask = pack_sequences(prompts[rows], responses[rows], device, pad_id)
        R = mask.shape[1]
        logp, entropy = response_logprobs(model, input_ids, attn, pos, R, temperature,
                                          with_entropy=entropy_coef > 0, head_chunk=head_chunk)  # (m, R)
        w = torch.as_tensor(weights[rows], dtype=torch.float32, device=device)  # (m,) or (m, T)
        w = w if w.dim() == 1 else w[:, :R]                                   # (m, R) per-token weights
        old = None
        if clip_eps > 0:
            old = torch.zeros_like(logp)
            for b, row in enumerate(old_logprobs[rows]):
                old[b, :len(row)] = torch.tensor(row, dtype=torch.float32)
        # ----- STUDENT REGION: the loss terms (a new term is one more line here) -----
        # the policy-gradient term (the objectives): -(1/Z) sum w_i sum_t log pi(y_i,t)
        loss = policy_loss(logp, w, mask, normalizer, old_logp=old, clip_eps=clip_eps)
        if entropy_coef > 0:
            # entropy bonus: - c_H * (mean token entropy over the mini-batch's response tokens)
            loss = loss - entropy_coef * (entropy * mask).sum() / num_tokens
        if kl_coef > 0:
            # KL(pi || pi_ref) per token with the non-negative "k3" estimator (Schulman 2020, as GRPO):
            #   exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1
            with torch.no_grad():
                ref_logp, _ = response_logprobs(ref_model, input_ids, attn, pos, R, temperature,
                                                head_chunk=head_chunk)
            d = ref_logp - logp
            loss = loss + kl_coef * ((d.exp() - d - 1) * mask).sum() / num_tokens
        # ----- END OF STUDENT REGION -----
        loss = loss * scale                                                   # a partial chunk: m / M
        if not torch.isfinite(loss):
            return None
        loss.backward()
        if trainable is not None:
            grads_to_master(trainable)
        total += loss.detach()
    return total.item()


# ---- step ---------------------------------------------------------------------------------------

@dataclass
class Trainable:
    """A model and what its optimizer owns: the policy, or the ppo critic."""
    model: torch.nn.Module
    params: list                  # the model's trainable parameters (bf16 or fp32)
    master: list                  # the fp32 tensors AdamW updates: `params` itself for an fp32 model on-device
    optimizer: torch.optim.Optimizer
    accum: list | None = None     # --optimizer-offload: fp32 gradient sums on the model's device (grads_to_master)


def make_trainable(model, cfg: Config, lr: float) -> Trainable:
    """fp32 master weights (see the section comment) and their AdamW.

    With cfg.optimizer_offload the masters and AdamW's m and v live in CPU RAM (pinned when a GPU is there,
    so the copies can run asynchronously): 12 bytes/param, plus the masters' fp32 grads (4) during the
    step. Per OPTIMIZER STEP the GPU sends P x 4 bytes of summed fp32 grads down and receives P x 2 bytes
    of bf16 weights back, and AdamW runs on the CPU (measured for 1.54e9 parameters: `python bench.py
    offload`). The GPU keeps the bf16 weights and grads and, between micro-batches, the fp32 grad sum:
    8 bytes/param while training, 2 while sampling (instead of 20 and 16)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if all(p.dtype == torch.float32 for p in params) and not cfg.optimizer_offload:
        master = params
    else:
        where = "cpu" if cfg.optimizer_offload else params[0].device
        pin = cfg.optimizer_offload and torch.cuda.is_available()
        copies = [p.detach().to(where, torch.float32).clone() for p in params]
        master = [torch.nn.Parameter(c.pin_memory() if pin else c) for c in copies]
    optimizer = torch.optim.AdamW(master, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay)
    return Trainable(model, params, master, optimizer, [None] * len(params) if cfg.optimizer_offload else None)


def optimizer_step(t: Trainable, grad_clip: float):
    """Clip the master gradient, AdamW-update the master, copy it into the model.
    Returns the gradient norm before clipping (a 0-d tensor; non-finite = nothing was changed)."""
    if t.accum is not None:                    # offload: the fp32 grad sums go down to the CPU masters
        for i, m in enumerate(t.master):
            if t.accum[i] is not None:
                m.grad, t.accum[i] = t.accum[i].to(m.device), None
    # g <- g * min(1, grad_clip / ||g||); the returned norm is the one before clipping
    grad_norm = torch.nn.utils.clip_grad_norm_(t.master, grad_clip if grad_clip > 0 else float("inf"))
    if torch.isfinite(grad_norm):
        t.optimizer.step()
        with torch.no_grad():
            for p, m in zip(t.params, t.master):
                if p is not m:
                    p.copy_(m, non_blocking=True)      # model <- round(fp32 master), CPU -> GPU with offload
    zero_grads(t)
    return grad_norm


def zero_grads(t: Trainable) -> None:
    """Free the master grads (the optimizer's), the offload sums and the model's own grads (bf16 leftovers)."""
    t.optimizer.zero_grad(set_to_none=True)
    for p in t.params:
        p.grad = None
    if t.accum is not None:
        t.accum[:] = [None] * len(t.accum)


def enable_gradient_checkpointing(model) -> None:
    """Recompute each layer's activations in the backward pass instead of storing them: the memory
    of activations drops from O(layers x tokens x hidden) to O(tokens x hidden) plus one layer,
    for ~1 extra forward pass of compute. Only active in train() mode. use_reentrant=False is the
    variant PyTorch recommends (works with inputs that do not require grad)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):       # the name in recent transformers 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:                                                      # older 5.x / 4.x name
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


# ---- checkpoints (TRY NOT TO MODIFY: plumbing; resume exactness is tested) -----------------------

def all_finite(model) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def trainable_state(t: Trainable) -> dict:
    """What a checkpoint needs beyond save_pretrained: AdamW's state and the fp32 masters (a bf16
    save_pretrained alone would lose what was not yet rounded into the model)."""
    return {"optimizer": t.optimizer.state_dict(),
            "master": None if t.master is t.params else [m.detach().cpu() for m in t.master]}


def load_trainable_state(t: Trainable, state: dict) -> None:
    t.optimizer.load_state_dict(state["optimizer"])
    if state["master"] is not None:
        with torch.no_grad():
            for m, saved in zip(t.master, state["master"]):
                m.copy_(saved)


def save_checkpoint(run_dir: pathlib.Path, step: int, policy: Trainable, tokenizer, generator,
                    critic: Trainable | None = None) -> pathlib.Path:
    """Write run_dir/checkpoint-<step> atomically: everything goes to a temporary directory that is
    renamed into place only when complete, then the `latest` pointer is replaced (os.replace is
    atomic), then older checkpoints are removed. A crash at any point leaves a complete checkpoint.
    Holds: the policy (save_pretrained), the tokenizer, critic/ (ppo), trainer_state.pt."""
    if not all_finite(policy.model):
        raise RuntimeError(f"step {step}: the model has non-finite weights; refusing to save it "
                           f"(the last checkpoint in {run_dir} stays good)")
    final = run_dir / f"checkpoint-{step:06d}"
    tmp = run_dir / f".tmp-checkpoint-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    policy.model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if critic is not None:
        critic.model.save_pretrained(tmp / "critic")
    torch.save({"step": step, **trainable_state(policy),
                "critic": trainable_state(critic) if critic is not None else None,
                "rng": {"sampler": generator.get_state(), "torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}},
               tmp / "trainer_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    (run_dir / "latest.tmp").write_text(final.name + "\n")
    os.replace(run_dir / "latest.tmp", run_dir / "latest")
    for old in run_dir.glob("checkpoint-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: pathlib.Path) -> pathlib.Path | None:
    pointer = run_dir / "latest"
    if not pointer.is_file():
        return None
    path = run_dir / pointer.read_text().strip()
    return path if (path / "trainer_state.pt").is_file() else None


def truncate_jsonl(path: pathlib.Path, last_step: int) -> None:
    """Keep only the lines of steps <= last_step (a resumed run rewrites the lines after its checkpoint).
    A torn last line (the process was killed mid-write) is dropped too: it belongs to a step after the
    checkpoint, which the resumed run writes again."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    path.write_text("".join(line + "\n" for line in keep))


# ---- evaluate -----------------------------------------------------------------------------------

def evaluate_all(model, tokenizer, eval_sets: dict, cfg: Config, step: int, run_dir: pathlib.Path) -> dict:
    """passk.evaluate on every eval set -> {name: result}; saves eval/step<step>_<name>.json and one
    eval.jsonl line per set. The same seed at every step: base and trained use the same random numbers."""

    results = {}
    for name, problems in eval_sets.items():
        result = passk.evaluate(model, tokenizer, problems, cfg.eval_n, temperature=cfg.eval_temperature,
                                top_p=cfg.eval_top_p,
                                max_new_tokens=cfg.eval_max_new_tokens or cfg.max_new_tokens,
                                seed=cfg.seed, template=cfg.template, chunk_size=cfg.chunk_size,
                                desc=f"eval {name} @ step {step}",
                                out=run_dir / "eval" / f"step{step:06d}_{name}.json",
                                model_name=cfg.model, data_name=name)
        results[name] = result
        ends = passk.passk_curve(result["counts"], cfg.eval_n, [1, cfg.eval_n])
        line = {"step": step, "eval": name, "pass@1": ends[1], f"pass@{cfg.eval_n}": ends[cfg.eval_n],
                "mean_length": result["mean_length"], "mean_entropy": result["mean_entropy"]}
        with (run_dir / "eval.jsonl").open("a") as f:
            f.write(json.dumps(line) + "\n")
    return results


# ---- the loop and its helpers -------------------------------------------------------------------

def resolve_paths(cfg: Config) -> Config:
    """Fill in the toy world's model and data when --model / --train / --eval are not given."""
    if cfg.model:
        return cfg
    base = pathlib.Path(toy.ensure_base(recipe=toy.ToyRecipe(seed=cfg.toy_seed)))
    return dataclasses.replace(cfg, model=str(base), train=cfg.train or str(base / "train.jsonl"),
                               eval=cfg.eval or [str(base / "test_easy.jsonl"), str(base / "test_hard.jsonl")])


def prepare_run_dir(cfg: Config) -> tuple[pathlib.Path, pathlib.Path | None]:
    """The run directory and the checkpoint to resume from (None = a fresh run, which owns the directory:
    old logs would otherwise interleave with the new ones). Writes config.json."""
    run_dir = pathlib.Path(cfg.out_dir)
    ckpt = latest_checkpoint(run_dir) if cfg.resume else None
    if cfg.resume and ckpt is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {run_dir} (expected {run_dir}/latest)")
    if cfg.resume and (run_dir / "config.json").is_file():
        saved = json.loads((run_dir / "config.json").read_text())
        may_differ = {"resume", "steps", "save_every", "eval_every", "max_nonfinite"}   # not the evaluation:
        # a resumed run re-uses the evaluation of the start that is on disk
        changed = [k for k, v in dataclasses.asdict(cfg).items() if k not in may_differ and saved.get(k) != v]
        if changed:
            print(f"WARNING: resuming with different settings than the stopped run: {', '.join(changed)} "
                  f"(the result will not equal an uninterrupted run)")
    if not cfg.resume and run_dir.exists():
        print(f"fresh run: clearing old logs and checkpoints in {run_dir} (use --resume to continue it)")
        for name in ("metrics.jsonl", "eval.jsonl", "latest"):
            (run_dir / name).unlink(missing_ok=True)
        for old in [run_dir / "eval", *run_dir.glob("checkpoint-*"), *run_dir.glob(".tmp-checkpoint-*")]:
            shutil.rmtree(old, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1) + "\n")
    return run_dir, ckpt


@dataclass
class Run:
    """Everything the loop reads and updates, built by setup() (a plain record, no behaviour)."""
    policy: Trainable
    tokenizer: object
    critic: Trainable | None      # ppo only
    ref_model: object | None      # the frozen initial policy, when a KL term is on
    generator: torch.Generator    # all training-rollout randomness
    prompt_ids: list              # token ids of every training prompt
    problems: list                # the training problems (gold answers), aligned with prompt_ids
    eval_sets: dict               # {name: problems}
    evals: dict                   # {name: {step: passk result}}
    start_step: int
    head_chunk: int               # response_logprobs' head_chunk (0 without gradient checkpointing)
    pad_id: int


def setup(cfg: Config, run_dir: pathlib.Path, ckpt: pathlib.Path | None) -> Run:
    """Load the models (from the checkpoint when resuming), optimizers, random state and data."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto"
                          else cfg.device)
    model, tokenizer = sample.load_model(ckpt or cfg.model, dtype=cfg.dtype, device=device)
    num_params = sum(p.numel() for p in model.parameters())
    checkpointing = cfg.grad_checkpointing == "on" or (cfg.grad_checkpointing == "auto"
                                                       and num_params > cfg.checkpointing_min_params)
    critic_model = load_critic(ckpt / "critic" if ckpt else cfg.model, cfg, device) if cfg.objective == "ppo" else None
    for m in (model, critic_model):
        if m is not None:
            if checkpointing:
                enable_gradient_checkpointing(m)
            m.train()    # NOTE: Qwen/Llama have no dropout by default; train() only switches checkpointing on
    ref_model = None
    if kl_coef(cfg) > 0:  # the frozen initial policy (always the original --model, also when resuming)
        ref_model, _ = sample.load_model(cfg.model, dtype=cfg.dtype, device=device)
        ref_model.requires_grad_(False)
    policy = make_trainable(model, cfg, cfg.lr)
    critic = make_trainable(critic_model, cfg, cfg.critic_lr) if critic_model is not None else None
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    start_step = 0
    if ckpt is not None:
        state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True)
        load_trainable_state(policy, state)
        if critic is not None:
            load_trainable_state(critic, state["critic"])
        generator.set_state(state["rng"]["sampler"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        start_step = state["step"]
        if start_step > cfg.steps:
            raise ValueError(f"--resume: the checkpoint in {run_dir} is at step {start_step}, past --steps {cfg.steps}")
        for name in ("metrics.jsonl", "eval.jsonl"):
            truncate_jsonl(run_dir / name, start_step)
        print(f"resumed from {ckpt} at step {start_step}")

    problems = sample.load_problems(cfg.train, cfg.problem_field, cfg.answer_field)
    prompt_ids, kept, n_skipped = sample.encode_prompts(tokenizer, problems, cfg.template, cfg.max_prompt_len or None)
    if not kept:
        raise ValueError(f"{cfg.train}: every prompt is longer than --max-prompt-len {cfg.max_prompt_len}")
    eval_sets = {pathlib.Path(path).stem: sample.load_problems(path, cfg.problem_field, cfg.answer_field)
                 [:cfg.eval_limit or None] for path in (cfg.eval if cfg.eval_n > 0 else [])}
    # a resumed run re-uses the evaluation of the start that is on disk
    evals = {name: ({0: passk.load_result(run_dir / "eval" / f"step{0:06d}_{name}.json")}
                    if ckpt is not None and (run_dir / "eval" / f"step{0:06d}_{name}.json").is_file() else {})
             for name in eval_sets}
    print(f"model {cfg.model}: {num_params / 1e6:.1f}M parameters, {next(model.parameters()).dtype}, "
          f"{device}, gradient checkpointing {'on' if checkpointing else 'off'}, "
          f"{'fp32 master weights' if policy.master is not policy.params else 'fp32 weights'}"
          f"{' in CPU RAM' if cfg.optimizer_offload else ''}; {len(kept)} training problems "
          f"({n_skipped} skipped as too long)" + ("; critic: a copy with a value head" if critic else ""))
    return Run(policy, tokenizer, critic, ref_model, generator, prompt_ids, kept, eval_sets, evals, start_step,
               cfg.head_chunk if checkpointing else 0,
               tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)


def load_critic(name_or_dir, cfg: Config, device):
    """The critic: the base model with a ONE-output head on every position instead of the LM head, loaded
    as transformers' token-classification model, as verl does (the head starts random: its first values
    are noise, which is why a healthy run's explained variance starts near 0). classifier_dropout = 0:
    verl switches the head's dropout off too (values must not be random in train mode)."""
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        cfg.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    local = pathlib.Path(str(name_or_dir)).is_dir()
    config = AutoConfig.from_pretrained(str(name_or_dir), num_labels=1, local_files_only=local)
    config.classifier_dropout = 0.0
    torch.manual_seed(cfg.seed)                      # the head's random init: the same seed, the same critic
    critic = AutoModelForTokenClassification.from_pretrained(str(name_or_dir), config=config, dtype=dtype,
                                                             local_files_only=local)
    return critic.to(device)


def sample_rollouts(run: Run, cfg: Config, step: int):
    """B prompts x G rollouts, one prompt's G rows contiguous -> (prompts, golds, rollouts)."""
    batch = prompt_batch(step, len(run.problems), cfg.batch_prompts, cfg.seed)
    prompts = [run.prompt_ids[i] for i in batch for _ in range(cfg.group_size)]      # (B*G,) token lists
    golds = [run.problems[i]["answer"] for i in batch for _ in range(cfg.group_size)]
    diverged = (f"step {step + 1}: the policy produced non-finite logits while sampling. The model has "
                f"diverged; the likely cause is a too-high learning rate (lr={cfg.lr}): NSR alone at a high "
                f"lr keeps pushing the sampled tokens' logits down without bound. Lower --lr or use "
                f"w-reinforce; the last good checkpoint (if any) is in {cfg.out_dir}.")
    try:
        rollouts = sample.generate(run.policy.model, prompts, cfg.max_new_tokens, temperature=cfg.temperature,
                                   top_p=cfg.top_p, generator=run.generator, chunk_size=cfg.chunk_size)
    except RuntimeError as e:
        # non-finite logits normally come back as NaN log-probs (checked just below); an error raised
        # while the weights are non-finite is divergence too (e.g. torch.multinomial's "probability
        # tensor ..." if a student swaps the sampler back); anything else (out of memory) is re-raised
        if "probability tensor" in str(e) or not all_finite(run.policy.model):
            raise RuntimeError(diverged) from e
        raise
    if not all(math.isfinite(v) for row in rollouts.logprobs for v in row):
        raise RuntimeError(diverged)
    return prompts, golds, rollouts


def minibatches(subset: list[int], size: int) -> list[list[int]]:
    """The paper's update: consecutive chunks of `size` samples of the subset (0 = one chunk of all)."""
    size = size or max(len(subset), 1)
    return [subset[i:i + size] for i in range(0, len(subset), size)]


def update(run: Run, cfg: Config, prompts, rollouts, weights, extra: dict) -> dict:
    """Mini-batch by mini-batch: the critic's step (ppo), then the policy's. Returns the step's stats.

    weights: (N,) per sample or (N, T) per token (ppo). extra: ppo's old values and returns (else {})."""
    subset = training_subset(extra["rewards"], cfg.objective)
    train_all = cfg.entropy_coef > 0 or kl_coef(cfg) > 0 or cfg.objective == "ppo"   # else w = 0 rows carry nothing
    stats = {"losses": [], "grad_norms": [], "trained": 0, "updates": 0, "skipped": False, "critic": []}
    for mini in minibatches(subset, cfg.mini_batch_size):
        scale = len(mini) / cfg.mini_batch_size if cfg.mini_batch_size else 1.0    # a last partial chunk: m / M
        if run.critic is not None:
            stats["critic"].append(critic_update(run, cfg, prompts, rollouts, mini, extra, scale))
        rows = [i for i in mini if train_all or bool((weights[i] != 0).any())]     # the ones with a gradient
        if not rows:
            continue
        # Z from ALL samples of the mini-batch: "constant" = samples x max_new_tokens must not depend on
        # how many samples happened to carry a weight; with only entropy/KL terms left: a token mean
        Z = loss_normalizer(weights[mini], [len(rollouts.tokens[i]) for i in mini], cfg.normalizer,
                            cfg.max_new_tokens) or float(sum(len(rollouts.tokens[i]) for i in rows))
        loss = backward_on_batch(
            run.policy.model, [prompts[i] for i in rows], [rollouts.tokens[i] for i in rows], weights[rows], Z,
            micro_batch_size=cfg.micro_batch_size, temperature=cfg.temperature, clip_eps=cfg.clip_eps,
            old_logprobs=[rollouts.logprobs[i] for i in rows], entropy_coef=cfg.entropy_coef,
            kl_coef=0.0 if cfg.objective == "ppo" else kl_coef(cfg),     # ppo's KL is in its reward
            ref_model=run.ref_model, trainable=run.policy, pad_id=run.pad_id,
            head_chunk=run.head_chunk, scale=scale)
        grad_norm = optimizer_step(run.policy, cfg.grad_clip) if loss is not None else None
        if loss is None or not torch.isfinite(grad_norm):
            zero_grads(run.policy)             # drop what the failed micro-batches accumulated
            stats["skipped"] = True
            break
        stats["losses"].append(loss)
        stats["grad_norms"].append(grad_norm.item())
        stats["trained"] += len(rows)
        stats["updates"] += 1
    return stats


def log_step(run_dir: pathlib.Path, step: int, cfg: Config, rewards, rollouts, stats: dict, extra: dict,
             seconds: tuple) -> dict:
    """One JSON line per step with fixed keys (docs/training.md explains each one)."""
    r = torch.tensor(rewards, dtype=torch.float32).view(cfg.batch_prompts, cfg.group_size)
    n_tokens = sum(len(t) for t in rollouts.tokens)
    skipped = stats["skipped"]

    def mean(xs):
        return None if skipped else (sum(xs) / len(xs) if xs else 0.0)

    metrics = {
        "step": step + 1,
        "reward": r.mean().item(),
        "all_correct": (r.min(dim=1).values == 1).float().mean().item(),
        "all_wrong": (r.max(dim=1).values == 0).float().mean().item(),
        "response_len": n_tokens / len(rollouts.tokens),
        "truncated": sum(rollouts.truncated) / len(rollouts.tokens),
        "entropy": math.fsum(v for row in rollouts.entropies for v in row) / max(n_tokens, 1),
        "loss": mean(stats["losses"]),
        "grad_norm": mean(stats["grad_norms"]),
        "trained_samples": stats["trained"],
        "updates": stats["updates"],
        "skipped": skipped,
        "sample_s": round(seconds[0], 3),
        "train_s": round(seconds[1], 3),
        "tokens_per_s": round(n_tokens / max(seconds[0] + seconds[1], 1e-9), 1),
    }
    if cfg.objective == "ppo":
        critic = stats["critic"]
        metrics.update(value_loss=sum(c["value_loss"] for c in critic) / max(len(critic), 1),
                       critic_grad_norm=sum(c["grad_norm"] for c in critic) / max(len(critic), 1),
                       explained_variance=extra["explained_variance"], adv_mean=extra["adv_mean"])
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(metrics) + "\n")
    return metrics


def finish(run: Run, cfg: Config, run_dir: pathlib.Path) -> str:
    """Evaluate the end (a run resumed after its last step re-uses the saved results) -> the Pass@k table."""
    for name in run.eval_sets:
        saved = run_dir / "eval" / f"step{cfg.steps:06d}_{name}.json"
        if run.start_step == cfg.steps and saved.is_file():
            run.evals[name][cfg.steps] = passk.load_result(saved)
    if run.eval_sets and any(cfg.steps not in by_step for by_step in run.evals.values()):
        truncate_jsonl(run_dir / "eval.jsonl", cfg.steps - 1)
        for name, result in evaluate_all(run.policy.model, run.tokenizer, run.eval_sets, cfg, cfg.steps, run_dir).items():
            run.evals[name][cfg.steps] = result
    rows = {}
    for name, by_step in run.evals.items():
        first, last = min(by_step), max(by_step)
        rows[f"{name} base" if first == 0 else f"{name} step {first}"] = by_step[first]
        rows[f"{name} {cfg.objective} step {last}"] = by_step[last]
    return passk.format_table(rows) if rows else ""


def train(cfg: Config) -> dict:
    """Run the whole job: load, (resume), evaluate the start, train cfg.steps steps, evaluate the end.

    Returns {"run_dir", "step", "metrics" (the last step's line), "evals" ({set: {step: result}}),
    "table" (the Pass@k table of the first vs the last evaluation on every set)}.
    """
    problems = config_problems(cfg)
    if problems:
        raise ValueError("invalid configuration:\n  " + "\n  ".join(problems))
    cfg = resolve_paths(cfg)
    print("config:\n" + json.dumps(dataclasses.asdict(cfg), indent=1))
    run_dir, ckpt = prepare_run_dir(cfg)
    run = setup(cfg, run_dir, ckpt)
    if run.eval_sets and run.start_step == 0:       # ---- evaluate the start ----
        for name, result in evaluate_all(run.policy.model, run.tokenizer, run.eval_sets, cfg, 0, run_dir).items():
            run.evals[name][0] = result

    metrics, nonfinite_streak = {}, 0
    bar = tqdm(range(run.start_step, cfg.steps), initial=run.start_step, total=cfg.steps, desc=cfg.objective,
               dynamic_ncols=True)
    for step in bar:
        # ---- sample: B prompts x G rollouts ----
        t0 = time.time()
        prompts, golds, rollouts = sample_rollouts(run, cfg, step)
        t1 = time.time()

        # ---- verify: r = 1 if the final answer matches the gold answer, else 0 ----
        responses = [run.tokenizer.decode(t, skip_special_tokens=True) for t in rollouts.tokens]
        rewards = [verifier.reward(text, gold) for text, gold in zip(responses, golds)]

        # ---- weight: w_i from the objective (ppo: per-token advantages from the critic) ----
        if cfg.objective == "ppo":
            weights, extra = ppo_advantages(run, cfg, prompts, rollouts, rewards)   # (N, T)
        else:
            weights, extra = sample_weights(rewards, cfg.objective, cfg.lam, cfg.group_size), {}   # (N,)
        extra["rewards"] = rewards

        # ---- loss + step: the subset, in mini-batches of M (the paper's update) ----
        stats = update(run, cfg, prompts, rollouts, weights, extra)
        nonfinite_streak = nonfinite_streak + 1 if stats["skipped"] else 0

        # ---- log: one JSON line per step, fixed keys ----
        metrics = log_step(run_dir, step, cfg, rewards, rollouts, stats, extra, (t1 - t0, time.time() - t1))
        bar.set_postfix(reward=f"{metrics['reward']:.3f}", len=f"{metrics['response_len']:.0f}",
                        ent=f"{metrics['entropy']:.2f}", updates=metrics["updates"],
                        gnorm="skip" if stats["skipped"] else f"{metrics['grad_norm']:.3f}")
        if stats["skipped"]:
            tqdm.write(f"step {step + 1}: non-finite loss or gradient; step skipped ({nonfinite_streak} in a row)")
            if nonfinite_streak >= cfg.max_nonfinite:
                raise RuntimeError(
                    f"step {step + 1}: {nonfinite_streak} consecutive steps had a non-finite loss or gradient; "
                    f"stopping. The model has likely diverged (lr={cfg.lr}); the last good checkpoint (if any) "
                    f"is in {run_dir}.")

        # ---- evaluate / checkpoint ----
        done = step + 1
        if run.eval_sets and cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
            for name, result in evaluate_all(run.policy.model, run.tokenizer, run.eval_sets, cfg, done,
                                             run_dir).items():
                run.evals[name][done] = result
        if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps:
            save_checkpoint(run_dir, done, run.policy, run.tokenizer, run.generator, run.critic)
    bar.close()
    table = finish(run, cfg, run_dir)
    return {"run_dir": str(run_dir), "step": cfg.steps, "metrics": metrics, "evals": run.evals, "table": table}


# ----- STUDENT REGION: ppo, the critic's side of a step (with the CRITIC section) -----

def ppo_advantages(run: Run, cfg: Config, prompts, rollouts, rewards) -> tuple[torch.Tensor, dict]:
    """The critic's values of the rollouts, the per-token rewards and GAE -> (whitened A (N, T), extra).

    extra: old_values and returns (N, T) for the value loss, explained_variance and adv_mean (before
    whitening) for the log. All under no_grad: these are the targets and weights of the update."""
    device = next(run.policy.model.parameters()).device
    N, T = len(prompts), max(len(t) for t in rollouts.tokens)
    values, ref_logp = torch.zeros(N, T, device=device), torch.zeros(N, T, device=device)
    with torch.no_grad():
        for start in range(0, N, cfg.micro_batch_size):
            rows = slice(start, start + cfg.micro_batch_size)
            input_ids, attn, pos, mask = pack_sequences(prompts[rows], rollouts.tokens[rows], device, run.pad_id)
            R = mask.shape[1]
            values[rows, :R] = critic_values(run.critic.model, input_ids, attn, pos, R) * mask
            if run.ref_model is not None:
                ref_logp[rows, :R] = response_logprobs(run.ref_model, input_ids, attn, pos, R, cfg.temperature,
                                                       head_chunk=run.head_chunk)[0] * mask
    lengths = torch.tensor([len(t) for t in rollouts.tokens], device=device)
    mask = (torch.arange(T, device=device)[None, :] < lengths[:, None]).float()        # (N, T)
    old_logp = torch.zeros(N, T, device=device)
    for i, row in enumerate(rollouts.logprobs):
        old_logp[i, :len(row)] = torch.tensor(row, dtype=torch.float32)
    # r_i,t = -beta (log pi_old - log pi_ref) on every token, + the 0/1 outcome on the last one
    token_rewards = -kl_coef(cfg) * (old_logp - ref_logp) * mask if run.ref_model is not None else torch.zeros(N, T, device=device)
    token_rewards[torch.arange(N, device=device), lengths - 1] += torch.tensor(rewards, dtype=torch.float32, device=device)
    advantages, returns = gae_advantages(token_rewards, values, mask, cfg.gae_gamma, cfg.gae_lam)
    extra = {"old_values": values, "returns": returns,
             "explained_variance": explained_variance(values, returns, mask),
             "adv_mean": float((advantages * mask).sum() / mask.sum())}
    return masked_whiten(advantages, mask), extra


def critic_update(run: Run, cfg: Config, prompts, rollouts, mini: list[int], extra: dict, scale: float) -> dict:
    """One optimizer step of the critic on one mini-batch: the clipped value loss, token mean over the
    mini-batch (times m / M for a partial one, as the policy's)."""
    device = next(run.critic.model.parameters()).device
    Z = float(sum(len(rollouts.tokens[i]) for i in mini))
    total = 0.0
    for start in range(0, len(mini), cfg.micro_batch_size):
        rows = mini[start:start + cfg.micro_batch_size]
        input_ids, attn, pos, mask = pack_sequences([prompts[i] for i in rows], [rollouts.tokens[i] for i in rows],
                                                    device, run.pad_id)
        R = mask.shape[1]
        values = critic_values(run.critic.model, input_ids, attn, pos, R)                # (m, R)
        loss = value_loss(values, extra["old_values"][rows, :R], extra["returns"][rows, :R], mask, Z,
                          cfg.value_clip) * scale
        loss.backward()
        grads_to_master(run.critic)
        total += loss.item()
    grad_norm = optimizer_step(run.critic, cfg.grad_clip)
    return {"value_loss": total, "grad_norm": grad_norm.item()}


# =================================================================================================
# PRESETS AND MEMORY PLAN: one consumer GPU (24 GB)
# =================================================================================================
#
# `python nsr.py --preset NAME --dry-run` prints the plan of a preset. The numbers are ESTIMATES from
# the formulas in memory_plan() until measured on a GPU (docs/real-models.md says what was measured).
#
# Bytes per parameter with the training section's precision scheme (see TRAINING):
#   bf16 model:  2 (bf16 weights) + 2 (bf16 grads) + 4 (fp32 master) + 4 (fp32 master grads)
#                + 8 (fp32 AdamW m and v) = 20 bytes/param        (--optimizer-offload: 8 on the GPU,
#   fp32 model:  4 (weights = master) + 4 (grads) + 8 (AdamW) = 16     the fp32 grad sum included; 16 in CPU RAM)
# ppo doubles the model state: its critic is a second copy with its own optimizer (same scheme).
# On one 24 GiB card (P = parameters): Qwen2.5-0.5B 9.2 GiB and Qwen3-0.6B 11.1 GiB fit in bf16;
# Llama-3.2-1B only in fp32 (18.4 GiB); Qwen2.5-Math-1.5B (28.8 GiB in bf16) only with
# --optimizer-offload (11.5 GiB of weights, grads and their fp32 sum on the GPU, 23 GiB in CPU RAM);
# Qwen2.5-Math-7B (142 GiB) not at all: the paper trains it on 8 GPUs with FSDP (docs/scaling.md).
#
# The paper's own settings (official-recipe.md): 1024 prompts x 8 rollouts per step, prompts <= 1024
# and responses <= 3072 tokens, lr 1e-6, mini-batches of 1/4 of the batch, clip 0.2, gradient
# checkpointing. The presets keep G = 8, lr 1e-6, temperature 1 and the paper's update, and shrink the
# prompts per step (32) and, below 1.5B, the lengths.

# Published architecture numbers: each model's config.json on the Hugging Face hub
# (huggingface.co/<name>/blob/main/config.json). Hard-coded because nothing can be downloaded here;
# arch_from_config() reads a local config instead. The parameter counts they give (num_params) are the
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
    # header format without the date lines of the 3.1+ templates (see sample.py's templates).
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


def num_params(arch: dict) -> int:
    """Exact parameter count of a Qwen2 / Qwen3 / Llama decoder with these numbers."""
    h, q_dim, kv_dim = arch["hidden"], arch["heads"] * arch["head_dim"], arch["kv_heads"] * arch["head_dim"]
    attn = h * q_dim + 2 * h * kv_dim + q_dim * h                  # q, k, v, o projections
    attn += (q_dim + 2 * kv_dim) if arch["qkv_bias"] else 0        # Qwen2: biases on q, k, v
    attn += 2 * arch["head_dim"] if arch["qk_norm"] else 0         # Qwen3: RMSNorm on q and k heads
    mlp = 3 * h * arch["intermediate"]                             # SwiGLU: gate, up, down
    layer = attn + mlp + 2 * h                                     # + two RMSNorms
    embed = arch["vocab"] * h * (1 if arch["tied"] else 2)         # embedding (+ untied lm_head)
    return embed + arch["layers"] * layer + h                      # + final RMSNorm


def memory_plan(preset, arch: dict | None = None, gpu_gib: float = 24.0) -> dict:
    """Estimated GPU bytes of one training run, per component (the formulas are in the comments).

    preset: a PRESETS name, or a Config / dict of Config fields (a missing key takes Config's default).
    arch: architecture numbers; default ARCHITECTURES[model], or the model dir's local config.json.
    Returns the components, "peak", "fits" (peak <= gpu_gib), "cpu_ram" (offloaded state) and
    "ppo_peak" / "ppo_fits" / "ppo_cpu_ram": the same run with ppo's critic added.
    """
    name = preset if isinstance(preset, str) else None
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        preset = PRESETS[preset]
    cfg = {**dataclasses.asdict(Config()), **(preset if isinstance(preset, dict) else dataclasses.asdict(preset))}
    name = name or cfg.get("preset") or cfg["model"]
    if arch is None:
        if cfg["model"] in ARCHITECTURES:
            arch = ARCHITECTURES[cfg["model"]]
        elif pathlib.Path(str(cfg["model"])).is_dir():
            arch = arch_from_config(cfg["model"])
        else:
            raise ValueError(f"no architecture numbers for {cfg['model']!r}: add it to ARCHITECTURES, "
                             f"or pass a local model directory")
    n = num_params(arch)
    act = 4 if cfg["dtype"] == "float32" else 2          # bytes per weight/activation ("auto" = bf16 on a GPU)
    h, L, V, I = arch["hidden"], arch["layers"], arch["vocab"], arch["intermediate"]
    q_dim, kv_dim = arch["heads"] * arch["head_dim"], arch["kv_heads"] * arch["head_dim"]
    prompt_len = cfg["max_prompt_len"] or 1024           # 0 = no limit: assume 1024 (the paper's)
    T = prompt_len + cfg["max_new_tokens"]               # the longest sequence (tokens)
    b = cfg["micro_batch_size"]                          # sequences per forward/backward
    rows = min(cfg["chunk_size"], cfg["batch_prompts"] * cfg["group_size"])   # rows sampled at once
    ckpt = cfg["grad_checkpointing"] == "on" or (cfg["grad_checkpointing"] == "auto"
                                                  and n > cfg["checkpointing_min_params"])
    offload = bool(cfg["optimizer_offload"])
    plan = {"preset": name, "model": cfg["model"], "params": n, "dtype": "float32" if act == 4 else "bfloat16",
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
    positions = min(cfg["head_chunk"], cfg["max_new_tokens"]) if ckpt and cfg["head_chunk"] > 0 else cfg["max_new_tokens"]
    plan["logits"] = b * positions * V * (act + 4 + 4)
    # sampling: the KV cache, layers x 2 (k, v) x kv_dim x T x rows, and one block's prefill transient
    plan["kv_cache"] = L * 2 * kv_dim * T * rows * act
    plan["prefill"] = rows * prompt_len * 3 * I * act
    plan["overhead"] = GIB                                # CUDA context + allocator fragmentation: a guess
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


# =================================================================================================
# MAIN
# =================================================================================================

def main(argv=None) -> None:
    cfg = parse_config(argv)
    if cfg.demo_gradient:
        print(demo_gradient())
        return
    if cfg.dry_run:
        print(format_memory_plan(memory_plan(cfg)))   # PRESETS AND MEMORY PLAN section
        return
    result = train(cfg)
    if result["table"]:
        print("\nPass@k (%) before and after training (eval sets: " + ", ".join(result["evals"]) + ")")
        print(result["table"])
    print(f"run directory: {result['run_dir']} (config.json, metrics.jsonl, eval.jsonl, eval/, checkpoint)")


if __name__ == "__main__":
    main()
