"""
assignment.py -- the course assignment kit: a handout, an exact grader, a submission. All on a laptop CPU.

    python assignment.py handout DIR            # a student copy in DIR: every PROBLEM's body is a stub
    python assignment.py grade DIR [--json]     # grade the copy at DIR against this checkout, problem by problem
    python assignment.py grade DIR --results    # also re-run the student's seeded toy training, scored in tiers
    python assignment.py submit DIR             # DIR/submission.zip: edited files, WRITEUP.md, the runs' logs

PROBLEMS are marked in the source in ONE style, read here by find_problems():

    # PROBLEM <id> (<n> points): <title>          (or "<n> bonus points")
    def the_function(...):                         (a module function, or a method of a class)

The handout keeps each such function's signature and docstring (the specification) and replaces its body
with `raise NotImplementedError("<id>: see HANDOUT.md")`. CHECKS below holds, per problem, its visible
tests (in test_nsr.py) and its differential check (the student's function against this checkout's on
fresh random inputs).

GRADING, EACH PROBLEM IN ISOLATION. For problem P the grader copies this checkout's code to a temporary
directory, puts the student's version of P's function in place of the reference one (every other problem
keeps the reference), and runs, in a fresh process: (1) P's visible tests from THIS checkout's test_nsr.py
(a student cannot weaken them), one check per test function; (2) P's differential checks, DIFF_CASES
fresh random cases each, from a new seed every run (printed), so answers cannot be memorised. Points =
P's maximum x checks passed / checks. A bug in P costs points in P only; a blank decode step costs only
decode_step. Tolerances of the differential checks (TOLERANCE): float64 inputs where the function is
dtype-agnostic, compared with rtol 1e-7 and atol 1e-9; the fp32 functions (logprobs, decode_step) with
rtol 1e-5 and atol 1e-6; indices, masks and error types exactly. (CS336's snapshot tests use atol 1e-2.)
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import hashlib
import importlib.util
import json
import math
import os
import pathlib
import random
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass

HERE = pathlib.Path(__file__).resolve().parent
SOURCES = ("nsr.py", "sample.py", "passk.py", "verifier.py", "ppo.py")      # the files problems live in
MARKER = re.compile(r"^(\s*)# PROBLEM (\w+) \((\d+(?:\.\d+)?) (bonus )?points?\): (.+)$")
STUB = 'raise NotImplementedError("{id}: see HANDOUT.md")'
DIFF_CASES = 20                                    # fresh random cases per differential check
TOLERANCE = {"float64": dict(rtol=1e-7, atol=1e-9), "float32": dict(rtol=1e-5, atol=1e-6)}
PROBLEM_TIMEOUT = 300                              # seconds per problem (a student's infinite loop costs only it)


# =================================================================================================
# PROBLEMS: read from the markers in the source
# =================================================================================================

@dataclass
class Problem:
    id: str
    file: str                  # e.g. "nsr.py"
    qualname: str              # "sample_weights", or "KVCache.update" for a method
    points: float
    bonus: bool
    title: str


def find_problems(root: pathlib.Path = HERE) -> list[Problem]:
    """Every `# PROBLEM` marker of the source files under root, in file order; the function on the next line."""
    problems = []
    for name in SOURCES:
        lines = (root / name).read_text().splitlines()
        defs = function_lines(root / name)
        for i, line in enumerate(lines):
            m = MARKER.match(line)
            if m:
                qualname = defs.get(i + 2)             # the def right after the marker (lines are 1-based)
                if qualname is None:
                    raise ValueError(f"{name}:{i + 1}: a PROBLEM marker must sit right above a def")
                problems.append(Problem(m.group(2), name, qualname, float(m.group(3)), bool(m.group(4)), m.group(5)))
    return problems


def function_lines(path: pathlib.Path) -> dict[int, str]:
    """{line of a def: its qualname} for the module's functions and its classes' methods."""
    tree, out = ast.parse(path.read_text()), {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            out[node.lineno] = node.name
        elif isinstance(node, ast.ClassDef):
            out.update({m.lineno: f"{node.name}.{m.name}" for m in node.body if isinstance(m, ast.FunctionDef)})
    return out


def locate(source: str, qualname: str) -> ast.FunctionDef | None:
    """The ast node of a module function or a method ("Class.method") in source, or None."""
    tree = ast.parse(source)
    scope, _, name = qualname.rpartition(".")
    body = tree.body
    if scope:
        body = next((n.body for n in tree.body if isinstance(n, ast.ClassDef) and n.name == scope), [])
    return next((n for n in body if isinstance(n, ast.FunctionDef) and n.name == name), None)


def function_text(source: str, qualname: str) -> str | None:
    """The whole text of a function (its def line to its last line), or None if it is not there."""
    node = locate(source, qualname)
    if node is None:
        return None
    lines = source.splitlines(keepends=True)
    return "".join(lines[node.lineno - 1:node.end_lineno])


def replace_function(source: str, qualname: str, text: str) -> str:
    """source with the function `qualname` replaced by `text` (a whole def, the same indentation)."""
    node = locate(source, qualname)
    lines = source.splitlines(keepends=True)
    return "".join(lines[:node.lineno - 1]) + text + "".join(lines[node.end_lineno:])


def stubbed(source: str, problem: Problem) -> str:
    """The function with its signature and docstring kept and its body replaced by the stub."""
    node = locate(source, problem.qualname)
    lines = source.splitlines(keepends=True)
    has_doc = (node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
               and isinstance(node.body[0].value.value, str))
    keep_to = node.body[0].end_lineno if has_doc else node.body[0].lineno - 1
    indent = " " * node.body[0].col_offset
    text = "".join(lines[node.lineno - 1:keep_to]) + indent + STUB.format(id=problem.id) + "\n"
    return replace_function(source, problem.qualname, text)


def body_lines(source: str, problem: Problem) -> list[str]:
    """The reference body's distinctive lines (stripped, without comments, >= 24 characters): what a
    handout must not contain anywhere."""
    node = locate(source, problem.qualname)
    lines = source.splitlines()
    start = node.body[1].lineno if len(node.body) > 1 and isinstance(node.body[0], ast.Expr) else node.body[0].lineno
    out = []
    for line in lines[start - 1:node.end_lineno]:
        code = line.split("  #")[0].strip()
        if len(code) >= 24 and not code.startswith("#"):
            out.append(code)
    return out


# =================================================================================================
# HANDOUT
# =================================================================================================

# What the handout copies: the project's tracked files, minus this kit's own instructor pages. Run outputs
# (runs/), checkpoints and caches are never tracked, so they are never copied.
NOT_HANDED_OUT = ("docs/assignment.md",)


def project_files(root: pathlib.Path = HERE) -> list[str]:
    """The files of the project: git's tracked files, or (no git) every file outside runs/, caches, .git."""
    try:
        out = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout
        return [f for f in out.splitlines() if (root / f).is_file()]
    except (OSError, subprocess.CalledProcessError):
        skip = ("runs", ".git", "__pycache__", ".pytest_cache")
        return [str(p.relative_to(root)) for p in sorted(root.rglob("*"))
                if p.is_file() and not any(part in skip for part in p.relative_to(root).parts)]


