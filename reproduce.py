"""
reproduce.py -- the paper's comparison on the toy world, with verdicts that carry their uncertainty.

    python reproduce.py                                    # recipe seed 0: PSR, NSR, W-REINFORCE, training seed 0
    python reproduce.py --recipe-seeds 60 61 62 63 64 65 66 67 68 --out runs/decisive   # THE decisive design: 9 unseen bases
    python reproduce.py --methods psr nsr w-reinforce reinforce grpo ppo --seeds 0 1   # all six methods
    python reproduce.py --methods psr nsr --set lr=1e-4    # any nsr.Config field: --set FIELD=VALUE
    python reproduce.py --methods w-reinforce --sweep lam=0.1,0.25,1   # one more run per value, labelled

It says at start how long it expects to take (expected_seconds: the job count and measured per-job costs).

THE LOOP (all of it):
    for each recipe seed:  base = toy.ensure_base(seed)                     (built once, cached)
        evaluate the base                                                   (passk.evaluate, n = 1,024)
        for each training seed, each method:  nsr.train(from the base)  ->  evaluate its last checkpoint
    -> summary.json: every run's per-problem correct counts and mean entropy on both test splits;
       "variance" (per method and split: where the variance of method - base at k = 256 comes from --
       the estimator, the training seed, the problem sample, the base -- variance_components);
       "coverage" (per method and split, the problems kept, lost, gained and solved by neither at k = n,
       against its base); "dynamics" (reward, rollout entropy, all-correct share against the step, from
       metrics.jsonl; also dynamics.png with matplotlib)
    -> the Pass@k tables (mean over seeds), the coverage table, the variance table and the verdicts of
       the paper's four findings

FAIR BY CONSTRUCTION: every method trains from the same base with the same nsr.Config except `objective`
(nsr.TOY_DEFAULTS: the main job's budget, the paper's update); every model, the base included, is
evaluated with the SAME settings and ONE evaluation seed (common random numbers): temperature 1, top-p 1,
64 new tokens, n = 1,024 samples per problem (--n; 4 x the largest k, so that the estimate of Pass@256 is
not "any of 256 right", 0 or 1 per problem). The evaluation settings are fixed: tune the toy or the
method, never the evaluation.

VERDICTS (the paper's findings, `verdicts`): each difference to the base is bootstrapped, paired, over
problems (the same resampled problems for every method), training seeds and recipe seeds (2,000
resamples, 95% percentile intervals). A claim "X >= Y" is judged as a non-inferiority test with a margin
of 1 point: holds when the interval's lower end is >= -1, fails when its upper end is < -1, else
inconclusive. "X above Y" needs the whole interval above 0; "below", the whole interval below 0.
  (a) NSR >= base at every k, on both splits
  (b) PSR above the base at k = 1 and below it at k = 256, on at least one split
  (c) W-REINFORCE's Pass@1 within 2 points of the best method's (non-inferiority, margin 2), and
      W-REINFORCE >= base at k = 256, on both splits
  (d) test entropy: PSR below the base and NSR above PSR (mean_entropy is one number per run, so the
      bootstrap resamples the independent units: recipe seeds, then training seeds; entropy_draws)
With several recipe seeds, each is also judged alone (`verdicts_by_recipe_seed`): a finding robust over
bases holds overall and fails on none of them.

THE DECISIVE DESIGN (the defaults; issue 30, chosen by measurement: docs/toy-regime-log.md): PSR, NSR and
W-REINFORCE (what the four findings need; (c) then compares W-REINFORCE with the best of these three),
ONE training seed per base, n = 1,024, and many bases: two thirds of the variance of method - base at hard
k = 256 is between bases and under 4% between training seeds, so a second training seed buys less than a
second base at the same cost. `python reproduce.py --recipe-seeds S1 ... S9 --out DIR` on nine unseen
bases: 36 jobs (9 base builds, 27 training runs), 49 minutes on a quiet 2-core machine (measured; it
prints its estimate, 46); three bases cannot reach a 95% half-width of 4 points at the measured
between-base variance (`--project`).
summary.json "variance" says how much of each method - base interval comes from the estimator, the
training seeds, the problem sample and the bases (variance_components); `--project SUMMARY` projects
the half-width and time of other designs from a summary without running anything.

Jobs run in --jobs processes (one torch thread each: the toy model is too small for two); each writes
its result to <out>/<run>/result.json, and a job whose result is already there is not run again, so an
interrupted reproduction continues where it stopped (an interrupted training job resumes from its last
checkpoint). Output in the way (another job's, another reproduction's summary) is moved aside, never deleted.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import multiprocessing
import os
import pathlib
import re
import sys
import time

import numpy as np
import torch

import loading
import nsr
import passk
import runs
import settings
import toy

METHODS = ("psr", "nsr", "w-reinforce", "reinforce", "grpo", "ppo")   # the paper's Table 1 rows, Base first
NAMES = {"base": "Base", "psr": "PSR", "nsr": "NSR", "w-reinforce": "W-REINFORCE", "reinforce": "REINFORCE",
         "grpo": "GRPO", "ppo": "PPO"}
SPLITS = ("test_easy", "test_hard")       # the roles of MATH and of AIME 2025
N, EVAL_SEED, KS = 1024, 0, [2 ** j for j in range(9)]              # n = 4 x the largest k; k = 1, 2, ..., 256
KMAX = KS[-1]
MARGIN = 1.0                              # non-inferiority margin, in points of Pass@k
# THE DECISIVE DESIGN (the defaults; chosen by measurement: docs/toy-regime-log.md, issue 30):
# the three methods the four findings need ((c): W-REINFORCE against the best of those run), one training
# seed per base (the bases, not the seeds, make the interval wide), n = 1,024; the bases are the recipe
# seeds given. The other three methods: --methods psr nsr w-reinforce reinforce grpo ppo.
DESIGN_METHODS, DESIGN_SEEDS = ("psr", "nsr", "w-reinforce"), [0]


# =================================================================================================
# JOBS: build a base, train a method, evaluate a model (each a plain dict, so it crosses processes)
# =================================================================================================

def training_config(base: pathlib.Path, method: str, train_seed: int, run_dir: pathlib.Path,
                    overrides: dict) -> nsr.Config:
    """The main job's Config (nsr.TOY_DEFAULTS) on this base, with no evaluation inside nsr.train."""
    values = {**nsr.TOY_DEFAULTS, **overrides, "model": str(base), "train": str(base / "train.jsonl"),
              "eval": [], "eval_n": 0, "objective": method, "seed": train_seed, "out_dir": str(run_dir),
              "save_every": 10}
    return nsr.Config(**values)


