"""
test_nsr.py -- every test of nsr, on CPU, offline, on tiny models built here.

Three kinds of tests (STYLE.md #8): exact math, parity against a reference (transformers), and smoke
runs of the whole pipeline. Tests that read the paper's data in ../shared/data skip when it is absent.

Run:  python -m pytest -q test_nsr.py
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import inspect
import itertools
import json
import math
import pathlib
import random
import re
import shutil
import string
import sys
import time
import warnings
import zipfile
from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (AutoModelForCausalLM, AutoModelForTokenClassification, AutoTokenizer, DynamicCache,
                          LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM,
                          Qwen3Config, Qwen3ForCausalLM)

import loading
import nsr
import passk
import ppo
import precision
import presets
import reproduce
import runs
import sample
import settings
import toy
import verifier
import why

HERE = pathlib.Path(__file__).resolve().parent
SHARED_DATA = HERE.parent / "shared" / "data"
needs_shared_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is absent")

# One torch thread: the test models are tiny, and on a busy 2-core machine a second OpenMP thread made
# tiny-model sampling 10-40x slower (threads waiting for each other), measured while writing nsr.py.
torch.set_num_threads(1)


# =================================================================================================
# SHARED FIXTURES: tiny random models of real architectures, a chat tokenizer, a tiny world
# =================================================================================================

def tiny_model(arch: str = "qwen2", vocab_size: int = 97, seed: int = 0, layers: int = 2,
               hidden: int = 32, dtype: torch.dtype = torch.float32):
    """A tiny randomly initialised causal LM of a real architecture ("qwen2", "qwen3", "llama")."""
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


# chat_tokenizer() below is a reusable fixture: a character-level PreTrainedTokenizerFast that knows the
# Qwen and Llama special tokens and carries a chat template, so "auto" rendering, encoding and a tiny
# model's vocabulary can be tested offline (pass vocab_size=len(tokenizer) to tiny_model()).

# The chat templates below are the official ones reduced to the branch a [system, user] conversation
# takes (no tools), kept line for line as published:
#   Qwen2.5 / Qwen2.5-Math: "chat_template" in huggingface.co/Qwen/Qwen2.5-Math-1.5B/blob/main/tokenizer_config.json
#   Qwen3:                  "chat_template" in huggingface.co/Qwen/Qwen3-0.6B/blob/main/tokenizer_config.json
#   Llama 3.1 / 3.2:        "chat_template" in huggingface.co/meta-llama/Llama-3.2-1B-Instruct (tokenizer_config.json)
QWEN25_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n")
QWEN3_CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if message.content is string %}\n"
    "        {%- set content = message.content %}\n"
    "    {%- else %}\n"
    "        {%- set content = '' %}\n"
    "    {%- endif %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "    {%- if enable_thinking is defined and enable_thinking is false %}\n"
    "        {{- '<think>\\n\\n</think>\\n\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}")
LLAMA31_CHAT_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- if not date_string is defined %}\n"
    "    {%- set date_string = \"26 Jul 2024\" %}\n"
    "{%- endif %}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set system_message = \"\" %}\n"
    "{%- endif %}\n"
    "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n"
    "{{- \"Cutting Knowledge Date: December 2023\\n\" }}\n"
    "{{- \"Today Date: \" + date_string + \"\\n\\n\" }}\n"
    "{{- system_message }}\n"
    "{{- \"<|eot_id|>\" }}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n")

CHAT_SPECIAL_TOKENS = ["<pad>", "<|begin_of_text|>", "<|im_end|>", "<|im_start|>", "<|endoftext|>",
                       "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<unk>"]


def chat_tokenizer(chat_template: str | None = QWEN3_CHAT_TEMPLATE, add_bos: bool = False):
    """A character-level tokenizer with real special tokens: pad 0, bos 1 (<|begin_of_text|>), eos 2
    (<|im_end|>), then the other specials and every printable ASCII character (len = 106).

    add_bos=True makes plain encoding prepend <|begin_of_text|> as Llama tokenizers do.
    """


    chars = sorted(set(string.printable) - set("\x0b\x0c\r"))
    vocab = {token: i for i, token in enumerate(CHAT_SPECIAL_TOKENS + chars)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")  # one char each
    backend.decoder = decoders.Fuse()
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>",
                                        eos_token="<|im_end|>", pad_token="<pad>", unk_token="<unk>",
                                        additional_special_tokens=CHAT_SPECIAL_TOKENS[3:8])
    tokenizer.chat_template = chat_template
    return tokenizer


def _tiny_world(root: pathlib.Path) -> pathlib.Path:
    """A saved tiny random Qwen2 + char tokenizer and a few addition problems (train.jsonl, test.jsonl)."""
    tokenizer = chat_tokenizer(chat_template=None)   # the REAL MODELS section's fixture; no template = plain
    world = root / "world"
    tiny_model("qwen2", vocab_size=len(tokenizer)).save_pretrained(world)
    tokenizer.save_pretrained(world)
    for name, pairs in (("train", [(1, 2), (3, 4), (2, 2), (5, 1)]), ("test", [(1, 1), (2, 3)])):
        with (world / f"{name}.jsonl").open("w") as f:
            for a, b in pairs:
                f.write(json.dumps({"problem": f"{a}+{b}", "answer": str(a + b)}) + "\n")
    return world


def _tiny_config(world: pathlib.Path, out: pathlib.Path, **overrides):
    values = dict(model=str(world), train=str(world / "train.jsonl"), eval=[], template="plain", steps=2,
                  batch_prompts=2, group_size=4, max_new_tokens=6, lr=1e-3, micro_batch_size=3, eval_n=0,
                  eval_temperature=1.0, eval_top_p=1.0, out_dir=str(out), device="cpu", seed=0)
    values.update(overrides)
    return nsr.Config(**values)


# =================================================================================================
# VERIFIER (verifier.py)
# =================================================================================================

# (response's final answer, gold) pairs that a careful human grader accepts: one per rule, both ways.
VERIFIER_ACCEPT = [
    ("\\frac{1}{2}", "\\frac12"), ("\\dfrac{1}{2}", "1/2"), ("\\tfrac{3}{2}", "1.5"), ("\\cfrac{1}{3}", "1/3"),
    ("0.5", "\\frac{1}{2}"), (".5", "0.5"), ("0.50", "\\frac{1}{2}"), ("\\frac{6}{8}", "\\frac{3}{4}"),
    ("-\\frac{1}{2}", "-1/2"), ("\\frac{-1}{2}", "-\\frac{1}{2}"), ("1\\frac{1}{4}", "\\frac{5}{4}"),
    ("5.0", "5"), ("004", "4"), ("+5", "5"), ("−5", "-5"),
    ("10\\text{ cm}", "10"), ("10 cm", "10"), ("15\\mbox{ cm}^2", "15"), ("7 \\text{ distinct integers}", "7"),
    ("\\text{Evelyn}", "Evelyn"), ("East", "\\text{east}"), ("\\text{(C)}", "C"), ("(\\text{H})", "({H})"),
    ("90^\\circ", "90"), ("90^{\\circ}", "90"), ("90°", "90^\\circ"), ("28\\%", "28"), ("28%", "28\\%"),
    ("1,000", "1000"), ("1{,}000", "1000"), ("1\\,000", "1000"), ("1,\\!000,\\!000", "1000000"),
    ("\\$1,000.99", "1000.99"), ("\\$5", "5"), ("60, 120", "60,120"), ("60120", "60,120"),
    ("x = 3", "3"), ("k=\\frac{1}{3}", "\\frac{1}{3}"), ("2x+3", "y=2x+3"), ("x\\in[1,2]", "[1,2]"),
    ("\\sqrt2", "\\sqrt{2}"), ("\\frac{\\sqrt{6}}2", "\\frac{\\sqrt{6}}{2}"), ("\\dfrac 3 8", "\\frac38"),
    ("a^{2}", "a^2"), ("x^2 + 1", "x^2+1"), ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
    ("4, 3", "3,4"), ("1\\text{ and }2", "1,2"), ("x=2, x=3", "2,3"), ("\\{1,2\\}", "\\{2,1\\}"),
    ("\\pm\\sqrt{5}", "\\sqrt{5},-\\sqrt{5}"), ("[0,1)", "[0,1)"), ("(-\\infty, 5]", "(-\\infty,5]"),
    ("\\infty", "∞"), ("\\pi", "π"), ("2 \\pi", "2\\pi"), ("3\\times 10^{5}", "300000"), ("3e5", "300000"),
    ("\\begin{bmatrix}1&2\\\\3&4\\end{bmatrix}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}"),
    ("\\begin{pmatrix}1\\\\3\\end{pmatrix}", "\\begin{pmatrix}1\\3\\end{pmatrix}"),   # MATH lost one "\"
    ("9" * 5000, "9" * 5000),
]

# Pairs that must be rejected: a different value, a different structure, or a hedge.
VERIFIER_REJECT = [
    ("0.333", "\\frac{1}{3}"), ("-0.5", "\\frac{1}{2}"), ("-3", "3"), ("10^{5}", "100000"), ("5!", "5"),
    ("1,2", "12"), ("3 4", "34"), ("(1,2)", "(2,1)"), ("(0,1]", "(0,1)"), ("(-\\infty, 5)", "(-\\infty,5]"),
    ("(1,2)", "1,2"), ("1,2", "(1,2)"), ("3,5", "3,4"), ("3 or 4", "3"), ("3, 4", "3"), ("12\\text{ or }13", "12"),
    ("3\\text{ or more}", "3"), ("5\\text{ thousand}", "5"), ("\\sqrt{5}", "\\pm\\sqrt{5}"), ("y=5", "x=5"),
    ("5m", "5"), ("5", "5m"), ("2\\sqrt{2}", "\\sqrt{8}"), ("\\frac{\\pi}{2}", "90"),
    ("\\begin{pmatrix}2&1\\\\3&4\\end{pmatrix}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}"),
    ("\\begin{vmatrix}1&2\\\\3&4\\end{vmatrix}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}"),
    ("9" * 5000, "9" * 4999 + "8"),
]

# Families of notations a careful grader accepts (issue 11), each with near-misses that must stay wrong:
# family -> (accepted (answer, gold) pairs, rejected (answer, gold) pairs). Checked in both directions.
VERIFIER_FAMILIES = {
    "relations": (
        [("x \\geq 3", "x \\ge 3"), ("x >= 3", "x \\geqslant 3"), ("x \\leq 3", "x<=3"), ("x ≤ 3", "x \\le 3"),
         ("x \\neq 3", "x != 3"), ("x ≠ 3", "x\\ne 3")],
        [("x \\ge 3", "x > 3"), ("x \\le 3", "x < 3"), ("x \\neq 3", "x = 3"), ("x \\ge 3", "x \\le 3")]),
    "inequality_as_interval": (
        [("-2 \\le x \\le 5", "x \\in [-2, 5]"), ("-2 \\leq x \\leq 5", "[-2,5]"), ("-2 < x \\le 5", "(-2, 5]"),
         ("5 \\geq x > -2", "(-2,5]"), ("x \\ge 3", "[3, \\infty)"), ("3 < x", "x \\in (3,\\infty)"),
         ("x < 0", "(-\\infty, 0)")],
        [("-2 < x \\le 5", "[-2, 5]"), ("x > 3", "[3,\\infty)"), ("x \\le 0", "(-\\infty, 0)"), ("x \\ge 3", "y \\ge 3"),
         ("x \\ge 3", "3"), ("x < y", "(-\\infty, y)"), ("x<1 \\text{ or } x>3", "(-\\infty,1)")]),
    "empty_and_universal_sets": (
        [("\\varnothing", "\\emptyset"), ("\\{\\}", "\\emptyset"), ("∅", "\\varnothing"),
         ("(-\\infty, \\infty)", "\\mathbb{R}"), ("\\mathbb R", "(-\\infty,+\\infty)"), ("ℝ", "\\mathbb{R}"),
         ("\\text{all real numbers}", "\\mathbb{R}"), ("x \\in \\mathbb{R}", "(-\\infty, \\infty)")],
        [("\\emptyset", "0"), ("\\emptyset", "\\{0\\}"), ("(0, \\infty)", "\\mathbb{R}"), ("\\mathbb{Z}", "\\mathbb{R}"),
         ("R", "\\mathbb{R}")]),
    "number_words_scales_mixed_numbers_separators": (
        [("five", "5"), ("\\text{Twenty-one}", "21"), ("3 \\text{ million}", "3000000"), ("3.5 million", "3{,}500{,}000"),
         ("7 3/4", "7\\frac{3}{4}"), ("7 3/4", "\\frac{31}{4}"), ("-7 3/4", "-7.75"), ("14{,}916", "14916"),
         ("14 {, }916", "14916"), ("11,\\!111,\\!100", "11111100")],
        [("five", "4"), ("fifty", "5"), ("five", "15"), ("5 \\text{ million}", "5"), ("3 million", "3000"),
         ("7 3/4", "73/4"), ("7 3/4", "\\frac{21}{4}"), ("7 3/4", "7, \\frac{3}{4}"), ("14, 916", "14916"),
         ("14 {, }916", "14, 916")]),
    "matrices": (
        [("\\left[\\begin{array}{cc}1&2\\\\3&4\\end{array}\\right]", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}"),
         ("\\begin{pmatrix}1/2&0\\\\0&1\\end{pmatrix}", "\\begin{pmatrix}\\frac{1}{2}&0\\\\0&1\\end{pmatrix}")],
        [("\\left[\\begin{array}{cc}1&2\\\\3&4\\end{array}\\right]", "\\begin{pmatrix}1&2\\\\4&3\\end{pmatrix}"),
         ("\\left|\\begin{array}{cc}1&2\\\\3&4\\end{array}\\right|", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}"),
         ("\\begin{pmatrix}1/2&0\\\\0&1\\end{pmatrix}", "\\begin{pmatrix}2&0\\\\0&1\\end{pmatrix}")]),
    "parentheses_and_symbolic_slash": (
        [("\\left( 5 \\right)", "5"), ("\\left(\\frac{1}{2}\\right)", "0.5"), ("\\sqrt{3}/2", "\\frac{\\sqrt{3}}{2}"),
         ("-\\sqrt3/2", "-\\frac{\\sqrt{3}}{2}"), ("(1+\\sqrt{5})/2", "\\frac{1+\\sqrt{5}}{2}"),
         ("(\\sqrt{3}/2, 1/2)", "\\left( \\frac{\\sqrt{3}}{2}, \\frac{1}{2} \\right)")],
        [("\\left( 5, 6 \\right)", "5"), ("\\sqrt{3}/2", "\\sqrt{3/2}"), ("\\sqrt{3}/2", "\\frac{3}{2}"),
         ("1+\\sqrt{5}/2", "\\frac{1+\\sqrt{5}}{2}"), ("1/2\\pi", "\\frac{1}{2\\pi}")]),
    "base_subscript_on_one_side": (
        [("204_5", "204"), ("204_{5}", "204"), ("A3_{16}", "A3")],
        [("204_5", "205"), ("204_6", "204_5"), ("204_5", "54"), ("29_5", "29"), ("x_1", "x")]),
    "unsimplified_fractions_by_value": (
        [("\\frac{2}{4}", "\\frac{1}{2}"), ("\\frac{10}{4}", "2\\frac{1}{2}")],
        [("\\frac{2}{4}", "\\frac{2}{3}")]),
    "nothing_that_changes_the_answer_is_dropped": (
        [("7 \\text{ apples}", "7"), ("14 \\text{ right triangles}", "14"), ("x = 2 + 1 = 3", "3")],
        [("5 \\text{ is wrong}", "5"), ("5 \\text{ I think}", "5"), ("5 \\text{ maybe}", "5"), ("7?", "7"),
         ("7\ud800", "7"), ("7\ufffd", "7"), ("7\x00", "7"), ("x = 5 \\text{ or } x = 6", "6"), ("x=5 or y=6", "6")]),
}
VERIFIER_FAMILY_ACCEPT = [pytest.param(a, g, id=f"{family}-{i}") for family, (accept, _) in VERIFIER_FAMILIES.items()
                          for i, (a, g) in enumerate(accept)]
VERIFIER_FAMILY_REJECT = [pytest.param(a, g, id=f"{family}-{i}") for family, (_, reject) in VERIFIER_FAMILIES.items()
                          for i, (a, g) in enumerate(reject)]


@pytest.mark.parametrize("answer,gold", VERIFIER_ACCEPT + VERIFIER_FAMILY_ACCEPT)
def test_verifier_accepts_every_notation_of_the_same_answer_in_both_directions(answer, gold):
    assert verifier.is_correct(f"So the answer is $\\boxed{{{answer}}}$.", gold)
    assert verifier.is_correct(f"Thus \\boxed{{{gold}}}", answer)


@pytest.mark.parametrize("answer,gold", VERIFIER_REJECT + VERIFIER_FAMILY_REJECT)
def test_verifier_rejects_a_different_value_structure_or_hedge_in_both_directions(answer, gold):
    assert not verifier.is_correct(f"\\boxed{{{answer}}}", gold)
    assert not verifier.is_correct(f"\\boxed{{{gold}}}", answer)


def test_verifier_reads_an_unboxed_final_answer_phrase_and_the_last_box_of_a_very_long_response():
    cases = {
        "Answer: 42": "42", "**Answer:** $42$": "42", "## Final Answer\n\\[ 42 \\]": "42",
        "so we are done.\n\n**Final Answer**\n\n$\\frac{1}{2}$\n": "\\frac{1}{2}",
        "Final Answer: The final answer is $\\frac{3}{4}$. I hope it is correct.": "\\frac{3}{4}",   # Minerva
        "x" * 20_000 + " The answer is 5.": "5", "The answer is 5." + " " * 20_000: "5",
        # 40,000 boxes in 280,002 characters: the last complete box decides
        "\\boxed{" * 39_999 + "\\boxed{5}": "5", "\\boxed{9} " + "a" * 300_000 + " \\boxed{5}": "5",
        "\\boxed{5}" + "\\boxed{" * 40_000: None,               # an unclosed last box is still no answer
        "\\boxed{" + "1" * 10_001 + "}": None,                   # the length cap is on the answer itself
    }
    for text, expected in cases.items():
        assert verifier.extract_answer(text) == expected, text[:60]
        assert verifier.is_correct(text, expected or "1") is (expected is not None), text[:60]


def test_verifier_extracts_the_last_complete_box_or_the_final_answer_phrase_and_nothing_else():
    cases = {
        "first \\boxed{1}, then \\boxed{\\frac{a}{b+\\{c\\}}}.": "\\frac{a}{b+\\{c\\}}",   # nested braces
        "so \\boxed {7} works": "7", "\\boxed 5.": "5", "\\boxed \\pi": "\\pi", "\\fbox{x+1}": "x+1",
        "$\\boxed{2}$, $\\boxed{3}$": "2, 3",                # a run of boxes is one list answer
        "\\boxed{4}\n\n**Final Answer**\n$\\boxed{4}$": "4",   # the same box repeated is one answer
        "Final Answer: The final answer is $28 \\%$. I hope it is correct.": "28 \\%",
        "so the answer is 3.5.": "3.5", "The answer is: 12. Next": "12",
        "\\boxed{2} or \\boxed{3}": None,                    # a hedge
        "\\boxed{12": None, "\\boxed{}": None, "\\boxed{ }": None, "\\boxed{3} and \\boxed{": None,
        "the sum is 42": None,                               # no last-number fallback
        "": None, None: None, 42: None,
    }
    for text, expected in cases.items():
        assert verifier.extract_answer(text) == expected, text


def test_normalize_answer_applies_each_named_rule():
    cases = {
        "\\dfrac{3}{2}": "\\frac{3}{2}", "\\left( 1, 2 \\right)": "(1,2)", "1\\!2\\;3": "12 3",
        "$\\$5$": "5", "\\text{Evelyn}": "evelyn", "10\\text{ cm}^2": "10", "90^{\\circ}": "90", "28\\%": "28",
        "1{,}000": "1000", "1,000": "1000", "1\\,000": "1000", "1,2": "1,2", "x = 5": "5", "k=-3": "-3",
        "5.0": "5", ".5": "0.5", "2.50": "2.5", "\\frac12": "\\frac{1}{2}", "\\sqrt2": "\\sqrt{2}",
        "a^{2}": "a^2", "3/4": "\\frac{3}{4}", "x²": "x^2", "½": "\\frac{1}{2}", "π": "\\pi", "∞": "\\infty",
        "√3": "\\sqrt{3}", "2×3": "2\\times3", "5.": "5", "€5": "5", "\\{1,2\\}": "1,2", "(C)": "C",
        "infinity": "\\infty", "10 cm": "10", "5\\text{ apples}": "5",
        # issue 11: relations, intervals, sets, number words, separators, parentheses, kept characters
        "x \\geq 3": "[3,\\infty)", "x\\neq 3": "x!=3", "-2 \\le x \\le 5": "[-2,5]", "\\varnothing": "\\emptyset",
        "\\{\\}": "\\emptyset", "\\mathbb{R}": "(-\\infty,\\infty)", "14 {, }916": "14916", "\\left( 5 \\right)": "5",
        "five": "5", "7?": "7?", "5 \\text{ is wrong}": "5iswrong", "7\ud800": "7\ufffd",
    }
    for before, after in cases.items():
        assert verifier.normalize_answer(before) == after, before
    assert verifier.normalize_answer(None) == "" and verifier.normalize_answer(3) == ""


def test_verifier_is_simply_incorrect_for_none_non_strings_and_empty_answers():
    for response, gold in [(None, "1"), ("\\boxed{1}", None), (1, 1), ([], "1"), ("\\boxed{1}", ""),
                           ("", ""), ("\\boxed{1}", "\\boxed{}"), (b"\\boxed{1}", "1")]:
        assert verifier.is_correct(response, gold) is False
        assert verifier.reward(response, gold) == 0.0
    assert verifier.reward("\\boxed{1}", "\\boxed{1}") == 1.0     # a gold may itself be boxed


def _python_lines_run(call) -> int:
    """How many Python lines `call()` executes (sys.settrace's "line" events): a count of operations,
    the same on a quiet and a busy machine, unlike a wall-clock time."""
    count = 0

    def tracer(frame, event, arg):
        nonlocal count
        count += event == "line"
        return tracer
    sys.settrace(tracer)
    try:
        call()
    finally:
        sys.settrace(None)
    return count


# Adversarial inputs of n characters (n = 150,000 or 300,000), one per way an input could blow up.
VERIFIER_ADVERSARIAL = {
    "open braces": lambda n: "{" * n, "an unclosed box of open braces": lambda n: "\\boxed{" + "{" * n,
    "unclosed boxes": lambda n: "\\boxed{" * (n // 7), "no box, no phrase": lambda n: "a" * n,
    "the last of many boxes": lambda n: "\\boxed{" * (n // 7) + "\\boxed{5}",
    "boxes far apart": lambda n: "\\boxed{9} " + "a" * n + " \\boxed{5}",
    "nested braces": lambda n: "\\boxed{" + "{" * (n // 15) + "1" + "}" * (n // 15) + "}",
    "a long answer list": lambda n: "the answer is " + "1, " * (n // 3),
    "thin spaces": lambda n: "\\boxed{" + "\\," * (n // 75) + "}",
    "nested fractions": lambda n: "\\boxed{" + "\\frac" * (n // 150) + "}",
    "a long number": lambda n: "\\boxed{" + "9" * (n // 60) + "}",
    "a long fraction": lambda n: "\\boxed{\\frac{" + "9" * (n // 120) + "}{" + "9" * (n // 120) + "7}}",
}


@pytest.mark.parametrize("name", list(VERIFIER_ADVERSARIAL))
def test_verifier_work_on_an_adversarial_input_at_most_doubles_when_the_input_doubles(name):
    # Linear cost, counted in Python lines run rather than timed (timings: `python bench.py verifier`).
    # A quadratic pass over the input would run 4x the lines at twice the length.
    make = VERIFIER_ADVERSARIAL[name]

    def work(n):
        text = make(n)
        return _python_lines_run(lambda: (verifier.extract_answer(text), verifier.normalize_answer(text),
                                          verifier.is_correct(text, "1"), verifier.is_correct("\\boxed{1}", text)))
    assert work(300_000) <= 2.2 * work(150_000) + 100, name


def test_verifier_fuzz_gives_the_known_answer_and_is_symmetric_and_reflexive_on_random_strings():
    rng = random.Random(0)
    noise = ["{", "}", "\\{", "\\}", "(", ")", "[", "]", "\\frac", "\\sqrt", "\\text{", "1", "0.", ",", "/", "=",
             "x", "\\pm", "\\cup", "&", "\\\\", "\\", "$", "%", "^\\circ", " ", "\n", "\\left(", " and ", " or ",
             "\\begin{pmatrix}", "\\end{pmatrix}", "\x00", "\x01", "\x02", "\x1b", "\ud800", "\udfff", "²", "−",
             "π", "∞", "e5", "\\times10^{"]
    # (1) a known answer: reasoning of random noise (no box in it), then the value boxed in one of its
    # notations; the same value in another notation is right, the next value is wrong
    for _ in range(300):
        p, q = rng.randint(-999, 999), rng.choice([1, 2, 4, 5, 8, 10, 20, 25])
        value = Fraction(p, q)
        notations = [f"\\frac{{{value.numerator}}}{{{value.denominator}}}", f"{value.numerator}/{value.denominator}",
                     f"{float(value):.3f}", f"\\dfrac{{{value.numerator}}}{{{value.denominator}}}"]
        if value.denominator == 1:
            notations += [str(value.numerator), f"{value.numerator}.0"]
        answer, gold = rng.choice(notations), rng.choice(notations)
        reasoning = "".join(rng.choice(noise) for _ in range(rng.randint(0, 40)))
        response = f"{reasoning}\nSo the answer is $\\boxed{{{answer}}}$."
        assert verifier.is_correct(response, gold) is True, (response, gold)
        assert verifier.is_correct(response, str(value + Fraction(1, 3))) is False, (response, value)
    # (2) invariants on random strings: a verdict is a bool, the same both ways, and an extracted answer
    # that normalizes to something matches itself
    texts = ["".join(rng.choice(noise) for _ in range(rng.randint(0, 60))) for _ in range(1000)]
    checked = 0
    for text in texts:
        gold = texts[rng.randrange(len(texts))]
        there, back = verifier.is_correct(f"\\boxed{{{text}}}", gold), verifier.is_correct(f"\\boxed{{{gold}}}", text)
        assert type(there) is bool and there == back, (text, gold)
        answer = verifier.extract_answer(f"\\boxed{{{text}}}")
        assert answer is None or isinstance(answer, str)
        if answer is not None and verifier.normalize_answer(answer):
            assert verifier.is_correct(f"\\boxed{{{text}}}", answer) is True, text
            checked += 1
    assert checked > 300                                       # the reflexive check really ran


@needs_shared_data
def test_verifier_agrees_with_math_solutions_on_at_least_99_5_percent_of_records():
    records = [json.loads(line) for name in ("math_train.jsonl", "math_test.jsonl")
               for line in (SHARED_DATA / name).read_text().splitlines() if line.strip()]
    misses = [r for r in records if not verifier.is_correct(r["solution"], r["answer"])]
    rate = 1 - len(misses) / len(records)
    print(f"\nself-consistency {len(records) - len(misses)}/{len(records)} = {rate:.4%}; misses:")
    for r in misses:
        print(f"  gold {r['answer']!r:<40} extracted {verifier.extract_answer(r['solution'])!r}")
    assert len(records) == 12_500 and rate >= 0.995


# =================================================================================================
# PASS@K (passk.py)
# =================================================================================================


# Exact math first (the estimator against enumeration and exact fractions), then evaluate() on a fake
# sampler whose per-problem accuracy is known, then the JSON round trip and the command line.
# Select them with:  python -m pytest -q test_nsr.py -k "passk or pass_at_k"

def test_pass_at_k_equals_brute_force_enumeration_over_all_k_subsets():
    for n in range(1, 11):
        for c in range(n + 1):
            correct = set(range(c))                    # which samples are correct does not matter
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(range(n), k))
                hit = sum(1 for s in subsets if correct.intersection(s))
                assert passk.pass_at_k(n, c, k) == pytest.approx(float(Fraction(hit, len(subsets))),
                                                                 rel=1e-14, abs=1e-15), (n, c, k)


def test_pass_at_k_matches_exact_binomial_fractions_for_random_n_up_to_512():
    rng = random.Random(0)
    cases = [(512, 1, 1), (512, 1, 511), (512, 511, 1), (512, 256, 256), (512, 0, 512), (512, 512, 512)]
    cases += [(n, rng.randint(0, n), rng.randint(1, n)) for n in (rng.randint(1, 512) for _ in range(400))]
    # Small c and k at n = 512: the answer is near 0, where a float product would lose relative accuracy.
    cases += [(512, rng.randint(1, 8), rng.randint(1, 8)) for _ in range(50)]
    for n, c, k in cases:
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        got = passk.pass_at_k(n, c, k)
        assert abs(Fraction(got) - exact) <= 1e-15 * exact + 1e-300, (n, c, k, got, float(exact))


def test_pass_at_k_is_unbiased_under_binomial_sampling_while_the_plug_in_estimate_is_not():
    # If every sample is correct with probability p, c ~ Binomial(n, p) and the truth is 1 - (1-p)^k.

    for n, p in [(8, 0.1), (16, 0.3), (32, 0.05)]:
        pmf = [math.comb(n, c) * p ** c * (1 - p) ** (n - c) for c in range(n + 1)]
        for k in range(1, n + 1):
            truth = 1 - (1 - p) ** k
            expected = math.fsum(w * passk.pass_at_k(n, c, k) for c, w in enumerate(pmf))
            assert expected == pytest.approx(truth, rel=1e-12, abs=1e-14), (n, p, k)
            plug_in = math.fsum(w * (1 - (1 - c / n) ** k) for c, w in enumerate(pmf))
            if 1 < k < n:
                assert plug_in < truth - 1e-4, (n, p, k)   # biased low, which is why we do not use it


def test_pass_at_k_edge_cases_c_zero_c_n_k_n_and_pass_at_1_is_c_over_n():
    for n in (1, 2, 7, 64, 256):
        assert passk.pass_at_k(n, 0, 1) == 0.0 and passk.pass_at_k(n, 0, n) == 0.0
        assert passk.pass_at_k(n, n, 1) == 1.0 and passk.pass_at_k(n, n, n) == 1.0
        for c in range(1, n + 1):
            assert passk.pass_at_k(n, c, n) == 1.0                 # k = n: every sample is drawn
        for c in range(n + 1):
            assert passk.pass_at_k(n, c, 1) == pytest.approx(c / n, rel=1e-15, abs=0)
    # Fewer than k wrong samples: every k-subset contains a correct one, so exactly 1.
    assert passk.pass_at_k(10, 7, 4) == 1.0
    assert passk.pass_at_k(10, 7, 3) == pytest.approx(1 - 1 / 120, rel=1e-15)   # 1 - C(3,3)/C(10,3)


@pytest.mark.parametrize("n, c, k, message", [
    (4, 0, 5, "k=5 > n=4"), (4, 5, 2, "c=5 > n=4"), (4, 1, 0, "k must be >= 1"),
    (-1, 0, 1, "n must be >= 1"), (4, -1, 1, "c must be >= 0"), (4, 1, -2, "k must be >= 1"),
    (4.0, 1, 1, "n must be an integer"), (4, 1.5, 1, "c must be an integer"),
    (4, 1, "2", "k must be an integer"),
])
def test_pass_at_k_rejects_bad_arguments_with_a_clear_value_error(n, c, k, message):
    with pytest.raises(ValueError, match=message):
        passk.pass_at_k(n, c, k)


def test_passk_curve_is_the_mean_over_problems_and_non_decreasing_in_k():
    assert passk.default_ks(256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert passk.default_ks(10) == [1, 2, 4, 8] and passk.default_ks(1) == [1]
    rng = random.Random(1)
    n = 32
    counts = [rng.choice([0, 1, 2, 5, 16, 31, 32]) for _ in range(50)]
    curve = passk.passk_curve(counts, n)
    assert list(curve) == [1, 2, 4, 8, 16, 32]
    for k, value in curve.items():
        assert value == pytest.approx(sum(passk.pass_at_k(n, c, k) for c in counts) / len(counts), rel=1e-12)
    assert curve[1] == pytest.approx(sum(counts) / (n * len(counts)), rel=1e-12)   # Pass@1 = avg@n
    for c in range(n + 1):                                                      # per problem, every k
        values = [passk.pass_at_k(n, c, k) for k in range(1, n + 1)]
        assert all(a <= b for a, b in zip(values, values[1:])), c
    with pytest.raises(ValueError, match="empty"):
        passk.passk_curve([], n)
    with pytest.raises(ValueError, match="k=64 > n=32"):
        passk.passk_curve(counts, n, ks=[64])


# ---- a fake sampler with known per-problem accuracy ----------------------------------------------
# Problem i has gold answer str(7 * i + 3) and is answered correctly with probability accuracy[i].
# Tokens: ids 0-9 are digits, 10 is EOS (a special token). A correct sample is the gold digits + EOS,
# with entropy 0.25 per token; a wrong one is the digits of gold + 1000, truncated (no EOS), entropy 1.0.

_PASSK_EOS = 10


class _PasskFakeTokenizer:
    def __init__(self):
        self.skip_flags = []

    def decode(self, tokens, skip_special_tokens=False):
        self.skip_flags.append(skip_special_tokens)
        digits = "".join(str(t) for t in tokens if t != _PASSK_EOS)
        eos = "" if skip_special_tokens or _PASSK_EOS not in tokens else "<|eos|>"
        return f"Adding up, the answer is \\boxed{{{digits}}}{eos}"


def _passk_fake_world(monkeypatch, accuracy, model):
    """Patch loading.encode_prompts / sample.generate with the fake; returns a log of what the fake saw and did."""

    log = {"calls": [], "made_correct": [0] * len(accuracy), "generators": [], "uniforms": []}

    def encode_prompts(tokenizer, problems, template="auto", max_prompt_len=None):
        return [[1, 100 + int(p["problem"][1:])] for p in problems], list(problems), 0   # "q7" -> [1, 107]

    def generate(model_, prompt_ids, max_new_tokens, temperature=1.0, top_p=1.0, eos_token_ids=None,
                 generator=None, chunk_size=256, uniforms=None):
        assert model_ is model
        log["calls"].append({"rows": len(prompt_ids), "chunk_size": chunk_size, "temperature": temperature,
                             "top_p": top_p, "max_new_tokens": max_new_tokens})
        log["generators"].append(generator)
        log["uniforms"].append(uniforms)
        # one draw per row: the row's first common random number, else the generator's next number
        u = uniforms[:, 0] if uniforms is not None else torch.rand(len(prompt_ids), generator=generator)
        tokens, truncated, entropies = [], [], []
        for row, draw in zip(prompt_ids, u.tolist()):
            i = row[1] - 100
            if draw < accuracy[i]:
                log["made_correct"][i] += 1
                toks = [int(d) for d in str(7 * i + 3)] + [_PASSK_EOS]
                tokens.append(toks), truncated.append(False), entropies.append([0.25] * len(toks))
            else:
                toks = [int(d) for d in str(7 * i + 3 + 1000)]
                tokens.append(toks), truncated.append(True), entropies.append([1.0] * len(toks))
        return sample.Rollouts(tokens=tokens, logprobs=[[-1.0] * len(t) for t in tokens], truncated=truncated,
                            entropies=entropies)

    monkeypatch.setattr(loading, "encode_prompts", encode_prompts, raising=False)
    monkeypatch.setattr(sample, "generate", generate, raising=False)
    return log


def _passk_fake_problems(num):
    return [{"problem": f"q{i}", "answer": str(7 * i + 3)} for i in range(num)]


_PASSK_ACCURACY = [0.0, 0.1, 0.25, 0.5, 0.9, 1.0] * 10      # 60 problems


def test_passk_evaluate_on_a_fake_sampler_with_known_accuracy_recovers_the_expected_curve(monkeypatch):
    model, tokenizer = torch.nn.Linear(1, 1), _PasskFakeTokenizer()
    log = _passk_fake_world(monkeypatch, _PASSK_ACCURACY, model)
    n = 64
    result = passk.evaluate(model, tokenizer, _passk_fake_problems(len(_PASSK_ACCURACY)), n, seed=5,
                            temperature=0.6, top_p=0.95, max_new_tokens=9, chunk_size=256, model_name="fake")
    # Exact: the counts are what the fake actually produced, verified through the real verifier.
    assert result["counts"] == log["made_correct"]
    # every decode skips special tokens; each distinct response is decoded once per problem (here 2 of them)
    assert all(flag is True for flag in tokenizer.skip_flags)
    assert len(tokenizer.skip_flags) == sum((c > 0) + (c < n) for c in result["counts"])
    # Within tolerance: the curve recovers E[Pass@k] = mean_i 1 - (1 - p_i)^k. Its sampling noise here
    # is 0.5-1 percentage point (one std); over 300 seeds the worst error we saw was 2.4 points.
    assert list(result["curve"]) == [1, 2, 4, 8, 16, 32, 64]
    for k, value in result["curve"].items():
        expected = sum(1 - (1 - p) ** k for p in _PASSK_ACCURACY) / len(_PASSK_ACCURACY)
        assert value == pytest.approx(expected, abs=0.04), k
    assert result["avg_at_n"] == pytest.approx(result["curve"][1], rel=1e-12)   # avg@n = Pass@1
    # The other metrics, recomputed from the counts and the fake's known lengths/entropies.
    correct_len = [len(str(7 * i + 3)) + 1 for i in range(60)]
    wrong_len = [len(str(7 * i + 3 + 1000)) for i in range(60)]
    tokens = sum(c * lc + (n - c) * lw for c, lc, lw in zip(result["counts"], correct_len, wrong_len))
    assert result["mean_length"] == pytest.approx(tokens / (60 * n))
    assert result["truncation_rate"] == pytest.approx(1 - sum(result["counts"]) / (60 * n))
    entropy = sum(0.25 * c * lc + 1.0 * (n - c) * lw
                  for c, lc, lw in zip(result["counts"], correct_len, wrong_len))
    assert result["mean_entropy"] == pytest.approx(entropy / tokens)
    assert (result["n"], result["num_problems"], result["num_skipped"], result["model"]) == (n, 60, 0, "fake")
    assert result["settings"] == {"n": 64, "temperature": 0.6, "top_p": 0.95, "max_new_tokens": 9, "seed": 5,
                                  "template": "auto", "chunk_size": 256, "common_random_numbers": True}
    # Sampling settings reach the sampler; 256 rows per call = 4 problems of 64 repeats each.
    assert {(c["temperature"], c["top_p"], c["max_new_tokens"], c["chunk_size"]) for c in log["calls"]} \
        == {(0.6, 0.95, 9, 256)}
    assert [c["rows"] for c in log["calls"]] == [256] * 15


def test_passk_evaluate_hands_each_problem_its_own_uniform_table_so_the_same_seed_gives_the_same_counts(
        monkeypatch):
    model, problems = torch.nn.Linear(1, 1), _passk_fake_problems(12)
    log = _passk_fake_world(monkeypatch, [0.5] * 12, model)
    first = passk.evaluate(model, _PasskFakeTokenizer(), problems, 16, seed=3, chunk_size=40)
    again = passk.evaluate(model, _PasskFakeTokenizer(), problems, 16, seed=3, chunk_size=200)
    other = passk.evaluate(model, _PasskFakeTokenizer(), problems, 16, seed=4, chunk_size=40)
    assert first["counts"] == again["counts"] and first["counts"] != other["counts"]   # chunking changes nothing
    assert all(g is None for g in log["generators"])
    # chunk 40 // n 16 = 2 problems per call, each call gets its problems' tables stacked in order
    assert [c["rows"] for c in log["calls"][:6]] == [32] * 6
    for call, uniforms in enumerate(log["uniforms"][:6]):
        expected = torch.cat([passk.problem_uniforms(3, p, 16, 512) for p in (2 * call, 2 * call + 1)])
        assert uniforms.dtype == torch.float64 and torch.equal(uniforms, expected)


def test_passk_verify_decodes_each_distinct_response_and_answer_once_and_matches_the_verifier():
    tokenizer = _PasskFakeTokenizer()                      # [3, 1] decodes to "... \\boxed{31}"
    responses = [[3, 1], [3, 1], [4], [3, 1], [4], [3, 1]]
    answers = ["31", "31", "31", "4", "4", "31"]
    expected = [verifier.is_correct(tokenizer.decode(r, skip_special_tokens=True), a)
                for r, a in zip(responses, answers)]
    tokenizer.skip_flags.clear()
    assert passk.verify(tokenizer, responses, answers) == expected == [True, True, False, False, True, True]
    assert len(tokenizer.skip_flags) == 4                 # 4 distinct (response, answer) pairs
    with pytest.raises(ValueError):
        passk.verify(tokenizer, responses, answers[:2])   # one answer per response


def test_problem_uniforms_depend_on_the_seed_and_problem_alone_and_extend_with_n():
    table = passk.problem_uniforms(0, 5, 8, 6)
    assert table.shape == (8, 6) and table.dtype == torch.float64 and 0 <= table.min() and table.max() < 1
    assert torch.equal(table, passk.problem_uniforms(0, 5, 8, 6))
    assert torch.equal(passk.problem_uniforms(0, 5, 20, 6)[:8], table)      # more samples: the first 8 rows kept
    for seed, problem in [(1, 5), (0, 4), (5, 0)]:                          # no two (seed, problem) share a table
        assert not torch.equal(passk.problem_uniforms(seed, problem, 8, 6), table)


def test_passk_evaluate_without_common_random_numbers_seeds_one_generator_for_every_call(monkeypatch):
    model, problems = torch.nn.Linear(1, 1), _passk_fake_problems(12)
    log = _passk_fake_world(monkeypatch, [0.5] * 12, model)
    run = dict(chunk_size=40, common_random_numbers=False)
    first = passk.evaluate(model, _PasskFakeTokenizer(), problems, 16, seed=3, **run)
    again = passk.evaluate(model, _PasskFakeTokenizer(), problems, 16, seed=3, **run)
    other = passk.evaluate(model, _PasskFakeTokenizer(), problems, 16, seed=4, **run)
    assert first["counts"] == again["counts"] and first["counts"] != other["counts"]
    generators = log["generators"]
    assert all(isinstance(g, torch.Generator) and g.device == torch.device("cpu") for g in generators)
    assert all(u is None for u in log["uniforms"])
    calls_per_run = len(generators) // 3
    assert len(set(map(id, generators[:calls_per_run]))) == 1     # one generator per evaluate() call
    assert [c["rows"] for c in log["calls"][:calls_per_run]] == [32] * 6   # chunk 40 // n 16 = 2 problems


def test_passk_evaluate_result_saved_as_json_reloads_with_int_keys_and_gives_the_same_table(monkeypatch,
                                                                                            tmp_path):
    model = torch.nn.Linear(1, 1)
    _passk_fake_world(monkeypatch, _PASSK_ACCURACY[:12], model)
    path = tmp_path / "sub" / "run.json"
    result = passk.evaluate(model, _PasskFakeTokenizer(), _passk_fake_problems(12), 8, seed=0, out=path)
    assert '"1":' in path.read_text()                        # JSON object keys are strings on disk ...
    loaded = passk.load_result(path)
    assert list(loaded["curve"]) == [1, 2, 4, 8]            # ... and ints again after load_result
    assert loaded["curve"] == result["curve"] and loaded["counts"] == result["counts"]
    assert passk.passk_curve(loaded["counts"], loaded["n"]) == loaded["curve"]   # recomputable from counts
    assert passk.format_table({"run": loaded}) == passk.format_table({"run": result})


@pytest.mark.parametrize("problems, n, ks, message", [
    ([], 4, None, "empty data set"),
    ([{"problem": "q0", "answer": "3"}], 0, None, "n \\(samples per problem\\) must be >= 1"),
    ([{"problem": "q0", "answer": "3"}], 4, [1, 8], "k=8 is out of range"),
    ([{"problem": "q0"}], 4, None, "problems\\[0\\] needs keys"),
])
def test_passk_evaluate_rejects_bad_input_before_any_sampling(monkeypatch, problems, n, ks, message):
    def must_not_sample(*args, **kwargs):
        raise AssertionError("sampling started before the input was checked")

    monkeypatch.setattr(sample, "generate", must_not_sample, raising=False)
    monkeypatch.setattr(loading, "encode_prompts", must_not_sample, raising=False)
    with pytest.raises(ValueError, match=message):
        passk.evaluate(torch.nn.Linear(1, 1), _PasskFakeTokenizer(), problems, n, ks=ks)


@pytest.mark.smoke
def test_passk_evaluate_smoke_with_the_real_sampler_and_verifier_on_a_tiny_model():
    # No fakes: loading.encode_prompts + sample.generate + verifier.is_correct on a random tiny Qwen2 with the toy
    # character tokenizer. A random model knows nothing, so only sanity and seeding are checked.

    tokenizer = toy.build_tokenizer()
    model = tiny_model("qwen2", vocab_size=len(tokenizer))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    problems = [{"problem": "1+1?", "answer": "2"}, {"problem": "2+3?", "answer": "5"}]
    run = dict(max_new_tokens=6, seed=1, template="plain", chunk_size=5)
    first = passk.evaluate(model, tokenizer, problems, 4, **run)
    again = passk.evaluate(model, tokenizer, problems, 4, **run)
    other = passk.evaluate(model, tokenizer, problems, 4, **{**run, "seed": 2})
    assert first == {**again, "seconds": first["seconds"]}                        # same seed, same result
    assert other["mean_entropy"] != first["mean_entropy"]
    assert len(first["counts"]) == 2 and all(0 <= c <= 4 for c in first["counts"])
    assert 1 <= first["mean_length"] <= 6 and 0 <= first["truncation_rate"] <= 1
    # Near-uniform logits of a random init: entropy close to (and never above) log(vocab size).
    assert math.log(len(tokenizer)) - 0.5 < first["mean_entropy"] <= math.log(len(tokenizer)) + 1e-4


def _passk_saved_runs(tmp_path):
    """Two saved results with hand-made counts: 'base' (n=8) and 'nsr' (n=4, so k=8 is missing)."""
    runs = {"base": ([0, 1, 8, 3], 8), "nsr": ([2, 4, 0, 1], 4)}
    paths = []
    for name, (counts, n) in runs.items():
        result = {"model": name, "data": "toy.jsonl", "n": n, "num_problems": len(counts), "counts": counts,
                  "curve": passk.passk_curve(counts, n), "settings": {"temperature": 1.0, "seed": 0}}
        paths.append(passk.save_result(result, tmp_path / f"{name}.json"))
    return paths


@pytest.mark.smoke
def test_passk_compare_prints_the_paper_table_and_a_pip_hint_without_matplotlib(monkeypatch, tmp_path,
                                                                                 capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)     # makes `import matplotlib...` fail
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    base, nsr_run = _passk_saved_runs(tmp_path)
    assert passk.main(["--compare", str(base), str(nsr_run)]) == 0
    out = capsys.readouterr().out.splitlines()
    # base: pass@1 = mean(0, 1, 8, 3)/8 = 12/32 = 37.5%; nsr at k=8 does not exist (n=4) -> "-".
    assert out[0].split() == ["Pass@k", "(%)", "k=1", "k=2", "k=4", "k=8"]
    assert out[1].split()[:2] == ["base", "37.5"] and out[2].split()[0] == "nsr"
    assert out[2].split()[-1] == "-"
    assert out[1].split()[1:] == [f"{100 * v:.1f}" for v in passk.passk_curve([0, 1, 8, 3], 8).values()]
    assert "pip install matplotlib" in out[-1] and not list(tmp_path.glob("*.png"))


@pytest.mark.smoke
def test_passk_compare_writes_a_png_of_the_curves_when_matplotlib_is_installed(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    base, nsr_run = _passk_saved_runs(tmp_path)
    assert passk.main(["--compare", str(base), str(nsr_run)]) == 0
    png = tmp_path / "base.passk.png"                        # default: next to the first json
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot: {png}" in capsys.readouterr().out


@pytest.mark.smoke
def test_passk_cli_evaluates_a_data_file_and_saves_settings_and_model_name(monkeypatch, tmp_path, capsys):
    model = torch.nn.Linear(1, 1)
    _passk_fake_world(monkeypatch, _PASSK_ACCURACY, model)
    loaded_with = {}

    def load_model(name_or_dir, dtype="auto", device=None):
        loaded_with.update(name=name_or_dir, dtype=dtype, device=device)
        return model, _PasskFakeTokenizer()

    monkeypatch.setattr(loading, "load_model", load_model, raising=False)
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in _passk_fake_problems(10)))
    out = tmp_path / "r.json"
    argv = ["--model", "some/model", "--data", str(data), "--n", "16", "--out", str(out), "--limit", "6",
            "--temperature", "0.7", "--top-p", "0.9", "--max-new-tokens", "5", "--seed", "11",
            "--dtype", "float32"]
    assert passk.main(argv) == 0
    result = passk.load_result(out)
    assert (result["model"], result["data"], result["n"]) == ("some/model", str(data), 16)
    assert len(result["counts"]) == 6                          # --limit 6
    assert result["settings"]["temperature"] == 0.7 and result["settings"]["seed"] == 11
    assert loaded_with == {"name": "some/model", "dtype": "float32", "device": None}
    assert "k=16" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--data", "MISSING"], "no such file"),
    (["--data", "EMPTY"], "no problems"),
    (["--data", "DATA", "--n", "0"], "--n must be >= 1"),
    (["--data", "DATA", "--n", "4", "--ks", "1,8"], "k=8 is out of range"),
])
def test_passk_cli_rejects_bad_input_before_loading_the_model(monkeypatch, tmp_path, capsys, extra, message):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(loading, "load_model", must_not_load, raising=False)
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "data.jsonl").write_text('{"problem": "1+1", "answer": "2"}\n')
    paths = {"MISSING": tmp_path / "missing.jsonl", "EMPTY": tmp_path / "empty.jsonl",
             "DATA": tmp_path / "data.jsonl"}
    extra = [str(paths.get(a, a)) for a in extra]
    with pytest.raises(SystemExit) as stop:
        passk.main(["--model", "m", "--out", str(tmp_path / "o.json")] + extra)
    assert stop.value.code == 2 and message in capsys.readouterr().err


# =================================================================================================
# SAMPLING (sample.py)
# =================================================================================================
# Select with: python -m pytest -q test_nsr.py -k "kv_cache or generate or top_p or forward or sample_from or sampler"
# Parity: our forward and KV cache against transformers' forward, our generate against model.generate;
# exact math: the top-p boundary, the sampler's frequencies; and that our path never runs transformers.

# prompts of different lengths (bos = 1); the model's eos id is 2
SAMPLING_PROMPTS = [[1, 5, 6, 7, 8, 9, 10], [1, 11], [1, 12, 13, 14], [1, 15, 16, 17, 18]]


def _continuation_logits(model, prompt, tokens):
    """Full forward over prompt + tokens alone (no padding, no cache): the logits that predicted each
    token of `tokens`, shape (len(tokens), V)."""
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()              # (P + N, V)
    return logits[len(prompt) - 1: len(prompt) - 1 + len(tokens)]


def _transformers_greedy(model, prompt, max_new_tokens):
    """Reference: transformers' own greedy generate on one unpadded prompt, cut after the first EOS."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=2, pad_token_id=0)
    new = out[0, len(prompt):].tolist()
    return new[: new.index(2) + 1] if 2 in new else new


@pytest.mark.parity
@pytest.mark.parametrize("arch", ARCHS)
def test_kv_cache_step_logits_equal_a_full_forward_pass_with_left_padding(arch):
    model = tiny_model(arch)
    continuation = [[40, 41, 42], [50, 51, 52], [60, 61, 62], [70, 71, 72]]   # fed one token per step
    n = len(continuation[0])
    ids, mask, pos = sample.left_pad(SAMPLING_PROMPTS, n, torch.device("cpu"))
    P = ids.shape[1]
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        step_logits = [sample.next_token_logits(model, ids, mask[:, :P], pos, cache)]       # prefill
        for t in range(n):
            step_ids = torch.tensor([[row[t]] for row in continuation])                  # (B, 1)
            step_logits.append(sample.next_token_logits(model, step_ids, mask[:, :P + t + 1], pos[:, -1:] + 1 + t,
                                                     cache))
    for b, prompt in enumerate(SAMPLING_PROMPTS):
        full = _continuation_logits(model, prompt, continuation[b] + [0])              # (n + 1, V)
        cached = torch.stack([logits[b] for logits in step_logits])                     # (n + 1, V)
        assert (cached - full).abs().max().item() <= 1e-4, f"row {b}"


@pytest.mark.parity
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generate_matches_transformers_generate_token_for_token(arch):
    model = tiny_model(arch)
    rollouts = sample.generate(model, SAMPLING_PROMPTS, max_new_tokens=10, temperature=0.0)
    for b, prompt in enumerate(SAMPLING_PROMPTS):
        expected = _transformers_greedy(model, prompt, 10)
        assert rollouts.tokens[b] == expected, f"row {b}"
        assert rollouts.truncated[b] == (2 not in expected)


@pytest.mark.parity
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generate_of_a_batch_equals_each_prompt_generated_alone(arch):
    model = tiny_model(arch)
    prompts = SAMPLING_PROMPTS + SAMPLING_PROMPTS[:2]        # repeated prompts share one prefill
    batch = sample.generate(model, prompts, max_new_tokens=10, temperature=0.0)
    for b, prompt in enumerate(prompts):
        alone = sample.generate(model, [prompt], max_new_tokens=10, temperature=0.0)
        assert batch.tokens[b] == alone.tokens[0], f"row {b}"
        assert batch.truncated[b] == alone.truncated[0]


def test_generate_does_not_stop_at_an_eos_inside_the_prompt():
    model = tiny_model("qwen2")
    prompts = [[1, 2, 7, 2], [1, 8, 2]]                                # EOS (id 2) inside and at the end
    rollouts = sample.generate(model, prompts, max_new_tokens=6, temperature=0.0, eos_token_ids=[2])
    for b, prompt in enumerate(prompts):
        tokens = rollouts.tokens[b]
        assert len(tokens) >= 1 and 2 not in tokens[:-1]
        assert tokens == _transformers_greedy(model, prompt, 6)


def test_generate_stops_each_row_at_its_first_eos_and_reports_truncation():
    model = tiny_model("llama")
    N = 12
    # eos_token_ids=[] never stops: the full greedy continuations
    full = sample.generate(model, SAMPLING_PROMPTS, max_new_tokens=N, temperature=0.0, eos_token_ids=[])
    assert all(len(row) == N for row in full.tokens) and all(full.truncated)
    # call "EOS" a token that row 0 produces mid-way and some other row never produces
    eos = next(tok for tok in full.tokens[0][2:] if any(tok not in row for row in full.tokens[1:]))
    stopped = sample.generate(model, SAMPLING_PROMPTS, max_new_tokens=N, temperature=0.0, eos_token_ids=[eos])
    for b, row in enumerate(full.tokens):
        if eos in row:                             # cut right after the first EOS, nothing appended after it
            assert stopped.tokens[b] == row[: row.index(eos) + 1] and not stopped.truncated[b]
        else:
            assert stopped.tokens[b] == row and stopped.truncated[b]
        assert len(stopped.logprobs[b]) == len(stopped.entropies[b]) == len(stopped.tokens[b])


def test_generate_defaults_to_every_eos_id_listed_in_the_generation_config():
    model = tiny_model("qwen2")
    full = sample.generate(model, SAMPLING_PROMPTS[:1], max_new_tokens=8, temperature=0.0, eos_token_ids=[])
    stop = full.tokens[0][2]                        # chat models list several stop ids, e.g. <|im_end|>
    model.generation_config.eos_token_id = [2, stop]
    assert sample.default_eos_token_ids(model) == [2, stop]
    stopped = sample.generate(model, SAMPLING_PROMPTS[:1], max_new_tokens=8, temperature=0.0)
    assert stopped.tokens[0] == full.tokens[0][: full.tokens[0].index(stop) + 1]
    assert stopped.truncated == [False]


def test_top_p_keeps_the_smallest_set_of_most_likely_tokens_reaching_p():
    probs = torch.tensor([0.10, 0.40, 0.05, 0.30, 0.15])   # sorted: 0.40, 0.30, 0.15, 0.10, 0.05
    logits = probs.log()[None]                               # (1, V)
    # cumulative mass of the sorted tokens: 0.40, 0.70, 0.85, 0.95, 1.00
    for top_p, kept in [(0.3, {1}), (0.6, {1, 3}), (0.8, {1, 3, 4}), (0.9, {1, 3, 4, 0}),
                        (0.97, {0, 1, 2, 3, 4}), (1.0, {0, 1, 2, 3, 4})]:
        filtered = sample.top_p_filter(logits, top_p)[0]
        assert set(torch.isfinite(filtered).nonzero().flatten().tolist()) == kept, top_p
        # the kept tokens are renormalised: q = p / sum_{kept} p
        q = filtered.softmax(-1)
        mass = sum(probs[i] for i in kept)
        for i in kept:
            assert abs(q[i].item() - probs[i].item() / mass) < 1e-6
    with pytest.raises(ValueError, match="top_p"):
        sample.top_p_filter(logits, 0.0)


def test_generate_with_a_fixed_generator_reproduces_the_same_samples():
    model = tiny_model("qwen3")
    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return sample.generate(model, SAMPLING_PROMPTS, max_new_tokens=8, temperature=1.0, top_p=0.9, generator=g)
    a, b, c = draw(0), draw(0), draw(1)
    assert a.tokens == b.tokens and a.logprobs == b.logprobs and a.entropies == b.entropies
    assert a.tokens != c.tokens


@pytest.mark.parity
@pytest.mark.parametrize("arch", ARCHS)
def test_generate_logprobs_equal_a_fresh_forward_pass_under_the_sampling_distribution(arch):
    model = tiny_model(arch)
    prompts = SAMPLING_PROMPTS * 2                           # two rollouts per prompt (shared prefill)
    for temperature, top_p in [(0.7, 1.0), (1.3, 0.8)]:
        g = torch.Generator().manual_seed(0)
        rollouts = sample.generate(model, prompts, max_new_tokens=8, temperature=temperature,
                                top_p=top_p, generator=g)
        assert rollouts.tokens[:4] != rollouts.tokens[4:]    # rollouts of one prompt are sampled independently
        for b, prompt in enumerate(prompts):
            tokens = rollouts.tokens[b]
            logits = _continuation_logits(model, prompt, tokens)                     # (n, V)
            logq = sample.top_p_filter(logits / temperature, top_p).log_softmax(-1)     # the sampled-from q
            expected = logq.gather(1, torch.tensor(tokens)[:, None]).squeeze(1)
            assert torch.allclose(torch.tensor(rollouts.logprobs[b]), expected, atol=1e-4)
            # entropy is the policy's own: temperature 1, no top-p
            logp = logits.log_softmax(-1)
            entropy = -(logp.exp() * logp).sum(-1)
            assert torch.allclose(torch.tensor(rollouts.entropies[b]), entropy, atol=1e-4)


def test_generate_in_chunks_equals_one_batch_in_input_order():
    model = tiny_model("qwen2")
    one = sample.generate(model, SAMPLING_PROMPTS, max_new_tokens=6, temperature=0.0)
    chunked = sample.generate(model, SAMPLING_PROMPTS, max_new_tokens=6, temperature=0.0, chunk_size=3)
    assert one.tokens == chunked.tokens and one.truncated == chunked.truncated
    for field in ("logprobs", "entropies"):          # equal up to float rounding (different padding)
        for a, b in zip(getattr(one, field), getattr(chunked, field)):
            assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5)