def handout(out: pathlib.Path, root: pathlib.Path = HERE) -> list[Problem]:
    """Write the student copy to out (which must not exist or be empty)."""
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"assignment.py: error: {out} is not empty; give a new directory for the handout")
    problems = find_problems(root)
    out.mkdir(parents=True, exist_ok=True)
    for name in project_files(root):
        if name in NOT_HANDED_OUT:
            continue
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        text = (root / name).read_text()
        if name == "test_nsr.py":
            text = strip_cuts(text)
        for p in problems:
            if p.file == name:
                text = stubbed(text, p)
        (out / name).write_text(text)
    (out / "HANDOUT.md").write_text(handout_text(problems))
    (out / "WRITEUP.md").write_text(WRITEUP)
    manifest = {name: sha256(out / name) for name in project_files_in(out)}
    (out / ".handout.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return problems


def strip_cuts(text: str) -> str:
    """test_nsr.py without its `# HANDOUT: cut` ... `# HANDOUT: end` regions (reference implementations
    that tests compare against, which would give an answer away)."""
    return re.sub(r"(?ms)^[ \t]*# HANDOUT: cut\b.*?^[ \t]*# HANDOUT: end[^\n]*\n", "", text)


def project_files_in(root: pathlib.Path) -> list[str]:
    skip = ("runs", ".git", "__pycache__", ".pytest_cache")
    return [str(p.relative_to(root)) for p in sorted(root.rglob("*"))
            if p.is_file() and not any(part in skip for part in p.relative_to(root).parts)
            and p.name not in (".handout.json", "submission.zip")]


def sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def handout_text(problems: list[Problem]) -> str:
    rows = "\n".join(f"| {i} | `{p.id}` | `{p.file}`: `{p.qualname}` | {p.points:g}{' (bonus)' if p.bonus else ''} "
                     f"| {p.title} | `python -m pytest -q test_nsr.py -k \"{' or '.join(CHECKS[p.id]['tests'])}\"` |"
                     for i, p in enumerate(problems, start=1))
    total = sum(p.points for p in problems if not p.bonus)
    bonus = sum(p.points for p in problems if p.bonus)
    return HANDOUT.format(rows=rows, total=f"{total:g}", bonus=f"{bonus:g}", cases=DIFF_CASES,
                          writeup_questions=WRITEUP_QUESTIONS)


# =================================================================================================
# GRADE: each problem in its own copy of the reference, in its own process
# =================================================================================================

def grade(student: pathlib.Path, root: pathlib.Path = HERE, only=None, jobs: int = 2) -> dict:
    """{"total", "max", "problems": {id: {"points", "max", "bonus", "failed": [...], "seed"}}}."""
    problems = [p for p in find_problems(root) if not only or p.id in only]
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(lambda p: grade_problem(p, student, root), problems))
    out = {"total": 0.0, "max": 0.0, "problems": {}}
    for p, r in zip(problems, results):
        out["problems"][p.id] = r
        out["total"] += r["points"]
        out["max"] += 0 if p.bonus else p.points
    out["total"] = round(out["total"], 2)
    return out


