"""
verifier.py -- exact-match verification of math answers: the reward r in {0, 1} of every rollout.

The whole idea
--------------
    answer  = extract_answer(response)        # content of the last complete \\boxed{...}
                                              # (or "the answer is X" / "Answer: X" without a box)
    r       = 1  if  same(normalize(answer), normalize(gold))  else 0

`normalize_answer` rewrites the many ways of writing one answer into one canonical string (each rule is
a named step with a before -> after example below). `is_correct` then compares the canonical strings
with a little structure on top, but no symbolic algebra:

    * equal strings                                  -> correct
    * plain numbers (integers, decimals, a/b, \\frac{a}{b}, mixed numbers 7\\frac{3}{4} and 7 3/4,
      3\\times10^{5}, 3e5, 3 million) are compared by exact value with fractions.Fraction:
      0.5 == .5 == 1/2 == \\frac{2}{4}, but 0.333 != 1/3 (no tolerance, so no rounding can slip through)
    * a/b with symbols, where it cannot be misread   -> \\frac{a}{b}: \\sqrt{3}/2 == \\frac{\\sqrt{3}}{2}
    * bare comma lists ("enter all solutions")       -> unordered, same length
    * (a,b), [a,b), (a,b], [a,b] tuples/intervals   -> in order, and the brackets must be identical
    * A \\cup B unions, matrices (pmatrix, bmatrix,  -> in order, element by element
      an array in brackets)
    * "x = 3" against "3"                            -> correct; "x = 5" against "y = 5" is not
    * a base subscript on one side only              -> 204_5 == 204 (the problem names the base);
                                                        204_5 != 204_6, 204_5 != 54

Normalization also merges relations (\\geq == \\ge == >=), an inequality of one variable with the
interval it describes (-2 \\le x \\le 5 == x \\in [-2,5] == [-2,5]; x \\ge 3 == [3,\\infty) != x > 3), the
names of the empty and the universal set (\\varnothing == \\{\\} == \\emptyset; \\mathbb{R} == (-\\infty,\\infty)),
words for small integers (five == 5), thousands separators (14{,}916 == 14 {, }916 == 14916) and a
single value in parentheses (\\left( 5 \\right) == 5).

False positives are worse than false negatives in RL (the policy learns to produce them), so every rule
only merges notations of the SAME value; when in doubt we say "wrong". Hedges ("3 or 4", two values in one
box when one is asked for, "\\boxed{3} or \\boxed{4}") are wrong.

Departures from the official MATH / Qwen2.5-Math graders (numbered)
-------------------------------------------------------------------
1. No "last number in the text" fallback. The official evaluation code falls back to the last number
   when there is no box; that rewards unformatted output and lets a response that was cut off mid-way
   through its reasoning score by accident (the last intermediate number is sometimes the answer).
   An RL policy would learn to exploit both. A response without a box or an "answer is" phrase scores 0.
2. An unclosed or empty last \\boxed is no answer (the official code takes whatever follows).
3. No sympy: equal values written differently (\\sqrt{8} vs 2\\sqrt{2}, x^2-1 vs (x-1)(x+1)) are
   false negatives, by design; a false negative costs a little signal, a false positive teaches a lie.
4. Exact rational comparison of plain numbers instead of float tolerance (1/3 != 0.3333).
5. A thousands separator is only removed in exact 3-digit groups written without a space after the comma
   (1,000 / 1{,}000 / 1\\,000 / 1\\!000 -> 1000), so "1,2" and "81, 256" stay lists.
6. Unsimplified fractions count: \\frac{2}{4} == \\frac{1}{2} (the official string match says no). MATH asks
   for the simplest form, but under NSR a grader that rejects a right value pushes that response down.
7. Nothing that changes the answer is silently dropped: text after the value that is not a unit
   ("5 \\text{ is wrong}"), a trailing "?" ("7?") and characters that are not text (a lone surrogate from
   bad UTF-8) stay, so the answer is wrong (Hendrycks' unit removal keeps whatever precedes "\\text{ ",
   so "5 \\text{ is wrong}" is 5 there).

Cost: linear in the input. No backtracking regular expressions on unbounded text, no recursion that the
input's nesting controls (brace matching uses an explicit stack), answers longer than MAX_ANSWER_CHARS
are not answers (the cap is on the extracted answer, not on the response: the last complete box of a
300,000-character response with 40,000 boxes decides), numbers longer than MAX_NUMBER_CHARS are compared
as canonical digit strings (Python's int <-> str limit of 4300 digits can never raise). Standard library
only.

Run:  python verifier.py     # MATH self-consistency rate + worst-case timings of adversarial inputs
Tests: python -m pytest -q test_nsr.py -k "test_verifier_ or test_normalize_answer"
"""

from __future__ import annotations

import re
import unicodedata
from fractions import Fraction

# A final answer longer than this is not an answer (a real one is a few hundred characters at most);
# the cap also keeps the pure-Python passes well inside the 50 ms budget on 300,000-character inputs.
MAX_ANSWER_CHARS = 10_000
# Numbers with more characters than this are compared as canonical strings, not as Fractions.
MAX_NUMBER_CHARS = 400
# At most this many items in a list/tuple/matrix are matched pairwise (the matching is quadratic).
MAX_ITEMS = 400


# =================================================================================================
# EXTRACTION: the last complete \boxed{...}, or a final-answer phrase
# =================================================================================================

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
# `\boxed 5`, `\boxed -3.5`, `\boxed \pi`: the box argument is a single token
_SPACES_RE = re.compile(r"\s*")
_BOX_TOKEN_RE = re.compile(r"\s*(-?[A-Za-z0-9.]+|\\[A-Za-z]+)")
# what may sit between two boxes that together give one list answer: "\boxed{2}, \boxed{3}"
_BOX_SEP_RE = re.compile(r"(?:\s|\$|,|;|\\quad|\\qquad|\\[,;:! ]|\\[()\[\]]|\band\b|\\text\{\s*and\s*\})*")
_BOX_HEDGE_RE = re.compile(r"\bor\b|\\text\{\s*or\s*\}")
_PHRASES = ("final answer is", "the answer is", "answer is:", "final answer", "answer:", "####")


