"""
passk.py -- unbiased Pass@k: sample n answers per problem, count the correct ones, draw the curve.

The paper's main evidence is the whole Pass@k curve, k = 1, 2, 4, ..., 256 (PSR lifts Pass@1 and loses the
large-k end; NSR keeps it), so this file measures the whole curve, not one number.

The estimator (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", arXiv 2107.03374,
Sec. 2.1; the paper's official code, RLVR-Decomposed calculate_metrics.py, uses the same product form).
For one problem with n samples of which c are correct:

    pass@k = 1 - C(n-c, k) / C(n, k)                  P(k samples drawn from the n, without replacement,
                                                        are all wrong), subtracted from 1
           = 1 - prod_{i=n-c+1}^{n} (1 - k/i)         the stable product form (derived in pass_at_k)

and the reported Pass@k is its mean over problems. It is unbiased: if each sample is correct with
probability p, E[pass@k] = 1 - (1-p)^k exactly (see pass_at_k's docstring and the tests).

Deviations / choices (the paper is silent on these):
  1. The product is evaluated in log space, 1 - prod(...) = -expm1(sum(log1p(-k/i))): the same number,
     but rounding no longer accumulates over c factors (measured: relative error <= 3e-16 against exact
     fractions for n <= 512, versus 2e-14 for the plain float product).
  2. Default ks are the powers of two up to n (1, 2, 4, ..., 256 for n = 256), the paper's x axis.
  3. mean_length counts generated tokens including the EOS token when one was produced; mean_entropy is
     the token-weighted mean over every generated token of every sample (long answers weigh more).
  4. Each problem's n samples are its prompt repeated n times; several problems' repeats go to the
     sampler in one call (about chunk_size rows). Common random numbers: sample j of problem p draws its
     token at step t by inverse CDF at the uniform problem_uniforms(seed, p, n, max_new_tokens)[j, t], so
     the same (model, problems, seed, n, max_new_tokens) gives the same samples whatever the chunk size,
     and two models evaluated with one seed see the same uniforms (their difference in Pass@k is then
     less noisy: docs/passk.md has the measurement). --no-crn: the older scheme, one torch.Generator
     seeded with `seed` drawing for whatever rows are in the batch.

Run:
    python passk.py --model runs/toy-base-s0 --data runs/toy-base-s0/test_easy.jsonl --n 256 --out runs/base.json
    python passk.py --compare runs/base.json runs/nsr.json [--plot curves.png]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import operator
import pathlib
import sys
import time

import torch
from tqdm import tqdm

import loading
import sample
import verifier


# =================================================================================================
# THE ESTIMATOR: (n, c, k) -> pass@k, and the curve over problems
# =================================================================================================

def _check_int(name: str, value, minimum: int = 0) -> int:
    """Counts must be whole numbers: 2.5 samples is a bug upstream, not something to round."""
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            value = operator.index(value)          # accepts numpy integers, rejects floats and strings
        except TypeError:
            raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


# PROBLEM pass_at_k (10 points): the unbiased estimator of Pass@k from n samples with c correct
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k for one problem from n samples of which c are correct.

    Derivation (Chen et al. 2021, Sec. 2.1, Codex paper):
      1. pick k of the n samples uniformly without replacement; all k are wrong w.p. C(n-c, k) / C(n, k).
      2. C(n-c, k) / C(n, k) = [(n-c)! / (n-c-k)!] * [(n-k)! / n!]
                             = prod_{i=n-c+1}^{n} (i-k)/i    (both ratios have c factors, i from n-c+1 to n)
      3. so pass@k = 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms a huge binomial coefficient.
    When n - c < k every k-subset contains a correct sample, so pass@k = 1 exactly; c = 0 gives 0.0.
    Accurate to a relative 1e-15, also where pass@k is tiny (small c and k at large n), where 1 minus a
    ratio near 1 would lose the digits. Arguments: integers (numpy integers too) with n >= 1, c >= 0, k >= 1
    (_check_int raises the ValueError), and a ValueError "k=<k> > n=<n>: ..." or "c=<c> > n=<n>: ...".

    Why unbiased: C(n-c,k)/C(n,k) is the average, over all k-subsets of the n samples, of "all k are
    wrong"; each subset is k independent samples, wrong together w.p. (1-p)^k, so the expectation is
    exactly (1-p)^k. Plugging in p_hat = c/n instead, 1 - (1 - c/n)^k, is biased low (Jensen).
    """
    n, c, k = _check_int("n", n, 1), _check_int("c", c), _check_int("k", k, 1)
    if k > n:
        raise ValueError(f"k={k} > n={n}: pass@k needs at least k samples per problem")
    if c > n:
        raise ValueError(f"c={c} > n={n}: more correct samples than samples")
    if c == 0:
        return 0.0                                 # empty product; avoids returning -0.0
    if n - c < k:
        return 1.0                                 # fewer than k wrong samples: any k of them hit one
    # pass@k = 1 - prod_{i=n-c+1}^{n} (1 - k/i), with prod = exp(sum log1p(-k/i)) and 1 - exp(x) = -expm1(x)
    log_all_wrong = math.fsum(math.log1p(-k / i) for i in range(n - c + 1, n + 1))
    return -math.expm1(log_all_wrong)


