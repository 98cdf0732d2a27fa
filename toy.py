"""
toy.py -- a toy world in which the paper's whole experiment runs on a laptop CPU in minutes.

The paper's effect needs a base model whose prior already holds the right answer some of the time, and
holds it with very different probabilities on different problems: on hard problems (AIME) the right
path is a low-probability one, often not the model's favourite, which only sampling diversity finds.
NSR hands the mass of a wrong answer to the alternatives the model already believes in; PSR sharpens
the model onto what it was rewarded for, and that sharpening also lowers the entropy where it was never
trained. This file builds such a world: a synthetic task, a character-level tokenizer, a tiny Qwen2
model pre-trained (supervised) for a FIXED number of steps into a "base model", all saved with
save_pretrained so every other file loads it like a hub model (AutoModelForCausalLM / AutoTokenizer
.from_pretrained; no other file has a toy code path).

THE TASK: decode a string of symbols with a codebook the model knows only from its pre-training corpus
    problem:  Decode kQa                           gold answer: 370
    solution: k=3 Q=7 a=0 \boxed{370}
Each of 52 one-letter symbols (a-z, A-Z) has a secret digit (the FACT TABLE, drawn per recipe seed). A
solution recalls each symbol's digit in turn and boxes the digits in order. The corpus is NOISY, in a way
fixed per symbol: it states a symbol's true digit with probability recall_s (the symbol's "corpus
recall"), and otherwise a wrong digit drawn from a per-symbol confusion distribution (Dirichlet(0.3):
one or two favourite wrong digits, a thin tail). Pre-training is long enough, and ends with a decaying
rate, so that the base BELIEVES what its corpus states (each belief within a few points of the corpus
rates: its Pass@k is predictable from the fact table); a problem is solved when every recall in it is
right (copying the digits into the box is learned exactly), with probability ~ the product of its
symbols' recalls. The symbols come in three tiers by corpus frequency (Zipf 0.7 over their rank):
    common (10)  frequent, recall 0.92-0.99                   in train / test_easy / test_hard
    medium (14)  MISCONCEPTIONS: recall 0.1-0.35 behind one wrong favourite digit stated 45-65% of the
                 time, in train / test_easy / test_hard: what RL can learn (easy Pass@1 ~30-45% in the base)
    rare (28)    recall 0.003-0.6 (log-uniform), seen 500-800 times in the corpus, so known as well as
                 the corpus states them; NEVER in a train (RL) problem; 1-2 in every test_hard problem
  train / test_easy: 2-3 common or medium symbols (the role of MATH): RL reweights beliefs it trains on.
  test_hard: 2-3 symbols, 1-2 of them rare (the role of AIME): per-problem success rates spread from
  <0.1% to >50%, and RL never sees these facts, so what RL does to them is what it does to the model's
  beliefs in general. Measured (docs/toy-regime-log.md): when the trained facts are misconceptions,
  learning them moves a wrong favourite's mass and NSR barely changes the rare beliefs, while PSR, which
  also self-distils the common facts once its accuracy is high, sharpens them (low-probability truths
  lose); when the trained facts have right favourites, or the base does not know its rare facts (toy-v7:
  a constant pre-training rate left them near a generic digit prior), every objective moves them.
An optional FORMAT choice ("k=3" or "k:3", ToyRecipe.formats) was tried and is off by default: the model
ignored the separator (docs/toy-regime-log.md, v8a).
The design history (what each earlier world measured): docs/toy.md and docs/toy-regime-log.md.

THE RECIPE (ToyRecipe, hashed; the cache runs/toy-base-s<seed> is rebuilt when it changes):
  tokenizer  one token per printable ASCII character + <|pad|>, <|endoftext|> (= EOS): a byte-level
             BPE without merges, in Qwen2's own pipeline so AutoTokenizer reloads it exactly; a chat
             template that renders only the problem line and a newline (char-level: short prompts).
  model      Qwen2ForCausalLM, 3 layers, hidden 64, 4 heads (2 KV heads), tied embeddings.
  pre-train  supervised next-token loss on the response tokens of corpus solutions (a stream of fresh
             corpus problems over ALL symbols, Zipf-weighted, each recall drawn from the symbol's corpus
             distribution; test problems never appear), in exactly the prompt + response format the RL
             loop samples. AdamW (lr 2e-3, cosine decay, batch 32, one thread), pretrain_steps (2,000) FIXED: one recipe seed
             gives the same base on any machine up to floating point, in a predictable time. Then the
             competence check (measured, printed, saved; it does not stop or change the build):
             passk.evaluate, n = 256, temperature 1: easy Pass@1 in [0.30, 0.80] and Pass@256 >= 0.85;
             hard Pass@1 <= 0.20 and Pass@256 <= 0.90 (unsaturated).
  output     runs/toy-base-s<seed>/: model + tokenizer, train.jsonl, test_easy.jsonl, test_hard.jsonl
             (fields problem, answer, solution), facts.json (the fact table), base_eval.json (Pass@k
             curves, the recall report, the learning curve), recipe.json (the recipe and its hash).

Run:  python toy.py                  # build (or reuse) runs/toy-base-s0 and print its Pass@k
      python toy.py --seed 1         # another recipe seed: another base
      python toy.py --force          # rebuild even if the cache is valid
      python toy.py --quick --out /tmp/toy-quick   # the seconds-long tiny build the tests use
      python toy.py recall DIR [BASE]  # the recall report of a model (a checkpoint) on BASE's test splits
      python toy.py reproduce ...    # = python reproduce.py ... (every method, verdicts of the findings)
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
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

import loading
import passk
import sample

# Bump when the task format or the build procedure changes in a way the recipe fields do not show:
# it is part of the recipe hash, so every cached base model is rebuilt.
RECIPE_VERSION = "toy-v8"


# =================================================================================================
# THE TASK: decode symbols with a codebook known from a noisy corpus
# =================================================================================================

SYMBOLS = string.ascii_lowercase + string.ascii_uppercase          # 52 one-character symbols
COMMON, MEDIUM, RARE = "common", "medium", "rare"
TIERS = (COMMON, MEDIUM, RARE)


@dataclasses.dataclass
class ToyRecipe:
    """Everything that determines the base model. Its hash names the cache (recipe.json)."""

    seed: int = 0
    """seeds the fact table, the splits, the corpus sampling, the model init and the sampling checks"""
    num_symbols: int = 52
    """symbols in the codebook (the first num_symbols of a-z, A-Z), ranked by corpus frequency per seed"""
    num_common: int = 10
    """the most frequent symbols: the "common" tier"""
    num_medium: int = 14
    """the next ones: the "medium" tier; every other symbol is "rare" (never in an RL training problem)"""
    common_recall: tuple = (0.92, 0.99)
    """corpus recall (probability that the corpus states the true digit) of common symbols: uniform"""
    medium_recall: tuple = (0.1, 0.35)
    """... of medium symbols: uniform"""
    medium_favourite: tuple = (0.45, 0.65)
    """corpus share of a medium symbol's FAVOURITE wrong digit (uniform; the rest of its wrong statements
    spread by Dirichlet(confusion_alpha)): every medium fact is a misconception, its truth a minority
    behind one confident wrong digit, on every recipe seed. (0, 0): no favourite, the plain Dirichlet"""
    rare_recall: tuple = (0.003, 0.6)
    """... of rare symbols: LOG-uniform, so some are nearly known and some nearly never stated right"""
    formats: tuple = ("=",)
    """the separators a solution may write between a symbol and its digit ("k=3 Q=7" or "k:3 Q:7"): the
    solution's FORMAT, chosen at its first separator and kept to its end. A corpus solution uses the first
    (major) format, or the second (minor) one with probability minor_format_share. Correctness never
    depends on the format; what the corpus states in it does (rare_major_recall)"""
    minor_format_share: float = 0.25
    """share of corpus solutions written in the minor format"""
    rare_major_recall: float = 0.1
    """a rare symbol's recall in the MAJOR format = this x its recall (which is its recall in the minor
    format): the corpus states rare facts right mostly in the minor format, so a hard problem is solved
    mostly by samples that choose it. Common and medium facts are stated alike in every format."""
    confusion_alpha: float = 0.3
    """Dirichlet concentration of how a symbol's wrong statements share the 9 wrong digits: small = one or
    two favourite wrong digits per symbol (a misconception) and a thin tail (0.05, one favourite and almost
    nothing else, made every objective gain coverage and PSR lose none: docs/toy-regime-log.md)"""
    zipf: float = 0.7
    """corpus frequency of the symbol of rank r (0 = most frequent): proportional to 1 / (r + 1)^zipf"""
    corpus_symbols: tuple = (1, 2, 3)
    """symbols per pre-training corpus problem (uniform)"""
    easy_symbols: tuple = (2, 3)
    """symbols per train / test_easy problem (uniform), common or medium, Zipf-weighted"""
    hard_symbols: tuple = (2, 3)
    """symbols per test_hard problem (uniform) ..."""
    hard_rare: tuple = (1, 2)
    """... of which this many (uniform) are rare (uniform over the rare tier), the rest common or medium"""
    num_train: int = 360
    """problems in train.jsonl (the RL training set)"""
    num_test: int = 128
    """problems in each of test_easy.jsonl and test_hard.jsonl"""
    layers: int = 3
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    lr: float = 2e-3
    """AdamW peak learning rate of pre-training: a linear warm-up over 50 steps, then a cosine decay to 0
    at the last step. With a constant rate the belief about a rarely seen symbol tracks its last few
    corpus examples (measured on toy-v7: recall 0.58 believed at 0.19, 0.004 at 0.09); the decay averages
    them, so the base believes what its corpus states"""
    batch_size: int = 32
    """sequences per pre-training step"""
    pretrain_steps: int = 2000
    """supervised steps, FIXED: one recipe seed gives the same base on any machine (up to floating point)
    and a predictable build time"""
    check_every: int = 1000
    """steps between cheap Pass@1 checks (n = check_n samples on check_problems problems per split), kept
    in base_eval.json "history" to show the learning curve; they do not stop the build"""
    check_n: int = 8
    check_problems: int = 32
    eval_n: int = 256
    """samples per problem of the full measurement saved in base_eval.json"""
    max_new_tokens: int = 64
    """response budget, ample for the longest reference solution (~24 characters)"""
    easy_pass1: tuple = (0.30, 0.80)
    """the competence targets, checked (and saved) after pre-training: a base that solves a fair share ..."""
    easy_pass256_min: float = 0.85
    """... whose samples cover almost every easy problem ..."""
    hard_pass1_max: float = 0.20
    """... that rarely solves a hard problem in one sample ..."""
    hard_pass256_max: float = 0.90
    """... and leaves some hard problems unsolved even at k = 256 (unsaturated)"""
    quick: bool = False
    """the tiny, seconds-long build for tests: no competence target, tiny model and splits"""


def quick_recipe(seed: int = 0) -> ToyRecipe:
    """A seconds-long build: a 2-layer width-32 model, 10 steps of 16 sequences, 4 test problems, n = 4.
    It checks the plumbing (files, reload, formats), not competence: its Pass@k is ~0."""
    return ToyRecipe(seed=seed, num_train=64, num_test=4, layers=2, hidden=32, heads=4, kv_heads=2,
                     batch_size=16, pretrain_steps=10, check_every=10**9, check_problems=4, check_n=2,
                     eval_n=4, max_new_tokens=24, quick=True)


def fact_table(recipe: ToyRecipe) -> dict[str, dict]:
    """{symbol: {"rank", "tier", "value", "recall", "corpus", "weight"}}, deterministic from recipe.seed.

    rank: corpus-frequency rank (0 = most frequent); weight = 1 / (rank + 1)^zipf (relative corpus
    frequency); value: the true digit; recall: probability that the corpus states it (in the minor format,
    for a rare symbol); corpus: per format (recipe.formats), the 10 probabilities (digit 0-9) with which a
    corpus solution in that format states this symbol's digit.
    """
    if not 0 < recipe.num_common + recipe.num_medium < recipe.num_symbols <= len(SYMBOLS):
        raise ValueError(f"need 0 < num_common + num_medium < num_symbols <= {len(SYMBOLS)}")
    rng = random.Random(f"toy-facts-{recipe.seed}")
    symbols = list(SYMBOLS[:recipe.num_symbols])
    rng.shuffle(symbols)
    table = {}
    for rank, s in enumerate(symbols):
        tier = COMMON if rank < recipe.num_common else MEDIUM if rank < recipe.num_common + recipe.num_medium else RARE
        if tier == RARE:
            lo, hi = recipe.rare_recall
            recall = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        else:
            recall = rng.uniform(*(recipe.common_recall if tier == COMMON else recipe.medium_recall))
        value = rng.randrange(10)
        shares = [rng.gammavariate(recipe.confusion_alpha, 1.0) for _ in range(9)]   # Dirichlet(alpha)
        wrong = [d for d in range(10) if d != value]
        favourite = rng.uniform(*recipe.medium_favourite) if tier == MEDIUM and recipe.medium_favourite[1] > 0 else 0.0
        top = wrong[max(range(9), key=lambda i: shares[i])]      # the favourite: the wrong digit with the largest share
        corpora = []
        for f in range(len(recipe.formats)):
            stated = recall * recipe.rare_major_recall if tier == RARE and f == 0 and len(recipe.formats) > 1 else recall
            corpus = [0.0] * 10
            corpus[value] = stated
            rest = sum(share for d, share in zip(wrong, shares) if not (favourite and d == top))
            for d, share in zip(wrong, shares):
                corpus[d] = favourite if favourite and d == top else (1 - stated - favourite) * share / rest
            corpora.append(corpus)
        table[s] = {"rank": rank, "tier": tier, "value": value, "recall": recall, "corpus": corpora,
                    "weight": 1.0 / (rank + 1) ** recipe.zipf}
    return table


def problem_text(symbols: list[str]) -> str:
    """Decode kQa"""
    return "Decode " + "".join(symbols)


def solve(symbols: list[str], digits: list[int], sep: str = "=") -> str:
    """The worked solution stating these digits: "k=3 Q=7 a=0 \\boxed{370}" (wrong if a digit is);
    sep: the format's separator ("k:3 Q:7 a:0 \\boxed{370}")."""
    return " ".join(f"{s}{sep}{d}" for s, d in zip(symbols, digits)) + f" \\boxed{{{''.join(map(str, digits))}}}"


