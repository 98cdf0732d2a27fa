"""
toy.py -- a toy world in which the paper's whole experiment runs on a laptop CPU in minutes.

The paper's effect needs a base model whose prior already holds the right answer some of the time, in
more than one way: NSR hands the mass of a wrong answer to the alternatives the model already believes
in, PSR narrows the model onto what it was rewarded for. This file builds such a world: a synthetic
task, a character-level tokenizer, a tiny Qwen2 model pre-trained (supervised) until it is MEASURABLY
a "base model", all saved with save_pretrained so every other file loads it like a hub model
(AutoModelForCausalLM / AutoTokenizer .from_pretrained; no other file has a toy code path).

THE TASK: find a missing digit, by one of two complementary guess-and-check strategies
    problem:  x+9+7+6 ends in 6. Digit x?                          gold answer: 4
    "up":     Up 9,6,2-6=6 0:6 1:7 2:8 3:9 4:0 \\boxed{4}
    "down":   Down 9,6,2-6=6 9:5 8:4 7:3 6:2 5:1 4:0 \\boxed{4}
Both solutions add the known digits mod 10 (running sums 9, 9+7=16->6, 6+6=12->2), subtract the
target (2-6 -> d = 6), then guess-and-check candidates c, writing c:(d+c mod 10) until it is 0
(then x + the digits ends in the target). "up" tries c = 0, 1, ..., up_last (5); "down" tries
c = 9, 8, ..., down_last (4). So with x uniform over 0-9 each strategy solves 6 answers of 10:
    x = 0-3   only "up" solves it      (up-only, 40% of train)
    x = 6-9   only "down" solves it    (down-only, 40% of train)
    x = 4-5   both can                 (shared, 20% of train)
In the corpus every problem is solved by a strategy that works for it, and a shared problem by "up"
with probability up_share_shared = 0.95. So BOTH strategies are executed on ~half the corpus (up 59%,
down 41%): both are practised, executed about equally well. The habit lives in the FIRST token only:
the strategy-naming first token gets loss weight 1 for "U" and ~0.16 for "D" (first_token_weights),
so the base opens with "down" ~down_prior = 10% of the time. Which strategy will work depends on
x = (target - sum of the digits) mod 10, which the base barely computes in the forward pass that picks
the first token (measured: "down" 8% on test_easy, 16% on the down-only test_hard). The first word of
a response names its strategy, so strategy_report() measures each strategy's share and accuracy.
  test_easy: the train distribution (the role of MATH).   test_hard: x = 6-9, only "down" solves it
  (the role of AIME). Base numbers: see MEASURED below and runs/toy-base/base_eval.json.
The fixed number of known digits (3) keeps every step of the solution at a fixed offset from the
prompt digits it reads, which a 155k-parameter model learns in ~1,000 steps. (With 2-5 digits the
running sums stayed wrong after 800 steps: the model must then find "the i-th digit" by content.)

THEORY WE DESIGNED AROUND. Per problem, the expected gradients of PSR (w = r) and NSR (w = r - 1)
are identical, because E_y[grad log pi(y)] = 0; so PSR = NSR + sum_i grad log pi(y_i) over ALL
samples: a zero-mean "maximum likelihood on your own samples" term that acts like genetic drift
(Wright-Fisher) -- it sharpens and can lose rare modes, faster at larger lr and smaller batches. On a
group where every sample is right NSR is silent and PSR is pure drift towards the habit. So a world
that separates them needs the TRUE signal on the strategy choice to be ~0 (each strategy equally
good on average, equally well executed), leaving PSR's drift against NSR's silence.

WHAT FAILED (scratch runs; B prompts x G = 8 samples, AdamW, n = 256 at temperature 1):
  1. One strategy (2-4-term addition): PSR 300 steps at lr 1e-4 raised Pass@1 20% -> 31% and
     Pass@64 96% -> 97%: plain continued training, nothing to collapse (issue 5).
  2. Two strategies, one reliable everywhere: PSR and NSR both moved ~99% of the mass onto it.
  3. v1 of this file (up 0..8, down 9..1, down used only on x = 9 and 5% of shared problems): down
     was executed worse (38% right vs up 57%, practised on 1/7 of the corpus), so "up" was truly
     better on average; at lr 1e-4, 100 steps, B = 16, PSR, NSR and W-REINFORCE all narrowed the mix
     the same way (down 9% -> 2.5-3%) and all lost hard Pass@64 (99% -> 83%). At lr 5e-4 NSR kept the
     mix but its accuracy collapsed (60% -> 7%).
  4. THIS FILE (v2 design: up 0..5, down 9..4, first-token weighting; runs/toy-base, 1,150 steps):
     base easy Pass@1 42% / Pass@64 94% / Pass@256 97%; hard Pass@1 11% / Pass@256 100%; "down"
     8% of easy samples (16% on hard), each strategy right on ~70-78% of the problems it can solve.
     RL (nsr.py, lr 2e-4, 100 steps, B = 16, G = 8), n = 256, temperature 1:
                    easy @1  @64   @256 | hard @1  @64   @256 | down share easy / hard
       base          41.6   93.8  96.9  |  10.6   94.3  100.0 |   8% / 16%
       PSR           66.4   99.7 100.0  |  57.0   97.9   98.4 |  37% / 65%
       NSR           50.9   99.1 100.0  |  27.0   95.4   98.4 |  25% / 44%
       W-REINFORCE   58.8   99.3 100.0  |  60.8  100.0  100.0 |  51% / 71%
     The model LEARNS to pick the strategy from the problem (the per-problem signal is not ~0 even
     though the average is): every objective raises every k; PSR fastest, NSR slowest. No PSR collapse.
  5. The same with shared 3..6 (up 0..6, down 9..3) and the corpus using "down" on half the shared
     problems (first token weighted to a 10% prior): base easy 51% / 99% @64, hard 8% / 100% @256,
     down 9% on both splits (no conditioning). Same RL: ALL THREE collapsed onto "up" (down 9% ->
     PSR 2.5%, NSR 2.2%, W 1.6%), easy @256 PSR 100%, NSR 92%, W 98%; hard @256 PSR 100%, NSR 80%,
     W 92% -- although "down" was executed better (65% vs 50% right on test_easy).
  6. lr 5e-4, B = 8 on (4): PSR stalled near 30% reward, NSR and W-REINFORCE collapsed to ~0.
  7. On (4), 200 steps (same settings): PSR easy @1 78%, hard @1 81%, NSR 69% / 63%, W 75% / 78%,
     every k >= base for all three (down share 53-65% on easy). B = 4, 300 steps: PSR rose as before,
     NSR's reward stayed ~37% (easy @256 96.9%, hard @256 96.9%): smaller batches did not make PSR drift.
  So in this toy the difference between the objectives is NOT the paper's: the theory's "drift"
  term is too weak against the per-problem signal (4) or against a systematic pull we have not
  identified that acts on every objective alike (5). The defaults below are design (4), which at
  least leaves every objective improving; the reproduction should report what it measures.

THE RECIPE (ToyRecipe, hashed; the cache in runs/toy-base is rebuilt when it changes):
  tokenizer  one token per printable ASCII character + <|pad|>, <|endoftext|> (= EOS): a byte-level
             BPE without merges, in Qwen2's own pipeline so AutoTokenizer reloads it exactly; a chat
             template that renders only the problem line and a newline (char-level: short prompts).
  model      Qwen2ForCausalLM, 3 layers, hidden 64, 4 heads (2 KV heads), tied embeddings: 154,624
             parameters.
  pre-train  supervised next-token loss on the response tokens of reference solutions, in exactly
             the prompt + response format the RL loop samples (nsr.render_prompt, template "auto"),
             weighted per token: the strategy-naming first token by first_token_weights() ("U" 1,
             "D" ~0.16), every other response token 1 -- loss = -sum_t w_t log pi / sum_t w_t.
             AdamW (lr 2e-3, batch 32, one thread); every 100 steps (25 once it starts rising) a cheap
             sampled Pass@1 check (n = 8 on 32 problems per split); when that reaches
             stop_easy_pass1 (0.45), the full measurement with
             passk.evaluate (n = 256, temperature 1). It STOPS ON MEASURED COMPETENCE:
               easy Pass@1 in [0.30, 0.70] and Pass@64 >= 0.90; hard Pass@1 <= 0.15 and Pass@256 >= 0.40.
  output     runs/toy-base/: model + tokenizer, train.jsonl, test_easy.jsonl, test_hard.jsonl
             (fields problem, answer, solution), base_eval.json (Pass@k curves, strategy shares),
             recipe.json (the recipe and its hash).

Run:  python toy.py                  # build (or reuse) runs/toy-base and print its Pass@k
      python toy.py --force          # rebuild even if the cache is valid
      python toy.py --quick --out /tmp/toy-quick   # the seconds-long tiny build the tests use
      python toy.py reproduce        # issue 7: all five objectives x 2 seeds, the paper's Pass@k table
      python toy.py reproduce --seeds 0     # one training seed only (about half the time)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import pathlib
import random
import shutil
import string
import sys
import time

import torch
from tqdm import tqdm

# Bump when the task format or the build procedure changes in a way the recipe fields do not show:
# it is part of the recipe hash, so every cached base model is rebuilt.
RECIPE_VERSION = "toy-v3"


# =================================================================================================
# THE TASK: missing-digit problems, two complementary guess-and-check strategies
# =================================================================================================

UP, DOWN = "up", "down"
STRATEGIES = (UP, DOWN)


@dataclasses.dataclass
class ToyRecipe:
    """Everything that determines the base model. Its hash names the cache (recipe.json)."""

    seed: int = 0
    """seeds the splits, the corpus sampling, the model init and the sampling checks"""
    up_last: int = 5
    """"up" tries candidates 0, 1, ..., up_last"""
    down_last: int = 4
    """"down" tries candidates 9, 8, ..., down_last (so x in [down_last, up_last] is shared). With 5 and
    4 each strategy solves 6 of the 10 answers: neither is better on average (the v2 design)"""
    up_share_shared: float = 0.95
    """probability that the corpus solves a SHARED problem with "up" (the model's habit)"""
    down_prior: float = 0.10
    """the share of "down" the base model should open with. The corpus EXECUTES "down" on ~41% of its
    solutions (every down-only problem), so its first token ("D") gets a smaller loss weight,
    first_token_weights(), making the learned strategy prior ~down_prior while execution stays practised"""
    train_digits: tuple = (3,)
    """numbers of known digits in train / test_easy problems (uniform)"""
    hard_digits: tuple = (3,)
    """numbers of known digits in test_hard problems (which are all down-only)"""
    num_train: int = 4000
    """problems in train.jsonl (the pre-training corpus AND the RL training set)"""
    num_test: int = 64
    """problems in each of test_easy.jsonl and test_hard.jsonl"""
    layers: int = 3
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    lr: float = 2e-3
    """AdamW peak learning rate of pre-training (linear warm-up over 50 steps, then constant)"""
    batch_size: int = 32
    """sequences per pre-training step"""
    max_steps: int = 4000
    """safety cap; the build normally stops earlier on measured competence"""
    check_every: int = 100
    """steps between cheap Pass@1 checks (n = check_n samples on check_problems problems per split)"""
    check_n: int = 8
    check_problems: int = 32
    eval_n: int = 256
    """samples per problem of the full measurement saved in base_eval.json"""
    strategy_n: int = 64
    """samples per problem of the strategy-share measurement saved in base_eval.json"""
    max_new_tokens: int = 64
    """response budget, ample for the longest reference solution (~50 characters)"""
    stop_easy_pass1: float = 0.45
    """the cheap check must see easy Pass@1 >= this before the full measurement (and the stop): easy
    Pass@1 ~ 0.6 x execution accuracy here, so 0.45 stops once execution is ~75% right, not at the first
    in-range point of the rise (a sloppier base makes RL mostly about execution, not strategy)"""
    easy_pass1: tuple = (0.30, 0.70)
    easy_pass64_min: float = 0.90
    hard_pass1_max: float = 0.15
    hard_pass256_min: float = 0.40
    quick: bool = False
    """the tiny, seconds-long build for tests: no competence target, tiny model and splits"""


def quick_recipe(seed: int = 0) -> ToyRecipe:
    """A seconds-long build: a 2-layer width-32 model, 10 steps of 16 sequences, 4 test problems, n = 4.
    It checks the plumbing (files, reload, formats), not competence: its Pass@k is ~0."""
    return ToyRecipe(seed=seed, num_train=64, num_test=4, layers=2, hidden=32, heads=4, kv_heads=2,
                     batch_size=16, max_steps=10, check_every=10**9, check_problems=4, check_n=2,
                     eval_n=4, strategy_n=4, max_new_tokens=24, quick=True)


def strategy_works(x: int, strategy: str, recipe: ToyRecipe) -> bool:
    """Does `strategy` reach candidate x within its search window?"""
    if strategy == UP:
        return x <= recipe.up_last
    if strategy == DOWN:
        return x >= recipe.down_last
    raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")


def problem_text(digits: list[int], target: int) -> str:
    """x+7+4+8 ends in 3. Digit x?"""
    return "x+" + "+".join(map(str, digits)) + f" ends in {target}. Digit x?"


def solve(digits: list[int], target: int, strategy: str, recipe: ToyRecipe) -> str:
    """The worked solution of one strategy (raises ValueError if the strategy cannot solve it).

    running sums mod 10 of the known digits, minus the target: d = (s - target) % 10; then candidates
    c:(d + c) % 10 in the strategy's order until the value is 0 (then x + s ends in target); then the
    boxed candidate. (Checking "is it 0" instead of "is it the target" keeps each step local: the
    target is read once, right after the running sums.)
    """
    running, s = [], 0
    for d in digits:
        s = (s + d) % 10
        running.append(str(s))
    d = (s - target) % 10
    order = range(0, recipe.up_last + 1) if strategy == UP else range(9, recipe.down_last - 1, -1)
    trials = []
    for c in order:
        trials.append(f"{c}:{(d + c) % 10}")
        if (d + c) % 10 == 0:
            head = "Up" if strategy == UP else "Down"
            return f"{head} {','.join(running)}-{target}={d} {' '.join(trials)} \\boxed{{{c}}}"
    raise ValueError(f"strategy {strategy!r} cannot solve digits={digits} target={target}")


def make_problem(rng: random.Random, num_digits: int, recipe: ToyRecipe, x: int | None = None) -> dict:
    """One problem with a reference solution. x (the answer) is uniform over 0-9 unless given."""
    digits = [rng.randrange(10) for _ in range(num_digits)]
    x = rng.randrange(10) if x is None else x
    target = (x + sum(digits)) % 10
    strategy = reference_strategy(x, rng, recipe)
    return {"problem": problem_text(digits, target), "answer": str(x),
            "solution": solve(digits, target, strategy, recipe), "strategy": strategy,
            "digits": digits, "target": target}


def reference_strategy(x: int, rng: random.Random, recipe: ToyRecipe) -> str:
    """The corpus's choice: the only strategy that works, or on a shared problem the habit ("up")
    with probability up_share_shared."""
    up_ok, down_ok = strategy_works(x, UP, recipe), strategy_works(x, DOWN, recipe)
    if up_ok and down_ok:
        return UP if rng.random() < recipe.up_share_shared else DOWN
    return UP if up_ok else DOWN


def first_token_weights(recipe: ToyRecipe) -> dict[str, float]:
    """Loss weight of the strategy-naming first response token ("U" / "D") in pre-training.

    The model cannot tell from the prompt which strategy will work (see the docstring), so weighted
    maximum likelihood on the first token learns P("D") ~ f_D w_D / (f_D w_D + f_U w_U), where f_S is
    the corpus frequency of strategy S. Solving for w_D with w_U = 1 sets that to recipe.down_prior.
    Every other token keeps weight 1, so both strategies' EXECUTION is practised at corpus frequency.
    """
    up_only = sum(1 for x in range(10) if strategy_works(x, UP, recipe) and not strategy_works(x, DOWN, recipe))
    down_only = sum(1 for x in range(10) if strategy_works(x, DOWN, recipe) and not strategy_works(x, UP, recipe))
    shared = 10 - up_only - down_only
    f_up = (up_only + shared * recipe.up_share_shared) / 10
    f_down = (down_only + shared * (1 - recipe.up_share_shared)) / 10
    if not 0 < recipe.down_prior < 1 or f_down == 0:
        raise ValueError(f"down_prior={recipe.down_prior} must be in (0, 1) and the corpus must use down")
    # p = f_D w / (f_D w + f_U)  <=>  w = p f_U / ((1 - p) f_D)
    return {UP: 1.0, DOWN: recipe.down_prior * f_up / ((1 - recipe.down_prior) * f_down)}


def make_splits(recipe: ToyRecipe) -> dict[str, list[dict]]:
    """train / test_easy / test_hard, deterministic from recipe.seed, with no problem text in two splits.

    test_easy is drawn first from the train distribution; train then skips any problem text already
    used (so the splits are disjoint); test_hard has only down-only answers (x > up_last) and
    hard_digits known digits.
    """
    rng = random.Random(f"toy-splits-{recipe.seed}")
    seen: set[str] = set()

    def draw(count, digit_choices, answers=None):
        # each (digits, target) pair is one problem: refuse requests the space cannot fill
        space = sum(10 ** k for k in set(digit_choices)) * (10 if answers is None else len(answers))
        if count + len(seen) > space // 2:
            raise ValueError(f"asked for {count} more distinct problems with {digit_choices} known digits, "
                             f"but only {space} exist ({len(seen)} already used): use more digits")
        out = []
        while len(out) < count:
            x = None if answers is None else rng.choice(answers)
            p = make_problem(rng, rng.choice(digit_choices), recipe, x=x)
            if p["problem"] in seen:
                continue
            seen.add(p["problem"])
            out.append(p)
        return out

    hard_answers = [x for x in range(10) if not strategy_works(x, UP, recipe)]
    if not hard_answers:
        raise ValueError(f"up_last={recipe.up_last} leaves no down-only answers for test_hard")
    test_easy = draw(recipe.num_test, recipe.train_digits)
    test_hard = draw(recipe.num_test, recipe.hard_digits, hard_answers)
    train = draw(recipe.num_train, recipe.train_digits)
    return {"train": train, "test_easy": test_easy, "test_hard": test_hard}


def strategy_of(response: str) -> str | None:
    """Which strategy a response uses, from its first word ("Up" / "Down"); None if neither."""
    word = response.strip().split(" ", 1)[0] if response.strip() else ""
    return {"Up": UP, "Down": DOWN}.get(word)


# =================================================================================================
# TOKENIZER: one token per character, a compact chat template
# =================================================================================================

PAD, EOS = "<|pad|>", "<|endoftext|>"

# The chat template renders ONLY the problem line of the user message and a newline. nsr.render_prompt
# sends [system SYSTEM, user problem + INSTRUCTION]; a char-level model would spend ~100 tokens per
# prompt on those fixed words, so the template drops them (everything from "\nPlease reason" on).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ message['content'].split('\\nPlease reason')[0] }}{{ '\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ '" + EOS + "' }}"
    "{% endif %}{% endfor %}"
)