def default_ks(n: int) -> list[int]:
    """The powers of two up to n: [1, 2, 4, ..., 2^floor(log2 n)] (the paper's x axis)."""
    n = _check_int("n", n, 1)
    return [2 ** j for j in range(n.bit_length())]


def passk_curve(correct_counts, n: int, ks=None) -> dict[int, float]:
    """Pass@k for each k in ks: the mean over problems of pass_at_k(n, c_problem, k).

    correct_counts: one count of correct samples per problem (each out of n). ks: default powers of 2 <= n.
    """
    counts = [_check_int(f"correct_counts[{i}]", c) for i, c in enumerate(correct_counts)]
    if not counts:
        raise ValueError("correct_counts is empty: no problems to average over")
    ks = default_ks(n) if ks is None else [_check_int("k", k, 1) for k in ks]
    # Pass@k = (1/P) sum_problems pass_at_k(n, c_p, k); fsum so the mean does not depend on the order.
    return {k: math.fsum(pass_at_k(n, c, k) for c in counts) / len(counts) for k in ks}


# =================================================================================================
# EVALUATE: problems -> n samples each (sample.generate) -> verify (verifier.is_correct) -> counts
# =================================================================================================

def problem_uniforms(seed: int, problem: int, n: int, max_new_tokens: int) -> torch.Tensor:
    """The common random numbers of one problem: a (n, max_new_tokens) float64 table of Uniform[0, 1) draws;
    entry [j, t] draws sample j's token at step t (sample.sample_from's u, by inverse CDF).

    Its generator is seeded by (seed, problem) alone, so a model's draws do not depend on how the rows were
    batched, when they were evicted, or what the other problems or models sampled: two models evaluated
    with the same seed read the same uniforms and differ only where their distributions do. The table is
    drawn row by row, so the first n rows are the same for any larger n (same max_new_tokens).
    Drawn on the CPU, so a CUDA model sees the same numbers as a CPU one.
    """
    # the seed of (seed, problem): the first 8 bytes of a SHA-256, so no two pairs share a stream
    digest = hashlib.sha256(f"passk-uniforms:{seed}:{problem}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    return torch.rand((n, max_new_tokens), dtype=torch.float64, generator=generator)


def _check_evaluate_input(problems, n, ks, chunk_size):
    """evaluate()'s argument checks, all before any sampling -> (problems as a list, n, sorted ks)."""
    n = _check_int("n (samples per problem)", n, 1)
    ks = default_ks(n) if ks is None else sorted({_check_int("k", k, 1) for k in ks})
    for k in ks:
        if not 1 <= k <= n:
            raise ValueError(f"k={k} is out of range: every k must satisfy 1 <= k <= n={n}")
    problems = list(problems)
    if not problems:
        raise ValueError("no problems to evaluate (empty data set)")
    for i, p in enumerate(problems):
        if "problem" not in p or "answer" not in p:
            raise ValueError(f"problems[{i}] needs keys 'problem' and 'answer', has {sorted(p)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return problems, n, ks


def verify(tokenizer, responses: list[list[int]], answers: list[str]) -> list[bool]:
    """Is each response (token ids) correct for its gold answer? decode + verifier.is_correct, in order.

    NOTE: each DISTINCT (response, answer) pair is decoded and verified once (a dict): a trained model
    repeats a few answers hundreds of times out of n, and the verifier's canonicalisation was ~20% of
    evaluate()'s time when it ran per sample. The same booleans as one call per response.
    """
    verdicts: dict[tuple, bool] = {}
    out = []
    for tokens, answer in zip(responses, answers, strict=True):
        key = (tuple(tokens), answer)
        if key not in verdicts:
            response = tokenizer.decode(tokens, skip_special_tokens=True)
            verdicts[key] = bool(verifier.is_correct(response, answer))
        out.append(verdicts[key])
    return out


def evaluate(model, tokenizer, problems, n: int, *, temperature: float = 1.0, top_p: float = 1.0,
             max_new_tokens: int = 512, seed: int = 0, template: str = "auto", chunk_size: int = 256,
             desc: str = "eval", out=None, ks=None, model_name: str | None = None,
             data_name: str | None = None, common_random_numbers: bool = True) -> dict:
    """Sample n answers per problem, verify each, and return the JSON-serialisable result.

    problems: [{"problem": str, "answer": str}, ...] (loading.load_problems). ks: curve points (default powers
    of 2 <= n). out: a path to save the result as JSON. model_name / data_name are stored as given.
    common_random_numbers: True (default) = sample j of problem p draws its tokens with problem_uniforms(
    seed, p, ...)[j]; False = one torch.Generator seeded with `seed` drives every draw in batch order (the
    older scheme: two models' streams part at the first step where their batches differ).

    The result (every field is explained in the README):
      model, data      model name/dir and data file as given (None if not given)
      n                samples per problem
      num_problems     problems evaluated; num_skipped: problems encode_prompts skipped (prompt too long)
      counts           correct samples per problem, in data order -> passk_curve(counts, n) recomputes a curve
      curve            {k: Pass@k} for ks, fractions in [0, 1]
      avg_at_n         mean accuracy over all n * num_problems samples (= Pass@1)
      mean_length      mean generated tokens per sample, counting the EOS token when produced
      truncation_rate  fraction of samples that hit max_new_tokens without an EOS
      mean_entropy     policy entropy (nats; temperature 1, no top-p) averaged over all generated tokens
      seconds          wall-clock time of the sampling loop
      settings         n, temperature, top_p, max_new_tokens, seed, template, chunk_size, common_random_numbers
    """
    problems, n, ks = _check_evaluate_input(problems, n, ks, chunk_size)   # bad input fails before sampling
    prompt_ids, kept, n_skipped = loading.encode_prompts(tokenizer, problems, template=template)
    if not kept:
        raise ValueError(f"all {len(problems)} problems were skipped while encoding prompts")
    settings = {"n": n, "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens,
                "seed": seed, "template": template, "chunk_size": chunk_size,
                "common_random_numbers": common_random_numbers}
    start = time.time()
    counts, n_tokens, n_truncated, entropy_sum = _sample_and_count(model, tokenizer, prompt_ids, kept, settings, desc)
    num_samples = len(kept) * n
    result = {
        "model": model_name,
        "data": data_name,
        "n": n,
        "num_problems": len(kept),
        "num_skipped": n_skipped,
        "counts": counts,
        "curve": passk_curve(counts, n, ks),
        # avg@n = mean over problems of c/n = mean accuracy of all samples (= the k=1 point of the curve)
        "avg_at_n": sum(counts) / num_samples,
        "mean_length": n_tokens / num_samples,
        "truncation_rate": n_truncated / num_samples,
        "mean_entropy": entropy_sum / max(n_tokens, 1),
        "seconds": round(time.time() - start, 3),
        "settings": settings,
    }
    if out is not None:
        save_result(result, out)
    return result


def _sample_and_count(model, tokenizer, prompt_ids, problems, settings: dict, desc: str):
    """The sampling loop of evaluate() -> (counts per problem, generated tokens, truncated samples, entropy sum).

    Each problem's n samples are its prompt repeated n times. Feed ~chunk_size rows per generate() call:
    several problems at once when n is small, one problem (chunked inside generate) when n is big.
    """
    n, chunk_size, seed = settings["n"], settings["chunk_size"], settings["seed"]
    generator = None
    if not settings["common_random_numbers"]:
        # one generator, seeded once, on the model's device (a CUDA model samples with a CUDA generator)
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    per_call = max(1, chunk_size // n)             # problems per generate() call
    counts: list[int] = []                         # counts[p] = number of correct samples of problem p
    n_tokens, n_truncated, entropy_sum = 0, 0, 0.0
    bar = tqdm(total=len(problems), desc=desc, unit="problem", dynamic_ncols=True)
    for first in range(0, len(problems), per_call):
        group = problems[first:first + per_call]
        rows = [ids for ids in prompt_ids[first:first + per_call] for _ in range(n)]  # len(group)*n prompts
        uniforms = None if generator is not None else torch.cat(
            [problem_uniforms(seed, p, n, settings["max_new_tokens"]) for p in range(first, first + len(group))])
        rollouts = sample.generate(model, rows, settings["max_new_tokens"], temperature=settings["temperature"],
                                   top_p=settings["top_p"], generator=generator, chunk_size=chunk_size,
                                   uniforms=uniforms)
        for j, problem in enumerate(group):
            samples = slice(j * n, (j + 1) * n)    # rows of problem j, in input order
            counts.append(sum(verify(tokenizer, rollouts.tokens[samples], [problem["answer"]] * n)))
            n_tokens += sum(map(len, rollouts.tokens[samples]))
            n_truncated += sum(rollouts.truncated[samples])
            for row in rollouts.entropies[samples]:
                entropy_sum += math.fsum(row)
        bar.update(len(group))
        bar.set_postfix(avg_at_n=f"{sum(counts) / (len(counts) * n):.3f}")
    bar.close()
    return counts, n_tokens, n_truncated, entropy_sum


# =================================================================================================
# SAVE / LOAD / TABLE / PLOT
# =================================================================================================

def save_result(result: dict, path) -> pathlib.Path:
    """Write the result as JSON, one top-level field per line (JSON keys are strings: k=1 is stored as "1").

    One line per field keeps a 5000-problem "counts" list on one line instead of 5000, and the file
    diffable and greppable; it is still ordinary JSON for any reader.
    NOTE: written to a temporary file and renamed (os.replace is atomic), so an interrupted run never
    leaves a truncated result that a later --compare or `toy.py reproduce` summary would fail to read.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = [f"  {json.dumps(str(key))}: {json.dumps(value)}" for key, value in result.items()]
    return loading.write_atomic(path, "{\n" + ",\n".join(fields) + "\n}\n")


def load_result(path) -> dict:
    """Read a saved result and restore the integer k keys of "curve"."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    for field in ("counts", "n"):
        if not isinstance(result, dict) or field not in result:
            raise ValueError(f"{path}: not a passk result (missing field {field!r})")
    result["curve"] = {int(k): v for k, v in result.get("curve", {}).items()}
    return result


def _table_ks(results: dict, ks) -> list[int]:
    """Columns: the given ks, else every k stored in any result's curve (else powers of 2 <= max n)."""
    if ks is not None:
        return sorted({_check_int("k", k, 1) for k in ks})
    stored = {k for r in results.values() for k in r.get("curve", {})}
    return sorted(stored) if stored else default_ks(max(r["n"] for r in results.values()))


def format_table(results: dict, ks=None) -> str:
    """The paper-style table: one row per run, one column per k, Pass@k in percent with one decimal.

    results: {row name: result}. Values are recomputed from the stored counts (so any k <= n works);
    a k larger than a run's n shows as "-".
    """
    if not results:
        raise ValueError("no results to tabulate")
    ks = _table_ks(results, ks)
    header = ["Pass@k (%)"] + [f"k={k}" for k in ks]
    rows = []
    for name, r in results.items():
        curve = passk_curve(r["counts"], r["n"], [k for k in ks if k <= r["n"]])
        rows.append([str(name)] + [f"{100 * curve[k]:.1f}" if k in curve else "-" for k in ks])
    widths = [max(len(row[j]) for row in [header] + rows) for j in range(len(header))]
    lines = []
    for row in [header] + rows:
        lines.append("  ".join([row[0].ljust(widths[0])] +
                               [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])]))
    return "\n".join(lines)


def plot_curves(results: dict, path, ks=None) -> pathlib.Path:
    """PNG of Pass@k (%) against k on a log2 axis, one line per run. Needs matplotlib (ImportError if not)."""
    # matplotlib's object API (Figure + savefig) needs no pyplot global state and no display.
    from matplotlib.figure import Figure

    ks = _table_ks(results, ks)
    fig = Figure(figsize=(6, 4), dpi=150)
    ax = fig.subplots()
    for name, r in results.items():
        points = [k for k in ks if k <= r["n"]]
        curve = passk_curve(r["counts"], r["n"], points)
        ax.plot(points, [100 * curve[k] for k in points], marker="o", markersize=4, label=str(name))
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("k (log2 scale)")
    ax.set_ylabel("Pass@k (%)")
    data = {pathlib.Path(str(r.get("data"))).name for r in results.values()}
    ax.set_title("Pass@k" + (f" on {data.pop()}" if len(data) == 1 and "None" not in data else ""))
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


# =================================================================================================
# MAIN: evaluate one model, or compare saved results
# =================================================================================================

def _parse_ks(text):
    return None if text is None else [int(k) for k in text.split(",") if k.strip()]


def _run_names(paths) -> list[str]:
    """Row names: file stems ("runs/nsr.json" -> "nsr"), or the paths when two stems collide."""
    stems = [pathlib.Path(p).stem for p in paths]
    return stems if len(set(stems)) == len(stems) else [str(p) for p in paths]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Unbiased Pass@k: evaluate a model (--model --data --n --out) or --compare results.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python passk.py --model runs/toy-base-s0 --data runs/toy-base-s0/test_easy.jsonl --n 256 "
               "--out runs/base.json\n"
               "  python passk.py --compare runs/base.json runs/nsr.json --plot runs/curves.png")
    parser.add_argument("--model", help="hub name or local directory (loading.load_model)")
    parser.add_argument("--data", help="JSONL file with problem/answer fields (loading.load_problems)")
    parser.add_argument("--n", type=int, default=256, help="samples per problem (default 256)")
    parser.add_argument("--out", help="where to save the result JSON")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--template", default="auto", help="prompt template (loading.render_prompt)")
    parser.add_argument("--limit", type=int, help="evaluate only the first LIMIT problems")
    parser.add_argument("--chunk-size", type=int, default=256, help="rows per sampling batch")
    parser.add_argument("--no-crn", action="store_true",
                        help="one generator in batch order instead of common random numbers per problem")
    parser.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--ks", help="comma-separated ks (default: powers of two up to n)")
    parser.add_argument("--compare", nargs="+", metavar="RESULT_JSON",
                        help="print the Pass@k table of saved results (and plot them)")
    parser.add_argument("--plot", help="PNG path for --compare (default: next to the first JSON)")
    args = parser.parse_args(argv)
    try:
        ks = _parse_ks(args.ks)
    except ValueError:
        parser.error(f"--ks must be comma-separated integers, got {args.ks!r}")

    if args.compare:
        return _compare_main(parser, args, ks)
    return _evaluate_main(parser, args, ks)


