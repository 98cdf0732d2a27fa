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
decode_step. The differential checks' tolerances are TOLERANCE below (float64 inputs where the function is
dtype-agnostic; the fp32 functions with an atol that grows with the logits' size, logit_scale); indices,
masks and error types are compared exactly. (CS336's snapshot tests use atol 1e-2.)
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
    """The files of the project: git's tracked files, or (no git) project_files_in(root)."""
    try:
        out = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout
        return [f for f in out.splitlines() if (root / f).is_file()]
    except (OSError, subprocess.CalledProcessError):
        return project_files_in(root)


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


MAX_SUBMITTED_BYTES = 5 * 2 ** 20        # a larger file (a model, a data set) is no one's edit


def project_files_in(root: pathlib.Path) -> list[str]:
    """Every file under root but run outputs, checkpoints, hidden directories (.git, a .venv), caches and
    the kit's own bookkeeping."""
    out = []
    for p in sorted(root.rglob("*")):
        parts = p.relative_to(root).parts
        if p.is_file() and not any(part == "runs" or part.startswith((".", "checkpoint-")) or part == "__pycache__"
                                   for part in parts[:-1]) and p.name not in (".handout.json", "submission.zip"):
            out.append(str(p.relative_to(root)))
    return out


def sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def handout_text(problems: list[Problem]) -> str:
    problems = sorted(problems, key=lambda p: list(CHECKS).index(p.id))        # CHECKS' order: dependencies first
    rows = "\n".join(f"| {i} | `{p.id}` | `{p.file}`: `{p.qualname}` | {p.points:g}{' (bonus)' if p.bonus else ''} "
                     f"| {p.title} | `python -m pytest -q test_nsr.py -k \"{' or '.join(CHECKS[p.id]['tests'])}\"` |"
                     for i, p in enumerate(problems, start=1))
    total = sum(p.points for p in problems if not p.bonus)
    bonus = sum(p.points for p in problems if p.bonus)
    return HANDOUT.format(rows=rows, total=f"{total:g}", bonus=f"{bonus:g}", cases=DIFF_CASES,
                          writeup_questions=WRITEUP_QUESTIONS.format(**WRITEUP_TIMES),
                          rtol64=TOLERANCE["float64"]["rtol"], atol64=TOLERANCE["float64"]["atol"],
                          rtol32=TOLERANCE["float32"]["rtol"], atol32=TOLERANCE["float32"]["atol"])


# =================================================================================================
# GRADE: each problem in its own copy of the reference, in its own process
# =================================================================================================
#
# Three kinds of process, none of which sees another's code:
#   the grader (this process)  makes the copies, compares the outputs, adds up the points;
#   one REFERENCE process      in a pristine copy of this checkout: the reference outputs of every problem;
#   one STUDENT process per problem, in a copy of this checkout where only that problem's function (and the
#                              top-level names the student added to its file) come from the student: the
#                              visible tests, then the outputs of the student's function on the same inputs.
# The inputs are regenerated from the seed in each process and every call gets a fresh copy, so a function
# that edits its inputs in place changes nothing for the other side.

CODE = (*SOURCES, "why.py", "loading.py", "toy.py", "presets.py", "precision.py", "runs.py", "settings.py",
        "reproduce.py",
        "test_nsr.py", "pytest.ini", "assignment.py")


def grade(student: pathlib.Path, root: pathlib.Path = HERE, only=None, jobs: int = 2) -> dict:
    """{"total", "max", "problems": {id: {"points", "max", "bonus", "failed": [...], "checks", "seed"}}}."""
    if (root / ".handout.json").is_file():
        raise SystemExit("assignment.py: error: this is a handout, not the reference: grading compares with the "
                         "reference checkout (run the visible tests here instead: HANDOUT.md)")
    problems = [p for p in find_problems(root) if not only or p.id in only]
    seeds = {p.id: secrets.randbits(32) for p in problems}            # fresh inputs every run
    with tempfile.TemporaryDirectory(prefix="grade-") as tmp:
        tmp = pathlib.Path(tmp)
        reference = copy_code(root, tmp / "reference")
        ref_out = run_process(reference, ["_outputs", *seeds_args(seeds)], tmp / "reference.pt")
        with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(lambda p: grade_problem(p, student, root, tmp, seeds[p.id], ref_out), problems))
    out = {"total": 0.0, "max": 0.0, "problems": {}}
    for p, r in zip(problems, results):
        out["problems"][p.id] = r
        out["total"] += r["points"]
        out["max"] += 0 if p.bonus else p.points
    out["total"] = round(out["total"], 2)
    return out


def seeds_args(seeds: dict) -> list[str]:
    return [f"{pid}={seed}" for pid, seed in seeds.items()]


def copy_code(root: pathlib.Path, dest: pathlib.Path) -> pathlib.Path:
    dest.mkdir(parents=True)
    for name in CODE:
        shutil.copy(root / name, dest / name)
    return dest