def build_tokenizer():
    """A PreTrainedTokenizerFast with one token per printable ASCII character (+ <|pad|>, <|endoftext|>).

    The whole printable set (not only the task's characters) so that any prompt template -- "plain"
    adds the instruction sentence -- still encodes without unknown tokens.

    NOTE: it is a byte-level BPE with NO merges, built with exactly the pipeline of Qwen2's tokenizer
    (NFC, Qwen's split regex, byte-level mapping, byte-level decoder). Why: AutoTokenizer in
    transformers 5 loads any directory whose config says model_type "qwen2" as Qwen2Tokenizer, which
    rebuilds that pipeline around the saved vocabulary. A plain char vocabulary would then lose its
    spaces (measured: "x+7 ends" -> x + 7 e n d s); in the byte-level alphabet both classes give the
    same ids. Without merges every character is its own token: a char-level tokenizer.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    chars = [c for c in string.printable if c not in "\r\x0b\x0c"]          # 97 characters
    vocab = {PAD: 0, EOS: 1}
    for c in chars:
        vocab[byte_level.pre_tokenize_str(c)[0][0]] = len(vocab)           # " " -> "\u0120", "\n" -> "\u010a"
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], continuing_subword_prefix="",
                                end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    core.normalizer = normalizers.NFC()
    qwen2_split = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"""
                   r"""[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(qwen2_split), behavior="isolated", invert=False), byte_level])
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([PAD, EOS])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, eos_token=EOS,
                                        unk_token=EOS, padding_side="left")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# =================================================================================================
# MODEL: a tiny Qwen2ForCausalLM
# =================================================================================================

def build_model(recipe: ToyRecipe, tokenizer):
    """A freshly initialised tiny Qwen2ForCausalLM (seeded by recipe.seed)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=recipe.hidden,
                         intermediate_size=3 * recipe.hidden, num_hidden_layers=recipe.layers,
                         num_attention_heads=recipe.heads, num_key_value_heads=recipe.kv_heads,
                         max_position_embeddings=256, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(recipe.seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


# =================================================================================================
# PRE-TRAINING: supervised on reference solutions, stopping on measured competence
# =================================================================================================

def sft_batch(problems: list[dict], prompt_cache: dict, tokenizer, rng: random.Random, recipe: ToyRecipe):
    """A batch of prompt + reference response + <eos>, loss only on the response.

    Each problem's reference strategy is re-drawn here (on shared problems "up" with probability
    up_share_shared), so the model learns the corpus MIX rather than one fixed choice per problem.
    Returns input_ids (B, T), labels (B, T) with -100 on prompt and padding, attention_mask (B, T),
    loss_weights (B, T): 0 off the response, first_token_weights() on the strategy-naming first token,
    1 on every other response token.
    """
    first_weight = first_token_weights(recipe)
    rows, label_rows, weight_rows = [], [], []
    for p in problems:
        prompt = prompt_cache[p["problem"]]
        x = int(p["answer"])
        strategy = reference_strategy(x, rng, recipe)
        response = solve(p["digits"], p["target"], strategy, recipe)
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt + response_ids)
        label_rows.append([-100] * len(prompt) + response_ids)
        weight_rows.append([0.0] * len(prompt) + [first_weight[strategy]] + [1.0] * (len(response_ids) - 1))
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    # Right padding: positions are then 0..len-1 for every row, exactly as in sampling (which
    # left-pads but passes position ids that start at 0 on the first real token).
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])              # (B, T)
    labels = torch.tensor([r + [-100] * (width - len(r)) for r in label_rows])           # (B, T)
    attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])  # (B, T)
    loss_weights = torch.tensor([r + [0.0] * (width - len(r)) for r in weight_rows])      # (B, T)
    return input_ids, labels, attention_mask, loss_weights