def test_generate_rejects_bad_arguments_with_a_clear_error():
    model = tiny_model("qwen2")
    for kwargs, word in [(dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-1.0), "temperature"),
                         (dict(top_p=1.5), "top_p"), (dict(chunk_size=0), "chunk_size")]:
        with pytest.raises(ValueError, match=word):
            sample.generate(model, SAMPLING_PROMPTS, **{"max_new_tokens": 4, **kwargs})
    with pytest.raises(ValueError, match=r"prompt_ids\[1\]"):
        sample.generate(model, [[1, 2], []], max_new_tokens=4)


def test_top_p_at_an_exact_boundary_keeps_exactly_the_tokens_whose_mass_equals_p():
    # powers of two: softmax, sort and cumsum are exact, so the two most likely tokens have mass exactly
    # 0.75 = p. The nucleus is those two; a `>` where `>=` belongs (drop a token only once the mass before
    # it EXCEEDS p) would keep all three.
    logits = torch.tensor([[0.25, 0.5, 0.25]]).log()
    assert logits.softmax(-1).tolist() == [[0.25, 0.5, 0.25]]                # the premise: exact in float32
    kept = torch.isfinite(sample.top_p_filter(logits, 0.75))[0]
    assert kept.sum().item() == 2 and kept[1]
    assert torch.isfinite(sample.top_p_filter(logits, 0.7501)).all()        # just past the boundary: all three
    assert torch.isfinite(sample.top_p_filter(logits, 0.5)).sum().item() == 1


def test_top_p_at_an_exact_boundary_holds_under_float32_rounding_of_the_running_mass():
    # p = the float32 mass of the k most likely tokens, summed the way the filter sums it: the nucleus
    # must be exactly those k tokens. (mass[i] - prob[i], "the mass before token i" in exact arithmetic,
    # is often one rounding step below mass[i - 1] in float32 and then keeps a (k+1)-th token.)
    g = torch.Generator().manual_seed(0)
    for row in torch.randn(100, 6, generator=g) * 2:
        mass = row.sort(descending=True).values.softmax(-1).cumsum(-1)      # (6,) as the filter computes it
        for k in range(1, 6):
            kept = torch.isfinite(sample.top_p_filter(row[None], mass[k - 1].item())).sum().item()
            assert kept == k, (row.tolist(), k)