# PROBLEM boxed (10 points): the content of one \boxed{...}, braces matched, within a bounded window
def _box_at(text: str, start: int, end_of_name: int):
    """Parse the box whose name (\\boxed, \\fbox) spans text[start:end_of_name] -> (content, end) or None.

    After any whitespace: a "{" opens the box; braces are counted, except escaped ones (\\{ \\}), only
    within a window of MAX_ANSWER_CHARS + 2 characters from that "{"; the box ends where the count returns
    to 0: content = what lies strictly between, end = the index just past the closing "}". An empty
    (whitespace-only) content, or a box not closed within the window, is None. Without a "{": the
    shorthand "\\boxed 5": _BOX_TOKEN_RE matched at end_of_name gives a token that counts if it starts
    with a digit, "-", "." or "\\", or is separated from the name by whitespace; its content is the token
    without trailing dots, end = the match's end. Anything else: None.
    """
    n = len(text)
    i = _SPACES_RE.match(text, end_of_name).end()       # a regex, not a Python loop: 300k spaces are fine
    if i < n and text[i] == "{":
        # proper brace matching, but only inside a bounded window: an answer longer than
        # MAX_ANSWER_CHARS counts as no answer, and the scan stays linear
        window_end = min(n, i + MAX_ANSWER_CHARS + 2)
        depth = 0
        for m in re.finditer(r"(?<!\\)[{}]", text[i:window_end]):
            depth += 1 if m.group() == "{" else -1
            if depth == 0:
                content = text[i + 1:i + m.start()]
                return (content, i + m.end()) if content.strip() else None
        return None                      # unclosed (or absurdly long) box: no answer
    m = _BOX_TOKEN_RE.match(text, end_of_name)
    if m and (m.group(1)[0] in "0123456789-.\\" or m.start(1) > end_of_name):
        return m.group(1).rstrip("."), m.end()
    return None


def extract_answer(text) -> str | None:
    """The final answer of a response: the content of the last complete \\boxed{...} / \\fbox{...}.

    "...so the sum is \\boxed{\\frac{1}{2}}."                 -> "\\frac{1}{2}"
    "\\boxed{2}, \\boxed{3}"  (a trailing run of boxes)         -> "2, 3"
    "\\boxed{2} or \\boxed{3}"  (a hedge)                       -> None
    "The final answer is $42$. I hope it is correct."           -> "42"
    "Answer: 42"  /  "**Final Answer**\\n\\n$42$"                  -> "42"
    "\\boxed{12"  (unclosed)  /  "\\boxed{}"  /  "the sum is 42" -> None   (no last-number fallback)
    """
    if not isinstance(text, str) or not text:
        return None
    boxes = list(_BOX_RE.finditer(text))
    return _box_run_answer(text, boxes) if boxes else _phrase_answer(text)


def _box_run_answer(text: str, boxes: list) -> str | None:
    """The answer in the last box, joined with the boxes just before it when they form one list
    ("\\boxed{2}, \\boxed{3}" -> "2, 3"); None for an unclosed last box or a hedge."""
    last = _box_at(text, boxes[-1].start(), boxes[-1].end())
    if last is None:
        return None
    parts = [last[0]]
    # a run of boxes separated only by commas/"and"/math delimiters is one list answer
    next_start = boxes[-1].start()
    for b in reversed(boxes[-MAX_ITEMS:-1]):
        prev = _box_at(text, b.start(), b.end())
        if prev is None or prev[1] > next_start:
            break
        between = text[prev[1]:next_start]
        if len(between) > 80 or _BOX_SEP_RE.fullmatch(between) is None:
            if len(between) <= 80 and _BOX_HEDGE_RE.search(between) and \
                    _BOX_SEP_RE.fullmatch(_BOX_HEDGE_RE.sub("", between)):
                return None          # "\boxed{3} or \boxed{4}": a hedge is no answer
            break
        parts.append(prev[0])
        next_start = b.start()
    if len(set(parts)) == 1:         # the same box repeated is one answer
        return parts[0].strip()
    return ", ".join(reversed(parts)).strip()


def _phrase_answer(text: str) -> str | None:
    """The answer after the last final-answer phrase of a response without a box, or None."""
    # No box: the last final-answer phrase anywhere in the response (the length cap is on the answer,
    # not on the response), followed by the value on the same line or, after a heading such as
    # "**Final Answer**", on the next non-empty line:
    #   "Answer: 42" -> "42";  "**Final Answer**\n\n$42$" -> "42";
    #   Minerva's "Final Answer: The final answer is $X$. I hope it is correct." -> "X"
    # (str.rfind is 10x faster than a regex here; lower() keeps every position except after "İ", which
    # lower-cases to two characters, so it is replaced first)
    lower = text.replace("\u0130", "I").lower()
    start, phrase = max((lower.rfind(p), p) for p in _PHRASES)    # the last one; at a tie the longer
    if start < 0:
        return None
    rest = text[start + len(phrase):].lstrip(" \t\r\n:*")
    for open_, close in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if rest.startswith(open_):
            end = rest.find(close, len(open_), len(open_) + MAX_ANSWER_CHARS + len(close))
            if end < 0:
                return None
            rest = rest[len(open_):end]
            break
    else:
        rest = rest.split("\n", 1)[0]
        cut = rest.find(". ")                            # end of the sentence, not a decimal point
        if cut >= 0:
            rest = rest[:cut]
    rest = rest.strip().rstrip(".").strip()
    return rest if rest and len(rest) <= MAX_ANSWER_CHARS else None


# =================================================================================================
# NORMALIZATION: one canonical string per answer (Hendrycks' steps, extended)
# =================================================================================================

# Unicode symbols a model may print, mapped to LaTeX before NFKC (NFKC would turn "x²" into "x2").
_UNICODE_MAP = {
    "\u2212": "-", "\u2013": "-", "\u2014": "-", "\u00d7": "\\times ", "\u22c5": "\\cdot ",
    "\u00b7": "\\cdot ", "\u00f7": "\\div ", "\u03c0": "\\pi ", "\u221e": "\\infty ",
    "\u221a": "\\sqrt", "\u00b0": "^\\circ", "\u00b2": "^2", "\u00b3": "^3", "\u2264": "\\le ",
    "\u2265": "\\ge ", "\u2260": "\\ne ", "\u00b1": "\\pm ", "\u222a": "\\cup ", "\u2229": "\\cap ",
    "\u2205": "\\emptyset ", "\u211d": "\\mathbb{R}", "\u20ac": "", "\u00a3": "", "\u00a5": "",
}
_UNICODE_RE = re.compile("|".join(map(re.escape, _UNICODE_MAP)))
# Characters that are not text: control characters (not whitespace) and lone surrogates (bad UTF-8).
_INVALID_RE = re.compile(r"[\x00-\x08\x0e-\x1b\x7f\ud800-\udfff]")

# Commands whose braced argument is kept as plain text: \text{cm} -> cm
_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|textit|textrm|textsf|texttt|textnormal|textup|mathrm|mathbf|"
                          r"mathit|mathsf|mathtt|mathbb|mathnormal|mbox|hbox|operatorname|boxed|fbox|"
                          r"emph|bf|rm)\s*\{")