def eval_settings(n: int = N) -> dict:
    """THE evaluation settings of every model: n, one seed, and the main job's temperature, top-p and
    response budget (nsr.TOY_DEFAULTS, read as runs.evaluate reads a Config)."""
    cfg = nsr.Config(**nsr.TOY_DEFAULTS)
    return dict(n=n, seed=EVAL_SEED, temperature=cfg.eval_temperature, top_p=cfg.eval_top_p,
                max_new_tokens=cfg.eval_max_new_tokens or cfg.max_new_tokens)


def evaluate(model_dir: pathlib.Path, base: pathlib.Path, n: int = N) -> dict:
    """Both test splits with THE evaluation settings -> {split: {"counts", "mean_entropy"}}."""
    model, tokenizer = loading.load_model(model_dir, dtype="float32", device="cpu")
    out = {}
    for split in SPLITS:
        problems = loading.load_problems(base / f"{split}.jsonl")
        result = passk.evaluate(model, tokenizer, problems, desc=f"eval {split}", **eval_settings(n))
        out[split] = {"counts": result["counts"], "mean_entropy": result["mean_entropy"]}
    return out


def run_job(job: dict) -> dict:
    """Train (unless it is a base job), evaluate, write result.json. stdout/stderr go to log.txt."""
    torch.set_num_threads(1)
    run_dir = pathlib.Path(job["run_dir"])
    done = run_dir / "result.json"
    if done.is_file() and json.loads(done.read_text()).get("key") == job["key"]:
        return json.loads(done.read_text())                      # finished by an earlier, stopped run
    resume = claim_job_dir(run_dir, job["key"])
    start = time.time()
    with open(run_dir / "log.txt", "a" if resume else "w") as log:
        stdout, stderr = os.dup(1), os.dup(2)
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            base = toy.ensure_base(job["base"], recipe_for(job))
            record = {**job, "diverged": None}
            model_dir = base
            if job["method"] != "base":
                cfg = nsr.Config(**{**job["config"], "resume": resume})
                try:
                    nsr.train(cfg)
                except RuntimeError as e:                        # diverged: evaluate the last good checkpoint
                    if "diverged" not in str(e):
                        raise                                    # anything else (out of memory, ...) is no result
                    record["diverged"] = str(e)
                model_dir = runs.latest_checkpoint(run_dir)
                record["curves"] = read_curves(run_dir / "metrics.jsonl")
            if model_dir is None:                                # diverged before its first checkpoint
                record["splits"] = {s: {"counts": [0] * len(loading.load_problems(base / f"{s}.jsonl")),
                                        "mean_entropy": float("nan")} for s in SPLITS}
            else:
                record["splits"] = evaluate(model_dir, base, job["n"])
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(stdout, 1)
            os.dup2(stderr, 2)
            os.close(stdout)
            os.close(stderr)
    record["seconds"] = round(time.time() - start, 1)
    loading.write_atomic(done, json.dumps(record))               # atomic: a result is whole or absent
    print(f"  done: {job['name']} ({record['seconds']:.0f} s)" + (" DIVERGED" if record["diverged"] else ""),
          flush=True)
    return record


def read_curves(path: pathlib.Path) -> dict:
    """{"step": [...], key: [...] for key in DYNAMICS} from a run's metrics.jsonl."""
    lines = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return {key: [line[key] for line in lines] for key in ("step", *DYNAMICS)}


def claim_job_dir(run_dir: pathlib.Path, key: str) -> bool:
    """Make the job's directory ready; True = an interrupted training run of this very job is there, resume
    it (exactly: nsr's checkpoints every 10 steps). Anything else in the way -- another job's output, or a
    partial run of this one with no checkpoint yet -- is moved aside to <dir>.1 (.2, ...), never deleted."""
    marker = run_dir / "job.json"
    ours = marker.is_file() and json.loads(marker.read_text()).get("key") == key
    if ours and runs.latest_checkpoint(run_dir) is not None:
        return True
    if run_dir.exists() and (runs.holds_run(run_dir) or (not ours and any(run_dir.iterdir()))):
        print(f"  {run_dir} held earlier output: moved it to {loading.move_aside(run_dir)}", flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"key": key}) + "\n")
    return False


def recipe_for(job: dict) -> toy.ToyRecipe:
    return toy.quick_recipe(job["recipe_seed"]) if job["quick"] else toy.ToyRecipe(seed=job["recipe_seed"])


def make_jobs(args, overrides: dict, sweeps: list | None = None) -> list[dict]:
    """One base job per recipe seed, then one training job per (recipe seed, training seed, method): the
    unswept runs, and for each --sweep FIELD=V1,V2 one more per value, labelled method[FIELD=V] (its
    "method"). Several --sweep flags add their variants side by side (an ablation), not their product."""
    out = pathlib.Path(args.out)
    variants = [("", {}, None)] + [(f"[{field}={text}]", {field: value}, field)
                                   for field, values in (sweeps or []) for text, value in values]
    jobs = []
    for r in args.recipe_seeds:
        base = pathlib.Path(args.bases) / (f"toy-quick-s{r}" if args.quick else toy.base_dir(r).name)
        jobs.append({"name": f"base r{r}", "method": "base", "recipe_seed": r, "train_seed": None,
                     "base": str(base), "run_dir": str(out / f"r{r}-base"), "config": None, "quick": args.quick, "n": args.n})
        for t in args.seeds:
            for method in args.methods:
                for label, change, field in variants:
                    value = re.sub(r"[^\w.+-]", "_", label.split("=", 1)[1][:-1]) if label else ""   # a safe name
                    run_dir = out / (f"r{r}-{method}-t{t}" if not label else f"r{r}-{method}-{field}-{value}-t{t}")
                    cfg = training_config(base, method, t, run_dir, {**overrides, **change})
                    jobs.append({"name": f"{method}{label} r{r} t{t}", "method": method + label, "recipe_seed": r,
                                 "train_seed": t, "base": str(base), "run_dir": str(run_dir),
                                 "config": dataclasses.asdict(cfg), "quick": args.quick, "n": args.n})
    for job in jobs:   # a result on disk is re-used only for exactly the same job (recipe, config, settings)
        blob = json.dumps({**job, "recipe": toy.recipe_hash(recipe_for(job)), "eval": eval_settings(job["n"])},
                          sort_keys=True)
        job["key"] = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return jobs


