"""
assignment.py -- the course assignment kit: a handout, an exact grader, a submission. All on a laptop CPU.

    python assignment.py handout DIR               # a student copy in DIR: every PROBLEM's body is a stub
    python assignment.py check [DIR]               # (students) every problem's visible tests, problem by problem
    python assignment.py grade DIR [--json]        # grade the copy at DIR against this checkout, problem by problem
    python assignment.py grade DIR --gradescope F  # ... and write F in Gradescope's results.json format
    python assignment.py grade DIR --results       # also re-run the student's seeded toy training, scored in tiers
    python assignment.py gradescope OUT.zip        # Gradescope's autograder: setup.sh, run_autograder, the kit
    python assignment.py submit DIR                # DIR/submission.zip: edited files, WRITEUP.md, the runs' logs

PROBLEMS are marked in the source in ONE style, read here by find_problems():

    # PROBLEM <id> (<n> points): <title>          (or "<n> bonus points"); <id> is the function's name
    def the_function(...):                         (a module function, or a method of a class)

The handout keeps each such function's signature and docstring (the specification) and replaces its body
with `raise NotImplementedError("<id>: see HANDOUT.md")`. CHECKS below holds, per problem, its visible
tests (in test_nsr.py) and its differential check (the student's function against this checkout's on
fresh random inputs).

GRADING, EACH PROBLEM IN ISOLATION. For problem P the grader copies this checkout's code to a temporary
directory, puts the student's version of P's function in place of the reference one (every other problem
keeps the reference), and runs, in a fresh process under a runtime guard: (1) P's visible tests from THIS
checkout's test_nsr.py as the handout has it (a student cannot weaken them), one check per test function;
(2) P's differential check on fresh random cases, from a new seed every run (printed), so answers cannot
be memorised. Points = P's maximum x checks passed / checks. A bug in P costs points in P only; a syntax
error costs only the functions it breaks. The differential checks' tolerances are each Diff's (TOLERANCE
below: float64 inputs where the function is dtype-agnostic; the fp32 functions with an atol that grows
with the logits' size, logit_scale); indices, masks and error types are compared exactly. Code that
reaches for the reference (an import, a file, a process, code made at run time) scores 0 and is flagged:
the layers are listed under GRADE below.
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
MARKER = re.compile(r"^(\s*)# PROBLEM ([\w.]+) \((\d+(?:\.\d+)?) (bonus )?points?\): (.+)$")
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
    """Every `# PROBLEM` marker of the source files under root, in file order; the function on the next line
    (read from the text, so a file with a syntax error elsewhere still names its problems)."""
    problems = []
    for name in SOURCES:
        lines = (root / name).read_text().splitlines()
        for i, line in enumerate(lines):
            m = MARKER.match(line)
            if m:
                qualname = def_name(lines, i + 1)              # the def right after the marker
                if qualname is None:
                    raise ValueError(f"{name}:{i + 1}: a PROBLEM marker must sit right above a def")
                problems.append(Problem(m.group(2), name, qualname, float(m.group(3)), bool(m.group(4)), m.group(5)))
    return problems


def def_name(lines: list[str], i: int) -> str | None:
    """The qualname of the def on lines[i] ("Class.method" for an indented def under `class Class`), or None."""
    m = re.match(r"^(\s*)(?:async )?def (\w+)\s*\(", lines[i]) if i < len(lines) else None
    if m is None:
        return None
    if not m.group(1):
        return m.group(2)
    scope = next((c.group(1) for line in reversed(lines[:i]) if (c := re.match(r"class (\w+)", line))), None)
    return f"{scope}.{m.group(2)}" if scope else None


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
    """HANDOUT.md: the problems and how they are graded, every number read from the code (CHECKS, the
    cases' counts, TOLERANCE, the measured times)."""
    problems = in_grading_order(problems)
    fmt = dict(rtol64=TOLERANCE["float64"]["rtol"], atol64=TOLERANCE["float64"]["atol"],
               rtol32=TOLERANCE["float32"]["rtol"], atol32=TOLERANCE["float32"]["atol"])
    rows, commands = [], []
    for i, p in enumerate(problems, start=1):
        diff, tests = CHECKS[p.id]["diff"], CHECKS[p.id]["tests"]
        rows.append(f"| {i} | `{p.id}` | `{p.file}` | {p.points:g}{' (bonus)' if p.bonus else ''} | {len(tests)} | "
                    f"1 ({len(diff.cases(random.Random(0)))} random cases) | {diff.tolerance_text.format(**fmt)} | "
                    f"{GRADE_SECONDS.get(p.id, '?')} s | {p.title} |")       # (a busy machine's: see above)
        commands.append(f"    python -m pytest -q test_nsr.py -k \"{' or '.join(tests)}\"      # {i}. {p.id}")
    total = sum(p.points for p in problems if not p.bonus)
    bonus = sum(p.points for p in problems if p.bonus)
    return HANDOUT.format(rows="\n".join(rows), commands="\n".join(commands), total=f"{total:g}", bonus=f"{bonus:g}",
                          writeup_questions=WRITEUP_QUESTIONS.format(**WRITEUP_TIMES), **GRADING_TIMES,
                          imports=", ".join(f"`{m}`" for m in sorted(ALLOWED_IMPORTS)),
                          banned=", ".join(f"`{n}`" for n in sorted(BANNED_NAMES)), **fmt)


# =================================================================================================
# GRADE: each problem in its own copy of the reference, in its own process
# =================================================================================================
#
# Three kinds of process, none of which sees another's code:
#   the grader (this process)  makes the copies, compares the outputs, adds up the points;
#   one REFERENCE process      in a pristine copy of this checkout, in a temporary directory deleted before
#                              any student process starts: the reference outputs of every problem, which the
#                              grader keeps as data (they never enter a student process);
#   one STUDENT process per problem, in a copy of this checkout where only that problem's function (and the
#                              top-level names the student added to its file) come from the student: the
#                              visible tests (the handout's copy of test_nsr.py: its cut regions, reference
#                              code, are not there), then the outputs of the student's function on the inputs.
# The inputs are regenerated from the seed in each process and every call gets a fresh copy, so a function
# that edits its inputs in place changes nothing for the other side.
#
# CHEATING, IN LAYERS. A student function that imports, reads or runs the reference instead of computing the
# answer scores 0 for its problem and the report flags it:
#   1. a static check (static_check) of the student's code before anything runs: imports outside
#      ALLOWED_IMPORTS, the builtins that load or run code (BANNED_NAMES) and the attributes that reach
#      modules, frames, files or code (BANNED_ATTRIBUTES), each named with its line;
#   2. the student process holds no reference of its problem: not in its directory (its problem's function is
#      the student's), not beside it (the reference copy is gone, the other problems' directories have
#      random names), not in its test file (the cut regions are cut);
#   3. a runtime guard (install_guard, PEP 578 audit hooks) installed after torch, numpy, transformers and
#      pytest are imported and warmed up and before any of the student's code is: opening a file outside
#      the problem's directory and the Python installation, starting a process, opening a socket, and
#      compile/exec called from the graded code raise, and the grader flags the problem;
#   4. run as root (Gradescope), the student process runs as an unprivileged user (GRADE_USER) and every
#      directory but its own is root's, mode 700: the autograder's files are unreadable to it. Not root, or
#      no Python that user may run: the same user as the grader, said in the report (`isolation`).

CODE = (*SOURCES, "why.py", "loading.py", "toy.py", "presets.py", "precision.py", "runs.py", "settings.py",
        "reproduce.py",
        "test_nsr.py", "pytest.ini", "assignment.py")
GRADE_USER = os.environ.get("ASSIGNMENT_GRADE_USER", "nobody")      # who runs a student's code when root grades
FLAG = "ASSIGNMENT-GUARD:"                                          # how a guarded process reports a violation


def grade(student: pathlib.Path, root: pathlib.Path = HERE, only=None, jobs: int = 2) -> dict:
    """{"total", "max", "isolation", "problems": {id: {"points", "max", "bonus", "failed": [...], "flagged":
    [...], "checks", "seed"}}}, the problems in grading order (CHECKS')."""
    if (root / ".handout.json").is_file():
        raise SystemExit("assignment.py: error: this is a handout, not the reference: grading compares with the "
                         "reference checkout; `python assignment.py check .` runs your visible tests (HANDOUT.md)")
    problems = [p for p in in_grading_order(find_problems(root)) if not only or p.id in only]
    seeds = {p.id: secrets.randbits(32) for p in problems}            # fresh inputs every run
    with tempfile.TemporaryDirectory(prefix="grade-reference-") as tmp:
        reference = copy_code(root, pathlib.Path(tmp) / "code")
        ref_out, _ = run_process(reference, ["_outputs", *seeds_args(seeds)], pathlib.Path(tmp) / "reference.pt")
    if isinstance(ref_out, str):
        raise RuntimeError(f"the reference process failed: {ref_out}")
    user, isolation = unprivileged_user()
    with tempfile.TemporaryDirectory(prefix="grade-") as tmp:
        tmp = pathlib.Path(tmp)
        os.chmod(tmp, 0o711)                    # the student's user may enter its own directory, list none
        with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(lambda p: grade_problem(p, student, root, tmp, seeds[p.id], ref_out, user),
                                    problems))
    out = {"total": 0.0, "max": 0.0, "isolation": isolation, "problems": {}}
    for p, r in zip(problems, results):
        out["problems"][p.id] = r
        out["total"] += r["points"]
        out["max"] += 0 if p.bonus else p.points
    out["total"] = round(out["total"], 2)
    return out