# Words that make trailing text a qualifier or a hedge, never a unit: "3 \text{ or more}" stays.
_LOGIC_WORDS = {"or", "and", "not", "no", "more", "less", "than", "least", "most", "at", "to", "about",
                "approximately", "between", "plus", "minus", "times", "if", "only", "none", "all",
                "each", "both", "either", "neither", "undefined", "infinite", "infinity", "true", "false",
                "yes", "impossible", "exist", "exists", "any", "every",
                "other", "except", "but", "over", "under", "above", "below", "nearly", "almost",
                # number words and symbols: "5 \text{ thousand}" is not 5
                "hundred", "hundreds", "thousand", "thousands", "million", "millions", "billion",
                "billions", "dozen", "dozens", "half", "halves", "third", "thirds", "quarter",
                "quarters", "tenth", "tenths", "hundredths", "squared", "cubed", "factorial",
                "negative", "positive", "inverse", "i", "e", "pi",
                # a sentence or a judgement, not a unit: "5 \text{ is wrong}", "5 \text{ I think}"
                "is", "are", "was", "were", "be", "been", "wrong", "incorrect", "maybe", "perhaps", "probably",
                "possibly", "likely", "approx", "roughly", "around", "guess", "think", "sure", "unsure", "we",
                "it", "this", "that", "answer", "wait", "check"}
# Unit words dropped when they follow a number outside \text{} too ("10 cm" -> "10"). Single letters
# (m, s, g, h, l, in) are left out: outside \text{} they are variables ("5m" is five times m).
_UNIT_WORDS = ("units|unit|square|sq|cubic|cu|centimeters|centimeter|centimetres|centimetre|cm|mm|"
               "millimeters|millimeter|km|kilometers|kilometer|meters|meter|metres|metre|inches|inch|"
               "feet|foot|ft|yards|yard|yd|miles|mile|mph|kph|kg|kilograms|kilogram|grams|gram|lbs|lb|"
               "pounds|pound|ounces|ounce|oz|seconds|second|sec|minutes|minute|min|hours|hour|hrs|hr|"
               "days|day|weeks|week|months|month|years|year|degrees|degree|deg|dollars|dollar|cents|"
               "cent|liters|liter|litres|litre|ml|gallons|gallon|cups|cup|percent|pct|radians|radian|"
               "rad|per")
_TAIL_UNIT_RE = re.compile(r"(?<=[0-9}).])\s*\{?(?:\s*(?:" + _UNIT_WORDS + r"))+\s*\}?(?:\^\{?[23]\}?)?\s*$",
                           re.IGNORECASE)
_POWER_AFTER_UNIT_RE = re.compile(r"\s*\^\s*(?:\{\s*[23]\s*\}|[23])")

_DELIMS_RE = re.compile(r"\\\$|\$|\\\(|\\\)|\\\[|\\\]|\\displaystyle|\\textstyle")
_SIZING_RE = re.compile(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|biggl|biggr|Biggl|Biggr|big|Big|bigg|Bigg)"
                        r"(?:(?![A-Za-z])\.?)")
_FRAC_VARIANTS_RE = re.compile(r"\\(?:dfrac|tfrac|cfrac)(?![A-Za-z])")
_BINOM_VARIANTS_RE = re.compile(r"\\(?:dbinom|tbinom)(?![A-Za-z])")
_DEGREE_RE = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|\\degree|\\textdegree")
_PERCENT_RE = re.compile(r"\\%|%")
_BRACE_COMMA_RE = re.compile(r"\{ ?, ?\}(?=( ?\d{3}(?!\d))?)")
_SPACING_RE = re.compile(r"\\[,;:> ]|\\quad|\\qquad|~|\\hspace\{[^{}]{0,20}\}")
_AND_RE = re.compile(r"\s*,?\s+and\s+", re.IGNORECASE)
_DIGIT_GAP_RE = re.compile(r"(?<=\d)\s+(?=\d)")
_WS_RE = re.compile(r"\s+")
_AMBIGUOUS_COMMA = "\x02"      # a "1,000"-style comma: thousands separator or list comma
_THOUSANDS_RE = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_ARG_CMD_RE = re.compile(r"\\(frac|binom|sqrt)(?![A-Za-z])")
_TOKEN_RE = re.compile(r"\\[A-Za-z]+|[0-9A-Za-z]")
_SCRIPT_BRACE_RE = re.compile(r"([\^_])\{([0-9A-Za-z])\}")      # a^{2} -> a^2, x_{1} -> x_1
_INFTY_RE = re.compile(r"\\infin(?![A-Za-z])|(?<![A-Za-z\\])(?:infinity|inf)(?![A-Za-z])",
                       re.IGNORECASE)
_SLASH_FRAC_RE = re.compile(r"(\d+)/(\d+)(?![\w.{])")  # 3/4 -> \frac{3}{4} (see _slash_frac)
_NUMBER_RE = re.compile(r"(?<![\d.\x02])(\d*)\.(\d+)(?![\d.])|(?<![\d.\x02])(0+)(\d)")
_CHOICE_RE = re.compile(r"\(\{?([A-Za-z])\}?\)")
_EMPTY_SET_RE = re.compile(r"\\(?:varnothing|emptyset)(?![A-Za-z])|\\\{(?: |\\[,;:! ])*\\\}"
                           r"|(?i:\b(?:the )?empty set\b)")
_REALS_RE = re.compile(r"\\(?:mathbb|Bbb) ?(?:\{ ?R ?\}|R(?![A-Za-z]))|\\R(?![A-Za-z])"
                       r"|(?i:\ball real numbers\b|\ball reals\b)")
_RELATIONS = {"geqslant": ">=", "geqq": ">=", "geq": ">=", "ge": ">=", "gt": ">", "leqslant": "<=", "leqq": "<=",
              "leq": "<=", "le": "<=", "lt": "<", "neq": "!=", "ne": "!=", "not": "!="}
# "\leq" may touch a letter ("\leqg(x)": MATH's golds lost some spaces); "\le" may not ("\left")
_RELATION_RE = re.compile(r"\\(?:(geqslant|leqslant|geqq|leqq|geq|leq|neq)|(ge|le|ne|gt|lt)(?![A-Za-z])"
                          r"|(not) ?=)")
_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
_NUMBER_WORDS = {**{w: str(i) for i, w in enumerate(_ONES)},       # "five" -> "5", "twenty-one" -> "21"
                 **{t + u: str(20 + 10 * k + i) for k, t in enumerate(_TENS)
                    for i, u in enumerate([""] + ["-" + w for w in _ONES[1:10]])}}


def _brace_matches(s: str) -> dict[int, int]:
    """{index of '{': index of its matching '}'} for all balanced braces, in one stack pass (no recursion).
    Escaped braces \\{ \\} are set braces, not groups, and are skipped."""
    stack, match = [], {}
    for m in re.finditer(r"(?<!\\)[{}]", s):
        if m.group() == "{":
            stack.append(m.start())
        elif stack:
            match[stack.pop()] = m.start()
    return match


