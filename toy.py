"""
toy.py -- a toy world in which the paper's whole experiment runs on a laptop CPU in minutes.

The paper's effect needs a base model whose prior already holds the right answer some of the time, in
more than one way: NSR hands the mass of a wrong answer to the alternatives the model already believes
in, PSR narrows the model onto what it was rewarded for. This file builds such a world: a synthetic
task, a character-level tokenizer, a tiny Qwen2 model pre-trained (supervised) for a FIXED number of
steps into a "base model", all saved with save_pretrained so every other file loads it like a hub model
(AutoModelForCausalLM / AutoTokenizer .from_pretrained; no other file has a toy code path).

THE TASK: find a missing digit: analyse the problem, then pick one of two guess-and-check strategies
    problem:  x+9+7 ends in 3. Digit x?                          gold answer: 7
    "up":     9,6-3=3 Up 0:3 1:4 2:5 3:6 4:7 5:8 none            tries c = 0, 1, ..., up_last (5): fails here
    "down":   9,6-3=3 Down 9:2 8:1 7:0 \boxed{7}                tries c = 9, 8, ..., down_last (4)
The ANALYSIS adds the known digits mod 10 (running sums 9, 9+7=16->6) and subtracts the target (6-3 ->
d = 3); then the solution names its strategy and guess-and-checks candidates c, writing c:(d+c mod 10)
until it is 0. Each strategy solves 6 answers of 10: x = 0-3 only "up" (up-only), x = 6-9 only "down"
(down-only), x = 4-5 both (shared). Every corpus solution uses a strategy that works ("up" on 95% of
shared problems), except that 20% of one-strategy problems show the other strategy failing honestly
("... 5:8 none"), so both strategies are practised. The strategy's name comes AFTER the analysis: x =
-d mod 10, so which strategy works can be read off d, one token back (as an LLM reads the problem
before it picks an approach). The habit lives in the name's first token, whose pre-training loss weight
is 1 for "U" and ~0.16 for "D" (strategy_token_weights): on a down-only problem the base names "Down"
on only a share of its samples (measured per seed in base_eval.json "strategy"), and RL can reweight
that choice per problem. (Until toy-v6 the name came first, before the analysis: a base then had to
compute x in its first token, did so only partly, and on the bases that did it least every objective,
NSR included, narrowed onto the habit: docs/toy.md.)
  test_easy: the train distribution (the role of MATH).   test_hard: x = 6-9, only "down" solves it
  (the role of AIME).  The design history (what each earlier world measured): docs/toy.md.

THE RECIPE (ToyRecipe, hashed; the cache runs/toy-base-s<seed> is rebuilt when it changes):
  tokenizer  one token per printable ASCII character + <|pad|>, <|endoftext|> (= EOS): a byte-level
             BPE without merges, in Qwen2's own pipeline so AutoTokenizer reloads it exactly; a chat
             template that renders only the problem line and a newline (char-level: short prompts).
  model      Qwen2ForCausalLM, 3 layers, hidden 64, 4 heads (2 KV heads), tied embeddings: 154,624
             parameters.
  pre-train  supervised next-token loss on the response tokens of reference solutions, in exactly
             the prompt + response format the RL loop samples, weighted per token (the strategy
             name's first token by strategy_token_weights(), every other 1): loss = -sum_t w_t log pi
             / sum_t w_t. AdamW (lr 2e-3, batch 32, one thread), pretrain_steps = 1,000 FIXED steps:
             one recipe seed gives the same base on any machine up to floating point, in a predictable
             time. Then the competence check (measured, printed, saved; it does not stop or change
             the build): passk.evaluate, n = 256, temperature 1: easy Pass@1 in [0.30, 0.90] and
             Pass@64 >= 0.85; hard Pass@1 <= 0.80 and Pass@256 >= 0.85.
  output     runs/toy-base-s<seed>/: model + tokenizer, train.jsonl, test_easy.jsonl, test_hard.jsonl
             (fields problem, answer, solution), base_eval.json (Pass@k curves, strategy shares, the
             learning curve), recipe.json (the recipe and its hash).

Run:  python toy.py                  # build (or reuse) runs/toy-base-s0 and print its Pass@k
      python toy.py --seed 1         # another recipe seed: another base
      python toy.py --force          # rebuild even if the cache is valid
      python toy.py --quick --out /tmp/toy-quick   # the seconds-long tiny build the tests use
      python toy.py reproduce ...    # = python reproduce.py ... (every method, verdicts of the findings)
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import pathlib
import random
import shutil
import string
import subprocess
import sys
import time

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

import passk
import sample
import verifier

# Bump when the task format or the build procedure changes in a way the recipe fields do not show:
# it is part of the recipe hash, so every cached base model is rebuilt.
RECIPE_VERSION = "toy-v6"


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
    fail_share: float = 0.2
    """probability that a corpus solution of an up-only or down-only problem uses the OTHER strategy and
    fails honestly ("... 5:8 none"). Without failed attempts in the corpus, the base meets a failing
    window only at RL time and fabricates a check or a difference to box something; NSR then pushes
    down those fabricated arithmetic tokens, which correct solutions use too. The corpus frequencies of
    the two strategies do not change (an up-only failure is a "down" solution and vice versa)."""
    up_share_shared: float = 0.95
    """probability that the corpus solves a SHARED problem with "up" (the model's habit)"""
    down_prior: float = 0.10
    """sets the loss weight of "D" (strategy_token_weights): the share of "down" a base that could not see
    d would name. The corpus EXECUTES "down" on ~41% of its solutions (every down-only problem); the
    weight (~0.16) makes "down" the minority choice while its execution stays practised. A base that
    reads d names "down" on ~0.2 x 0.16 / (0.2 x 0.16 + 0.8) = 4% of up-only problems and ~0.8 x 0.16 /
    (0.8 x 0.16 + 0.2) = 39% of down-only ones (the corpus's 80 / 20 mix there, reweighted)"""
    train_digits: tuple = (2,)
    """numbers of known digits in train / test_easy problems (uniform). 2, not 3: with 3 the running sums
    are learned in a sudden jump whose step varies with the seed (seed 0 at ~1,000 steps, seed 1 not by
    1,500), so no fixed step count gave every seed a finished base; with 2 the loss falls smoothly"""
    hard_digits: tuple = (2,)
    """numbers of known digits in test_hard problems (which are all down-only)"""
    num_train: int = 360
    """problems in train.jsonl (the pre-training corpus AND the RL training set); 2 known digits allow
    1,000 distinct problems, of which make_splits may use half"""
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
    pretrain_steps: int = 1000
    """supervised steps, FIXED: one recipe seed gives the same base on any machine (up to floating point)
    and a predictable build time. Chosen so the competence check passes for recipe seeds 0-4 (docs/toy.md)"""
    check_every: int = 250
    """steps between cheap Pass@1 checks (n = check_n samples on check_problems problems per split), kept
    in base_eval.json "history" to show the learning curve; they do not stop the build"""
    check_n: int = 8
    check_problems: int = 32
    eval_n: int = 256
    """samples per problem of the full measurement saved in base_eval.json"""
    strategy_n: int = 64
    """samples per problem of the strategy-share measurement saved in base_eval.json"""
    max_new_tokens: int = 64
    """response budget, ample for the longest reference solution (~50 characters)"""
    easy_pass1: tuple = (0.30, 0.90)
    """the competence targets, checked (and saved) after pre-training: a base that solves a fair share ..."""
    easy_pass64_min: float = 0.85
    """... whose samples cover almost every easy problem ..."""
    hard_pass1_max: float = 0.80
    """... that leaves RL headroom on the hard split (where it must name the minority strategy) ..."""
    hard_pass256_min: float = 0.85
    """... and whose support already holds the right behaviour there: RL can reweight, it need not teach"""
    quick: bool = False
    """the tiny, seconds-long build for tests: no competence target, tiny model and splits"""


def quick_recipe(seed: int = 0) -> ToyRecipe:
    """A seconds-long build: a 2-layer width-32 model, 10 steps of 16 sequences, 4 test problems, n = 4.
    It checks the plumbing (files, reload, formats), not competence: its Pass@k is ~0."""
    return ToyRecipe(seed=seed, num_train=64, num_test=4, layers=2, hidden=32, heads=4, kv_heads=2,
                     batch_size=16, pretrain_steps=10, check_every=10**9, check_problems=4, check_n=2,
                     eval_n=4, strategy_n=4, max_new_tokens=24, quick=True)


def strategy_works(x: int, strategy: str, recipe: ToyRecipe) -> bool:
    """Does `strategy` reach candidate x within its search window?"""
    if strategy == UP:
        return x <= recipe.up_last
    if strategy == DOWN:
        return x >= recipe.down_last
    raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")


def problem_group(answer: int, recipe: ToyRecipe) -> str:
    """"up-only", "shared" or "down-only": which strategies reach this answer."""
    up, down = strategy_works(answer, UP, recipe), strategy_works(answer, DOWN, recipe)
    return "shared" if up and down else "up-only" if up else "down-only"


STRATEGY_WORD = {UP: "Up", DOWN: "Down"}


def analysis(running: list[str], target: int, d: int) -> str:
    """The part of every solution before the strategy's name: "9,6-3=3" (running sums, target, d)."""
    return f"{','.join(running)}-{target}={d}"


def problem_text(digits: list[int], target: int) -> str:
    """x+7+4+8 ends in 3. Digit x?"""
    return "x+" + "+".join(map(str, digits)) + f" ends in {target}. Digit x?"


def solve(digits: list[int], target: int, strategy: str, recipe: ToyRecipe, allow_fail: bool = False) -> str:
    """The worked solution of one strategy (raises ValueError if it cannot solve it, unless allow_fail).

    THE ANALYSIS first: running sums mod 10 of the known digits, minus the target: d = (s - target) % 10;
    THEN the strategy's name, chosen with d in view (x = -d mod 10, so the choice is computable); then
    candidates c:(d + c) % 10 in the strategy's order until the value is 0 (then x + s ends in target);
    then the boxed candidate. (Checking "is it 0" instead of "is it the target" keeps each step local: the
    target is read once, right after the running sums.) allow_fail: a strategy whose window misses x
    writes every trial and ends with "none", no box: an honest failed attempt (a wrong answer).
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
            return f"{analysis(running, target, d)} {STRATEGY_WORD[strategy]} {' '.join(trials)} \\boxed{{{c}}}"
    if allow_fail:
        return f"{analysis(running, target, d)} {STRATEGY_WORD[strategy]} {' '.join(trials)} none"
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


def strategy_token_weights(recipe: ToyRecipe) -> dict[str, float]:
    """Loss weight of the strategy name's first token ("U" / "D") in pre-training.

    Weighted maximum likelihood on that token learns, in each context, P("D") ~ f_D w_D / (f_D w_D +
    f_U w_U), where f_S is the frequency of strategy S in the corpus for that context. Over the whole
    corpus (a model that ignores d) that is recipe.down_prior: solving for w_D with w_U = 1 gives the
    formula below. Every other token keeps weight 1, so both strategies' EXECUTION is practised at
    corpus frequency.
    """
    groups = [problem_group(x, recipe) for x in range(10)]
    up_only, down_only, shared = (groups.count(g) for g in ("up-only", "down-only", "shared"))
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
    """Which strategy a response uses: its first word that names one ("Up" / "Down", normally the
    second word, after the analysis); None if no word does."""
    named = {word: strategy for strategy, word in STRATEGY_WORD.items()}
    return next((named[word] for word in response.split() if word in named), None)


# =================================================================================================
# TOKENIZER: one token per character, a compact chat template
# =================================================================================================

PAD, EOS = "<|pad|>", "<|endoftext|>"

# The chat template renders ONLY the problem line of the user message and a newline. sample.render_prompt
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
    loss_weights (B, T): 0 off the response, strategy_token_weights() on the strategy name's first token,
    1 on every other response token.
    """
    strategy_weight = strategy_token_weights(recipe)
    rows, label_rows, weight_rows = [], [], []
    for p in problems:
        prompt = prompt_cache[p["problem"]]
        x = int(p["answer"])
        strategy = reference_strategy(x, rng, recipe)
        other = DOWN if strategy == UP else UP
        if recipe.fail_share and not strategy_works(x, other, recipe) and rng.random() < recipe.fail_share:
            strategy = other                     # an honest failed attempt: the trials, then "none"
        response = solve(p["digits"], p["target"], strategy, recipe, allow_fail=True)
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt + response_ids)
        label_rows.append([-100] * len(prompt) + response_ids)
        # the strategy's name follows the analysis ("9,6-3=3 Down ..."): its first token carries the habit
        at = len(tokenizer(response[:response.index(" " + STRATEGY_WORD[strategy]) + 1],
                           add_special_tokens=False)["input_ids"])
        weights = [1.0] * len(response_ids)
        weights[at] = strategy_weight[strategy]
        weight_rows.append([0.0] * len(prompt) + weights)
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
    prompt_ids, kept, _ = sample.encode_prompts(tokenizer, problems)
    rows = [ids for ids in prompt_ids for _ in range(n)]
    generator = torch.Generator().manual_seed(seed)
    rollouts = sample.generate(model, rows, max_new_tokens, generator=generator)
    correct = 0
    for i, tokens in enumerate(rollouts.tokens):
        correct += verifier.is_correct(tokenizer.decode(tokens, skip_special_tokens=True),
                                       kept[i // n]["answer"])
    return correct / len(rows)


def strategy_report(model, tokenizer, problems, n: int = 64, max_new_tokens: int = 64, seed: int = 0,
                    chunk_size: int = 256, recipe: ToyRecipe | None = None) -> dict:
    """Sample n responses per problem and measure each strategy's share and accuracy.

    Returns {"share": {"up": f, "down": f, "other": f}, "accuracy": {"up": acc, "down": acc, ...},
    "n": n, "num_problems": P}; accuracy of a strategy = fraction of ITS samples that are correct
    (None if never sampled). This is how training runs show PSR narrowing the strategy mix. With a
    recipe, also "down_by_group": the share of "down" on the up-only, shared and down-only problems
    (a base that reads d names "down" far more often where only "down" works).
    """
    prompt_ids, kept, _ = sample.encode_prompts(tokenizer, problems)
    rows = [ids for ids in prompt_ids for _ in range(n)]
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    rollouts = sample.generate(model, rows, max_new_tokens, generator=generator, chunk_size=chunk_size)
    counts = {UP: 0, DOWN: 0, "other": 0}
    right = {UP: 0, DOWN: 0, "other": 0}
    group_down, group_total = {}, {}                      # per problem group: "down" samples, all samples
    for i, tokens in enumerate(rollouts.tokens):
        response = tokenizer.decode(tokens, skip_special_tokens=True)
        which = strategy_of(response) or "other"
        counts[which] += 1
        right[which] += verifier.is_correct(response, kept[i // n]["answer"])
        if recipe is not None:
            group = problem_group(int(kept[i // n]["answer"]), recipe)
            group_down[group] = group_down.get(group, 0) + (which == DOWN)
            group_total[group] = group_total.get(group, 0) + 1
    total = len(rows)
    report = {"share": {k: v / total for k, v in counts.items()},
              "accuracy": {k: (right[k] / counts[k] if counts[k] else None) for k in counts},
              "n": n, "num_problems": len(kept)}
    if recipe is not None:
        report["down_by_group"] = {g: group_down[g] / group_total[g] for g in sorted(group_total)}
    return report


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
    """Supervised pre-training for recipe.pretrain_steps steps, then the competence measurement.
    Returns {"easy": passk result, "hard": passk result, "steps", "seconds", "met", "misses", "history"}."""
    rng = random.Random(f"toy-corpus-{recipe.seed}")
    prompt_ids, kept, _ = sample.encode_prompts(tokenizer, splits["train"] + splits["test_easy"]
                                                + splits["test_hard"])
    prompt_cache = {p["problem"]: ids for p, ids in zip(kept, prompt_ids)}
    train = splits["train"]
    check_easy = splits["test_easy"][:recipe.check_problems]
    check_hard = splits["test_hard"][:recipe.check_problems]
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.98), weight_decay=0.0)
    start, history = time.time(), []
    bar = tqdm(range(1, recipe.pretrain_steps + 1), desc="toy pre-training", unit="step", dynamic_ncols=True)
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
        if step % recipe.check_every == 0:
            # ---- a cheap sampled Pass@1 estimate: the learning curve, for the record ----
            model.eval()
            easy1 = sampled_accuracy(model, tokenizer, check_easy, recipe.check_n, recipe.max_new_tokens, step)
            hard1 = sampled_accuracy(model, tokenizer, check_hard, recipe.check_n, recipe.max_new_tokens, step)
            history.append({"step": step, "loss": round(loss.item(), 4), "easy_pass1_est": easy1,
                            "hard_pass1_est": hard1, "seconds": round(time.time() - start, 1)})
            log(f"step {step}: loss {loss.item():.3f}  easy Pass@1~{easy1:.2f}  hard Pass@1~{hard1:.2f}")
    bar.close()
    # ---- the competence measurement: full Pass@k curves, checked against the targets ----
    model.eval()
    evaluate = dict(n=recipe.eval_n, max_new_tokens=recipe.max_new_tokens, seed=recipe.seed,
                    ks=[k for k in (1, 2, 4, 8, 16, 32, 64, 128, 256) if k <= recipe.eval_n])
    easy = passk.evaluate(model, tokenizer, splits["test_easy"], desc="base eval easy", **evaluate)
    hard = passk.evaluate(model, tokenizer, splits["test_hard"], desc="base eval hard", **evaluate)
    met, misses = competence(easy, hard, recipe) if not recipe.quick else (True, [])
    log(f"full eval easy {fmt_curve(easy['curve'])} | hard {fmt_curve(hard['curve'])}"
        + ("  competence met" if met else "  -- competence NOT met: " + "; ".join(misses)))
    return {"easy": easy, "hard": hard, "steps": recipe.pretrain_steps, "met": met, "misses": misses,
            "seconds": round(time.time() - start, 1), "history": history}


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


def base_dir(recipe_seed: int = 0) -> pathlib.Path:
    """Where the base of a recipe seed is cached: runs/toy-base-s<seed> (the main job uses seed 0)."""
    return pathlib.Path("runs") / f"toy-base-s{recipe_seed}"


def ensure_base(out_dir=None, recipe: ToyRecipe | None = None, quick: bool = False,
                force: bool = False, log=print) -> pathlib.Path:
    """Build the toy base model into out_dir unless a build of the same recipe is already there.

    quick=True uses quick_recipe() (seconds; for tests). The build is written to a temporary sibling
    directory and renamed at the end, so an interrupted build never looks complete.
    Returns the directory (pathlib.Path).
    """
    recipe = recipe or (quick_recipe() if quick else ToyRecipe())
    out_dir = pathlib.Path(out_dir) if out_dir is not None else base_dir(recipe.seed)
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
                                    max_new_tokens=recipe.max_new_tokens, seed=recipe.seed, recipe=recipe)
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
    if out_dir.exists():            # an earlier build (another recipe, or --force): moved aside, not deleted
        log(f"toy: moved the earlier build in {out_dir} to {sample.move_aside(out_dir)}")
    tmp.rename(out_dir)
    log(f"toy: built in {build_seconds:.0f} s -> {out_dir}")
    return out_dir


# =================================================================================================
# MAIN
# =================================================================================================

def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["reproduce"]:
        # `python toy.py reproduce ...` = `python reproduce.py ...`, run as a child process: reproduce.py sits
        # ABOVE nsr.py, which imports this file, so importing it here would close an import circle
        return subprocess.call([sys.executable, str(pathlib.Path(__file__).with_name("reproduce.py")), *argv[1:]])
    parser = argparse.ArgumentParser(description="Build (or reuse) the toy base model and print its Pass@k. "
                                     "`python toy.py reproduce ...` runs reproduce.py.")
    parser.add_argument("--out", default=None, help="output directory (default runs/toy-base-s<seed>)")
    parser.add_argument("--quick", action="store_true", help="the seconds-long tiny build used by tests")
    parser.add_argument("--force", action="store_true", help="rebuild even if the cache matches the recipe "
                        "(the earlier build is moved aside to <out>.1, not deleted)")
    parser.add_argument("--seed", type=int, default=0, help="recipe seed (default 0)")
    args = parser.parse_args(argv)
    recipe = quick_recipe(args.seed) if args.quick else ToyRecipe(seed=args.seed)
    out = ensure_base(args.out, recipe=recipe, force=args.force)
    base_eval = json.loads((out / "base_eval.json").read_text())
    for split in ("easy", "hard"):
        curve = base_eval[split]["curve"]
        print(f"{split:5s} " + "  ".join(f"Pass@{k}={float(v):.3f}" for k, v in curve.items()))
        report = base_eval["strategy"][split]
        print(f"      strategy share {report['share']}"
              + (f", down by problem group {report['down_by_group']}" if "down_by_group" in report else ""))
    print(f"build {base_eval['build_seconds']} s, {base_eval['pretrain_steps']} steps, "
          f"competence met: {base_eval['competence_met']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
