"""
ppo.py -- the PPO baseline's critic: a learned value baseline -> per-token GAE advantages -> the clipped
value loss. OPTIONAL READING: only `--objective ppo` uses it; its advantages then feed the SAME
nsr.policy_loss as every other objective, as per-token weights A_i,t instead of per-sample w_i.

PPO (Schulman et al. 2017) as the official code runs it (RLVR-Decomposed run_qwen2.5-math-7b_ppo.sh;
verl/trainer/ppo/core_algos.py: compute_gae_advantage_return, masked_whiten, compute_value_loss):
  critic      V_phi(x, y_<t): a second copy of the base model whose output layer is a ONE-output
              head (transformers' token classification, as verl), its own AdamW (--critic-lr)
  rewards     r_i,t = -beta * (log pi_old(y_i,t) - log pi_ref(y_i,t))   on every response token
                      + r_i                                             on the LAST response token
              (the paper's PPO: a KL reward penalty to the frozen initial policy, beta = --kl-coef)
  GAE         delta_t = r_t + gamma * V_{t+1} - V_t          (V past a response's end = 0)
              A_t     = delta_t + gamma * lam * A_{t+1}      returns R_t = A_t + V_t
              gamma = lam = 1 (verl's defaults, the paper's): A_t = sum_{s >= t} r_s - V_t
  whitening   A <- (A - mean A) / sqrt(var A + 1e-8) over the batch's response tokens
  value loss  0.5 * token-mean of max((V - R)^2, (V_old + clip(V - V_old, -0.5, 0.5) - R)^2)
Whitening is why PPO is not one more row of nsr.sample_weights: its weights depend on the critic and on
the whole batch. The critic takes one optimizer step per policy mini-batch (nsr.rl_step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForTokenClassification

import loading
import precision
import sample

# PROBLEM gae (10 bonus points): generalised advantage estimation, right to left over each response
def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                   gae_lam: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded rows -> (advantages, returns), all (N, T).

    From the last position back: delta_t = r_t + gamma V_{t+1} - V_t and A_t = delta_t + gamma gae_lam A_{t+1}
    (A and V past the end = 0); returns R_t = A_t + V_t. rewards, values, mask: (N, T); positions with
    mask 0 are ignored (their reward and value count as 0, so a row's last real token sees V_{t+1} = 0) and
    come back as 0 in both outputs.
    """
    rewards, values = rewards * mask, values * mask                          # (N, T)
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])                             # (N,) V_{t+1}
    next_advantage = torch.zeros_like(rewards[:, 0])                         # (N,) A_{t+1}
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]            # (N,) TD error
        next_advantage = delta + gamma * gae_lam * next_advantage                # (N,) A_t
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


def load_critic(name_or_dir, cfg, device):
    """The critic: the base model with a ONE-output head on every position instead of the LM head, loaded
    as transformers' token-classification model, as verl does (the head starts random: its first values
    are noise, which is why a healthy run's explained variance starts near 0). classifier_dropout = 0:
    verl switches the head's dropout off too (values must not be random in train mode)."""
    local = loading.is_local(name_or_dir)
    config = AutoConfig.from_pretrained(str(name_or_dir), num_labels=1, local_files_only=local)
    config.classifier_dropout = 0.0
    torch.manual_seed(cfg.seed)                      # the head's random init: the same seed, the same critic
    critic = AutoModelForTokenClassification.from_pretrained(
        str(name_or_dir), config=config, dtype=loading.torch_dtype(cfg.dtype, device), local_files_only=local)
    return critic.to(device)


@dataclass
class Targets:
    """What the critic computed for one rollout batch, besides the advantages: the value loss's targets."""
    old_values: torch.Tensor      # (N, T) V_old: the values that computed the advantages (value clipping)
    returns: torch.Tensor         # (N, T) R = A + V (before whitening): what the critic regresses on
    explained_variance: float     # logged: how well V predicted R
    adv_mean: float               # logged: mean advantage before whitening


def advantages(run, cfg, prompts, rollouts, rewards) -> tuple[torch.Tensor, Targets]:
    """The critic's values of the rollouts, the per-token rewards and GAE -> (whitened A (N, T), Targets).
    All under no_grad: these are the weights and the targets of the update."""
    device = next(run.policy.model.parameters()).device
    N, T = len(prompts), max(len(t) for t in rollouts.tokens)
    values, ref_logp = torch.zeros(N, T, device=device), torch.zeros(N, T, device=device)
    with torch.no_grad():
        for rows, input_ids, attn, pos, mask in sample.micro_batches(prompts, rollouts.tokens, cfg.micro_batch_size,
                                                                     device, run.pad_id):
            R = mask.shape[1]
            values[rows, :R] = critic_values(run.critic.model, input_ids, attn, pos, R) * mask
            if run.ref_model is not None:
                ref_logp[rows, :R] = sample.response_logprobs(run.ref_model, input_ids, attn, pos, R, cfg.temperature,
                                                              head_chunk=run.head_chunk)[0] * mask
    lengths = torch.tensor([len(t) for t in rollouts.tokens], device=device)
    mask = (torch.arange(T, device=device)[None, :] < lengths[:, None]).float()        # (N, T)
    old_logp = sample.pad_rows(rollouts.logprobs, T, device)                            # (N, T) log pi_old
    # r_i,t = -beta (log pi_old - log pi_ref) on every token, + the 0/1 outcome on the last one
    token_rewards = (-cfg.kl_coef * (old_logp - ref_logp) * mask if run.ref_model is not None
                     else torch.zeros(N, T, device=device))
    token_rewards[torch.arange(N, device=device), lengths - 1] += torch.tensor(rewards, dtype=torch.float32,
                                                                               device=device)
    adv, returns = gae_advantages(token_rewards, values, mask, cfg.gae_gamma, cfg.gae_lam)
    targets = Targets(values, returns, explained_variance(values, returns, mask),
                      float((adv * mask).sum() / mask.sum()))
    return masked_whiten(adv, mask), targets


def critic_step(run, cfg, prompts, rollouts, mini: list[int], targets: Targets, scale: float) -> tuple[float, float]:
    """One optimizer step of the critic on one mini-batch: the clipped value loss, token mean over the
    mini-batch (times m / M for a partial one, as the policy's). Returns (value loss, grad norm)."""
    device = next(run.critic.model.parameters()).device
    Z = float(sum(len(rollouts.tokens[i]) for i in mini))
    old_values, returns = targets.old_values[mini], targets.returns[mini]                 # (M, T)
    total = 0.0
    for rows, input_ids, attn, pos, mask in sample.micro_batches(
            [prompts[i] for i in mini], [rollouts.tokens[i] for i in mini], cfg.micro_batch_size, device, run.pad_id):
        R = mask.shape[1]
        values = critic_values(run.critic.model, input_ids, attn, pos, R)                # (m, R)
        loss = value_loss(values, old_values[rows, :R], returns[rows, :R], mask, Z, cfg.value_clip) * scale
        loss.backward()
        precision.grads_to_master(run.critic)
        total += loss.item()
    grad_norm = precision.optimizer_step(run.critic, cfg.grad_clip)
    return total, grad_norm.item()