def run_process(cwd: pathlib.Path, args: list[str], out: pathlib.Path):
    """Run `python assignment.py <args> --out <out>` in cwd -> what it saved (torch.load), or an error string."""
    import torch
    try:
        proc = subprocess.run([sys.executable, str(cwd / "assignment.py"), *args, "--out", str(out)], cwd=cwd,
                              capture_output=True, text=True, timeout=PROBLEM_TIMEOUT,
                              env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    except subprocess.TimeoutExpired:
        return f"timed out after {PROBLEM_TIMEOUT} s"
    if not out.is_file():
        return "the check process failed: " + last_error(proc.stderr)
    return torch.load(out, weights_only=False)


def last_error(stderr: str) -> str:
    """The line of a process's stderr that says what went wrong: its last exception or 'error' line (a
    progress bar redrawn after a traceback comes later), else its last line."""
    lines = [line.strip() for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"[\w.]*(Error|Exception|Interrupt)\b|\S+: error", line)]
    return (errors or lines or ["?"])[-1][:200]


def grade_problem(problem: Problem, student: pathlib.Path, root: pathlib.Path, tmp: pathlib.Path, seed: int,
                  ref_out) -> dict:
    """One problem: the student's function spliced into a copy of the reference, checked in its own process."""
    result = {"points": 0.0, "max": problem.points, "bonus": problem.bonus, "failed": [], "checks": 0, "seed": seed}
    try:
        spliced = splice(problem, (student / problem.file).read_text(), (root / problem.file).read_text())
    except (OSError, SyntaxError, ValueError) as e:
        result["failed"] = [f"{problem.file}: {e}"]
        return result
    where = copy_code(root, tmp / f"student-{problem.id}")
    (where / problem.file).write_text(spliced)
    got = run_process(where, ["_outputs", f"{problem.id}={seed}", "--tests"], tmp / f"student-{problem.id}.pt")
    if isinstance(ref_out, str):
        raise RuntimeError(f"the reference process failed: {ref_out}")
    checks = [("everything", False, got)] if isinstance(got, str) else (
        [(f"test {name}", ok, detail) for name, (ok, detail) in got["tests"].items()]
        + [compare_outputs(problem.id, seed, got["outputs"][problem.id], ref_out["outputs"][problem.id])])
    passed = sum(ok for _, ok, _ in checks)
    result.update(points=round(problem.points * passed / len(checks), 2), checks=len(checks),
                  failed=[f"{name}: {detail}" for name, ok, detail in checks if not ok])
    return result


def splice(problem: Problem, student_source: str, reference_source: str) -> str:
    """The reference file with the student's function in place of the reference one, plus the top-level
    names the student ADDED to the file (imports, helper functions, constants), appended. Everything else
    in the student's file (the other problems, code the student changed elsewhere) is the reference's."""
    text = function_text(student_source, problem.qualname)
    if text is None:
        raise ValueError(f"{problem.qualname} not found")
    spliced = replace_function(reference_source, problem.qualname, text)
    known = {ast.unparse(n) for n in ast.parse(reference_source).body if isinstance(n, (ast.Import, ast.ImportFrom))}
    defined = top_level_names(reference_source)
    added = []
    lines = student_source.splitlines(keepends=True)
    for node in ast.parse(student_source).body:
        new_import = isinstance(node, (ast.Import, ast.ImportFrom)) and ast.unparse(node) not in known
        new_name = not isinstance(node, (ast.Import, ast.ImportFrom)) and (top_level_names_of(node) - defined)
        if new_import or new_name:
            first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            added.append("".join(lines[first - 1:node.end_lineno]))
    return spliced + ("\n\n# ---- added by the student ----\n" + "\n".join(added) if added else "")


def top_level_names_of(node) -> set:
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return set()


def top_level_names(source: str) -> set:
    return set().union(*(top_level_names_of(n) for n in ast.parse(source).body))


def outputs_process(seeds: dict, tests: bool, out: pathlib.Path) -> None:
    """In a graded copy (cwd): the visible tests (with --tests) and every problem's outputs on its cases."""
    import torch
    sys.path.insert(0, str(pathlib.Path.cwd()))
    problems = {p.id: p for p in find_problems(pathlib.Path.cwd())}
    result = {"tests": {}, "outputs": {}}
    for pid, seed in seeds.items():
        if tests:
            result["tests"].update(visible_tests(pid))
        fn = function_of(problems[pid])
        result["outputs"][pid] = [call(CHECKS[pid]["diff"].run, fn, case)
                                  for case in CHECKS[pid]["diff"].cases(random.Random(seed))]
    torch.save(result, out)


def visible_tests(problem_id: str) -> dict:
    """{test name: (passed, detail)}: one check per test function (all its parametrizations); a test that
    is skipped, or that the file fails to collect, is not passed."""
    import pytest

    class Collect:
        def __init__(self):
            self.outcomes = {}

        def pytest_runtest_logreport(self, report):
            name = report.nodeid.split("::")[-1].split("[")[0]
            ok, detail = self.outcomes.get(name, (True, ""))
            if report.failed or report.skipped:
                ok, detail = False, ("skipped" if report.skipped else
                                     (report.longreprtext.strip().splitlines() or ["failed"])[-1][:200])
            self.outcomes[name] = (ok, detail)

    collect = Collect()
    tests = CHECKS[problem_id]["tests"]
    pytest.main(["-q", "-p", "no:cacheprovider", "test_nsr.py", "-k", " or ".join(tests)], plugins=[collect])
    return {name: collect.outcomes.get(name, (False, "not run: the test file did not import")) for name in tests}