def in_grading_order(problems: list[Problem]) -> list[Problem]:
    """CHECKS' order (each problem's visible tests use only the problems above it): the handout's table,
    the grade table and Gradescope's tests list the problems in it."""
    return sorted(problems, key=lambda p: list(CHECKS).index(p.id) if p.id in CHECKS else len(CHECKS))


def seeds_args(seeds: dict) -> list[str]:
    return [f"{pid}={seed}" for pid, seed in seeds.items()]


def copy_code(root: pathlib.Path, dest: pathlib.Path, handout_tests: bool = False) -> pathlib.Path:
    """The project's code at dest; with handout_tests, test_nsr.py as the handout has it (cut regions cut)."""
    dest.mkdir(parents=True)
    for name in CODE:
        shutil.copy(root / name, dest / name)
        if handout_tests and name == "test_nsr.py":
            (dest / name).write_text(strip_cuts((root / name).read_text()))
    return dest


def unprivileged_user() -> tuple[int | None, str]:
    """(the uid to run student code as, or None; a sentence saying how student code is isolated)."""
    import pwd
    if os.geteuid() != 0:
        return None, "same user as the grader (not root: no user to drop to); runtime guard and static check"
    try:
        uid = pwd.getpwnam(GRADE_USER).pw_uid
    except KeyError:
        return None, f"as root: no user {GRADE_USER!r} (ASSIGNMENT_GRADE_USER); runtime guard and static check"
    try:
        probe = subprocess.run([sys.executable, "-c", "import torch, pytest"], capture_output=True, user=uid,
                               group=pwd.getpwnam(GRADE_USER).pw_gid, extra_groups=[], cwd="/", env=clean_env("/"))
    except OSError:                                       # it may not even execute the interpreter
        probe = None
    if probe is None or probe.returncode != 0:
        return None, (f"as root: user {GRADE_USER} cannot run {sys.executable} with torch (a Python installed "
                      f"under a private directory?); runtime guard and static check")
    readable = HERE.stat().st_mode & 0o005
    return uid, (f"as user {GRADE_USER} (uid {uid}); runtime guard and static check" +
                 (f"; WARNING: {HERE} is readable by every user: `chmod -R go-rwx` it (run_autograder does)"
                  if readable else ", the grader's files unreadable to it"))