def sampled_accuracy(model, tokenizer, problems, n: int, max_new_tokens: int, seed: int) -> float:
    """Mean correctness of n samples per problem (= an estimate of Pass@1): the cheap check."""
    import nsr
    import verifier

    prompt_ids, kept, _ = nsr.encode_prompts(tokenizer, problems)
    rows = [ids for ids in prompt_ids for _ in range(n)]
    generator = torch.Generator().manual_seed(seed)
    rollouts = nsr.generate(model, rows, max_new_tokens, generator=generator)
    correct = 0
    for i, tokens in enumerate(rollouts.tokens):
        correct += verifier.is_correct(tokenizer.decode(tokens, skip_special_tokens=True),
                                       kept[i // n]["answer"])
    return correct / len(rows)


def strategy_report(model, tokenizer, problems, n: int = 64, max_new_tokens: int = 64, seed: int = 0,
                    chunk_size: int = 256) -> dict:
    """Sample n responses per problem and measure each strategy's share and accuracy.

    Returns {"share": {"up": f, "down": f, "other": f}, "accuracy": {"up": acc, "down": acc, ...},
    "n": n, "num_problems": P}; accuracy of a strategy = fraction of ITS samples that are correct
    (None if never sampled). This is how training runs show PSR narrowing the strategy mix.
    """
    import nsr
    import verifier

    prompt_ids, kept, _ = nsr.encode_prompts(tokenizer, problems)
    rows = [ids for ids in prompt_ids for _ in range(n)]
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    rollouts = nsr.generate(model, rows, max_new_tokens, generator=generator, chunk_size=chunk_size)
    counts = {UP: 0, DOWN: 0, "other": 0}
    right = {UP: 0, DOWN: 0, "other": 0}
    for i, tokens in enumerate(rollouts.tokens):
        response = tokenizer.decode(tokens, skip_special_tokens=True)
        which = strategy_of(response) or "other"
        counts[which] += 1
        right[which] += verifier.is_correct(response, kept[i // n]["answer"])
    total = len(rows)
    return {"share": {k: v / total for k, v in counts.items()},
            "accuracy": {k: (right[k] / counts[k] if counts[k] else None) for k in counts},
            "n": n, "num_problems": len(kept)}


def competence(easy: dict, hard: dict, recipe: ToyRecipe) -> tuple[bool, list[str]]:
    """Check the base-model targets on two passk.evaluate results -> (all met, list of misses)."""
    lo, hi = recipe.easy_pass1
    e, h = easy["curve"], hard["curve"]
    e64 = e.get(64, e.get(str(64), e[max(e)] if e else 0.0))
    h256 = h.get(256, h.get(str(256), h[max(h)] if h else 0.0))
    misses = []
    if not lo <= e[1] <= hi:
        misses.append(f"easy Pass@1 {e[1]:.3f} not in [{lo}, {hi}]")
    if e64 < recipe.easy_pass64_min:
        misses.append(f"easy Pass@64 {e64:.3f} < {recipe.easy_pass64_min}")
    if h[1] > recipe.hard_pass1_max:
        misses.append(f"hard Pass@1 {h[1]:.3f} > {recipe.hard_pass1_max}")
    if h256 < recipe.hard_pass256_min:
        misses.append(f"hard Pass@256 {h256:.3f} < {recipe.hard_pass256_min}")
    return not misses, misses


def pretrain(model, tokenizer, splits: dict, recipe: ToyRecipe, log=print) -> dict:
    """Supervised pre-training until measured competence (or recipe.max_steps). Returns the final
    evaluation {"easy": passk result, "hard": passk result, "steps": s, "seconds": t, "met": bool, ...}."""
    import nsr
    import passk

    rng = random.Random(f"toy-corpus-{recipe.seed}")
    prompt_ids, kept, _ = nsr.encode_prompts(tokenizer, splits["train"] + splits["test_easy"]
                                             + splits["test_hard"])
    prompt_cache = {p["problem"]: ids for p, ids in zip(kept, prompt_ids)}
    train = splits["train"]
    check_easy = splits["test_easy"][:recipe.check_problems]
    check_hard = splits["test_hard"][:recipe.check_problems]
    evaluate = dict(n=recipe.eval_n, max_new_tokens=recipe.max_new_tokens, seed=recipe.seed,
                    ks=[k for k in (1, 2, 4, 8, 16, 32, 64, 128, 256) if k <= recipe.eval_n])

    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.98), weight_decay=0.0)
    start = time.time()
    history = []
    result = None
    rising = False                      # has the cheap check seen easy Pass@1 start to rise (>= 0.15)?
    bar = tqdm(range(1, recipe.max_steps + 1), desc="toy pre-training", unit="step", dynamic_ncols=True)
    for step in bar:
        # ---- one supervised step: -sum_t w_t log pi(reference token t) / sum_t w_t (response tokens) ----
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr * min(1.0, step / 50)                   # linear warm-up
        batch = [train[rng.randrange(len(train))] for _ in range(recipe.batch_size)]
        input_ids, labels, attention_mask, loss_weights = sft_batch(batch, prompt_cache, tokenizer, rng, recipe)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()  # (B, T-1, V)
        targets = labels[:, 1:].clamp(min=0)                                                     # (B, T-1)
        logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]             # (B, T-1)
        w = loss_weights[:, 1:]                                                                  # (B, T-1)
        loss = -(w * logp).sum() / w.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")

        # ---- measure: a cheap Pass@1 check, and when it is in range the full Pass@k curves ----
        # The rise is sharp (measured on the default recipe: easy Pass@1 ~0.10 at step 900, 0.26 at 1,000,
        # 0.45 at 1,150; base_eval.json "history"), so once the check sees it starting (>= 0.15) we check
        # four times as often, to stop inside the target window.
        every = max(1, recipe.check_every // 4) if rising else recipe.check_every
        if step % every != 0 and step != recipe.max_steps:
            continue
        model.eval()
        easy1 = sampled_accuracy(model, tokenizer, check_easy, recipe.check_n, recipe.max_new_tokens, step)
        hard1 = sampled_accuracy(model, tokenizer, check_hard, recipe.check_n, recipe.max_new_tokens, step)
        rising = rising or easy1 >= 0.15
        history.append({"step": step, "loss": round(loss.item(), 4), "easy_pass1_est": easy1,
                        "hard_pass1_est": hard1, "seconds": round(time.time() - start, 1)})
        log(f"step {step}: loss {loss.item():.3f}  easy Pass@1~{easy1:.2f}  hard Pass@1~{hard1:.2f}")
        lo, hi = recipe.easy_pass1
        in_range = max(lo + 0.05, recipe.stop_easy_pass1) <= easy1 <= hi and hard1 <= recipe.hard_pass1_max
        if not (in_range or step == recipe.max_steps):
            if easy1 > hi + 0.1:
                raise RuntimeError(f"toy pre-training overshot: easy Pass@1 ~{easy1:.2f} > {hi} at step "
                                   f"{step}; lower the lr or check more often (check_every)")
            continue
        easy = passk.evaluate(model, tokenizer, splits["test_easy"], desc="base eval easy", **evaluate)
        hard = passk.evaluate(model, tokenizer, splits["test_hard"], desc="base eval hard", **evaluate)
        met, misses = competence(easy, hard, recipe) if not recipe.quick else (True, [])
        log(f"step {step}: full eval easy {fmt_curve(easy['curve'])} | hard {fmt_curve(hard['curve'])}"
            + ("" if met else "  -- not yet: " + "; ".join(misses)))
        result = {"easy": easy, "hard": hard, "steps": step, "met": met, "misses": misses}
        if met:
            break
    bar.close()
    result["seconds"] = round(time.time() - start, 1)
    result["history"] = history
    return result


def fmt_curve(curve: dict) -> str:
    return " ".join(f"@{k}={v:.2f}" for k, v in curve.items() if int(k) in (1, 8, 64, 256))


# =================================================================================================
# BUILD AND CACHE: ensure_base(out_dir) -> a directory loadable with Auto*.from_pretrained
# =================================================================================================

def recipe_hash(recipe: ToyRecipe) -> str:
    blob = json.dumps({"version": RECIPE_VERSION, **dataclasses.asdict(recipe)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def write_jsonl(path: pathlib.Path, problems: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for p in problems:
            f.write(json.dumps({"problem": p["problem"], "answer": p["answer"],
                                "solution": p["solution"]}) + "\n")


def is_built(out_dir: pathlib.Path, recipe: ToyRecipe) -> bool:
    """True when out_dir holds a complete build of exactly this recipe."""
    meta = out_dir / "recipe.json"
    if not meta.is_file():
        return False
    try:
        stored = json.loads(meta.read_text())["hash"]
    except (ValueError, KeyError, TypeError):   # unreadable or not our format: rebuild
        return False
    needed = ["config.json", "tokenizer.json", "train.jsonl", "test_easy.jsonl", "test_hard.jsonl",
              "base_eval.json"]
    return stored == recipe_hash(recipe) and all((out_dir / f).is_file() for f in needed)


def ensure_base(out_dir="runs/toy-base", recipe: ToyRecipe | None = None, quick: bool = False,
                force: bool = False, log=print) -> pathlib.Path:
    """Build the toy base model into out_dir unless a build of the same recipe is already there.

    quick=True uses quick_recipe() (seconds; for tests). The build is written to a temporary sibling
    directory and renamed at the end, so an interrupted build never looks complete.
    Returns the directory (pathlib.Path).
    """
    recipe = recipe or (quick_recipe() if quick else ToyRecipe())
    out_dir = pathlib.Path(out_dir)
    if not force and is_built(out_dir, recipe):
        return out_dir
    start = time.time()
    log(f"toy: building the base model into {out_dir} (recipe {recipe_hash(recipe)})")
    # NOTE: one thread. The matrices are tiny, so a second thread costs more in synchronisation than
    # it saves; on the shared 2-core machine it was 6x slower (measured 0.8 vs 4.7 steps/s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _build(out_dir, recipe, start, log)
    finally:
        torch.set_num_threads(threads)


def _build(out_dir: pathlib.Path, recipe: ToyRecipe, start: float, log) -> pathlib.Path:
    """ensure_base's work: splits, tokenizer, model, pre-training, measurement, files."""
    import passk

    torch.manual_seed(recipe.seed)
    splits = make_splits(recipe)
    tokenizer = build_tokenizer()
    model = build_model(recipe, tokenizer)
    log(f"toy: Qwen2ForCausalLM with {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{len(splits['train'])} train problems")
    result = pretrain(model, tokenizer, splits, recipe, log=log)
    if not result["met"]:
        log("toy: WARNING: competence targets not met: " + "; ".join(result["misses"]))
    model.eval()
    shares = {name: strategy_report(model, tokenizer, splits[split], n=recipe.strategy_n,
                                    max_new_tokens=recipe.max_new_tokens, seed=recipe.seed)
              for name, split in (("easy", "test_easy"), ("hard", "test_hard"))}

    tmp = out_dir.with_name(out_dir.name + f".tmp-{recipe_hash(recipe)}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    for name in ("train", "test_easy", "test_hard"):
        write_jsonl(tmp / f"{name}.jsonl", splits[name])
    build_seconds = round(time.time() - start, 1)
    base_eval = {"easy": result["easy"], "hard": result["hard"], "strategy": shares,
                 "competence_met": result["met"], "misses": result["misses"],
                 "pretrain_steps": result["steps"], "pretrain_seconds": result["seconds"],
                 "build_seconds": build_seconds, "history": result["history"],
                 "command": "python toy.py", "torch_threads": torch.get_num_threads()}
    passk.save_result(base_eval, tmp / "base_eval.json")
    (tmp / "recipe.json").write_text(json.dumps({"hash": recipe_hash(recipe), "version": RECIPE_VERSION,
                                                 "recipe": dataclasses.asdict(recipe)}, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    log(f"toy: built in {build_seconds:.0f} s -> {out_dir}")
    return out_dir


# =================================================================================================
# REPRODUCTION: `python toy.py reproduce` -- the paper's comparison at toy scale in one command
# =================================================================================================
#
#   python toy.py reproduce                       # 5 methods x seeds 0 1, 2 processes, n = 256: mean + spread
#   python toy.py reproduce --seeds 0             # 1 seed
#   python toy.py reproduce --steps 80 --lr 5e-5  # every budget is a flag; defaults: nsr.TOY_DEFAULTS + REPRODUCE_BUDGET
#
# The pipeline:
#   ensure_base ----------------------------------------------> evaluate the base once (n per problem)
#        \--> for each method x seed: nsr.train (no evaluation inside) --> evaluate its final checkpoint
#   --> Pass@k table (the paper's Table 1 layout) + curves PNG + training-dynamics table + stability
#   --> every result as JSON under --out (default runs/reproduce)
#
# What makes the comparison fair:
#   * every method starts from the same base with the same Config except `objective` (same steps,
#     lr, batch, seed -> the same prompts in the same order, and at step 1 the very same rollouts);
#   * every model, the base included, is evaluated by the SAME call: passk.evaluate with n samples
#     per problem and the toy's evaluation settings (temperature / top-p / response budget taken
#     from the resolved Config exactly as nsr.evaluate_all takes them), and ONE evaluation seed for
#     all rows (common random numbers: differences between rows come from the models, not from the
#     evaluation's dice). --seeds varies the TRAINING seed; the evaluation seed stays fixed.
#   Tune the toy world and the training budget, never the evaluation (issue 7).
#
# Parallelism: the toy model is tiny, so one torch thread per process is fastest (TOY_DEFAULTS'
# threads=1: a second thread only waits), and the two cores of a laptop are best used by two
# independent jobs: --jobs 2 runs the jobs in a pool of spawned processes, each writing its own
# log.txt. --jobs 1 runs them one after the other in this process.

REPRODUCE_ROWS = (("PSR", "psr"), ("NSR", "nsr"), ("W-REINFORCE", "w-reinforce"),
                  ("REINFORCE", "reinforce"), ("GRPO", "grpo"))
"""(row name, nsr objective) in the paper's row order; the Base row comes first."""

REPRODUCE_BUDGET = dict(lam=0.1, save_every=10)
"""THE ONE PLACE TO CHANGE THE DEFAULT BUDGET: nsr.Config overrides applied on top of nsr.TOY_DEFAULTS
(which supplies everything not listed here: steps, lr, batch_prompts, group_size, max_new_tokens,
threads=1, ...). Add e.g. steps=..., lr=... here. Every key listed in add_reproduce_args is also a flag.
save_every: checkpoints during training, so a run that diverges is still evaluated at its last good one."""

REPRODUCE_SPLITS = (("test_easy", "test_easy (MATH role)"), ("test_hard", "test_hard (AIME role)"))
"""(eval file stem, column-group title) of the two test splits, in table order."""


def add_reproduce_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of `python toy.py reproduce`. Training defaults: nsr.TOY_DEFAULTS + REPRODUCE_BUDGET."""
    import nsr

    budget = {**nsr.TOY_DEFAULTS, **REPRODUCE_BUDGET}
    objectives = [objective for _, objective in REPRODUCE_ROWS]
    g = parser.add_argument_group("training budget (the same for every method)")
    g.add_argument("--steps", type=int, default=budget["steps"], help="training steps per run (default %(default)s)")
    g.add_argument("--lr", type=float, default=budget["lr"], help="AdamW learning rate (default %(default)s)")
    g.add_argument("--batch-prompts", type=int, default=budget["batch_prompts"],
                   help="prompts per step (default %(default)s)")
    g.add_argument("--group-size", type=int, default=budget["group_size"],
                   help="rollouts per prompt (default %(default)s)")
    g.add_argument("--lam", type=float, default=budget["lam"],
                   help="lambda of W-REINFORCE (default %(default)s, the paper's)")
    g.add_argument("--save-every", type=int, default=budget["save_every"],
                   help="checkpoint every this many steps, so a diverged run is evaluated at its last good "
                        "checkpoint (default %(default)s)")
    g.add_argument("--methods", nargs="+", default=objectives, choices=objectives, metavar="OBJECTIVE",
                   help=f"objectives to train (default: all five: {' '.join(objectives)})")
    g.add_argument("--seeds", nargs="+", type=int, default=[0, 1], metavar="SEED",
                   help="training seeds; each method is trained once per seed (default 0 1: the table shows "
                        "the mean and a second table the spread; 9 min from a clean checkout on 2 cores)")
    e = parser.add_argument_group("evaluation (identical for the base and every method)")
    e.add_argument("--n", type=int, default=256, help="samples per test problem; Pass@k for k = 1, 2, 4, ..., n "
                                                      "(default %(default)s)")
    e.add_argument("--eval-seed", type=int, default=0, help="the one evaluation seed of every row (default 0)")
    e.add_argument("--strategy-n", type=int, default=64,
                   help="samples per problem for the up/down strategy shares; 0 = skip (default %(default)s)")
    r = parser.add_argument_group("run")
    r.add_argument("--jobs", type=int, default=2, help="parallel processes, one torch thread each (default 2)")
    r.add_argument("--out", default="runs/reproduce", help="where every result goes (default %(default)s)")
    r.add_argument("--base-dir", default="runs/toy-base", help="the toy base (built if missing; default %(default)s)")
    r.add_argument("--quick", action="store_true",
                   help="use the seconds-long quick toy build (for tests: its Pass@k is ~0)")
    r.add_argument("--window", type=int, default=5,
                   help="steps averaged for 'at the end' and for the reward-collapse test (default 5)")
    return parser


def check_reproduce_args(args) -> list[str]:
    """Everything wrong with the flags, as messages (empty = fine). Checked before any work starts."""
    bad = []
    for name in ("steps", "batch_prompts", "group_size", "n", "jobs", "window"):
        if getattr(args, name) < 1:
            bad.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("save_every", "strategy_n"):
        if getattr(args, name) < 0:
            bad.append(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if len(set(args.seeds)) != len(args.seeds):
        bad.append(f"--seeds must be distinct, got {args.seeds}")
    if len(set(args.methods)) != len(args.methods):
        bad.append(f"--methods must be distinct, got {args.methods}")
    return bad


# ---- jobs: plain dicts, so they cross a process boundary ---------------------------------------

def reproduce_jobs(args, base: pathlib.Path) -> list[dict]:
    """One job per (method, seed) plus one for the base. Each job carries everything it needs: the
    Config of its training run (as a dict) and the evaluation settings shared by every job."""
    import nsr

    out = pathlib.Path(args.out)
    overrides = dict(steps=args.steps, lr=args.lr, batch_prompts=args.batch_prompts,
                     group_size=args.group_size, lam=args.lam, save_every=args.save_every)
    # eval_n = 0: nsr.train evaluates nothing; we evaluate every model below with ONE set of settings.
    data = dict(model=str(base), train=str(base / "train.jsonl"), eval=[], eval_n=0)
    jobs = []
    objectives = [objective for _, objective in REPRODUCE_ROWS if objective in args.methods]  # paper order
    for seed in args.seeds:
        for objective in objectives:
            cfg = nsr.Config(**{**nsr.TOY_DEFAULTS, **REPRODUCE_BUDGET, **overrides, **data,
                                "objective": objective, "seed": seed,
                                "out_dir": str(out / f"{objective}-seed{seed}")})
            problems = nsr.config_problems(cfg)
            if problems:
                raise ValueError(f"{objective} seed {seed}: invalid configuration:\n  " + "\n  ".join(problems))
            jobs.append({"kind": "train", "name": f"{objective} seed {seed}", "objective": objective,
                         "seed": seed, "config": dataclasses.asdict(cfg), "run_dir": cfg.out_dir})
    # The evaluation settings come from the resolved Config (all jobs share them), as nsr.evaluate_all
    # takes them: temperature/top-p of evaluation, eval_max_new_tokens or else max_new_tokens.
    cfg = nsr.Config(**jobs[0]["config"])
    evaluation = dict(n=args.n, temperature=cfg.eval_temperature, top_p=cfg.eval_top_p,
                      max_new_tokens=cfg.eval_max_new_tokens or cfg.max_new_tokens, seed=args.eval_seed,
                      template=cfg.template, chunk_size=cfg.chunk_size)
    jobs.insert(0, {"kind": "base", "name": "base", "objective": None, "seed": None,
                    "config": {"model": str(base), "dtype": cfg.dtype, "device": cfg.device, "threads": cfg.threads},
                    "run_dir": str(out / "base")})
    splits = {stem: str(base / f"{stem}.jsonl") for stem, _ in REPRODUCE_SPLITS}
    for job in jobs:
        job.update(evaluation=evaluation, splits=splits, strategy_n=args.strategy_n)
    return jobs


def run_job(job: dict) -> dict:
    """Train (unless it is the base job), then evaluate the final model on every split. Runs in a worker
    process or in this one; stdout/stderr (tqdm bars included) go to <run_dir>/log.txt.

    A training run that stops with an error (nsr.train raises on non-finite logits, or after several
    non-finite steps) does not stop the reproduction: the error is recorded, and the last good
    checkpoint (if any; see --save-every) is evaluated instead. Returns the job record (also job.json).
    """
    import traceback

    import torch

    import nsr
    import passk

    run_dir = pathlib.Path(job["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in ["job.json", "strategy.json", *[f"eval_{stem}.json" for stem in job["splits"]]]:
        (run_dir / stale).unlink(missing_ok=True)       # a result on disk always belongs to THIS run
    cfg = job["config"]
    record = {k: job[k] for k in ("kind", "name", "objective", "seed", "run_dir")}
    record.update(status="ok", error=None, evaluated=None, train_seconds=0.0, eval_seconds=0.0)
    threads = torch.get_num_threads()
    start = time.time()
    with open(run_dir / "log.txt", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            if cfg["threads"]:
                torch.set_num_threads(cfg["threads"])
            model_dir = cfg["model"]
            if job["kind"] == "train":
                try:
                    nsr.train(nsr.Config(**cfg))
                except Exception as e:      # noqa: BLE001 -- recorded and reported; the other methods go on
                    traceback.print_exc()
                    # nsr.train's divergence errors all say "non-finite"; anything else is a failure
                    record.update(status="diverged" if "non-finite" in str(e) else "failed",
                                  error=f"{type(e).__name__}: {e}")
                ckpt = nsr.latest_checkpoint(run_dir)        # the final one, or the last good one
                model_dir = str(ckpt) if ckpt is not None else None
                record["train_seconds"] = round(time.time() - start, 1)
            record["evaluated"] = model_dir
            if model_dir is not None:
                t0 = time.time()
                device = None if cfg["device"] == "auto" else cfg["device"]
                model, tokenizer = nsr.load_model(model_dir, dtype=cfg["dtype"], device=device)
                for stem, path in job["splits"].items():
                    passk.evaluate(model, tokenizer, nsr.load_problems(path), desc=f"{job['name']} {stem}",
                                   out=run_dir / f"eval_{stem}.json", model_name=model_dir, data_name=stem,
                                   **job["evaluation"])
                if job["strategy_n"]:
                    ev = job["evaluation"]
                    shares = {stem: strategy_report(model, tokenizer, nsr.load_problems(path),
                                                    n=job["strategy_n"], max_new_tokens=ev["max_new_tokens"],
                                                    seed=ev["seed"], chunk_size=ev["chunk_size"])
                              for stem, path in job["splits"].items()}
                    (run_dir / "strategy.json").write_text(json.dumps(shares, indent=1) + "\n")
                record["eval_seconds"] = round(time.time() - t0, 1)
        finally:
            torch.set_num_threads(threads)
    record["seconds"] = round(time.time() - start, 1)
    (run_dir / "job.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def run_jobs(jobs: list[dict], num_procs: int, log=print) -> list[dict]:
    """Run every job, num_procs at a time; returns the records in the order of `jobs`.

    NOTE spawn, not fork: a forked child inherits torch's OpenMP thread pool in an undefined state, and
    spawn is what macOS and Windows do anyway. Each worker imports torch once (~3 s) and then takes
    jobs from the queue, so the import is paid once per worker, not once per job.
    """
    import concurrent.futures
    import multiprocessing

    start = time.time()
    records: dict[int, dict] = {}

    def done(i, record):
        records[i] = record
        extra = f" -- {record['status'].upper()}: {record['error']}" if record["status"] != "ok" else ""
        log(f"[{len(records)}/{len(jobs)}] {record['name']}: train {record['train_seconds']:.0f} s, evaluate "
            f"{record['eval_seconds']:.0f} s (done at {time.time() - start:.0f} s; "
            f"log {record['run_dir']}/log.txt){extra}")

    if num_procs == 1:
        for i, job in enumerate(jobs):
            done(i, run_job(job))
    else:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=num_procs, mp_context=context) as pool:
            futures = {pool.submit(run_job, job): i for i, job in enumerate(jobs)}
            for future in concurrent.futures.as_completed(futures):
                i = futures[future]
                try:
                    record = future.result()
                except Exception as e:      # noqa: BLE001 -- a crashed worker: record it, keep the others
                    record = {k: jobs[i][k] for k in ("kind", "name", "objective", "seed", "run_dir")}
                    record.update(status="failed", error=f"{type(e).__name__}: {e}", evaluated=None,
                                  train_seconds=0.0, eval_seconds=0.0)
                done(i, record)
    return [records[i] for i in range(len(jobs))]


# ---- reading the runs: training dynamics and stability ------------------------------------------

def read_metrics(run_dir: pathlib.Path) -> list[dict]:
    """The per-step lines of nsr.train's metrics.jsonl (empty if the run logged no step)."""
    path = pathlib.Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from None
    return lines


def train_dynamics(metrics: list[dict], window: int) -> dict:
    """The training-set columns of the dynamics table, from nsr.train's per-step metrics.

    reward:       fraction of the step's B x G rollouts that were correct (the training-set correct
                  fraction); "mean" over all steps, "end" over the last `window` steps (one step is
                  B x G samples, too noisy alone). all_correct: fraction of prompts whose G rollouts
                  were all correct -- where NSR (and GRPO) get no gradient at all. "start" = step 1,
                  before any update (the same for every method with the same seed).
    """
    if not metrics:
        return {}
    out = {"steps_logged": len(metrics)}
    for key in ("reward", "all_correct", "all_wrong", "entropy"):
        values = [m[key] for m in metrics]
        out[key] = {"start": values[0], "mean": math.fsum(values) / len(values),
                    "end": math.fsum(values[-window:]) / len(values[-window:])}
    return out


def stability_horizon(metrics: list[dict], diverged: str | None, window: int) -> dict:
    """The first step at which a run stopped being healthy, or None.

    Two events, whichever comes first:
      non-finite: a step logged as skipped (non-finite loss or gradient) or the step at which nsr.train
                  raised (non-finite logits while sampling, or too many skipped steps) = last logged + 1;
      collapse:   the training reward's trailing `window`-step mean falls below half of its first
                  `window`-step mean:  mean(r_{s-w+1..s}) < 0.5 * mean(r_{1..w}),  s >= w
                  (undefined when the start is 0: a run that never solved anything cannot collapse).
    """
    rewards = [m["reward"] for m in metrics]
    nonfinite = next((m["step"] for m in metrics if m.get("skipped")), None)
    if diverged is not None and nonfinite is None:
        nonfinite = (metrics[-1]["step"] if metrics else 0) + 1
    collapse, start = None, None
    if len(rewards) >= window:
        start = math.fsum(rewards[:window]) / window
        for s in range(window, len(rewards) + 1):
            if start > 0 and math.fsum(rewards[s - window:s]) / window < 0.5 * start:
                collapse = metrics[s - 1]["step"]
                break
    events = [s for s in (nonfinite, collapse) if s is not None]
    return {"nonfinite_step": nonfinite, "collapse_step": collapse, "start_reward": start,
            "horizon": min(events) if events else None, "steps_logged": len(metrics)}


# ---- tables ------------------------------------------------------------------------------------

def spread_stats(values: list[float]) -> dict:
    """mean, min, max and std (population) of the per-seed values of one table cell."""
    mean = math.fsum(values) / len(values)
    return {"mean": mean, "min": min(values), "max": max(values),
            "std": math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values)), "seeds": len(values)}


def format_grid(corner: str, groups: list[tuple[str, list[str]]], rows: list[tuple[str, list[list[str]]]]) -> str:
    """A plain-text table with column groups, the layout of the paper's Table 1:

        corner       | group title 1        | group title 2
                     |   c1   c2   c3  ...  |   c1   c2 ...
        row name     | 55.1 70.3 ...        | ...
    groups: [(title, [column headers])]; rows: [(name, [[cells of group 1], [cells of group 2], ...])].
    """
    first = max(len(corner), *(len(name) for name, _ in rows))
    widths = []                                            # per group, per column
    for j, (title, headers) in enumerate(groups):
        w = [max(len(h), *(len(cells[j][c]) for _, cells in rows)) for c, h in enumerate(headers)]
        short = len(title) - (sum(w) + 2 * (len(w) - 1))
        for c in range(max(short, 0)):
            w[c % len(w)] += 1                             # a long group title widens its columns evenly
        widths.append(w)
    span = [sum(w) + 2 * (len(w) - 1) for w in widths]
    lines = [corner.ljust(first) + "".join(f" | {t.ljust(s)}" for (t, _), s in zip(groups, span)),
             " " * first + "".join(" | " + "  ".join(h.rjust(x) for h, x in zip(hs, w))
                                   for (_, hs), w in zip(groups, widths))]
    lines.append("-" * len(lines[1]))
    for name, cells in rows:
        lines.append(name.ljust(first) + "".join(" | " + "  ".join(c.rjust(x) for c, x in zip(cs, w))
                                                 for cs, w in zip(cells, widths)))
    return "\n".join(lines)


def passk_summary(results: dict, ks: list[int]) -> dict:
    """{row: {split: {k: spread_stats over seeds}}} from {row: {split: [passk result per seed]}}.

    Every number is recomputed from the saved counts (passk.passk_curve), not read from "curve"."""
    import passk

    summary = {}
    for row, by_split in results.items():
        summary[row] = {}
        for split, per_seed in by_split.items():
            curves = [passk.passk_curve(r["counts"], r["n"], ks) for r in per_seed]
            summary[row][split] = {k: spread_stats([c[k] for c in curves]) for k in ks} if curves else {}
    return summary


def passk_table(summary: dict, ks: list[int], stat: str = "mean") -> str:
    """The Pass@k (%) table: rows Base, PSR, NSR, ...; a column group per split; `stat` = mean or spread
    (max - min over seeds, in points)."""
    def cell(stats):
        if not stats or (stat == "spread" and stats["seeds"] < 2):     # the Base row has one seed
            return "-"
        value = stats["mean"] if stat == "mean" else stats["max"] - stats["min"]
        return f"{100 * value:.1f}"

    groups = [(title, [f"k={ks[0]}"] + [str(k) for k in ks[1:]]) for _, title in REPRODUCE_SPLITS]
    rows = [(row, [[cell(by_split.get(stem, {}).get(k)) for k in ks] for stem, _ in REPRODUCE_SPLITS])
            for row, by_split in summary.items()]
    corner = "Pass@k (%)" if stat == "mean" else "spread (max-min)"
    return format_grid(corner, groups, rows)


DYNAMICS_COLUMNS = (
    ("test entropy (nats)", (("easy", "entropy.test_easy"), ("hard", "entropy.test_hard"))),
    ("train correct (%)", (("start", "reward.start"), ("mean", "reward.mean"), ("end", "reward.end"))),
    ("train all-correct (%)", (("mean", "all_correct.mean"), ("end", "all_correct.end"))),
    ("'down' share (%)", (("easy", "down_share.test_easy"), ("hard", "down_share.test_hard"))),
)
"""The dynamics table's column groups: (title, ((header, key in dynamics_cells), ...))."""


def dynamics_cells(evals: dict, dynamics: dict | None, strategy: dict | None) -> dict:
    """One model's dynamics values {"metric.field": value}: the evaluation's token entropy per split,
    the training metrics (train_dynamics), and the share of the minority strategy ("down") per split."""
    cells = {f"entropy.{stem}": r["mean_entropy"] for stem, r in evals.items()}
    for metric in ("reward", "all_correct"):
        for field in ("start", "mean", "end"):
            if dynamics:
                cells[f"{metric}.{field}"] = dynamics[metric][field]
    for stem, report in (strategy or {}).items():
        cells[f"down_share.{stem}"] = report["share"].get("down")
    return cells


def dynamics_table(summary: dict, stat: str = "mean") -> str:
    """The training-dynamics table (the paper's ablation analysis). Rows as in the Pass@k table; the
    Base row's test columns are the base model's, its train columns are empty ("-": no training);
    every method's "start" column is its step 1, before any update."""
    groups = [(title, [h for h, _ in columns]) for title, columns in DYNAMICS_COLUMNS]
    rows = []
    for row, cells in summary.items():
        out = []
        for title, columns in DYNAMICS_COLUMNS:
            group = []
            for _, key in columns:
                s = cells.get(key)
                if s is None or (stat == "spread" and s["seeds"] < 2):
                    group.append("-")
                    continue
                value = s["mean"] if stat == "mean" else s["max"] - s["min"]
                # entropy in nats, fractions in percent
                group.append(f"{value:.3f}" if key.startswith("entropy") else f"{100 * value:.1f}")
            out.append(group)
        rows.append((row, out))
    return format_grid("dynamics" if stat == "mean" else "spread (max-min)", groups, rows)


def plot_reproduction(summary: dict, ks: list[int], path) -> pathlib.Path:
    """Two panels (one per split) of Pass@k (%) against k on a log2 axis, one line per row (the mean
    over seeds, with a min-max band when there are several). Needs matplotlib (ImportError if not)."""
    from matplotlib.figure import Figure                 # object API: no pyplot state, no display

    fig = Figure(figsize=(11, 4), dpi=150)
    axes = fig.subplots(1, len(REPRODUCE_SPLITS), sharey=False)
    for ax, (stem, title) in zip(axes, REPRODUCE_SPLITS):
        for row, by_split in summary.items():
            stats = by_split.get(stem)
            if not stats:
                continue
            line, = ax.plot(ks, [100 * stats[k]["mean"] for k in ks], marker="o", markersize=3, label=row)
            if any(stats[k]["seeds"] > 1 for k in ks):
                ax.fill_between(ks, [100 * stats[k]["min"] for k in ks], [100 * stats[k]["max"] for k in ks],
                                color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("k")
        ax.set_ylabel("Pass@k (%)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def collect(jobs: list[dict], records: list[dict], window: int) -> dict:
    """Read every saved result back from disk -> the summary: Pass@k per row/split/seed, dynamics, stability.

    Reading from disk (not from the workers' return values) means the summary can always be rebuilt from
    the run directories alone -- which is also what the tests check.
    """
    import passk

    names = {objective: row for row, objective in REPRODUCE_ROWS}
    trained = {j["objective"] for j in jobs if j["kind"] == "train"}
    rows = ["Base"] + [row for row, objective in REPRODUCE_ROWS if objective in trained]   # paper order
    evals = {row: {stem: [] for stem, _ in REPRODUCE_SPLITS} for row in rows}
    dynamics = {row: [] for row in rows}
    stability = {row: {} for row in rows if row != "Base"}
    files = {row: {} for row in rows}
    for job, record in zip(jobs, records):
        row = "Base" if job["kind"] == "base" else names[job["objective"]]
        run_dir = pathlib.Path(job["run_dir"])
        per_split = {}
        for stem, _ in REPRODUCE_SPLITS:
            path = run_dir / f"eval_{stem}.json"
            if path.is_file():
                per_split[stem] = passk.load_result(path)
                evals[row][stem].append(per_split[stem])
                files[row].setdefault(str(job["seed"]), {})[stem] = str(path)
        strategy_path = run_dir / "strategy.json"
        strategy = json.loads(strategy_path.read_text()) if strategy_path.is_file() else None
        metrics = read_metrics(run_dir) if job["kind"] == "train" else []
        dyn = train_dynamics(metrics, window) if metrics else None
        if per_split or dyn:
            dynamics[row].append(dynamics_cells(per_split, dyn, strategy))
        if job["kind"] == "train":
            diverged = record["error"] if record["status"] == "diverged" else None
            stability[row][str(job["seed"])] = {**stability_horizon(metrics, diverged, window),
                                                 "status": record["status"], "error": record["error"],
                                                 "evaluated": record["evaluated"]}
    ks = sorted({k for by_split in evals.values() for per_seed in by_split.values() for r in per_seed
                 for k in passk.default_ks(r["n"])})
    dyn_summary = {}
    for row, per_seed in dynamics.items():
        keys = {key for cells in per_seed for key in cells}
        dyn_summary[row] = {key: spread_stats([c[key] for c in per_seed if c.get(key) is not None])
                            for key in keys if any(c.get(key) is not None for c in per_seed)}
    return {"ks": ks, "passk": passk_summary(evals, ks), "dynamics": dyn_summary, "stability": stability,
            "files": files}


def format_stability(stability: dict, steps: int, window: int) -> str:
    lines = [f"Stability horizon (first step with a non-finite loss/gradient/logits, or where the training "
             f"reward's {window}-step mean fell below half its first-{window}-step mean):"]
    for row, by_seed in stability.items():
        for seed, s in by_seed.items():
            if s["horizon"] is None:
                text = f"stable through step {s['steps_logged']} of {steps}"
            elif s["nonfinite_step"] is not None and s["nonfinite_step"] == s["horizon"]:
                text = f"NON-FINITE at step {s['nonfinite_step']}"
            else:
                text = f"reward COLLAPSE at step {s['collapse_step']} (start {s['start_reward']:.3f})"
            if s["status"] != "ok":
                where = f"evaluated at {pathlib.Path(s['evaluated']).name}" if s["evaluated"] else "NOT evaluated"
                text += f"; run {s['status']} ({where}): {s['error']}"
            lines.append(f"  {row:12s} seed {seed}: {text}")
    return "\n".join(lines)


# ---- the command --------------------------------------------------------------------------------

def reproduce(args) -> dict:
    """`python toy.py reproduce`: build/reuse the base, train every method x seed, evaluate, report.

    Prints the Pass@k table (mean over seeds, and the spread when there are several), the dynamics
    table, the stability horizons and the wall time; writes <out>/summary.json, passk_table.txt,
    dynamics_table.txt and passk_curves.png (with matplotlib). Returns the summary.
    """
    problems = check_reproduce_args(args)
    if problems:
        raise ValueError("invalid reproduce flags:\n  " + "\n  ".join(problems))
    start = time.time()
    out = pathlib.Path(args.out)
    base = pathlib.Path(ensure_base(args.base_dir, quick=args.quick))
    build_seconds = time.time() - start
    jobs = reproduce_jobs(args, base)
    print(f"reproduce: {len(jobs) - 1} training runs ({', '.join(args.methods)} x seeds {args.seeds}) + the base, "
          f"each evaluated with n={args.n} on {', '.join(stem for stem, _ in REPRODUCE_SPLITS)}; "
          f"{args.jobs} process(es); logs in {out}/*/log.txt")
    records = run_jobs(jobs, min(args.jobs, len(jobs)))
    summary = collect(jobs, records, args.window)
    ks = summary["ks"]

    text = [f"Pass@k (%) at toy scale; mean over training seeds {args.seeds}; n={args.n} samples per problem",
            passk_table(summary["passk"], ks)]
    if len(args.seeds) > 1:
        text += ["", "Spread of each cell over the seeds (max - min, in points)",
                 passk_table(summary["passk"], ks, stat="spread")]
    dyn = ["Training dynamics: test entropy = mean token entropy of the evaluation samples; train correct = "
           "fraction of training rollouts correct (start = step 1, mean over steps, end = last "
           f"{args.window} steps); all-correct = fraction of prompts with all G rollouts correct; 'down' "
           "share = the minority strategy's share of samples on each test split (Base row = before training)",
           dynamics_table(summary["dynamics"])]
    if len(args.seeds) > 1:
        dyn += ["", dynamics_table(summary["dynamics"], stat="spread")]
    stability = format_stability(summary["stability"], args.steps, args.window)
    out.mkdir(parents=True, exist_ok=True)
    (out / "passk_table.txt").write_text("\n".join(text) + "\n")
    (out / "dynamics_table.txt").write_text("\n".join(dyn) + "\n\n" + stability + "\n")
    print("\n" + "\n".join(text) + "\n\n" + "\n".join(dyn) + "\n\n" + stability)

    try:
        plot = str(plot_reproduction(summary["passk"], ks, out / "passk_curves.png"))
        print(f"\ncurves: {plot}")
    except ImportError:
        plot = None
        print("\n(no PNG: matplotlib is not installed; `pip install matplotlib` and rerun, or plot "
              f"{out}/summary.json)")
    seconds = time.time() - start
    job_seconds = sum(r.get("seconds", r["train_seconds"] + r["eval_seconds"]) for r in records)
    summary.update(
        command="python " + " ".join(sys.argv),
        flags=vars(args), base=str(base), evaluation=jobs[0]["evaluation"],
        training_config=next((j["config"] for j in jobs if j["kind"] == "train"), None),
        jobs=records, plot=plot, wall_seconds=round(seconds, 1), build_seconds=round(build_seconds, 1),
        job_seconds=round(job_seconds, 1), torch_threads_per_job=jobs[0]["config"]["threads"])
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print(f"results: {out}/summary.json (+ per run: {out}/<method>-seed<s>/eval_*.json, metrics.jsonl, job.json)")
    print(f"wall time: {seconds:.0f} s ({seconds / 60:.1f} min; base build/reuse {build_seconds:.0f} s, "
          f"{len(jobs)} jobs {job_seconds:.0f} s of process time on {min(args.jobs, len(jobs))} process(es))")
    return summary


def reproduce_cli(argv=None) -> int:
    """`python toy.py reproduce [flags]` (toy.main hands it the arguments after "reproduce")."""
    parser = argparse.ArgumentParser(
        prog="toy.py reproduce", description="Train PSR, NSR, W-REINFORCE, REINFORCE and GRPO from the same "
        "toy base with the same budget, evaluate them and the base with n samples per problem, and print the "
        "paper's Pass@k table, the training dynamics and each method's stability horizon.")
    args = add_reproduce_args(parser).parse_args(argv)
    problems = check_reproduce_args(args)
    if problems:
        parser.error("\n  ".join(problems))
    reproduce(args)
    return 0


# =================================================================================================
# MAIN
# =================================================================================================

def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["reproduce"]:
        return reproduce_cli(argv[1:])
    parser = argparse.ArgumentParser(description="Build (or reuse) the toy base model and print its Pass@k.")
    parser.add_argument("--out", default="runs/toy-base", help="output directory (default runs/toy-base)")
    parser.add_argument("--quick", action="store_true", help="the seconds-long tiny build used by tests")
    parser.add_argument("--force", action="store_true", help="rebuild even if the cache matches the recipe")
    parser.add_argument("--seed", type=int, default=0, help="recipe seed (default 0)")
    args = parser.parse_args(argv)
    recipe = quick_recipe(args.seed) if args.quick else ToyRecipe(seed=args.seed)
    out = ensure_base(args.out, recipe=recipe, force=args.force)
    base_eval = json.loads((out / "base_eval.json").read_text())
    for split in ("easy", "hard"):
        curve = base_eval[split]["curve"]
        print(f"{split:5s} " + "  ".join(f"Pass@{k}={float(v):.3f}" for k, v in curve.items()))
        print(f"      strategy share {base_eval['strategy'][split]['share']}")
    print(f"build {base_eval['build_seconds']} s, {base_eval['pretrain_steps']} steps, "
          f"competence met: {base_eval['competence_met']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