def grade_problem(problem: Problem, student: pathlib.Path, root: pathlib.Path) -> dict:
    """Grade one problem: the student's function inside a copy of the reference, checked in a subprocess."""
    result = {"points": 0.0, "max": problem.points, "bonus": problem.bonus, "failed": [], "seed": None}
    try:
        text = function_text((student / problem.file).read_text(), problem.qualname)
    except (OSError, SyntaxError) as e:
        text, result["failed"] = None, [f"{problem.file} unreadable: {e}"]
    if text is None:
        result["failed"] = result["failed"] or [f"{problem.qualname} not found in {problem.file}"]
        return result
    with tempfile.TemporaryDirectory(prefix=f"grade-{problem.id}-") as tmp:
        tmp = pathlib.Path(tmp)
        for name in (*SOURCES, "toy.py", "presets.py", "precision.py", "runs.py", "settings.py", "reproduce.py",
                     "test_nsr.py", "pytest.ini", "assignment.py"):
            shutil.copy(root / name, tmp / name)
        source = (tmp / problem.file).read_text()
        (tmp / problem.file).write_text(replace_function(source, problem.qualname, text))
        seed = secrets.randbits(32)
        cmd = [sys.executable, str(tmp / "assignment.py"), "_check", problem.id, "--reference", str(root),
               "--seed", str(seed)]
        try:
            proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=PROBLEM_TIMEOUT,
                                  env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
            checks = json.loads(proc.stdout.strip().splitlines()[-1])
        except subprocess.TimeoutExpired:
            checks = [("everything", False, f"timed out after {PROBLEM_TIMEOUT} s")]
        except (ValueError, IndexError):
            checks = [("everything", False, "the check process failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1])]
    result["seed"] = seed
    passed = sum(ok for _, ok, _ in checks)
    result["points"] = round(problem.points * passed / len(checks), 2)
    result["failed"] = [f"{name}: {detail}" for name, ok, detail in checks if not ok]
    result["checks"] = len(checks)
    return result


def run_checks(problem_id: str, reference: pathlib.Path, seed: int) -> list:
    """In the grading process (cwd = the spliced copy): the visible tests, then the differential checks.
    Returns [(check, passed, detail)]."""
    import pytest

    class Collect:                          # one outcome per test function (all its parametrizations)
        def __init__(self):
            self.outcomes, self.skipped = {}, set()

        def pytest_runtest_logreport(self, report):
            name = report.nodeid.split("::")[-1].split("[")[0]
            if report.skipped:
                self.skipped.add(name)
                return
            ok, detail = self.outcomes.get(name, (True, ""))
            if report.failed:
                ok, detail = False, (report.longreprtext.strip().splitlines() or ["failed"])[-1][:200]
            self.outcomes[name] = (ok, detail)

    collect = Collect()
    tests = CHECKS[problem_id]["tests"]
    pytest.main(["-q", "-p", "no:cacheprovider", "test_nsr.py", "-k", " or ".join(tests)], plugins=[collect])
    checks = [(f"test {name}", *collect.outcomes.get(name, (False, "not run: the test file did not import")))
              for name in tests if name in collect.outcomes or name not in collect.skipped]
    problem = next(p for p in find_problems(pathlib.Path.cwd()) if p.id == problem_id)
    student = load_function(pathlib.Path.cwd() / problem.file, problem.qualname, "student")
    ref = load_function(reference / problem.file, problem.qualname, "reference")
    rng = random.Random(seed)
    for name, check in CHECKS[problem_id]["diff"]:
        try:
            ok, detail = check(student, ref, rng)
        except Exception as e:                                   # a crash in the student's code fails the check
            ok, detail = False, f"{type(e).__name__}: {str(e)[:160]}"
        checks.append((f"differential: {name}", ok, detail))
    return checks


def load_function(path: pathlib.Path, qualname: str, tag: str):
    """The function `qualname` of the file at path, loaded as its own module (its imports resolve to the
    spliced copy, identical to the reference but for the problem's function)."""
    spec = importlib.util.spec_from_file_location(f"{tag}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module                       # dataclasses look their module up there
    spec.loader.exec_module(module)
    obj = module
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


# =================================================================================================
# CHECKS: per problem, the visible tests and the differential checks (student vs reference)
# =================================================================================================

def close(a, b, kind="float64") -> bool:
    import torch
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and bool(torch.allclose(a, b, equal_nan=True, **TOLERANCE[kind])))
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and math.isclose(a, b, rel_tol=TOLERANCE[kind]["rtol"],
                                                           abs_tol=TOLERANCE[kind]["atol"])
    return a == b


def outcome(fn, *args, **kwargs):
    """(result, None) or (None, the exception type's name): errors are part of the specification."""
    try:
        return fn(*args, **kwargs), None
    except Exception as e:
        return None, type(e).__name__


def compare(student, ref, cases, check) -> tuple[bool, str]:
    """Run both on every case (a dict of kwargs); check(student_result, ref_result) -> bool."""
    for i, kwargs in enumerate(cases):
        (got, err), (want, ref_err) = outcome(student, **kwargs), outcome(ref, **kwargs)
        if ref_err or err:
            if err != ref_err:
                return False, f"case {i}: raised {err} where the reference {'raised ' + ref_err if ref_err else 'returned'}"
            continue
        if not check(got, want):
            return False, f"case {i} ({short(kwargs)}): a different result"
    return True, ""


def short(kwargs: dict) -> str:
    import torch
    return ", ".join(f"{k}={tuple(v.shape) if isinstance(v, torch.Tensor) else v!r}"[:60] for k, v in kwargs.items())


def tensors(rng: random.Random):
    import torch
    return torch.Generator().manual_seed(rng.randrange(2 ** 31))


def diff_weights(student, ref, rng):
    import torch
    cases = []
    for _ in range(DIFF_CASES):
        G, B = rng.randint(1, 8), rng.randint(1, 6)
        rewards = [float(rng.random() < rng.random()) for _ in range(B * G)]
        objective = rng.choice(["psr", "nsr", "w-reinforce", "reinforce", "grpo", "grpo", "ppo", "dpo"])
        if rng.random() < 0.1:
            rewards[0] = 0.5
        cases.append(dict(rewards=rewards, objective=objective, lam=rng.choice([0.0, 0.1, rng.random()]),
                          group_size=G if rng.random() < 0.9 else G + 1))
    return compare(student, ref, cases, lambda a, b: close(a, b, "float32"))


def diff_policy_loss(student, ref, rng):
    import torch
    cases = []
    for _ in range(DIFF_CASES):
        g = tensors(rng)
        N, T = rng.randint(1, 5), rng.randint(1, 6)
        old = -torch.rand(N, T, generator=g, dtype=torch.float64) * 3
        logp = (old + torch.randn(N, T, generator=g, dtype=torch.float64) * 0.4).clamp(max=0)
        per_token = rng.random() < 0.3
        weights = torch.randn((N, T) if per_token else (N,), generator=g, dtype=torch.float64)
        weights[torch.rand(weights.shape, generator=g) < 0.3] = 0.0
        mask = (torch.rand(N, T, generator=g) < 0.8).double()
        sides = rng.choice([(0.2, 0.2), (0.1, 0.3), (0.2, 0.0), (0.0, 0.2), (0.0, 0.0), (0.28, 0.2)])
        cases.append(dict(logp=logp, weights=weights, mask=mask, normalizer=float(rng.randint(1, 20)),
                          old_logp=None if rng.random() < 0.2 else old, clip_low=sides[0], clip_high=sides[1]))
    return compare(with_grad(student, "logp"), with_grad(ref, "logp"), cases, lambda a, b: len(a) == len(b) and all(
        close(x, y) if y.dtype != torch.bool else torch.equal(x, y) for x, y in zip(a, b)))


def with_grad(fn, *names):
    """fn whose tensor inputs `names` get requires_grad, returning (outputs..., their gradients): a check of
    the value AND of what backpropagates (sum of the first output)."""
    import torch

    def run(**kwargs):
        leaves = {n: kwargs[n].detach().clone().requires_grad_(True) for n in names}
        out = fn(**{**kwargs, **leaves})
        outs = out if isinstance(out, tuple) else (out,)
        first = outs[0] if outs[0].dim() == 0 else outs[0].sum()
        if len(outs) > 1 and outs[1] is not None and outs[1].dtype != torch.bool:
            first = first + outs[1].sum()
        grads = torch.autograd.grad(first, list(leaves.values()), allow_unused=True)
        return tuple(o for o in outs if o is not None) + tuple(
            g if g is not None else torch.zeros_like(leaves[n]) for g, n in zip(grads, leaves))
    return run


def diff_kl_penalty(student, ref, rng):
    import torch
    cases = []
    for _ in range(DIFF_CASES):
        g = tensors(rng)
        N, T = rng.randint(1, 4), rng.randint(1, 6)
        scale = rng.choice([0.3, 3.0, 40.0])                    # 40: the clamps must act
        logp = torch.randn(N, T, generator=g, dtype=torch.float64) * scale
        ref_logp = torch.randn(N, T, generator=g, dtype=torch.float64) * scale
        mask = (torch.rand(N, T, generator=g) < 0.8).double()
        cases.append(dict(logp=logp, ref_logp=ref_logp, mask=mask, num_tokens=float(rng.randint(1, 30))))
    return compare(with_grad(student, "logp"), with_grad(ref, "logp"), cases,
                   lambda a, b: len(a) == len(b) and all(close(x, y) for x, y in zip(a, b)))


def diff_normalizer(student, ref, rng):
    import torch
    cases = []
    for _ in range(DIFF_CASES):
        g = tensors(rng)
        N = rng.randint(1, 8)
        weights = torch.randn((N, rng.randint(1, 5)) if rng.random() < 0.3 else (N,), generator=g)
        weights[torch.rand(weights.shape, generator=g) < 0.5] = 0.0
        cases.append(dict(weights=weights, lengths=[rng.randint(1, 50) for _ in range(N)],
                          mode=rng.choice(["tokens", "tokens", "constant", "tokenz"]),
                          max_new_tokens=rng.randint(1, 64)))
    return compare(student, ref, cases, lambda a, b: isinstance(a, float) and a == b)


def diff_logprobs(student, ref, rng):
    import torch
    cases = []
    for _ in range(DIFF_CASES):
        g = tensors(rng)
        n, R, V = rng.randint(1, 3), rng.randint(1, 5), rng.randint(2, 40)
        dtype = rng.choice([torch.float32, torch.float64])
        cases.append(dict(logits=(torch.randn(n, R, V, generator=g) * rng.choice([0.5, 3, 20])).to(dtype),
                          targets=torch.randint(0, V, (n, R), generator=g),
                          temperature=rng.choice([1.0, 0.6, 1.7]), with_entropy=rng.random() < 0.7))
    return compare(with_grad(student, "logits"), with_grad(ref, "logits"), cases,
                   lambda a, b: len(a) == len(b) and all(close(x, y, "float32") for x, y in zip(a, b)))


def diff_decode_step(student, ref, rng):
    import torch
    cases = []
    for _ in range(DIFF_CASES):
        g = tensors(rng)
        b, V = rng.randint(1, 6), rng.randint(2, 60)
        logits = torch.randn(b, V, generator=g) * rng.choice([0.5, 2.0, 8.0])
        seed = rng.randrange(2 ** 31)
        cases.append(dict(logits=logits, temperature=rng.choice([0.0, 1.0, 1.0, 0.7, 1.4]),
                          top_p=rng.choice([1.0, 1.0, 0.9, 0.5]), eos=torch.tensor(rng.sample(range(V), rng.randint(1, 2))),
                          generator=seed))

    def seeded(fn):               # the same random numbers for both: a fresh generator per call
        return lambda generator, **kw: fn(generator=torch.Generator().manual_seed(generator), **kw)
    return compare(seeded(student), seeded(ref), cases, lambda a, b: len(a) == len(b) == 4 and torch.equal(a[0], b[0])
                   and close(a[1], b[1], "float32") and close(a[2], b[2], "float32") and torch.equal(a[3], b[3]))


def diff_kv_cache(student, ref, rng):
    import torch
    import sample
    for case in range(DIFF_CASES):
        g = tensors(rng)
        B, H, hd, layers = rng.randint(1, 3), rng.randint(1, 3), rng.randint(1, 4), rng.randint(1, 3)
        P, steps = rng.randint(1, 5), rng.randint(1, 4)
        caches = []
        for _ in range(2):
            c = object.__new__(sample.KVCache)
            c.k = [torch.zeros(B, H, P + steps, hd) for _ in range(layers)]
            c.v = [torch.zeros(B, H, P + steps, hd) for _ in range(layers)]
            c.filled = 0
            caches.append(c)
        writes = [(0, P)] + [(P + t, 1) for t in range(steps)]
        for slot, S in writes:
            for layer in range(layers):
                k, v = torch.randn(B, H, S, hd, generator=g), torch.randn(B, H, S, hd, generator=g)
                got = student(caches[0], layer, slot, k.clone(), v.clone())
                want = ref(caches[1], layer, slot, k.clone(), v.clone())
                if not (all(torch.equal(x, y) for x, y in zip(got, want)) and len(got) == 2):
                    return False, f"case {case}: the keys and values read back at slot {slot} differ"
                if caches[0].filled != caches[1].filled:
                    return False, f"case {case}: filled = {caches[0].filled}, expected {caches[1].filled}"
                if got[0].data_ptr() != caches[0].k[layer].data_ptr():
                    return False, f"case {case}: the keys returned are a copy, not a view of the cache"
        if not all(torch.equal(x, y) for x, y in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v)):
            return False, f"case {case}: the cache's contents differ"
    return True, ""


def diff_pass_at_k(student, ref, rng):
    import numpy as np
    cases = []
    for _ in range(DIFF_CASES * 5):
        n = rng.choice([1, 2, 10, 64, 256, rng.randint(1, 600)])
        c, k = rng.randint(0, n), rng.randint(1, n)
        cases.append(dict(n=n, c=c, k=k))
    cases += [dict(n=5, c=6, k=1), dict(n=5, c=2, k=6), dict(n=0, c=0, k=1), dict(n=4.0, c=1, k=1),
              dict(n=np.int64(8), c=np.int64(3), k=2), dict(n=4, c=-1, k=1)]
    return compare(student, ref, cases, lambda a, b: close(a, b) and isinstance(a, float))


def diff_boxed(student, ref, rng):
    import verifier
    pieces = ["1", "x", "{", "}", "\\{", "\\}", " ", "\\frac{1}{2}", "-3", ".", "ab", "{a}{b}", "\\sqrt{2}", "\n"]
    cases = []
    for _ in range(DIFF_CASES * 5):
        body = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 8)))
        name = rng.choice(["\\boxed", "\\fbox"])
        opening = rng.choice(["{", " {", "  ", " ", "", "{ "])
        text = rng.choice(["", "so ", "x = "]) + name + opening + body + rng.choice(["}", "}}", "", "} end", "}."])
        if rng.random() < 0.05:
            text = name + "{" + "1" * (verifier.MAX_ANSWER_CHARS + rng.randint(-2, 2)) + "}"
        m = verifier._BOX_RE.search(text)
        if m:                                                   # ("\\boxedab" names no box)
            cases.append(dict(text=text, start=m.start(), end_of_name=m.end()))
    return compare(student, ref, cases, lambda a, b: a == b)