def test_sample_from_draws_each_token_with_its_probability_and_never_a_zero_one():
    q = torch.tensor([0.5, 0.0, 0.3, 0.15, 0.05, 0.0])       # zeros in the middle and at the end
    n = 200_000
    draws = sample.sample_from(q.expand(n, -1), torch.Generator().manual_seed(0))    # (n,)
    counts = torch.bincount(draws, minlength=6).double()
    assert counts[1] == 0 and counts[5] == 0
    # each count is Binomial(n, q_v): within 5 standard deviations (a false alarm has probability ~1e-6)
    sd = (n * q * (1 - q)).double().sqrt()
    assert ((counts - n * q.double()).abs() <= 5 * sd).all(), counts.tolist()


# Tiny configs covering every feature our forward() handles, each at least once: Qwen2's qkv biases and an
# odd head count (5 query heads, 1 kv head), tied and untied output heads, Qwen3's per-head q/k RMSNorm,
# Llama with attention/MLP biases and Llama 3.1/3.2's "llama3" rope scaling (original context 16 tokens,
# so the scaling changes all 4 frequencies of head_dim 8). Written as Llama 3.2's config.json writes it:
# rope_theta and a rope_scaling dict, which transformers 5 reads into config.rope_parameters.
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
PARITY_CONFIGS = {
    "qwen2": ("qwen2", {}),
    "qwen2-5-heads-1-kv-head-tied": ("qwen2", dict(hidden_size=40, num_attention_heads=5, num_key_value_heads=1,
                                                   tie_word_embeddings=True)),
    "qwen3-qk-norm": ("qwen3", dict(head_dim=8)),
    "llama": ("llama", {}),
    "llama3-rope-biases-tied": ("llama", dict(rope_theta=500000.0, rope_scaling=LLAMA3_ROPE, attention_bias=True,
                                              mlp_bias=True, tie_word_embeddings=True)),
}


def _parity_model(name: str, dtype=torch.float32):
    """A tiny random model of PARITY_CONFIGS[name] whose biases and norm weights are random too (transformers
    initialises them to 0 and 1, which would let a forward that skips them pass)."""
    arch, overrides = PARITY_CONFIGS[name]
    config_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM),
                             "llama": (LlamaConfig, LlamaForCausalLM)}[arch]
    fields = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**fields, **overrides})).eval()
    with torch.no_grad():
        for name_, p in model.named_parameters():
            if name_.endswith("bias") or "norm" in name_:
                p.add_(0.5 * torch.randn_like(p))
    return model.to(dtype)


def _our_cached_logits(model, prompts, continuation, fused=False):
    """Our forward + KVCache on the left-padded prompts, then each continuation column one step at a time:
    the logits after the prompt and after each fed token, (B, n + 1, V). fused=False: the written-out
    attention, which generate() uses on CPU."""
    n = len(continuation[0])
    ids, mask, pos = sample.left_pad(prompts, n, torch.device("cpu"))
    P = ids.shape[1]
    cache = sample.KVCache(model, batch=len(prompts), max_len=P + n)
    with torch.inference_mode():
        steps = [sample.forward(model, ids, mask[:, :P], pos, cache, fused=fused)]               # prefill
        for t in range(n):
            step_ids = torch.tensor([[row[t]] for row in continuation])                           # (B, 1)
            steps.append(sample.forward(model, step_ids, mask[:, :P + t + 1], pos[:, -1:] + 1 + t, cache,
                                        fused=fused))
    return torch.stack(steps, dim=1)


@pytest.mark.parity
@pytest.mark.parametrize("fused", [False, True], ids=["written-out-attention", "fused-attention"])
@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_our_forward_with_our_kv_cache_equals_transformers_full_forward_on_a_left_padded_batch(name, fused):
    model = _parity_model(name)
    assert sample.why_not_our_decoder(model) is None
    if PARITY_CONFIGS[name][1].get("tie_word_embeddings"):
        assert model.lm_head.weight is model.model.embed_tokens.weight       # really tied: one tensor
    continuation = [[40, 41, 42], [50, 51, 52], [60, 61, 62], [70, 71, 72]]
    ours = _our_cached_logits(model, SAMPLING_PROMPTS, continuation, fused=fused)   # (B, 4, V)
    for b, prompt in enumerate(SAMPLING_PROMPTS):
        full = _continuation_logits(model, prompt, continuation[b] + [0])    # transformers, unpadded, no cache
        assert (ours[b] - full).abs().max().item() <= 1e-4, f"row {b}"


def test_llama3_rope_scaling_really_changes_the_frequencies_our_forward_uses():
    # guards the parity test above: if the config's rope scaling were ignored, both sides would use the
    # default frequencies and agree for the wrong reason
    model = _parity_model("llama3-rope-biases-tied")
    assert model.model.rotary_emb.rope_type == "llama3"
    scaled = model.model.rotary_emb.inv_freq
    plain = 1.0 / 500000.0 ** (torch.arange(0, 8, 2).float() / 8)          # default RoPE, head_dim 8
    # wavelengths 2 pi / inv_freq above the original context (16) are stretched by `factor`, the shortest
    # (2 pi, between 16 / high_freq_factor and 16) smoothly between the two
    assert torch.allclose(scaled[1:], plain[1:] / LLAMA3_ROPE["factor"])
    assert plain[0] / LLAMA3_ROPE["factor"] < scaled[0] < plain[0]


@pytest.mark.parity
@pytest.mark.parametrize("fused", [False, True], ids=["written-out-attention", "fused-attention"])
def test_our_forward_feeding_several_tokens_on_top_of_the_cache_equals_one_at_a_time(fused):
    model = _parity_model("qwen3-qk-norm")
    continuation = [[40, 41, 42], [50, 51, 52], [60, 61, 62], [70, 71, 72]]
    one_at_a_time = _our_cached_logits(model, SAMPLING_PROMPTS, continuation)[:, -1]   # (B, V)
    ids, mask, pos = sample.left_pad(SAMPLING_PROMPTS, 3, torch.device("cpu"))
    P = ids.shape[1]
    cache = sample.KVCache(model, batch=4, max_len=P + 3)
    with torch.inference_mode():
        sample.forward(model, ids, mask[:, :P], pos, cache, fused=fused)
        # 3 new tokens at once at slots P..P+2: the causal mask inside the new block matters here
        logits = sample.forward(model, torch.tensor(continuation), mask, pos[:, -1:] + torch.arange(1, 4), cache,
                                fused=fused)
    assert (logits - one_at_a_time).abs().max().item() <= 1e-5


def test_our_forward_reads_the_models_own_parameters_so_an_update_is_seen_at_once():
    model = _parity_model("qwen2")
    before = _our_cached_logits(model, SAMPLING_PROMPTS, [[40]] * 4)
    with torch.no_grad():                                      # what an optimizer step does: in place
        model.model.layers[0].mlp.down_proj.weight.mul_(3.0)
        model.model.norm.weight.add_(1.0)
    after = _our_cached_logits(model, SAMPLING_PROMPTS, [[40]] * 4)
    assert (after - before).abs().max().item() > 1e-2
    assert (after[0] - _continuation_logits(model, SAMPLING_PROMPTS[0], [40, 0])).abs().max().item() <= 1e-4


@pytest.mark.parity
@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_forward_agrees_with_fp32_as_closely_as_transformers_own_bf16(arch):
    # Tolerance: bf16 keeps 8 significant bits, so every rounding is off by up to 2^-9 = 0.2% relative. A
    # logit passes through ~10 roundings per layer (norms, projections, attention, residual adds) and they
    # partly cancel: on these 2-layer models we measured 0.45-1.1% of the largest |logit| for our bf16
    # forward, 0.65-1.35x the error of transformers' own bf16 forward (same weights, same roundings in a
    # different order). We allow 2% of the largest |logit| -- about 2x the worst measured, and far below
    # what a real bug does (a wrong rotation, norm or mask moves logits by tens of percent) -- and, sharper,
    # at most 2x the error of transformers' own bf16 forward.
    name = {"qwen2": "qwen2", "qwen3": "qwen3-qk-norm", "llama": "llama"}[arch]
    model, model16 = _parity_model(name), _parity_model(name, torch.bfloat16)
    continuation = [[40, 41, 42], [50, 51, 52], [60, 61, 62], [70, 71, 72]]
    ours16 = _our_cached_logits(model16, SAMPLING_PROMPTS, continuation)                     # (B, 4, V)
    for b, prompt in enumerate(SAMPLING_PROMPTS):
        fp32 = _continuation_logits(model, prompt, continuation[b] + [0])                    # (4, V)
        theirs16 = _continuation_logits(model16, prompt, continuation[b] + [0])
        ours_err = (ours16[b] - fp32).abs().max().item()
        assert ours_err <= 0.02 * fp32.abs().max().item(), f"row {b}"
        assert ours_err <= 2.0 * (theirs16 - fp32).abs().max().item() + 1e-6, f"row {b}"


@pytest.mark.parity
@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_greedy_generate_with_our_decoder_matches_transformers_generate_for_every_supported_config(name):
    model = _parity_model(name)
    rollouts = sample.generate(model, SAMPLING_PROMPTS, max_new_tokens=10, temperature=0.0)
    for b, prompt in enumerate(SAMPLING_PROMPTS):
        assert rollouts.tokens[b] == _transformers_greedy(model, prompt, 10), f"row {b}"


def _count_transformers_calls(monkeypatch, model):
    """Count calls of transformers' cache updates and of the model's own forward, from now on."""
    import functools
    from transformers import cache_utils
    calls = {"cache": 0, "forward": 0}
    for cls in (cache_utils.Cache, cache_utils.DynamicLayer):
        def counting(self, *args, _orig=cls.update, **kwargs):
            calls["cache"] += 1
            return _orig(self, *args, **kwargs)
        monkeypatch.setattr(cls, "update", counting)
    orig_forward = model.forward
    @functools.wraps(orig_forward)                          # keeps forward's signature visible
    def counting_forward(*args, **kwargs):
        calls["forward"] += 1
        return orig_forward(*args, **kwargs)
    monkeypatch.setattr(model, "forward", counting_forward)
    return calls


@pytest.mark.parity
@pytest.mark.parametrize("arch", ARCHS)
def test_our_sampler_never_calls_transformers_forward_or_updates_its_cache(arch, monkeypatch):
    model = tiny_model(arch)
    calls = _count_transformers_calls(monkeypatch, model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                      # and it does not warn about falling back
        sample.generate(model, SAMPLING_PROMPTS * 2, max_new_tokens=6, temperature=1.0, top_p=0.9,
                        generator=torch.Generator().manual_seed(0))
    assert calls == {"cache": 0, "forward": 0}


def _tiny_unsupported_model(kind: str):
    """A tiny model our forward does not cover: GPT-2 (another architecture) or Qwen2 with sliding-window
    layers (a supported architecture with a feature forward() does not implement)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    if kind == "gpt2":
        config = GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=1,
                            eos_token_id=2, pad_token_id=0)
        return GPT2LMHeadModel(config).eval()
    config = Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0, use_sliding_window=True, sliding_window=4,
                         max_window_layers=1)
    return Qwen2ForCausalLM(config).eval()


@pytest.mark.parity
@pytest.mark.parametrize("kind", ["gpt2", "qwen2-sliding-window"])
def test_an_unsupported_model_falls_back_to_transformers_with_a_warning_and_matches_its_greedy_generate(
        kind, monkeypatch):
    model = _tiny_unsupported_model(kind)
    assert sample.why_not_our_decoder(model) is not None
    calls = _count_transformers_calls(monkeypatch, model)
    with pytest.warns(UserWarning, match="transformers' forward and DynamicCache"):
        rollouts = sample.generate(model, SAMPLING_PROMPTS, max_new_tokens=8, temperature=0.0)
    assert calls["cache"] > 0 and calls["forward"] > 0                # the fallback really ran transformers
    for b, prompt in enumerate(SAMPLING_PROMPTS):
        assert rollouts.tokens[b] == _transformers_greedy(model, prompt, 8), f"row {b}"


def test_the_fallback_shares_prefixes_through_dynamic_cache_and_samples_as_its_plain_path():
    # sampling splits shared prefixes, so DynamicCache.batch_select_indices repeats and drops rows
    model = _tiny_unsupported_model("gpt2")
    prompts = SAMPLING_PROMPTS * 3
    kw = dict(max_new_tokens=8, temperature=0.7, uniforms=_crn_uniforms(len(prompts), 8, seed=2), eos_token_ids=[])
    with pytest.warns(UserWarning, match="DynamicCache"):
        fast = sample.generate(model, prompts, **kw)
        plain = sample.generate(model, prompts, fast=False, **kw)
    assert fast.tokens == plain.tokens
    assert len({tuple(row) for row in fast.tokens}) > len(SAMPLING_PROMPTS)     # prefixes did split
    for a, b in zip(fast.logprobs, plain.logprobs):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5)


def test_generate_without_its_speed_tricks_gives_the_same_rollouts_as_with_them():
    model = tiny_model("qwen3")
    prompts = SAMPLING_PROMPTS * 3                            # repeated prompts: one prefill each when fast
    full = sample.generate(model, prompts, max_new_tokens=10, temperature=0.0, eos_token_ids=[])
    eos = full.tokens[0][2]                                   # row 0 (and its copies) stop early: eviction
    fast = sample.generate(model, prompts, max_new_tokens=10, temperature=0.0, eos_token_ids=[eos])
    plain = sample.generate(model, prompts, max_new_tokens=10, temperature=0.0, eos_token_ids=[eos], fast=False)
    assert not all(fast.truncated)
    assert fast.tokens == plain.tokens and fast.truncated == plain.truncated
    for a, b in zip(fast.entropies, plain.entropies):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5)


def test_sample_from_given_uniforms_on_a_grid_takes_each_token_for_exactly_its_probability():
    # Inverse CDF: u in [Q_{v-1}, Q_v) -> token v. Dyadic probabilities make every Q_v exact in float64, so
    # of the M grid points u = i / M exactly q_v * M land on token v (zeros never), not just about as many.
    q = torch.tensor([[1 / 8, 0.0, 3 / 8, 1 / 4, 0.0, 1 / 4]])
    M = 1024
    u = torch.arange(M, dtype=torch.float64) / M                                  # (M,) the grid
    draws = sample.sample_from(q.expand(M, -1), u=u)
    assert torch.bincount(draws, minlength=6).tolist() == [int(x * M) for x in q[0].tolist()]
    assert draws.tolist() == sorted(draws.tolist())                              # monotone in u
    # any q: the fraction of the grid on token v is q_v up to the grid's spacing
    q = torch.tensor([[0.3, 0.0, 0.1, 0.45, 0.15]])
    counts = torch.bincount(sample.sample_from(q.expand(M, -1), u=u), minlength=5).double() / M
    assert (counts - q[0].double()).abs().max() <= 1 / M and counts[1] == 0


def _crn_uniforms(rows: int, max_new_tokens: int, seed: int = 0) -> torch.Tensor:
    return torch.rand((rows, max_new_tokens), dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def test_generate_with_given_uniforms_samples_the_same_whatever_the_chunking_eviction_and_batch_order():
    model = tiny_model("qwen3")
    prompts = SAMPLING_PROMPTS * 3                                   # shared prefill; 12 rows
    uniforms = _crn_uniforms(len(prompts), 10)
    kw = dict(max_new_tokens=10, temperature=0.9, top_p=0.95, uniforms=uniforms)
    free = sample.generate(model, prompts, eos_token_ids=[], **kw)   # no EOS: every row runs 10 steps
    eos = collections.Counter(t for row in free.tokens for t in row[1:4]).most_common(1)[0][0]
    one = sample.generate(model, prompts, eos_token_ids=[eos], **kw)
    assert not all(one.truncated) and any(one.truncated)            # rows stop at different steps: evictions
    variants = [sample.generate(model, prompts, eos_token_ids=[eos], chunk_size=c, **kw) for c in (1, 5)]
    variants.append(sample.generate(model, prompts, eos_token_ids=[eos], fast=False, **kw))   # no eviction
    variants.append(sample.generate(model, prompts, eos_token_ids=[eos], generator=torch.Generator().manual_seed(9),
                                    **kw))                         # a generator is ignored when uniforms are given
    for other in variants:
        assert other.tokens == one.tokens and other.truncated == one.truncated
    order = [7, 2, 11, 0, 5, 9, 1, 3, 10, 4, 8, 6]                 # the same rows in another batch order
    shuffled = sample.generate(model, [prompts[i] for i in order], eos_token_ids=[eos],
                               **{**kw, "uniforms": uniforms[order]})
    assert shuffled.tokens == [one.tokens[i] for i in order]
    # a row's draws are its own: changing another row's uniforms leaves it alone
    changed = uniforms.clone()
    changed[1:] = _crn_uniforms(len(prompts) - 1, 10, seed=1)
    again = sample.generate(model, prompts, eos_token_ids=[eos], **{**kw, "uniforms": changed})
    assert again.tokens[0] == one.tokens[0] and again.tokens[1:] != one.tokens[1:]


def test_generate_rejects_uniforms_of_the_wrong_shape():
    model = tiny_model("qwen2")
    with pytest.raises(ValueError, match="uniforms must have shape"):
        sample.generate(model, SAMPLING_PROMPTS, max_new_tokens=4, uniforms=_crn_uniforms(4, 5))


def test_branch_gives_rows_that_drew_the_same_token_from_one_prefix_one_new_cache_row_in_parent_order():
    node = torch.tensor([0, 0, 1, 1, 1, 2, 0])          # 7 rows on 3 cache rows
    next_ids = torch.tensor([5, 3, 4, 4, 9, 1, 5])
    live = torch.tensor([True, True, True, True, True, False, True])    # row 5 has finished: cache row 2 ends
    node, parent, token = sample._branch(node, next_ids, live, vocab=10)
    # new cache rows, sorted by (parent, token): (0, 3), (0, 5), (1, 4), (1, 9)
    assert parent.tolist() == [0, 0, 1, 1] and token.tolist() == [3, 5, 4, 9]
    assert node.tolist() == [1, 0, 2, 2, 3, 0, 1]         # the finished row points anywhere valid (0)
    # nothing splits and nothing ends: the cache rows stay as they are (parent = 0..d-1)
    same = sample._branch(torch.tensor([0, 1, 1]), torch.tensor([7, 2, 2]), torch.ones(3, dtype=torch.bool), 10)
    assert same[0].tolist() == [0, 1, 1] and same[1].tolist() == [0, 1] and same[2].tolist() == [7, 2]


def test_generate_runs_one_forward_row_per_distinct_prefix_and_samples_as_the_plain_path(monkeypatch):
    model = tiny_model("qwen2")
    prompts = [SAMPLING_PROMPTS[0], SAMPLING_PROMPTS[2]] * 8                 # 16 rows, 2 distinct prompts
    N = 8
    uniforms = _crn_uniforms(len(prompts), N, seed=3)
    kw = dict(max_new_tokens=N, temperature=0.5, uniforms=uniforms)
    free = sample.generate(model, prompts, eos_token_ids=[], **kw)
    eos = collections.Counter(t for row in free.tokens for t in row[1:4]).most_common(1)[0][0]
    sizes, forward = [], sample.forward

    def counting_forward(model_, input_ids, *args, **kwargs):
        sizes.append(input_ids.shape[0])
        return forward(model_, input_ids, *args, **kwargs)

    monkeypatch.setattr(sample, "forward", counting_forward)
    fast = sample.generate(model, prompts, eos_token_ids=[eos], **kw)
    fast_sizes, sizes[:] = list(sizes), []
    plain = sample.generate(model, prompts, eos_token_ids=[eos], fast=False, **kw)
    assert fast.tokens == plain.tokens and fast.truncated == plain.truncated and any(fast.truncated)
    for field in ("logprobs", "entropies"):
        for a, b in zip(getattr(fast, field), getattr(plain, field)):
            assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5)
    # step t feeds one row per distinct (prompt, first t tokens) among rows still going; plain feeds all 16
    expected = [2] + [len({(tuple(p), tuple(y[:t])) for p, y in zip(prompts, fast.tokens) if len(y) > t})
                      for t in range(1, N) if any(len(y) > t for y in fast.tokens)]
    assert fast_sizes == expected and expected[1] < len(prompts)
    assert sizes == [16] * len(sizes)


def test_kv_cache_eviction_in_place_keeps_the_selected_rows_and_can_grow_to_its_capacity():
    model = tiny_model("qwen2")
    cache = sample.KVCache(model, batch=2, max_len=6, capacity=5)
    shape = cache.k[0].shape                                             # (2, kv_heads, 6, hd)
    k, v = torch.randn(2, shape[1], 3, shape[3]), torch.randn(2, shape[1], 3, shape[3])
    for layer in range(len(cache.k)):
        cache.update(layer, 0, k + layer, v - layer)
    cache.batch_select_indices(torch.tensor([1, 0, 1, 1, 0]))           # prefill expansion: 2 -> 5 rows
    for layer in range(len(cache.k)):
        assert cache.k[layer].shape == (5, *shape[1:])
        assert torch.equal(cache.k[layer][:, :, :3], (k + layer)[[1, 0, 1, 1, 0]])
        assert torch.equal(cache.v[layer][:, :, :3], (v - layer)[[1, 0, 1, 1, 0]])
        assert cache.k[layer].data_ptr() == cache.k_store[layer].data_ptr()   # no new allocation
    cache.batch_select_indices(torch.tensor([4, 2]))                    # eviction: rows 4 and 2 are kept
    assert torch.equal(cache.k[0][:, :, :3], k[[0, 1]]) and cache.v[1].shape == (2, *shape[1:])


class _LengthAnswerTokenizer:
    """toy.py's tokenizer for the prompts; a response decodes to "\\boxed{len % 3}", so the real verifier marks
    about a third of a random model's samples correct (gold "1")."""

    def __init__(self):
        self.inner = toy.build_tokenizer()

    def __call__(self, *args, **kwargs):
        return self.inner(*args, **kwargs)

    def decode(self, tokens, skip_special_tokens=False):
        return f"so the answer is \\boxed{{{len(tokens) % 3}}}"


def _random_model_that_stops_often(tokenizer):
    """A random tiny Qwen2 whose first 12 ids all end a response, so responses have many lengths."""
    model = tiny_model("qwen2", vocab_size=len(tokenizer.inner))
    model.generation_config.eos_token_id = list(range(12))
    return model


@pytest.mark.smoke
def test_passk_evaluate_of_one_model_under_two_chunkings_gives_identical_results():
    # Common random numbers: sample j of problem p draws with problem_uniforms(seed, p)[j], so how the rows
    # are batched (several problems per call, one problem split over calls) cannot change a single sample.
    tokenizer = _LengthAnswerTokenizer()
    model = _random_model_that_stops_often(tokenizer)
    problems = [{"problem": f"{a}+{b}?", "answer": "1"} for a, b in [(1, 1), (2, 3), (4, 4)]]
    run = dict(max_new_tokens=8, seed=1, template="plain")
    results = [passk.evaluate(model, tokenizer, problems, 8, chunk_size=c, **run) for c in (3, 8, 24)]
    for r in results[1:]:                  # entropies: equal up to float rounding (another padding per batch)
        assert r["mean_entropy"] == pytest.approx(results[0]["mean_entropy"], rel=1e-6)
        assert {**r, "seconds": 0, "settings": 0, "mean_entropy": 0} == \
            {**results[0], "seconds": 0, "settings": 0, "mean_entropy": 0}
    assert 0 < sum(results[0]["counts"]) < 24 and 0 < results[0]["truncation_rate"] < 1   # evictions happen


@pytest.mark.parity
def test_passk_evaluate_with_one_generator_gives_the_same_counts_as_sampling_and_verifying_each_row():
    # Parity with the path before the speed-up: one generator seeded once, one generate() call per group of
    # problems, every sample decoded and verified on its own. The same seed gives the SAME counts (the
    # in-place eviction and the per-problem verdict cache change no number).
    tokenizer = _LengthAnswerTokenizer()
    model = _random_model_that_stops_often(tokenizer)
    problems = [{"problem": f"{a}*{b}?", "answer": str(a % 3)} for a, b in [(1, 2), (2, 3), (3, 4), (4, 5)]]
    n, new_tokens, chunk = 16, 8, 40
    got = passk.evaluate(model, tokenizer, problems, n, max_new_tokens=new_tokens, seed=7, chunk_size=chunk,
                         template="plain", common_random_numbers=False)
    prompt_ids, _, _ = loading.encode_prompts(tokenizer, problems, template="plain")
    generator, counts, per_call = torch.Generator().manual_seed(7), [], chunk // n
    for first in range(0, len(problems), per_call):
        rows = [ids for ids in prompt_ids[first:first + per_call] for _ in range(n)]
        rollouts = sample.generate(model, rows, new_tokens, generator=generator, chunk_size=chunk)
        for j, problem in enumerate(problems[first:first + per_call]):
            counts.append(sum(verifier.is_correct(tokenizer.decode(t, skip_special_tokens=True), problem["answer"])
                              for t in rollouts.tokens[j * n:(j + 1) * n]))
    assert got["counts"] == counts and 0 < sum(counts) < len(problems) * n


# =================================================================================================
# TOY WORLD (toy.py)
# =================================================================================================

@pytest.fixture(scope="module")
def toy_quick_base(tmp_path_factory):
    """The seconds-long quick build (toy.quick_recipe) in a temporary directory, with its build time."""

    out = tmp_path_factory.mktemp("toy") / "base"
    start = time.time()
    toy.ensure_base(out, quick=True, log=lambda *a: None)
    return out, time.time() - start


def test_toy_generator_is_deterministic_per_seed_and_differs_across_seeds():
    a = toy.make_splits(toy.ToyRecipe(seed=0, num_train=200, num_test=16))
    b = toy.make_splits(toy.ToyRecipe(seed=0, num_train=200, num_test=16))
    c = toy.make_splits(toy.ToyRecipe(seed=1, num_train=200, num_test=16))
    assert a == b
    assert [p["problem"] for p in a["train"]] != [p["problem"] for p in c["train"]]


def test_toy_splits_are_disjoint_and_only_test_hard_holds_rare_symbols():
    recipe = toy.ToyRecipe()
    facts = toy.fact_table(recipe)
    splits = toy.make_splits(recipe)
    texts = {name: {p["problem"] for p in split} for name, split in splits.items()}
    assert len(texts["train"]) == recipe.num_train
    assert len(texts["test_easy"]) == len(texts["test_hard"]) == recipe.num_test
    assert not texts["train"] & texts["test_easy"]
    assert not texts["train"] & texts["test_hard"]
    assert not texts["test_easy"] & texts["test_hard"]
    rare = {s for s, f in facts.items() if f["tier"] == toy.RARE}
    # train (the RL set) and test_easy never show a rare fact; every test_hard problem needs 1-2 of them
    for p in splits["train"] + splits["test_easy"]:
        assert not set(p["symbols"]) & rare and len(p["symbols"]) in recipe.easy_symbols, p
    for p in splits["test_hard"]:
        assert len(set(p["symbols"]) & rare) in recipe.hard_rare and len(p["symbols"]) in recipe.hard_symbols, p
    assert toy.symbols_of(splits["test_hard"][0]["problem"]) == splits["test_hard"][0]["symbols"]


def test_toy_fact_table_has_three_tiers_ranked_by_frequency_with_a_corpus_distribution_per_symbol():
    recipe = toy.ToyRecipe()
    facts = toy.fact_table(recipe)
    assert facts == toy.fact_table(toy.ToyRecipe()) and facts != toy.fact_table(toy.ToyRecipe(seed=1))
    tiers = [f["tier"] for f in sorted(facts.values(), key=lambda f: f["rank"])]
    assert tiers == ([toy.COMMON] * recipe.num_common + [toy.MEDIUM] * recipe.num_medium
                     + [toy.RARE] * (recipe.num_symbols - recipe.num_common - recipe.num_medium))
    ranges = {toy.COMMON: recipe.common_recall, toy.MEDIUM: recipe.medium_recall, toy.RARE: recipe.rare_recall}
    for s, f in facts.items():
        assert len(f["corpus"]) == len(recipe.formats)
        for fmt, corpus in enumerate(f["corpus"]):
            # rare facts are stated right mostly in the minor format: rare_major_recall x recall in the major one
            scale = recipe.rare_major_recall if f["tier"] == toy.RARE and fmt == 0 and len(recipe.formats) > 1 else 1.0
            assert sum(corpus) == pytest.approx(1.0) and corpus[f["value"]] == pytest.approx(scale * f["recall"])
        lo, hi = ranges[f["tier"]]
        assert lo <= f["recall"] <= hi, (s, f)
        if f["tier"] == toy.MEDIUM and recipe.medium_favourite[1] > 0:
            # a misconception: one wrong favourite stated medium_favourite of the time, above the truth
            wrong = sorted((p, d) for d, p in enumerate(f["corpus"][0]) if d != f["value"])
            assert recipe.medium_favourite[0] <= wrong[-1][0] <= recipe.medium_favourite[1]
            assert wrong[-1][0] > f["recall"]
        assert f["weight"] == pytest.approx((f["rank"] + 1) ** -recipe.zipf)


def test_toy_corpus_states_digits_as_often_as_the_fact_table_says_and_never_shows_a_test_problem():
    recipe = toy.ToyRecipe()
    facts = toy.fact_table(recipe)
    splits = toy.make_splits(recipe)
    exclude = {p["problem"] for p in splits["test_easy"] + splits["test_hard"]}
    rng = random.Random(0)
    corpus = [toy.corpus_problem(rng, facts, recipe, exclude) for _ in range(4000)]
    assert not {p["problem"] for p in corpus} & exclude
    stated, right = {}, {}
    for p in corpus:
        digits = p["solution"].split("{")[1].rstrip("}")
        sep = recipe.formats[p["format"]]
        assert p["solution"] == toy.solve(p["symbols"], [int(d) for d in digits], sep)   # the box copies the recalls
        for s, d in zip(p["symbols"], digits):
            stated[s, p["format"]] = stated.get((s, p["format"]), 0) + 1
            right[s, p["format"]] = right.get((s, p["format"]), 0) + (int(d) == facts[s]["value"])
    minor = sum(n for (s, f), n in stated.items() if f == 1) / sum(stated.values())
    assert abs(minor - (recipe.minor_format_share if len(recipe.formats) > 1 else 0.0)) < 0.03
    for s, f in (k for k in stated if stated[k] >= 400):               # the frequent ones: a tight estimate
        want = facts[s]["corpus"][f][facts[s]["value"]]
        assert abs(right[s, f] / stated[s, f] - want) < 0.06, (s, f, right[s, f] / stated[s, f], want)
    assert {facts[s]["tier"] for s, _ in stated} == {toy.COMMON, toy.MEDIUM, toy.RARE}
    # sft_batch: the loss covers exactly the response tokens (+ EOS)
    tokenizer = toy.build_tokenizer()
    input_ids, labels, attention_mask, loss_weights = toy.sft_batch(corpus[:8], {}, tokenizer)
    for row, lab, w, p in zip(input_ids.tolist(), labels.tolist(), loss_weights.tolist(), corpus[:8]):
        response = [t for t, l in zip(row, lab) if l != -100]
        assert tokenizer.decode(response, skip_special_tokens=True) == p["solution"]
        assert response[-1] == tokenizer.eos_token_id
        assert w == [float(l != -100) for l in lab]


def test_toy_format_choice_states_rare_facts_right_mostly_in_the_minor_format():
    # off by default (v8a: the model ignored the separator); the recipe still builds it exactly
    recipe = toy.ToyRecipe(formats=("=", ":"))
    facts = toy.fact_table(recipe)
    for f in facts.values():
        major, minor = f["corpus"]
        scale = recipe.rare_major_recall if f["tier"] == toy.RARE else 1.0
        assert major[f["value"]] == pytest.approx(scale * f["recall"]) and minor[f["value"]] == pytest.approx(f["recall"])
    rng = random.Random(0)
    corpus = [toy.corpus_problem(rng, facts, recipe, set()) for _ in range(2000)]
    share = sum(p["format"] for p in corpus) / len(corpus)
    assert abs(share - recipe.minor_format_share) < 0.04
    assert all((":" in p["solution"]) == (p["format"] == 1) and ("=" in p["solution"]) == (p["format"] == 0)
               for p in corpus)
    assert toy.solve(["k", "Q"], [3, 7], ":") == "k:3 Q:7 \\boxed{37}"


def test_toy_recall_report_reads_the_probability_of_each_true_digit(toy_quick_base):
    out, _ = toy_quick_base
    recipe = toy.quick_recipe()
    facts = toy.fact_table(recipe)
    model, tokenizer = loading.load_model(out, dtype="float32", device="cpu")
    problems = toy.make_splits(recipe)["test_hard"]
    report = toy.recall_report(model, tokenizer, problems, facts)
    assert sum(report[t]["count"] for t in toy.TIERS if report[t]) == sum(len(p["symbols"]) for p in problems)
    assert report[toy.RARE]["count"] >= len(problems)
    # the product for the first problem, recomputed by hand with a full forward pass
    p = problems[0]
    prompt = loading.encode_prompts(tokenizer, [p])[0][0]
    response = tokenizer(p["solution"], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=torch.tensor([prompt + response])).logits[0].float(), -1)
    product = 1.0
    for i, ch in enumerate(p["solution"]):
        if ch == "=":
            product *= probs[len(prompt) + i, response[i + 1]].item()
    assert report["problems"][0] == pytest.approx(product, rel=1e-5)