def make_problem(symbols: list[str], facts: dict) -> dict:
    """One problem with its reference solution (the true digits)."""
    digits = [facts[s]["value"] for s in symbols]
    return {"problem": problem_text(symbols), "answer": "".join(map(str, digits)),
            "solution": solve(symbols, digits), "symbols": list(symbols)}


def symbols_of(problem: str) -> list[str]:
    """The symbols of a problem text: "Decode kQa" -> ["k", "Q", "a"]."""
    return list(problem.split()[-1])


def draw_symbols(rng: random.Random, pool: list[str], facts: dict, count: int, weighted: bool = True) -> list[str]:
    """count distinct symbols from pool, each draw proportional to its corpus weight (or uniform)."""
    pool, out = list(pool), []
    for _ in range(count):
        s = rng.choices(pool, weights=[facts[p]["weight"] for p in pool] if weighted else None)[0]
        pool.remove(s)
        out.append(s)
    return out


def tier_symbols(facts: dict, *tiers: str) -> list[str]:
    return sorted((s for s, f in facts.items() if f["tier"] in tiers), key=lambda s: facts[s]["rank"])


def make_splits(recipe: ToyRecipe) -> dict[str, list[dict]]:
    """train / test_easy / test_hard, deterministic from recipe.seed, with no problem text in two splits.

    test_easy and train: common and medium symbols (Zipf-weighted); test_hard: 1-2 rare symbols (uniform
    over the rare tier) among 2-3, the rest common or medium, in random order.
    """
    facts = fact_table(recipe)
    rng = random.Random(f"toy-splits-{recipe.seed}")
    trained, rare = tier_symbols(facts, COMMON, MEDIUM), tier_symbols(facts, RARE)
    seen: set[str] = set()

    def draw(count, make):
        out, tries = [], 0
        while len(out) < count:
            tries += 1
            if tries > 100 * count + 1000:
                raise ValueError(f"could not draw {count} distinct problems: too few symbols for the split sizes")
            p = make_problem(make(), facts)
            if p["problem"] not in seen:
                seen.add(p["problem"])
                out.append(p)
        return out

    def easy():
        return draw_symbols(rng, trained, facts, rng.choice(recipe.easy_symbols))

    def hard():
        length = rng.choice(recipe.hard_symbols)
        num_rare = min(rng.choice(recipe.hard_rare), length)
        symbols = (draw_symbols(rng, rare, facts, num_rare, weighted=False)
                   + draw_symbols(rng, trained, facts, length - num_rare))
        rng.shuffle(symbols)
        return symbols

    test_easy = draw(recipe.num_test, easy)
    test_hard = draw(recipe.num_test, hard)
    def train_problem():
        rng.random()     # NOTE: a draw that once chose easy or hard, kept so each seed's splits stay the same
        return easy()

    train = draw(recipe.num_train, train_problem)
    return {"train": train, "test_easy": test_easy, "test_hard": test_hard}