def _brace_shorthand(s: str) -> str:
    """Braces around the single-token arguments of \\frac, \\binom, \\sqrt (TeX reads one token):
    "\\frac12" -> "\\frac{1}{2}";  "\\frac{\\sqrt{6}}2" -> "\\frac{\\sqrt{6}}{2}";  "\\frac\\pi2" -> "\\frac{\\pi}{2}";
    "\\sqrt2x" -> "\\sqrt{2}x";  "\\sqrt[3]2" -> "\\sqrt[3]{2}". One pass with a brace table, no recursion."""
    cmds = list(_ARG_CMD_RE.finditer(s))
    if not cmds:
        return s
    match = _brace_matches(s)
    inserts: list[tuple[int, str]] = []          # (position, text to insert before it)
    for m in cmds:
        i = m.end()
        if m.group(1) == "sqrt" and s.startswith("[", i):
            close = s.find("]", i, i + 50)
            if close < 0:
                continue
            i = close + 1
        for _ in range(1 if m.group(1) == "sqrt" else 2):
            if s.startswith(" ", i):               # "\frac 3 8", "\sqrt x" (runs are one space here)
                i += 1
            if i < len(s) and s[i] == "{":
                if i not in match:
                    break
                i = match[i] + 1
                continue
            t = _TOKEN_RE.match(s, i)
            if not t:
                break
            inserts += [(t.start(), "{"), (t.end(), "}")]
            i = t.end()
    if not inserts:
        return s
    inserts.sort(key=lambda x: x[0])
    out, last = [], 0
    for pos, text in inserts:
        out.append(s[last:pos])
        out.append(text)
        last = pos
    out.append(s[last:])
    return "".join(out)


def _unwrap_text_commands(s: str) -> str:
    """\\text{...}, \\textbf, \\mathrm, \\mbox, \\boxed, ... unwrapped; a trailing unit group dropped.

    "\\text{Evelyn}" -> "Evelyn";  "10\\text{ cm}^2" -> "10";  "5\\mbox{ apples}" -> "5";
    "3\\text{ or }4" -> "3 or 4" (not at the end: a hedge, kept);  "3\\text{ or more}" kept.
    """
    cmds = list(_TEXT_CMD_RE.finditer(s))
    if not cmds:
        return s
    match = _brace_matches(s)
    keep = bytearray(b"\x01") * len(s)        # keep[i] == 0 -> character i is deleted
    for m in cmds:
        open_ = m.end() - 1
        close = match.get(open_)
        if close is None:
            continue
        content = s[open_ + 1:close]
        after = _POWER_AFTER_UNIT_RE.match(s, close + 1)
        end = after.end() if after else close + 1
        words = re.findall(r"[A-Za-z]+", content)
        before = s[:m.start()].strip()[-1:]   # something precedes: "\text{cm}" alone is an answer
        is_unit = (words and re.fullmatch(r"[A-Za-z .]+", content) is not None
                   and not _LOGIC_WORDS.intersection(w.lower() for w in words)
                   and before != ""
                   and s[end:].strip(" .,;$") == "")
        if is_unit:
            keep[m.start():end] = bytes(end - m.start())
        else:
            keep[m.start():open_ + 1] = bytes(open_ + 1 - m.start())
            keep[close] = 0
    return "".join(c for c, k in zip(s, keep) if k)


def _canonical(s) -> str:
    """All normalisation steps except dropping an "x =" prefix (see normalize_answer)."""
    if not isinstance(s, str):
        return ""
    s = s.strip()
    if len(s) > MAX_ANSWER_CHARS:             # not an answer (is_correct rejects it): returned as is
        return s
    return _canonical_structure(_canonical_separators(_canonical_symbols(s)))


def _canonical_symbols(s: str) -> str:
    """Steps 1-8 of _canonical: characters, wrappers and symbols, each to one spelling."""
    # 1. Unicode: symbols to LaTeX, then NFKC.  "−½ × π" -> "-1/2 \times \pi";  "x²" -> "x^2";
    #    "90°" -> "90^\circ". A character that is not text (a control character, a lone surrogate from
    #    bad UTF-8) becomes U+FFFD and is KEPT: dropping it would make "7\ud800" equal "7".
    s = _INVALID_RE.sub("\ufffd", s)
    s = _UNICODE_RE.sub(lambda m: _UNICODE_MAP[m.group()], s)
    s = unicodedata.normalize("NFKC", s).replace("\u2044", "/").replace("\\\\", "\x01")   # "\\" row break
    # every whitespace run becomes one space here and after each step that makes spaces, so that no
    # later pattern with \s* / \s+ can backtrack over a long run (that would be quadratic)
    s = _WS_RE.sub(" ", s)

    # 2. Names of the empty and the universal set (before step 3 would unwrap \mathbb{R} to the letter "R"):
    #    "\varnothing" / "\{\}" / "\{ \}" / "∅" / "the empty set" -> "\emptyset";
    #    "\mathbb{R}" / "\mathbb R" / "\R" / "ℝ" / "all real numbers" -> "(-\infty,\infty)"
    s = _REALS_RE.sub(r"(-\\infty,\\infty)", _EMPTY_SET_RE.sub(r"\\emptyset", s))

    # 3. \text{...}-like wrappers unwrapped, trailing units in them dropped (see _unwrap_text_commands).
    s = _unwrap_text_commands(s)

    # 4. Math delimiters and currency: "$\$5$" -> "5";  "\(x\)" -> "x"
    s = _DELIMS_RE.sub("", s)

    # 5. Sizing: "\left( \frac{1}{3} \right)" -> "( \frac{1}{3} )";  "\left.x\right|" -> "x|"
    s = _SIZING_RE.sub("", s)

    # 6. Fraction and binomial variants: "\dfrac{3}{2}" / "\tfrac" / "\cfrac" -> "\frac{3}{2}"
    s = _FRAC_VARIANTS_RE.sub(r"\\frac", s)
    s = _BINOM_VARIANTS_RE.sub(r"\\binom", s)

    # 7. Relations, to ASCII before the spaces go ("\ge x" must not become "\gex"):
    #    "\geq" / "\ge" / "\geqslant" / "≥" -> ">=";  "\leq" / "\le" -> "<=";  "\neq" / "\ne" / "\not=" -> "!=";
    #    "\gt" -> ">"
    s = _RELATION_RE.sub(lambda m: _RELATIONS[m.group(1) or m.group(2) or m.group(3)], s)

    # 8. Degrees and percent: "90^{\circ}" / "90^\circ" / "90°" -> "90";  "28\%" / "28%" -> "28"
    s = _DEGREE_RE.sub("", s)
    return _PERCENT_RE.sub("", s)