def diff_gae(student, ref, rng):
    import torch
    cases = []
    for _ in range(DIFF_CASES):
        g = tensors(rng)
        N, T = rng.randint(1, 4), rng.randint(1, 7)
        lengths = torch.randint(1, T + 1, (N,), generator=g)
        mask = (torch.arange(T)[None, :] < lengths[:, None]).double()
        cases.append(dict(rewards=torch.randn(N, T, generator=g, dtype=torch.float64),
                          values=torch.randn(N, T, generator=g, dtype=torch.float64), mask=mask,
                          gamma=rng.choice([1.0, 0.9, 0.5]), gae_lam=rng.choice([1.0, 0.95, 0.0])))
    return compare(student, ref, cases, lambda a, b: len(a) == len(b) and all(close(x, y) for x, y in zip(a, b)))


CHECKS = {
    "weights": {"tests": ["test_sample_weights_table_for_every_objective_including_grpo_all_correct_and_all_wrong_groups",
                          "test_sample_weights_rejects_unknown_objectives_bad_rewards_and_bad_grpo_groups",
                          "test_loss_gradient_wrt_logits_equals_the_closed_form_for_psr_nsr_and_w_reinforce"],
                "diff": [("weights of every objective, errors included", diff_weights)]},
    "policy_loss": {"tests": ["test_loss_gradient_wrt_logits_equals_the_closed_form_for_psr_nsr_and_w_reinforce",
                              "test_nsr_gradient_step_lowers_the_sampled_logit_and_raises_the_others_in_proportion_to_their_probability",
                              "test_clipped_loss_at_ratio_one_has_the_same_gradient_as_the_unclipped_loss",
                              "test_the_clipped_surrogate_gradient_vanishes_exactly_where_ppos_does_on_each_side",
                              "test_clip_fractions_count_by_the_sign_of_the_weight_the_tokens_whose_gradient_the_clip_zeroed",
                              "test_demo_gradient_prints_nsr_moving_the_logits_by_minus_one_minus_pi_and_plus_the_prior"],
                    "diff": [("loss, gradient and clipped tokens on both sides", diff_policy_loss)]},
    "kl_penalty": {"tests": ["test_entropy_bonus_and_kl_penalty_values_and_gradients_on_a_hand_made_case",
                             "test_the_step_subtracts_the_entropy_bonus_and_adds_the_kl_term_as_token_means_over_the_mini_batch"],
                   "diff": [("value and gradient, clamps included", diff_kl_penalty)]},
    "normalizer": {"tests": ["test_loss_normalizer_counts_the_tokens_of_weighted_samples_only",
                             "test_gradients_with_micro_batch_size_one_equal_the_full_batch_gradients"],
                   "diff": [("Z of both modes, per-token weights, errors", diff_normalizer)]},
    "logprobs": {"tests": ["test_the_first_mini_batch_gradient_is_the_on_policy_gradient_of_the_sampled_tokens",
                           "test_gradient_checkpointing_and_the_chunked_output_layer_give_the_same_loss_and_gradients",
                           "test_nsr_training_steps_lower_the_log_prob_of_the_penalised_samples"],
                 "diff": [("log-probs, entropy and their gradient, any dtype and temperature", diff_logprobs)]},
    "decode_step": {"tests": ["test_generate_with_a_fixed_generator_reproduces_the_same_samples",
                              "test_generate_stops_each_row_at_its_first_eos_and_reports_truncation",
                              "test_greedy_generate_matches_transformers_generate_token_for_token",
                              "test_generate_logprobs_equal_a_fresh_forward_pass_under_the_sampling_distribution",
                              "test_generate_without_its_speed_tricks_gives_the_same_rollouts_as_with_them"],
                    "diff": [("tokens, log q, entropy and EOS under every temperature and top-p", diff_decode_step)]},
    "kv_cache": {"tests": ["test_our_forward_with_our_kv_cache_equals_transformers_full_forward_on_a_left_padded_batch",
                           "test_our_forward_feeding_several_tokens_on_top_of_the_cache_equals_one_at_a_time",
                           "test_greedy_generate_with_our_decoder_matches_transformers_generate_for_every_supported_config"],
                 "diff": [("prefill and steps: what is written, what is read, views", diff_kv_cache)]},
    "pass_at_k": {"tests": ["test_pass_at_k_equals_brute_force_enumeration_over_all_k_subsets",
                            "test_pass_at_k_matches_exact_binomial_fractions_for_random_n_up_to_512",
                            "test_pass_at_k_is_unbiased_under_binomial_sampling_while_the_plug_in_estimate_is_not",
                            "test_pass_at_k_edge_cases_c_zero_c_n_k_n_and_pass_at_1_is_c_over_n",
                            "test_pass_at_k_rejects_bad_arguments_with_a_clear_value_error"],
                  "diff": [("random n, c, k up to 600, errors included", diff_pass_at_k)]},
    "boxed": {"tests": ["test_verifier_extracts_the_last_complete_box_or_the_final_answer_phrase_and_nothing_else",
                        "test_verifier_reads_an_unboxed_final_answer_phrase_and_the_last_box_of_a_very_long_response",
                        "test_verifier_accepts_every_notation_of_the_same_answer_in_both_directions",
                        "test_verifier_fuzz_of_random_and_adversarial_strings_never_raises_and_stays_linear"],
              "diff": [("random boxes: nesting, escapes, shorthand, unclosed, too long", diff_boxed)]},
    "gae": {"tests": ["test_gae_equals_a_hand_computed_example_and_the_return_minus_value_at_gamma_lam_one"],
            "diff": [("advantages and returns, any gamma and lambda, ragged rows", diff_gae)]},
}