def function_of(problem: Problem):
    """The problem's function in the graded copy (imported the ordinary way: cwd is on sys.path)."""
    obj = importlib.import_module(problem.file[:-3])
    for part in problem.qualname.split("."):
        obj = getattr(obj, part)
    return obj


def call(run, fn, case):
    """run(fn, a fresh copy of case) -> ("ok", outputs) or ("raised", the exception type's name)."""
    import copy
    try:
        return ("ok", run(fn, copy.deepcopy(case)))
    except Exception as e:                                        # errors are part of the specification
        return ("raised", type(e).__name__)


def compare_outputs(problem_id: str, seed: int, got: list, want: list) -> tuple[str, bool, str]:
    diff = CHECKS[problem_id]["diff"]
    cases = diff.cases(random.Random(seed))
    name = f"differential: {diff.name} ({len(cases)} cases, seed {seed})"
    if len(got) != len(want):
        return name, False, "a different number of outputs"
    for i, (case, (kind, value), (ref_kind, ref_value)) in enumerate(zip(cases, got, want)):
        if kind != ref_kind or (kind == "raised" and value != ref_value):
            what = f"raised {value}" if kind == "raised" else "returned"
            return name, False, f"case {i} ({short(case)}): {what} where the reference " + \
                (f"raised {ref_value}" if ref_kind == "raised" else "returned")
        if kind == "ok":
            try:
                same = diff.same(value, ref_value, case)
            except Exception as e:                                # outputs of the wrong kind or shape
                same = False
            if not same:
                return name, False, f"case {i} ({short(case)}): a different result"
    return name, True, ""


# =================================================================================================
# CHECKS: per problem, the visible tests and the differential check (cases -> run -> same)
# =================================================================================================

@dataclass
class Diff:
    """A differential check: cases(rng) draws the inputs (identically in every process, from one seed);
    run(fn, case) calls a function on one case and returns what is compared (values AND, where the
    function carries a gradient, the gradient); same(got, want, case) compares the student's outputs with
    the reference's."""
    name: str
    cases: object
    run: object
    same: object


def close(a, b, kind="float64", atol_scale: float = 1.0) -> bool:
    """Tensors of the same shape and dtype, or numbers, equal within TOLERANCE[kind] (atol x atol_scale)."""
    import torch
    tol = dict(TOLERANCE[kind], atol=TOLERANCE[kind]["atol"] * atol_scale)
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and bool(torch.allclose(a, b, equal_nan=True, **tol)))
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and math.isclose(a, b, rel_tol=tol["rtol"], abs_tol=tol["atol"])
    return a == b


def short(case) -> str:
    import torch
    if not isinstance(case, dict) or "writes" in case:
        return "a sequence of cache writes"
    return ", ".join(f"{k}={tuple(v.shape) if isinstance(v, torch.Tensor) else v!r}"[:60] for k, v in case.items())


def generator(rng: random.Random):
    import torch
    return torch.Generator().manual_seed(rng.randrange(2 ** 31))


def call_with_grad(fn, case: dict, leaf: str) -> tuple:
    """fn(**case) with case[leaf] a leaf that requires grad -> (outputs..., d(sum of the floating tensor
    outputs) / d leaf): the value and what backpropagates, both compared."""
    import torch
    x = case[leaf].detach().clone().requires_grad_(True)
    out = fn(**{**case, leaf: x})
    outs = out if isinstance(out, tuple) else (out,)
    total = sum(o.sum() for o in outs if isinstance(o, torch.Tensor) and o.is_floating_point())
    grad = torch.autograd.grad(total, x, allow_unused=True)[0]
    return tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in outs) + \
        (grad if grad is not None else torch.zeros_like(x),)


def logit_scale(logits, temperature) -> float:
    """How large the (tempered) logits are: right fp32 formulas of an entropy or a log-softmax differ by
    about float32's epsilon times this, so the fp32 atol grows with it."""
    return max(1.0, float(logits.abs().max()) / (temperature or 1.0))


# ---- the cases of each problem ----

def cases_weights(rng):
    out = []
    for _ in range(DIFF_CASES):
        G, B = rng.randint(1, 8), rng.randint(1, 6)
        rewards = [float(rng.random() < rng.random()) for _ in range(B * G)]
        if rng.random() < 0.1:
            rewards[0] = 0.5                                      # not a reward: a ValueError
        out.append(dict(rewards=rewards, objective=rng.choice(["psr", "nsr", "w-reinforce", "reinforce", "grpo",
                                                               "grpo", "ppo", "dpo"]),
                        lam=rng.choice([0.0, 0.1, rng.random()]), group_size=G if rng.random() < 0.9 else G + 1))
    return out