def corpus_problem(rng: random.Random, facts: dict, recipe: ToyRecipe, exclude: set) -> dict:
    """One pre-training corpus problem: symbols over ALL tiers by corpus weight, and a solution that
    states each digit as the corpus does (the true one with probability recall, else a confusion)."""
    symbols = list(facts)
    while True:
        chosen = draw_symbols(rng, symbols, facts, rng.choice(recipe.corpus_symbols))
        text = problem_text(chosen)
        if text not in exclude:
            break
    fmt = 1 if len(recipe.formats) > 1 and rng.random() < recipe.minor_format_share else 0
    digits = [rng.choices(range(10), weights=facts[s]["corpus"][fmt])[0] for s in chosen]
    return {"problem": text, "solution": solve(chosen, digits, recipe.formats[fmt]), "symbols": chosen,
            "format": fmt}


# =================================================================================================
# TOKENIZER: one token per character, a compact chat template
# =================================================================================================

PAD, EOS = "<|pad|>", "<|endoftext|>"

# The chat template renders ONLY the problem line of the user message and a newline. loading.render_prompt
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
def sft_batch(problems: list[dict], prompt_cache: dict, tokenizer):
    """A batch of prompt + corpus response + <eos>, loss only on the response.

    problems: corpus problems ({"problem", "solution"}; corpus_problem). prompt_cache: problem text ->
    prompt ids (filled here). Returns input_ids (B, T), labels (B, T) with -100 on prompt and padding,
    attention_mask (B, T), loss_weights (B, T): 1 on every response token, 0 elsewhere.
    """
    rows, label_rows = [], []
    for p in problems:
        if p["problem"] not in prompt_cache:
            prompt_cache[p["problem"]] = loading.encode_prompts(tokenizer, [p])[0][0]
        prompt = prompt_cache[p["problem"]]
        response_ids = tokenizer(p["solution"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt + response_ids)
        label_rows.append([-100] * len(prompt) + response_ids)
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    # Right padding: positions are then 0..len-1 for every row, exactly as in sampling (which
    # left-pads but passes position ids that start at 0 on the first real token).
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])              # (B, T)
    labels = torch.tensor([r + [-100] * (width - len(r)) for r in label_rows])           # (B, T)
    attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])  # (B, T)
    loss_weights = (labels != -100).float()                                               # (B, T)
    return input_ids, labels, attention_mask, loss_weights