# =================================================================================================
# RESULTS: the student's whole copy trains the toy; its outcome is scored in tiers
# =================================================================================================

RESULT_TIERS = None   # set once the toy's thresholds are measured (docs/assignment.md); None = not offered


def grade_results(student: pathlib.Path) -> dict:
    if RESULT_TIERS is None:
        return {"points": 0.0, "max": 0.0, "note": "results grading is not offered for this toy"}
    raise NotImplementedError


# =================================================================================================
# SUBMIT
# =================================================================================================

def submit(student: pathlib.Path) -> pathlib.Path:
    """student/submission.zip: the files changed since the handout, WRITEUP.md, and every run's config.json,
    metrics.jsonl, eval.jsonl and eval/*.json (no checkpoint, no model)."""
    manifest = json.loads((student / ".handout.json").read_text()) if (student / ".handout.json").is_file() else {}
    edited = [name for name in project_files_in(student) if manifest.get(name) != sha256(student / name)
              and name != "WRITEUP.md"]
    logs = [str(p.relative_to(student)) for p in sorted((student / "runs").rglob("*")) if p.is_file()
            and (p.name in ("config.json", "metrics.jsonl", "eval.jsonl", "summary.json")
                 or (p.parent.name == "eval" and p.suffix == ".json"))
            and not any(part.startswith("checkpoint-") for part in p.parts)] if (student / "runs").is_dir() else []
    out = student / "submission.zip"
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for name in sorted(set(edited + ["WRITEUP.md"] + logs)):
            if (student / name).is_file():
                z.write(student / name, name)
    return out