def _canonical_separators(s: str) -> str:
    """Steps 9-12 of _canonical: spacing, separators, "and" lists, trailing units, thousands commas."""
    # 9. Spacing commands and the {,} / ,\! thousands separators: "1\,000" -> "1 000";
    #    "14{,}916" / "14 {, }916" -> "14916";  "1,\!000" -> "1,000"
    s = _BRACE_COMMA_RE.sub(lambda m: "" if m.group(1) else ",", s).replace("\\!", "")
    s = _WS_RE.sub(" ", _SPACING_RE.sub(" ", s))

    # 10. "and" between items is a list comma: "1 and 2" -> "1, 2"  (a hedge "3 or 4" is left alone)
    s = _AND_RE.sub(", ", s)

    # 11. Trailing unit words after a number: "10 cm" -> "10";  "12 square units" -> "12"
    #     (only the last 80 characters are searched: a unit is short, and the search stays linear)
    s = s[:-80] + _TAIL_UNIT_RE.sub("", s[-80:])

    # 12. Thousands separators in exact 3-digit groups of the whole answer: "1,000" -> "1000",
    #     "-12,345.5" -> "-12345.5"; "1,2", "1,0000" and "81, 256" (a space after the comma) are lists.
    #     A gold like "60,120" is ambiguous (MATH writes both 1,657 and the list 60,120 this way), so
    #     the comma is marked and _same accepts either reading; normalize_answer shows the number.
    s = s.strip().rstrip(".,;: ").lstrip(",;: ")           # never "!" (5! is 120) nor "?" ("7?" is a doubt)
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", _AMBIGUOUS_COMMA)
    return s


def _canonical_structure(s: str) -> str:
    """Steps 13-25 of _canonical: the spacing is settled; now LaTeX shorthand, braces, numerals, words."""
    # 13. LaTeX shorthand, before the spaces go ("\sqrt x" must not become the command "\sqrtx"):
    #      "\frac12" -> "\frac{1}{2}";  "\dfrac 3 8" -> "\frac{3}{8}";  "\sqrt2" -> "\sqrt{2}"
    s = _brace_shorthand(s)

    # 14. Whitespace. A gap between digits is a thousands separator only before an exact group of three
    #     ("1 000" -> "1000"); otherwise it is kept as one space so that "3 4" never becomes "34".
    s = _DIGIT_GAP_RE.sub(lambda m: "" if re.match(r"\d{3}(?!\d)", s[m.end():m.end() + 4]) else " ", s)
    s = _WS_RE.sub(lambda m: m.group() if m.group() == " " and _is_digit_gap(s, m) else "", s)

    # 15. Trailing punctuation: "5." -> "5";  "(1,2)." -> "(1,2)"
    s = s.rstrip(".,;: ").lstrip(",;: ")

    # 16. Single-token braces: "a^{2}" -> "a^2";  "x_{1}" -> "x_1"
    s = _SCRIPT_BRACE_RE.sub(r"\1\2", s)

    # 17. Infinity and set braces: "infinity" / "inf" / "\infin" -> "\infty";  "+\infty" -> "\infty";
    #     "\{1,2\}" -> "{1,2}"
    s = _INFTY_RE.sub(r"\\infty", s).replace("+\\infty", "\\infty")
    s = s.replace("\\{", "{").replace("\\}", "}")

    # 18. Empty groups and redundant outer braces: "2,{}4" -> "2,4";  "{5}" -> "5";  "{{A,D}}" -> "A,D"
    s = s.replace("{}", "") if "{}" in s and "\\begin" not in s else s
    s = _strip_outer(s, "{", "}")

    # 19. Integer fractions with a slash: "3/4" -> "\frac{3}{4}";  "-10/9" -> "-\frac{10}{9}"
    #     (a symbolic a/b, "\sqrt{3}/2", is compared as \frac{a}{b} by _same: see _slash_to_frac)
    if "/" in s:
        s = _SLASH_FRAC_RE.sub(lambda m: _slash_frac(s, m), s)

    # 20. Numerals: leading zeros, trailing decimal zeros, bare leading point:
    #     ".5" -> "0.5";  "5.0" -> "5";  "2.50" -> "2.5";  "004" -> "4"
    s = _NUMBER_RE.sub(_canonical_numeral, s)

    # 21. A lone multiple-choice letter in parentheses: "(C)" -> "C",  "({H})" -> "H"
    m = _CHOICE_RE.fullmatch(s)
    if m:
        s = m.group(1).upper()

    # 22. A single value in parentheses is that value: "\left( 5 \right)" -> "5";  "(x+1)" -> "x+1";
    #     a tuple "(1,2)", an interval "(0,1]" and a product "(1)(2)" are kept
    inner = _strip_outer(s, "(", ")")
    if inner != s and len(_split_top(inner, ",")) == 1:
        s = inner

    # 23. Plain words compare without case: "East" -> "east"
    if len(s) >= 3 and s.isalpha():
        s = s.lower()

    # 24. Words for small integers, as the whole answer: "five" -> "5";  "Twenty-One" -> "21"
    s = _NUMBER_WORDS.get(s.lower(), s)

    # 25. Inequalities of one variable are the interval they describe (see _inequality_interval):
    #     "-2<=x<=5" -> "x\in[-2,5]";  "x>=3" -> "x\in[3,\infty)";  "x>3" -> "x\in(3,\infty)"
    if "<" in s or ">" in s:
        s = _inequality_interval(s)
    return s.rstrip(".")


def _slash_frac(s: str, m) -> str:
    """3/4 -> \\frac{3}{4}, unless the numerator continues a word or a number: "x3/4", "1.5/2", "{a}3/4".
    (The check is here and not a regex look-behind: a look-behind at the front makes re try it at
    every position, which is several times slower on long inputs.)"""
    before = s[m.start() - 1] if m.start() > 0 else ""
    if before and (before.isalnum() or before in "._}"):
        return m.group()
    return "\\frac{%s}{%s}" % (m.group(1), m.group(2))


_INEQUALITY_RE = re.compile(r"(<=|>=|<|>)")
_FLIP = {"<": ">", ">": "<", "<=": ">=", ">=": "<="}
# x, x_1, \theta -- but not \infty or \pi
_VARIABLE_RE = re.compile(r"[A-Za-z](?:_\{?[0-9A-Za-z]{1,3}\}?)?|\\(?!(?:infty|pi)(?![A-Za-z]))[A-Za-z]+")
_NOT_A_BOUND_RE = re.compile(r"[=,;!|&]")


def _inequality_interval(s: str) -> str:
    """"-2<=x<=5" -> "x\\in[-2,5]";  "5>x" -> "x\\in(-\\infty,5)";  "x>=3" -> "x\\in[3,\\infty)". Only one
    variable against bounds that are not variables, so that both forms are the same set: "x<y",
    "f(x)>0", "1<x>0" and "x<1,x>3" are left alone."""
    terms = _INEQUALITY_RE.split(s)
    terms, ops = terms[::2], terms[1::2]
    if len(ops) not in (1, 2) or any(not t or _NOT_A_BOUND_RE.search(t) for t in terms):
        return s
    if all(op[0] == ">" for op in ops):              # "5>=x>-2" -> "-2<x<=5";  "x>3" -> "3<x"
        terms, ops = terms[::-1], [_FLIP[op] for op in reversed(ops)]
    if any(op[0] != "<" for op in ops):
        return s
    is_var = [_VARIABLE_RE.fullmatch(t) is not None for t in terms]
    if is_var == [True, False]:                      # "x<3" -> "-\infty<x<3"
        terms, ops = ["-\\infty"] + terms, ["<"] + ops
    elif is_var == [False, True]:                    # "3<x" -> "3<x<\infty"
        terms, ops = terms + ["\\infty"], ops + ["<"]
    elif is_var != [False, True, False]:
        return s
    low, x, high = terms
    return "%s\\in%s%s,%s%s" % (x, "[" if ops[0] == "<=" else "(", low, high, "]" if ops[1] == "<=" else ")")