def clean_env(home) -> dict:
    """The grader's environment less what points Python at other code (PYTHONPATH, PYTHONSTARTUP), with HOME,
    TMPDIR and the Hugging Face cache inside the student's directory."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP", "PYTHONHOME",
                                                              "PYTHONINSPECT", "PYTHONUSERBASE")}
    return env | {"PYTHONDONTWRITEBYTECODE": "1", "HOME": str(home), "TMPDIR": str(home), "HF_HOME": str(home),
                  "HF_HUB_OFFLINE": "1", "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}     # (a plugin may start git)


def run_process(cwd: pathlib.Path, args: list[str], out: pathlib.Path, user: int | None = None):
    """Run `python assignment.py <args> --out <out>` in cwd -> (what it saved, read as data only, or an error
    string; the guard's flags). With user, as that user (root only)."""
    import torch
    out.touch(mode=0o600)
    ids = hand_over([cwd, out], user)
    try:
        proc = subprocess.run([sys.executable, str(cwd / "assignment.py"), *args, "--out", str(out)], cwd=cwd,
                              capture_output=True, text=True, timeout=PROBLEM_TIMEOUT, env=clean_env(cwd), **ids)
    except subprocess.TimeoutExpired as e:
        return f"timed out after {PROBLEM_TIMEOUT} s", flags_in(e.stderr)
    flags = flags_in(proc.stderr)
    try:
        return torch.load(out, weights_only=True), flags      # data only: a forged file cannot run code here
    except Exception:                                          # noqa: BLE001 (an empty, cut or forged file)
        return "the check process failed: " + last_error(proc.stderr), flags


def hand_over(paths: list[pathlib.Path], user: int | None) -> dict:
    """Make paths (and everything under them) the user's and return subprocess.run's arguments that run a
    process as that user, with no supplementary group; {} for user None (the same user as the grader)."""
    import pwd
    if user is None:
        return {}
    gid = pwd.getpwuid(user).pw_gid
    for path in paths:
        for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
            os.chown(p, user, gid)
    return dict(user=user, group=gid, extra_groups=[])


def flags_in(stderr) -> list[str]:
    if isinstance(stderr, bytes):
        stderr = stderr.decode(errors="replace")
    return sorted({line.split(FLAG, 1)[1].strip() for line in (stderr or "").splitlines() if FLAG in line})


def last_error(stderr: str) -> str:
    """The line of a process's stderr that says what went wrong: its last exception or 'error' line (a
    progress bar redrawn after a traceback comes later), else its last line."""
    lines = [line.strip() for line in stderr.replace("\r", "\n").splitlines() if line.strip() and FLAG not in line]
    errors = [line for line in lines if re.match(r"[\w.]*(Error|Exception|Interrupt)\b|\S+: error", line)]
    return (errors or lines or ["?"])[-1][:200]


def grade_problem(problem: Problem, student: pathlib.Path, root: pathlib.Path, tmp: pathlib.Path, seed: int,
                  ref_out, user: int | None = None) -> dict:
    """One problem: the student's function spliced into a copy of the reference, checked in its own process."""
    result = {"points": 0.0, "max": problem.points, "bonus": problem.bonus, "failed": [], "flagged": [],
              "checks": 0, "seed": seed}
    try:
        student_source = (student / problem.file).read_text()
    except (OSError, UnicodeDecodeError) as e:
        result["failed"] = [f"{problem.file}: not in the submission ({type(e).__name__})"]
        return result
    parsed = parse_tolerant(student_source)
    broken = [b for b in parsed.broken if b.first <= parsed.def_line(problem.qualname) <= b.last]
    if broken or locate_or_none(parsed.source, problem.qualname) is None:
        result["failed"] = [f"{problem.file}:{b.line}: {b.error} (so {problem.qualname} does not compile)"
                            for b in broken] or [f"{problem.file}: no function {problem.qualname}"]
        return result
    spliced, graded = splice(problem, parsed.source, (root / problem.file).read_text())
    result["flagged"] = static_check(graded, problem.file)
    if result["flagged"]:
        result["failed"] = list(result["flagged"])
        return result
    where = copy_code(root, tmp / f"{secrets.token_hex(8)}", handout_tests=True)   # a name no other can guess
    (where / problem.file).write_text(spliced)
    start = time.time()
    got, flags = run_process(where, ["_outputs", f"{problem.id}={seed}", "--tests", "--guard"],
                             tmp / f"{secrets.token_hex(8)}.pt", user)
    result["seconds"] = round(time.time() - start, 1)
    shutil.rmtree(where, ignore_errors=True)
    if flags:
        result.update(flagged=flags, failed=[f"flagged by the runtime guard: {f}" for f in flags])
        return result
    lines = LineMap(problem, parsed.source, spliced)
    try:
        checks = [("everything", False, lines.fix(got))] if isinstance(got, str) else (    # the most telling first
            [compare_outputs(problem.id, seed, got["outputs"][problem.id], ref_out["outputs"][problem.id])]
            + [(f"test {name}", ok is True, lines.fix(str(detail))) for name, (ok, detail)
               in ((t, got["tests"].get(t, (False, "not reported"))) for t in CHECKS[problem.id]["tests"])])
    except (KeyError, TypeError, ValueError, AttributeError):           # a process that wrote something else
        checks = [("everything", False, "the check process's output was not the grader's")]
    passed = sum(ok for _, ok, _ in checks)
    result.update(points=round(problem.points * passed / len(checks), 2), checks=len(checks),
                  failed=[f"{name}: {detail}" for name, ok, detail in checks if not ok])
    return result


def locate_or_none(source: str, qualname: str):
    try:
        return locate(source, qualname)
    except SyntaxError:
        return None


# ---- a syntax error costs only the functions it breaks ----

@dataclass
class Broken:
    first: int             # the lines of the top-level block that does not compile (1-based, inclusive)
    last: int
    line: int              # where Python says the error is
    error: str


@dataclass
class Parsed:
    source: str            # the student's file with every broken top-level block blanked (line numbers kept)
    broken: list
    original: str

    def def_line(self, qualname: str) -> int:
        """The line of `def <name>` (a method: of `class <Class>`) in the original text, or 0."""
        scope, _, name = qualname.rpartition(".")
        pattern = rf"^class {scope}\b" if scope else rf"^(async )?def {name}\b"
        for i, line in enumerate(self.original.splitlines(), start=1):
            if re.match(pattern, line):
                return i
        return 0


BLOCK_START = re.compile(r"^(@|def |async def |class |if __name__)")


def parse_tolerant(source: str) -> Parsed:
    """source, with each top-level block (a def, a class, with its decorators; up to the next one) that
    Python cannot compile blanked out, one error at a time, so the rest still grades."""
    lines = source.splitlines(keepends=True)
    broken = []
    for _ in range(len(lines) + 1):
        try:
            ast.parse("".join(lines))
            return Parsed("".join(lines), broken, source)
        except SyntaxError as e:
            at = min(max(e.lineno or len(lines), 1), len(lines))
            starts = [i + 1 for i, line in enumerate(lines) if BLOCK_START.match(line)]
            first = max([s for s in starts if s <= at], default=1)
            while first > 1 and lines[first - 2].startswith("@"):
                first -= 1
            last = min([s - 1 for s in starts if s > at], default=len(lines))
            if all(not line.strip() for line in lines[first - 1:last]):
                break                                       # nothing left to blank: give up
            broken.append(Broken(first, last, e.lineno or at, f"{type(e).__name__}: {e.msg}"))
            lines[first - 1:last] = ["\n"] * (last - first + 1)
    return Parsed("", broken or [Broken(1, len(lines), 1, "the file does not compile")], source)


def splice(problem: Problem, student_source: str, reference_source: str) -> tuple[str, list]:
    """(the reference file with the student's function in place of the reference one, plus the top-level
    names the student ADDED to the file (imports, helper functions, constants), appended; the student's
    ast nodes that went in). Everything else in the student's file is the reference's."""
    node = locate(student_source, problem.qualname)
    text = function_text(student_source, problem.qualname)
    spliced = replace_function(reference_source, problem.qualname, text)
    known = {ast.unparse(n) for n in ast.parse(reference_source).body if isinstance(n, (ast.Import, ast.ImportFrom))}
    defined = top_level_names(reference_source)
    added, graded = [], [node]
    lines = student_source.splitlines(keepends=True)
    for n in ast.parse(student_source).body:
        new_import = isinstance(n, (ast.Import, ast.ImportFrom)) and ast.unparse(n) not in known
        new_name = not isinstance(n, (ast.Import, ast.ImportFrom)) and (top_level_names_of(n) - defined)
        if new_import or new_name:
            first = min([n.lineno] + [d.lineno for d in getattr(n, "decorator_list", [])])
            added.append("".join(lines[first - 1:n.end_lineno]))
            graded.append(n)
    return spliced + ("\n\n# ---- added by the student ----\n" + "\n".join(added) if added else ""), graded


def top_level_names_of(node) -> set:
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return set()


def top_level_names(source: str) -> set:
    return set().union(*(top_level_names_of(n) for n in ast.parse(source).body))


class LineMap:
    """Line numbers of the graded copy of the student's file -> the student's own file, in messages: the
    student's function and added code keep their lines; a line of the reference's part is said to be one."""

    def __init__(self, problem: Problem, student_source: str, spliced: str):
        self.file = problem.file
        mine, theirs = locate(student_source, problem.qualname), locate(spliced, problem.qualname)
        self.spans = [(theirs.lineno, theirs.end_lineno, mine.lineno - theirs.lineno)]
        added_at = spliced.count("\n", 0, spliced.find("# ---- added by the student ----")) + 2
        if added_at > 1 and "# ---- added by the student ----" in spliced:
            self.spans.append((added_at, spliced.count("\n") + 1, None))

    def fix(self, text: str) -> str:
        def one(m):
            n = int(m.group(1))
            for first, last, shift in self.spans:
                if first <= n <= last:
                    return f"{self.file}:{n + shift}" if shift is not None else f"{self.file} (your added code)"
            return f"{self.file} (the reference's part, line {n})"
        return re.sub(rf"(?<![\w/.]){re.escape(self.file)}:(\d+)", one, text)


# ---- layer 1: the static check ----

ALLOWED_IMPORTS = {"__future__", "math", "cmath", "typing", "dataclasses", "functools", "itertools",
                   "collections", "fractions", "decimal", "numbers", "operator", "heapq", "bisect", "re", "string",
                   "statistics", "random", "enum", "abc", "copy", "warnings", "contextlib", "json",
                   "torch", "numpy", "transformers", "tqdm",
                   *(name[:-3] for name in SOURCES), "toy", "presets", "precision", "settings", "loading", "why"}
BANNED_NAMES = {"exec", "eval", "compile", "open", "__import__", "getattr", "setattr", "delattr", "globals",
                "locals", "vars", "breakpoint", "input", "help", "exit", "quit", "memoryview", "__builtins__",
                "__loader__", "__spec__", "__file__", "__cached__"}
BANNED_ATTRIBUTES = {"modules", "load", "loads", "loadtxt", "fromfile", "genfromtxt", "memmap", "open_memmap",
                     "from_file", "hub", "jit", "package", "cpp_extension", "system", "popen", "getsource",
                     "import_module", "f_back", "f_globals", "f_locals", "f_builtins", "f_code", "gi_frame",
                     "cr_frame", "tb_frame", "co_code", "_getframe", "open", "read_text", "read_bytes", "write_text",
                     "write_bytes",                # and a module that another module imported (`toy.subprocess`):
                     "os", "sys", "subprocess", "importlib", "inspect", "builtins", "io", "pathlib", "shutil",
                     "ctypes", "gc", "pickle", "marshal", "runpy", "socket", "codecs", "linecache", "tempfile",
                     "zipfile", "types", "site"}
ALLOWED_DUNDERS = {"__init__", "__name__", "__doc__", "__len__", "__repr__", "__eq__", "__hash__", "__call__",
                   "__iter__", "__next__", "__getitem__", "__setitem__", "__contains__", "__post_init__"}


def static_check(nodes: list, file: str) -> list[str]:
    """What in the graded code (the student's function and added top-level code) loads, reads or runs other
    code: '<file>:<line>: <what>: <why>' each, [] if nothing."""
    found = []
    for tree in nodes:
        for n in ast.walk(tree):
            where = f"{file}:{getattr(n, 'lineno', '?')}"
            if isinstance(n, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in n.names] if isinstance(n, ast.Import) else [n.module or "."]
                for name in names:
                    if isinstance(n, ast.ImportFrom) and n.level:
                        found.append(f"{where}: a relative import: graded code may import only "
                                     f"{', '.join(sorted(ALLOWED_IMPORTS))}")
                    elif name.split(".")[0] not in ALLOWED_IMPORTS:
                        found.append(f"{where}: `import {name}`: graded code may import only "
                                     f"{', '.join(sorted(ALLOWED_IMPORTS))}")
                if isinstance(n, ast.ImportFrom):
                    found += [f"{where}: `from {n.module} import {a.name}`: {why}" for a in n.names
                              if (why := banned_name(a.name))]
            elif isinstance(n, ast.Name) and (why := banned_name(n.id)):
                found.append(f"{where}: `{n.id}`: {why}")
            elif isinstance(n, ast.Attribute) and (why := banned_attribute(n.attr)):
                found.append(f"{where}: `.{n.attr}`: {why}")
            elif isinstance(n, ast.Constant) and isinstance(n.value, str) and re.fullmatch(r"__\w+__", n.value) \
                    and n.value not in ALLOWED_DUNDERS:
                found.append(f"{where}: the string {n.value!r}: a name of Python's internals, spelled out")
    return sorted(set(found), key=lambda s: int(s.split(":")[1]) if s.split(":")[1].isdigit() else 0)


def banned_name(name: str) -> str | None:
    if name in BANNED_NAMES:
        return "graded code may not load, read or run code or files (builtins that do are not allowed)"
    return None


def banned_attribute(attr: str) -> str | None:
    if attr.startswith("__") and attr.endswith("__") and attr not in ALLOWED_DUNDERS:
        return "Python's internals (a way around the import rules) are not allowed in graded code"
    if attr in BANNED_ATTRIBUTES:
        return "it reaches modules, frames, files or code; graded code computes its answer itself"
    return None


# ---- layer 3: the runtime guard ----

def warm_up() -> None:
    """Import and exercise, BEFORE the guard, what legitimately reads files or compiles code on first use:
    torch's and numpy's kernels, transformers' lazy modules, pytest and its assertion rewriter."""
    import numpy
    import pytest                                                  # noqa: F401
    import _pytest.assertion.rewrite                               # noqa: F401
    import torch
    import tokenizers                                              # noqa: F401
    import transformers
    for name in ("AutoModelForCausalLM", "AutoModelForTokenClassification", "AutoTokenizer", "DynamicCache",
                 "LlamaConfig", "LlamaForCausalLM", "PreTrainedTokenizerFast", "Qwen2Config", "Qwen2ForCausalLM",
                 "Qwen3Config", "Qwen3ForCausalLM", "GenerationConfig"):
        getattr(transformers, name, None)
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    torch.log_softmax(x, -1).sum().backward()
    torch.multinomial(torch.softmax(torch.randn(3, 5), -1), 1, generator=torch.Generator().manual_seed(0))
    numpy.linalg.norm(numpy.ones(3))
    torch.testing.assert_close(x, x)


def install_guard(allowed: pathlib.Path) -> None:
    """A PEP 578 audit hook for the rest of this process: opening a file outside `allowed` and the Python
    installation (read-only there), listing a directory outside them, starting a process, opening a socket,
    loading a C library, and
    compile/exec called from code under `allowed` raise PermissionError; each is reported on stderr
    (FLAG ...), where the grader reads it, before it raises, so catching the error hides nothing."""
    import site
    realpath, fsdecode, getframe, write = os.path.realpath, os.fsdecode, sys._getframe, os.write
    own = realpath(allowed) + os.sep
    kit = own + "assignment.py"
    python = tuple({realpath(p) + os.sep for p in (sys.prefix, sys.base_prefix, sys.exec_prefix,
                                                   *site.getsitepackages(), site.getusersitepackages()) if p})
    devices = ("/dev/null", "/dev/urandom", "/proc/cpuinfo", "/proc/meminfo")
    reads_allowed = python + ("/sys/devices/system/cpu/", "/sys/fs/cgroup/", "/proc/self/")
    listable = python + tuple(realpath(p) + os.sep for p in sys.path if p and realpath(p) + os.sep != own)
    processes = ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                 "os.forkpty", "pty.spawn", "os.startfile")
    others = ("socket.connect", "socket.bind", "socket.getaddrinfo", "ctypes.dlopen", "os.symlink", "os.link")
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC

    def violation(what: str):
        try:
            write(2, f"\n{FLAG} {what}\n".encode())
        finally:
            raise PermissionError(f"the grader does not allow this: {what}")

    def hook(event: str, args: tuple):
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None))[:3]
            if path is None or isinstance(path, int):
                return
            full = realpath(fsdecode(path))
            writing = (any(c in mode for c in "wax+") if isinstance(mode, str)
                       else bool((flags or 0) & write_flags))
            if (full + os.sep).startswith(own) or full in devices:
                return
            if not writing and full.startswith(reads_allowed):
                return
            violation(f"{'writing' if writing else 'opening'} {full} (outside the problem's directory)")
        elif event in ("os.listdir", "os.scandir"):               # (the other problems' directories' names)
            path = args[0] if args and args[0] is not None else "."
            if isinstance(path, int):
                return
            full = realpath(fsdecode(path)) + os.sep
            if not (full.startswith(own) or full.startswith(listable)):
                violation(f"listing {full[:-1]} (outside the problem's directory)")
        elif event in processes or event.startswith(processes):
            violation(f"starting a process ({event})")
        elif event in others:
            violation(f"{event} {str(args)[:80]}")
        elif event in ("compile", "exec"):
            caller = getframe(1).f_code.co_filename
            if caller.startswith(own) and caller != kit:
                violation(f"{event} called from {caller[len(own):]}: graded code may not compile or run code "
                          f"made at run time")

    sys.addaudithook(hook)