# =================================================================================================
# TEXTS: HANDOUT.md and the WRITEUP.md template
# =================================================================================================

HANDOUT = """# Assignment: negative sample reinforcement, on a laptop CPU

You implement the pieces of RL with verifiable rewards that the paper "The Surprising Effectiveness of
Negative Reinforcement in LLM Reasoning" (Zhu et al., NeurIPS 2025, arXiv 2506.01347) splits and studies,
then run its experiments on a toy world small enough for a laptop CPU. Start with `README.md` (the idea)
and `nsr.py` (the paper's algorithm, top to bottom). Every function below has its signature and its
docstring (the specification); its body raises `NotImplementedError`. Write the body.

## Setup

    pip install -r requirements.txt pytest        # CPU is enough; install the CPU build of torch first

## The problems ({total} points, and {bonus} bonus points)

Do them in this order (later ones build on earlier ones when you run the whole pipeline). Each one's
visible tests are the command in its row; the grader runs them and a differential check of your function
against the reference on {cases} fresh random inputs per check (so hard-coding the visible tests' answers
does not pass), each problem in isolation: a bug in one costs points in that one only.

| # | id | where | points | what | visible tests |
|---|---|---|---|---|---|
{rows}

Tolerances: float64 inputs compared with rtol 1e-7 and atol 1e-9; the fp32 functions (`logprobs`,
`decode_step`) with rtol 1e-5 and atol 1e-6; token ids, masks and the type of every error exactly. An error
the docstring asks for (a `ValueError` for bad input) must be raised where the reference raises it.

Run the whole suite with `python -m pytest -q test_nsr.py` (about a minute on 2 cores); with every problem
done it passes.

## The write-up (WRITEUP.md)

Answer each question in a few sentences with the numbers your runs printed. Each command is given with
its measured time on 2 CPU cores; all of them together take at most 2 CPU-hours. See WRITEUP.md.

{writeup_questions}

## What to submit

    python assignment.py submit .        # writes submission.zip: the files you edited, WRITEUP.md, and
                                         # your runs' config.json / metrics.jsonl / eval files (no checkpoints)

## Optional GPU track (clearly optional; not graded)

With one 24 GB GPU: `python nsr.py --preset qwen2.5-0.5b-instruct --train <MATH train.jsonl> --eval
<MATH test.jsonl> --objective nsr` (docs/real-models.md); `python nsr.py --preset qwen2.5-math-1.5b
--dry-run` prints the memory plan of the paper's model family on 24 GB. Compare PSR and NSR's Pass@k there.
"""