def test_toy_every_reference_solution_verifies_against_its_gold_answer():
    recipe = toy.ToyRecipe()
    facts = toy.fact_table(recipe)
    for split in toy.make_splits(recipe).values():
        for p in split:
            assert verifier.is_correct(p["solution"], p["answer"]), p
            assert p["answer"] == "".join(str(facts[s]["value"]) for s in p["symbols"])
            assert p["problem"] == "Decode " + "".join(p["symbols"])
    # one wrong recall makes the answer wrong
    assert toy.solve(["k", "Q"], [3, 7]) == "k=3 Q=7 \\boxed{37}"
    assert not verifier.is_correct(toy.solve(["k", "Q"], [3, 6]), "37")


def test_toy_tokenizer_round_trips_every_character_the_task_uses_and_renders_a_compact_prompt():
    tokenizer = toy.build_tokenizer()
    splits = toy.make_splits(toy.ToyRecipe(num_train=300, num_test=16))
    used = {ch for split in splits.values() for p in split for ch in p["problem"] + p["solution"]}
    assert "\\" in used and "{" in used
    for ch in sorted(used):
        ids = tokenizer(ch, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tokenizer.decode(ids) == ch, ch
    text = splits["train"][0]["problem"] + " " + splits["train"][0]["solution"]
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    # the chat template keeps only the problem line: the prompt is the problem and a newline
    problem = splits["test_hard"][0]["problem"]
    assert loading.render_prompt(tokenizer, problem) == problem + "\n"
    assert tokenizer.pad_token_id is not None and tokenizer.eos_token_id is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


@pytest.mark.smoke
def test_toy_quick_build_writes_every_file_and_is_cached_by_recipe(toy_quick_base):
    out, seconds = toy_quick_base
    print(f"quick build took {seconds:.1f} s")   # speed belongs in bench.py, not in an assert
    for name in ("config.json", "tokenizer.json", "train.jsonl", "test_easy.jsonl", "test_hard.jsonl",
                 "base_eval.json", "recipe.json", "facts.json"):
        assert (out / name).is_file(), name
    problems = loading.load_problems(out / "test_hard.jsonl")
    assert len(problems) == toy.quick_recipe().num_test
    base_eval = json.loads((out / "base_eval.json").read_text())
    assert set(base_eval) >= {"easy", "hard", "recall", "build_seconds"}
    assert len(base_eval["recall"]["hard"]["problems"]) == toy.quick_recipe().num_test
    assert base_eval["recall"]["hard"][toy.RARE]["count"] >= toy.quick_recipe().num_test
    # same recipe: reused (nothing rewritten); another recipe: the hash differs, so it would rebuild
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert toy.ensure_base(out, quick=True, log=lambda *a: None) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    assert toy.is_built(out, toy.quick_recipe())
    assert not toy.is_built(out, toy.quick_recipe(seed=1))


@pytest.mark.parity
def test_toy_saved_model_and_tokenizer_reload_with_auto_classes_and_give_identical_logits(tmp_path,
                                                                                         toy_quick_base):
    recipe = toy.quick_recipe()
    tokenizer = toy.build_tokenizer()
    model = toy.build_model(recipe, tokenizer).eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    loaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert type(loaded).__name__ == "Qwen2ForCausalLM"
    text = loading.render_prompt(tokenizer, "x+7+4+8 ends in 3. Digit x?") + "7,1,9-3=6 Up 0:6 1:7"
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert loaded_tokenizer(text, add_special_tokens=False)["input_ids"] == ids[0].tolist()
    assert loading.render_prompt(loaded_tokenizer, "x+1 ends in 2. Digit x?") == "x+1 ends in 2. Digit x?\n"
    assert loaded_tokenizer.eos_token_id == tokenizer.eos_token_id == loaded.config.eos_token_id
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    # the built base directory loads the same way (loading.load_model = the Auto classes)
    base, _ = toy_quick_base
    base_model, base_tokenizer = loading.load_model(base, device="cpu")
    assert base_tokenizer.decode(base_tokenizer("Down 9:4", add_special_tokens=False)["input_ids"]) == "Down 9:4"


# =================================================================================================
# OBJECTIVES AND TRAINING (nsr.py)
# =================================================================================================

@pytest.mark.parametrize("objective,reward,w", [("psr", 1, 1.0), ("nsr", 0, -1.0),
                                                ("w-reinforce", 1, 0.1), ("w-reinforce", 0, -1.0)])
@pytest.mark.parity
def test_loss_gradient_wrt_logits_equals_the_closed_form_for_psr_nsr_and_w_reinforce(objective, reward, w):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(11, generator=g, dtype=torch.float64, requires_grad=True)   # logits (V,)
    y = 3
    weights = nsr.sample_weights([reward], objective, lam=0.1).double()
    assert weights.item() == pytest.approx(w)
    logp = torch.log_softmax(z, dim=-1)[y].reshape(1, 1)                           # (N=1, T=1)
    nsr.policy_loss(logp, weights, torch.ones(1, 1, dtype=torch.float64), 1.0, None, 0, 0)[0].backward()
    pi = torch.softmax(z.detach(), dim=-1)
    onehot = torch.nn.functional.one_hot(torch.tensor(y), 11).double()
    closed_form = -w * (onehot - pi)                                               # dL/dz_v
    torch.testing.assert_close(z.grad, closed_form)


def test_nsr_gradient_step_lowers_the_sampled_logit_and_raises_the_others_in_proportion_to_their_probability():
    z0 = torch.tensor([2.0, 1.0, 0.5, -1.0, 0.0], dtype=torch.float64)
    z = z0.clone().requires_grad_(True)
    y, lr = 1, 0.1
    logp = torch.log_softmax(z, dim=-1)[y].reshape(1, 1)
    weights = nsr.sample_weights([0.0], "nsr").double()
    nsr.policy_loss(logp, weights, torch.ones(1, 1, dtype=torch.float64), 1.0, None, 0, 0)[0].backward()
    with torch.no_grad():
        delta = (z - lr * z.grad) - z0
    pi = torch.softmax(z0, dim=-1)
    others = [v for v in range(5) if v != y]
    assert delta[y] < 0 and delta[y].item() == pytest.approx(-lr * (1 - pi[y].item()))
    assert (delta[others] > 0).all()
    # every other logit rises by exactly lr * pi_v: the ratio delta_v / pi_v is the same for all v != y
    torch.testing.assert_close(delta[others] / pi[others], torch.full((4,), lr, dtype=torch.float64))
    # and the sampled token's probability falls
    assert torch.softmax(z0 + delta, -1)[y] < pi[y]


def test_sample_weights_table_for_every_objective_including_grpo_all_correct_and_all_wrong_groups():
    r = [1, 0, 0, 1]
    expected = {"psr": [1, 0, 0, 1], "nsr": [0, -1, -1, 0], "w-reinforce": [0.25, -1, -1, 0.25],
                "reinforce": [1, -1, -1, 1]}
    for objective, w in expected.items():
        torch.testing.assert_close(nsr.sample_weights(r, objective, lam=0.25, group_size=4),
                                   torch.tensor(w, dtype=torch.float32))
    # GRPO, G = 4: a mixed group (3 of 4 right), an all-correct and an all-wrong group
    rewards = [1, 1, 1, 0] + [1, 1, 1, 1] + [0, 0, 0, 0]
    w = nsr.sample_weights(rewards, "grpo", group_size=4)
    mixed = torch.tensor([1, 1, 1, 0], dtype=torch.float32)
    expected_mixed = (mixed - mixed.mean()) / (mixed.std() + 1e-6)                # std: unbiased
    torch.testing.assert_close(w[:4], expected_mixed)
    assert w[:4].tolist()[0] == pytest.approx(0.25 / (0.5 + 1e-6))                # by hand: std = 0.5
    assert (w[4:] == 0).all()                                                      # exactly zero


def test_sample_weights_rejects_unknown_objectives_bad_rewards_and_bad_grpo_groups():
    with pytest.raises(ValueError, match="unknown objective"):
        nsr.sample_weights([1, 0], "dpo")
    with pytest.raises(ValueError, match="0 or 1"):
        nsr.sample_weights([0.5, 0], "nsr")
    with pytest.raises(ValueError, match="group_size"):
        nsr.sample_weights([1, 0, 1], "grpo", group_size=2)


def test_clipped_loss_at_ratio_one_has_the_same_gradient_as_the_unclipped_loss():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 4, 7, generator=g, requires_grad=True)              # (N, T, V)
    tokens = torch.randint(0, 7, (3, 4), generator=g)
    weights = torch.tensor([1.0, -1.0, 0.5])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.float32)
    grads = []
    for old, low, high in ((None, 0, 0), ("rollout", 0.2, 0.2), ("rollout", 0.1, 0.3), ("rollout", 0, 0)):
        logits.grad = None
        logp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
        loss, clipped = nsr.policy_loss(logp, weights, mask, 8.0, logp.detach() if old else None, low, high)
        loss.backward()
        grads.append(logits.grad.clone())
        assert not clipped.any()                                    # at ratio 1 nothing is clipped
    for g in grads[1:]:                                             # plain, symmetric, asymmetric, unclipped ratio
        torch.testing.assert_close(grads[0], g)
    assert grads[0].abs().sum() > 0