def sampled_accuracy(model, tokenizer, problems, n: int, max_new_tokens: int, seed: int) -> float:
    """Mean correctness of n samples per problem (= an estimate of Pass@1): the cheap check."""
    prompt_ids, kept, _ = loading.encode_prompts(tokenizer, problems)
    rows = [ids for ids in prompt_ids for _ in range(n)]
    generator = torch.Generator().manual_seed(seed)
    rollouts = sample.generate(model, rows, max_new_tokens, generator=generator)
    return sum(passk.verify(tokenizer, rollouts.tokens, [p["answer"] for p in kept for _ in range(n)])) / len(rows)



@torch.no_grad()
def recall_report(model, tokenizer, problems: list[dict], facts: dict, formats: tuple = ("=",)) -> dict:
    """The model's beliefs at every recall of the reference solutions (teacher-forced, one forward pass
    per problem and format).

    At the digit after "s=" it reads p(true digit), whether the true digit is the most likely token,
    and the entropy (nats, whole vocabulary, temperature 1). Returns per tier {"p_true", "top1",
    "entropy", "count"} (means over recall positions) and "problems": per problem the product of its
    p(true digit), which is the model's chance to solve it when it copies its digits faithfully -- all
    in the first format. With several formats also "by_format" (the same report per separator),
    "format_share" (per separator: the mean probability that a solution picks it at its first separator),
    "format_entropy" (the mean entropy of that choice among the formats, nats) and "solve" (per problem
    sum_f p(f) x product_f: the chance to solve it over the format choice).
    """
    prompt_ids, kept, _ = loading.encode_prompts(tokenizer, problems)
    device = next(model.parameters()).device
    sep_ids = [tokenizer(sep, add_special_tokens=False)["input_ids"][0] for sep in formats]
    by_format, choice = {}, []
    for sep in formats:
        stats = {t: {"p_true": 0.0, "top1": 0.0, "entropy": 0.0, "count": 0} for t in TIERS}
        products = []
        for j, (prompt, p) in enumerate(zip(prompt_ids, kept)):
            symbols = symbols_of(p["problem"])
            solution = (p["solution"] if "solution" in p and sep == "=" else
                        solve(symbols, list(map(int, p["answer"])), sep))
            response = tokenizer(solution, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt + response], device=device)
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)            # (T, V)
            if sep == formats[0]:
                # the format choice: the token after the first symbol (response token 1)
                first = logp[len(prompt)][sep_ids].exp()
                choice.append(first)
            product = 1.0
            for i, ch in enumerate(solution):
                if ch != sep or i + 1 >= len(solution):
                    continue
                s, pos = solution[i - 1], len(prompt) + i + 1     # char-level: char i+1 = response token i+1
                row = logp[pos - 1]                                 # the logits that predict token pos
                true_id = response[i + 1]
                p_true = row[true_id].exp().item()
                tier = facts[s]["tier"]
                stats[tier]["p_true"] += p_true
                stats[tier]["top1"] += float(row.argmax().item() == true_id)
                stats[tier]["entropy"] += -(row.exp() * row).sum().item()
                stats[tier]["count"] += 1
                product *= p_true
            products.append(product)
        report = {t: ({k: v / s["count"] for k, v in s.items() if k != "count"} | {"count": s["count"]})
                  if s["count"] else None for t, s in stats.items()}
        report["problems"] = products
        by_format[sep] = report
    out = dict(by_format[formats[0]])
    if len(formats) > 1:
        c = torch.stack(choice)                                          # (problems, formats)
        share = c / c.sum(-1, keepdim=True)
        out["by_format"] = by_format
        out["format_share"] = {sep: float(c[:, f].mean()) for f, sep in enumerate(formats)}
        out["format_entropy"] = float(-(share * share.clamp_min(1e-12).log()).sum(-1).mean())
        out["solve"] = [sum(float(c[j, f]) * by_format[sep]["problems"][j] for f, sep in enumerate(formats))
                        for j in range(len(kept))]
    return out