WRITEUP_QUESTIONS = """(The questions and their measured commands are filled in with the toy's final design.)"""

WRITEUP = """# Write-up

Name:

Answer each question of HANDOUT.md "The write-up" here, with the numbers your runs printed.
"""


# =================================================================================================
# MAIN
# =================================================================================================

def format_grade(result: dict) -> str:
    lines = [f"{'problem':<14}{'points':>8}{'max':>6}  what failed"]
    for pid, r in result["problems"].items():
        failed = "; ".join(r["failed"]) if r["failed"] else "-"
        lines.append(f"{pid:<14}{r['points']:>8g}{r['max']:>6g}{' (bonus)' if r['bonus'] else ''}  {failed[:300]}")
    lines.append(f"{'total':<14}{result['total']:>8g}{result['max']:>6g}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="The course assignment kit: handout, grade, submit.")
    sub = parser.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("handout", help="write a student copy to DIR (which must not exist or be empty)")
    sp.add_argument("dir", type=pathlib.Path)
    sp = sub.add_parser("grade", help="grade the student copy at DIR against this checkout")
    sp.add_argument("dir", type=pathlib.Path)
    sp.add_argument("--json", action="store_true", help="the last line is one JSON object (for an autograder)")
    sp.add_argument("--only", nargs="+", default=None, metavar="ID", help="grade only these problems")
    sp.add_argument("--jobs", type=int, default=2, help="problems graded at once (default 2)")
    sp.add_argument("--results", action="store_true", help="also re-run the student's seeded toy training")
    sp = sub.add_parser("submit", help="write DIR/submission.zip")
    sp.add_argument("dir", type=pathlib.Path)
    sp = sub.add_parser("_check", help=argparse.SUPPRESS)             # the grading process of one problem
    sp.add_argument("problem")
    sp.add_argument("--reference", type=pathlib.Path, required=True)
    sp.add_argument("--seed", type=int, required=True)
    args = parser.parse_args(argv)

    if args.command == "handout":
        problems = handout(args.dir)
        print(f"handout written to {args.dir}: {len(problems)} problems "
              f"({sum(p.points for p in problems if not p.bonus):g} points + "
              f"{sum(p.points for p in problems if p.bonus):g} bonus); HANDOUT.md says what to do")
    elif args.command == "grade":
        if not (args.dir / "nsr.py").is_file():
            parser.error(f"{args.dir}: no nsr.py there; give the directory of a student copy")
        if args.only and set(args.only) - set(CHECKS):
            parser.error(f"--only: unknown problem(s) {', '.join(sorted(set(args.only) - set(CHECKS)))}")
        start = time.time()
        result = grade(args.dir, only=args.only, jobs=max(1, args.jobs))
        if args.results:
            result["results"] = grade_results(args.dir)
        print(format_grade(result))
        print(f"graded in {time.time() - start:.0f} s")
        if args.json:
            print(json.dumps({"total": result["total"], "max": result["max"],
                              "problems": {k: {"points": v["points"], "max": v["max"]}
                                           for k, v in result["problems"].items()}}))
    elif args.command == "submit":
        print(f"wrote {submit(args.dir)}")
    else:
        sys.path.insert(0, str(pathlib.Path.cwd()))
        print(json.dumps(run_checks(args.problem, args.reference, args.seed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