def cases_policy_loss(rng):
    import torch
    out = []
    for _ in range(DIFF_CASES):
        g = generator(rng)
        N, T = rng.randint(1, 5), rng.randint(1, 6)
        old = -torch.rand(N, T, generator=g, dtype=torch.float64) * 3
        logp = (old + torch.randn(N, T, generator=g, dtype=torch.float64) * 0.4).clamp(max=0)
        weights = torch.randn((N, T) if rng.random() < 0.3 else (N,), generator=g, dtype=torch.float64)
        weights[torch.rand(weights.shape, generator=g) < 0.3] = 0.0
        low, high = rng.choice([(0.2, 0.2), (0.1, 0.3), (0.2, 0.0), (0.0, 0.2), (0.0, 0.0), (0.28, 0.2)])
        out.append(dict(logp=logp, weights=weights, mask=(torch.rand(N, T, generator=g) < 0.8).double(),
                        normalizer=float(rng.randint(1, 20)), old_logp=None if rng.random() < 0.2 else old,
                        clip_low=low, clip_high=high))
    return out


def cases_kl_penalty(rng):
    import torch
    out = []
    for _ in range(DIFF_CASES):
        g = generator(rng)
        N, T, scale = rng.randint(1, 4), rng.randint(1, 6), rng.choice([0.3, 3.0, 40.0])   # 40: the clamps act
        out.append(dict(logp=torch.randn(N, T, generator=g, dtype=torch.float64) * scale,
                        ref_logp=torch.randn(N, T, generator=g, dtype=torch.float64) * scale,
                        mask=(torch.rand(N, T, generator=g) < 0.8).double(), num_tokens=float(rng.randint(1, 30))))
    return out


def cases_normalizer(rng):
    import torch
    out = []
    for _ in range(DIFF_CASES):
        g, N = generator(rng), rng.randint(1, 8)
        weights = torch.randn((N, rng.randint(1, 5)) if rng.random() < 0.3 else (N,), generator=g)
        weights[torch.rand(weights.shape, generator=g) < 0.5] = 0.0
        out.append(dict(weights=weights, lengths=[rng.randint(1, 50) for _ in range(N)],
                        mode=rng.choice(["tokens", "micro", "weighted", "constant", "tokenz"]), max_new_tokens=rng.randint(1, 64)))
    return out


def cases_logprobs(rng):
    import torch
    out = []
    for _ in range(DIFF_CASES):
        g = generator(rng)
        n, R, V = rng.randint(1, 3), rng.randint(1, 5), rng.randint(2, 40)
        logits = torch.randn(n, R, V, generator=g) * rng.choice([0.5, 3, 20])
        out.append(dict(logits=logits.to(rng.choice([torch.float32, torch.float64])),
                        targets=torch.randint(0, V, (n, R), generator=g),
                        temperature=rng.choice([1.0, 0.6, 1.7]), with_entropy=rng.random() < 0.7))
    return out


def cases_decode_step(rng):
    import torch
    out = []
    for _ in range(DIFF_CASES):
        g = generator(rng)
        b, V = rng.randint(1, 6), rng.randint(2, 60)
        out.append(dict(logits=torch.randn(b, V, generator=g) * rng.choice([0.5, 2.0, 8.0]),
                        temperature=rng.choice([0.0, 1.0, 1.0, 0.7, 1.4]), top_p=rng.choice([1.0, 1.0, 0.9, 0.5]),
                        eos=torch.tensor(rng.sample(range(V), rng.randint(1, 2))), seed=rng.randrange(2 ** 31)))
    return out


def cases_kv_cache(rng):
    import torch
    out = []
    for _ in range(DIFF_CASES):
        g = generator(rng)
        B, H, hd, layers, P, steps = (rng.randint(1, 3), rng.randint(1, 3), rng.randint(1, 4), rng.randint(1, 3),
                                      rng.randint(1, 5), rng.randint(1, 4))
        writes = [(slot, S, layer, torch.randn(B, H, S, hd, generator=g), torch.randn(B, H, S, hd, generator=g))
                  for slot, S in [(0, P)] + [(P + t, 1) for t in range(steps)] for layer in range(layers)]
        out.append({"shape": (B, H, P + steps, hd), "layers": layers, "writes": writes})
    return out


def cases_pass_at_k(rng):
    import numpy as np
    out = []
    for _ in range(DIFF_CASES * 5):
        n = rng.choice([1, 2, 10, 64, 256, rng.randint(1, 600)])
        out.append(dict(n=n, c=rng.randint(0, n), k=rng.randint(1, n)))
    return out + [dict(n=5, c=6, k=1), dict(n=5, c=2, k=6), dict(n=0, c=0, k=1), dict(n=4.0, c=1, k=1),
                  dict(n=np.int64(8), c=np.int64(3), k=2), dict(n=4, c=-1, k=1)]