# What a reproduction costs on a quiet 2-core machine, one thread per job, measured with
# `python reproduce.py --recipe-seeds 20 --seeds 0 --methods nsr psr --jobs 2` (issue 30's calibration,
# docs/toy-regime-log.md): a base build 141 s; its evaluation on both test splits at n = 1,024 73 s, i.e.
# ~18 s per 256 samples per problem; a training job, two at once, 117-125 s with that evaluation, so ~48 s
# for the 100 steps (PPO's critic adds about half).
SECONDS = {"build": 141.0, "eval_per_256": 18.0,
           "train": {"psr": 48.0, "nsr": 48.0, "w-reinforce": 48.0, "reinforce": 48.0, "grpo": 48.0, "ppo": 72.0}}


def job_cost(method: str, n: int, built: bool) -> float:
    """SECONDS of one job: a base's build (unless built) or a method's training, and one evaluation at n."""
    if method == "base":
        return (0.0 if built else SECONDS["build"]) + SECONDS["eval_per_256"] * n / 256
    return SECONDS["train"][method.split("[")[0]] + SECONDS["eval_per_256"] * n / 256


def job_seconds(job: dict) -> float:
    """The expected cost of one job: 0 when its result is on disk, no build for a cached base."""
    done = pathlib.Path(job["run_dir"]) / "result.json"
    if done.is_file() and json.loads(done.read_text()).get("key") == job["key"]:
        return 0.0
    built = job["method"] == "base" and toy.is_built(pathlib.Path(job["base"]), recipe_for(job))
    return job_cost(job["method"], job["n"], built)


def schedule_seconds(costs: list[float], processes: int) -> float:
    """The wall time of running jobs of these costs in order on `processes` workers, each job going to the
    first free worker (what Pool.map with chunksize 1 does)."""
    free = [0.0] * processes
    for cost in costs:
        free[free.index(min(free))] += cost
    return max(free)


def expected_seconds(jobs: list[dict], processes: int, cost=job_seconds) -> float:
    """main's two phases, one after the other: every base, then every training run."""
    bases = [cost(j) for j in jobs if j["method"] == "base"]
    trained = [cost(j) for j in jobs if j["method"] != "base"]
    return schedule_seconds(bases, processes) + schedule_seconds(trained, processes)


def format_expected(jobs: list[dict], processes: int) -> str:
    seconds = expected_seconds(jobs, processes)
    return (f"expected: about {seconds / 60:.0f} min on {processes} free cores ({len(jobs)} jobs at the per-job costs "
            f"of reproduce.SECONDS, one thread each; results and bases already on disk cost nothing)")


# =================================================================================================
# VERDICTS: paired bootstrap of Pass@k differences over problems and seeds
# =================================================================================================

def passk_matrix(counts: list[int], n: int) -> np.ndarray:
    """(problems, len(KS)) unbiased Pass@k of each problem from its count of n, in percent."""
    return np.array([[100 * passk.pass_at_k(n, c, k) for k in KS] for c in counts])


def bootstrap(summary: dict, resamples: int = 2000, seed: int = 0) -> dict:
    """{(method, split): (resamples, len(KS)) bootstrap draws of the mean Pass@k}, paired across methods:
    each draw resamples recipe seeds, then each recipe seed's problems and its training seeds, and uses
    the SAME draws for every method (so a difference between methods keeps only the methods' noise)."""
    rng = np.random.default_rng(seed)
    runs = summary["runs"]
    recipes = sorted({r["recipe_seed"] for r in runs})
    train_seeds = sorted({r["train_seed"] for r in runs if r["train_seed"] is not None})
    methods = sorted({r["method"] for r in runs})
    table = {(r["method"], r["recipe_seed"], r["train_seed"], r["split"]): passk_matrix(r["counts"], summary["n"])
             for r in runs}
    draws = {(m, s): np.zeros((resamples, len(KS))) for m in methods for s in SPLITS}
    for b in range(resamples):
        chosen = rng.choice(recipes, size=len(recipes))
        for s in SPLITS:
            picks = [(r, rng.integers(0, len(table[("base", r, None, s)]), len(table[("base", r, None, s)])),
                      rng.choice(train_seeds, size=len(train_seeds)) if train_seeds else []) for r in chosen]
            for m in methods:
                parts = [table[(m, r, None, s)][p] if m == "base" else
                         np.concatenate([table[(m, r, t, s)][p] for t in ts]) for r, p, ts in picks]
                draws[(m, s)][b] = np.concatenate(parts).mean(axis=0)
    return draws


def point(summary: dict, method: str, split: str) -> np.ndarray:
    """Mean Pass@k (percent) over every run of a method on a split: (len(KS),)."""
    mats = [passk_matrix(r["counts"], summary["n"]) for r in summary["runs"] if r["method"] == method and r["split"] == split]
    return np.concatenate(mats).mean(axis=0)


def interval(x: np.ndarray) -> tuple[float, float]:
    return float(np.percentile(x, 2.5)), float(np.percentile(x, 97.5))


def at_least(diff: np.ndarray, margin: float = MARGIN) -> str:
    """Non-inferiority of a difference's bootstrap draws, with one bar for both verdicts: holds when the
    whole 95% interval is above -margin, fails when it is all below -margin, else inconclusive."""
    lo, hi = interval(diff)
    return "holds" if lo >= -margin else "fails" if hi < -margin else "inconclusive"


def combine(verdicts: list[str], need_all: bool = True) -> str:
    """All parts hold (need_all) or any part holds; a failing part fails an all-claim."""
    if need_all:
        return "fails" if "fails" in verdicts else "holds" if all(v == "holds" for v in verdicts) else "inconclusive"
    return "holds" if "holds" in verdicts else "fails" if all(v == "fails" for v in verdicts) else "inconclusive"