def competence(easy: dict, hard: dict, recipe: ToyRecipe) -> tuple[bool, list[str]]:
    """Check the base-model targets on two passk.evaluate results -> (all met, list of misses)."""
    lo, hi = recipe.easy_pass1
    e, h = easy["curve"], hard["curve"]
    e256 = e.get(256, e.get(str(256), e[max(e)] if e else 0.0))
    h256 = h.get(256, h.get(str(256), h[max(h)] if h else 0.0))
    misses = []
    if not lo <= e[1] <= hi:
        misses.append(f"easy Pass@1 {e[1]:.3f} not in [{lo}, {hi}]")
    if e256 < recipe.easy_pass256_min:
        misses.append(f"easy Pass@256 {e256:.3f} < {recipe.easy_pass256_min}")
    if h[1] > recipe.hard_pass1_max:
        misses.append(f"hard Pass@1 {h[1]:.3f} > {recipe.hard_pass1_max}")
    if h256 > recipe.hard_pass256_max:
        misses.append(f"hard Pass@256 {h256:.3f} > {recipe.hard_pass256_max}")
    return not misses, misses


def pretrain(model, tokenizer, splits: dict, recipe: ToyRecipe, log=print) -> dict:
    """Supervised pre-training for recipe.pretrain_steps steps on the corpus stream, then the competence
    measurement. Returns {"easy": passk result, "hard": passk result, "steps", "seconds", "met", "misses",
    "history"}."""
    rng = random.Random(f"toy-corpus-{recipe.seed}")
    facts = fact_table(recipe)
    exclude = {p["problem"] for p in splits["test_easy"] + splits["test_hard"]}
    prompt_cache: dict = {}
    check_easy = splits["test_easy"][:recipe.check_problems]
    check_hard = splits["test_hard"][:recipe.check_problems]
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.98), weight_decay=0.0)

    def decay(step: int) -> float:
        """the cosine decay after the warm-up: 1 at step 50, 0 at the last step"""
        if step <= 50:
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * (step - 50) / max(recipe.pretrain_steps - 50, 1)))

    start, history = time.time(), []
    bar = tqdm(range(1, recipe.pretrain_steps + 1), desc="toy pre-training", unit="step", dynamic_ncols=True)
    for step in bar:
        # ---- one supervised step: -mean_t log pi(corpus token t) over the response tokens ----
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr * min(1.0, step / 50) * decay(step)    # linear warm-up, then the decay
        batch = [corpus_problem(rng, facts, recipe, exclude) for _ in range(recipe.batch_size)]
        input_ids, labels, attention_mask, loss_weights = sft_batch(batch, prompt_cache, tokenizer)
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
    facts = fact_table(recipe)
    splits = make_splits(recipe)
    tokenizer = build_tokenizer()
    model = build_model(recipe, tokenizer)
    log(f"toy: Qwen2ForCausalLM with {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{len(splits['train'])} train problems")
    result = pretrain(model, tokenizer, splits, recipe, log=log)
    if not result["met"]:
        log("toy: WARNING: competence targets not met: " + "; ".join(result["misses"]))
    model.eval()
    recall = {name: recall_report(model, tokenizer, splits[split], facts, recipe.formats)
              for name, split in (("easy", "test_easy"), ("hard", "test_hard"))}

    tmp = out_dir.with_name(out_dir.name + f".tmp-{recipe_hash(recipe)}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    for name in ("train", "test_easy", "test_hard"):
        write_jsonl(tmp / f"{name}.jsonl", splits[name])
    (tmp / "facts.json").write_text(json.dumps(facts, indent=1))
    build_seconds = round(time.time() - start, 1)
    base_eval = {"easy": result["easy"], "hard": result["hard"], "recall": recall,
                 "competence_met": result["met"], "misses": result["misses"],
                 "pretrain_steps": result["steps"], "pretrain_seconds": result["seconds"],
                 "build_seconds": build_seconds, "history": result["history"],
                 "command": "python toy.py", "torch_threads": torch.get_num_threads()}
    passk.save_result(base_eval, tmp / "base_eval.json")
    (tmp / "recipe.json").write_text(json.dumps({"hash": recipe_hash(recipe), "version": RECIPE_VERSION,
                                                 "recipe": dataclasses.asdict(recipe)}, indent=2))
    if out_dir.exists():            # an earlier build (another recipe, or --force): moved aside, not deleted
        log(f"toy: moved the earlier build in {out_dir} to {loading.move_aside(out_dir)}")
    tmp.rename(out_dir)
    log(f"toy: built in {build_seconds:.0f} s -> {out_dir}")
    return out_dir


def fmt_recall(report: dict) -> str:
    def one(rep):
        return "  ".join(f"{t}: p(true) {r['p_true']:.3f}, top-1 {r['top1']:.2f}, H {r['entropy']:.3f} ({r['count']})"
                         for t, r in rep.items() if t in TIERS and r)
    if "by_format" not in report:
        return one(report)
    share = "  ".join(f"'{sep}' {v:.3f}" for sep, v in report["format_share"].items())
    return (f"format share {share} (H {report['format_entropy']:.3f})\n"
            + "\n".join(f"        in '{sep}': " + one(rep) for sep, rep in report["by_format"].items()))


def recall_command(model_dir: str, base: str | None) -> int:
    """`python toy.py recall MODEL [BASE]`: the recall report of a model (e.g. a training checkpoint)
    on the test splits of BASE (default: MODEL itself), with the facts of BASE."""
    base_path = pathlib.Path(base or model_dir)
    facts = json.loads((base_path / "facts.json").read_text())
    formats = tuple(json.loads((base_path / "recipe.json").read_text())["recipe"].get("formats", ("=",)))
    torch.set_num_threads(1)
    model, tokenizer = loading.load_model(model_dir, dtype="float32", device="cpu")
    for split in ("test_easy", "test_hard"):
        problems = [json.loads(line) for line in (base_path / f"{split}.jsonl").read_text().splitlines()]
        print(f"{split:9s} " + fmt_recall(recall_report(model, tokenizer, problems, facts, formats)))
    return 0


# =================================================================================================
# MAIN
# =================================================================================================

def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["reproduce"]:
        # `python toy.py reproduce ...` = `python reproduce.py ...`, run as a child process: reproduce.py sits
        # ABOVE nsr.py, which imports this file, so importing it here would close an import circle
        return subprocess.call([sys.executable, str(pathlib.Path(__file__).with_name("reproduce.py")), *argv[1:]])
    if argv[:1] == ["recall"] and len(argv) in (2, 3):
        return recall_command(argv[1], argv[2] if len(argv) == 3 else None)
    parser = argparse.ArgumentParser(description="Build (or reuse) the toy base model and print its Pass@k. "
                                     "`python toy.py reproduce ...` runs reproduce.py; "
                                     "`python toy.py recall MODEL [BASE]` prints a model's recall report.")
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
        print("      recall " + fmt_recall(base_eval["recall"][split]))
    print(f"build {base_eval['build_seconds']} s, {base_eval['pretrain_steps']} steps, "
          f"competence met: {base_eval['competence_met']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