def cases_boxed(rng):
    import verifier
    pieces = ["1", "x", "{", "}", "\\{", "\\}", " ", "\\frac{1}{2}", "-3", ".", "ab", "{a}{b}", "\\sqrt{2}", "\n"]
    out = []
    while len(out) < DIFF_CASES * 5:
        body = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 8)))
        text = (rng.choice(["", "so ", "x = "]) + rng.choice(["\\boxed", "\\fbox"])
                + rng.choice(["{", " {", "  ", " ", "", "{ "]) + body + rng.choice(["}", "}}", "", "} end", "}."]))
        if rng.random() < 0.05:
            text = "\\boxed{" + "1" * (verifier.MAX_ANSWER_CHARS + rng.randint(-2, 2)) + "}"
        m = verifier._BOX_RE.search(text)
        if m:                                                     # ("\\boxedab" names no box)
            out.append(dict(text=text, start=m.start(), end_of_name=m.end()))
    return out


def cases_gae(rng):
    import torch
    out = []
    for _ in range(DIFF_CASES):
        g = generator(rng)
        N, T = rng.randint(1, 4), rng.randint(1, 7)
        lengths = torch.randint(1, T + 1, (N,), generator=g)
        out.append(dict(rewards=torch.randn(N, T, generator=g, dtype=torch.float64),
                        values=torch.randn(N, T, generator=g, dtype=torch.float64),
                        mask=(torch.arange(T)[None, :] < lengths[:, None]).double(),
                        gamma=rng.choice([1.0, 0.9, 0.5]), gae_lam=rng.choice([1.0, 0.95, 0.0])))
    return out


# ---- how each problem's function is called, and compared ----

def run_kv_cache(update, case):
    """A cache object with the reference's layout and a sequence of writes: what each write reads back,
    whether it is a view of the cache, the filled count, and the final contents."""
    import torch
    import sample
    cache = object.__new__(sample.KVCache)
    cache.k = [torch.zeros(case["shape"]) for _ in range(case["layers"])]
    cache.v = [torch.zeros(case["shape"]) for _ in range(case["layers"])]
    cache.filled = 0
    reads = []
    for slot, S, layer, k, v in case["writes"]:
        keys, values = update(cache, layer, slot, k, v)
        reads.append((keys.clone(), values.clone(), keys.data_ptr() == cache.k[layer].data_ptr(), cache.filled))
    return reads, cache.k, cache.v


def run_decode_step(fn, case):
    import torch
    return fn(case["logits"], case["temperature"], case["top_p"], case["eos"],
              torch.Generator().manual_seed(case["seed"]))


def same_all(kind="float64"):
    return lambda got, want, case: len(got) == len(want) and all(close(a, b, kind) for a, b in zip(got, want))


def same_policy_loss(got, want, case):
    import torch
    (loss, clipped, grad), (ref_loss, ref_clipped, ref_grad) = got, want
    return close(loss, ref_loss) and clipped.dtype == torch.bool and torch.equal(clipped, ref_clipped) \
        and close(grad, ref_grad)


def same_logprobs(got, want, case):
    scale = logit_scale(case["logits"], case["temperature"])
    return len(got) == len(want) and all(close(a, b, "float32", scale) for a, b in zip(got, want))


def same_decode_step(got, want, case):
    import torch
    ids, logq, entropy, ends = got
    scale = logit_scale(case["logits"], case["temperature"])
    return (torch.equal(ids, want[0]) and close(logq, want[1], "float32", scale)
            and close(entropy, want[2], "float32", logit_scale(case["logits"], 1.0)) and torch.equal(ends, want[3]))


def same_kv_cache(got, want, case):
    import torch
    (reads, k, v), (ref_reads, ref_k, ref_v) = got, want
    return len(reads) == len(ref_reads) and all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2] and a[3] == b[3]
        for a, b in zip(reads, ref_reads)) and all(torch.equal(a, b) for a, b in zip(k + v, ref_k + ref_v))


def plain(fn, case):
    return fn(**case)