# ---- the student process ----

def outputs_process(seeds: dict, tests: bool, out: pathlib.Path, guard: bool = False) -> None:
    """In a graded copy (cwd): the visible tests (with --tests) and every problem's outputs on its cases;
    with --guard, everything after the warm-up runs under the runtime guard."""
    warm_up()
    import torch
    handle = open(out, "wb")                       # opened before the guard: the only file written outside
    if guard:
        install_guard(pathlib.Path.cwd())
    sys.path.insert(0, str(pathlib.Path.cwd()))
    problems = {p.id: p for p in find_problems(pathlib.Path.cwd())}
    result = {"tests": {}, "outputs": {}}
    for pid, seed in seeds.items():
        if tests:
            result["tests"].update(visible_tests(pid))
        fn = function_of(problems[pid])
        result["outputs"][pid] = [plain_data(call(CHECKS[pid]["diff"].run, fn, case))
                                  for case in CHECKS[pid]["diff"].cases(random.Random(seed))]
    torch.save(result, handle)
    handle.close()


def plain_data(x):
    """x as what torch.load(weights_only=True) reads back: tensors, numbers, strings, None and their tuples,
    lists and dicts (a numpy scalar becomes its Python number, an array a tensor, anything else its type's
    name, which then compares unequal)."""
    import numpy
    import torch
    if isinstance(x, (torch.Tensor, str, bool, int, float, type(None))) and not isinstance(x, numpy.generic):
        return x.detach() if isinstance(x, torch.Tensor) else x
    if isinstance(x, numpy.generic):
        return x.item()
    if isinstance(x, numpy.ndarray):
        return torch.from_numpy(x)
    if isinstance(x, (tuple, list)):
        return type(x)(plain_data(v) for v in x) if type(x) in (tuple, list) else tuple(plain_data(v) for v in x)
    if isinstance(x, dict):
        return {str(k): plain_data(v) for k, v in x.items()}
    return f"<a {type(x).__name__}>"


def visible_tests(problem_id: str) -> dict:
    """{test name: (passed, detail)}: one check per test function (all its parametrizations); a test that
    is skipped, or that the file fails to collect, is not passed. The detail: where it failed (the test
    file's line, and the student's function's) and what pytest said (its `E` lines)."""
    import pytest

    class Collect:
        def __init__(self):
            self.outcomes = {}

        def pytest_runtest_logreport(self, report):
            name = report.nodeid.split("::")[-1].split("[")[0]
            ok, detail = self.outcomes.get(name, (True, ""))
            if (report.failed or report.skipped) and ok:
                ok, detail = False, ("skipped" if report.skipped else pytest_failure(report.longreprtext))
            self.outcomes[name] = (ok, detail)

    collect = Collect()
    tests = CHECKS[problem_id]["tests"]
    pytest.main(["-q", "-p", "no:cacheprovider", "--basetemp", str(pathlib.Path.cwd() / ".pytest-tmp"),
                 "test_nsr.py", "-k", " or ".join(tests)], plugins=[collect])
    return {name: collect.outcomes.get(name, (False, "not run: the test file did not import")) for name in tests}