def _is_digit_gap(s: str, m) -> bool:
    return 0 < m.start() and m.end() < len(s) and s[m.start() - 1].isdigit() and s[m.end()].isdigit()


def _canonical_numeral(m) -> str:
    if m.group(2) is not None:                       # a decimal: int part group(1), fraction group(2)
        whole = m.group(1).lstrip("0") or "0"
        frac = m.group(2).rstrip("0")
        return whole + ("." + frac if frac else "")
    return m.group(4)                                # leading zeros of an integer: "004" -> "4"


def _strip_outer(s: str, open_: str, close: str) -> str:
    """Remove the outer open_/close pairs that enclose the whole string: "{{5}}" -> "5", "{1}+{2}" kept.
    One stack pass over the brackets (linear even for 5,000 nested pairs), no recursion."""
    if not s.startswith(open_) or not s.endswith(close):
        return s
    stack, partner = [], {}
    for m in re.finditer(re.escape(open_) + "|" + re.escape(close), s):
        if m.group() == open_:
            stack.append(m.start())
        elif stack:
            partner[stack.pop()] = m.start()
    k, n = 0, len(s)
    while k < n - 1 - k and partner.get(k) == n - 1 - k:
        k += 1
    return s[k:n - k].strip() if k else s


_VAR_PREFIX_RE = re.compile(r"([A-Z]{2}(?![A-Za-z])|[A-Za-z](?:_\{?[0-9A-Za-z]{1,3}\}?)?|\\[A-Za-z]+)(=|\\in(?![A-Za-z]))")


def _split_variable(s: str) -> tuple[str | None, str]:
    """("x", "3") for "x=3"; (None, s) when there is no single-variable prefix.
    A chain "x=2+1=3" gives its last part, "3"; "x+y=1", "f(x)=..." and lists "x=1,y=2" are left alone
    here (list items are compared one by one, each with its own prefix). A link that ends in a letter
    starts a second equation, "x=5 or y=6" ("x=5ory=6" here): a hedge, left alone."""
    m = _VAR_PREFIX_RE.match(s)
    if not m or m.group(1) in ("\\frac", "\\sqrt", "\\pm", "\\infty", "\\pi"):
        return None, s
    rest = s[m.end():]
    if m.group(2) == "=":
        links = _split_top(rest, "=")
        if len(_split_top(rest, ",")) > 1 or any(link[-1:].isalpha() for link in links[:-1]):
            return None, s
        rest = links[-1]
    return (m.group(1), rest) if rest else (None, s)


def normalize_answer(s) -> str:
    """The canonical form of one answer string (see the numbered steps in _canonical), then the
    "x =" / "k =" prefix of a single variable dropped: "$x = \\dfrac{1}{2}$" -> "\\frac{1}{2}"."""
    return _split_variable(_canonical(s).replace(_AMBIGUOUS_COMMA, ""))[1]


# =================================================================================================
# COMPARISON: strings, exact values, lists, tuples, intervals, matrices
# =================================================================================================

_NUM = r"(?:\d+(?:\.\d+)?|\.\d+)"
_PLAIN_RE = re.compile(rf"([+-]?)({_NUM})")
_FRAC_RE = re.compile(rf"([+-]?)\\frac\{{([+-]?{_NUM})\}}\{{([+-]?{_NUM})\}}")
_MIXED_RE = re.compile(r"([+-]?)(\d+) ?\\frac\{(\d+)\}\{(\d+)\}")     # "7\frac{3}{4}", "7 3/4"
_SCI_RE = re.compile(rf"([+-]?)({_NUM})(?:\\times|\\cdot|\*)10\^(?:\{{([+-]?\d{{1,4}})\}}|(\d))")
_E_RE = re.compile(rf"([+-]?)({_NUM})[eE]([+-]?\d{{1,4}})")
_SCALES = {"hundred": 10 ** 2, "thousand": 10 ** 3, "million": 10 ** 6, "billion": 10 ** 9, "trillion": 10 ** 12}
_SCALE_RE = re.compile(rf"([+-]?)({_NUM})({'|'.join(_SCALES)})", re.IGNORECASE)   # "3million" ("3 \\text{ million}")
# pmatrix / bmatrix / matrix, and an array in brackets: "\left[\begin{array}{cc}...\end{array}\right]"
_MATRIX_RE = re.compile(r"[\[(]?\\begin\{([a-zA-Z]*matrix|array)\}(?:(?<=\{array\})\{[lcr|]*\})?"
                        r"(.*)\\end\{\1\}[\])]?", re.DOTALL)
_MATRIX_STARTS = ("\\begin", "[\\begin", "(\\begin")


def _to_fraction(s: str) -> Fraction | None:
    """Exact value of a plain number, or None: "0.5", ".5", "\\frac{1}{2}", "1\\frac{1}{4}" and "1 \\frac{1}{4}"
    (mixed numbers, =5/4), "3\\times10^{5}", "3e5", "3million". Anything with a symbol (\\pi, \\sqrt, x)
    is None.

    Unsimplified fractions have their value: "\\frac{2}{4}" == "\\frac{1}{2}". MATH asks for the simplest form,
    but a grader that rejected "\\frac{2}{4}" would, under NSR, push down a response whose value is right."""
    if len(s) > MAX_NUMBER_CHARS:
        return None
    try:
        m = _PLAIN_RE.fullmatch(s)
        if m:
            return _sign(m.group(1)) * Fraction(m.group(2))
        m = _FRAC_RE.fullmatch(s)
        if m:
            den = Fraction(m.group(3))
            return None if den == 0 else _sign(m.group(1)) * Fraction(m.group(2)) / den
        m = _MIXED_RE.fullmatch(s)
        if m:
            whole, num, den = int(m.group(2)), int(m.group(3)), int(m.group(4))
            if not 0 < num < den:                 # 2\frac{6}{3} is not a mixed number
                return None
            return _sign(m.group(1)) * (whole + Fraction(num, den))
        m = _SCI_RE.fullmatch(s) or _E_RE.fullmatch(s)
        if m:
            exp = int(m.group(3) if m.group(3) is not None else m.group(4))
            return _sign(m.group(1)) * Fraction(m.group(2)) * Fraction(10) ** exp
        m = _SCALE_RE.fullmatch(s)
        if m:
            return _sign(m.group(1)) * Fraction(m.group(2)) * _SCALES[m.group(3).lower()]
    except (ValueError, ZeroDivisionError, OverflowError):
        return None
    return None


def _sign(sign: str) -> int:
    return -1 if sign == "-" else 1


_BRACKETS = {"(": ")", "[": "]", "{": "}"}