CHECKS = {        # in the handout's order: each problem's visible tests use only the problems above it
    "pass_at_k": {"tests": ["test_pass_at_k_equals_brute_force_enumeration_over_all_k_subsets",
                            "test_pass_at_k_matches_exact_binomial_fractions_for_random_n_up_to_512",
                            "test_pass_at_k_is_unbiased_under_binomial_sampling_while_the_plug_in_estimate_is_not",
                            "test_pass_at_k_edge_cases_c_zero_c_n_k_n_and_pass_at_1_is_c_over_n",
                            "test_pass_at_k_rejects_bad_arguments_with_a_clear_value_error"],
                  "diff": Diff("random n, c, k up to 600, errors included", cases_pass_at_k, plain,
                               lambda a, b, case: isinstance(a, float) and close(a, b))},
    "boxed": {"tests": ["test_verifier_extracts_the_last_complete_box_or_the_final_answer_phrase_and_nothing_else",
                        "test_verifier_reads_an_unboxed_final_answer_phrase_and_the_last_box_of_a_very_long_response",
                        "test_verifier_accepts_every_notation_of_the_same_answer_in_both_directions",
                        "test_verifier_fuzz_gives_the_known_answer_and_is_symmetric_and_reflexive_on_random_strings",
                        "test_verifier_work_on_an_adversarial_input_at_most_doubles_when_the_input_doubles"],
              "diff": Diff("random boxes: nesting, escapes, shorthand, unclosed, too long", cases_boxed, plain,
                           lambda a, b, case: a == b)},
    "weights": {"tests": ["test_sample_weights_table_for_every_objective_including_grpo_all_correct_and_all_wrong_groups",
                          "test_sample_weights_rejects_unknown_objectives_bad_rewards_and_bad_grpo_groups"],
                "diff": Diff("weights of every objective, errors included", cases_weights, plain,
                             lambda a, b, case: close(a, b, "float32"))},
    "policy_loss": {"tests": ["test_loss_gradient_wrt_logits_equals_the_closed_form_for_psr_nsr_and_w_reinforce",
                              "test_nsr_gradient_step_lowers_the_sampled_logit_and_raises_the_others_in_proportion_to_their_probability",
                              "test_clipped_loss_at_ratio_one_has_the_same_gradient_as_the_unclipped_loss",
                              "test_the_clipped_surrogate_gradient_vanishes_exactly_where_ppos_does_on_each_side",
                              "test_clip_fractions_count_by_the_sign_of_the_weight_the_tokens_whose_gradient_the_clip_zeroed"],
                    "diff": Diff("loss, clipped tokens and gradient, both clip sides", cases_policy_loss,
                                 lambda fn, case: call_with_grad(fn, case, "logp"), same_policy_loss)},
    "logprobs": {"tests": ["test_token_logprobs_are_the_tempered_log_softmax_at_the_targets_and_its_entropy"],
                 "diff": Diff("log-probs, entropy and their gradient, any dtype and temperature", cases_logprobs,
                              lambda fn, case: call_with_grad(fn, case, "logits"), same_logprobs)},
    "normalizer": {"tests": ["test_loss_normalizer_counts_every_response_token_as_the_official_token_mean",
                             "test_gradients_with_micro_batch_size_one_equal_the_full_batch_gradients"],
                   "diff": Diff("Z of both modes, per-token weights, errors", cases_normalizer, plain,
                                lambda a, b, case: isinstance(a, float) and a == b)},
    "kl_penalty": {"tests": ["test_entropy_bonus_and_kl_penalty_values_and_gradients_on_a_hand_made_case",
                             "test_the_step_subtracts_the_entropy_bonus_and_adds_the_kl_term_as_token_means_over_the_mini_batch"],
                   "diff": Diff("value and gradient, clamps included", cases_kl_penalty,
                                lambda fn, case: call_with_grad(fn, case, "logp"), same_all())},
    "kv_cache": {"tests": ["test_our_forward_with_our_kv_cache_equals_transformers_full_forward_on_a_left_padded_batch",
                           "test_our_forward_feeding_several_tokens_on_top_of_the_cache_equals_one_at_a_time"],
                 "diff": Diff("prefill and steps: what is written, what is read, views", cases_kv_cache,
                              run_kv_cache, same_kv_cache)},
    "decode_step": {"tests": ["test_generate_with_a_fixed_generator_reproduces_the_same_samples",
                              "test_generate_stops_each_row_at_its_first_eos_and_reports_truncation",
                              "test_greedy_generate_matches_transformers_generate_token_for_token",
                              "test_generate_logprobs_equal_a_fresh_forward_pass_under_the_sampling_distribution",
                              "test_generate_without_its_speed_tricks_gives_the_same_rollouts_as_with_them"],
                    "diff": Diff("tokens, log q, entropy and EOS under every temperature and top-p", cases_decode_step,
                                 run_decode_step, same_decode_step)},
    "gae": {"tests": ["test_gae_equals_a_hand_computed_example_and_the_return_minus_value_at_gamma_lam_one"],
            "diff": Diff("advantages and returns, any gamma and lambda, ragged rows", cases_gae, plain, same_all())},
}


# =================================================================================================
# RESULTS: the student's whole copy trains the toy; its outcome is scored in tiers
# =================================================================================================

# The student's WHOLE copy (every function theirs) runs the main job's training, NSR on the toy base of
# RESULT_SEED, with one fixed training seed; what it measures is scored against the reference's spread
# over RESULT_SEEDS training seeds (`python assignment.py calibrate`, which prints RESULT_TIERS):
#   full     easy Pass@1 gain >= the reference's lowest gain - 3 points, and the final rollout entropy
#            within the reference's range widened by half of it on each side (neither collapsed nor exploded)
#   partial  easy Pass@1 gain >= 5 points (it learns)
#   none     anything else, or the run failed
# A different floating-point order makes a student's run diverge from the reference's, so a result is
# judged by the reference's seed-to-seed spread, not by one reference number.
RESULT_SEED, RESULT_SEEDS, RESULT_POINTS = 0, (0, 1, 2, 3, 4), {"full": 10.0, "partial": 5.0, "none": 0.0}
RESULT_TIMEOUT = 900         # seconds; the reference's run took 23-28 s here (2 cores, the base built)
# Measured for toy-v8 (`python assignment.py calibrate`, 2026-12-05: gains 45.6 45.1 45.5 44.6 45.1 points,
# final entropies 0.039 0.033 0.032 0.032 0.045, 23-28 s a run). None = results grading not offered.
RESULT_TIERS = {"gain": [44.60, 45.61], "entropy": [0.0320, 0.0449]}