def pytest_failure(text: str, max_lines: int = 14) -> str:
    """A failed test's report in brief: its locations (`file:line: ...` lines) and pytest's explanation
    (its `E` lines), whole lines only."""
    lines = text.splitlines()
    keep = [line.rstrip() for line in lines if re.match(r"[\w.]+\.py:\d+: ", line)]   # where in the project's files
    keep += [re.sub(r"^E\s+", "E  ", line.rstrip()) for line in lines if line.startswith("E ") and line[1:].strip()]
    keep = [line if len(line) <= 240 else line[:200] + f" ... ({len(line)} characters)" for line in keep] \
        or [(text.strip().splitlines() or ["failed"])[-1][:240]]
    more = len(keep) - max_lines
    return "\n".join(keep[:max_lines] + ([f"({more} more lines)"] if more > 0 else []))


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
    """(the differential check's name, passed, what differs in its first failing case: the input, expected
    vs actual at the first differing element, the max abs error, the tolerance)."""
    diff = CHECKS[problem_id]["diff"]
    cases = diff.cases(random.Random(seed))
    name = f"differential: {diff.name} ({len(cases)} cases, seed {seed})"
    if len(got) != len(want):
        return name, False, "a different number of outputs"
    for i, (case, (kind, value), (ref_kind, ref_value)) in enumerate(zip(cases, got, want)):
        what = None
        if kind != ref_kind or (kind == "raised" and value != ref_value):
            what = (f"{'raised ' + value if kind == 'raised' else 'returned a value'} where the reference "
                    f"{'raised ' + ref_value if ref_kind == 'raised' else 'returned a value'}")
        elif kind == "ok":
            try:
                what = first_difference(value, ref_value, diff.tolerance(case), diff.outputs,
                                        diff.outputs[0] if len(diff.outputs) == 1 else "the output")
            except Exception as e:                                # noqa: BLE001 (outputs of a wrong kind)
                what = f"outputs of the wrong kind ({type(e).__name__}: {e})"[:300]
        if what:
            return name, False, f"case {i} of {len(cases)}: input {show_case(case)}\n{what}"
    return name, True, ""


# =================================================================================================
# CHECKS: per problem, the visible tests and the differential check (cases -> run -> same)
# =================================================================================================

@dataclass
class Diff:
    """A differential check: cases(rng) draws the inputs (identically in every process, from one seed);
    run(fn, case) calls a function on one case and returns what is compared (values AND, where the
    function carries a gradient, the gradient); tolerance(case) is how close the student's floating-point
    outputs must be to the reference's (a dict of rtol and atol; None: exactly; a list: one per output);
    outputs names the outputs in the feedback. Shapes, dtypes, integers, booleans, strings and the types of
    errors are always compared exactly."""
    name: str
    cases: object
    run: object
    tolerance: object
    outputs: tuple = ()
    tolerance_text: str = ""          # the tolerance in words, for HANDOUT.md


def tol(kind: str, atol_scale: float = 1.0) -> dict:
    return dict(TOLERANCE[kind], atol=TOLERANCE[kind]["atol"] * atol_scale)