def _compare_main(parser, args, ks) -> int:
    """--compare: the table of saved results (+ a plot when matplotlib is installed)."""
    if args.model or args.data:
        parser.error("--compare reads saved results; do not combine it with --model/--data")
    try:
        results = dict(zip(_run_names(args.compare), (load_result(p) for p in args.compare)))
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    print(format_table(results, ks))
    for name, r in results.items():
        s = r.get("settings", {})
        print(f"  {name}: model={r.get('model')} data={r.get('data')} n={r['n']} "
              f"problems={len(r['counts'])} T={s.get('temperature')} top_p={s.get('top_p')} "
              f"max_new_tokens={s.get('max_new_tokens')} seed={s.get('seed')}")
    first = pathlib.Path(args.compare[0])
    plot_path = args.plot or first.with_name(first.stem + ".passk.png")
    try:
        print(f"plot: {plot_curves(results, plot_path, ks)}")
    except ImportError:
        print("(no plot: matplotlib is not installed; `pip install matplotlib` for a PNG of the curves)")
    return 0


def _evaluate_main(parser, args, ks) -> int:
    """--model --data --out: evaluate one model; every check on the input runs before the model is loaded."""
    for flag in ("model", "data", "out"):
        if getattr(args, flag) is None:
            parser.error(f"--{flag} is required (or use --compare A.json B.json ...)")
    if args.n < 1:
        parser.error(f"--n must be >= 1, got {args.n}")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1, got {args.limit}")
    if args.chunk_size < 1:
        parser.error(f"--chunk-size must be >= 1, got {args.chunk_size}")
    for k in ks or []:
        if not 1 <= k <= args.n:
            parser.error(f"--ks: k={k} is out of range 1..n={args.n}")
    if not pathlib.Path(args.data).is_file():
        parser.error(f"--data {args.data}: no such file")

    try:
        problems = loading.load_problems(args.data)
    except ValueError as e:
        parser.error(str(e))
    problems = problems[:args.limit] if args.limit else problems
    model, tokenizer = loading.load_model(args.model, dtype=args.dtype, device=args.device)
    result = evaluate(model, tokenizer, problems, args.n, temperature=args.temperature, top_p=args.top_p,
                      max_new_tokens=args.max_new_tokens, seed=args.seed, template=args.template,
                      chunk_size=args.chunk_size, desc=pathlib.Path(args.data).stem, out=args.out, ks=ks,
                      model_name=str(args.model), data_name=str(args.data),
                      common_random_numbers=not args.no_crn)
    print(format_table({pathlib.Path(args.out).stem: result}))
    print(f"avg@{result['n']}={result['avg_at_n']:.4f} mean_length={result['mean_length']:.1f} "
          f"truncation_rate={result['truncation_rate']:.3f} mean_entropy={result['mean_entropy']:.3f} "
          f"problems={result['num_problems']} skipped={result['num_skipped']} seconds={result['seconds']}")
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