def result_run(code: pathlib.Path, out: pathlib.Path, seed: int) -> dict:
    """The main job's NSR training (nsr.TOY_DEFAULTS) with the code at `code` -> {"gain", "entropy"}."""
    import nsr
    import toy
    base = toy.ensure_base(HERE / toy.base_dir(RESULT_SEED), toy.ToyRecipe(seed=RESULT_SEED))
    args = [f"--{k.replace('_', '-')}={v}" for k, v in nsr.TOY_DEFAULTS.items() if k != "out_dir"]
    args += ["--model", str(base), "--train", str(base / "train.jsonl"), "--eval", str(base / "test_easy.jsonl"),
             "--objective", "nsr", "--seed", str(seed), "--out-dir", str(out)]
    try:
        proc = subprocess.run([sys.executable, str(code / "nsr.py"), *args], cwd=code, capture_output=True,
                              text=True, timeout=RESULT_TIMEOUT)
    except subprocess.TimeoutExpired:
        return {"error": f"the training run took over {RESULT_TIMEOUT} s"}
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()] if proc.returncode == 0 else []
    if len(evals) < 2:
        return {"error": last_error(proc.stderr)}
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"gain": 100 * (evals[-1]["pass@1"] - evals[0]["pass@1"]), "entropy": metrics[-1]["entropy"]}


def grade_results(student: pathlib.Path) -> dict:
    if RESULT_TIERS is None:
        return {"points": 0.0, "max": 0.0, "tier": None, "failed": ["not graded: RESULT_TIERS not measured for this toy"]}
    with tempfile.TemporaryDirectory(prefix="results-") as tmp:
        got = result_run(copy_code(student, pathlib.Path(tmp) / "code"), pathlib.Path(tmp) / "run", RESULT_SEED)
    lo, hi = RESULT_TIERS["entropy"]
    min_gain, entropy_lo, entropy_hi = RESULT_TIERS["gain"][0] - 3, lo - (hi - lo) / 2, hi + (hi - lo) / 2
    if "error" in got:
        tier = "none"
    elif got["gain"] >= min_gain and entropy_lo <= got["entropy"] <= entropy_hi:
        tier = "full"
    else:
        tier = "partial" if got["gain"] >= 5 else "none"
    why = [] if tier == "full" else [got["error"] if "error" in got else
                                     f"tier {tier}: easy Pass@1 gain {got['gain']:.1f} (full: >= {min_gain:.1f}), "
                                     f"final entropy {got['entropy']:.4f} (full: {entropy_lo:.4f}-{entropy_hi:.4f})"]
    return {"points": RESULT_POINTS[tier], "max": RESULT_POINTS["full"], "tier": tier, "measured": got, "failed": why}


def calibrate() -> dict:
    """The reference's spread over RESULT_SEEDS training seeds: what RESULT_TIERS is set from."""
    runs_ = []
    with tempfile.TemporaryDirectory(prefix="calibrate-") as tmp:
        for seed in RESULT_SEEDS:
            start = time.time()
            runs_.append(result_run(HERE, pathlib.Path(tmp) / f"run-{seed}", seed))
            print(f"  training seed {seed}: {runs_[-1]} ({time.time() - start:.0f} s)", flush=True)
            if "error" in runs_[-1]:
                raise SystemExit(f"calibrate: the reference's run of training seed {seed} failed: {runs_[-1]['error']}")
    return {key: [min(r[key] for r in runs_), max(r[key] for r in runs_)] for key in ("gain", "entropy")}


# =================================================================================================
# SUBMIT
# =================================================================================================

def submit(student: pathlib.Path) -> pathlib.Path:
    """student/submission.zip: the files changed since the handout, WRITEUP.md, and every run's config.json,
    metrics.jsonl, eval.jsonl and eval/*.json (no checkpoint, no model)."""
    manifest = json.loads((student / ".handout.json").read_text()) if (student / ".handout.json").is_file() else {}
    edited = [name for name in project_files_in(student) if manifest.get(name) != sha256(student / name)
              and name != "WRITEUP.md" and (student / name).stat().st_size <= MAX_SUBMITTED_BYTES]
    logs = [str(p.relative_to(student)) for p in sorted((student / "runs").rglob("*")) if p.is_file()
            and (p.name in ("config.json", "metrics.jsonl", "eval.jsonl", "summary.json")
                 or (p.parent.name == "eval" and p.suffix == ".json"))
            and not any(part.startswith("checkpoint-") or part.startswith("toy-base") for part in p.parts)
            and p.stat().st_size <= MAX_SUBMITTED_BYTES] if (student / "runs").is_dir() else []
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