def verdicts(summary: dict, draws: dict) -> list[dict]:
    """The four findings, each {"finding", "claim", "verdict", "evidence": [(what, estimate, lo, hi)]}."""
    methods = {r["method"] for r in summary["runs"]}
    i1, i256 = KS.index(1), KS.index(256)
    diff = {(m, s): draws[(m, s)] - draws[("base", s)] for m in methods for s in SPLITS}
    found = []

    def evidence(label, d, j):
        return (label, float(d[:, j].mean()), *interval(d[:, j]))

    if "nsr" in methods:       # (a) NSR >= base at every k on both splits
        parts, ev = [], []
        for s in SPLITS:
            parts += [at_least(diff[("nsr", s)][:, j]) for j in range(len(KS))]
            worst = int(np.argmin(np.percentile(diff[("nsr", s)], 2.5, axis=0)))
            ev.append(evidence(f"NSR - base, {s}, k={KS[worst]} (the weakest k)", diff[("nsr", s)], worst))
        found.append({"finding": "a", "claim": "NSR >= base at every k on both splits",
                      "verdict": combine(parts), "evidence": ev})
    if "psr" in methods:       # (b) PSR above base at k=1 and below at k=256 on at least one split
        parts, ev = [], []
        for s in SPLITS:
            (lo1, hi1), (lo256, hi256) = interval(diff[("psr", s)][:, i1]), interval(diff[("psr", s)][:, i256])
            parts.append("holds" if lo1 > 0 and hi256 < 0 else "fails" if hi1 <= 0 or lo256 >= 0 else "inconclusive")
            ev += [evidence(f"PSR - base, {s}, k=1", diff[("psr", s)], i1),
                   evidence(f"PSR - base, {s}, k=256", diff[("psr", s)], i256)]
        found.append({"finding": "b", "claim": "PSR above the base at k=1 and below it at k=256 on at least one split",
                      "verdict": combine(parts, need_all=False), "evidence": ev})
    if "w-reinforce" in methods and len(methods - {"base"}) > 1:   # (c) near the best at k=1, >= base at k=256
        parts, ev = [], []
        for s in SPLITS:
            # the best method in each bootstrap draw (W-REINFORCE itself included), so the choice of the
            # best is part of the uncertainty; with no other method to compare with, (c) is not judged
            others = sorted(methods - {"base"})
            best = np.max([draws[(m, s)][:, i1] for m in others], axis=0)
            near = draws[("w-reinforce", s)][:, i1] - best
            parts += [at_least(near, margin=2.0), at_least(diff[("w-reinforce", s)][:, i256])]
            ev += [(f"W-REINFORCE - the best method, {s}, k=1", float(near.mean()), *interval(near)),
                   evidence(f"W-REINFORCE - base, {s}, k=256", diff[("w-reinforce", s)], i256)]
        found.append({"finding": "c", "claim": "W-REINFORCE's Pass@1 within 2 points of the best method, "
                      ">= base at k=256, on both splits", "verdict": combine(parts), "evidence": ev})
    if {"psr", "nsr"} <= methods:   # (d) entropy: PSR < base, NSR > PSR (mean_entropy is one number per run)
        a, b = entropy_draws(summary)
        side = [("holds" if interval(x)[1] < 0 else "fails" if interval(x)[0] > 0 else "inconclusive") for x in (a,)]
        side += [("holds" if interval(x)[0] > 0 else "fails" if interval(x)[1] < 0 else "inconclusive") for x in (b,)]
        found.append({"finding": "d", "claim": "test entropy: PSR below the base, NSR above PSR",
                      "verdict": combine(side),
                      "evidence": [("entropy PSR - base (nats/token)", float(a.mean()), *interval(a)),
                                   ("entropy NSR - PSR (nats/token)", float(b.mean()), *interval(b))]})
    return found


def unit_draws(units: dict, resamples: int = 2000, seed: int = 1) -> np.ndarray:
    """Bootstrap draws of the mean of per-run values {recipe seed: [value (or vector) of each run]},
    resampling the INDEPENDENT units: recipe seeds (independent bases), then the training seeds within each
    (independent runs from one base)."""
    rng, recipes = np.random.default_rng(seed), sorted(units)
    draws = []
    for _ in range(resamples):
        picked = [units[r][j] for r in rng.choice(recipes, len(recipes))
                  for j in rng.integers(0, len(units[r]), len(units[r]))]
        draws.append(np.mean(picked, axis=0))
    return np.array(draws)