def _outside_brackets(s: str, pattern: str):
    """The matches of `pattern` in s that stand outside any brackets (a bracket moves the depth; an
    interval's mismatched brackets "[0,1)" count like matched ones)."""
    depth = 0
    for m in re.finditer(r"[()\[\]{}]|" + pattern, s):
        c = m.group()
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth = max(0, depth - 1)
        elif depth == 0:
            yield m


def _split_top(s: str, sep: str) -> list[str]:
    """Split at `sep` outside any brackets: "(1,2),3" -> ["(1,2)", "3"] for sep ","."""
    parts, start = [], 0
    for m in _outside_brackets(s, re.escape(sep)):
        parts.append(s[start:m.start()])
        start = m.end()
    parts.append(s[start:])
    return parts


def _enclosed(s: str) -> bool:
    """True if s[0] is an opening bracket whose partner is the last character: "(1,2)" and "[0,1)" yes,
    "(1)(2)" and "(1,2)\\cup(3,4)" no."""
    if len(s) < 2 or s[0] not in "([{" or s[-1] not in ")]}":
        return False
    depth = 0
    for m in re.finditer(r"[()\[\]{}]", s):
        depth += 1 if m.group() in "([{" else -1
        if depth == 0:
            return m.start() == len(s) - 1
    return False


def _expand_pm(items: list[str]) -> list[str]:
    """"\\pm\\sqrt{5}" -> ["\\sqrt{5}", "-\\sqrt{5}"];  "1\\pm\\sqrt{2}" -> ["1+\\sqrt{2}", "1-\\sqrt{2}"]."""
    out = []
    for it in items:
        if it.count("\\pm") == 1 and "\\mp" not in it:
            plus = it.replace("\\pm", "+")
            out += [plus[1:] if plus.startswith("+") else plus, it.replace("\\pm", "-")]
        else:
            out.append(it)
    return out


def _matrix_cells(s: str):
    """(rows of cells) of a whole-string pmatrix/bmatrix/matrix, or of an array in brackets, or None.
    A lone "\\" not followed by a letter is also a row break: MATH's stored answers lost one backslash
    of "\\\\". Cells are compared by _same, so "1/2" and "\\frac{1}{2}" are the same entry."""
    m = _MATRIX_RE.fullmatch(s)
    if not m or m.group(1) in ("vmatrix", "Vmatrix"):    # a vmatrix is a determinant, not a matrix
        return None
    body = re.sub(r"\\(?![A-Za-z])", "\x01", m.group(2).replace("\x01", "\\"))
    rows = [r for r in body.split("\x01")]
    while rows and rows[-1] == "":
        rows.pop()
    return [r.split("&") for r in rows]


_ATOM_RE = re.compile(r"\d+(?:\.\d+)?|[A-Za-z]|\\[A-Za-z]+(?:\{[^{}]*\})?")
_SUM_RE = re.compile(r"[-+=<>,;&]|\\(?:pm|mp)(?![A-Za-z])")


def _slash_to_frac(s: str) -> str:
    """a/b -> \\frac{a}{b} where it cannot be misread: "\\sqrt{3}/2" -> "\\frac{\\sqrt{3}}{2}";
    "-3\\sqrt{2}/4" -> "-\\frac{3\\sqrt{2}}{4}";  "(1+\\sqrt{5})/2" -> "\\frac{1+\\sqrt{5}}{2}";
    "\\pi/(2k)" -> "\\frac{\\pi}{2k}".
    The numerator is a product (no +, -, =, comma outside brackets) or one group in parentheses; the
    denominator is one number, letter or command, or one group in parentheses. "1+\\sqrt{5}/2" (that is
    1 + sqrt(5)/2) and "1/2\\pi" (pi/2 or 1/(2 pi)?) are left alone."""
    parts = _split_top(s, "/") if "/" in s else []
    if len(parts) != 2:
        return s
    num, den = parts
    sign = "-" if num.startswith("-") else ""
    num = num[len(sign):]
    if num[:1] == "(" and num[-1:] == ")" and _enclosed(num):
        num = num[1:-1]
    elif _SUM_RE.search(_top_level(num)):
        return s
    if den[:1] == "(" and den[-1:] == ")" and _enclosed(den):
        den = den[1:-1]
    elif not _ATOM_RE.fullmatch(den):
        return s
    return "%s\\frac{%s}{%s}" % (sign, num, den) if num and den else s


def _top_level(s: str) -> str:
    """The characters of s outside any brackets: "\\sqrt{a+b}-1" -> "\\sqrt-1"."""
    return "".join(m.group() for m in _outside_brackets(s, r"[^()\[\]{}]+"))


_BASE_RE = re.compile(r"([0-9A-Z]+)_(?:(\d)|\{(\d\d?)\})")


def _without_base(s: str) -> str | None:
    """The digits of a numeral written with its base: "204_5" -> "204", "A3_{16}" -> "A3"; None for anything
    else: "204", "x_1", "29_5" (9 is not a base-5 digit)."""
    m = _BASE_RE.fullmatch(s)
    if not m:
        return None
    base = int(m.group(2) or m.group(3))
    return m.group(1) if 2 <= base <= 36 and max(int(c, 36) for c in m.group(1)) < base else None


def _same(gold: str, pred: str, depth: int = 0) -> bool:
    """Structural equality of two canonical strings (see the module docstring)."""
    if _AMBIGUOUS_COMMA in gold or _AMBIGUOUS_COMMA in pred:
        # "60,120": the number 60120 or the list 60, 120 -- either reading may match
        return any(_same(g, p, depth + 1) for g in _readings(gold) for p in _readings(pred))
    if gold == pred:
        return True
    if not gold or not pred or depth > 8:
        return False
    # "x = 3" vs "3": the prefix of a single variable is dropped, but "x = 5" vs "y = 5" differ
    gvar, grest = _split_variable(gold)
    pvar, prest = _split_variable(pred)
    if gvar and pvar and gvar != pvar:
        return False
    if (gvar or pvar) and (grest != gold or prest != pred):
        return _same(grest, prest, depth + 1)

    # a/b with a symbolic part is \frac{a}{b}: "\sqrt{3}/2" vs "\frac{\sqrt{3}}{2}" (see _slash_to_frac)
    gfrac, pfrac = _slash_to_frac(gold), _slash_to_frac(pred)
    if gfrac != gold or pfrac != pred:
        return _same(gfrac, pfrac, depth + 1)

    # a base subscript on one side only: "204_5" vs "204" (the problem names the base); "204_5" vs
    # "204_6" and "204_5" vs "54" (its decimal value) stay wrong
    gdigits, pdigits = _without_base(gold), _without_base(pred)
    if (gdigits is None) != (pdigits is None):
        return (gdigits or gold) == (pdigits or pred)

    # numbers by exact value
    gval = _to_fraction(gold)
    if gval is not None:
        pval = _to_fraction(pred)
        return pval is not None and pval == gval
    return _same_structure(gold, pred, depth)