Do them in this order: each one's visible tests (the command in its row) use only the problems above it; the grader runs them and a differential check of your function
against the reference on {cases} fresh random inputs per check (so hard-coding the visible tests' answers
does not pass), each problem in isolation: a bug in one costs points in that one only.

| # | id | where | points | what | visible tests |
|---|---|---|---|---|---|
{rows}

Tolerances: float64 inputs compared with rtol {rtol64:g} and atol {atol64:g}; the fp32 functions (`logprobs`,
`decode_step`) with rtol {rtol32:g} and atol {atol32:g} times max(1, the largest |logit| / T) (right fp32
formulas differ by about that); token ids, masks and the type of every error exactly. An error the
docstring asks for (a `ValueError` for bad input) must be raised where the reference raises it.

The grader takes your function from its file (with any import, helper function or constant you ADD to that
file at the top level); every other function comes from the reference, so a change you make elsewhere is
not graded, and a bug in one problem costs points in that problem only.

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

WRITEUP_QUESTIONS = """\
Q1. The token-level gradient (the paper's gradient analysis). For L = -w log softmax(z)_y, derive dL/dz_v for
    every token v. Say in one sentence each what one PSR step (w = +1) and one NSR step (w = -1) do to the
    sampled token and to every other one, and where NSR's freed probability goes. Check your derivation
    against the last row of `python nsr.py --demo-gradient` ({t_demo}).

Q2. PSR, NSR and W-REINFORCE on the toy (findings a, b, d).
    `python reproduce.py --methods psr nsr w-reinforce --seeds 0 --out runs/q2` ({t_q2}).
    Report Pass@1, Pass@16 and Pass@256 on both splits, the coverage table (kept / lost / gained) and the
    test entropies. Which of the paper's findings (a), (b), (d) does this run support, and how strongly
    (its verdicts and their intervals)? Which problems did PSR lose at k = 256 that the base solves?

Q3. lambda. `python reproduce.py --methods w-reinforce --seeds 0 --sweep lam=0,0.5,1 --out runs/q3`
    ({t_q3}). How do Pass@1 and Pass@256 move with lambda (0.1 is the unswept row)? The paper's authors
    chose 0.1 "empirically"; what does your sweep suggest for this toy, and why might a weak base need a
    larger lambda?

Q4. Clipping and mini-batches (the official repository's issue #6: NSR's gains "only appear when
    batch_size > ppo_mini_batch_size and PPO's ratio clipping is enabled").
    `python reproduce.py --methods psr nsr --seeds 0 --sweep clip_eps=0 --sweep clip_low=0
    --sweep clip_high=0 --sweep mini_batch_size=none --out runs/q4` ({t_q4}).
    Some rows are identical to the digit: which, and why (which side of the clip does each objective
    ever meet)? What do clipping and the number of optimizer steps per batch change for PSR and for NSR?

Q5. The normaliser. `python reproduce.py --methods psr nsr --seeds 0 --sweep normalizer=constant
    --out runs/q5` ({t_q5}). What does a token mean over the weighted samples do that a constant does
    not (think of PSR when few samples are right)?

Q6. Uncertainty (no run). From runs/q2/summary.json: what does an "inconclusive" verdict mean, and what
    would make it conclusive? Why does reproduce.py resample recipe seeds, problems and training seeds
    separately, and why are the two test splits of one run never two independent units?

All six together: {t_total} on 2 CPU cores (measured; the toy bases are built once and cached)."""

# Each question's wall time, measured on 2 CPU cores (2026-12-05, toy-v8) with the toy base of recipe seed 0
# already built (docs/assignment.md has the commands).
WRITEUP_TIMES = {"t_demo": "5 s", "t_q2": "115 s", "t_q3": "120 s", "t_q4": "220 s", "t_q5": "105 s",
                 "t_total": "about 9.5 minutes (565 s)"}

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
    sub.add_parser("calibrate", help="measure the reference's results over several seeds (RESULT_TIERS)")
    sp = sub.add_parser("_outputs", help=argparse.SUPPRESS)           # a grading process (GRADE above)
    sp.add_argument("seeds", nargs="+", metavar="ID=SEED")
    sp.add_argument("--tests", action="store_true")
    sp.add_argument("--out", type=pathlib.Path, required=True)
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
            result["problems"]["results"] = grade_results(args.dir) | {"bonus": False, "seed": RESULT_SEED}
            result["total"] += result["problems"]["results"]["points"]
            result["max"] += result["problems"]["results"]["max"]
        print(format_grade(result))
        print(f"graded in {time.time() - start:.0f} s")
        if args.json:
            print(json.dumps({"total": result["total"], "max": result["max"],
                              "problems": {k: {"points": v["points"], "max": v["max"]}
                                           for k, v in result["problems"].items()}}))
    elif args.command == "submit":
        print(f"wrote {submit(args.dir)}")
    elif args.command == "calibrate":
        print(f"RESULT_TIERS = {json.dumps(calibrate())}")
    else:
        outputs_process({k: int(v) for k, v in (item.split("=") for item in args.seeds)}, args.tests, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