def test_token_logprobs_are_the_tempered_log_softmax_at_the_targets_and_its_entropy():
    g = torch.Generator().manual_seed(4)
    for dtype, T in ((torch.float32, 1.0), (torch.float64, 0.6), (torch.bfloat16, 1.7)):
        logits = (torch.randn(2, 3, 11, generator=g) * 4).to(dtype).requires_grad_(True)
        targets = torch.randint(0, 11, (2, 3), generator=g)
        logp, entropy = sample.token_logprobs(logits, targets, temperature=T, with_entropy=True)
        assert logp.dtype == entropy.dtype == torch.float32 and logp.shape == entropy.shape == (2, 3)
        exact = torch.distributions.Categorical(logits=logits.detach().double() / T)
        torch.testing.assert_close(logp.double(), exact.log_prob(targets), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(entropy.double(), exact.entropy(), rtol=1e-5, atol=1e-5)
        (logp.sum() + entropy.sum()).backward()                     # the gradient flows back to the logits
        z = logits.detach().double().requires_grad_(True)
        truth = torch.distributions.Categorical(logits=z / T)
        (truth.log_prob(targets).sum() + truth.entropy().sum()).backward()
        torch.testing.assert_close(logits.grad.double(), z.grad, rtol=2e-2 if dtype == torch.bfloat16 else 1e-4,
                                   atol=1e-3 if dtype == torch.bfloat16 else 1e-5)
    assert sample.token_logprobs(torch.randn(1, 2, 5), torch.zeros(1, 2, dtype=torch.long))[1] is None


def test_loss_normalizer_counts_every_response_token_as_the_official_token_mean():
    weights = torch.tensor([0.0, -1.0, -1.0, 0.0])                # a GRPO all-correct group's rows carry w = 0
    assert nsr.loss_normalizer(weights, [5, 3, 4, 9]) == 21.0     # ... and still count, as verl's masked_mean
    assert nsr.loss_normalizer(weights, [5, 3, 4, 9], "micro") == 21.0
    assert nsr.loss_normalizer(weights, [5, 3, 4, 9], "weighted") == 7.0
    assert nsr.loss_normalizer(torch.zeros(4), [5, 3, 4, 9], "weighted") == 0.0
    assert nsr.loss_normalizer(weights, [5, 3, 4, 9], "constant", max_new_tokens=16) == 64.0
    with pytest.raises(ValueError, match="normalizer must be one of"):
        nsr.loss_normalizer(weights, [5, 3, 4, 9], "mean")


def test_demo_gradient_prints_every_row_as_the_closed_form_of_one_sgd_step_on_the_logits():
    # Every printed row against the closed form, in float64, to the printed 3 decimals: one SGD step of
    # lr = 1 on z = log prior moves z_v by (lr / Z) sum_i w_i (1[v = y_i] - pi_v). PSR: y = b, w = +1;
    # NSR: w = -1; W-REINFORCE: b wrong (w = -1) and a right (w = +0.1) with Z = 2; the last row is NSR's
    # logit change. The closing text names the tokens that lose probability under NSR (d, e) and the exact
    # threshold log(sum_u pi_u e^dz_u) / lr, which the probabilities confirm.
    text = why.gradient_demo()
    rows = {line.rsplit(None, 5)[0].strip(): [float(x) for x in line.split()[-5:]] for line in text.splitlines()[2:7]}
    prior = torch.tensor([0.40, 0.25, 0.20, 0.10, 0.05], dtype=torch.float64)
    onehot = torch.eye(5, dtype=torch.float64)

    def step(samples):                                  # [(token, weight)], Z = len(samples), lr = 1
        dz = sum(w * (onehot[t] - prior) for t, w in samples) / len(samples)
        return torch.softmax(prior.log() + dz, -1), dz

    expected = {"probabilities before": prior, "after PSR on b (w=+1)": step([(1, 1.0)])[0],
                "after NSR on b (w=-1)": step([(1, -1.0)])[0],
                "after W-REINFORCE: b wrong (w=-1), a right (w=+0.1); Z=2": step([(1, -1.0), (0, 0.1)])[0],
                "NSR logit change = -lr*(1[v=y]-pi_v)": step([(1, -1.0)])[1]}
    assert set(rows) == set(expected)
    for label, values in expected.items():
        assert rows[label] == pytest.approx(values.tolist(), abs=5e-4), label
    after, dz = step([(1, -1.0)])
    bar = math.log(float((prior * dz.exp()).sum()))
    assert f"= {bar:.3f}" in text and "the unlikely d, e LOSE" in text
    assert [v for v in range(5) if v != 1 and after[v] < prior[v]] == [v for v in range(5) if v != 1 and prior[v] < bar]


def _fixed_batch(seed: int = 0, n: int = 5, vocab: int = 97):
    """Random prompts and responses of different lengths, and mixed-sign weights."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    responses = [torch.randint(3, vocab, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g).tolist()
                 for _ in range(n)]
    weights = torch.tensor([1.0, -1.0, 0.1, -1.0, 0.5][:n])
    return prompts, responses, weights


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


def _backward(model, prompts, responses, weights, Z, micro, policy=None, old_logprobs=None, clip_eps=0.0,
              head_chunk=0, stats=None, **terms):
    """nsr.minibatch_backward on one mini-batch, by default with the policy-gradient term alone (terms:
    entropy_coef, kl_coef, ref_model). Without a policy the grads stay in the model's own .grad (a
    Trainable whose masters are its params)."""
    params = list(model.parameters())
    run = runs.bare_run(policy or precision.Trainable(model, params, params, None),
                        ref_model=terms.pop("ref_model", None), head_chunk=head_chunk)
    cfg = nsr.Config(micro_batch_size=micro, clip_eps=clip_eps, clip_low=clip_eps, clip_high=clip_eps,
                     mini_batch_size=None, **{"entropy_coef": 0.0, "kl_coef": 0.0, **terms})
    batch = nsr.MiniBatch(prompts, responses, old_logprobs or [[] for _ in prompts], weights, Z)
    return nsr.minibatch_backward(run, batch, cfg, stats or runs.StepStats())


def test_gradients_with_micro_batch_size_one_equal_the_full_batch_gradients():
    prompts, responses, weights = _fixed_batch()
    Z = nsr.loss_normalizer(weights, [len(r) for r in responses])
    results = []
    for micro in (1, 5):
        model = tiny_model("qwen2").train()
        loss = _backward(model, prompts, responses, weights, Z, micro)
        results.append((loss, _grads(model)))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    for g1, g5 in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(g1, g5, rtol=1e-4, atol=1e-6)
    assert sum(g.abs().sum() for g in results[0][1]) > 0


@pytest.mark.parity
@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_checkpointing_and_the_chunked_output_layer_give_the_same_loss_and_gradients(arch):
    prompts, responses, weights = _fixed_batch(seed=1)
    Z = nsr.loss_normalizer(weights, [len(r) for r in responses])
    results = []
    for checkpointing in (False, True):
        model = tiny_model(arch).train()
        if checkpointing:
            precision.enable_gradient_checkpointing(model)
            assert model.model.gradient_checkpointing
        # head_chunk=2: the output layer + log-softmax in checkpointed chunks of 2 positions
        loss = _backward(model, prompts, responses, weights, Z, 5, head_chunk=2 if checkpointing else 0)
        results.append((loss, _grads(model)))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.smoke
def test_bf16_training_with_fp32_master_weights_keeps_updates_that_a_bf16_only_update_loses():
    # The pitfall: AdamW at lr 1e-6 moves each weight by ~1e-6, but bf16 has only 8 mantissa bits, so a
    # weight of 0.02 can only move in steps of 2^-13 = 1.2e-4: the bf16-only update rounds back to the
    # old weight. fp32 master weights accumulate the small steps and the bf16 model follows them.
    prompts, responses, weights = _fixed_batch(seed=2)
    Z = nsr.loss_normalizer(weights, [len(r) for r in responses])
    steps, lr = 40, 1e-6

    model = tiny_model("qwen2", dtype=torch.bfloat16).train()
    start = [p.detach().float().clone() for p in model.parameters()]
    policy = precision.make_trainable(model, nsr.Config(), lr)          # AdamW betas (0.9, 0.999), decay 0.01
    params, master = policy.params, policy.master
    assert all(m.dtype == torch.float32 for m in master) and master[0] is not params[0]
    _backward(model, prompts, responses, weights, Z, 2, policy=policy)
    assert all(p.grad is None for p in params)                  # grads moved into the fp32 masters
    grad = [m.grad.clone() for m in master]
    for step in range(steps):
        # (the same gradient every step, to keep the test fast: a steady push, as a consistent signal gives)
        for m, g in zip(master, grad):
            m.grad = g.clone()
        precision.optimizer_step(policy, grad_clip=0.0)
        if step == 0:   # after one step every weight that got a gradient moved by about lr in the master
            moved = torch.cat([(m.detach() - s).abs().flatten() for m, s in zip(master, start)])
            assert (moved > 0.5 * lr).float().mean() > 0.9 and moved.max() < 3 * lr
    # the bf16 model is exactly the rounded master ...
    for p, m in zip(params, master):
        assert torch.equal(p.detach(), m.detach().to(torch.bfloat16))
    changed_master = torch.cat([(p.detach().float() != s).flatten() for p, s in zip(model.parameters(), start)])

    # ... while the same training with bf16 weights and a bf16 AdamW loses (almost) every update
    plain = tiny_model("qwen2", dtype=torch.bfloat16).train()
    opt = torch.optim.AdamW(plain.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=0.01)
    _backward(plain, prompts, responses, weights, Z, 2)
    grad = [p.grad.clone() for p in plain.parameters()]
    for _ in range(steps):
        for p, g in zip(plain.parameters(), grad):
            p.grad = g.clone()
        opt.step()
    changed_plain = torch.cat([(p.detach().float() != s).flatten() for p, s in zip(plain.parameters(), start)])
    assert changed_master.float().mean() > 0.2
    assert changed_plain.float().mean() < 0.05
    assert changed_master.float().mean() > 5 * changed_plain.float().mean()


@pytest.mark.smoke
def test_nsr_training_steps_lower_the_log_prob_of_the_penalised_samples():
    model = tiny_model("qwen2").train()
    prompts = [[1, 5, 6, 7], [1, 9, 10]] * 4
    rollouts = sample.generate(model, prompts, 5, generator=torch.Generator().manual_seed(0))
    weights = nsr.sample_weights([0.0] * 8, "nsr", group_size=4)       # all wrong: every sample penalised
    Z = nsr.loss_normalizer(weights, [len(t) for t in rollouts.tokens])

    def total_logp():
        ids, attn, pos, mask = sample.pack(prompts, rollouts.tokens, "cpu")
        with torch.no_grad():
            logp, _ = sample.response_logprobs(model, ids, attn, pos, mask.shape[1])
        return (logp * mask).sum(dim=1)                                  # (8,) log pi(y_i)

    before = total_logp()
    policy = precision.make_trainable(model, nsr.Config(weight_decay=0.0), 1e-3)
    for _ in range(3):
        _backward(model, prompts, rollouts.tokens, weights, Z, 4, policy=policy)
        precision.optimizer_step(policy, grad_clip=1.0)
    after = total_logp()
    assert (after < before).all(), (before, after)


@pytest.mark.smoke
def test_train_two_steps_write_a_checkpoint_two_metrics_lines_and_a_loadable_model(tmp_path):
    world = _tiny_world(tmp_path)
    cfg = _tiny_config(world, tmp_path / "run", eval=[str(world / "test.jsonl")], eval_n=4)
    result = nsr.train(cfg)
    run = tmp_path / "run"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    keys = {"step", "reward", "true_reward", "all_correct", "all_wrong", "response_len", "truncated", "entropy",
            "loss", "grad_norm", "trained_samples", "updates", "clip_frac_pos", "clip_frac_neg", "skipped",
            "sample_s", "train_s", "tokens_per_s"}
    assert all(set(m) == keys for m in lines)
    ckpt = runs.latest_checkpoint(run)
    assert ckpt is not None and ckpt.name == "checkpoint-000002"
    assert json.loads((run / "config.json").read_text())["steps"] == 2
    model, _ = loading.load_model(ckpt, device="cpu")
    base, _ = loading.load_model(world, device="cpu")
    # the all-wrong NSR steps changed the saved weights
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), base.parameters()))
    assert set(result["evals"]["test"]) == {0, 2} and "test base" in result["table"]


@pytest.mark.smoke
def test_train_stopped_after_step_one_and_resumed_reproduces_step_two_without_duplicate_lines(tmp_path):
    world = _tiny_world(tmp_path)
    nsr.train(_tiny_config(world, tmp_path / "full", steps=2))
    nsr.train(_tiny_config(world, tmp_path / "cut", steps=1))       # a run that stopped after step 1
    # a line the stopped run wrote after its last checkpoint must not survive the resume
    with (tmp_path / "cut" / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 2, "reward": -1}) + "\n")
    nsr.train(_tiny_config(world, tmp_path / "cut", steps=2, resume=True))

    def lines(run):
        return [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    full, resumed = lines("full"), lines("cut")
    assert [m["step"] for m in resumed] == [1, 2]
    timing = {"sample_s", "train_s", "tokens_per_s"}
    for a, b in zip(full, resumed):
        assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}
    assert full[1]["trained_samples"] > 0
    a = loading.load_model(runs.latest_checkpoint(tmp_path / "full"), device="cpu")[0]
    b = loading.load_model(runs.latest_checkpoint(tmp_path / "cut"), device="cpu")[0]
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_a_resume_drops_the_log_lines_after_the_checkpoint_and_a_torn_last_line(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "reward": 0.5}\n{"step": 2, "reward": 0.6}\n{"step": 3, "rew')   # killed mid-write
    runs.truncate_jsonl(log, 1)
    assert log.read_text() == '{"step": 1, "reward": 0.5}\n'


@pytest.mark.smoke
def test_train_skips_non_finite_loss_steps_and_stops_after_several_in_a_row_without_saving(tmp_path, monkeypatch):
    world = _tiny_world(tmp_path)
    monkeypatch.setattr(nsr, "minibatch_backward", lambda *args, **kwargs: None)   # "the loss was NaN"
    with pytest.raises(RuntimeError, match="2 consecutive steps had a non-finite loss"):
        nsr.train(_tiny_config(world, tmp_path / "run", steps=4, max_nonfinite=2, save_every=1))
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["skipped"], m["loss"]) for m in lines] == [(1, True, None), (2, True, None)]
    # skipped steps leave the weights untouched, and the saved checkpoints are the unchanged model
    saved = loading.load_model(runs.latest_checkpoint(tmp_path / "run"), device="cpu")[0]
    base = loading.load_model(world, device="cpu")[0]
    assert all(torch.equal(p, q) for p, q in zip(saved.parameters(), base.parameters()))


@pytest.mark.smoke
def test_train_stops_with_a_message_naming_the_step_when_sampling_meets_non_finite_logits(tmp_path):
    world = _tiny_world(tmp_path)
    model, tokenizer = loading.load_model(world, device="cpu")
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))             # a diverged model
    model.save_pretrained(tmp_path / "diverged")
    tokenizer.save_pretrained(tmp_path / "diverged")
    with pytest.raises(RuntimeError, match=r"step 1: the policy produced non-finite logits.*learning rate"):
        nsr.train(_tiny_config(tmp_path / "diverged", tmp_path / "run", train=str(world / "train.jsonl")))
    assert runs.latest_checkpoint(tmp_path / "run") is None                  # nothing non-finite was saved


def test_config_shows_at_most_24_student_fields_first_and_no_numeric_sentinel():
    # the fields above the SYSTEM FIELDS banner are what a student changes first; a default meaning "look
    # elsewhere" is None (resolved by runs.resolve), never a magic number such as -1
    source = inspect.getsource(nsr.Config)
    student = source[:source.index("SYSTEM FIELDS")]
    names = [f.name for f in dataclasses.fields(nsr.Config)]
    assert sum(f"    {name}:" in student for name in names) <= 24
    assert all(not isinstance(f.default, (int, float)) or f.default >= 0 for f in dataclasses.fields(nsr.Config))
    for f in dataclasses.fields(nsr.Config):
        if f.default is None:
            assert f.type.endswith("| None") and settings.reader(f.type)("none") is None


def test_train_config_rejects_bad_values_with_clear_messages_before_any_work(tmp_path, capsys):
    cases = [(["--objective", "ppo2"], "--objective 'ppo2' is unknown; choose one of psr, nsr"),
             (["--lam", "-0.5"], "--lam must be >= 0"),
             (["--objective", "grpo", "--group-size", "1"], "--group-size must be >= 2 for grpo"),
             (["--top-p", "0.9", "--old-logprobs", "sampler"], "--old-logprobs sampler with clipping or mini-batches needs --top-p 1"),
             (["--old-logprobs", "engine"], "--old-logprobs must be training or sampler"),
             (["--normalizer", "mean"], "--normalizer must be one of tokens, micro, weighted, constant"),
             (["--objective", "ppo", "--clip-eps", "0", "--mini-batch-size", "none"], "ppo needs clipping"),
             (["--mini-batch-size", "0"], "--mini-batch-size must be >= 1 (or none), got 0"),
             (["--clip-low", "1.5"], "lower side (--clip-low, or --clip-eps) must be in [0, 1]"),
             (["--clip-eps", "1.5"], "lower side (--clip-low, or --clip-eps) must be in [0, 1]"),
             (["--clip-high", "-0.5"], "upper side (--clip-high, or --clip-eps) must be >= 0"),
             (["--out-dir", str(tmp_path)], "holds files that are not a run's"),
             (["--template", "qwen3"], "which the tokenizer of the toy world does not have"),
             (["--dry-run"], "--dry-run prints the memory plan of a real model"),
             (["--dry-run", "--model", "org/unknown"], "no architecture numbers for 'org/unknown'"),
             (["--reward", "coin"], "--reward must be verifier or random"),
             (["--random-reward-p", "1.5"], "--random-reward-p must be in [0, 1]"),
             (["--kl-coef", "-0.5"], "--kl-coef must be >= 0, got -0.5"),
             (["--critic-lr", "0"], "--critic-lr must be > 0"),
             (["--gae-lam", "1.5"], "--gae-lam must be in [0, 1]"),
             (["--train", str(tmp_path / "missing.jsonl")], "missing.jsonl: no such file"),
             (["--preset", "gpt-9"], "unknown --preset 'gpt-9'")]
    (tmp_path / "a file").write_text("not a run")
    for argv, message in cases:
        with pytest.raises(SystemExit) as stop:
            nsr.main(["--out-dir", str(tmp_path / "never")] + argv)
        assert stop.value.code == 2 and message in capsys.readouterr().err, argv
        assert not (tmp_path / "never").exists()
    # train() checks too, before it creates anything
    with pytest.raises(settings.UserError, match="unknown"):
        nsr.train(nsr.Config(objective="nope", out_dir=str(tmp_path / "never")))
    assert not (tmp_path / "never").exists()
    # a field that may be None reads "none" as None; the resolved config has no None left where a value exists
    assert settings.parse_config(nsr.Config, ["--mini-batch-size", "none", "--kl-coef", "NONE"]).kl_coef is None
    assert settings.parse_config(nsr.Config, ["--mini-batch-size", "none"]).mini_batch_size is None
    resolved = runs.resolve(nsr.Config(model="m", objective="grpo", max_new_tokens=77))
    assert (resolved.kl_coef, resolved.clip_low, resolved.clip_high, resolved.eval_max_new_tokens) == (0.001, 0.2, 0.2, 77)
    # precedence: Config defaults < toy defaults (no --model) < --preset < explicit flags
    assert settings.parse_config(nsr.Config, [], nsr.TOY_DEFAULTS).lr == nsr.TOY_DEFAULTS["lr"]
    name, preset = next(iter(presets.PRESETS.items()))
    cfg = settings.parse_config(nsr.Config, ["--preset", name, "--lr", "3e-6", "--dry-run"], nsr.TOY_DEFAULTS)
    assert cfg.model == preset["model"] and cfg.lr == 3e-6 and cfg.out_dir == nsr.Config().out_dir


# ---- the paper's update: subset, mini-batches of M, partial-chunk scaling, the clipped surrogate ----

def test_the_paper_update_trains_psr_on_correct_nsr_on_wrong_and_the_rest_on_every_sample():
    rewards = [1, 0, 0, 1, 0]
    assert nsr.training_subset(rewards, "psr") == [0, 3]
    assert nsr.training_subset(rewards, "nsr") == [1, 2, 4]
    for objective in ("w-reinforce", "reinforce", "grpo", "ppo"):
        assert nsr.training_subset(rewards, objective) == [0, 1, 2, 3, 4]


def _fake_rewards(monkeypatch, pattern):
    """Make the verifier return rewards[i] = pattern[i % len(pattern)] in sampling order, per call."""
    calls = {"i": 0}

    def reward(text, gold):
        calls["i"] += 1
        return float(pattern[(calls["i"] - 1) % len(pattern)])
    monkeypatch.setattr(verifier, "reward", reward)


@pytest.mark.smoke
@pytest.mark.parametrize("objective", ["nsr", "w-reinforce"])
def test_updates_equal_ceil_of_trained_samples_over_the_mini_batch_size_with_clip_and_entropy(
        tmp_path, monkeypatch, objective):
    # 3 prompts x 4 rollouts = 12 samples; 5 of every 12 correct -> NSR trains on 7 (M = 3: 3 steps),
    # W-REINFORCE on all 12 (4 steps)
    _fake_rewards(monkeypatch, [1, 0, 0, 1, 0, 0, 1, 0, 1, 0, 0, 1])
    world = _tiny_world(tmp_path)
    nsr.train(_tiny_config(world, tmp_path / "run", objective=objective, batch_prompts=3, group_size=4,
                           clip_eps=0.2, mini_batch_size=3, entropy_coef=1e-3))
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        assert m["trained_samples"] == (7 if objective == "nsr" else 12)
        assert m["updates"] == math.ceil(m["trained_samples"] / 3)


@pytest.mark.smoke
def test_a_last_partial_mini_batch_steps_too_with_its_loss_scaled_by_its_size_over_m(tmp_path, monkeypatch):
    _fake_rewards(monkeypatch, [1, 0, 0, 1, 0, 0, 1, 0, 1, 0, 0, 1])       # 7 wrong of 12
    calls, real = [], nsr.minibatch_backward

    def spy(run, batch, *args):
        calls.append((len(batch.prompts), batch.scale))
        return real(run, batch, *args)
    monkeypatch.setattr(nsr, "minibatch_backward", spy)
    world = _tiny_world(tmp_path)
    nsr.train(_tiny_config(world, tmp_path / "run", objective="nsr", steps=1, batch_prompts=3, group_size=4,
                           clip_eps=0.2, mini_batch_size=3, entropy_coef=0.0))
    assert calls == [(3, 1.0), (3, 1.0), (1, 1 / 3)]     # chunks 3, 3, 1: the last one's loss x 1/3


@pytest.mark.parity
def test_the_first_mini_batch_gradient_is_the_on_policy_gradient_of_the_sampled_tokens():
    # old log-probs = the sampler's own: at the first chunk the ratio is 1 and the clipped surrogate's
    # gradient equals the plain -w log pi gradient (in fp32, up to the sampler's rounding)
    model = tiny_model("qwen2")
    prompts = [[5, 6, 7], [8, 9]]
    rollouts = sample.generate(model, prompts, 5, generator=torch.Generator().manual_seed(0))
    weights = torch.tensor([-1.0, 0.1])
    Z = nsr.loss_normalizer(weights, [len(t) for t in rollouts.tokens])
    grads = []
    for clip in (0.0, 0.2):
        model.zero_grad(set_to_none=True)
        _backward(model, prompts, rollouts.tokens, weights, Z, 2, old_logprobs=rollouts.logprobs, clip_eps=clip)
        grads.append(_grads(model))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("low, high", [(0.2, 0.2), (0.1, 0.3), (0.2, 0), (0, 0.2), (0, 0)])
def test_the_clipped_surrogate_gradient_vanishes_exactly_where_ppos_does_on_each_side(low, high):
    # d loss / d log pi is 0 exactly when ratio > 1 + high under w > 0 or ratio < 1 - low under w < 0
    # (`torch.maximum` in place of `torch.minimum` would vanish in the other two corners instead); a side
    # set to 0 never clips; `clipped` marks exactly the tokens whose gradient vanished
    ratios = torch.tensor([0.5, 0.79, 0.81, 0.89, 0.91, 1.0, 1.19, 1.21, 1.29, 1.31, 2.0])
    for w in (1.0, -1.0, 0.1, -0.3):
        logp = ratios.log().clone().requires_grad_(True)[None, :]             # old log-probs = 0
        logp.retain_grad()
        loss, clipped = nsr.policy_loss(logp, torch.tensor([w]), torch.ones(1, 11), 1.0, torch.zeros(1, 11),
                                        low, high)
        loss.backward()
        vanishes = (logp.grad[0] == 0).tolist()
        expected = [(high > 0 and r > 1 + high and w > 0) or (low > 0 and r < 1 - low and w < 0)
                    for r in ratios.tolist()]
        assert vanishes == expected == clipped[0].tolist(), (w, vanishes)
        # where it does not vanish it is the policy gradient -w * ratio (d ratio / d log pi = ratio)
        live = ~torch.tensor(expected)
        torch.testing.assert_close(logp.grad[0][live], -w * ratios[live])


# ---- research instruments: clip sides and their fractions, the random-reward control, the loss terms ----

def test_clip_fractions_count_by_the_sign_of_the_weight_the_tokens_whose_gradient_the_clip_zeroed():
    # row 0: w = +1, ratios 0.5 / 1.0 / 1.5: only 1.5 > 1 + 0.3 is clipped (the upper side acts on w > 0);
    # row 1: w = -1, ratios 0.5 / 1.0 / (padding): only 0.5 < 1 - 0.1 is clipped (the lower side on w < 0)
    ratios = torch.tensor([[0.5, 1.0, 1.5], [0.5, 1.0, 1.5]])
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    weights = torch.tensor([1.0, -1.0])
    _, clipped = nsr.policy_loss(ratios.log(), weights, mask, 5.0, torch.zeros(2, 3), 0.1, 0.3)
    assert clipped.tolist() == [[False, False, True], [True, False, False]]
    stats = runs.StepStats()
    runs.count_clipped(stats, weights, clipped, mask)
    runs.count_clipped(stats, torch.tensor([[0.5, -2.0, 0.0], [0.0, 0.0, 0.0]]), clipped, mask)   # per-token (ppo)
    assert stats.clip_counts.tolist() == [3 + 1, 1 + 0, 2 + 1, 1 + 0]
    rollouts = sample.Rollouts(tokens=[[1, 2]] * 4, logprobs=[[0.0, 0.0]] * 4, truncated=[False] * 4,
                               entropies=[[0.5, 0.5]] * 4)
    cfg = nsr.Config(batch_prompts=2, group_size=2)
    m = runs.step_metrics(0, cfg, [1, 0, 1, 1], [1, 0, 0, 0], rollouts, stats, None, (1.0, 1.0))
    assert (m["clip_frac_pos"], m["clip_frac_neg"]) == (1 / 4, 1 / 3)
    assert (m["reward"], m["true_reward"]) == (0.75, 0.25)
    # no token of a sign: null, not 0
    none = runs.step_metrics(0, cfg, [1, 0, 1, 1], [1, 0, 1, 1], rollouts, runs.StepStats(), None, (1.0, 1.0))
    assert none["clip_frac_pos"] is None and none["clip_frac_neg"] is None


@pytest.mark.smoke
def test_a_run_with_two_clip_sides_and_the_random_reward_records_both_and_logs_every_key(tmp_path):
    world = _tiny_world(tmp_path)
    cfg = _tiny_config(world, tmp_path / "run", steps=2, clip_low=0.1, clip_high=0.3, reward="random",
                       random_reward_p=0.5, mini_batch_size=2, objective="w-reinforce")
    nsr.train(cfg)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["clip_low"], saved["clip_high"], saved["reward"], saved["random_reward_p"]) == (0.1, 0.3, "random", 0.5)
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        assert 0 <= m["true_reward"] <= 1 and m["updates"] == 4       # 8 samples in mini-batches of 2
        for key in ("clip_frac_pos", "clip_frac_neg"):
            assert m[key] is None or 0 <= m[key] <= 1
    # --clip-eps sets both sides unless one is given
    nsr.train(_tiny_config(world, tmp_path / "eps", steps=1, clip_eps=0.25, clip_high=0.4))
    saved = json.loads((tmp_path / "eps" / "config.json").read_text())
    assert (saved["clip_low"], saved["clip_high"]) == (0.25, 0.4)


@pytest.mark.smoke
def test_the_random_reward_is_bernoulli_p_independent_of_correctness_and_resumes_exactly(tmp_path, monkeypatch):
    world = _tiny_world(tmp_path)
    _fake_rewards(monkeypatch, [1, 0])                              # the verifier: every other sample right
    seen = []
    real = nsr.training_subset
    monkeypatch.setattr(nsr, "training_subset", lambda rewards, objective: seen.append(list(rewards)) or
                        real(rewards, objective))
    nsr.train(_tiny_config(world, tmp_path / "run", steps=8, batch_prompts=4, group_size=8, reward="random",
                           random_reward_p=0.3, mini_batch_size=None, clip_eps=0.0, max_new_tokens=2))
    r = np.array(seen).reshape(-1, 2)                               # (samples / 2, [true 1, true 0])
    sd = math.sqrt(0.3 * 0.7 / len(r))                              # 128 samples on each side
    assert abs(r[:, 0].mean() - 0.3) < 4 * sd and abs(r[:, 1].mean() - 0.3) < 4 * sd   # the same rate either way
    for p, value in ((0.0, 0.0), (1.0, 1.0)):                       # the ends are exact
        seen.clear()
        nsr.train(_tiny_config(world, tmp_path / f"p{p}", steps=1, reward="random", random_reward_p=p))
        assert set(seen[0]) == {value}
    # drawn from the run's seeded generator: a resumed run draws the same rewards as an uninterrupted one
    common = dict(reward="random", random_reward_p=0.5, save_every=1)
    nsr.train(_tiny_config(world, tmp_path / "full", steps=3, **common))
    nsr.train(_tiny_config(world, tmp_path / "cut", steps=2, **common))
    nsr.train(_tiny_config(world, tmp_path / "cut", steps=3, resume=True, **common))
    timing = {"sample_s", "train_s", "tokens_per_s"}
    lines = {run: [{k: v for k, v in json.loads(line).items() if k not in timing}
                   for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()] for run in ("full", "cut")}
    assert lines["full"] == lines["cut"]


def test_entropy_bonus_and_kl_penalty_values_and_gradients_on_a_hand_made_case():
    entropy = torch.tensor([[1.0, 2.0], [3.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    assert nsr.entropy_bonus(entropy, mask, 3.0).item() == pytest.approx(2.0)        # (1 + 2 + 3) / 3
    # k3: d = log pi_ref - log pi = log 2 -> exp(d) - d - 1 = 1 - log 2; d = 0 -> 0; the padding is ignored
    logp = torch.zeros(1, 3, requires_grad=True)
    ref = torch.tensor([[math.log(2.0), 0.0, 5.0]])
    kl = nsr.kl_penalty(logp, ref, torch.tensor([[1.0, 1.0, 0.0]]), 2.0)
    assert kl.item() == pytest.approx((1 - math.log(2)) / 2)
    kl.backward()                                                   # d k3 / d log pi = 1 - exp(d), / 2 tokens
    torch.testing.assert_close(logp.grad, torch.tensor([[(1 - 2.0) / 2, 0.0, 0.0]]))
    # verl's low_var_kl clamps: d to [-20, 20], the estimate to at most 10
    # (without the first, exp(100) overflows to inf and the capped token's gradient is 0 * inf = nan)
    far_logp = torch.zeros(1, 2, requires_grad=True)
    far = nsr.kl_penalty(far_logp, torch.tensor([[100.0, -30.0]]), torch.ones(1, 2), 1.0)
    far.backward()
    assert far.item() == pytest.approx(20.0)                        # both tokens at the cap of 10
    assert torch.equal(far_logp.grad, torch.zeros(1, 2))            # capped: no gradient, and no nan


def _reference_terms(model, prompts, responses, ref=None):
    """The mean token entropy of the policy, and the mean k3 KL to `ref`, over every response token,
    computed one unpadded sequence at a time with torch.distributions (independent of sample.pack)."""
    entropies, kls = [], []
    for p, r in zip(prompts, responses):
        ids = torch.tensor([p + r])
        logits = model(input_ids=ids).logits[0, len(p) - 1:len(p) + len(r) - 1].float()      # (len(r), V)
        entropies.append(torch.distributions.Categorical(logits=logits).entropy())
        if ref is not None:
            y = torch.tensor(r)
            logp = torch.log_softmax(logits, -1)[torch.arange(len(r)), y]
            with torch.no_grad():
                ref_logp = torch.log_softmax(ref(input_ids=ids).logits[0, len(p) - 1:len(p) + len(r) - 1].float(),
                                             -1)[torch.arange(len(r)), y]
            d = ref_logp - logp
            kls.append(d.exp() - d - 1)
    n = sum(len(r) for r in responses)
    return torch.cat(entropies).sum() / n, (torch.cat(kls).sum() / n if kls else None)


@pytest.mark.parity
def test_the_step_subtracts_the_entropy_bonus_and_adds_the_kl_term_as_token_means_over_the_mini_batch():
    # minibatch_backward with a term on minus the same without it = exactly that term, in value and in
    # gradient: a flipped sign, or Z (the weighted samples' tokens) in place of all tokens, fails here
    prompts, responses, _ = _fixed_batch(seed=3)
    weights = torch.tensor([1.0, 0.0, -1.0, 0.0, 0.5])             # Z counts 3 of the 5 samples' tokens
    Z = nsr.loss_normalizer(weights, [len(r) for r in responses], "weighted")
    assert Z < sum(len(r) for r in responses)
    c, beta = 0.3, 0.7
    ref = tiny_model("qwen2", seed=5)
    results = {}
    for name, terms in (("plain", {}), ("entropy", {"entropy_coef": c}), ("kl", {"kl_coef": beta, "ref_model": ref})):
        model = tiny_model("qwen2").train()
        loss = _backward(model, prompts, responses, weights, Z, 2, **terms)
        results[name] = (loss, _grads(model))
    model = tiny_model("qwen2")
    entropy, kl = _reference_terms(model, prompts, responses, ref)
    assert results["entropy"][0] - results["plain"][0] == pytest.approx(-c * entropy.item(), rel=1e-4)
    assert results["kl"][0] - results["plain"][0] == pytest.approx(beta * kl.item(), rel=1e-4)
    grads_h = torch.autograd.grad(entropy, list(model.parameters()), retain_graph=True, allow_unused=True)
    grads_kl = torch.autograd.grad(kl, list(model.parameters()), allow_unused=True)
    for plain, with_h, with_kl, gh, gk in zip(results["plain"][1], results["entropy"][1], results["kl"][1],
                                              grads_h, grads_kl):
        torch.testing.assert_close(with_h - plain, -c * (gh if gh is not None else torch.zeros_like(plain)),
                                   rtol=1e-3, atol=1e-6)
        torch.testing.assert_close(with_kl - plain, beta * (gk if gk is not None else torch.zeros_like(plain)),
                                   rtol=1e-3, atol=1e-6)


def test_the_sgd_ablation_takes_exactly_one_plain_gradient_step():
    model = torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in model.parameters()]
    policy = precision.make_trainable(model, nsr.Config(optimizer="sgd", weight_decay=0.0), 0.5)
    assert isinstance(policy.optimizer, torch.optim.SGD)
    grads = [torch.randn_like(p) for p in model.parameters()]
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    precision.optimizer_step(policy, grad_clip=0.0)
    for p, b, g in zip(model.parameters(), before, grads):          # w <- w - lr g, nothing else
        torch.testing.assert_close(p.detach(), b - 0.5 * g)


@pytest.mark.smoke
def test_the_non_finite_streak_survives_a_resume(tmp_path, monkeypatch):
    world = _tiny_world(tmp_path)
    monkeypatch.setattr(nsr, "minibatch_backward", lambda *args, **kwargs: None)   # every step non-finite
    nsr.train(_tiny_config(world, tmp_path / "run", steps=2, max_nonfinite=3, save_every=1))   # 2 in a row
    with pytest.raises(RuntimeError, match="step 3: 3 consecutive steps had a non-finite loss"):
        nsr.train(_tiny_config(world, tmp_path / "run", steps=4, max_nonfinite=3, save_every=1, resume=True))


# ---- PPO: GAE, whitening, the clipped value loss, a smoke run and exact resume ----

# HANDOUT: cut (a textbook GAE, the gae problem's answer)
def _reference_gae(rewards, values, lengths, gamma, lam):
    """GAE written the textbook way, one row at a time, over the real tokens only (V after the end = 0)."""
    out = []
    for r, v, n in zip(rewards, values, lengths):
        adv, running = [0.0] * n, 0.0
        for t in reversed(range(n)):
            nxt = v[t + 1] if t + 1 < n else 0.0
            running = r[t] + gamma * nxt - v[t] + gamma * lam * running
            adv[t] = running
        out.append(adv)
    return out
# HANDOUT: end


@pytest.mark.parity
def test_gae_equals_a_hand_computed_example_and_the_return_minus_value_at_gamma_lam_one():
    # one row by hand: rewards (0, 0, 1), values (0.5, 0.2, 0.4), gamma 0.9, lam 0.8:
    #   d2 = 1 - 0.4 = 0.6;  d1 = 0 + 0.9*0.4 - 0.2 = 0.16;  d0 = 0 + 0.9*0.2 - 0.5 = -0.32
    #   A2 = 0.6;  A1 = 0.16 + 0.72*0.6 = 0.592;  A0 = -0.32 + 0.72*0.592 = 0.10624
    rewards = torch.tensor([[0.0, 0.0, 1.0, 9.0], [0.3, 1.0, 9.0, 9.0]])      # 9 = padding, must be ignored
    values = torch.tensor([[0.5, 0.2, 0.4, 9.0], [0.1, -0.2, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0]])
    adv, ret = ppo.gae_advantages(rewards, values, mask, gamma=0.9, gae_lam=0.8)
    torch.testing.assert_close(adv[0, :3], torch.tensor([0.10624, 0.592, 0.6]))
    # HANDOUT: cut
    ref = _reference_gae(rewards.tolist(), values.tolist(), [3, 2], 0.9, 0.8)
    torch.testing.assert_close(adv[1, :2], torch.tensor(ref[1]))
    # HANDOUT: end
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()
    torch.testing.assert_close(ret, (adv + values) * mask)
    # gamma = lam = 1: A_t = (sum of the rewards from t on) - V_t
    adv, ret = ppo.gae_advantages(rewards, values, mask)
    to_go = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.3, 1.0, 0.0, 0.0]])
    torch.testing.assert_close(adv, (to_go - values) * mask)
    torch.testing.assert_close(ret, to_go)


def test_masked_whiten_has_mean_zero_and_std_one_over_the_masked_tokens_only():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 7.0]])
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 1]])
    w = ppo.masked_whiten(x, mask)
    real = w[mask == 1]
    assert abs(float(real.mean())) < 1e-6 and abs(float(real.std()) - 1) < 1e-4   # unbiased std, as verl
    assert (w[mask == 0] == 0).all()


def test_value_clipping_stops_the_gradient_exactly_past_half_a_unit_from_the_old_value():
    # V_old = 0, R = 2: moving V towards R past V_old + 0.5 no longer lowers the clipped error, so the max
    # of the two errors is the clipped one and the gradient is 0; inside the band it is V - R
    old, ret, mask = torch.zeros(1, 4), torch.full((1, 4), 2.0), torch.ones(1, 4)
    values = torch.tensor([[0.3, 0.49, 0.51, 0.9]], requires_grad=True)
    ppo.value_loss(values, old, ret, mask, normalizer=1.0, clip=0.5).backward()
    torch.testing.assert_close(values.grad[0, :2], values.detach()[0, :2] - 2.0)   # 0.5 * d(V-R)^2 = V - R
    assert (values.grad[0, 2:] == 0).all()


def test_explained_variance_is_one_for_a_perfect_critic_and_zero_for_the_mean():
    ret = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    mask = torch.tensor([[1.0, 1, 1, 0]])
    assert ppo.explained_variance(ret.clone(), ret, mask) == pytest.approx(1.0)
    assert ppo.explained_variance(torch.full((1, 4), 2.0), ret, mask) == pytest.approx(0.0)


@pytest.mark.smoke
def test_ppo_trains_a_critic_logs_its_metrics_and_resumes_exactly(tmp_path, monkeypatch):
    _fake_rewards(monkeypatch, [1, 0, 0, 1, 0, 0, 1, 0])
    world = _tiny_world(tmp_path)
    ppo = dict(objective="ppo", clip_eps=0.2, mini_batch_size=4, critic_lr=1e-2, kl_coef=0.01)
    nsr.train(_tiny_config(world, tmp_path / "full", steps=2, **ppo))
    lines = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    for m in lines:
        assert {"value_loss", "explained_variance", "adv_mean", "critic_grad_norm"} <= set(m)
        assert m["value_loss"] > 0 and m["critic_grad_norm"] > 0 and m["updates"] == 2   # 8 samples / M = 4
    ckpt = runs.latest_checkpoint(tmp_path / "full")
    assert (ckpt / "critic" / "config.json").is_file()
    # stopped after step 1, resumed: the same metrics (but timing) and the same policy and critic weights
    nsr.train(_tiny_config(world, tmp_path / "cut", steps=1, **ppo))
    nsr.train(_tiny_config(world, tmp_path / "cut", steps=2, resume=True, **ppo))
    timing = {"sample_s", "train_s", "tokens_per_s"}
    cut = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in m.items() if k not in timing} for m in cut] == \
           [{k: v for k, v in m.items() if k not in timing} for m in lines]
    for sub in ("", "critic"):
        a = AutoModelForCausalLM if not sub else AutoModelForTokenClassification
        full, resumed = (a.from_pretrained(runs.latest_checkpoint(tmp_path / r) / sub) for r in ("full", "cut"))
        for p, q in zip(full.parameters(), resumed.parameters()):
            assert torch.equal(p, q)


# ---- the main job: PSR and NSR from the same base, side by side ----

@pytest.mark.smoke
def test_a_comma_list_of_objectives_trains_each_from_the_same_base_and_prints_them_side_by_side(tmp_path, capsys):
    world = _tiny_world(tmp_path)
    out = tmp_path / "main"
    argv = _argv(world, out, "--objective", "psr,nsr", "--eval", str(world / "test.jsonl"), "--eval-n", "8")
    nsr.main(argv)
    printed = capsys.readouterr().out
    for objective in ("psr", "nsr"):               # one complete run each, in its own directory
        assert json.loads((out / objective / "config.json").read_text())["objective"] == objective
        assert runs.latest_checkpoint(out / objective).name == "checkpoint-000002"
    base_psr, base_nsr = (passk.load_result(out / o / "eval" / "step000000_test.json") for o in ("psr", "nsr"))
    assert base_psr["counts"] == base_nsr["counts"]  # the same base, evaluated with the same seed
    table = printed[printed.index("test: Pass@k"):]
    rows = [line.split() for line in table.splitlines()[2:5]]
    assert [r[0] for r in rows] == ["base", "PSR", "NSR"] and all(r[-3].startswith("H=") for r in rows)
    assert "k=2" in table and "k=4" not in table       # n = 8: k up to n / 4
    last = passk.load_result(out / "nsr" / "eval" / "step000002_test.json")
    assert rows[2][-2:] == [f"{100 * v:.1f}" for v in passk.passk_curve(last["counts"], 8, [1, 2]).values()]
    # --resume continues both: nothing is trained again, the same table is printed from the saved results
    stamp = {name: data for name, data in _files(out).items() if not name.endswith("config.json")}
    nsr.main(argv + ["--resume"])
    assert {name: data for name, data in _files(out).items() if not name.endswith("config.json")} == stamp
    assert capsys.readouterr().out.count("NSR step 2") == 1
    # every objective is checked before the first run starts
    with pytest.raises(SystemExit) as stop:
        nsr.main(_argv(world, tmp_path / "never", "--objective", "psr,nope"))
    assert stop.value.code == 2 and "--objective 'nope' is unknown" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_the_runs_side_by_side_evaluate_the_base_once_and_a_recomputation_gives_the_same_counts(tmp_path, monkeypatch):
    world = _tiny_world(tmp_path)
    calls, real = [], passk.evaluate
    monkeypatch.setattr(passk, "evaluate", lambda *a, **k: calls.append(k["desc"]) or real(*a, **k))
    evals = ["--eval", str(world / "test.jsonl"), "--eval-n", "8"]
    nsr.main(_argv(world, tmp_path / "main", "--objective", "psr,nsr", *evals))
    assert calls == ["eval test @ step 0", "eval test @ step 2", "eval test @ step 2"]   # the base once
    shared = passk.load_result(tmp_path / "main" / "nsr" / "eval" / "step000000_test.json")
    assert json.loads((tmp_path / "main" / "nsr" / "eval.jsonl").read_text().splitlines()[0])["step"] == 0
    # NSR alone (not side by side) evaluates its base itself, and gets exactly what it was given
    nsr.main(_argv(world, tmp_path / "alone", "--objective", "nsr", *evals))
    assert calls[3:] == ["eval test @ step 0", "eval test @ step 2"]
    alone = passk.load_result(tmp_path / "alone" / "eval" / "step000000_test.json")
    assert alone["counts"] == shared["counts"] and alone["mean_entropy"] == shared["mean_entropy"]
    # shared only between runs side by side, and only when nothing but the objective's fields differs
    cfg = runs.resolve(settings.parse_config(nsr.Config, _argv(world, tmp_path / "main" / "psr", *evals), {}))
    key = lambda run_dir, **change: runs.shared_base_eval_key(SimpleNamespace(dir=run_dir),
                                                              dataclasses.replace(cfg, **change), "test")
    assert key(tmp_path / "main" / "psr") == key(tmp_path / "main" / "nsr", objective="nsr", kl_coef=0.001) is not None
    assert key(tmp_path / "main" / "psr", seed=1) != key(tmp_path / "main" / "psr")
    assert key(tmp_path / "main" / "psr", eval_temperature=0.7) != key(tmp_path / "main" / "psr")
    assert key(tmp_path / "alone") is None


def test_the_main_job_defaults_train_psr_and_nsr_with_n_at_least_4_times_the_largest_k():
    cfg = settings.parse_config(nsr.Config, [], nsr.TOY_DEFAULTS)
    assert cfg.objective.split(",") == ["psr", "nsr"] and not cfg.model
    assert cfg.eval_n >= 4 * max(runs.table_ks(cfg.eval_n)) and max(runs.table_ks(cfg.eval_n)) == 64
    assert settings.parse_config(nsr.Config, ["--objective", "grpo"], nsr.TOY_DEFAULTS).objective == "grpo"


# ---- nothing lost: bad input stops in one line before any work; a rerun never deletes a run ----

def _argv(world, out, *extra):
    """nsr.py's command line for _tiny_config's run (plain template, 2 steps, no evaluation)."""
    return ["--model", str(world), "--train", str(world / "train.jsonl"), "--template", "plain", "--steps", "2",
            "--batch-prompts", "2", "--group-size", "4", "--max-new-tokens", "6", "--lr", "1e-3",
            "--micro-batch-size", "3", "--eval-n", "0", "--device", "cpu", "--out-dir", str(out), *extra]


def _files(run: pathlib.Path) -> dict:
    return {str(f.relative_to(run)): f.read_bytes() for f in sorted(run.rglob("*")) if f.is_file()}


@pytest.mark.smoke
def test_a_rerun_with_a_malformed_data_file_stops_in_one_line_and_the_finished_run_survives(tmp_path, capsys):
    world = _tiny_world(tmp_path)
    run = tmp_path / "run"
    nsr.main(_argv(world, run))
    before = _files(run)
    assert "checkpoint-000002/model.safetensors" in before and "metrics.jsonl" in before
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": "2+2", "answer": "4"}\n{"problem": "3+\n')
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        nsr.main(_argv(world, run, "--train", str(bad)))            # no --resume, and a bad file
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1
    assert err[0] == f"nsr.py: error: {bad}:3: malformed JSON (Invalid control character at column 16)"
    assert _files(run) == before                                    # not a byte of the finished run changed
    # the same rerun with good input moves the finished run aside, whole, and starts a new one
    nsr.main(_argv(world, run))
    assert _files(tmp_path / "run.1") == before
    assert runs.latest_checkpoint(run).name == "checkpoint-000002"
    assert "moved it to " + str(tmp_path / "run.1") in capsys.readouterr().out


@pytest.mark.smoke
def test_every_user_error_is_one_line_and_exit_status_2_before_any_weights_are_loaded(tmp_path, capsys,
                                                                                      monkeypatch):
    world = _tiny_world(tmp_path)
    (tmp_path / "nofield.jsonl").write_text('{"question": "1+1", "answer": "2"}\n')
    (tmp_path / "empty.jsonl").write_text("\n")
    toy_base, truncated = tmp_path / "toybase", tmp_path / "truncated"
    toy.ensure_base(toy_base, quick=True, log=lambda *a: None)        # a char tokenizer without ChatML's tokens
    shutil.copytree(toy_base, truncated)
    (truncated / "model.safetensors").write_bytes((truncated / "model.safetensors").read_bytes()[:100])
    nsr.main(_argv(world, tmp_path / "done"))                        # a finished run, to resume past its end
    cases = [(["--eval", str(tmp_path / "nofield.jsonl"), "--eval-n", "2"], "nofield.jsonl:1: missing field 'problem'"),
             (["--train", str(tmp_path / "empty.jsonl")], "empty.jsonl: no problems"),
             (["--model", str(tmp_path / "nowhere")], f"--model {tmp_path / 'nowhere'}: no such directory"),
             (["--resume"], "holds no checkpoint to resume"),
             (["--model", str(toy_base), "--template", "qwen3"], "--template qwen3 needs the tokens <|im_start|>, <|im_end|>"),
             (["--max-prompt-len", "1"], "every prompt is longer than --max-prompt-len 1"),
             (["--model", str(truncated)], "model.safetensors unreadable (Error while deserializing header"),
             (["--model", str(truncated)], f"rebuild it with `python toy.py --seed 0 --quick --out {truncated} --force`"),
             (["--lr", "-1"], "--lr must be > 0")]

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded before the input was checked")
    for target in (loading, ppo):
        monkeypatch.setattr(target, "load_model" if target is loading else "load_critic", no_weights)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_weights)
    capsys.readouterr()
    for extra, message in cases:
        with pytest.raises(SystemExit) as stop:
            nsr.main(_argv(world, tmp_path / "never", *extra))
        err = capsys.readouterr().err
        assert stop.value.code == 2 and message in err and err.startswith("nsr.py: error: "), (extra, err)
        assert "Traceback" not in err and not (tmp_path / "never").exists()
    with pytest.raises(SystemExit) as stop:                          # resuming a run past its --steps
        nsr.main(_argv(world, tmp_path / "done", "--resume", "--steps", "1"))
    assert stop.value.code == 2 and "at step 2, past --steps 1" in capsys.readouterr().err


@pytest.mark.smoke
@pytest.mark.parametrize("answer, kind", [("[2]", "list"), ('{"value": 2}', "dict"), ("null", "null")])
def test_an_answer_that_is_a_list_an_object_or_null_stops_the_command_line_with_file_and_line(tmp_path, capsys,
                                                                                            answer, kind):
    world = _tiny_world(tmp_path)
    data = tmp_path / "data.jsonl"
    data.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": "2+2", "answer": %s}\n' % answer)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        nsr.main(_argv(world, tmp_path / "never", "--train", str(data)))
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"nsr.py: error: {data}:2: field 'answer' must be a string or a number, got {kind}")
    assert not (tmp_path / "never").exists()


@pytest.mark.slow
@pytest.mark.smoke
def test_a_run_killed_with_sigkill_at_a_random_point_and_resumed_writes_the_uninterrupted_metrics(tmp_path):
    # A real process, killed with SIGKILL once its metrics.jsonl has a seeded number of lines (plus a seeded
    # few ms: mid-step, mid-checkpoint or mid-line), then resumed with --resume until it finishes.
    import signal
    import subprocess
    world = _tiny_world(tmp_path)
    common = ["--steps", "6", "--save-every", "1", "--threads", "1", "--objective", "w-reinforce"]
    nsr.main(_argv(world, tmp_path / "full", *common))
    rng = random.Random(31)                 # the kill point is seeded: the same step count every run of the suite
    cut, kills = tmp_path / "cut", 0
    argv = [sys.executable, str(HERE / "nsr.py"), *_argv(world, cut, *common)]
    proc = subprocess.Popen(argv, cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for = rng.randint(1, 4)
    while proc.poll() is None:
        lines = (cut / "metrics.jsonl").read_text().count("\n") if (cut / "metrics.jsonl").is_file() else 0
        if lines >= wait_for:
            time.sleep(rng.uniform(0, 0.02))
            proc.send_signal(signal.SIGKILL)
            kills += proc.wait() == -signal.SIGKILL
            break
        time.sleep(0.002)
    for _ in range(3):                                               # resume (or start again) until it finishes
        resume = ["--resume"] if runs.latest_checkpoint(cut) is not None else []
        if subprocess.run(argv + resume, cwd=HERE, capture_output=True).returncode == 0:
            break
    timing = {"sample_s", "train_s", "tokens_per_s"}

    def lines(run):
        return [{k: v for k, v in json.loads(line).items() if k not in timing}
                for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    assert kills == 1, "the run finished before it could be killed"
    assert lines("cut") == lines("full"), f"killed after {wait_for} lines"
    a = loading.load_model(runs.latest_checkpoint(tmp_path / "full"), device="cpu")[0]
    b = loading.load_model(runs.latest_checkpoint(cut), device="cpu")[0]
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.smoke
def test_a_toy_rebuild_and_a_reproduction_with_other_jobs_move_earlier_output_aside(tmp_path):
    base = tmp_path / "base"
    toy.ensure_base(base, quick=True, log=lambda *a: None)
    first = _files(base)
    toy.ensure_base(base, quick=True, force=True, log=lambda *a: None)      # --force: rebuilt, not deleted
    assert _files(tmp_path / "base.1") == first and (base / "model.safetensors").is_file()
    job = tmp_path / "job"
    job.mkdir()
    (job / "result.json").write_text('{"key": "another job"}')
    assert reproduce.claim_job_dir(job, "this job") is False
    assert (tmp_path / "job.1" / "result.json").is_file() and json.loads((job / "job.json").read_text())["key"] == "this job"


# ---- optimizer offload: the same computation with the fp32 state in CPU RAM ----

@pytest.mark.parity
def test_optimizer_offload_gives_bit_identical_weights_to_on_device_fp32_masters_and_resumes(tmp_path, monkeypatch):
    _fake_rewards(monkeypatch, [1, 0, 0, 1, 0, 0, 1, 0])
    world = _tiny_world(tmp_path)
    bf16 = dict(dtype="bfloat16", steps=3, objective="w-reinforce", clip_eps=0.2, mini_batch_size=4, lr=1e-2)
    nsr.train(_tiny_config(world, tmp_path / "device", **bf16))
    nsr.train(_tiny_config(world, tmp_path / "offload", optimizer_offload=True, **bf16))
    nsr.train(_tiny_config(world, tmp_path / "cut", optimizer_offload=True, **{**bf16, "steps": 2}))
    nsr.train(_tiny_config(world, tmp_path / "cut", optimizer_offload=True, resume=True, **bf16))
    states = {r: torch.load(runs.latest_checkpoint(tmp_path / r) / "trainer_state.pt", weights_only=True)
              for r in ("device", "offload", "cut")}
    start = AutoModelForCausalLM.from_pretrained(world)
    moved = False
    for i, m in enumerate(states["device"]["master"]):
        assert torch.equal(m, states["offload"]["master"][i]) and torch.equal(m, states["cut"]["master"][i])
        moved = moved or not torch.equal(m, list(start.parameters())[i].float())
    assert moved                                                    # the 3 steps did change the weights



# =================================================================================================
# PARITY WITH THE OFFICIAL UPDATE (an independent transcription of its formulas)
# =================================================================================================
#
# The official code (TianHongZXY/RLVR-Decomposed at a5d4e7c, built on verl) transcribed formula by formula,
# NOT imported and not copied: each helper cites the function it follows. Fed the same tensors as nsr's loss.
# Select with:  python -m pytest -q test_nsr.py -k official

def _official_psr_nsr_advantage(scores: torch.Tensor, mode: str, lam: float) -> torch.Tensor:
    """core_algos.compute_psr_nsr_outcome_advantage, gamma = 1 (every token carries the 0/1 score):
    'positive' A = score; 'negative' A = score - 1; 'weighted' A = lam * score on correct, score - 1 on wrong."""
    if mode == "positive":
        return scores.clone()
    if mode == "negative":
        return scores - 1
    return torch.where(scores == 1, lam * scores, scores - 1)


def _official_grpo_advantage(scores: torch.Tensor, index: list) -> torch.Tensor:
    """core_algos.compute_grpo_outcome_advantage: (score - mean) / (std + 1e-6) over the responses of one
    prompt index, torch.std (unbiased); a prompt with one response gets mean 0, std 1."""
    out = scores.clone()
    for idx in set(index):
        rows = [i for i, j in enumerate(index) if j == idx]
        group = scores[rows]
        mean, std = (group.mean(), group.std()) if len(rows) > 1 else (torch.tensor(0.0), torch.tensor(1.0))
        out[rows] = (group - mean) / (std + 1e-6)
    return out


def _official_gae_whitened(token_rewards, values, mask, gamma=1.0, lam=1.0):
    """core_algos.compute_gae_advantage_return, then verl_F.masked_whiten (unbiased masked variance,
    (x - mean) * rsqrt(var + 1e-8)). Returns (whitened advantages, returns)."""
    last, rev, T = 0, [], token_rewards.shape[1]
    for t in reversed(range(T)):
        next_values = values[:, t + 1] if t < T - 1 else 0.0
        delta = token_rewards[:, t] + gamma * next_values - values[:, t]
        last = delta + gamma * lam * last
        rev.append(last)
    adv = torch.stack(rev[::-1], dim=1)
    returns = adv + values
    mean = (adv * mask).sum() / mask.sum()
    var = (((adv - mean) ** 2) * mask).sum() / mask.sum() * (mask.sum() / (mask.sum() - 1))
    return (adv - mean) * torch.rsqrt(var + 1e-8), returns


def _official_update_loss(model, ref, prompts, responses, old, adv, micro, temperature, clip, entropy_coeff,
                          kl_loss_coef):
    """dp_actor.update_policy's loss over ONE mini-batch (its rows split into micro-batches of `micro`):
    per micro-batch, pg_loss = masked_mean(max(-A r, -A clamp(r, 1 - eps, 1 + eps))) (compute_policy_loss),
    - entropy_coeff * masked_mean(entropy) (entropy_from_logits: logsumexp(z) - sum softmax(z) z),
    + kl_loss_coef * masked_mean(low_var_kl) (kl_penalty: exp(ref - logp) - (ref - logp) - 1, clamped to
    [-10, 10]), times len(micro) / ppo_mini_batch_size; backward per micro-batch. Returns the summed loss."""
    M, total = len(prompts), 0.0
    for start in range(0, M, micro):
        rows = slice(start, start + micro)
        input_ids, attn, pos, mask = sample.pack(prompts[rows], responses[rows], "cpu")
        R = mask.shape[1]
        logits = model(input_ids=input_ids, attention_mask=attn, position_ids=pos).logits[:, -R - 1:-1] / temperature
        logp = torch.gather(logits.log_softmax(-1), 2, input_ids[:, -R:, None])[..., 0]
        entropy = torch.logsumexp(logits, -1) - (torch.softmax(logits, -1) * logits).sum(-1)
        ratio = torch.exp(logp - old[rows, :R])
        A = adv[rows, :R]

        def masked_mean(x):
            return (x * mask).sum() / mask.sum()

        pg_loss = masked_mean(torch.max(-A * ratio, -A * torch.clamp(ratio, 1 - clip, 1 + clip)))
        policy_loss = pg_loss - entropy_coeff * masked_mean(entropy)
        if kl_loss_coef:
            with torch.no_grad():
                ref_logits = ref(input_ids=input_ids, attention_mask=attn, position_ids=pos).logits[:, -R - 1:-1]
                ref_logp = torch.gather((ref_logits / temperature).log_softmax(-1), 2, input_ids[:, -R:, None])[..., 0]
            kl = ref_logp - logp
            policy_loss = policy_loss + kl_loss_coef * masked_mean(torch.clamp(torch.exp(kl) - kl - 1, -10, 10))
        loss = policy_loss * (len(prompts[rows]) / M)
        loss.backward()
        total += loss.item()
    return total


def _parity_batch(objective: str):
    """A rollout batch of 3 prompts x 4 responses with mixed rewards (one all-correct group), old log-probs
    off the current policy by noise (so the clip acts), for the tiny qwen2 model."""
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, 97, (int(n),), generator=g).tolist() for n in (3, 5, 2) for _ in range(4)]
    responses = [torch.randint(3, 97, (int(torch.randint(1, 8, (1,), generator=g)),), generator=g).tolist()
                 for _ in range(12)]
    rewards = [1, 1, 1, 1, 0, 1, 0, 0, 1, 0, 0, 0]
    T = max(map(len, responses))
    old = torch.randn(12, T, generator=g) * 0.3 - 4.0               # log pi_old (N, T); ratios ~ 0.5..2
    return prompts, responses, rewards, old


@pytest.mark.parity
@pytest.mark.parametrize("objective", ["psr", "nsr", "w-reinforce", "reinforce", "grpo", "ppo"])
@pytest.mark.parametrize("micro", [12, 5])
def test_our_update_equals_the_official_update_formula_by_formula(objective, micro):
    # One mini-batch holding the objective's subset, cut into micro-batches of `micro` rows. Our default Z is
    # the whole mini-batch's token mean (independent of the micro-batch size); with one micro-batch it IS
    # verl's; with several, --normalizer micro is verl's exact form (each micro-batch's own token mean x
    # len(micro) / M). Loss and every gradient equal to 1e-6 in fp32.
    model, ref = tiny_model("qwen2"), tiny_model("qwen2", seed=1)
    prompts, responses, rewards, old = _parity_batch(objective)
    scores = torch.tensor(rewards, dtype=torch.float32)
    lengths = [len(r) for r in responses]
    T = old.shape[1]
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).float()
    kl_coef = 0.001 if objective == "grpo" else 0.0                   # the official GRPO: a k3 KL loss, 0.001
    if objective == "ppo":                                            # per-token A: GAE on the critic's values
        values = torch.randn(12, T, generator=torch.Generator().manual_seed(3)) * mask
        token_rewards = torch.zeros(12, T)
        token_rewards[torch.arange(12), torch.tensor(lengths) - 1] = scores
        official_adv, official_returns = _official_gae_whitened(token_rewards, values, mask)
        adv, returns = ppo.gae_advantages(token_rewards, values, mask)
        torch.testing.assert_close(returns, official_returns * mask, atol=1e-6, rtol=1e-6)
        weights = ppo.masked_whiten(adv, mask)
        torch.testing.assert_close(weights, official_adv * mask, atol=1e-6, rtol=1e-6)
    else:
        mode = {"psr": "positive", "nsr": "negative", "w-reinforce": "weighted", "reinforce": "weighted"}
        lam = {"w-reinforce": 0.1, "reinforce": 1.0}.get(objective, 0.0)  # the yaml's default 1.0 IS reinforce
        official_adv = (_official_grpo_advantage(scores, [i // 4 for i in range(12)]) if objective == "grpo"
                        else _official_psr_nsr_advantage(scores, mode[objective], lam))[:, None] * mask
        weights = nsr.sample_weights(rewards, objective, lam=0.1, group_size=4)
        torch.testing.assert_close(weights[:, None] * mask, official_adv, atol=1e-6, rtol=1e-6)
    subset = nsr.training_subset(rewards, objective)                  # verl: batch.subset(correct / incorrect)
    pick = lambda xs: [xs[i] for i in subset]                          # noqa: E731
    official = _official_update_loss(model, ref, pick(prompts), pick(responses), old[subset],
                                     official_adv[subset], micro, 0.8, 0.2, 0.001, kl_coef)
    expected = [p.grad.clone() for p in model.parameters()]
    for normalizer in (["tokens", "micro"] if micro >= len(subset) else ["micro"]):
        model.zero_grad(set_to_none=True)
        cfg = nsr.Config(objective=objective, micro_batch_size=micro, clip_eps=0.2, clip_low=0.2, clip_high=0.2,
                         mini_batch_size=None, entropy_coef=0.001, kl_coef=kl_coef, normalizer=normalizer,
                         temperature=0.8)
        (mini, rows), = nsr.minibatch_plan(subset, weights, cfg)
        Z = nsr.loss_normalizer(weights[mini], pick(lengths), normalizer)
        params = list(model.parameters())
        run = runs.bare_run(precision.Trainable(model, params, params, None), ref_model=ref)
        batch = nsr.MiniBatch(pick(prompts), pick(responses), [old[i, :lengths[i]].tolist() for i in subset],
                              weights[subset], Z)
        ours = nsr.minibatch_backward(run, batch, cfg, runs.StepStats())
        assert ours == pytest.approx(official, abs=1e-6), normalizer
        for a, b in zip(_grads(model), expected):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parity
def test_with_several_micro_batches_our_default_token_mean_differs_from_verls_and_micro_matches_it():
    # the departure is real (micro-batches of different token counts weigh tokens differently), so the
    # flag that closes it matters: tokens != verl's form, micro == verl's form (above)
    model = tiny_model("qwen2")
    prompts, responses, rewards, old = _parity_batch("nsr")
    weights = nsr.sample_weights(rewards, "reinforce")
    losses = {}
    for normalizer in ("tokens", "micro"):
        cfg = nsr.Config(objective="reinforce", micro_batch_size=5, clip_eps=0.2, clip_low=0.2, clip_high=0.2,
                         mini_batch_size=None, entropy_coef=0.0, kl_coef=0.0, normalizer=normalizer)
        params = list(model.parameters())
        run = runs.bare_run(precision.Trainable(model, params, params, None))
        Z = nsr.loss_normalizer(weights, [len(r) for r in responses], normalizer)
        batch = nsr.MiniBatch(prompts, responses, [old[i, :len(r)].tolist() for i, r in enumerate(responses)],
                              weights, Z)
        losses[normalizer] = nsr.minibatch_backward(run, batch, cfg, runs.StepStats())
    assert abs(losses["tokens"] - losses["micro"]) > 1e-3


@pytest.mark.smoke
def test_in_bf16_the_first_mini_batch_is_exactly_on_policy_with_the_training_forwards_old_logprobs(tmp_path,
                                                                                                  monkeypatch):
    # One step of reinforce in bf16, one mini-batch holding the whole batch, the clip at 0.001 on both
    # sides, random rewards (both signs). Old log-probs by the training forward: the ratio is exactly 1,
    # nothing clips, and the loss is the surrogate at rho = 1, -(1/Z) sum_i w_i |y_i| (its gradient is
    # -w grad log pi's). (The sampler's own log-probs, --old-logprobs sampler, clip tokens on the toy in
    # bf16: docs/training.md has the measurement; this tiny model is too small to show it.)
    world = _tiny_world(tmp_path)
    seen = []
    original = nsr.minibatch_backward

    def spy(run, batch, cfg, stats):
        seen.append((batch.weights.clone(), [len(r) for r in batch.responses], batch.normalizer))
        return original(run, batch, cfg, stats)

    monkeypatch.setattr(nsr, "minibatch_backward", spy)
    cfg = _tiny_config(world, tmp_path / "run", objective="reinforce", dtype="bfloat16", steps=1, batch_prompts=4,
                       group_size=4, mini_batch_size=16, micro_batch_size=16, clip_eps=0.001, clip_low=0.001,
                       clip_high=0.001, entropy_coef=0.0, reward="random")
    metrics = nsr.train(cfg)["metrics"]
    assert metrics["clip_frac_pos"] == 0.0 and metrics["clip_frac_neg"] == 0.0
    (weights, lengths, Z), = seen
    assert metrics["loss"] == pytest.approx(-float((weights * torch.tensor(lengths)).sum()) / Z, rel=1e-6)


def test_grpo_resolves_to_the_official_kl_loss_and_ppo_keeps_its_kl_in_the_reward(tmp_path):
    world = _tiny_world(tmp_path)
    for objective, kl in (("grpo", 0.001), ("ppo", 0.001), ("nsr", 0.0), ("psr", 0.0), ("w-reinforce", 0.0)):
        assert runs.resolve(_tiny_config(world, tmp_path / "r", objective=objective)).kl_coef == kl
    assert runs.resolve(_tiny_config(world, tmp_path / "r", objective="grpo", kl_coef=0.0)).kl_coef == 0.0


@pytest.mark.smoke
def test_bench_gpu_refuses_in_one_line_without_cuda_and_its_check_runs_on_a_tiny_model(tmp_path, capsys, monkeypatch):
    # `python bench.py gpu` on a machine without CUDA: one line, exit status 0. The check itself (one RL step
    # of the preset's settings, the bf16 on-policy check, the sampler's speed) runs on CPU with a tiny
    # architecture: with --old-logprobs training nothing clips at 0.001 in bf16.
    import bench
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as stop:
        bench.main(["gpu"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip().count("\n") == 0
    arch = dict(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=120, tied=True,
                qkv_bias=True, qk_norm=False, max_positions=512)
    out = bench.gpu_check("cpu", arch, 2, 4, 16, tmp_path)
    assert out["training"]["clip_frac_pos"] in (0.0, None) and out["training"]["clip_frac_neg"] in (0.0, None)
    assert (out["training"]["clip_frac_pos"], out["training"]["clip_frac_neg"]) != (None, None)
    assert out["plan_peak_gib"] > 0 and out["generate"]["ours_tok_s"] > 0 and "sampler" in out


# =================================================================================================
# REAL MODELS, PROMPTS AND DATA (nsr.py)
# =================================================================================================
#
# Select with:  python -m pytest -q test_nsr.py -k "template or render_prompt or encode_prompts or load_problems or load_model or preset or memory_plan"
#
PROBLEM = "What is $1+1$?"
# The official strings, written out by hand (not built from nsr's constants).
OFFICIAL_QWEN25_MATH = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                        "What is $1+1$?\nPlease reason step by step, and put your final answer within "
                        "\\boxed{}.<|im_end|>\n<|im_start|>assistant\n")
OFFICIAL_QWEN3_NO_THINKING = OFFICIAL_QWEN25_MATH + "<think>\n\n</think>\n\n"
OFFICIAL_LLAMA3 = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful "
                   "assistant.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhat is $1+1$?\nPlease "
                   "reason step by step, and put your final answer within \\boxed{}.<|eot_id|>"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n")
OFFICIAL_PLAIN = "What is $1+1$?\nPlease reason step by step, and put your final answer within \\boxed{}.\n"


@pytest.mark.parity
def test_templates_render_exactly_the_official_prompt_strings():
    assert loading.render_prompt(None, PROBLEM, "qwen2.5-math") == OFFICIAL_QWEN25_MATH
    assert loading.render_prompt(None, PROBLEM, "qwen3") == OFFICIAL_QWEN3_NO_THINKING
    assert loading.render_prompt(None, PROBLEM, "llama3") == OFFICIAL_LLAMA3
    assert loading.render_prompt(None, PROBLEM, "plain") == OFFICIAL_PLAIN


@pytest.mark.parity
def test_auto_template_through_the_real_qwen_chat_templates_gives_the_official_strings():
    assert loading.render_prompt(chat_tokenizer(QWEN25_CHAT_TEMPLATE), PROBLEM) == OFFICIAL_QWEN25_MATH
    # Qwen3's template in non-thinking mode (enable_thinking=False) opens the empty think block.
    assert loading.render_prompt(chat_tokenizer(QWEN3_CHAT_TEMPLATE), PROBLEM) == OFFICIAL_QWEN3_NO_THINKING
    assert loading.render_prompt(chat_tokenizer(None), PROBLEM) == OFFICIAL_PLAIN


def test_llama_3_1_chat_template_differs_from_the_llama3_template_only_by_its_date_lines():
    # Our "llama3" template leaves out the "Cutting Knowledge Date / Today Date" lines that Llama 3.1+
    # templates put into the system turn (3.2 writes TODAY's date there, so prompts would change with
    # the calendar); "auto" keeps them. Everything else is identical.
    auto = loading.render_prompt(chat_tokenizer(LLAMA31_CHAT_TEMPLATE), PROBLEM, "auto")
    date_lines = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
    assert date_lines in auto
    assert auto.replace(date_lines, "") == loading.render_prompt(None, PROBLEM, "llama3")


def test_encode_prompts_gives_exactly_one_bos_for_a_rendered_llama3_prompt_and_round_trips():
    tokenizer = chat_tokenizer(LLAMA31_CHAT_TEMPLATE, add_bos=True)
    bos = tokenizer.bos_token_id
    for template in ("llama3", "auto", "plain"):
        ids, kept, skipped = loading.encode_prompts(tokenizer, [{"problem": PROBLEM, "answer": "2"}], template)
        assert ids[0][0] == bos and ids[0][1] != bos and ids[0].count(bos) == 1, template
        rendered = loading.render_prompt(tokenizer, PROBLEM, template)
        assert tokenizer.decode(ids[0]) == (rendered if template != "plain" else "<|begin_of_text|>" + rendered)


def test_render_prompt_rejects_an_unknown_template_by_name():
    with pytest.raises(ValueError, match="unknown template 'qwen4'"):
        loading.render_prompt(None, PROBLEM, "qwen4")


def test_encode_prompts_skips_and_counts_prompts_longer_than_max_prompt_len():
    tokenizer = chat_tokenizer(QWEN3_CHAT_TEMPLATE)
    problems = [{"problem": "x" * n, "answer": str(n)} for n in (1, 50, 2, 80)]
    full, _, none_skipped = loading.encode_prompts(tokenizer, problems)
    limit = len(full[0]) + 10                       # keeps the 1- and 2-character problems only
    ids, kept, skipped = loading.encode_prompts(tokenizer, problems, max_prompt_len=limit)
    assert none_skipped == 0 and skipped == 2
    assert [p["answer"] for p in kept] == ["1", "2"] and ids == [full[0], full[2]]


PAPER_SPLITS = [("math_train.jsonl", 7498), ("math_test.jsonl", 5000), ("aime2025.jsonl", 30),
                ("amc23.jsonl", 40)]


@needs_shared_data
@pytest.mark.parametrize("name,count", PAPER_SPLITS)
def test_load_problems_reads_the_papers_splits_with_a_non_empty_answer_each(name, count):
    # math_train.jsonl has 7,500 lines, but lines 5342 and 5344 have no answer at all (answer "" and an
    # empty \boxed{} in the solution): they are skipped with a warning naming them.

    pytest.importorskip("verifier")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        problems = loading.load_problems(SHARED_DATA / name)
    assert len(problems) == count
    assert all(p["answer"].strip() and p["problem"].strip() for p in problems)
    skipped = [str(w.message) for w in caught if "without an answer" in str(w.message)]
    assert skipped == ([f"{SHARED_DATA / name}: skipped 2 record(s) without an answer, at line(s) 5342, 5344"]
                       if name == "math_train.jsonl" else [])


def test_load_problems_names_file_and_line_of_a_malformed_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"problem": "1+1", "answer": "2"}\n\n{"problem": "2+2", "answer": 4\n')
    with pytest.raises(ValueError, match=f"{path}:3: malformed JSON"):
        loading.load_problems(path)


def test_load_problems_names_the_missing_field_file_and_line(tmp_path):
    path = tmp_path / "fields.jsonl"
    path.write_text('{"problem": "1+1", "answer": "2"}\n{"question": "2+2", "answer": "4"}\n')
    with pytest.raises(ValueError, match=f"{path}:2: missing field 'problem'"):
        loading.load_problems(path)
    with pytest.raises(ValueError, match=f"{path}:1: missing field 'question'"):
        loading.load_problems(path, problem_field="question")
    path.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": "2+2", "gold": "4"}\n')
    with pytest.raises(ValueError, match=f"{path}:2: missing field 'answer'"):
        loading.load_problems(path)


def test_load_problems_uses_configurable_field_names(tmp_path):
    path = tmp_path / "renamed.jsonl"
    path.write_text('{"question": "2+2", "gold": 4}\n{"question": "9*3", "gold": 27.0}\n{"question": "1/2", "gold": 0.5}\n')
    assert loading.load_problems(path, problem_field="question", answer_field="gold") == [
        {"problem": "2+2", "answer": "4"}, {"problem": "9*3", "answer": "27"}, {"problem": "1/2", "answer": "0.5"}]


def test_load_problems_takes_a_missing_answer_from_the_last_boxed_of_the_solution(tmp_path):
    pytest.importorskip("verifier")
    path = tmp_path / "math.jsonl"
    path.write_text('{"problem": "p", "solution": "First \\\\boxed{1}, finally \\\\boxed{\\\\frac{1}{2}}."}\n')
    assert loading.load_problems(path) == [{"problem": "p", "answer": "\\frac{1}{2}"}]


def test_load_problems_rejects_an_empty_file_and_a_missing_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(ValueError, match=f"{path}: no problems"):
        loading.load_problems(path)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        loading.load_problems(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("arch", ARCHS)
def test_load_model_loads_a_saved_tiny_model_offline_with_a_pad_id_and_chat_stop_tokens(tmp_path, arch):
    tokenizer = chat_tokenizer(QWEN3_CHAT_TEMPLATE)
    tokenizer.pad_token = None                       # like Llama 3: no pad token shipped
    tiny_model(arch, vocab_size=len(tokenizer)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, loaded = loading.load_model(tmp_path, dtype="bfloat16", device="cpu")
    assert next(model.parameters()).dtype == torch.bfloat16 and not model.training
    assert loaded.pad_token_id == loaded.eos_token_id == 2           # pad falls back to eos
    stops = model.generation_config.eos_token_id
    vocab = loaded.get_vocab()
    assert {vocab["<|im_end|>"], vocab["<|endoftext|>"], vocab["<|eot_id|>"]} <= set(stops)
    model32, _ = loading.load_model(tmp_path, device="cpu")                # "auto" = fp32 on CPU
    assert next(model32.parameters()).dtype == torch.float32
    with pytest.raises(ValueError, match="dtype must be one of"):
        loading.load_model(tmp_path, dtype="fp8")


@pytest.mark.parity
def test_memory_plan_parameter_counts_equal_transformers_models_built_from_the_table():
    # Each table entry, built as the real transformers class on the meta device (no memory), has
    # exactly param_count() parameters; and the sizes are the published ones (1.54B, 7.62B, ...).

    published = {"Qwen/Qwen2.5-Math-1.5B": 1.54, "Qwen/Qwen2.5-Math-7B": 7.62, "Qwen/Qwen2.5-0.5B-Instruct": 0.49,
                 "Qwen/Qwen3-0.6B": 0.60, "meta-llama/Llama-3.2-1B-Instruct": 1.24}
    for name, a in presets.ARCHITECTURES.items():
        config_cls, model_cls = ((Qwen3Config, Qwen3ForCausalLM) if a["qk_norm"] else
                                 (Qwen2Config, Qwen2ForCausalLM) if a["qkv_bias"] else (LlamaConfig, LlamaForCausalLM))
        config = config_cls(hidden_size=a["hidden"], num_hidden_layers=a["layers"], num_attention_heads=a["heads"],
                            num_key_value_heads=a["kv_heads"], head_dim=a["head_dim"],
                            intermediate_size=a["intermediate"], vocab_size=a["vocab"],
                            tie_word_embeddings=a["tied"])
        with torch.device("meta"):
            model = model_cls(config)
        assert sum(p.numel() for p in model.parameters()) == presets.param_count(a), name
        assert round(presets.param_count(a) / 1e9, 2) == published[name], name


@pytest.mark.parametrize("arch", ARCHS)
def test_memory_plan_reads_architecture_numbers_from_a_local_model_dir_and_counts_its_parameters(tmp_path, arch):
    model = tiny_model(arch)
    model.save_pretrained(tmp_path)
    assert presets.param_count(presets.arch_from_config(tmp_path)) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("preset", ["qwen2.5-0.5b-instruct", "qwen3-0.6b", "llama-3.2-1b-instruct"])
def test_memory_plan_of_every_preset_fits_24_gib_and_sets_only_config_fields(preset):
    plan = presets.memory_plan(nsr.Config(**presets.PRESETS[preset]))
    n, cfg = plan["params"], presets.PRESETS[preset]
    bf16 = cfg["dtype"] == "bfloat16"
    assert plan["weights"] == plan["gradients"] == (2 if bf16 else 4) * n
    # fp32 masters + their grads (bf16 or offloaded) + AdamW m, v: 16 or 8 bytes/param
    assert plan["fp32_state"] == (16 if bf16 or cfg.get("optimizer_offload") else 8) * n
    no_ckpt = presets.memory_plan(nsr.Config(**dict(cfg, grad_checkpointing="off")))
    assert plan["activations"] < no_ckpt["activations"] / 5
    assert plan["fits"] and plan["peak"] <= 24 * 2 ** 30
    assert cfg["lr"] == 1e-6 and cfg["temperature"] == 1.0 and cfg["group_size"] == 8
    assert plan["seq_len"] <= presets.ARCHITECTURES[cfg["model"]]["max_positions"]
    assert set(cfg) <= {f.name for f in dataclasses.fields(nsr.Config)}
    assert settings.parse_config(nsr.Config, ["--preset", preset, "--dry-run"], nsr.TOY_DEFAULTS).model == cfg["model"]


def test_memory_plan_matches_a_by_hand_estimate_and_shows_why_1_5b_and_7b_do_not_fit():
    run = dict(model="Qwen/Qwen2.5-Math-1.5B", dtype="bfloat16", batch_prompts=32, group_size=8,
               max_prompt_len=1024, max_new_tokens=3072, micro_batch_size=1, grad_checkpointing="on",
               chunk_size=32)
    plan = presets.memory_plan(nsr.Config(**run))
    # by hand: 28 layers x 2 (k, v) x 2 kv heads x 128 dims x 4096 tokens x 32 rows x 2 bytes = 3.5 GiB
    assert plan["kv_cache"] == 28 * 2 * 2 * 128 * 4096 * 32 * 2 == int(3.5 * 2 ** 30)
    # logits, as train() computes them: with checkpointing the output layer runs over chunks of
    # head_chunk = 128 positions, so 1 sequence x 128 positions x 151936 vocab x (2 + 4 + 4) bytes;
    # without it, logits of the 3072 response positions only (logits_to_keep), never the prompt's
    assert plan["logits"] == 128 * 151936 * 10
    assert presets.memory_plan(nsr.Config(**dict(run, grad_checkpointing="off")))["logits"] == 3072 * 151936 * 10
    # 20 bytes/param for bf16 + fp32 master: 1.54e9 x 20 = 28.8 GiB before any activation
    assert not plan["fits"] and plan["peak"] > 20 * plan["params"]
    offloaded = presets.memory_plan(nsr.Config(**dict(run, optimizer_offload=True)))      # the GPU keeps 2 + 2 + 4 B/param
    assert offloaded["fits"] and offloaded["cpu_ram"] == 16 * plan["params"]
    assert offloaded["peak_training"] == (offloaded["weights"] + offloaded["gradients"] + 4 * plan["params"]
                                          + offloaded["activations"] + offloaded["logits"] + 2 ** 30)
    # ppo's critic is a second copy: its weights on the GPU, its fp32 state in CPU RAM as well
    assert offloaded["ppo_peak"] == offloaded["peak"] + offloaded["weights"] and offloaded["ppo_fits"]
    assert offloaded["ppo_cpu_ram"] == 2 * offloaded["cpu_ram"]
    assert not presets.memory_plan(nsr.Config(**dict(run, model="Qwen/Qwen2.5-Math-7B", optimizer_offload=True)))["fits"]
    # the preset is exactly this run with the paper's update, and fits
    assert presets.memory_plan(nsr.Config(**presets.PRESETS["qwen2.5-math-1.5b"]))["fits"]


@pytest.mark.smoke
@pytest.mark.parametrize("arch", ARCHS)
def test_load_model_and_template_auto_run_one_training_step_and_an_evaluation_end_to_end(tmp_path, arch):
    # The real-model path on a tiny random model of each architecture: a locally built tokenizer with
    # the family's own chat template, a MATH-style train file (answer from the solution's \\boxed{}),
    # template "auto", one NSR step, an evaluation before and after, a checkpoint load_model reads back.

    pytest.importorskip("verifier")
    template = {"qwen2": QWEN25_CHAT_TEMPLATE, "qwen3": QWEN3_CHAT_TEMPLATE, "llama": LLAMA31_CHAT_TEMPLATE}[arch]
    tokenizer = chat_tokenizer(template, add_bos=arch == "llama")
    world = tmp_path / "world"
    tiny_model(arch, vocab_size=len(tokenizer)).save_pretrained(world)
    tokenizer.save_pretrained(world)
    (world / "train.jsonl").write_text("".join(json.dumps({"problem": f"{a}+{a}", "solution": f"So \\boxed{{{2 * a}}}."}) + "\n"
                                               for a in range(1, 5)))
    (world / "test.jsonl").write_text("".join(json.dumps({"problem": f"{a}*2", "answer": str(2 * a)}) + "\n"
                                              for a in range(1, 2)))
    cfg = nsr.Config(model=str(world), train=str(world / "train.jsonl"), eval=[str(world / "test.jsonl")],
                     template="auto", steps=1, batch_prompts=1, group_size=2, max_new_tokens=3, lr=1e-3,
                     micro_batch_size=2, eval_n=2, out_dir=str(tmp_path / "run"), device="cpu", seed=0,
                     max_prompt_len=400)
    result = nsr.train(cfg)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1]
    assert set(result["evals"]["test"]) == {0, 1}
    assert all(r["num_problems"] == 1 and r["n"] == 2 for r in result["evals"]["test"].values())
    model, loaded = loading.load_model(runs.latest_checkpoint(tmp_path / "run"), device="cpu")
    assert loading.render_prompt(loaded, "1+1") == loading.render_prompt(tokenizer, "1+1")   # chat template kept


def test_format_memory_plan_prints_every_component_and_the_verdict():
    text = presets.format_memory_plan(presets.memory_plan(nsr.Config(**presets.PRESETS["qwen3-0.6b"])))
    for label in ("weights", "gradients", "fp32 masters + grads + AdamW", "checkpointing on", "logits",
                  "KV cache while sampling", "PEAK while training", "fits", "with --objective ppo"):
        assert label in text
    assert "CPU RAM" in presets.format_memory_plan(presets.memory_plan(nsr.Config(**presets.PRESETS["qwen2.5-math-1.5b"])))
    assert "ESTIMATE" in text





# =================================================================================================
# REPRODUCTION (reproduce.py)
# =================================================================================================
#
# Select with:  python -m pytest -q test_nsr.py -k reproduce

def _summary(counts: dict, entropy: dict, seeds=(0, 1)) -> dict:
    """A synthetic summary.json: counts[method] = per-problem correct counts (out of 256), the same for
    every training seed and split; entropy[method] = mean_entropy."""
    runs = []
    for method, c in counts.items():
        for t in ([None] if method == "base" else seeds):
            for split in reproduce.SPLITS:
                runs.append({"method": method, "recipe_seed": 0, "train_seed": t, "split": split,
                             "counts": list(c), "mean_entropy": entropy[method]})
    return {"n": 256, "ks": reproduce.KS, "runs": runs}


def test_reproduce_verdicts_hold_for_the_papers_pattern_and_fail_for_its_opposite():
    base = [2, 5, 10, 40, 120, 200] * 8                 # a spread of easy and hard problems
    better = [4, 9, 20, 60, 160, 230] * 8               # higher at every k
    narrow = [0, 0, 0, 90, 250, 256] * 8                # Pass@1 up, three problems lost at k = 256
    both = [3, 8, 25, 110, 250, 256] * 8                # the best Pass@1, and every problem kept
    paper = _summary({"base": base, "nsr": better, "psr": narrow, "w-reinforce": both},
                     {"base": 0.5, "nsr": 0.55, "psr": 0.3, "w-reinforce": 0.5})
    found = {f["finding"]: f["verdict"] for f in reproduce.verdicts(paper, reproduce.bootstrap(paper, 300))}
    assert found == {"a": "holds", "b": "holds", "c": "holds", "d": "holds"}
    opposite = _summary({"base": base, "nsr": narrow, "psr": better, "w-reinforce": narrow},
                        {"base": 0.5, "nsr": 0.3, "psr": 0.6, "w-reinforce": 0.5})
    found = {f["finding"]: f["verdict"] for f in reproduce.verdicts(opposite, reproduce.bootstrap(opposite, 300))}
    assert found == {"a": "fails", "b": "fails", "c": "fails", "d": "fails"}


def test_reproduce_judges_each_recipe_seed_alone_on_its_own_runs():
    base = [2, 5, 10, 40, 120, 200] * 8
    better = [4, 9, 20, 60, 160, 230] * 8
    narrow = [0, 0, 0, 90, 250, 256] * 8
    good = _summary({"base": base, "nsr": better}, {"base": 0.5, "nsr": 0.55})
    bad = _summary({"base": base, "nsr": narrow}, {"base": 0.5, "nsr": 0.3})
    for r in bad["runs"]:
        r["recipe_seed"] = 7
    both = dict(good, runs=good["runs"] + bad["runs"])
    by_seed = reproduce.verdicts_by_recipe_seed(both, resamples=200)
    assert sorted(by_seed) == [0, 7]
    assert by_seed[0][0]["finding"] == "a" and by_seed[0][0]["verdict"] == "holds"
    assert by_seed[7][0]["verdict"] == "fails"           # NSR loses 3 of 6 problem kinds at k = 256 there


def test_reproduce_bootstrap_is_paired_so_identical_models_differ_by_exactly_zero():
    base = [1, 30, 100, 255] * 10
    same = _summary({"base": base, "nsr": base}, {"base": 0.5, "nsr": 0.5})
    draws = reproduce.bootstrap(same, 100)
    assert reproduce.verdicts(same, draws)[0]["verdict"] == "holds"       # (a): equal is >= (margin 1 point)
    for split in reproduce.SPLITS:
        np.testing.assert_allclose(draws[("nsr", split)], draws[("base", split)], rtol=0, atol=1e-9)
        assert not np.allclose(draws[("base", split)][:, 0], draws[("base", split)][0, 0])   # it does resample
    # the point estimate of the table is the mean over runs: a method's counts of all runs concatenated
    assert "Base" in reproduce.tables(same) and "NSR" in reproduce.tables(same)


@pytest.mark.slow
@pytest.mark.smoke
def test_reproduce_runs_every_method_on_the_quick_toy_writes_summary_json_and_resumes(tmp_path, capsys):
    argv = ["--quick", "--bases", str(tmp_path / "bases"), "--out", str(tmp_path / "out"), "--jobs", "1",
            "--seeds", "0", "--set", "steps=2", "--set", "batch_prompts=2", "--set", "group_size=4",
            "--methods", *reproduce.METHODS]
    assert reproduce.main(argv) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["n"] == 1024 and summary["ks"] == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert {(r["method"], r["split"]) for r in summary["runs"]} == \
           {(m, s) for m in ("base",) + reproduce.METHODS for s in reproduce.SPLITS}
    base_runs = [r for r in summary["runs"] if r["method"] == "base"]
    assert all(r["train_seed"] is None and len(r["counts"]) == 4 for r in base_runs)
    assert {f["finding"] for f in summary["verdicts"]} == {"a", "b", "c", "d"}
    assert {(v["method"], v["split"]) for v in summary["variance"]} == \
           {(m, s) for m in reproduce.METHODS for s in reproduce.SPLITS}
    assert all(set(v["terms"]) == {"estimator", "training seed", "problem sample", "base"} for v in summary["variance"])
    out = capsys.readouterr().out
    assert "(a) NSR >= base" in out and "PPO" in out and "where the interval comes from" in out
    # a second call finds every result on disk and runs nothing again
    stamp = {p: p.stat().st_mtime for p in (tmp_path / "out").glob("*/result.json")}
    assert reproduce.main(argv) == 0
    assert {p: p.stat().st_mtime for p in (tmp_path / "out").glob("*/result.json")} == stamp


def test_reproduce_coverage_counts_kept_lost_gained_and_neither_per_run_against_its_own_base():
    base = [0, 3, 5, 0, 10]                    # solves problems 1, 2, 4 at k = n
    a = [0, 0, 5, 0, 2]                        # kept 2 and 4, lost 1, gained none, neither 0 and 3
    b = [0, 4, 0, 7, 0]                        # kept 1, lost 2 and 4, gained 3, neither 0
    summary = {"runs": [{"method": "base", "recipe_seed": 0, "train_seed": None, "split": s, "counts": base}
                        for s in reproduce.SPLITS] +
                       [{"method": "nsr", "recipe_seed": 0, "train_seed": t, "split": s, "counts": c}
                        for t, c in ((0, a), (1, b)) for s in reproduce.SPLITS]}
    rows = reproduce.coverage(summary)
    assert [(r["method"], r["split"]) for r in rows] == [("nsr", "test_easy"), ("nsr", "test_hard")]
    row = rows[0]
    assert (row["kept"], row["lost"], row["gained"], row["neither"], row["runs"]) == (1.5, 1.5, 0.5, 1.5, 2)
    assert (row["kept_range"], row["lost_range"], row["gained_range"], row["neither_range"]) == \
           ([1, 2], [1, 2], [0, 1], [1, 2])
    assert "NSR" in reproduce.format_coverage(rows, 256)


def test_reproduce_entropy_bootstrap_resamples_runs_not_splits_and_recipe_seeds_first():
    # each run's split differences (-0.2, 0.0) are ONE unit (-0.1): every draw is exactly -0.1
    runs_ = [{"method": "base", "recipe_seed": 0, "train_seed": None, "split": s, "counts": [1], "mean_entropy": 0.5}
             for s in reproduce.SPLITS]
    for t in (0, 1):
        for s, psr in zip(reproduce.SPLITS, (0.3, 0.5)):
            runs_ += [{"method": "psr", "recipe_seed": 0, "train_seed": t, "split": s, "counts": [1], "mean_entropy": psr},
                      {"method": "nsr", "recipe_seed": 0, "train_seed": t, "split": s, "counts": [1],
                       "mean_entropy": psr + 0.05}]
    a, b = reproduce.entropy_draws({"runs": runs_}, resamples=50)
    np.testing.assert_allclose(a, -0.1)
    np.testing.assert_allclose(b, 0.05)


@pytest.mark.slow
@pytest.mark.smoke
def test_reproduce_sweep_labels_each_value_and_judges_only_the_unswept_runs(tmp_path, capsys):
    argv = ["--quick", "--bases", str(tmp_path / "bases"), "--out", str(tmp_path / "out"), "--jobs", "1",
            "--seeds", "0", "--methods", "psr", "nsr", "w-reinforce", "--sweep", "lam=0,1", "--set", "steps=2", "--n", "256",
            "--set", "batch_prompts=2", "--set", "group_size=4"]
    assert reproduce.main(argv) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    labels = {r["method"] for r in summary["runs"]}
    assert labels == {"base", "psr", "nsr", "w-reinforce", "psr[lam=0]", "psr[lam=1]", "nsr[lam=0]", "nsr[lam=1]",
                      "w-reinforce[lam=0]", "w-reinforce[lam=1]"}
    configs = {json.loads((pathlib.Path(d) / "job.json").read_text())["key"]: d for d in (tmp_path / "out").iterdir()
               if (d / "job.json").is_file()}
    assert json.loads((tmp_path / "out" / "r0-w-reinforce-lam-1-t0" / "config.json").read_text())["lam"] == 1.0
    assert len(configs) == 10
    assert {f["finding"] for f in summary["verdicts"]} == {"a", "b", "c", "d"}   # from the unswept runs
    assert {(r["method"], r["split"]) for r in summary["coverage"]} == \
           {(m, s) for m in labels - {"base"} for s in reproduce.SPLITS}
    assert set(summary["dynamics"]) == labels - {"base"}
    assert set(summary["cells"]) == labels and set(summary["cells"]["nsr[lam=1]"]) == set(reproduce.SPLITS)
    for row in summary["cells"]["w-reinforce[lam=0]"].values():      # [mean, lo, hi] for each quantity
        assert set(row) == {"pass@1", "pass@256", "minus_base@256", "entropy"}
        assert all(v[1] - 1e-9 <= v[0] <= v[2] + 1e-9 for v in row.values())
    assert summary["dynamics"]["nsr"]["step"] == [1, 2] and len(summary["dynamics"]["nsr"]["reward"]) == 2
    assert summary["settings"]["sweeps"] == [{"field": "lam", "values": [0.0, 1.0]}]
    out = capsys.readouterr().out
    assert "W-REINFORCE[lam=1]" in out and "coverage at k = n = 256" in out


def test_reproduce_estimator_variance_is_unbiased_for_the_variance_of_the_pass_at_k_estimate():
    # E over c ~ Binomial(n, p) of v(c) equals the exact variance of the estimate (n >= 2k), for any p
    for n, k, p in ((64, 16, 0.07), (64, 32, 0.01), (40, 8, 0.5)):
        c = np.arange(n + 1)
        pmf = np.array([math.comb(n, j) * p ** j * (1 - p) ** (n - j) for j in c])
        estimate = np.array([passk.pass_at_k(n, int(j), k) for j in c])
        exact = pmf @ estimate ** 2 - (pmf @ estimate) ** 2
        assert math.isclose(pmf @ reproduce.estimator_variance(c, n, k) / 1e4, exact, rel_tol=1e-9)
        assert math.isclose(reproduce.plugin_variance(p, n, k), exact, rel_tol=1e-9)
    # n = k: the estimate is "any of n right", a Bernoulli; below 2k the plug-in at c / n is used
    assert math.isclose(reproduce.estimator_variance([3], 8, 8)[0] / 1e4, reproduce.plugin_variance(3 / 8, 8, 8))
    assert reproduce.estimator_variance([0, 8], 8, 2).tolist() == [0.0, 0.0]   # all wrong / all right: certain


def test_reproduce_variance_components_split_identical_seeds_into_problems_and_the_estimator_only():
    base = [1, 2, 3, 0, 5, 1, 0, 2] * 4                 # hard problems: Pass@256 from 0 to ~75%
    nsr_counts = [3, 0, 1, 6, 0, 2, 4, 0] * 4
    summary = _summary({"base": base, "nsr": nsr_counts}, {"base": 0.5, "nsr": 0.5}, seeds=(0, 1, 2))
    summary["n"] = 1024
    row = next(r for r in [reproduce.variance_components(summary, "nsr", "test_hard")])
    assert (row["R"], row["T"], row["P"], row["n"]) == (1, 3, 32, 1024)
    # three identical training runs: no seed term; the per-problem spread of D is the problem term plus v_base
    assert row["per_unit"]["seed"] == 0.0 and row["per_unit"]["interaction"] == 0.0 and row["per_unit"]["base"] is None
    d = reproduce.passk_matrix(nsr_counts, 1024)[:, -1] - reproduce.passk_matrix(base, 1024)[:, -1]
    v_base = reproduce.estimator_variance(base, 1024, 256).mean()
    assert math.isclose(row["per_unit"]["problem"], d.var(ddof=1) - v_base, rel_tol=1e-9)
    assert math.isclose(row["estimate"], d.mean(), rel_tol=1e-12)
    v_method = reproduce.estimator_variance(nsr_counts, 1024, 256).mean()
    assert math.isclose(row["terms"]["estimator"], v_method / 96 + v_base / 32, rel_tol=1e-9)
    assert math.isclose(row["halfwidth"], 1.96 * math.sqrt(sum(row["terms"].values())), rel_tol=1e-12)
    # projected to 4x the samples, the estimator's term shrinks; measured n projects to itself
    assert row["per_unit"]["v_base_at"]["1024"] == pytest.approx(row["per_unit"]["v_base"], rel=1e-9)
    assert row["per_unit"]["v_base_at"]["2048"] < row["per_unit"]["v_base"]


def test_reproduce_design_terms_divide_each_source_by_the_units_it_is_averaged_over():
    unit = {"v_method": 96.0, "v_base": 32.0, "seed": 6.0, "interaction": 64.0, "problem": 128.0, "base": 9.0,
            "v_method_at": {"512": 192.0}, "v_base_at": {"512": 64.0}}
    terms = reproduce.design_terms(unit, R=3, T=2, P=16)
    assert terms == {"estimator": 96 / 96 + 32 / 48, "training seed": (6 + 64 / 16) / 6,
                     "problem sample": 128 / 48, "base": 3.0}
    assert reproduce.design_terms(unit, R=3, T=2, P=16, n=512)["estimator"] == 192 / 96 + 64 / 48


def test_reproduce_bootstrap_halfwidth_counts_each_base_s_own_noise_twice_as_the_two_level_bootstrap_does():
    unit = {"v_method": 96.0, "v_base": 32.0, "seed": 6.0, "interaction": 64.0, "problem": 128.0, "base": 9.0}
    within = 96 / 64 + 32 / 16 + (6 + 64 / 16) / 4 + 128 / 16       # one base's mean: T = 4, P = 16
    assert reproduce.bootstrap_halfwidth(unit, 1, 4, 16) == pytest.approx(1.96 * within ** 0.5)   # no base term
    assert reproduce.bootstrap_halfwidth(unit, 3, 4, 16) == pytest.approx(1.96 * (2 / 9 * (9 + within) + within / 3) ** 0.5)
    assert reproduce.bootstrap_halfwidth(unit, 3, 4, 16, base=0.0) == pytest.approx(1.96 * (5 / 9 * within) ** 0.5)


def test_reproduce_project_prints_one_row_per_design_with_the_bootstrap_half_width_and_the_expected_minutes():
    base = [1, 2, 3, 0, 5, 1, 0, 2] * 4
    summary = _summary({"base": base, "psr": [3, 0, 1, 6, 0, 2, 4, 0] * 4, "nsr": [2, 1, 3, 1, 4, 0, 1, 2] * 4},
                       {"base": 0.5, "psr": 0.4, "nsr": 0.45}, seeds=(0, 1))
    summary["n"] = 1024
    text = reproduce.projection(summary, Rs=(3, 9), seeds=(1, 2), ns=(1024,), bases=(0, 10))
    for method in ("psr", "nsr"):
        u = reproduce.variance_components(summary, method, "test_hard", ns=(1024,))["per_unit"]
        block = text.split(reproduce.display(method) + " (")[1].split("\n\n")[0].splitlines()[2:]
        assert len(block) == 4                                   # (R, T) = (3, 1), (3, 2), (9, 1), (9, 2)
        for line, (R, T) in zip(block, [(3, 1), (3, 2), (9, 1), (9, 2)]):
            cells = line.split()
            jobs = [{"method": "base"}] * R + [{"method": "psr"}] * (3 * R * T)
            minutes = reproduce.expected_seconds(jobs, 2, cost=lambda j: reproduce.job_cost(j["method"], 1024, False)) / 60
            assert [int(cells[0]), int(cells[1]), int(cells[2]), int(cells[3])] == [R, T, 1024, round(minutes)]
            assert [float(c) for c in cells[4:]] == [round(reproduce.bootstrap_halfwidth(u, R, T, 32, 1024, b), 1)
                                                     for b in (0, 10)]
        # more bases narrow the interval at any between-base variance
        assert float(block[2].split()[-1]) < float(block[0].split()[-1])


def test_reproduce_expected_time_runs_the_bases_then_the_training_jobs_on_the_first_free_process():
    assert reproduce.schedule_seconds([100, 100, 100], 2) == 200
    assert reproduce.schedule_seconds([30, 10, 10, 10], 2) == 30
    assert reproduce.schedule_seconds([], 2) == 0
    jobs = [{"method": "base"}] * 3 + [{"method": "nsr"}] * 5
    cost = {"base": 100.0, "nsr": 10.0}
    assert reproduce.expected_seconds(jobs, 2, cost=lambda j: cost[j["method"]]) == 200 + 30
    assert reproduce.expected_seconds(jobs, 1, cost=lambda j: cost[j["method"]]) == 300 + 50


def test_reproduce_a_job_costs_its_training_and_its_evaluation_at_its_n_and_nothing_when_done(tmp_path):
    job = {"method": "w-reinforce[lam=1]", "n": 512, "run_dir": str(tmp_path / "run"), "key": "k1"}
    seconds = reproduce.SECONDS
    assert reproduce.job_seconds(job) == seconds["train"]["w-reinforce"] + 2 * seconds["eval_per_256"]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "result.json").write_text(json.dumps({"key": "k1"}))
    assert reproduce.job_seconds(job) == 0.0


@pytest.mark.parametrize("extra, message", [(["--set", "lr"], "expected FIELD=VALUE"),
                                            (["--set", "nope=1"], "expected FIELD=VALUE"),
                                            (["--set", "lr=-1"], "--lr must be > 0"),
                                            (["--seeds", "0", "0"], "must be distinct"),
                                            (["--jobs", "0"], "--jobs must be >= 1"),
                                            (["--sweep", "objective=psr,nsr"], "objective is set by each job"),
                                            (["--set", "lr=fast"], "'fast' is not a float")])
def test_reproduce_rejects_bad_flags_before_any_work(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit):
        reproduce.main(["--out", str(tmp_path / "never"), *extra])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "never").exists()



# =================================================================================================
# THE ASSIGNMENT KIT (assignment.py)
# =================================================================================================
#
# Select with:  python -m pytest -q test_nsr.py -k assignment
#
# The handout's test_nsr.py has no such section: these tests grade against the reference checkout (which a
# handout is not) and list the routes to the reference that the grader closes.

# HANDOUT: cut (the kit's own tests)
import os                                                           # noqa: E402 (the section's own imports)
import subprocess                                                   # noqa: E402
import tempfile                                                     # noqa: E402

import assignment                                                   # noqa: E402


@pytest.fixture(scope="module")
def handout_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("kit") / "handout"
    assignment.handout(out)
    return out


def test_assignment_markers_name_at_least_six_problems_each_with_checks_and_points():
    problems = assignment.find_problems()
    assert len([p for p in problems if not p.bonus]) >= 6
    assert {p.id for p in problems} == set(assignment.CHECKS)
    assert sum(p.points for p in problems if not p.bonus) == 100
    names = {n for n, _ in ((name, None) for name in dir(sys.modules[__name__]) if name.startswith("test_"))}
    for p in problems:                                              # every visible test exists in this file
        assert set(assignment.CHECKS[p.id]["tests"]) <= names, p.id


def test_assignment_handout_keeps_every_signature_and_docstring_and_no_reference_body(handout_dir):
    for p in assignment.find_problems():
        ref = assignment.locate(pathlib.Path(p.file).read_text(), p.qualname)
        stub = assignment.locate((handout_dir / p.file).read_text(), p.qualname)
        assert ast.dump(ref.args) == ast.dump(stub.args) and ast.get_docstring(ref) == ast.get_docstring(stub), p.id
        assert ast.dump(stub.body[-1]) == ast.dump(ast.parse(assignment.STUB.format(id=p.id)).body[0])
    texts = {f: f.read_text() for f in handout_dir.rglob("*") if f.is_file() and f.suffix in (".py", ".md")}
    cuts = re.findall(r"(?ms)^[ \t]*# HANDOUT: cut\b.*?^[ \t]*# HANDOUT: end[^\n]*\n", (HERE / "test_nsr.py").read_text())
    assert cuts and not any(cut in texts[handout_dir / "test_nsr.py"] for cut in cuts)   # cut regions are cut
    for p in assignment.find_problems():                            # no line of a reference body anywhere
        for line in assignment.body_lines(pathlib.Path(p.file).read_text(), p):
            assert not any(line in text for text in texts.values()), (p.id, line)
    assert not (handout_dir / "runs").exists() and (handout_dir / "HANDOUT.md").is_file()
    assert not (handout_dir / "docs" / "assignment.md").exists()
    with pytest.raises(SystemExit, match="not empty"):
        assignment.handout(handout_dir)


@pytest.mark.slow
@pytest.mark.smoke
def test_assignment_grader_gives_the_handout_zero_and_a_planted_bug_costs_exactly_its_problem(handout_dir, tmp_path):
    blank = assignment.grade(handout_dir)
    assert blank["total"] == 0 and blank["max"] == 100
    assert all(r["points"] == 0 for r in blank["problems"].values())
    # the reference with one plausible bug in the decode step (the temperature ignored), which every sampling
    # test runs through: in isolation only decode_step loses points, every other problem keeps full marks
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in assignment.SOURCES + ("loading.py", "toy.py", "presets.py", "precision.py", "runs.py", "settings.py"):
        shutil.copy(HERE / name, copy / name)
    source = (copy / "sample.py").read_text()
    assert source.count("top_p_filter(logits / temperature, top_p)") == 1
    (copy / "sample.py").write_text(source.replace("top_p_filter(logits / temperature, top_p)", "top_p_filter(logits, top_p)"))
    graded = assignment.grade(copy)
    lost = {pid for pid, r in graded["problems"].items() if r["points"] < r["max"]}
    assert lost == {"decode_step"}, graded
    assert graded["problems"]["decode_step"]["failed"]
    assert graded["total"] == 100 + 10 - (15 - graded["problems"]["decode_step"]["points"])   # bonus gae included
    assert assignment.grade(HERE, only=["decode_step"])["total"] == 15      # the reference's own decode step


@pytest.mark.slow
@pytest.mark.smoke
def test_assignment_grade_prints_a_table_and_its_last_line_is_one_json_object(tmp_path, capsys):
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in assignment.SOURCES:
        shutil.copy(HERE / name, copy / name)
    # (not _box_at: two of its visible tests time themselves against 1 s, which a busy machine can miss)
    assert assignment.main(["grade", str(copy), "--json", "--only", "KVCache.update", "pass_at_k"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert result == {"total": 20.0, "max": 20.0, "problems": {"pass_at_k": {"points": 10.0, "max": 10.0},
                                                               "KVCache.update": {"points": 10.0, "max": 10.0}}}
    assert lines[0].split() == ["problem", "points", "max", "what", "failed"]


@pytest.mark.parametrize("got, tier, why", [
    ({"gain": 40.0, "entropy": 0.05}, "full", None),
    ({"gain": 26.5, "entropy": 0.05}, "full", None),              # the lowest reference gain - 3, inclusive
    ({"gain": 26.4, "entropy": 0.05}, "partial", "gain 26.4 (full: >= 26.5)"),
    ({"gain": 40.0, "entropy": 0.11}, "partial", "final entropy 0.1100 (full: 0.0250-0.0850)"),
    ({"gain": 4.9, "entropy": 0.05}, "none", "tier none"),
    ({"error": "a traceback"}, "none", "a traceback")])
def test_assignment_results_tier_is_judged_against_the_reference_spread_and_says_why(monkeypatch, got, tier, why):
    # reference spread: gain [29.5, 35], entropy [0.04, 0.07] -> full needs gain >= 26.5, entropy in [0.025, 0.085]
    monkeypatch.setattr(assignment, "RESULT_TIERS", {"gain": [29.5, 35.0], "entropy": [0.04, 0.07]})
    monkeypatch.setattr(assignment, "result_run", lambda code, out, seed: dict(got))
    result = assignment.grade_results(HERE)
    assert result["tier"] == tier and result["points"] == assignment.RESULT_POINTS[tier]
    assert (result["failed"] == []) if why is None else (why in result["failed"][0])


def test_assignment_reports_a_failed_process_by_its_exception_not_by_the_progress_bar_drawn_after_it():
    traceback = ("Traceback (most recent call last):\n  File \"sample.py\", line 451, in update\n"
                 "NotImplementedError: KVCache.update: see HANDOUT.md\n\reval test_easy @ step 0:   0%|  | 0/128\n")
    assert assignment.last_error(traceback) == "NotImplementedError: KVCache.update: see HANDOUT.md"
    assert assignment.last_error("x\nnsr.py: error: --lr must be > 0\n") == "nsr.py: error: --lr must be > 0"
    assert assignment.last_error("just a line\n\n") == "just a line" and assignment.last_error("") == "?"


def test_assignment_submit_zips_the_edited_files_the_writeup_and_the_logs_without_checkpoints(handout_dir, tmp_path):
    student = tmp_path / "student"
    shutil.copytree(handout_dir, student)
    (student / "passk.py").write_text((student / "passk.py").read_text() + "\n# my work\n")
    (student / "WRITEUP.md").write_text("answers")
    run = student / "runs" / "nsr-toy"
    (run / "eval").mkdir(parents=True)
    (run / "checkpoint-000010").mkdir()
    for name in ("config.json", "metrics.jsonl", "eval.jsonl", "eval/step000000_test.json",
                 "checkpoint-000010/model.safetensors"):
        (run / name).write_text("{}")
    names = set(zipfile.ZipFile(assignment.submit(student)).namelist())
    assert names == {"passk.py", "WRITEUP.md", "runs/nsr-toy/config.json", "runs/nsr-toy/metrics.jsonl",
                     "runs/nsr-toy/eval.jsonl", "runs/nsr-toy/eval/step000000_test.json"}


# ---- cheating: each route scores 0 and is flagged; honest code keeps its marks ----

_CHEATS = {     # name -> a pass_at_k body that gets the reference's answer without computing it
    "importlib on the checkout": f"""
    import importlib.util
    spec = importlib.util.spec_from_file_location("ref", "{HERE / 'passk.py'}")
    ref = importlib.util.module_from_spec(spec); spec.loader.exec_module(ref)
    return ref.pass_at_k(n, c, k)""",
    "the grader's ../reference path": """
    exec(open("../reference/passk.py").read(), scope := {})
    return scope["pass_at_k"](n, c, k)""",
    "reading the uncut tests": """
    import test_nsr
    return test_nsr.passk.pass_at_k(n, c, k)""",
    "__import__ spelled out": """
    m = __import__("im" + "portlib").import_module("passk")
    return m.pass_at_k(n, c, k)""",
    "getattr on builtins": """
    import builtins
    return getattr(builtins, "ev" + "al")("__import__('passk').pass_at_k")(n, c, k)""",
    "a module another module imported": """
    import toy
    return toy.subprocess.check_output(["cat", "passk.py"])""",
    "the subclasses walk": """
    f = [c for c in ().__class__.__base__.__subclasses__() if c.__name__ == "FileIO"][0]
    return f("/work/main/passk.py").readall()""",
    "sys.modules through an alias": """
    from sys import modules as m
    return m["passk"].pass_at_k(n, c, k)""",
    "a path object's read_text": """
    import nsr
    return nsr.pathlib.Path("../reference/passk.py").read_text()""",
    "torch.load of a file": """
    import torch as t
    return t.load("../reference.pt")""",
    "frames": """
    import torch
    return torch.autograd.function.__builtins__["open"]("x")""",
}


def _with_body(problem_id: str, body: str) -> str:
    """The handout's file of a problem with the function's body replaced by body (its signature kept)."""
    p = next(p for p in assignment.find_problems() if p.id == problem_id)
    source = pathlib.Path(p.file).read_text()
    node = assignment.locate(source, p.qualname)
    head = "".join(source.splitlines(keepends=True)[node.lineno - 1:node.body[0].lineno - 1])
    return assignment.replace_function(source, p.qualname, head + body.strip("\n") + "\n")


@pytest.mark.parametrize("route", sorted(_CHEATS))
def test_assignment_static_check_flags_every_route_to_the_reference_with_its_line(route):
    p = next(p for p in assignment.find_problems() if p.id == "pass_at_k")
    source = _with_body("pass_at_k", _CHEATS[route])
    _, graded = assignment.splice(p, source, (HERE / "passk.py").read_text())
    flagged = assignment.static_check(graded, "passk.py")
    node = assignment.locate(source, "pass_at_k")
    body_lines = range(node.body[0].lineno, node.end_lineno + 1)
    assert flagged, route
    assert all(re.match(r"passk\.py:(\d+): ", f) and int(f.split(":")[1]) in body_lines for f in flagged), flagged


def test_assignment_static_check_passes_every_reference_function_and_honest_helpers():
    for p in assignment.find_problems():
        source = pathlib.Path(p.file).read_text()
        _, graded = assignment.splice(p, source, source)
        assert assignment.static_check(graded, p.file) == [], p.id
    helper = ("import math\nfrom collections import defaultdict\nimport torch.nn.functional as F\n\n"
              "def _my_helper(x):\n    return F.softmax(torch.as_tensor(x), -1).sum().item() + math.pi\n")
    p = next(p for p in assignment.find_problems() if p.id == "pass_at_k")
    _, graded = assignment.splice(p, (HERE / "passk.py").read_text() + "\n" + helper, (HERE / "passk.py").read_text())
    assert len(graded) == 4 and assignment.static_check(graded, "passk.py") == []


_GUARD_PROBE = '''
import collections, dataclasses, importlib.util, io, json, os, pathlib, runpy, socket, subprocess, sys
sys.path.insert(0, {kit!r})
import assignment
sys.path.remove({kit!r})                     # as in a student process: the kit's checkout is not on sys.path
assignment.install_guard(pathlib.Path.cwd())
checkout, outcome = {kit!r}, {{}}
def attempt(name, fn):
    try:
        fn()
        outcome[name] = "allowed"
    except PermissionError:
        outcome[name] = "blocked"
    except Exception as e:
        outcome[name] = "other " + type(e).__name__
attempt("importlib on the checkout", lambda: importlib.util.spec_from_file_location("r", checkout + "/passk.py").loader.get_data(checkout + "/passk.py"))
attempt("../reference", lambda: open("../reference/passk.py").read())
attempt("the uncut tests", lambda: open(checkout + "/test_nsr.py").read())
attempt("runpy", lambda: runpy.run_path(checkout + "/passk.py"))
attempt("io.FileIO", lambda: io.FileIO(checkout + "/passk.py"))
attempt("os.open", lambda: os.open(checkout + "/passk.py", os.O_RDONLY))
attempt("a symlink", lambda: os.symlink(checkout + "/passk.py", "link.py"))
attempt("a process", lambda: subprocess.run(["true"]))
attempt("os.system", lambda: os.system("true"))
attempt("a socket", lambda: socket.create_connection(("127.0.0.1", 9)))
attempt("exec of text", lambda: exec("x = 1"))
attempt("compile of text", lambda: compile("x = 1", "<s>", "exec"))
attempt("import from the checkout", lambda: (sys.path.insert(0, checkout), __import__("bench")))
attempt("listing the grader's directory", lambda: os.listdir(".."))
attempt("listing the checkout", lambda: list(os.scandir(checkout)))
attempt("writing the Python installation", lambda: open(os.path.join(sys.prefix, "x.txt"), "w"))
attempt("a file here", lambda: (pathlib.Path("mine.txt").write_text("x"), open("mine.txt").read(), os.listdir()))
attempt("reading the Python installation", lambda: open(json.__file__).read())
attempt("a dataclass and a namedtuple",
        lambda: (dataclasses.make_dataclass("D", ["a"]), collections.namedtuple("N", "a b")))
attempt("a new stdlib import", lambda: __import__("wave"))
print("OUTCOME", json.dumps(outcome))
'''


def test_assignment_runtime_guard_blocks_files_processes_and_code_outside_the_problem_and_flags_each(tmp_path):
    problem = tmp_path / "problem"
    problem.mkdir()
    (tmp_path / "reference").mkdir()
    shutil.copy(HERE / "passk.py", tmp_path / "reference" / "passk.py")
    (problem / "probe.py").write_text(_GUARD_PROBE.format(kit=str(HERE)))       # it runs from the problem's directory
    proc = subprocess.run([sys.executable, "probe.py"], cwd=problem, capture_output=True, text=True, timeout=120)
    outcome = json.loads(proc.stdout.split("OUTCOME", 1)[1])
    allowed = {"a file here", "reading the Python installation", "a dataclass and a namedtuple", "a new stdlib import"}
    assert {k for k, v in outcome.items() if v == "allowed"} == allowed, outcome
    assert all(v == "blocked" for k, v in outcome.items() if k not in allowed), outcome
    flags = assignment.flags_in(proc.stderr)
    assert any("passk.py" in f and "outside the problem's directory" in f for f in flags)
    assert any("starting a process" in f for f in flags) and any("compile called from probe.py" in f for f in flags)


def test_assignment_student_code_runs_as_an_unprivileged_user_who_cannot_read_the_graders_files():
    user, isolation = assignment.unprivileged_user()
    if os.geteuid() != 0:                         # not root: the documented fallback, said in the report
        assert user is None and "not root" in isolation
        return
    # root: the real drop, shown with a command that needs no Python (this machine's Python may sit under
    # a directory only root can enter, in which case grade() falls back and says so)
    import pwd
    nobody = pwd.getpwnam(assignment.GRADE_USER).pw_uid
    tmp_path = pathlib.Path(tempfile.mkdtemp(prefix="grade-"))        # as grade() makes it: root's, mode 700
    grader = tmp_path / "grader"
    grader.mkdir(mode=0o700)
    secret = grader / "reference.pt"                                  # a file of the grader's: mode 600
    secret.write_text("the reference's outputs")
    secret.chmod(0o600)
    (grader / "reference").mkdir(mode=0o700)                          # a directory of the grader's: mode 700
    shutil.copy(HERE / "passk.py", grader / "reference" / "passk.py")
    grader.chmod(0o711)
    problem = grader / "0123456789abcdef"
    problem.mkdir()
    (problem / "passk.py").write_text("mine")
    ids = assignment.hand_over([problem], nobody)
    tmp_path.chmod(0o711)
    cat = lambda path: subprocess.run(["cat", str(path)], capture_output=True, text=True, **ids)
    assert cat(problem / "passk.py").stdout == "mine"
    assert cat(secret).returncode != 0 and "Permission denied" in cat(secret).stderr
    assert "Permission denied" in cat(grader / "reference" / "passk.py").stderr
    assert subprocess.run(["ls", str(grader)], capture_output=True, **ids).returncode != 0   # no listing
    assert subprocess.run(["id", "-u"], capture_output=True, text=True, **ids).stdout.strip() == str(nobody)
    assert (user is None) == ("cannot run" in isolation)
    shutil.rmtree(tmp_path)


@pytest.mark.smoke
def test_assignment_a_cheat_the_static_check_misses_is_flagged_at_run_time_a_syntax_error_costs_one_problem(
        handout_dir, tmp_path, monkeypatch):
    # one grade of three problems: sample_weights honest (full marks); kl_penalty with a syntax error (0, the
    # line named, sample_weights in the same file unharmed); pass_at_k importing the checkout's answer with
    # the static check switched off (the runtime guard flags it)
    student = tmp_path / "student"
    shutil.copytree(handout_dir, student)
    reference = (HERE / "nsr.py").read_text()
    source = assignment.replace_function((student / "nsr.py").read_text(), "sample_weights",
                                         assignment.function_text(reference, "sample_weights"))
    broken = assignment.function_text(reference, "kl_penalty").replace("return", "return (", 1)
    (student / "nsr.py").write_text(assignment.replace_function(source, "kl_penalty", broken))
    (student / "passk.py").write_text(_with_body("pass_at_k", _CHEATS["importlib on the checkout"]))
    monkeypatch.setattr(assignment, "static_check", lambda nodes, file: [])
    seen = []
    real_run = assignment.run_process

    def spy(cwd, args, out, user=None):               # what a student process could find around it
        if "--guard" in args:
            seen.append({"a reference copy": any("reference" in str(p) for p in cwd.parent.rglob("*")),
                         "other than random names": [p.name for p in cwd.parent.iterdir()
                                                     if not re.fullmatch(r"[0-9a-f]{16}(\.pt)?", p.name)],
                         "cut tests": "HANDOUT: cut" in (cwd / "test_nsr.py").read_text()})
        return real_run(cwd, args, out, user)

    monkeypatch.setattr(assignment, "run_process", spy)
    graded = assignment.grade(student, only=["sample_weights", "kl_penalty", "pass_at_k"])["problems"]
    assert graded["sample_weights"]["points"] == 15 and not graded["sample_weights"]["failed"]
    assert graded["kl_penalty"]["points"] == 0
    lines = (student / "nsr.py").read_text().splitlines()
    start = next(i for i, text in enumerate(lines, 1) if text.startswith("def kl_penalty"))
    line = next(i for i, text in enumerate(lines, 1) if i > start and "return (" in text)
    assert graded["kl_penalty"]["failed"] == [f"nsr.py:{line}: SyntaxError: '(' was never closed (so kl_penalty "
                                              "does not compile)"]
    assert graded["pass_at_k"]["points"] == 0 and graded["pass_at_k"]["flagged"]
    assert any(f.endswith("passk.py (outside the problem's directory)") for f in graded["pass_at_k"]["flagged"])
    assert len(seen) == 2 and all(s == {"a reference copy": False, "other than random names": [],
                                        "cut tests": False} for s in seen), seen


# ---- feedback a student can act on ----

def test_assignment_feedback_names_the_input_expected_vs_actual_and_the_tolerance_and_stays_bounded():
    seed = 7
    cases = assignment.CHECKS["gae_advantages"]["diff"].cases(random.Random(seed))
    want = [assignment.call(assignment.plain, ppo.gae_advantages, case) for case in cases]
    got = [("ok", (adv.clone(), ret)) for _, (adv, ret) in want]
    got[3][1][0].view(-1)[-1] += 1e-6                              # one element of one case, past the tolerance
    name, ok, detail = assignment.compare_outputs("gae_advantages", seed, got, want)
    assert not ok and "case 3 of 20" in detail and "rewards: shape" in detail
    index = list(torch.nonzero(torch.ones_like(want[3][1][0]))[-1].tolist())
    assert f"the advantages: at index {index} expected" in detail and "max abs error 1e-06" in detail
    assert "tolerance: |actual - expected| <= 1e-09 + 1e-07 x |expected|" in detail
    assert assignment.compare_outputs("gae_advantages", seed, want, want)[1]
    # many long failures: at most FEEDBACK_CHARS, whole lines of whole messages, and how many were left out
    failed = [f"test test_{i}: " + "\n".join(f"E  line {j} " + "x" * 100 for j in range(12)) for i in range(9)]
    text = assignment.feedback({"failed": failed, "flagged": []})
    assert len(text) <= assignment.FEEDBACK_CHARS and text.startswith(failed[0])
    assert all(line in "\n".join(failed) for line in text.splitlines()[:-1])
    assert re.search(r"\(and \d+ more failing check\(s\), not shown\)$", text)


def test_assignment_messages_give_the_students_own_line_numbers():
    p = next(p for p in assignment.find_problems() if p.id == "pass_at_k")
    student = "# my notes\n" * 30 + (HERE / "passk.py").read_text() + "\ndef _helper():\n    return 1\n"
    spliced, _ = assignment.splice(p, student, (HERE / "passk.py").read_text())
    lines = assignment.LineMap(p, student, spliced)
    mine = assignment.locate(student, "pass_at_k").lineno
    theirs = assignment.locate(spliced, "pass_at_k").lineno
    assert lines.fix(f"passk.py:{theirs + 2}: in pass_at_k") == f"passk.py:{mine + 2}: in pass_at_k"
    assert lines.fix("passk.py:1: x") == "passk.py (the reference's part, line 1): x"
    assert lines.fix("xpasskk.py:3 and test_nsr.py:5") == "xpasskk.py:3 and test_nsr.py:5"



def test_assignment_student_processes_run_the_handouts_test_file_so_its_line_numbers_are_the_students(handout_dir,
                                                                                                      tmp_path):
    graded_copy = assignment.copy_code(HERE, tmp_path / "copy", handout_tests=True)
    assert (graded_copy / "test_nsr.py").read_text() == (handout_dir / "test_nsr.py").read_text()
    assert len((graded_copy / "test_nsr.py").read_text()) < len((HERE / "test_nsr.py").read_text())   # cut regions cut


def test_assignment_a_syntax_error_blanks_only_its_own_top_level_block():
    source = (HERE / "nsr.py").read_text()
    broken = assignment.replace_function(source, "kl_penalty", assignment.function_text(source, "kl_penalty")
                                         .replace("return", "return (", 1))
    parsed = assignment.parse_tolerant(broken)
    assert len(parsed.broken) == 1 and parsed.broken[0].first == assignment.locate(source, "kl_penalty").lineno
    assert assignment.locate_or_none(parsed.source, "kl_penalty") is None
    for name in ("sample_weights", "policy_loss", "loss_normalizer"):
        assert assignment.function_text(parsed.source, name) == assignment.function_text(source, name)
    assert len(parsed.source.splitlines()) == len(broken.splitlines())          # line numbers kept


# ---- Gradescope ----

def _check_gradescope_results(results: dict, problems: list) -> None:
    """Gradescope's required fields, their types, and that the points add up."""
    assert isinstance(results["score"], (int, float)) and isinstance(results["tests"], list)
    assert [t["name"].split(" ")[0] for t in results["tests"]] == [p.id for p in problems]   # grading order
    for t in results["tests"]:
        assert set(t) >= {"name", "score", "max_score", "output", "visibility"}
        assert isinstance(t["score"], (int, float)) and isinstance(t["max_score"], (int, float))
        assert isinstance(t["output"], str) and t["visibility"] in ("visible", "hidden", "after_due_date",
                                                                    "after_published")
    assert math.isclose(results["score"], sum(t["score"] for t in results["tests"]), abs_tol=0.01 * len(problems))
    assert sum(t["max_score"] for t in results["tests"]) == 100      # bonus tests carry max_score 0


