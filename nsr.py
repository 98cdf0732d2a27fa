"""
nsr.py -- RL with verifiable rewards, split by the sign of the reward.

A small, readable implementation of
  "The Surprising Effectiveness of Negative Reinforcement in LLM Reasoning"
  (Zhu, Xia, Wei, Chen, Chen, Meng; NeurIPS 2025, arXiv 2506.01347).

(The full docstring -- objectives as equations, deviations from the paper, commands -- is written
with the training section.)
"""

from __future__ import annotations

import torch

# =================================================================================================
# SAMPLING: prompts -> rollouts (hand-written batched sampling with a KV cache)
# =================================================================================================


# =================================================================================================
# MODELS, PROMPTS AND DATA: load a model, render the official prompt templates, read JSONL problems
# =================================================================================================


# =================================================================================================
# OBJECTIVES: rewards -> per-sample weights -> ONE policy-gradient loss
# =================================================================================================


# =================================================================================================
# TRAINING: config, the loop (sample -> verify -> weight -> loss -> step -> evaluate), checkpoints
# =================================================================================================


# =================================================================================================
# PRESETS AND MEMORY PLAN: one consumer GPU (24 GB)
# =================================================================================================


# =================================================================================================
# MAIN
# =================================================================================================