def first_difference(got, want, tolerance, names=(), label="the output") -> str | None:
    """None if got matches want within tolerance; else where they first differ, in words: the element, expected
    vs actual, the max abs error, the tolerance."""
    import torch
    if isinstance(want, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(want):
            return f"{label}: expected {type(want).__name__} of {len(want)} items, got {kind_of(got)}"
        for i, (a, b) in enumerate(zip(got, want)):
            sub = tolerance[i] if isinstance(tolerance, list) else tolerance
            found = first_difference(a, b, sub, (), names[i] if i < len(names) else f"{label}[{i}]")
            if found:
                return found
        return None
    if isinstance(want, torch.Tensor):
        if not isinstance(got, torch.Tensor) or got.shape != want.shape or got.dtype != want.dtype:
            return f"{label}: expected {kind_of(want)}, got {kind_of(got)}"
        if tolerance is None or not want.is_floating_point():
            bad = ~((got == want) | (torch.isnan(got) & torch.isnan(want)) if want.is_floating_point() else got == want)
        else:
            bad = ~torch.isclose(got, want, rtol=tolerance["rtol"], atol=tolerance["atol"], equal_nan=True)
        if not bad.any():
            return None
        at = tuple(bad.nonzero()[0].tolist())
        error = ""
        if want.is_floating_point():
            errors = (got.double() - want.double()).abs()[bad]
            error = f"; max abs error {float(errors.nan_to_num(nan=float('inf')).max()):.3g}"
        return (f"{label}: at index {list(at)} expected {want[at].item()!r}, got {got[at].item()!r} "
                f"({int(bad.sum())} of {want.numel()} elements differ{error}; tolerance: {tolerance_words(tolerance)})")
    if isinstance(want, float):
        if not isinstance(got, float):
            return f"{label}: expected a float ({want!r}), got {kind_of(got)}"
        ok = got == want or (math.isnan(got) and math.isnan(want)) or (
            tolerance is not None and abs(got - want) <= tolerance["atol"] + tolerance["rtol"] * abs(want))
        return None if ok else (f"{label}: expected {want!r}, got {got!r} (abs error {abs(got - want):.3g}; "
                                f"tolerance: {tolerance_words(tolerance)})")
    if type(got) is not type(want) or got != want:
        return f"{label}: expected {short_repr(want)}, got {short_repr(got)}"
    return None


def tolerance_words(tolerance) -> str:
    if tolerance is None:
        return "exact"
    return f"|actual - expected| <= {tolerance['atol']:.3g} + {tolerance['rtol']:.3g} x |expected|"


def kind_of(x) -> str:
    import torch
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {list(x.shape)}, {x.dtype}"
    return f"{type(x).__name__} {short_repr(x)}"


def short_repr(x, limit: int = 200) -> str:
    text = repr(x)
    return text if len(text) <= limit else text[:limit - 40] + f"... ({len(text)} characters)"


def show_case(case) -> str:
    """The inputs of one case: each argument's shape, and its values when it is small."""
    import torch
    if "writes" in case:
        return (f"a cache of shape {list(case['shape'])} per layer, {case['layers']} layer(s), the writes "
                f"(slot, length, layer) {[(s, n, layer) for s, n, layer, _, _ in case['writes']]}"[:400])
    parts = []
    for k, v in case.items():
        if isinstance(v, torch.Tensor):
            text = f"{k}: shape {list(v.shape)} {str(v.dtype).replace('torch.', '')}"
            if v.numel() <= 16:
                values = v.tolist()
                text += f" = {[round(x, 6) for x in values] if v.dim() == 1 and v.is_floating_point() else values}"
            parts.append(text[:300])
        else:
            parts.append(f"{k}={short_repr(v, 120)}")
    return ", ".join(parts)


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


def plain(fn, case):
    return fn(**case)


def float64(case):
    return tol("float64")


def logits_fp32(case):
    return tol("float32", logit_scale(case["logits"], case["temperature"]))


def decode_step_tolerance(case):
    return [None, logits_fp32(case), tol("float32", logit_scale(case["logits"], 1.0)), None]


F64 = "float64: rtol {rtol64:g}, atol {atol64:g}"
F32 = "float32: rtol {rtol32:g}, atol {atol32:g} x max(1, largest abs logit / T)"

CHECKS = {        # in the handout's order: each problem's visible tests use only the problems above it
    "pass_at_k": {"tests": ["test_pass_at_k_equals_brute_force_enumeration_over_all_k_subsets",
                            "test_pass_at_k_matches_exact_binomial_fractions_for_random_n_up_to_512",
                            "test_pass_at_k_is_unbiased_under_binomial_sampling_while_the_plug_in_estimate_is_not",
                            "test_pass_at_k_edge_cases_c_zero_c_n_k_n_and_pass_at_1_is_c_over_n",
                            "test_pass_at_k_rejects_bad_arguments_with_a_clear_value_error"],
                  "diff": Diff("random n, c, k up to 600, errors included", cases_pass_at_k, plain, float64,
                               ("pass@k",), F64 + "; a Python float")},
    "_box_at": {"tests": ["test_verifier_extracts_the_last_complete_box_or_the_final_answer_phrase_and_nothing_else",
                          "test_verifier_reads_an_unboxed_final_answer_phrase_and_the_last_box_of_a_very_long_response",
                          "test_verifier_accepts_every_notation_of_the_same_answer_in_both_directions",
                          "test_verifier_fuzz_gives_the_known_answer_and_is_symmetric_and_reflexive_on_random_strings",
                          "test_verifier_work_on_an_adversarial_input_at_most_doubles_when_the_input_doubles"],
                "diff": Diff("random boxes: nesting, escapes, shorthand, unclosed, too long", cases_boxed, plain,
                             lambda case: None, ("the box",), "exact")},
    "sample_weights": {"tests": ["test_sample_weights_table_for_every_objective_including_grpo_all_correct_and_all_wrong_groups",
                                 "test_sample_weights_rejects_unknown_objectives_bad_rewards_and_bad_grpo_groups"],
                       "diff": Diff("weights of every objective, errors included", cases_weights, plain,
                                    lambda case: tol("float32"), ("weights",),
                                    "float32: rtol {rtol32:g}, atol {atol32:g}")},
    "policy_loss": {"tests": ["test_loss_gradient_wrt_logits_equals_the_closed_form_for_psr_nsr_and_w_reinforce",
                              "test_nsr_gradient_step_lowers_the_sampled_logit_and_raises_the_others_in_proportion_to_their_probability",
                              "test_clipped_loss_at_ratio_one_has_the_same_gradient_as_the_unclipped_loss",
                              "test_the_clipped_surrogate_gradient_vanishes_exactly_where_ppos_does_on_each_side",
                              "test_clip_fractions_count_by_the_sign_of_the_weight_the_tokens_whose_gradient_the_clip_zeroed"],
                    "diff": Diff("loss, clipped tokens and gradient, both clip sides", cases_policy_loss,
                                 lambda fn, case: call_with_grad(fn, case, "logp"),
                                 lambda case: [float64(case), None, float64(case)],
                                 ("the loss", "the clipped-token mask", "d loss / d logp"),
                                 F64 + "; the clipped mask exactly")},
    "token_logprobs": {"tests": ["test_token_logprobs_are_the_tempered_log_softmax_at_the_targets_and_its_entropy"],
                       "diff": Diff("log-probs, entropy and their gradient, any dtype and temperature",
                                    cases_logprobs, lambda fn, case: call_with_grad(fn, case, "logits"), logits_fp32,
                                    ("the log-probs", "the entropy", "d (sum of the outputs) / d logits"), F32)},
    "loss_normalizer": {"tests": ["test_loss_normalizer_counts_every_response_token_as_the_official_token_mean",
                                  "test_gradients_with_micro_batch_size_one_equal_the_full_batch_gradients"],
                        "diff": Diff("Z of both modes, per-token weights, errors", cases_normalizer, plain,
                                     lambda case: None, ("Z",), "exact; a Python float")},
    "kl_penalty": {"tests": ["test_entropy_bonus_and_kl_penalty_values_and_gradients_on_a_hand_made_case",
                             "test_the_step_subtracts_the_entropy_bonus_and_adds_the_kl_term_as_token_means_over_the_mini_batch"],
                   "diff": Diff("value and gradient, clamps included", cases_kl_penalty,
                                lambda fn, case: call_with_grad(fn, case, "logp"), float64,
                                ("the penalty", "d penalty / d logp"), F64)},
    "KVCache.update": {"tests": ["test_our_forward_with_our_kv_cache_equals_transformers_full_forward_on_a_left_padded_batch",
                                 "test_our_forward_feeding_several_tokens_on_top_of_the_cache_equals_one_at_a_time"],
                       "diff": Diff("prefill and steps: what is written, what is read, views", cases_kv_cache,
                                    run_kv_cache, lambda case: None,
                                    ("each write's (keys read, values read, a view of the cache?, filled)",
                                     "the cache's keys", "the cache's values"), "exact")},
    "decode_step": {"tests": ["test_generate_with_a_fixed_generator_reproduces_the_same_samples",
                              "test_generate_stops_each_row_at_its_first_eos_and_reports_truncation",
                              "test_greedy_generate_matches_transformers_generate_token_for_token",
                              "test_generate_logprobs_equal_a_fresh_forward_pass_under_the_sampling_distribution",
                              "test_generate_without_its_speed_tricks_gives_the_same_rollouts_as_with_them"],
                    "diff": Diff("tokens, log q, entropy and EOS under every temperature and top-p", cases_decode_step,
                                 run_decode_step, decode_step_tolerance,
                                 ("the token ids", "log q", "the entropy", "the EOS flags"),
                                 F32 + " (the entropy: T = 1); token ids and EOS flags exactly")},
    "gae_advantages": {"tests": ["test_gae_equals_a_hand_computed_example_and_the_return_minus_value_at_gamma_lam_one"],
                       "diff": Diff("advantages and returns, any gamma and lambda, ragged rows", cases_gae, plain,
                                    float64, ("the advantages", "the returns"), F64)},
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
RESULT_TIMEOUT = 900         # seconds; the reference's run took 42-49 s here (2 cores, the base built)
# Measured for toy-v8 with the faithful update and n = 256 (`python assignment.py calibrate`, 2026-12-07, a
# quiet 2-core machine: gains 45.9 45.3 45.7 45.4 45.8 points, final entropies 0.039 0.035 0.032 0.032 0.045,
# 42-49 s a run). None = results grading not offered.
RESULT_TIERS = {"gain": [45.32, 45.90], "entropy": [0.0318, 0.0449]}


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
# CHECK (students): the visible tests of every problem, in the student's own copy
# =================================================================================================

def check(student: pathlib.Path) -> dict:
    """{id: {"passed", "visible", "max", "bonus"}}: each problem's visible tests, run once in the student's
    own copy (one pytest process), as the grader counts them: one check per test function."""
    problems = in_grading_order(find_problems(student))
    names = [t for p in problems for t in CHECKS[p.id]["tests"]]
    with tempfile.TemporaryDirectory(prefix="check-") as tmp:
        report = pathlib.Path(tmp) / "report.xml"
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_nsr.py",
                        "-k", " or ".join(names), f"--junitxml={report}"], cwd=student,
                       env={**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
        failed = set()
        if report.is_file():
            import xml.etree.ElementTree as ET
            for case in ET.parse(report).iter("testcase"):
                if any(child.tag in ("failure", "error", "skipped") for child in case):
                    failed.add(case.get("name", "").split("[")[0])
            ran = {case.get("name", "").split("[")[0] for case in ET.parse(report).iter("testcase")}
        else:
            ran = set()
    return {p.id: {"passed": sum(t in ran and t not in failed for t in CHECKS[p.id]["tests"]),
                   "visible": len(CHECKS[p.id]["tests"]), "max": p.points, "bonus": p.bonus} for p in problems}


def format_check(result: dict) -> str:
    lines = [f"{'problem':<16}{'visible tests passed':>22}  points if the hidden check passes (fails)"]
    for pid, r in result.items():
        checks = r["visible"] + 1
        lines.append(f"{pid:<16}{r['passed']:>15} of {r['visible']:<4}  {r['max'] * (r['passed'] + 1) / checks:.4g} "
                     f"({r['max'] * r['passed'] / checks:.4g}) of {r['max']:g}{' (bonus)' if r['bonus'] else ''}")
    return "\n".join(lines)


# =================================================================================================
# GRADESCOPE: the autograder zip, and results.json in Gradescope's format
# =================================================================================================
#
# Gradescope unpacks the zip into /autograder/source, runs setup.sh once (as root) to build the image, and
# for each submission runs run_autograder (as root) with the student's files in /autograder/submission; it
# reads /autograder/results/results.json: {"score", "tests": [{"name", "score", "max_score", "output",
# "visibility"}], ...}. AUTOGRADER_ROOT (default /autograder) and AUTOGRADER_PYTHON (default python3) let a
# test run the same script on a temporary directory.

SETUP_SH = """#!/usr/bin/env bash
# Gradescope runs this once, as root, when it builds the autograder's image (Ubuntu with python3).
set -euo pipefail
cd "$(dirname "$0")"
apt-get update && apt-get install -y python3 python3-pip
# the CPU build of torch first (the default one downloads CUDA), then the rest of the requirements
python3 -m pip install torch --index-url https://download.pytorch.org/whl/cpu
python3 -m pip install -r requirements.txt pytest
"""

RUN_AUTOGRADER = """#!/usr/bin/env bash
# Gradescope runs this as root for each submission: grade /autograder/submission against the kit in
# /autograder/source and write /autograder/results/results.json. The student's code runs as user nobody
# (ASSIGNMENT_GRADE_USER), under the runtime guard; the kit is made unreadable to that user first.
set -uo pipefail
ROOT="${AUTOGRADER_ROOT:-/autograder}"
PYTHON="${AUTOGRADER_PYTHON:-python3}"
chmod -R go-rwx "$ROOT/source"
mkdir -p "$ROOT/results"
cd "$ROOT/source"
# one problem per core: two of _box_at's visible tests time a parse against 1 s of wall time
"$PYTHON" assignment.py grade "$ROOT/submission" --jobs "$(nproc 2>/dev/null || echo 1)" \\
    --gradescope "$ROOT/results/results.json"
"""


def gradescope_zip(out: pathlib.Path, root: pathlib.Path = HERE) -> list[str]:
    """The autograder zip: the kit's code (this checkout's CODE and requirements.txt), setup.sh and
    run_autograder at the top (Gradescope wants them there), both executable."""
    names = [*CODE, "requirements.txt"]
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for name in names:
            z.write(root / name, name)
        for name, text in (("setup.sh", SETUP_SH), ("run_autograder", RUN_AUTOGRADER)):
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o755 << 16
            z.writestr(info, text)
    return names + ["setup.sh", "run_autograder"]


def gradescope_results(result: dict, seconds: float) -> dict:
    """The grade in Gradescope's results.json format: one test per problem, in grading order. A bonus
    problem's max_score is 0 (its points are extra credit: Gradescope adds them to the score)."""
    tests = []
    for pid, r in result["problems"].items():
        ok = not r["failed"] and not r.get("flagged")
        tests.append({"name": f"{pid}" + (f" (bonus, up to {r['max']:g} points)" if r["bonus"] else ""),
                      "score": r["points"], "max_score": 0.0 if r["bonus"] else r["max"],
                      "output": f"all {r.get('checks', 0)} checks passed" if ok else feedback(r),
                      "visibility": "visible"})
    return {"score": result["total"], "execution_time": round(seconds),
            "output": f"Graded in {seconds:.0f} s; student code ran {result.get('isolation', '?')}.",
            "tests": tests}


def find_submission(path: pathlib.Path) -> pathlib.Path:
    """The directory holding the student's files: path, or the shallowest folder under it with one of
    SOURCES (a student who zipped a folder)."""
    if any((path / name).is_file() for name in SOURCES):
        return path
    found = sorted((p.parent for name in SOURCES for p in path.rglob(name)), key=lambda p: len(p.parts))
    return found[0] if found else path


# =================================================================================================
# SUBMIT
# =================================================================================================

def submit_warnings(student: pathlib.Path) -> list[str]:
    """What a student should hear before handing in: an untouched WRITEUP.md, a problem that still raises
    NotImplementedError, a file that does not compile."""
    warnings_, stub = [], ast.dump(ast.parse(STUB.format(id="X")).body[0])
    writeup = student / "WRITEUP.md"
    if not writeup.is_file() or writeup.read_text().strip() == WRITEUP.strip():
        warnings_.append("WRITEUP.md is unchanged from the handout: answer the write-up questions (HANDOUT.md)")
    for p in in_grading_order(find_problems(student)):
        source = (student / p.file).read_text()
        parsed = parse_tolerant(source)
        broken = [b for b in parsed.broken if b.first <= parsed.def_line(p.qualname) <= b.last]
        node = locate_or_none(parsed.source, p.qualname)
        if broken:
            warnings_.append(f"{p.file}:{broken[0].line}: {broken[0].error}: {p.qualname} ({p.id}) does not compile")
        elif node is not None and any(ast.dump(n).replace(repr(f"{p.id}: see HANDOUT.md"), repr("X: see HANDOUT.md"))
                                      == stub for n in node.body):
            warnings_.append(f"{p.file}:{node.lineno}: {p.qualname} ({p.id}) still raises NotImplementedError")
    return warnings_


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

## The problems ({total} points, and {bonus} bonus points), in grading order

Do them in this order: each one's visible tests use only the problems above it.

| # | problem (the function) | file | points | visible checks | hidden checks | tolerance | grading time (busy 2 cores) | what |
|---|---|---|---|---|---|---|---|---|
{rows}

Each problem's visible tests (a visible check is one test function, all of its cases):

{commands}

## How you are graded

Grade yourself with

    python assignment.py check .        # every problem's visible tests, problem by problem ({t_check})

The grader runs each problem in isolation: your function (with any import, helper function or constant you
ADD to its file at the top level) is put into a copy of the reference code, where every other function is
the reference's, so a bug in one problem costs points in that problem only, a change you make elsewhere is
not graded, and a file that does not compile costs only the functions it breaks. For each problem it runs

1. its **visible checks**: the tests listed above, from the reference's copy of `test_nsr.py` (editing your
   copy changes nothing), and
2. one **hidden check**: your function against the reference on fresh random inputs (the number in the
   table), drawn from a new seed at every grading, so hard-coding the visible tests' answers does not pass.
   Outputs are compared at the tolerance in the table (`|actual - expected| <= atol + rtol x |expected|`),
   where a function carries a gradient the gradient too; shapes, dtypes, token ids, masks, integers,
   booleans and the type of every error exactly. An error the docstring asks for (a `ValueError` for bad
   input) must be raised where the reference raises it.

**Points = the problem's points x (checks passed) / (visible checks + 1).** All checks pass: full points;
each failing check costs its share (partial credit). The feedback shows, for the first failing check, its
input (its shape, and its values when small), expected vs actual at the first differing element, the max
abs error and the tolerance; for a failing test, the lines of your copy of `test_nsr.py` and of your file.
One grading of every problem takes {t_grade} on 2 CPU cores.

**Your code must compute its answer.** Graded code may import only {imports}; it may not use {banned}, nor
reach modules, frames, files or code through attributes (`sys.modules`, `__dict__`, `__globals__`,
`.f_back`, `torch.load`, ...). At run time it may open no file outside its own directory and start no
process. Code that does any of this scores 0 for its problem and is reported to the instructor.

## The write-up (WRITEUP.md)

Answer each question in a few sentences with the numbers your runs printed. Each command is given with
its measured time on 2 CPU cores; all of them together take at most 2 CPU-hours. See WRITEUP.md.

{writeup_questions}

## What to submit

    python assignment.py submit .        # writes submission.zip: the files you edited, WRITEUP.md, and
                                         # your runs' config.json / metrics.jsonl / eval files (no checkpoints);
                                         # it warns if WRITEUP.md is untouched or a problem is not done

## Optional GPU track (clearly optional; not graded)

With one 24 GB GPU: `python nsr.py --preset qwen2.5-0.5b-instruct --train <MATH train.jsonl> --eval
<MATH test.jsonl> --objective nsr` (docs/real-models.md); `python nsr.py --preset qwen2.5-math-1.5b
--dry-run` prints the memory plan of the paper's model family on 24 GB. Compare PSR and NSR's Pass@k there.
"""

# Measured 2026-12-07 on this project's 2-core machine while other jobs shared it (load average 10-18), on a
# copy with every problem done: `python assignment.py check .` in it, and `python assignment.py grade DIR`
# (each problem's own process in GRADE_SECONDS; two run at a time). On an idle machine they are shorter.
GRADING_TIMES = {"t_check": "71 s",
                 "t_grade": "about 9 minutes (538 s, measured while other jobs shared the machine)"}
GRADE_SECONDS = {"pass_at_k": 81, "_box_at": 92, "sample_weights": 87, "policy_loss": 86, "token_logprobs": 88,
                 "loss_normalizer": 92, "kl_penalty": 92, "KVCache.update": 95, "decode_step": 119,
                 "gae_advantages": 107}

WRITEUP_QUESTIONS = """\
Q1. The token-level gradient (the paper's gradient analysis). For L = -w log softmax(z)_y, derive dL/dz_v for
    every token v. Say in one sentence each what one PSR step (w = +1) and one NSR step (w = -1) do to the
    sampled token and to every other one, and where NSR's freed probability goes. Check your derivation
    against the last row of `python nsr.py --demo-gradient` ({t_demo}).

Q2. PSR, NSR and W-REINFORCE on the toy (findings a, b, d).
    `python reproduce.py --methods psr nsr w-reinforce --seeds 0 --n 256 --out runs/q2` ({t_q2}).
    Report Pass@1, Pass@16 and Pass@256 on both splits, the coverage table (kept / lost / gained) and the
    test entropies. Which of the paper's findings (a), (b), (d) does this run support, and how strongly
    (its verdicts and their intervals)? Which problems did PSR lose at k = 256 that the base solves?

Q3. lambda. `python reproduce.py --methods w-reinforce --seeds 0 --n 256 --sweep lam=0,0.5,1 --out runs/q3`
    ({t_q3}). How do Pass@1 and Pass@256 move with lambda (0.1 is the unswept row)? The paper's authors
    chose 0.1 "empirically"; what does your sweep suggest for this toy, and why might a weak base need a
    larger lambda?

Q4. Clipping and mini-batches (the official repository's issue #6: NSR's gains "only appear when
    batch_size > ppo_mini_batch_size and PPO's ratio clipping is enabled").
    `python reproduce.py --methods psr nsr --seeds 0 --n 256 --sweep clip_eps=0 --sweep clip_low=0
    --sweep clip_high=0 --sweep mini_batch_size=none --out runs/q4` ({t_q4}).
    Some rows are identical to the digit: which, and why (which side of the clip does each objective
    ever meet)? What do clipping and the number of optimizer steps per batch change for PSR and for NSR?

Q5. The normaliser. `python reproduce.py --methods psr nsr --seeds 0 --n 256 --sweep normalizer=constant
    --out runs/q5` ({t_q5}). What does a token mean over the mini-batch's response tokens do that a
    constant does not (think of PSR when few samples are right)?

Q6. Uncertainty (no run). From runs/q2/summary.json: what does an "inconclusive" verdict mean, and what
    would make it conclusive? Why does reproduce.py resample recipe seeds, problems and training seeds
    separately, and why are the two test splits of one run never two independent units?

Q7. Same expected gradient, different updates (docs/why.md). For one prompt, show in one line that
    E[r grad log pi] = E[(r - 1) grad log pi]. Then run `python reproduce.py --methods psr nsr --seeds 0
    --n 256 --sweep mini_batch_size=none --out runs/q7` ({t_q7}) and read each run's metrics.jsonl. How
    many optimizer steps per batch ('updates') did PSR and NSR make at the start and at the end of
    training, and why do they move apart? With one update per batch each, what happens to PSR's lead in
    easy Pass@1, to the entropy gap, and to PSR's hard Pass@256 against the base? What does this say
    about where the difference between PSR and NSR comes from?

Q1-Q6 together: {t_total} on 2 CPU cores (measured; the toy bases are built once and cached)."""

# Each question's wall time, measured on 2 CPU cores (2026-12-05, toy-v8) with the toy base of recipe seed 0
# already built (docs/assignment.md has the commands).
# Those runs evaluated with n = 256, as the questions' `--n 256` keeps them (reproduce.py's default is now the
# decisive 1,024). Q7 measured 2026-12-07 on a quiet 2-core machine, the base built: 118 s.
WRITEUP_TIMES = {"t_demo": "5 s", "t_q2": "115 s", "t_q3": "120 s", "t_q4": "220 s", "t_q5": "105 s",
                 "t_q7": "118 s", "t_total": "about 9.5 minutes (565 s)"}

WRITEUP = """# Write-up

Name:

Answer each question of HANDOUT.md "The write-up" here, with the numbers your runs printed.
"""


# =================================================================================================
# MAIN
# =================================================================================================

def format_grade(result: dict) -> str:
    lines = [f"{'problem':<16}{'points':>8}{'max':>6}  what failed"]
    for pid, r in result["problems"].items():
        first, *rest = feedback(r).splitlines() or ["-"]
        lines.append(f"{pid:<16}{r['points']:>8g}{r['max']:>6g}{' (bonus)' if r['bonus'] else ''}  {first}")
        lines += [" " * 32 + line for line in rest]
    lines.append(f"{'total':<16}{result['total']:>8g}{result['max']:>6g}")
    seconds = [f"{pid} {r['seconds']:g}" for pid, r in result["problems"].items() if "seconds" in r]
    if seconds:
        lines.append(f"seconds per problem's process: {', '.join(seconds)}")
    if result.get("isolation"):
        lines.append(f"student code ran {result['isolation']}")
    return "\n".join(lines)


FEEDBACK_CHARS = 2000                # a problem's feedback is at most about this long, cut between messages only


def feedback(r: dict, limit: int = FEEDBACK_CHARS) -> str:
    """What a student reads for one problem: FLAGGED first if it was; the first failing check in full (where,
    the input, expected vs actual); the other failing checks by their first line while they fit."""
    messages = ([f"FLAGGED: {len(r['flagged'])} way(s) of reaching code or files that graded code may not "
                 f"reach; 0 points"] if r.get("flagged") else []) + list(r["failed"])
    if not messages:
        return "-"
    out, left = [], len(messages)
    for i, message in enumerate(messages):
        text = message if i < 2 or len("\n".join(out)) + len(message) < limit / 2 else message.splitlines()[0]
        if len("\n".join(out + [text])) > limit - 60:
            break
        out.append(text)
        left -= 1
    return "\n".join(out + ([f"(and {left} more failing check(s), not shown)"] if left else []))


def build_parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per job of the kit."""
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
    sp.add_argument("--gradescope", type=pathlib.Path, default=None, metavar="FILE",
                    help="also write the grade to FILE as Gradescope's results.json")
    sp = sub.add_parser("check", help="(students) run every problem's visible tests in DIR, problem by problem")
    sp.add_argument("dir", type=pathlib.Path, nargs="?", default=pathlib.Path("."))
    sp = sub.add_parser("gradescope", help="write Gradescope's autograder zip to OUT (docs/assignment.md)")
    sp.add_argument("out", type=pathlib.Path)
    sp = sub.add_parser("submit", help="write DIR/submission.zip")
    sp.add_argument("dir", type=pathlib.Path)
    sub.add_parser("calibrate", help="measure the reference's results over several seeds (RESULT_TIERS)")
    sp = sub.add_parser("_outputs", help=argparse.SUPPRESS)           # a grading process (GRADE above)
    sp.add_argument("seeds", nargs="+", metavar="ID=SEED")
    sp.add_argument("--tests", action="store_true")
    sp.add_argument("--guard", action="store_true")
    sp.add_argument("--out", type=pathlib.Path, required=True)
    return parser


def grade_command(args, parser) -> None:
    """`grade DIR`: the table, and with --results / --gradescope / --json what they add."""
    args.dir = find_submission(args.dir)
    if not any((args.dir / name).is_file() for name in SOURCES):
        parser.error(f"{args.dir}: none of {', '.join(SOURCES)} there; give the directory of a student copy")
    if args.only and set(args.only) - set(CHECKS):
        parser.error(f"--only: unknown problem(s) {', '.join(sorted(set(args.only) - set(CHECKS)))}")
    start = time.time()
    try:
        result = grade(args.dir, only=args.only, jobs=max(1, args.jobs))
    except Exception as e:               # Gradescope shows the student this, not a missing-results error
        if args.gradescope:
            args.gradescope.write_text(json.dumps({"score": 0.0, "tests": [], "output": (
                f"The autograder failed ({type(e).__name__}: {e}); tell your instructor.")}) + "\n")
        raise
    if args.results:
        result["problems"]["results"] = grade_results(args.dir) | {"bonus": False, "seed": RESULT_SEED}
        result["total"] += result["problems"]["results"]["points"]
        result["max"] += result["problems"]["results"]["max"]
    print(format_grade(result))
    print(f"graded in {time.time() - start:.0f} s")
    if args.gradescope:
        args.gradescope.write_text(json.dumps(gradescope_results(result, time.time() - start), indent=1) + "\n")
        print(f"wrote {args.gradescope} (Gradescope's results.json)")
    if args.json:
        print(json.dumps({"total": result["total"], "max": result["max"],
                          "problems": {k: {"points": v["points"], "max": v["max"]}
                                       for k, v in result["problems"].items()}}))


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "handout":
        problems = handout(args.dir)
        print(f"handout written to {args.dir}: {len(problems)} problems "
              f"({sum(p.points for p in problems if not p.bonus):g} points + "
              f"{sum(p.points for p in problems if p.bonus):g} bonus); HANDOUT.md says what to do")
    elif args.command == "grade":
        grade_command(args, parser)
    elif args.command == "submit":
        for warning in submit_warnings(args.dir):
            print(f"WARNING: {warning}")
        print(f"wrote {submit(args.dir)}")
    elif args.command == "check":
        start = time.time()
        print(format_check(check(args.dir)))
        print(f"checked in {time.time() - start:.0f} s; the grader also runs one hidden differential check per "
              f"problem (HANDOUT.md, How you are graded)")
    elif args.command == "gradescope":
        names = gradescope_zip(args.out)
        print(f"wrote {args.out}: {', '.join(names)}; upload it as the autograder (docs/assignment.md)")
    elif args.command == "calibrate":
        print(f"RESULT_TIERS = {json.dumps(calibrate())}")
    else:
        outputs_process({k: int(v) for k, v in (item.split("=") for item in args.seeds)}, args.tests, args.out,
                        args.guard)
    return 0


if __name__ == "__main__":
    sys.exit(main())