def entropy_draws(summary: dict, resamples: int = 2000, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap draws of the mean entropy differences PSR - base and NSR - PSR (nats/token) over the
    independent units (unit_draws). The two test splits of one run are not independent (the same weights),
    so a run's difference is its mean over the splits, never two units."""
    ent = {(r["method"], r["recipe_seed"], r["train_seed"], r["split"]): r["mean_entropy"] for r in summary["runs"]}
    units = {}                                                    # recipe seed -> [(PSR - base, NSR - PSR) per run]
    for method, recipe, train, _ in sorted(k for k in ent if k[0] == "psr" and k[3] == SPLITS[0]):
        a = np.mean([ent[("psr", recipe, train, s)] - ent[("base", recipe, None, s)] for s in SPLITS])
        b = np.mean([ent[("nsr", recipe, train, s)] - ent[("psr", recipe, train, s)] for s in SPLITS])
        units.setdefault(recipe, []).append((a, b))
    draws = unit_draws(units, resamples, seed)
    return draws[:, 0], draws[:, 1]


def cells(summary: dict, draws: dict) -> dict:
    """Every method and swept variant (a "cell" of an ablation): per split, Pass@1, Pass@n and the
    difference to the base at k = n from the paired bootstrap draws, and the test entropy over the
    independent runs (unit_draws); each [mean, 2.5%, 97.5%]."""
    out = {}
    for label in sorted({r["method"] for r in summary["runs"]}, key=label_order):
        out[label] = {}
        for s in SPLITS:
            d = draws[(label, s)]
            ent = {}
            for r in summary["runs"]:
                if r["method"] == label and r["split"] == s:
                    ent.setdefault(r["recipe_seed"], []).append(r["mean_entropy"])
            e = unit_draws(ent)
            out[label][s] = {"pass@1": [float(d[:, 0].mean()), *interval(d[:, 0])],
                             f"pass@{KMAX}": [float(d[:, -1].mean()), *interval(d[:, -1])],
                             f"minus_base@{KMAX}": [float((d[:, -1] - draws[("base", s)][:, -1]).mean()),
                                                 *interval(d[:, -1] - draws[("base", s)][:, -1])],
                             "entropy": [float(e.mean()), *interval(e)]}
    return out


def format_cells(found: dict) -> str:
    head = f"{'cell':<30}{'split':<11}{'Pass@1':>22}{'Pass@' + str(KMAX):>22}{'- base @' + str(KMAX):>24}{'entropy':>26}"
    lines = ["each method and variant, mean [95% bootstrap interval over recipe seeds, problems, training seeds]", head]
    for label, by_split in found.items():
        for s, row in by_split.items():
            cells_ = [f"{row[k][0]:6.1f} [{row[k][1]:6.1f},{row[k][2]:6.1f}]" for k in ("pass@1", f"pass@{KMAX}")]
            diff = row[f"minus_base@{KMAX}"]
            ent = row["entropy"]
            lines.append(f"{display(label):<30}{s:<11}{cells_[0]:>22}{cells_[1]:>22}"
                         f"{diff[0]:+7.1f} [{diff[1]:+6.1f},{diff[2]:+6.1f}]"
                         f"{ent[0]:8.4f} [{ent[1]:.4f},{ent[2]:.4f}]")
    return "\n".join(lines)


# =================================================================================================
# VARIANCE: where the width of an interval comes from, and what another design would give
# =================================================================================================
# The estimate of "method - base" at one (split, k) is the mean over recipe seeds r, training seeds t and
# problems i of D_rti = X_rti - B_ri (X the method's per-problem Pass@k estimate, B the base's). Its
# variance is a sum of one term per source (a random-effects model: each source's variance per unit,
# divided by the number of its units the design averages over):
#
#   Var = base / R  +  (seed + seed x problem / P) / (R T)  +  problem / (R P)
#         + estimator: v_method / (R T P) + v_base / (R P)
#
# base: real differences between bases (recipe seeds); seed, seed x problem: between training runs of one
# base; problem: between the problems of one base; v_method, v_base: the mean per-problem variance of the
# Pass@k ESTIMATE itself (finite n). NOTE: the base is evaluated once per recipe seed, so its estimator
# noise does not average over training seeds. Estimated by the method of moments: a two-way table of D
# (training seeds x problems) within each base, then the spread of the bases' means. Each component is
# clipped at 0, and with 3 bases the base component is itself uncertain: the bootstrap interval, not this
# split, is what the verdicts use. The estimator terms treat the method's and the base's samples as
# independent; common random numbers in the evaluation only make the real estimator term smaller.

@functools.lru_cache(maxsize=None)
def all_wrong(n: int, k: int) -> np.ndarray:
    """G[c] = C(n-c, k) / C(n, k) for c = 0..n (the chance that k of the n samples, c of them right, are all
    wrong; pass_at_k = 1 - G), by the product form of passk.pass_at_k: G[c] = G[c-1] * (1 - k / (n-c+1))."""
    i = np.arange(n, 0, -1, dtype=float)                        # n, n-1, ..., 1: the factor of the c-th step
    return np.concatenate([[1.0], np.cumprod(np.clip(1 - k / i, 0, None))])


def estimator_variance(counts, n: int, k: int) -> np.ndarray:
    """Per problem, the variance of its Pass@k estimate (percent^2), from its count c of n samples.

    pass_at_k = 1 - G, and G = C(n-c, k) / C(n, k) is unbiased for (1 - p)^k. So E[G^2] = Var(G) + (1-p)^(2k),
    and C(n-c, 2k) / C(n, 2k) is unbiased for (1 - p)^(2k):

        v = G^2 - C(n-c, 2k) / C(n, 2k)        is an UNBIASED estimate of the variance      (needs n >= 2k)

    (one problem's v can be negative; its mean over problems is what is used). For n < 2k no unbiased
    estimate exists: the plug-in, plugin_variance(c / n, n, k)."""
    counts = np.asarray(counts, dtype=int)
    if 2 * k <= n:
        return 1e4 * (all_wrong(n, k)[counts] ** 2 - all_wrong(n, 2 * k)[counts])
    return 1e4 * np.array([plugin_variance(c / n, n, k) for c in counts])


def plugin_variance(p: float, n: int, k: int) -> float:
    """Var of the Pass@k estimate from n samples of a problem solved with probability p: the exact sum over
    c ~ Binomial(n, p); a fraction^2. Projects the estimator's term to another n."""
    if p <= 0 or p >= 1:
        return 0.0
    c = np.arange(n + 1)
    pmf = np.exp(log_choose(n) + c * math.log(p) + (n - c) * math.log1p(-p))
    g = all_wrong(n, k)
    return float(pmf @ g ** 2 - (pmf @ g) ** 2)


@functools.lru_cache(maxsize=None)
def log_choose(n: int) -> np.ndarray:
    """log C(n, c) for c = 0..n."""
    return np.array([math.lgamma(n + 1) - math.lgamma(c + 1) - math.lgamma(n - c + 1) for c in range(n + 1)])


def variance_components(summary: dict, method: str, split: str, k: int = KMAX, ns=(256, 512, 1024, 2048)) -> dict:
    """The sources of the variance of mean(method - base) at (split, k): "per_unit" (percent^2 of one base,
    one training seed, one problem; v_method / v_base the estimator's per problem at the design's n, and
    projected to each n in ns by the plug-in's ratio), "terms" as this design (R, T, P) averages them, their
    "total" and the normal 95% half-width 1.96 sqrt(total)."""
    n, j = summary["n"], KS.index(k)
    runs_ = summary["runs"]
    recipes = sorted({r["recipe_seed"] for r in runs_ if r["method"] == method})
    parts = {key: [] for key in ("seed", "interaction", "problem", "v_method", "v_base")}
    plug = {"v_method": {m: [] for m in ns}, "v_base": {m: [] for m in ns}}
    means, mean_vars = [], []
    for r in recipes:
        base = next(x for x in runs_ if x["method"] == "base" and x["recipe_seed"] == r and x["split"] == split)
        mine = sorted((x for x in runs_ if x["method"] == method and x["recipe_seed"] == r and x["split"] == split),
                      key=lambda x: x["train_seed"])
        B = passk_matrix(base["counts"], n)[:, j]                                  # (P,)
        D = np.array([passk_matrix(x["counts"], n)[:, j] for x in mine]) - B       # (T, P)
        T, P = D.shape
        v_base = float(estimator_variance(base["counts"], n, k).mean())
        v_method = float(np.mean([estimator_variance(x["counts"], n, k) for x in mine]))
        row, col, grand = D.mean(axis=1), D.mean(axis=0), D.mean()
        ms_p = T * col.var(ddof=1)                              # E[ms_p] = s_e^2 + T s_p^2 (s_p: problem + v_base)
        if T > 1:
            ms_t = P * row.var(ddof=1)                          # E[ms_t] = s_e^2 + P s_t^2
            ms_e = float(((D - row[:, None] - col[None, :] + grand) ** 2).sum() / ((T - 1) * (P - 1)))
            parts["seed"].append(max((ms_t - ms_e) / P, 0.0))
            parts["interaction"].append(max(ms_e - v_method, 0.0))     # s_e^2 = seed x problem + v_method
            mean_vars.append((ms_t + ms_p - ms_e) / (T * P))           # Var(grand) = s_t^2/T + s_p^2/P + s_e^2/(TP)
        else:                      # one training seed: seed and seed x problem are inside "problem"
            ms_e = v_method
            mean_vars.append(ms_p / P)
        parts["problem"].append(max((ms_p - ms_e) / T - v_base, 0.0))
        parts["v_method"].append(v_method)
        parts["v_base"].append(v_base)
        for key, counts, v in (("v_method", [c for x in mine for c in x["counts"]], v_method),
                               ("v_base", base["counts"], v_base)):
            # the estimator at another n m: this n's unbiased value x the plug-in's ratio (m : n)
            at = {size: np.mean([plugin_variance(c / n, size, k) for c in counts]) for size in {n, *ns}}
            for m in ns:
                plug[key][m].append(v * at[m] / at[n] if at[n] > 0 else v * n / m)
        means.append(grand)
    R, T, P = len(recipes), len(mine), len(B)
    per_unit = {key: float(np.mean(values)) if values else None for key, values in parts.items()}
    per_unit["base"] = max(float(np.var(means, ddof=1)) - float(np.mean(mean_vars)), 0.0) if R > 1 else None
    per_unit["v_method_at"] = {str(m): float(np.mean(v)) for m, v in plug["v_method"].items()}
    per_unit["v_base_at"] = {str(m): float(np.mean(v)) for m, v in plug["v_base"].items()}
    terms = design_terms(per_unit, R, T, P)
    total = float(sum(terms.values()))
    return {"method": method, "split": split, "k": k, "n": n, "R": R, "T": T, "P": P,
            "estimate": float(np.mean(means)), "per_unit": per_unit, "terms": terms, "total": total,
            "shares": {key: value / total if total > 0 else 0.0 for key, value in terms.items()},
            "halfwidth": 1.96 * total ** 0.5}


def design_terms(per_unit: dict, R: int, T: int, P: int, n: int | None = None) -> dict:
    """The variance terms (percent^2) of a design with R bases, T training seeds, P problems per base and
    n samples per problem (None: the measured n); a source not measured (one base, one seed) counts as 0."""
    u = {key: value or 0.0 for key, value in per_unit.items() if not key.endswith("_at")}
    v_method = per_unit["v_method_at"][str(n)] if n else u["v_method"]
    v_base = per_unit["v_base_at"][str(n)] if n else u["v_base"]
    return {"estimator": v_method / (R * T * P) + v_base / (R * P),
            "training seed": (u["seed"] + u["interaction"] / P) / (R * T),
            "problem sample": u["problem"] / (R * P),
            "base": u["base"] / R}


def format_variance(rows: list[dict]) -> str:
    lines = ["where the interval comes from: variance of (method - base) at k = 256 (points^2) and its share; "
             "summary.json \"variance\"",
             f"{'method':<14}{'split':<11}{'estimate':>9}{'1.96 sd':>9}" +
             "".join(f"{key:>22}" for key in ("estimator", "training seed", "problem sample", "base"))]
    for row in rows:
        lines.append(f"{display(row['method']):<14}{row['split']:<11}{row['estimate']:>+9.1f}{row['halfwidth']:>9.1f}"
                     + "".join(f"{row['terms'][key]:>13.2f} ({100 * row['shares'][key]:>3.0f}%)  "
                               for key in ("estimator", "training seed", "problem sample", "base")))
    return "\n".join(lines)


def bootstrap_halfwidth(per_unit: dict, R: int, T: int, P: int, n: int | None = None, base: float | None = None) -> float:
    """The 95% half-width that bootstrap() would give a design, from the per-unit variances: bootstrap()
    resamples the R bases, whose observed means already hold each base's own noise W (= the design's terms
    at R = 1, without the base), and then resamples within each again, so its variance is about
        (R - 1) / R^2 * (base + W) + W / R.
    base: the between-base variance per base (None: the measured one, 0 if it was not measured)."""
    base = per_unit["base"] or 0.0 if base is None else base
    within = sum(value for key, value in design_terms(per_unit, 1, T, P, n).items() if key != "base")
    return 1.96 * ((R - 1) / R ** 2 * (base + within) + within / R) ** 0.5


def projection(summary: dict, Rs=(3, 6, 9, 12), seeds=(1, 2, 4), ns=(1024,), bases=(0, 5, 10, 20)) -> str:
    """python reproduce.py --project SUMMARY: for PSR and NSR - base at hard k = 256, the bootstrap half-width
    of designs with R bases, T training seeds and n samples, for several between-base variances (the
    measured one when SUMMARY has several bases), and each design's expected time with DESIGN_METHODS."""
    lines = [f"projected 95% half-width of (method - base) at test_hard k = {KMAX}, P = the summary's problems; "
             f"R bases, T training seeds, n samples; columns: between-base variance per base (points^2)"]
    for method in ("psr", "nsr"):
        row = variance_components(summary, method, "test_hard", ns=ns)
        u = row["per_unit"]
        measured = [] if u["base"] is None else [u["base"]]
        head = "".join(f"{'base ' + format(b, '.1f'):>12}" for b in [*bases, *measured])
        show = {key: "n/a" if u[key] is None else f"{u[key]:.1f}" for key in ("seed", "interaction", "problem")}
        lines += ["", f"{display(method)} (measured on {row['R']} base(s), {row['T']} training seed(s), n = {row['n']}; "
                      f"per unit: seed {show['seed']}, seed x problem {show['interaction']}, problem "
                      f"{show['problem']}{' (with seed x problem)' if row['T'] == 1 else ''}, estimator "
                      f"{u['v_method']:.1f} / base {u['v_base']:.1f})",
                  f"{'R':>3}{'T':>3}{'n':>6}{'minutes':>9}" + head]
        for R in Rs:
            for T in seeds:
                for m in ns:
                    jobs = ([{"method": "base", "n": m}] * R
                            + [{"method": x, "n": m} for x in DESIGN_METHODS for _ in range(T * R)])
                    minutes = expected_seconds(jobs, 2, cost=lambda j: job_cost(j["method"], j["n"], built=False)) / 60
                    lines.append(f"{R:>3}{T:>3}{m:>6}{minutes:>9.0f}" + "".join(
                        f"{bootstrap_halfwidth(u, R, T, row['P'], m, b):>12.1f}" for b in [*bases, *measured]))
    return "\n".join(lines)


# =================================================================================================
# COVERAGE AND DYNAMICS: which problems a method kept, lost, gained; its training curves
# =================================================================================================

def coverage(summary: dict) -> list[dict]:
    """Per (method, split): the problems the base solves at k = n (at least one right of n samples) that the
    method solves too (kept) or not (lost), those only the method solves (gained) and neither solves
    (neither): the mean count over the method's runs (each against its own base) and the range over runs."""
    base = {(r["recipe_seed"], r["split"]): r["counts"] for r in summary["runs"] if r["method"] == "base"}
    per_run = {}
    for r in summary["runs"]:
        if r["method"] == "base":
            continue
        pairs = [(b > 0, m > 0) for b, m in zip(base[(r["recipe_seed"], r["split"])], r["counts"])]
        sets = {"kept": sum(b and m for b, m in pairs), "lost": sum(b and not m for b, m in pairs),
                "gained": sum(m and not b for b, m in pairs), "neither": sum(not (b or m) for b, m in pairs)}
        per_run.setdefault((r["method"], r["split"]), []).append(sets)
    rows = []
    for (method, split), runs_ in sorted(per_run.items(), key=lambda kv: (label_order(kv[0][0]), kv[0][1])):
        row = {"method": method, "split": split, "runs": len(runs_)}
        for key in ("kept", "lost", "gained", "neither"):
            values = [run[key] for run in runs_]
            row[key], row[f"{key}_range"] = float(np.mean(values)), [min(values), max(values)]
        rows.append(row)
    return rows


def format_coverage(rows: list[dict], n: int) -> str:
    lines = [f"coverage at k = n = {n} against the base (problems; mean over runs [min-max])",
             f"{'method':<28}{'split':<11}" + "".join(f"{key:>16}" for key in ("kept", "lost", "gained", "neither"))]
    for row in rows:
        cells = "".join(f"{row[key]:>7.1f} [{row[key + '_range'][0]:>2}-{row[key + '_range'][1]:>2}]  "
                        for key in ("kept", "lost", "gained", "neither"))
        lines.append(f"{display(row['method']):<28}{row['split']:<11}{cells}")
    return "\n".join(lines)


DYNAMICS = ("reward", "true_reward", "entropy", "all_correct")   # metrics.jsonl keys, against the step


def dynamics(records: list[dict]) -> dict:
    """{method: {"step": [...], key: [mean over the method's runs at each step] for key in DYNAMICS}}: the
    training curves, read from each run's metrics.jsonl (entropy = of the training rollouts)."""
    curves = {}
    for record in records:
        if record.get("curves"):
            curves.setdefault(record["method"], []).append(record["curves"])
    out = {}
    for method, runs_ in sorted(curves.items(), key=lambda kv: label_order(kv[0])):
        steps = min(len(c["step"]) for c in runs_)
        out[method] = {"step": runs_[0]["step"][:steps],
                       **{key: [float(np.mean([c[key][i] for c in runs_])) for i in range(steps)] for key in DYNAMICS}}
    return out


def plot_dynamics(curves: dict, path: pathlib.Path) -> pathlib.Path | None:
    """The curves as one figure (reward, rollout entropy, all-correct share against the step), if matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key, title in zip(axes, ("reward", "entropy", "all_correct"),
                              ("training reward", "entropy of the training rollouts (nats/token)",
                               "share of prompts with all G samples right")):
        for method, c in curves.items():
            ax.plot(c["step"], c[key], label=display(method))
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def verdicts_by_recipe_seed(summary: dict, resamples: int = 2000) -> dict:
    """{recipe_seed: verdicts()} of each base alone (its runs only: a bootstrap over its problems and
    training seeds). Robust over bases means a finding that holds overall fails on none of them."""
    seeds = sorted({r["recipe_seed"] for r in summary["runs"]})
    out = {}
    for seed in seeds:
        alone = dict(summary, runs=[r for r in summary["runs"] if r["recipe_seed"] == seed])
        out[seed] = verdicts(alone, bootstrap(alone, resamples))
    return out


def format_verdicts(found: list[dict]) -> str:
    lines = []
    for f in found:
        lines.append(f"({f['finding']}) {f['claim']}: {f['verdict'].upper()}")
        for what, est, lo, hi in f["evidence"]:
            d = 4 if "entropy" in what else 2                    # entropies are ~0.01 nats per token
            lines.append(f"      {what}: {est:+.{d}f}  [95% {lo:+.{d}f}, {hi:+.{d}f}]")
    return "\n".join(lines)


def label_order(label: str) -> tuple:
    """Base first, then the paper's methods in Table 1's order, each method's swept variants after it."""
    method = label.split("[")[0]
    return (0 if method == "base" else 1 + METHODS.index(method), label)


def display(label: str) -> str:
    """psr -> PSR, w-reinforce[lam=0.25] -> W-REINFORCE[lam=0.25]."""
    method, bracket, rest = label.partition("[")
    return NAMES[method] + bracket + rest


def tables(summary: dict) -> str:
    """Pass@k (%) per split, one row per method (and swept variant): the mean over every recipe and training
    seed (the counts of all runs together: Pass@k is a mean over problems, so this is the mean over runs)."""
    out = []
    order = sorted({r["method"] for r in summary["runs"]}, key=label_order)
    width = max(len(display(m)) for m in order)
    for s in SPLITS:
        rows = {}
        for m in order:
            counts = [c for r in summary["runs"] if r["method"] == m and r["split"] == s for c in r["counts"]]
            ent = [r["mean_entropy"] for r in summary["runs"] if r["method"] == m and r["split"] == s]
            rows[f"{display(m):<{width}} H={np.mean(ent):.3f}"] = {"counts": counts, "n": summary["n"]}
        out.append(f"{s} ({'MATH' if s == 'test_easy' else 'AIME'} role), mean over seeds; H = test entropy\n"
                   + passk.format_table(rows, KS))
    return "\n\n".join(out)


# =================================================================================================
# MAIN
# =================================================================================================

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Train every method on the toy world and judge the paper's findings.")
    parser.add_argument("--recipe-seeds", nargs="+", type=int, default=[0], help="one toy base per seed (default 0)")
    parser.add_argument("--seeds", nargs="+", type=int, default=DESIGN_SEEDS,
                        help="training seeds (default " + " ".join(map(str, DESIGN_SEEDS)) + ")")
    parser.add_argument("--methods", nargs="+", default=list(DESIGN_METHODS), choices=METHODS,
                        help="default: " + " ".join(DESIGN_METHODS) + " (the four findings need these three)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override an nsr.Config field for every method, e.g. --set lr=1e-4 (repeatable)")
    parser.add_argument("--sweep", action="append", default=[], metavar="FIELD=V1,V2,...",
                        help="also run every method at each value of one nsr.Config field, labelled "
                             "method[FIELD=V] in the tables; repeatable (each sweep's variants side by side, "
                             "an ablation); the verdicts use the unswept runs only")
    parser.add_argument("--n", type=int, default=N, help=f"samples per problem of every evaluation (default {N} = "
                        f"4 x the largest k, {KMAX}: the estimator's share of the interval stays small)")
    parser.add_argument("--jobs", type=int, default=2, help="parallel processes (default 2: one per core)")
    parser.add_argument("--out", default="runs/reproduce", help="output directory (default runs/reproduce)")
    parser.add_argument("--bases", default="runs", help="where the toy bases are cached (default runs/)")
    parser.add_argument("--quick", action="store_true", help="the seconds-long quick toy (for tests: Pass@k ~0)")
    parser.add_argument("--project", metavar="SUMMARY", help="run nothing: from SUMMARY (a summary.json), print the "
                        "half-width and expected time of other designs (seeds, n) at hard k = 256")
    args = parser.parse_args(argv)
    fields = {f.name: f for f in dataclasses.fields(nsr.Config)}
    per_job = {"objective", "seed", "out_dir", "model", "train", "eval", "eval_n", "toy_seed", "resume", "save_every"}

    def field_value(flag, item):
        name, _, value = item.partition("=")
        if name not in fields or not value:
            parser.error(f"{flag} {item!r}: expected FIELD=VALUE with FIELD one of nsr.Config's fields")
        if name in per_job:
            parser.error(f"{flag} {item!r}: {name} is set by each job (--methods, --seeds, --recipe-seeds, --out)")
        try:
            return name, [(text, settings.reader(fields[name].type)(text)) for text in value.split(",")]
        except ValueError:
            parser.error(f"{flag} {item!r}: {value!r} is not a {fields[name].type}")

    overrides = {name: values[0][1] for name, values in (field_value("--set", item) for item in args.set)}
    sweeps = [field_value("--sweep", item) for item in args.sweep]
    if args.n < KMAX:
        parser.error(f"--n must be >= {KMAX} (the largest k of the tables and verdicts), got {args.n}")
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    for name in ("recipe_seeds", "seeds", "methods"):
        if len(set(getattr(args, name))) != len(getattr(args, name)):
            parser.error(f"--{name.replace('_', '-')} must be distinct, got {getattr(args, name)}")
    for change in [{}] + [{field: value} for field, values in sweeps for _, value in values]:
        for method in args.methods:       # each with its own objective (the main job's default is a list)
            try:
                settings.check_config(nsr.Config(**{**nsr.TOY_DEFAULTS, **overrides, **change, "objective": method}),
                                      nsr.OBJECTIVES)
            except settings.UserError as e:
                parser.error(f"training settings: {e}")
    return args, overrides, sweeps


def main(argv=None) -> int:
    args, overrides, sweeps = parse_args(argv)
    if args.project:
        print(projection(json.loads(pathlib.Path(args.project).read_text())))
        return 0
    start = time.time()
    jobs = make_jobs(args, overrides, sweeps)
    print(f"reproduce: {len(jobs)} jobs ({len(args.recipe_seeds)} bases, {len(jobs) - len(args.recipe_seeds)} "
          f"training runs) in {args.jobs} processes -> {args.out}", flush=True)
    if not args.quick:
        print(format_expected(jobs, args.jobs), flush=True)
    # the bases first (each training job needs its base built), then every training run
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(args.jobs) as pool:
        records = pool.map(run_job, [j for j in jobs if j["method"] == "base"], chunksize=1)
        records += pool.map(run_job, [j for j in jobs if j["method"] != "base"], chunksize=1)
    summary = {"n": args.n, "ks": KS, "runs": [
        {"method": r["method"], "recipe_seed": r["recipe_seed"], "train_seed": r["train_seed"], "split": s,
         "counts": r["splits"][s]["counts"], "mean_entropy": r["splits"][s]["mean_entropy"]}
        for r in records for s in SPLITS]}
    unswept = dict(summary, runs=[r for r in summary["runs"] if "[" not in r["method"]])   # the verdicts' runs
    found = verdicts(unswept, bootstrap(unswept))
    summary["verdicts"] = found
    by_seed = verdicts_by_recipe_seed(unswept) if len(args.recipe_seeds) > 1 else {}
    summary["verdicts_by_recipe_seed"] = {str(seed): v for seed, v in by_seed.items()}
    summary["variance"] = [variance_components(unswept, m, s) for m in sorted({r["method"] for r in unswept["runs"]}
                           - {"base"}, key=label_order) for s in SPLITS]
    summary["coverage"] = coverage(summary)
    summary["cells"] = cells(summary, bootstrap(summary))          # every variant, with its intervals
    summary["dynamics"] = dynamics(records)
    summary["diverged"] = {r["name"]: r["diverged"] for r in records if r.get("diverged")}
    summary["job_keys"] = sorted(job["key"] for job in jobs)     # exactly which runs this summary holds
    first = next((j for j in jobs if j["config"]), None)
    summary["settings"] = {"training": {k: v for k, v in (first["config"] if first else {}).items()
                                        if k not in ("objective", "seed", "out_dir", "model", "train")},
                           "sweeps": [{"field": field, "values": [v for _, v in values]} for field, values in sweeps],
                           "recipe_seeds": args.recipe_seeds, "train_seeds": args.seeds,
                           "seconds": round(time.time() - start, 1)}
    out = pathlib.Path(args.out)
    earlier = out / "summary.json"           # another reproduction's summary (other jobs) is moved aside
    if earlier.is_file() and json.loads(earlier.read_text()).get("job_keys") != summary["job_keys"]:
        print(f"{earlier} summarised other jobs: moved it to {loading.move_aside(earlier)}")
    earlier.write_text(json.dumps(summary, indent=1))
    plot = plot_dynamics(summary["dynamics"], out / "dynamics.png") if summary["dynamics"] else None
    print("\n" + tables(summary) + "\n\n" + format_coverage(summary["coverage"], summary["n"]) + "\n\n"
          + format_cells(summary["cells"]) + "\n\n" + format_variance(summary["variance"]) + "\n\n"
          + format_verdicts(found))
    if by_seed:
        print("\neach recipe seed alone (its evidence: summary.json \"verdicts_by_recipe_seed\"):")
        for seed, seed_found in by_seed.items():
            print(f"  recipe seed {seed}: " + "  ".join(f"({f['finding']}) {f['verdict']}" for f in seed_found))
    for name, message in summary["diverged"].items():
        print(f"NOTE: {name} diverged; its last good checkpoint was evaluated ({message.splitlines()[0][:120]})")
    print(f"\n{out / 'summary.json'} written" + (f", training curves in {plot}" if plot else
          " (training curves as numbers: summary.json \"dynamics\"; pip install matplotlib for the plot)")
          + f"; {time.time() - start:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