@pytest.mark.smoke
def test_assignment_gradescope_zip_runs_its_run_autograder_on_a_fake_root_and_writes_valid_results(tmp_path):
    zip_path = tmp_path / "autograder.zip"
    assert assignment.main(["gradescope", str(zip_path)]) == 0
    root = tmp_path / "autograder"
    with zipfile.ZipFile(zip_path) as z:
        assert {"setup.sh", "run_autograder", "assignment.py", "requirements.txt"} <= set(z.namelist())
        assert (z.getinfo("run_autograder").external_attr >> 16) & 0o111
        z.extractall(root / "source")
    (root / "source" / "run_autograder").chmod(0o755)
    submission = root / "submission"                   # a student who did pass_at_k and handed in passk.py only
    submission.mkdir()
    shutil.copy(HERE / "passk.py", submission / "passk.py")
    proc = subprocess.run(["bash", str(root / "source" / "run_autograder")], capture_output=True, text=True,
                          env={**os.environ, "AUTOGRADER_ROOT": str(root), "AUTOGRADER_PYTHON": sys.executable},
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((root / "results" / "results.json").read_text())
    _check_gradescope_results(results, assignment.in_grading_order(assignment.find_problems()))
    tests = {t["name"].split(" ")[0]: t for t in results["tests"]}
    assert tests["pass_at_k"]["score"] == 10 and tests["pass_at_k"]["output"] == "all 6 checks passed"
    assert tests["sample_weights"]["score"] == 0
    assert "nsr.py: not in the submission" in tests["sample_weights"]["output"]
    assert results["score"] == 10 and not (root / "source").stat().st_mode & 0o077


def test_assignment_gradescope_results_of_a_grade_add_up_with_bonus_as_extra_credit():
    problems = assignment.in_grading_order(assignment.find_problems())
    result = {"total": 0.0, "max": 100.0, "isolation": "x", "problems": {}}
    for i, p in enumerate(problems):
        points = p.points if i % 2 else 0.0
        result["problems"][p.id] = {"points": points, "max": p.points, "bonus": p.bonus, "checks": 3,
                                    "failed": [] if points else ["differential: x\ncase 0"], "flagged": []}
        result["total"] += points
    results = assignment.gradescope_results(result, 12.3)
    _check_gradescope_results(results, problems)
    assert results["score"] == result["total"] and results["execution_time"] == 12


# ---- the handout states the grading; submit warns ----

def test_assignment_handout_states_the_grading_rule_checks_tolerances_and_times_in_grading_order(handout_dir):
    text = (handout_dir / "HANDOUT.md").read_text()
    assert "python assignment.py check ." in text
    assert "Points = the problem's points x (checks passed) / (visible checks + 1)" in text
    rows = [line for line in text.splitlines() if re.match(r"\| \d+ \| `", line)]
    order = [re.match(r"\| \d+ \| `([^`]+)`", row).group(1) for row in rows]
    assert order == list(assignment.CHECKS)
    for row, pid in zip(rows, order):
        cells = [c.strip() for c in row.strip("|").split("|")]
        diff = assignment.CHECKS[pid]["diff"]
        assert cells[4] == str(len(assignment.CHECKS[pid]["tests"]))
        assert cells[5] == f"1 ({len(diff.cases(random.Random(1)))} random cases)"
        assert cells[6] and "{" not in cells[6] and cells[7].endswith(" s") and "?" not in cells[7]
    assert "?" not in text.split("## How you are graded")[1].split("## The write-up")[0].replace("?)", "")


def test_assignment_submit_warns_on_an_untouched_writeup_and_each_unfinished_problem(handout_dir, tmp_path, capsys):
    student = tmp_path / "student"
    shutil.copytree(handout_dir, student)
    warnings_ = assignment.submit_warnings(student)
    assert warnings_[0].startswith("WRITEUP.md is unchanged")
    assert len(warnings_) == 1 + len(assignment.find_problems())
    assert all("still raises NotImplementedError" in w for w in warnings_[1:])
    (student / "WRITEUP.md").write_text("Q1. ...")
    shutil.copy(HERE / "passk.py", student / "passk.py")
    (student / "verifier.py").write_text((student / "verifier.py").read_text().replace(
        'raise NotImplementedError("_box_at: see HANDOUT.md")', "return (", 1))
    assert assignment.main(["submit", str(student)]) == 0
    out = capsys.readouterr().out
    assert "WRITEUP.md" not in out and "pass_at_k" not in out and "still raises" in out
    assert re.search(r"WARNING: verifier\.py:\d+: SyntaxError: .* _box_at \(_box_at\) does not compile", out)
# HANDOUT: end


# =================================================================================================
# WHY PSR AND NSR DIFFER (docs/why.md): on a tabular softmax, by enumeration in float64, their expected
# gradients agree up to a scale; one NSR step's probability change is the first-order formula of why.md
# =================================================================================================

WHY_LOGITS = torch.tensor([1.3, 0.2, -0.4, 0.9, -1.6, -0.1], dtype=torch.float64)   # 6 answers
WHY_CORRECT = torch.tensor([0, 1, 0, 0, 1, 0], dtype=torch.float64)                  # answers 1 and 4 right


def why_scores(z: torch.Tensor) -> torch.Tensor:
    """(V, V) row y: d log pi(y) / dz, through nsr.policy_loss with w = -1 and Z = 1 (its loss is +log pi_y)."""
    rows = []
    for y in range(len(z)):
        zz = z.clone().requires_grad_(True)
        logp = torch.log_softmax(zz, dim=-1)[y].reshape(1, 1)
        loss, _ = nsr.policy_loss(logp, torch.tensor([-1.0]), torch.ones(1, 1, dtype=torch.float64), 1.0, None, 0, 0)
        loss.backward()
        rows.append(zz.grad)
    return torch.stack(rows)


def why_expected_gradient(objective: str, lam: float = 0.25) -> torch.Tensor:
    """E_y~pi[w(r_y) grad log pi(y)] by enumeration: the ascent direction of one sample's loss -w log pi(y)."""
    pi = torch.softmax(WHY_LOGITS, dim=-1)
    w = nsr.sample_weights(WHY_CORRECT, objective, lam).to(torch.float64)   # (V,) the weight of each answer
    return (pi[:, None] * w[:, None] * why_scores(WHY_LOGITS)).sum(dim=0)


def test_psr_nsr_reinforce_and_w_reinforce_share_one_expected_gradient_up_to_the_derived_scale():
    pi = torch.softmax(WHY_LOGITS, dim=-1)
    z = WHY_LOGITS.clone().requires_grad_(True)
    (torch.softmax(z, dim=-1) * WHY_CORRECT).sum().backward()             # grad of E[r] = P(correct)
    g = {o: why_expected_gradient(o) for o in ("psr", "nsr", "reinforce", "w-reinforce")}
    assert g["psr"].norm() > 0.1                                         # a real direction, not 0 = 0
    torch.testing.assert_close(g["psr"], z.grad, rtol=1e-12, atol=1e-15)  # E[r grad log pi] = grad E[r]
    for o, scale in (("nsr", 1.0), ("reinforce", 2.0), ("w-reinforce", 1.25)):   # w = r - 1, 2r - 1, (1+lam) r - 1
        assert torch.cosine_similarity(g[o], g["psr"], dim=0) > 1 - 1e-9
        torch.testing.assert_close(g[o], scale * g["psr"], rtol=1e-12, atol=1e-15)
    # the identity behind it: E_y[grad log pi(y)] = 0, so a constant added to w changes nothing in expectation
    torch.testing.assert_close((pi[:, None] * why_scores(WHY_LOGITS)).sum(dim=0), torch.zeros(6, dtype=torch.float64),
                               rtol=0, atol=1e-15)


def test_the_subset_and_token_mean_scale_psr_by_one_over_accuracy_and_nsr_by_one_over_error():
    # a group of N = 4 samples, every one of the 6^4 outcomes enumerated; each response is one token, so the
    # token mean over the subset divides by its size: E = (1 - (1-a)^N)/a g for PSR, (1 - a^N)/(1-a) g for NSR
    pi, scores, N = torch.softmax(WHY_LOGITS, dim=-1), why_scores(WHY_LOGITS), 4
    a = float((pi * WHY_CORRECT).sum())
    g = why_expected_gradient("psr")
    for objective, scale in (("psr", (1 - (1 - a) ** N) / a), ("nsr", (1 - a ** N) / (1 - a))):
        expected = torch.zeros(6, dtype=torch.float64)
        for ys in itertools.product(range(6), repeat=N):
            rewards = WHY_CORRECT[list(ys)]
            w = nsr.sample_weights(rewards, objective).to(torch.float64)
            subset = nsr.training_subset(rewards.tolist(), objective)
            Z = nsr.loss_normalizer(w[subset], [1] * len(subset))
            if Z:
                step = sum(w[i] * scores[ys[i]] for i in subset) / Z
                expected += math.prod(float(pi[y]) for y in ys) * step
        assert torch.cosine_similarity(expected, g, dim=0) > 1 - 1e-9
        torch.testing.assert_close(expected, scale * g, rtol=1e-10, atol=1e-14)


def why_nsr_step(p: torch.Tensor, y: int, lr: float) -> torch.Tensor:
    """The probabilities after one SGD step on the logits of -w log pi(y), w = -1 (NSR on a wrong y)."""
    z = p.log().clone().requires_grad_(True)
    logp = torch.log_softmax(z, dim=-1)[y].reshape(1, 1)
    loss, _ = nsr.policy_loss(logp, torch.tensor([-1.0]), torch.ones(1, 1, dtype=torch.float64), 1.0, None, 0, 0)
    loss.backward()
    with torch.no_grad():
        return torch.softmax(z - lr * z.grad, dim=-1)


def why_first_order(p: torch.Tensor, y: int, lr: float) -> torch.Tensor:
    """dp_v = lr p_v (p_v + p_y (1 - p_y) - sum_{u != y} p_u^2) for v != y; dp_y = -lr p_y ((1 - p_y)^2 + that sum)."""
    S = float((p ** 2).sum() - p[y] ** 2)
    dp = lr * p * (p + p[y] * (1 - p[y]) - S)
    dp[y] = -lr * p[y] * ((1 - p[y]) ** 2 + S)
    return dp


def test_one_nsr_step_moves_each_probability_by_the_first_order_formula_to_within_lr_squared():
    p, y = torch.softmax(WHY_LOGITS, dim=-1), 3                           # y = 3: a wrong answer, p_y = 0.25
    errors = {}
    for lr in (1e-2, 1e-3, 1e-4):
        dp = why_nsr_step(p, y, lr) - p
        first = why_first_order(p, y, lr)
        assert abs(float(first.sum())) < 1e-15                           # the formula moves mass, creates none
        assert torch.equal(torch.sign(dp), torch.sign(first))
        errors[lr] = float((dp - first).abs().max())
        assert errors[lr] < 2 * lr ** 2                                  # O(lr^2)
    assert 50 < errors[1e-3] / errors[1e-4] < 200                        # and not smaller: it IS second order


def test_an_nsr_step_on_a_rare_wrong_token_takes_probability_from_the_rare_tokens_and_gives_it_to_the_favourite():
    # 5 answers: a the favourite (0.70), y = b a rare wrong answer (0.10) that NSR pushes down, c a rare
    # correct answer (0.10), d and e (0.05). Threshold: v loses iff p_v < sum_{u != y} p_u^2 - p_y (1 - p_y) = 0.415.
    p = torch.tensor([0.70, 0.10, 0.10, 0.05, 0.05], dtype=torch.float64)
    first = why_first_order(p, 1, 0.1)
    torch.testing.assert_close(first, torch.tensor([0.01995, -0.01315, -0.00315, -0.001825, -0.001825],
                                                   dtype=torch.float64), rtol=0, atol=1e-12)
    after = why_nsr_step(p, 1, 0.1)                                      # the exact step, lr = 0.1
    torch.testing.assert_close(after, torch.tensor([0.71935, 0.08757, 0.09678, 0.04815, 0.04815],
                                                   dtype=torch.float64), rtol=0, atol=5e-6)
    assert after[0] > p[0] and all(after[v] < p[v] for v in (1, 2, 3, 4))   # only the favourite gains
    assert int(torch.argmin(after - p)) == 1                             # the wrong answer lost the most
    assert why_nsr_step(p, 0, 0.1)[2] > p[2]                             # NSR on the favourite: c gains


# =================================================================================================
# THE THREE KINDS OF TEST (STYLE.md habit 8), selectable:
#     python -m pytest -q test_nsr.py -m math      exact math: a formula, a table or a rule, exactly
#     python -m pytest -q test_nsr.py -m parity    our code against transformers' or an independent reference
#     python -m pytest -q test_nsr.py -m smoke     a whole command or training loop on a tiny model
# and the quick suite, while editing one function (every exact gradient and weight test is in it):
#     python -m pytest -q -m "not slow" test_nsr.py
# `slow` marks the five tests that run whole commands in other processes (the assignment grader twice,
# reproduce.py twice, a process killed and resumed); the full suite (CI's command) runs them too.
# =================================================================================================
# Parity and smoke tests carry their mark above; every other test is exact math, marked here (pytest.ini
# registers the three marks).
for _name, _test in list(globals().items()):
    if _name.startswith("test_") and callable(_test) and not any(
            m.name in ("parity", "smoke") for m in getattr(_test, "pytestmark", [])):
        globals()[_name] = pytest.mark.math(_test)
