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
    Z = number of response tokens of the samples with w_i != 0 (a token mean, as the official code),
        fixed before micro-batching; or a constant (--normalizer constant).

  The token-level gradient (the paper's analysis): at one position with logits z, pi = softmax(z)
  and sampled token y,   dL/dz_v = -w * (1[v = y] - pi_v).
  NSR (w = -1) lowers z_y by (1 - pi_y) and raises every other z_v by pi_v: the freed probability
  goes where the model's prior already puts it. PSR (w = +1) sharpens onto y. See --demo-gradient.

THE PIPELINE (one banner per stage): sample (generate) -> verify (verifier.reward) -> weight
  (sample_weights) -> loss (policy_loss) -> step (AdamW on fp32 master weights) -> evaluate (passk).

DEVIATIONS from the paper and its official code (github.com/TianHongZXY/RLVR-Decomposed, built on verl):
  1. One GPU, one process: a hand-written KV-cache sampler instead of vLLM; no FSDP, no Ray.
  2. By default ONE exactly on-policy update per rollout batch with the plain -w log pi loss (its
     gradient equals the PPO-clipped surrogate's at ratio 1). The official runs use PPO-style
     mini-batches with ratio clipping; --clip-eps 0.2 --ppo-mini-batches N does that (their issue #6
     reports that NSR's gains depended on it).
  3. The "old" log-probs of the clipped ratio are the sampler's (Rollouts.logprobs), not a second
     forward pass of the policy as in verl; the two can differ in the last bits (kernels, bf16).
  4. A step in which no sample carries a weight (e.g. NSR when every answer was right) makes no
     optimizer step; a framework would still step AdamW with a zero gradient (momentum and weight
     decay would move the weights).
  5. Precision: a bf16 model with fp32 master weights and fp32 gradient accumulation (section
     TRAINING) instead of FSDP mixed precision; both update fp32 weights.
  6. The main job (`python nsr.py`) runs on the toy world (toy.py) with toy-sized settings
     (TOY_DEFAULTS: 100 steps of 16 prompts x 8 at lr 2e-4, 64 response tokens, ...), not the paper's (lr 1e-6, MATH, long responses).
  7. Options the official code has and we keep off by default: entropy bonus (--entropy-coef), KL to
     the initial model (--kl-coef, k3 estimator as GRPO). Weight decay applies to every parameter.

COMMANDS
  python nsr.py                          # main job: toy world, NSR, Pass@k table of base vs trained
  python nsr.py --objective psr          # or nsr, w-reinforce, reinforce, grpo
  python nsr.py --demo-gradient          # one PSR / NSR / W-REINFORCE step on 5 tokens, as numbers
  python nsr.py --preset qwen2.5-0.5b-instruct --train math_train.jsonl --eval math_test.jsonl \\
                --out-dir runs/qwen-nsr     # a real model on one 24 GB GPU (see PRESETS, --dry-run)
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
#
#   L(theta) = -(1 / Z) * sum_i w_i * sum_t log pi_theta(y_i,t | x_i, y_i,<t)
#
# Z is a normaliser fixed for the whole batch BEFORE it is cut into micro-batches (so the gradient
# does not depend on the micro-batch size): by default the number of response tokens of the samples
# that carry a non-zero weight (the official code's token mean over the trained samples), or a
# constant (number of samples x max_new_tokens) with --normalizer constant.
#
# ----- STUDENT REGION: a new objective is a new row in sample_weights, nothing else changes. -----


OBJECTIVES = ("psr", "nsr", "w-reinforce", "reinforce", "grpo")


def sample_weights(rewards, objective: str, lam: float = 0.1, group_size: int = 8) -> torch.Tensor:
    """Per-sample weights w (N,) from rewards r (N,) in {0, 1}; the table above.

    rewards: N = num_prompts * group_size values, the group_size samples of one prompt contiguous
    (that is how the training loop lays them out); only GRPO looks at the groups.
    """
    r = torch.as_tensor(rewards, dtype=torch.float32).flatten()             # (N,)
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
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


def policy_loss(logp: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor, normalizer: float,
                old_logp: torch.Tensor | None = None, clip_eps: float = 0.0) -> torch.Tensor:
    """The ONE policy-gradient loss of every objective.  L = -(1/Z) sum_i w_i sum_t log pi(y_i,t).

    logp:     (N, T) log pi_theta of each response token (carries the gradient)
    weights:  (N,)   w_i from sample_weights
    mask:     (N, T) 1.0 on real response tokens, 0.0 on padding
    normalizer: Z, a number fixed for the whole batch before micro-batching (see the section comment)
    old_logp: (N, T) log-probs under the policy that SAMPLED the tokens; only for clip_eps > 0
    clip_eps: PPO ratio clipping (0 = off, the default: one exactly on-policy update per batch)

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
    w = weights[:, None].to(logp.dtype)                                      # (N, 1)
    if clip_eps > 0:
        if old_logp is None:
            raise ValueError("clip_eps > 0 needs old_logp (the sampler's log-probs)")
        # PPO clipped surrogate with advantage w: -min(rho * w, clip(rho, 1-eps, 1+eps) * w),
        # rho = pi_theta / pi_old. At rho = 1 its gradient is -w * grad log pi: the same as below.
        ratio = torch.exp(logp - old_logp)                                   # (N, T) rho
        per_token = -torch.minimum(ratio * w, ratio.clamp(1 - clip_eps, 1 + clip_eps) * w)
    else:
        per_token = -w * logp                                                # (N, T) -w_i log pi
    return (per_token * mask).sum() / normalizer                             # scalar


def loss_normalizer(weights: torch.Tensor, lengths, mode: str = "tokens", max_new_tokens: int = 1) -> float:
    """Z of policy_loss for a whole batch (computed once, before micro-batching).

    weights (N,), lengths: response lengths (N,). "tokens": sum of lengths of samples with w != 0
    (the official token mean); "constant": N * max_new_tokens (independent of what was sampled).
    Returns 0.0 when no sample carries a weight (the caller then skips the update).
    """
    lengths = torch.as_tensor(lengths, dtype=torch.float32)
    if mode == "tokens":
        return float(lengths[weights != 0].sum())
    if mode == "constant":
        return float(len(lengths) * max_new_tokens) if bool((weights != 0).any()) else 0.0
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
# TRAINING: config, the loop (sample -> verify -> weight -> loss -> step -> evaluate), checkpoints
# =================================================================================================
#
# One step:  B prompts x G rollouts --generate--> responses --verifier.reward--> r in {0,1}
#            --sample_weights--> w --policy_loss (micro-batched, one normaliser)--> grads --AdamW--> theta
# Precision: on a GPU the model computes in bf16, but an AdamW step at lr 1e-6 moves a weight of
# size 0.02 by ~1e-6, far below bf16's resolution there (one bf16 step at 0.02 is 2^-13 = 1.2e-4),
# so a bf16-only update rounds back to the old weight and training silently does nothing. We keep
# fp32 MASTER weights: the optimizer owns fp32 copies, bf16 grads are accumulated into fp32 grads
# after every micro-batch, AdamW updates the fp32 copy, and the bf16 model gets round(master).
# Memory per parameter: 2 (bf16 weight) + 2 (bf16 grad) + 4 (master) + 4 (master grad) + 8 (AdamW m, v)
# = 20 bytes. With an fp32 model (CPU default) the model's own weights are the master (16 bytes).


@dataclass
class Config:
    """Every knob of a run. `python nsr.py --help` lists them with these comments."""
    # ---- model and data ("" = the toy world of toy.py) ----
    model: str = ""               # HF hub name or local dir of the policy; "" = the toy base (toy.ensure_base)
    train: str = ""               # JSONL file of training problems; "" = the toy world's train.jsonl
    eval: list = field(default_factory=list)  # JSONL eval set, repeatable; [] with the toy = its test splits
    template: str = "auto"        # prompt template: auto, plain, qwen2.5-math, qwen3, llama3
    problem_field: str = "problem"  # JSONL field holding the problem text
    answer_field: str = "answer"  # JSONL field holding the gold answer
    max_prompt_len: int = 0       # skip (and count) prompts longer than this many tokens; 0 = no limit
    preset: str = ""              # PRESETS name for one 24 GB GPU: its values become defaults (explicit flags win)
    dry_run: bool = False         # print the memory plan of the resolved config and exit
    demo_gradient: bool = False   # print the one-step PSR / NSR / W-REINFORCE example on 5 tokens and exit
    # ---- objective ----
    objective: str = "nsr"        # psr, nsr, w-reinforce, reinforce or grpo (the sample_weights table)
    lam: float = 0.1              # lambda of w-reinforce: weight of correct samples (the paper: 0.1)
    normalizer: str = "tokens"    # Z of the loss: tokens (response tokens of weighted samples) or constant
    clip_eps: float = 0.0         # PPO ratio clipping epsilon (0.2 in PPO); 0 = off, exactly on-policy
    ppo_mini_batches: int = 1     # optimizer steps per rollout batch (needs clip_eps > 0 when > 1)
    entropy_coef: float = 0.0     # entropy bonus: loss -= entropy_coef * mean token entropy; 0 = off
    kl_coef: float = 0.0          # KL penalty to the frozen initial model (GRPO's beta); 0 = off
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
TOY_DEFAULTS = dict(out_dir="runs/nsr-toy", steps=100, batch_prompts=16, group_size=8, max_new_tokens=64,
                    lr=2e-4, micro_batch_size=64, eval_n=64, eval_temperature=1.0, eval_top_p=1.0, threads=1)


def _field_help() -> dict[str, str]:
    """The comment after each Config field, for --help (read from the source: one place to document)."""
    help_text = {}
    for line in inspect.getsource(Config).splitlines():
        m = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.*)$", line)
        if m:
            help_text[m.group(1)] = m.group(2)
    return help_text


def parse_config(argv=None) -> Config:
    """argv -> a validated Config. Precedence: Config defaults < TOY_DEFAULTS (no --model) < --preset
    < explicit flags. Every Config field is a flag (--batch-prompts for batch_prompts)."""

    parser = argparse.ArgumentParser(
        prog="nsr.py", description="PSR / NSR / W-REINFORCE / REINFORCE / GRPO with verifiable rewards. "
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
                 "ppo_mini_batches", "max_nonfinite"):
        if getattr(cfg, name) < 1:
            bad.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("max_prompt_len", "eval_n", "eval_every", "eval_limit", "eval_max_new_tokens", "save_every",
                 "grad_clip", "weight_decay", "entropy_coef", "kl_coef", "clip_eps", "checkpointing_min_params",
                 "head_chunk", "threads"):
        if getattr(cfg, name) < 0:
            bad.append(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if not cfg.lr > 0:
        bad.append(f"--lr must be > 0, got {cfg.lr}")
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
    if cfg.ppo_mini_batches > 1 and cfg.clip_eps == 0:
        bad.append("--ppo-mini-batches > 1 needs --clip-eps > 0: later mini-batches are off-policy")
    if cfg.clip_eps > 0 and cfg.top_p < 1:
        bad.append("--clip-eps needs --top-p 1: the ratio uses the sampler's log-probs, which top-p truncates")
    if cfg.batch_prompts * cfg.group_size % cfg.ppo_mini_batches:
        bad.append(f"--ppo-mini-batches {cfg.ppo_mini_batches} must divide batch_prompts x group_size "
                   f"= {cfg.batch_prompts * cfg.group_size}")
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


# ---- loss (ALGO LOGIC: backward_on_batch is where extra loss terms go) ----------------------------

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


def grads_to_master(params: list, master: list) -> None:
    """Add each model grad (bf16) into its fp32 master's grad and free it. No-op for an fp32 model."""
    for p, m in zip(params, master):
        if p is m or p.grad is None:
            continue
        m.grad = p.grad.float() if m.grad is None else m.grad.add_(p.grad)   # accumulate in fp32
        p.grad = None


def backward_on_batch(model, prompts, responses, weights, normalizer: float, *, micro_batch_size: int,
                      temperature: float = 1.0, clip_eps: float = 0.0, old_logprobs=None,
                      entropy_coef: float = 0.0, kl_coef: float = 0.0, ref_model=None,
                      params=None, master=None, pad_id: int = 0, head_chunk: int = 0):
    """Accumulate the gradient of the batch's loss, micro-batch by micro-batch. Returns the loss
    (a float), or None if it was not finite (the caller then discards the gradient).

    prompts/responses: token-id lists (n rows); weights (n,); normalizer Z for the WHOLE batch, so the
    sum of the micro-batch losses is the full-batch loss and its gradient is independent of
    micro_batch_size. old_logprobs: per-row lists of the sampler's log-probs (for clip_eps > 0).
    head_chunk: see response_logprobs (0 = plain forward).
    """
    device = next(model.parameters()).device
    n = len(prompts)
    lengths = [len(r) for r in responses]
    num_tokens = float(sum(lengths))                                         # for entropy / KL means
    total = torch.zeros((), device=device)
    for start in range(0, n, micro_batch_size):
        rows = slice(start, start + micro_batch_size)
        input_ids, attn, pos, mask = pack_sequences(prompts[rows], responses[rows], device, pad_id)
        R = mask.shape[1]
        logp, entropy = response_logprobs(model, input_ids, attn, pos, R, temperature,
                                          with_entropy=entropy_coef > 0, head_chunk=head_chunk)  # (m, R)
        w = torch.as_tensor(weights[rows], dtype=torch.float32, device=device)  # (m,)
        old = None
        if clip_eps > 0:
            old = torch.zeros_like(logp)
            for b, row in enumerate(old_logprobs[rows]):
                old[b, :len(row)] = torch.tensor(row, dtype=torch.float32)
        # the policy-gradient term (the objectives): -(1/Z) sum w_i sum_t log pi(y_i,t)
        loss = policy_loss(logp, w, mask, normalizer, old_logp=old, clip_eps=clip_eps)
        if entropy_coef > 0:
            # entropy bonus: - c_H * (mean token entropy over the batch's response tokens)
            loss = loss - entropy_coef * (entropy * mask).sum() / num_tokens
        if kl_coef > 0:
            # KL(pi || pi_ref) per token with the non-negative "k3" estimator (Schulman 2020, as GRPO):
            #   exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1
            with torch.no_grad():
                ref_logp, _ = response_logprobs(ref_model, input_ids, attn, pos, R, temperature,
                                                head_chunk=head_chunk)
            d = ref_logp - logp
            loss = loss + kl_coef * ((d.exp() - d - 1) * mask).sum() / num_tokens
        if not torch.isfinite(loss):
            return None
        loss.backward()
        if params is not None:
            grads_to_master(params, master)
        total += loss.detach()
    return total.item()


# ---- step ---------------------------------------------------------------------------------------

def make_master_weights(model) -> tuple[list, list]:
    """(params, master): the model's trainable parameters and the fp32 tensors the optimizer updates.
    For an fp32 model they are the same tensors; otherwise fp32 copies (see the section comment)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if all(p.dtype == torch.float32 for p in params):
        return params, params
    master = [torch.nn.Parameter(p.detach().float().clone()) for p in params]
    return params, master


def optimizer_step(optimizer, params, master, grad_clip: float):
    """Clip the master gradient, AdamW-update the master, copy it into the model.
    Returns the gradient norm before clipping (a 0-d tensor; non-finite = nothing was changed)."""
    # g <- g * min(1, grad_clip / ||g||); the returned norm is the one before clipping
    grad_norm = torch.nn.utils.clip_grad_norm_(master, grad_clip if grad_clip > 0 else float("inf"))
    if torch.isfinite(grad_norm):
        optimizer.step()
        with torch.no_grad():
            for p, m in zip(params, master):
                if p is not m:
                    p.copy_(m)                    # bf16 model <- round(fp32 master)
    zero_grads(optimizer, params)
    return grad_norm


def zero_grads(optimizer, params) -> None:
    """Free the master grads (the optimizer's) and the model's own grads (bf16 leftovers, if any)."""
    optimizer.zero_grad(set_to_none=True)
    for p in params:
        p.grad = None


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


def save_checkpoint(run_dir: pathlib.Path, step: int, model, tokenizer, optimizer, params, master,
                    generator) -> pathlib.Path:
    """Write run_dir/checkpoint-<step> atomically: everything goes to a temporary directory that is
    renamed into place only when complete, then the `latest` pointer is replaced (os.replace is
    atomic), then older checkpoints are removed. A crash at any point leaves a complete checkpoint."""
    if not all_finite(model):
        raise RuntimeError(f"step {step}: the model has non-finite weights; refusing to save it "
                           f"(the last checkpoint in {run_dir} stays good)")
    final = run_dir / f"checkpoint-{step:06d}"
    tmp = run_dir / f".tmp-checkpoint-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    torch.save({"step": step,
                "optimizer": optimizer.state_dict(),
                # the fp32 masters (a bf16 save_pretrained alone would lose what was not yet rounded in)
                "master": None if master is params else [m.detach().cpu() for m in master],
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
    """Keep only the lines of steps <= last_step (a resumed run rewrites the lines after its checkpoint)."""
    if path.is_file():
        keep = [line for line in path.read_text().splitlines() if line.strip()
                and json.loads(line)["step"] <= last_step]
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


# ---- the loop -----------------------------------------------------------------------------------

def resolve_paths(cfg: Config) -> Config:
    """Fill in the toy world's model and data when --model / --train / --eval are not given."""
    if cfg.model:
        return cfg
    base = pathlib.Path(toy.ensure_base())
    return dataclasses.replace(cfg, model=str(base), train=cfg.train or str(base / "train.jsonl"),
                               eval=cfg.eval or [str(base / "test_easy.jsonl"), str(base / "test_hard.jsonl")])


def train(cfg: Config) -> dict:
    """Run the whole job: load, (resume), evaluate the start, train cfg.steps steps, evaluate the end.

    Returns {"run_dir", "step", "metrics" (the last step's line), "evals" ({set: {step: result}}),
    "table" (the Pass@k table of the first vs the last evaluation on every set)}.
    """



    problems = config_problems(cfg)
    if problems:
        raise ValueError("invalid configuration:\n  " + "\n  ".join(problems))
    cfg = resolve_paths(cfg)
    run_dir = pathlib.Path(cfg.out_dir)
    print("config:\n" + json.dumps(dataclasses.asdict(cfg), indent=1))

    # ---- resume or start fresh ----
    ckpt = latest_checkpoint(run_dir) if cfg.resume else None
    if cfg.resume and ckpt is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {run_dir} (expected {run_dir}/latest)")
    if cfg.resume and (run_dir / "config.json").is_file():
        saved = json.loads((run_dir / "config.json").read_text())
        may_differ = {"resume", "steps", "save_every", "eval_every", "eval_n", "eval_limit", "max_nonfinite"}
        changed = [k for k, v in dataclasses.asdict(cfg).items() if k not in may_differ and saved.get(k) != v]
        if changed:
            print(f"WARNING: resuming with different settings than the stopped run: {', '.join(changed)} "
                  f"(the result will not equal an uninterrupted run)")
    if not cfg.resume and run_dir.exists():
        # a fresh run owns its directory: old logs would otherwise interleave with the new ones
        print(f"fresh run: clearing old logs and checkpoints in {run_dir} (use --resume to continue it)")
        for name in ("metrics.jsonl", "eval.jsonl", "latest"):
            (run_dir / name).unlink(missing_ok=True)
        for old in [run_dir / "eval", *run_dir.glob("checkpoint-*"), *run_dir.glob(".tmp-checkpoint-*")]:
            shutil.rmtree(old, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1) + "\n")

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto"
                          else cfg.device)
    model, tokenizer = sample.load_model(ckpt or cfg.model, dtype=cfg.dtype, device=device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    num_params = sum(p.numel() for p in model.parameters())
    checkpointing = cfg.grad_checkpointing == "on" or (cfg.grad_checkpointing == "auto"
                                                       and num_params > cfg.checkpointing_min_params)
    if checkpointing:
        enable_gradient_checkpointing(model)
    model.train()        # NOTE: Qwen/Llama have no dropout by default; train() only switches checkpointing on
    ref_model = None
    if cfg.kl_coef > 0:  # the frozen initial policy (always the original --model, also when resuming)
        ref_model, _ = sample.load_model(cfg.model, dtype=cfg.dtype, device=device)
        ref_model.requires_grad_(False)

    params, master = make_master_weights(model)
    optimizer = torch.optim.AdamW(master, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)   # all training-rollout randomness
    torch.manual_seed(cfg.seed)
    start_step = 0
    if ckpt is not None:
        state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        if state["master"] is not None:
            with torch.no_grad():
                for m, saved in zip(master, state["master"]):
                    m.copy_(saved)
        generator.set_state(state["rng"]["sampler"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        start_step = state["step"]
        for name in ("metrics.jsonl", "eval.jsonl"):
            truncate_jsonl(run_dir / name, start_step)
        print(f"resumed from {ckpt} at step {start_step}")

    # ---- data ----
    train_problems = sample.load_problems(cfg.train, cfg.problem_field, cfg.answer_field)
    prompt_ids, kept, n_skipped = sample.encode_prompts(tokenizer, train_problems, cfg.template,
                                                 cfg.max_prompt_len or None)
    if not kept:
        raise ValueError(f"{cfg.train}: every prompt is longer than --max-prompt-len {cfg.max_prompt_len}")
    eval_sets = {}
    if cfg.eval_n > 0:
        for path in cfg.eval:
            problems_ = sample.load_problems(path, cfg.problem_field, cfg.answer_field)
            eval_sets[pathlib.Path(path).stem] = problems_[:cfg.eval_limit or None]
    print(f"model {cfg.model}: {num_params / 1e6:.1f}M parameters, {next(model.parameters()).dtype}, "
          f"{device}, gradient checkpointing {'on' if checkpointing else 'off'}, "
          f"{'fp32 master weights' if master is not params else 'fp32 weights'}; "
          f"{len(kept)} training problems ({n_skipped} skipped as too long)")

    # ---- evaluate the start (kept on disk, so a resumed run reuses it) ----
    evals = {name: {} for name in eval_sets}
    for name in eval_sets:
        saved = run_dir / "eval" / f"step{0:06d}_{name}.json"
        if ckpt is not None and saved.is_file():
            evals[name][0] = passk.load_result(saved)
    if eval_sets and start_step == 0:
        for name, result in evaluate_all(model, tokenizer, eval_sets, cfg, 0, run_dir).items():
            evals[name][0] = result

    # ---- train ----
    B, G = cfg.batch_prompts, cfg.group_size
    metrics, nonfinite_streak = {}, 0
    bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps, desc=cfg.objective,
               dynamic_ncols=True)
    for step in bar:
        # ---- sample: B prompts x G rollouts, one prompt's G rows contiguous ----
        t0 = time.time()
        batch = prompt_batch(step, len(kept), B, cfg.seed)
        prompts = [prompt_ids[i] for i in batch for _ in range(G)]           # (B*G,) token lists
        golds = [kept[i]["answer"] for i in batch for _ in range(G)]
        diverged = (f"step {step + 1}: the policy produced non-finite logits while sampling. The model has "
                    f"diverged; the likely cause is a too-high learning rate (lr={cfg.lr}): NSR alone at a high "
                    f"lr keeps pushing the sampled tokens' logits down without bound. Lower --lr or use "
                    f"w-reinforce; the last good checkpoint (if any) is in {run_dir}.")
        try:
            rollouts = sample.generate(model, prompts, cfg.max_new_tokens, temperature=cfg.temperature,
                                top_p=cfg.top_p, generator=generator, chunk_size=cfg.chunk_size)
        except RuntimeError as e:
            # non-finite logits normally come back as NaN log-probs (checked just below); an error
            # raised while the weights are non-finite is divergence too (e.g. torch.multinomial's
            # "probability tensor ..." if a student swaps the sampler back); anything else (out of
            # memory, ...) is not divergence and is re-raised as it is
            if "probability tensor" in str(e) or not all_finite(model):
                raise RuntimeError(diverged) from e
            raise
        if not all(math.isfinite(v) for row in rollouts.logprobs for v in row):
            raise RuntimeError(diverged)
        sample_s = time.time() - t0

        # ---- verify: r = 1 if the final answer matches the gold answer, else 0 ----
        responses = [tokenizer.decode(t, skip_special_tokens=True) for t in rollouts.tokens]
        rewards = [verifier.reward(text, gold) for text, gold in zip(responses, golds)]

        # ---- weight: w_i from the objective ----
        weights = sample_weights(rewards, cfg.objective, cfg.lam, G)        # (B*G,)

        # ---- loss + step (one or several mini-batches) ----
        t1 = time.time()
        train_all = cfg.entropy_coef > 0 or cfg.kl_coef > 0     # otherwise w = 0 rows carry no gradient
        losses, grad_norms, trained, skipped = [], [], 0, False
        per_mini = len(prompts) // cfg.ppo_mini_batches
        for mb in range(cfg.ppo_mini_batches):
            mini = list(range(mb * per_mini, (mb + 1) * per_mini))          # this mini-batch's samples
            rows = [i for i in mini if train_all or weights[i] != 0]       # the ones with a gradient
            if not rows:
                continue
            # Z from ALL samples of the mini-batch (not only `rows`): "constant" = samples x max_new_tokens
            # must not depend on how many samples happened to carry a weight
            Z = loss_normalizer(weights[mini], [len(rollouts.tokens[i]) for i in mini], cfg.normalizer,
                                cfg.max_new_tokens) \
                or float(sum(len(rollouts.tokens[i]) for i in rows))       # only entropy/KL terms: token mean
            loss = backward_on_batch(
                model, [prompts[i] for i in rows], [rollouts.tokens[i] for i in rows], weights[rows], Z,
                micro_batch_size=cfg.micro_batch_size, temperature=cfg.temperature, clip_eps=cfg.clip_eps,
                old_logprobs=[rollouts.logprobs[i] for i in rows], entropy_coef=cfg.entropy_coef,
                kl_coef=cfg.kl_coef, ref_model=ref_model, params=params, master=master, pad_id=pad_id,
                head_chunk=cfg.head_chunk if checkpointing else 0)
            grad_norm = optimizer_step(optimizer, params, master, cfg.grad_clip) if loss is not None else None
            if loss is None or not torch.isfinite(grad_norm):
                zero_grads(optimizer, params)       # drop what the failed micro-batches accumulated
                skipped = True
                break
            losses.append(loss)
            grad_norms.append(grad_norm.item())
            trained += len(rows)
        nonfinite_streak = nonfinite_streak + 1 if skipped else 0
        train_s = time.time() - t1

        # ---- log: one JSON line per step, fixed keys ----
        r = torch.tensor(rewards).view(B, G)
        n_tokens = sum(len(t) for t in rollouts.tokens)
        metrics = {
            "step": step + 1,
            "reward": r.mean().item(),
            "all_correct": (r.min(dim=1).values == 1).float().mean().item(),
            "all_wrong": (r.max(dim=1).values == 0).float().mean().item(),
            "response_len": n_tokens / len(prompts),
            "truncated": sum(rollouts.truncated) / len(prompts),
            "entropy": math.fsum(v for row in rollouts.entropies for v in row) / max(n_tokens, 1),
            "loss": None if skipped else (sum(losses) / len(losses) if losses else 0.0),
            "grad_norm": None if skipped else (sum(grad_norms) / len(grad_norms) if grad_norms else 0.0),
            "trained_samples": trained,
            "skipped": skipped,
            "sample_s": round(sample_s, 3),
            "train_s": round(train_s, 3),
            "tokens_per_s": round(n_tokens / max(sample_s + train_s, 1e-9), 1),
        }
        with (run_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        bar.set_postfix(reward=f"{metrics['reward']:.3f}", all_wrong=f"{metrics['all_wrong']:.2f}",
                        len=f"{metrics['response_len']:.0f}", ent=f"{metrics['entropy']:.2f}",
                        gnorm="skip" if skipped else f"{metrics['grad_norm']:.3f}")
        if skipped:
            tqdm.write(f"step {step + 1}: non-finite loss or gradient; step skipped ({nonfinite_streak} in a row)")
            if nonfinite_streak >= cfg.max_nonfinite:
                raise RuntimeError(
                    f"step {step + 1}: {nonfinite_streak} consecutive steps had a non-finite loss or gradient; "
                    f"stopping. The model has likely diverged (lr={cfg.lr}); the last good checkpoint (if any) "
                    f"is in {run_dir}.")

        # ---- evaluate / checkpoint ----
        done = step + 1
        if eval_sets and cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
            for name, result in evaluate_all(model, tokenizer, eval_sets, cfg, done, run_dir).items():
                evals[name][done] = result
        if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps:
            save_checkpoint(run_dir, done, model, tokenizer, optimizer, params, master, generator)
    bar.close()

    # ---- evaluate the end (a run resumed after its last step re-uses the saved results) ----
    for name in eval_sets:
        saved = run_dir / "eval" / f"step{cfg.steps:06d}_{name}.json"
        if start_step == cfg.steps and saved.is_file():
            evals[name][cfg.steps] = passk.load_result(saved)
    if eval_sets and any(cfg.steps not in by_step for by_step in evals.values()):
        truncate_jsonl(run_dir / "eval.jsonl", cfg.steps - 1)
        for name, result in evaluate_all(model, tokenizer, eval_sets, cfg, cfg.steps, run_dir).items():
            evals[name][cfg.steps] = result
    table = ""
    if eval_sets:
        rows = {}
        for name, by_step in evals.items():
            first, last = min(by_step), max(by_step)
            rows[f"{name} base" if first == 0 else f"{name} step {first}"] = by_step[first]
            rows[f"{name} {cfg.objective} step {last}"] = by_step[last]
        table = passk.format_table(rows)
    return {"run_dir": str(run_dir), "step": cfg.steps, "metrics": metrics, "evals": evals, "table": table}


# =================================================================================================
# PRESETS AND MEMORY PLAN: one consumer GPU (24 GB)
# =================================================================================================
#
# Everything a 24 GB card has to hold, per preset: `python nsr.py --preset NAME --dry-run` prints it.
# The numbers are ESTIMATES from the formulas below until someone measures them on a GPU.
#
# Bytes per parameter with the training section's precision scheme (see TRAINING):
#   bf16 model:  2 (bf16 weights) + 2 (bf16 grads) + 4 (fp32 master) + 4 (fp32 master grads)
#                + 8 (fp32 AdamW m and v) = 20 bytes/param
#   fp32 model:  4 (weights = master) + 4 (grads) + 8 (AdamW) = 16 bytes/param
# What that means on one 24 GiB card (P = parameters):
#   Qwen2.5-0.5B-Instruct (0.49e9): 9.2 GiB        Qwen3-0.6B (0.60e9): 11.1 GiB      -> bf16 fits
#   Llama-3.2-1B-Instruct (1.24e9): 23.0 GiB bf16  -> only the fp32 scheme (18.4 GiB) fits, tightly
#   Qwen2.5-Math-1.5B     (1.54e9): 28.8 GiB bf16, 23.0 GiB fp32 -> does NOT fit with this trainer.
#     It would with the fp32 master weights, master grads and AdamW state in CPU RAM (the GPU then
#     holds 4 bytes/param = 5.8 GiB; memory_plan(..., optimizer_offload=True) shows the plan), which
#     train() does not implement. So there is no 1.5B preset; its numbers are in ARCHITECTURES.
#   Qwen2.5-Math-7B       (7.62e9): 142 GiB -> full fine-tuning is out of reach of one 24 GB card by
#     a factor of six before any activation; the paper trains it on 8 GPUs with FSDP.
#
# The paper's own settings (official code github.com/TianHongZXY/RLVR-Decomposed,
# run_qwen2.5-math-7b_psr_nsr.sh, run_qwen3-4b_psr_nsr.sh, eval.sh), on 8 GPUs: 1024 prompts x 8
# rollouts per step, prompts <= 1024 tokens, responses <= 3072 tokens (31744 for Qwen3-4B), lr 1e-6,
# AdamW, rollout temperature 1.0 (verl's default), PPO mini-batches of 256 prompts (4 updates per
# rollout batch), no KL (kl_coef 0), gradient checkpointing on; evaluation at temperature 0.6, top-p
# 0.95, 256 samples, <= 4096 new tokens. On one GPU the presets keep G = 8, lr 1e-6 and temperature
# 1.0 and shrink the prompts per step (32) and the lengths (prompt 512, response 1024-1536).

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
    # 1.24e9 params fit this trainer on 24 GiB; fp32 compute is slower. "llama3" renders Llama 3's
    # header format without the date lines of the 3.1+ templates (see MODELS, PROMPTS AND DATA).
    "llama-3.2-1b-instruct": dict(model="meta-llama/Llama-3.2-1B-Instruct", template="llama3",
                                  dtype="float32", batch_prompts=32, group_size=8, max_prompt_len=512,
                                  max_new_tokens=1024, micro_batch_size=1, grad_checkpointing="on",
                                  chunk_size=16, lr=1e-6, temperature=1.0),
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


def memory_plan(preset, arch: dict | None = None, gpu_gib: float = 24.0,
                optimizer_offload: bool = False) -> dict:
    """Estimated GPU bytes of one training run, per component (formulas in the comments below).

    preset: a PRESETS name, or a Config / dict with Config's fields (model, dtype, batch_prompts,
        group_size, max_prompt_len, max_new_tokens, micro_batch_size, grad_checkpointing, chunk_size).
    arch: architecture numbers; default ARCHITECTURES[model], or the model dir's local config.json.
    optimizer_offload: what-if only (train() does not implement it): master weights, master grads and
        AdamW state in CPU RAM instead of on the GPU.
    """

    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        name, cfg = preset, PRESETS[preset]
    else:
        cfg = preset if isinstance(preset, dict) else dataclasses.asdict(preset)
        name = cfg.get("preset") or cfg["model"]
    # a key the preset or dict does not set takes Config's default (the same fallback parse_config applies)
    cfg = {**dataclasses.asdict(Config()), **cfg}
    if arch is None:
        if cfg["model"] in ARCHITECTURES:
            arch = ARCHITECTURES[cfg["model"]]
        elif pathlib.Path(str(cfg["model"])).is_dir():
            arch = arch_from_config(cfg["model"])
        else:
            raise ValueError(f"no architecture numbers for {cfg['model']!r}: add it to ARCHITECTURES, "
                             f"or pass a local model directory")

    n = num_params(arch)
    dtype = cfg.get("dtype", "auto")
    act = 4 if dtype == "float32" else 2          # bytes per weight/activation ("auto" = bf16 on a GPU)
    h, L, V, I = arch["hidden"], arch["layers"], arch["vocab"], arch["intermediate"]
    q_dim, kv_dim = arch["heads"] * arch["head_dim"], arch["kv_heads"] * arch["head_dim"]
    prompt_len = cfg.get("max_prompt_len") or 1024               # 0 = no limit: assume 1024 (paper)
    T = prompt_len + cfg["max_new_tokens"]                      # longest sequence (tokens)
    b = cfg["micro_batch_size"]                                 # sequences per forward/backward
    # a key a preset does not set takes Config's default (the same fallback parse_config applies)
    rows = min(cfg.get("chunk_size", Config.chunk_size), cfg["batch_prompts"] * cfg["group_size"])  # at once
    ckpt = cfg.get("grad_checkpointing", Config.grad_checkpointing)
    ckpt = ckpt is True or ckpt == "on" or (
        ckpt == "auto" and n > cfg.get("checkpointing_min_params", Config.checkpointing_min_params))
    head_chunk = cfg.get("head_chunk", Config.head_chunk)

    plan = {"preset": name, "model": cfg["model"], "params": n, "dtype": "float32" if act == 4 else "bfloat16",
            "seq_len": T, "micro_batch": b, "rows_in_flight": rows, "grad_checkpointing": ckpt,
            "optimizer_offload": optimizer_offload}
    # weights and their gradients in the compute dtype: P x 2 bytes each in bf16 (P x 4 in fp32)
    plan["weights"] = n * act
    plan["gradients"] = n * act
    # bf16 only: fp32 master weights and their fp32 gradients (P x 4 each)
    plan["master_weights"] = n * 4 if act == 2 else 0
    plan["master_grads"] = n * 4 if act == 2 else 0
    # AdamW's fp32 m and v: P x 8
    plan["optimizer_state"] = n * 8
    # Activations kept for backward, per token and layer (elements): the block input and its RMSNorm
    # output (2h), q, k, v (q_dim + 2 kv_dim), the attention output (q_dim), the residual and its
    # RMSNorm output (2h), SwiGLU's gate, silu(gate), up and their product (4 I). Attention is SDPA
    # (no T x T matrix kept).
    per_token_layer = 4 * h + 2 * q_dim + 2 * kv_dim + 4 * I
    # without checkpointing: b x T x L x per_token_layer x bytes
    plan["activations_no_ckpt"] = b * T * L * per_token_layer * act
    # with checkpointing: each block's input only (b x T x L x h), plus one block recomputed in backward
    plan["activations_ckpt"] = b * T * L * h * act + b * T * per_token_layer * act
    plan["activations"] = plan["activations_ckpt"] if ckpt else plan["activations_no_ckpt"]
    # Logits, as train() computes them (response_logprobs): only the R = max_new_tokens response
    # positions get logits (logits_to_keep), and with checkpointing the output layer + log-softmax run
    # over checkpointed chunks of head_chunk positions, so only ONE chunk's logits exist at a time:
    #   positions = R                     (checkpointing off: the whole response at once)
    #   positions = min(head_chunk, R)    (checkpointing on: one chunk, recomputed in backward)
    #   logits    = b x positions x V x (act + 4 + 4)  bytes
    # per element: the lm_head output (act bytes) + its fp32 copy / log-softmax (4) + that one's
    # gradient in backward (4). Off, with a 152k vocabulary, this is the largest activation of all
    # (2 x 1536 x 151936 x 10 B = 4.3 GiB); on, it is 2 x 128 x 151936 x 10 B = 0.36 GiB.
    positions = min(head_chunk, cfg["max_new_tokens"]) if ckpt and head_chunk > 0 else cfg["max_new_tokens"]
    plan["logits"] = b * positions * V * (act + 4 + 4)
    plan["logit_positions"] = positions
    # KV cache while sampling: layers x 2 (k, v) x kv_heads x head_dim x T x rows x bytes
    plan["kv_cache"] = L * 2 * kv_dim * T * rows * act
    # prefill transient of one block over the prompts: rows x prompt_len x 3 I (gate, up, product)
    plan["prefill"] = rows * prompt_len * 3 * I * act
    # CUDA context + allocator fragmentation: a guess, to be replaced by a measurement
    plan["overhead"] = GIB

    optimizer = plan["master_weights"] + plan["master_grads"] + plan["optimizer_state"]
    plan["cpu_ram"] = optimizer if optimizer_offload else 0
    on_gpu = 0 if optimizer_offload else optimizer
    # sampling: model AND master grads are freed (zero_grads, set_to_none); the rest stays resident
    plan["peak_sampling"] = (plan["weights"] + on_gpu - (0 if optimizer_offload else plan["master_grads"])
                             + plan["kv_cache"] + plan["prefill"] + plan["overhead"])
    # training: everything at the end of a micro-batch's backward
    plan["peak_training"] = (plan["weights"] + plan["gradients"] + on_gpu + plan["activations"]
                             + plan["logits"] + plan["overhead"])
    plan["peak"] = max(plan["peak_sampling"], plan["peak_training"])
    plan["budget"] = int(gpu_gib * GIB)
    plan["fits"] = plan["peak"] <= plan["budget"]
    return plan


def format_memory_plan(plan: dict) -> str:
    """The plan as a small text table (what --dry-run prints)."""
    rows = [(f"weights ({plan['dtype']})", "weights"), ("gradients", "gradients"),
            ("fp32 master weights", "master_weights"), ("fp32 master grads", "master_grads"),
            ("AdamW state (fp32 m, v)", "optimizer_state"),
            ("activations, checkpointing on", "activations_ckpt"),
            ("activations, checkpointing off", "activations_no_ckpt"),
            (f"logits, {plan['logit_positions']} positions at once", "logits"),
            ("KV cache while sampling", "kv_cache"),
            ("prefill transient", "prefill"), ("CUDA context etc. (guess)", "overhead"),
            ("PEAK while sampling", "peak_sampling"), ("PEAK while training", "peak_training")]
    lines = [f"memory plan (ESTIMATE until measured on a GPU): {plan['preset']}",
             f"  {plan['params'] / 1e9:.3f}B params, {plan['seq_len']}-token sequences, micro-batch "
             f"{plan['micro_batch']}, {plan['rows_in_flight']} rows sampled at once"]
    for label, key in rows:
        note = ""
        if key in ("master_weights", "master_grads", "optimizer_state") and plan["optimizer_offload"]:
            note = "  (CPU RAM)"
        elif key.startswith("activations_") and (key == "activations_ckpt") != plan["grad_checkpointing"]:
            note = "  (not used)"
        lines.append(f"  {label:<32}{plan[key] / GIB:>8.2f} GiB{note}")
    verdict = "fits" if plan["fits"] else "DOES NOT FIT"
    lines.append(f"  {'budget':<32}{plan['budget'] / GIB:>8.2f} GiB  -> {verdict}")
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
