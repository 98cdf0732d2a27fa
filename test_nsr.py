"""
test_nsr.py -- every test of nsr, on CPU, offline, on tiny models built here.

Three kinds of tests (STYLE.md #8): exact math, parity against a reference (transformers), and smoke
runs of the whole pipeline. Tests that read the paper's data in ../shared/data skip when it is absent.

Run:  python -m pytest -q test_nsr.py
"""

from __future__ import annotations

import os
import pathlib

import pytest
import torch

HERE = pathlib.Path(__file__).resolve().parent
SHARED_DATA = HERE.parent / "shared" / "data"
needs_shared_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is absent")

# Small CPU machines: at most two threads, so tests behave the same on a laptop and on CI.
torch.set_num_threads(min(2, os.cpu_count() or 1))


# =================================================================================================
# SHARED FIXTURES: tiny random models of real transformers architectures
# =================================================================================================

def tiny_model(arch: str = "qwen2", vocab_size: int = 97, seed: int = 0, layers: int = 2,
               hidden: int = 32, dtype: torch.dtype = torch.float32):
    """A tiny randomly initialised causal LM of a real architecture ("qwen2", "qwen3", "llama")."""
    from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                              Qwen3Config, Qwen3ForCausalLM)
    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                  tie_word_embeddings=False)
    classes = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM),
               "llama": (LlamaConfig, LlamaForCausalLM)}
    config_cls, model_cls = classes[arch]
    extra = {"head_dim": hidden // 4} if arch == "qwen3" else {}
    torch.manual_seed(seed)
    model = model_cls(config_cls(**common, **extra)).to(dtype)
    return model.eval()


ARCHS = ["qwen2", "qwen3", "llama"]


# =================================================================================================
# VERIFIER (verifier.py)
# =================================================================================================


# =================================================================================================
# PASS@K (passk.py)
# =================================================================================================


# =================================================================================================
# SAMPLING (nsr.py)
# =================================================================================================


# =================================================================================================
# TOY WORLD (toy.py)
# =================================================================================================


# =================================================================================================
# OBJECTIVES AND TRAINING (nsr.py)
# =================================================================================================


# =================================================================================================
# REAL MODELS, PROMPTS AND DATA (nsr.py)
# =================================================================================================


# =================================================================================================
# REPRODUCTION (toy.py)
# =================================================================================================