def _same_structure(gold: str, pred: str, depth: int) -> bool:
    """_same for answers with parts (matrices, unions, tuples, intervals, lists), compared part by part."""
    # matrices, in order
    gmat = _matrix_cells(gold) if gold.startswith(_MATRIX_STARTS) else None
    if gmat is not None:
        pmat = _matrix_cells(pred) if pred.startswith(_MATRIX_STARTS) else None
        return (pmat is not None and len(gmat) == len(pmat) and sum(map(len, gmat)) <= MAX_ITEMS
                and all(len(gr) == len(pr) and all(_same(g, p, depth + 1) for g, p in zip(gr, pr))
                        for gr, pr in zip(gmat, pmat)))

    # unions of intervals, in order
    gparts = _split_top(gold, "\\cup")
    if len(gparts) > 1:
        pparts = _split_top(pred, "\\cup")
        return len(gparts) == len(pparts) and len(gparts) <= MAX_ITEMS and \
            all(_same(g, p, depth + 1) for g, p in zip(gparts, pparts))

    # tuples and intervals: same brackets, same items in order; {sets}: same brackets, any order
    if _enclosed(gold) and gold[0] != "{":
        if not _enclosed(pred) or pred[0] != gold[0] or pred[-1] != gold[-1]:
            return False
        gitems, pitems = _split_top(gold[1:-1], ","), _split_top(pred[1:-1], ",")
        return len(gitems) == len(pitems) and len(gitems) <= MAX_ITEMS and \
            all(_same(g, p, depth + 1) for g, p in zip(gitems, pitems))

    # bare lists and sets: unordered, same length, each gold item matched by its own pred item
    gitems = _split_top(_strip_outer(gold, "{", "}"), ",")
    pitems = _split_top(_strip_outer(pred, "{", "}"), ",")
    if "\\pm" in gold or "\\pm" in pred:
        gitems, pitems = _expand_pm(gitems), _expand_pm(pitems)
    if len(gitems) > 1 or len(pitems) > 1:
        return _same_unordered(gitems, pitems, depth)
    return False


def _same_unordered(gitems: list[str], pitems: list[str], depth: int) -> bool:
    """Two lists as multisets: the same length, each gold item matched by its own pred item."""
    if len(gitems) != len(pitems) or len(gitems) > MAX_ITEMS:
        return False
    # exact string pairs first (linear, collections-free counting), then the few leftovers
    # pairwise with the full comparison (quadratic, so at most 50 of them)
    counts: dict[str, int] = {}
    for p in pitems:
        counts[p] = counts.get(p, 0) + 1
    leftover = []
    for g in gitems:
        if counts.get(g, 0) > 0:
            counts[g] -= 1
        else:
            leftover.append(g)
    unused = [p for p, c in counts.items() for _ in range(c)]
    if len(leftover) > 50:
        return False
    for g in leftover:
        hit = next((i for i, p in enumerate(unused) if _same(g, p, depth + 1)), None)
        if hit is None:
            return False
        unused.pop(hit)
    return True


def _readings(s: str) -> list[str]:
    if _AMBIGUOUS_COMMA not in s:
        return [s]
    return [s.replace(_AMBIGUOUS_COMMA, ""), s.replace(_AMBIGUOUS_COMMA, ",")]


def is_correct(response, gold) -> bool:
    """True iff the final answer of `response` equals `gold` (a dataset answer string, optionally
    itself wrapped in \\boxed{}). Never raises; None or a non-string is simply incorrect."""
    try:
        if not isinstance(response, str) or not isinstance(gold, str):
            return False
        if _BOX_RE.search(gold):
            gold = extract_answer(gold)
            if gold is None:
                return False
        pred = extract_answer(response)
        if pred is None or len(pred) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
            return False
        g, p = _canonical(gold), _canonical(pred)
        return bool(g) and _same(g, p)
    except RecursionError:              # cannot happen (depth is capped), but a reward must never raise
        return False


def reward(response, gold) -> float:
    """r = 1.0 if is_correct(response, gold) else 0.0 -- the verifiable reward of RLVR."""
    return 1.0 if is_correct(response, gold) else 0.0


# =================================================================================================
# SELF-CHECK: `python verifier.py` prints the MATH self-consistency rate and the worst-case timings
# =================================================================================================

def worst_case_ms() -> dict[str, float]:
    """{adversarial input: its slowest call in milliseconds} over is_correct both ways and normalize_answer.
    Timings live here and in `python bench.py verifier`, never in a test (a busy machine is slow)."""
    import time
    digits = "9" * 5000
    cases = {
        "300,000 x 'a'": "a" * 300_000,
        "300,000 chars inside one box": "\\boxed{" + "x" * 300_000 + "}",
        "unclosed box + 300,000 '{'": "\\boxed{" + "{" * 300_000,
        "40,000 boxes": "\\boxed{" * 40_000,
        "40,000 boxes, the last complete": "\\boxed{" * 39_999 + "\\boxed{1}",
        "'Answer:' after 300,000 chars": "a" * 300_000 + " Answer: 1",
        "20,000 nested braces": "\\boxed{" + "{" * 20_000 + "1" + "}" * 20_000 + "}",
        "20,000 nested \\frac": "\\boxed{" + "\\frac{" * 20_000 + "1" + "}" * 20_000 + "}",
        "5,000-digit integer": "\\boxed{" + digits + "}",
        "5,000-digit fraction": "\\boxed{\\frac{" + digits + "}{" + digits + "7}}",
        "'the answer is' + 100,000 items": "The answer is " + "1, " * 100_000,
    }
    worst = {}
    for name, text in cases.items():
        worst[name] = 0.0
        for call in (lambda: is_correct(text, "1"), lambda: is_correct(text, text), lambda: normalize_answer(text),
                     lambda: is_correct("\\boxed{1}", text)):
            start = time.perf_counter()
            call()
            worst[name] = max(worst[name], (time.perf_counter() - start) * 1e3)
    return worst


def _self_check() -> None:
    import json
    import pathlib
    import time
    data_dir = pathlib.Path(__file__).resolve().parent.parent / "shared" / "data"
    paths = [data_dir / f for f in ("math_train.jsonl", "math_test.jsonl")]
    if all(p.is_file() for p in paths):
        records = [json.loads(line) for p in paths for line in p.read_text().splitlines() if line.strip()]
        start = time.perf_counter()
        hits = sum(is_correct(r["solution"], r["answer"]) for r in records)
        seconds = time.perf_counter() - start
        print(f"self-consistency is_correct(solution, answer): {hits}/{len(records)} = "
              f"{hits / len(records):.4%}  ({seconds / len(records) * 1e6:.0f} us per record)")
    else:
        print(f"self-consistency: skipped, {data_dir} not found")
    for name, ms in worst_case_ms().items():
        print(f"{name:<34} worst call {ms:6.1f} ms")


if __name__ == "__main__":
    _self_check()
