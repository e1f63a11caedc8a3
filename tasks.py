"""Tasks for spg-min: data, prompts, rewards and eval scores for GSM8K, MATH500, Countdown and 4x4 Sudoku.

Follows the reference code of SPG (facebookresearch/SPG @ a1c7120) and d1 (dllm-reasoning/d1 @ 837888f), as
described in ../shared/docs/data.md; cases B01-B06 of ../shared/docs/field_cases.md are tested in
tests/test_tasks.py. Deliberate departures from the reference (the reference is wrong or brittle here):
  1. Format regexes use DOTALL and `re.search` for the soft format, so multi-line reasoning counts (B01).
     `d1_compat=True` on the two format functions reproduces the reference (`get_task(..., d1_compat=True)`,
     spg_min's `--d1-compat true`).
  2. GSM8K answers compare as numbers (Fraction): commas, `{,}`, `$`, `72.00`, negatives, a `\\boxed{}` inside
     the answer (B02). The int reward accepts negatives and thousands separators.
  3. xmlcount: 0.125 per tag present exactly once, minus 0.001 per character after `\\n</answer>` (one newline
     free), clipped to [0, 0.5]. (SPG penalises the answer's own length, d1 the whole text without a final newline.)
  4. MATH: answers are equal when their normalised strings match or math-verify says so (time-limited; floats
     compared to 6 decimals); the training reward with no box compares the whole text as a normalised string only
     (the reference's whole-text fallback); the format reward is 0.5 for a closed <answer> pair + 0.25 for a
     \\boxed{} in it (the reference's `"\\boxed"` check is a backspace bug; its constant 0.25 floor does not change
     advantages).
  5. Countdown: parsed with `ast`, never `eval`; exact Fraction arithmetic; 0.1 only for a well-formed expression
     (one that divides by zero is not: 0, where the reference gives 0.1).
     Signs (`-100 + 93 + 30`) are accepted as the reference does; `**`, `//` and decimals, which its pattern lets
     through, are refused.
  6. Eval answers (not training rewards) come from the last \\boxed{} that holds one (`\\boxed{}` and the prompt's
     `\\boxed{...}` are skipped; GSM8K reference: the first usable box; MATH, Countdown: the last box), else the
     answer tag (reference: the whole text, which fails for MATH; Countdown's then reads its first inline
     `expr = number`, as here). Sudoku reads the last <answer> (reference: the first) and keeps only its digits. A
     GSM8K completion with neither a box nor an answer tag is scored by its last number (B02; the reference: wrong).
     Numbers may carry the unicode minus sign.
An empty or missing answer never scores, and no reward or score function raises on any string.
"""
import ast
import csv
import dataclasses
import functools
import itertools
import json
import math
import operator
import os
import random
import re
import threading
import urllib.request
import warnings
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable

_SHARED_DATA = Path(__file__).resolve().parent.parent / "shared" / "data"
DATA_DIR_DEFAULT = _SHARED_DATA if _SHARED_DATA.is_dir() else None  # ../shared/data beside the checkout
HF_ENDPOINT = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
GSM8K_HUB = ("openai/gsm8k", "main")  # Hub (path, config) of each dataset d1/SPG load (data.md 1.1)
MATH_TRAIN_HUB, MATH_EVAL_HUB = ("ankner/math-500", None), ("HuggingFaceH4/MATH-500", None)
EVAL_PREFILL = "<reasoning>"  # appended after the chat template at eval time (d1/SPG eval, add_reasoning=True)


class UsageError(ValueError):
    """Input the run cannot use (a file, a flag); the message names the fix. spg_min.py prints it without a
    traceback and exits with 2, as argparse does for a bad flag."""

# ----------------------------------------------------------------------------------------------------------------
# Prompts (data.md section 2, exact strings)

SYSTEM_PROMPT = "\nRespond in the following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>\n"
MATH_TRAIN_INSTRUCTION = ("You are a math expert. You will be given a question to solve. Solve it step by step. "
                          "Wrap the final answer in a \\boxed{}. \n\n")
_EVAL_FORMAT = ("Respond in the following format:\n<reasoning>\nYour reasoning here\n</reasoning>\n<answer>\n"
                "\\boxed{...}\n</answer>")
GSM8K_EVAL_SYS = ("You are a math expert. You will be given a question to solve. Solve it step by step. "
                  "Wrap the final answer in a \\boxed{}. \n" + _EVAL_FORMAT)
MATH_EVAL_SYS = ("You are a math expert. You will be given a question to solve. Solve it step by step. "
                 "Wrap the final answer in a \\boxed{}.\n" + _EVAL_FORMAT + '" \n')  # stray quote: reference typo
COUNTDOWN_EVAL_SYS = (
    "Using only the provided numbers, create an arithmetic expression that evaluates to exactly the provided target "
    "number. You may use the operations +, -, *, and / as needed, but each number must be used exactly once. Think "
    "step-by-step. After reasoning, provide only your final expression inside \\boxed{} tags without including an "
    "equals sign or the target number. For example: \\boxed{a + b * c}" + _EVAL_FORMAT)
SUDOKU_SYSTEM_PROMPT = """
Please solve the following 4x4 Sudoku puzzle. The puzzle is provided as a 16-character string reading left-to-right, top-to-bottom, where '0' represents empty cells.

Rules:
- Fill empty cells with digits 1-4
- Each row must contain digits 1-4 exactly once
- Each column must contain digits 1-4 exactly once
- Each 2x2 box must contain digits 1-4 exactly once

Important: Your solution must be a COMPLETE 16-character string with only the digits 1-4, representing your final solved grid.

Respond in this exact format:
<reasoning>
Your step-by-step solving process
</reasoning>
<answer>
[16-character solution string with no spaces or separators]
</answer>
"""
def _fewshot(puzzle, solution, steps):
    """One of SPG's three worked Sudoku examples (spg/data_utils.py, eval/sudoku.py); only `steps` is free text."""
    def rows(grid):
        return "\n".join(f"R{r + 1}: " + " ".join(grid[4 * r:4 * r + 4]) for r in range(4))
    return (f"Question:\nSolve the following Sudoku puzzle: {puzzle}\nAnswer:\n<reasoning>\nInterpret puzzle as 4 rows "
            f"of 4:\n{rows(puzzle)}\n\nFill easy singles:\n{steps}\n\nFinal grid:\n{rows(solution)}\n</reasoning>\n"
            f"<answer>\n{solution}\n</answer>")

SUDOKU_FEWSHOT = (  # joined by "\n\n" in the prompt
    _fewshot("3014002020004130", "3214142323414132", """R1 missing 2 → R1C2=2.
R4 missing 2 → R4C4=2.
Box D (R3-4,C3-4) then needs {1,4}; column4 can only accept 1 → R3C4=1, R3C3=4.
R3 now missing 3 → R3C2=3.
Column1 missing 1 → R2C1=1.
Column2 missing 4 → R2C2=4.
Last cell R2C4=3."""),
    _fewshot("0000100420013142", "4213132424313142", """Col1 missing 4 → R1C1=4.
Col4 missing 3 → R1C4=3.
Box A (R1-2,C1-2) missing {2,3} and R1 now needs {1,2} → R1C2=2, R2C2=3.
R1C3=1.
R2 now missing 2 → R2C3=2.
Col2 missing 4 → R3C2=4, then R3C3=3."""),
    _fewshot("2001403002001420", "2341413232141423", """R1 missing {3,4}; Col2 can't be 1 so R1C2=3 → R1C3=4.
R4 missing 3 → R4C4=3.
Col4 missing {2,4}; R2 must take 2 → R2C4=2 → R2C2=1.
Col1 missing 3 → R3C1=3.
Col3 missing 1 → R3C3=1 → R3C4=4."""))

# ----------------------------------------------------------------------------------------------------------------
# Shared text helpers

def _safe(fn, failed=None):
    """Make a reward/score function total: an exception (warned about) or a non-finite value returns `failed`.

    Reward functions fail to None, which the training loop counts as missing (metric `reward/missing`) and scores
    0; evaluation scores fail to 0.0."""
    @functools.wraps(fn)
    def wrapped(completion, example):
        try:
            value = float(fn(str(completion), example))
        except Exception as e:  # e.g. a malformed example; a completion string alone should never get here
            warnings.warn(f"{fn.__name__} raised {type(e).__name__}: {e}; scored 0", stacklevel=2)
            return failed
        return value if math.isfinite(value) else failed
    return wrapped

def _bad_gold(task):
    """A missing or unparsable gold answer scores 0, never full credit (B03), with a data warning."""
    warnings.warn(f"{task}: example without a usable gold answer; it scores 0", stacklevel=3)
    return 0.0

def answer_tag(text):
    """Text after the last <answer> up to the next </answer> (or the end), stripped; None without <answer>."""
    if "<answer>" not in text:
        return None
    return text.split("<answer>")[-1].split("</answer>")[0].strip()

def closed_answer_tag(text):
    """Content of the last closed <answer>...</answer> pair, stripped; None if there is no closed pair."""
    end = text.rfind("</answer>")
    start = text.rfind("<answer>", 0, end) if end >= 0 else -1
    return text[start + len("<answer>"):end].strip() if start >= 0 else None

def _box_content(text, start):
    """Content of the box whose `\\boxed`/`\\fbox` ends at index `start` of text; None when it is unbalanced."""
    rest = text[start:]
    if not rest.lstrip().startswith("{"):
        bare = re.match(r"\s+([^$\n]+)", rest)  # `\boxed 5$` (reference last_boxed_only_string)
        return bare.group(1).strip() if bare else None
    rest, depth = rest.lstrip(), 0
    for i, ch in enumerate(rest):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth == 0:
            return rest[1:i].strip()
    return None

_BOX = re.compile(r"\\(?:boxed|fbox)")

def last_boxed(text):
    """Content of the last \\boxed{...} (or \\fbox{...}) by a balanced-brace scan; `\\boxed 5$` gives `5` (B04).

    None when there is no box or the last one is unbalanced."""
    found = list(_BOX.finditer(text))
    return _box_content(text, found[-1].end()) if found else None

PLACEHOLDER_BOXES = ("", "...", "\\ldots", "\\dots", "\u2026")  # the eval prompts' `\boxed{...}`, echoed, is no answer

def last_answer_box(text):
    """last_boxed, skipping boxes that hold nothing or the prompt's `...` placeholder (data.md 4.2 (a): the
    reference GSM8K parser skips them), so `\\boxed{18} ... <answer>\\boxed{...}</answer>` reads 18.

    None when no box holds an answer or the last box is unbalanced."""
    for box in reversed(list(_BOX.finditer(text))):
        content = _box_content(text, box.end())
        if content not in PLACEHOLDER_BOXES:
            return content  # an answer, or None for an unbalanced box
    return None

_NUMBER = re.compile(r"(?:(?<![0-9)])-)?(?:[0-9]{1,3}(?:,[0-9]{3})+(?![0-9])|[0-9]+)(?:\.[0-9]+)?")

def last_number(text):
    """Last number in text as an exact Fraction (`8,000`, `9{,}500`, `$-5`, `72.00` all work; B02); None if none."""
    found = _NUMBER.findall(text.replace("{,}", ",").replace("\\!", "").replace("\u2212", "-"))  # U+2212 minus
    return Fraction(found[-1].replace(",", "")) if found and len(found[-1]) <= 100 else None  # no 5000-digit answers

def strict_format(c, ex, d1_compat=False):
    """0.5 if the whole completion is <reasoning>\\n...\\n</reasoning>\\n<answer>\\n...\\n</answer>, then at most one
    newline (B01): one block of each, whose lines hold no tag (without DOTALL the reference's pattern could not span
    two blocks either). The reference's `\\n$` asks for one or two final newlines; a completion cut at its stop
    token ends at `</answer>`, so here none or one."""
    if d1_compat:  # reference: no DOTALL, so reasoning and answer must each be one line
        return 0.5 if re.match(r"^<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n$", c) else 0.0
    inner = r"(?:(?!</?(?:reasoning|answer)>).)*"  # any lines, but no tag: one reasoning and one answer block
    pattern = rf"<reasoning>\n{inner}\n</reasoning>\n<answer>\n{inner}\n</answer>\n?"
    return 0.5 if re.fullmatch(pattern, c, re.DOTALL) else 0.0

def soft_format(c, ex, d1_compat=False):
    """0.5 if <reasoning>...</reasoning> then <answer>...</answer> appear anywhere, across lines (B01)."""
    pattern = r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>"
    if d1_compat:  # reference: anchored re.match without DOTALL
        return 0.5 if re.match(pattern, c) else 0.0
    return 0.5 if re.search(pattern, c, re.DOTALL) else 0.0

def _xmlcount(c, ex):
    """0.125 per format tag present exactly once, minus 0.001 per character after the closing tag; in [0, 0.5]."""
    tags = ("<reasoning>\n", "\n</reasoning>\n", "\n<answer>\n", "\n</answer>")
    count = 0.125 * sum(c.count(tag) == 1 for tag in tags)
    if c.count("\n</answer>") == 1:
        count -= 0.001 * max(len(c.split("\n</answer>")[-1]) - 1, 0)  # trailing junk; one newline is free
    return min(max(count, 0.0), 0.5)

# ----------------------------------------------------------------------------------------------------------------
# GSM8K. Row: {"question": "Janet's ducks lay 16 eggs per day. ...", "answer": "18", "solution": "... #### 18"}

def _gsm8k_row(raw):
    """Hub/jsonl row -> example; gold = text after `####` (reference extract_hash_answer)."""
    return {"question": raw["question"], "answer": raw["answer"].split("####")[-1].strip(), "solution": raw["answer"]}

def _gsm8k_gold(ex):
    return last_number(str(ex.get("answer", "")).split("####")[-1])

def _gsm8k_int(c, ex):
    """0.5 if the answer tag holds a bare integer (negatives and `1,080` allowed; the reference uses isdigit)."""
    content = answer_tag(c)
    return 0.5 if content and re.fullmatch(r"-?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)", content) else 0.0

def _gsm8k_correct(c, ex):
    """2.0 if the last number in the answer tag (inside its \\boxed{} if any) equals the gold number."""
    gold, content = _gsm8k_gold(ex), answer_tag(c)
    if gold is None:
        return _bad_gold("gsm8k")
    if not content:
        return 0.0
    return 2.0 if last_number(last_boxed(content) or content) == gold else 0.0

def _gsm8k_answer(c):
    """What the GSM8K eval reads: the last \\boxed{} that holds an answer (last_answer_box), else the answer tag,
    else (neither written at all) the whole text, whose last number counts (B02's `The total is 72 clips,
    altogether.`; the reference scores it 0)."""
    if re.search(r"\\(?:boxed|fbox)|<answer>", c):                # an empty box or tag is an empty answer (B03)
        return last_answer_box(c) or answer_tag(c) or ""
    return c

def _gsm8k_score(c, ex):
    """Eval: 1 if the last number of _gsm8k_answer(c) equals the gold number; 0 and a data warning without one."""
    gold, text = _gsm8k_gold(ex), _gsm8k_answer(c)
    if gold is None:
        return _bad_gold("gsm8k")
    return 1.0 if text and last_number(text) == gold else 0.0

# ----------------------------------------------------------------------------------------------------------------
# MATH. Row: {"problem": "If $5x - 3 = 12$, what is the value of $5x + 3$?", "answer": "18"}

MATH_VERIFY_TIMEOUT_S = 1  # seconds per parse/verify call; signal-based, so only enforced in the main thread

def _math_row(raw):
    """Hub/jsonl row -> example; without `answer`, the last \\boxed{} of `solution` (d1 uses the solution)."""
    answer = raw.get("answer")                        # a JSON number (0 included) is an answer too
    answer = str(answer) if answer not in (None, "") else last_boxed(raw.get("solution", "")) or ""
    return {"problem": raw["problem"], "answer": answer.strip()}

def _normalize_math(s):
    """Light string normalisation (a subset of the Hendrycks strip_string) for the fast path of math_equal."""
    s = re.sub(r"\\left|\\right|\\!|\\,|\\;|\\\$|\$|\^\{?\\circ\}?", "", s)
    return re.sub(r"\s+", "", s.replace("dfrac", "frac").replace("tfrac", "frac")).rstrip(".")

def math_equal(pred, gold):
    """True if pred and gold are the same answer: equal normalised strings, or math-verify equivalence (B05)."""
    if not pred or not gold:
        return False
    if _normalize_math(pred) == _normalize_math(gold):
        return True
    limit = MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    try:
        from math_verify import parse, verify  # lazy: sympy is slow to import
        gold_expr = parse("\\boxed{" + gold + "}", parsing_timeout=limit)
        pred_expr = parse("\\boxed{" + pred + "}", parsing_timeout=limit)
        return bool(gold_expr and pred_expr and verify(gold_expr, pred_expr, timeout_seconds=limit))
    except Exception:  # math-verify failed or timed out: the string comparison above decides
        return False

def _math_gold(ex):
    return str(ex.get("answer") or "").strip()

def _math_pred(c):
    """What MATH's eval reads: the last box holding an answer, else the answer tag (reference: the last box, even
    `\\boxed{...}`, else the whole text)."""
    return last_answer_box(c) or answer_tag(c)

def _math_correct(c, ex):
    """2.0 if the last \\boxed{} is equivalent to the gold answer (data.md 3.2). Without a balanced box the
    reference takes the whole text as the answer, so only a bare answer passes; the answer tag is not read."""
    gold = _math_gold(ex)
    if not gold:
        return _bad_gold("math")
    boxed = last_boxed(c)
    if boxed is None:
        return 2.0 if _normalize_math(c) == _normalize_math(gold) else 0.0
    return 2.0 if math_equal(boxed, gold) else 0.0

def _math_format(c, ex):
    """0.5 for a closed <answer> pair + 0.25 for a \\boxed{} inside it (max 0.75, see note 4 above)."""
    content = closed_answer_tag(c)
    return 0.0 if content is None else 0.5 + (0.25 if "\\boxed" in content else 0.0)

def _math_score(c, ex):
    gold = _math_gold(ex)
    return (1.0 if math_equal(_math_pred(c), gold) else 0.0) if gold else _bad_gold("math")

# ----------------------------------------------------------------------------------------------------------------
# Countdown. Row (file): {"input": "30,100,93", "output": "23"} -> {"nums": [30, 100, 93], "target": 23}

COUNTDOWN_TRAIN_SIZE = 20_000  # generated training problems (RL consumes far fewer; data.md 1.4)
COUNTDOWN_EVAL_SEED = 42  # for the stand-in eval set when the published file is absent
COUNTDOWN_TEST = "countdown/countdown_cd3_test.jsonl"  # the published held-out set, under the data folder
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_SIGNS = {ast.USub: operator.neg, ast.UAdd: operator.pos}  # `-100 + 93 + 30`: the reference's eval accepts it
_INLINE_EQUATION = re.compile(r"(?<![0-9+\-*/() ])([0-9+\-*/() ]+)=\s*-?[0-9]")  # `30 + 93 - 100 = 23` in a line
_LATEX_OPS = {"\\times": "*", "\\cdot": "*", "\\div": "/", "\u2212": "-"}  # and the unicode minus sign

def _countdown_row(raw):
    if "nums" in raw:
        return {"nums": [int(n) for n in raw["nums"]], "target": int(raw["target"])}
    return {"nums": [int(n) for n in raw["input"].split(",")], "target": int(raw["output"])}

def countdown_eval(expr):
    """(exact value, sorted integers used) of an expression of integer literals, + - * /, signs and parentheses.

    Parsed with ast, never eval (B06); None for anything else (**, //, decimals, text, division by zero)."""
    if len(expr) > 200 or not re.fullmatch(r"[0-9+\-*/()\s]+", expr):
        return None
    used = []

    def value(node):
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _SIGNS:
            return _SIGNS[type(node.op)](value(node.operand))
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return Fraction(node.value)
        raise ValueError("not + - * / of signed integers")
    try:
        return value(ast.parse(expr.strip(), mode="eval").body), sorted(used)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
        return None

def _countdown_solved(expr, ex):
    parsed = countdown_eval(expr)
    return parsed is not None and parsed[1] == sorted(ex["nums"]) and parsed[0] == ex["target"]

def _countdown_reward(c, ex):
    """1.0 if the last <answer> expression uses each number once and equals the target; 0.1 if it is another
    expression countdown_eval can evaluate (one that divides by zero gets 0 here, 0.1 in the reference)."""
    expr = closed_answer_tag(c)
    if not expr:
        return 0.0
    return 1.0 if _countdown_solved(expr, ex) else (0.1 if countdown_eval(expr) else 0.0)

def _countdown_answer(c):
    """What the Countdown eval reads: the last \\boxed{} that holds an answer (last_answer_box), else the answer tag,
    else the first inline `expr = number` of the text; LaTeX operators mapped, text after `=` dropped. (The
    reference, data.md 4.2: the last box, else the whole text; the tag only when the last box is unbalanced.)"""
    for latex, op in _LATEX_OPS.items():
        c = c.replace(latex, op)
    expr = last_answer_box(c) or answer_tag(c)
    if expr is None:
        inline = _INLINE_EQUATION.search(c)
        expr = inline.group(1) if inline else ""
    return expr.split("=")[0].strip()

def _countdown_score(c, ex):
    return 1.0 if _countdown_solved(_countdown_answer(c), ex) else 0.0

def _reachable(items):
    """{value: expression} over all ways to combine every (value, expr) item with integer-only steps:
    a+b, a*b, a-b (a >= b) and a/b (exact), the generator of the published set (data.md 1.4)."""
    if len(items) == 1:
        return {items[0][0]: items[0][1]}
    out = {}
    for i, j in itertools.combinations(range(len(items)), 2):
        (a, ea), (b, eb) = sorted([items[i], items[j]], reverse=True)
        rest = [items[k] for k in range(len(items)) if k not in (i, j)]
        steps = [(a + b, f"({ea}+{eb})"), (a * b, f"({ea}*{eb})"), (a - b, f"({ea}-{eb})")]
        steps += [(a // b, f"({ea}/{eb})")] if b and a % b == 0 else []
        for step in steps:
            for v, e in _reachable(rest + [step]).items():
                out.setdefault(v, e)
    return out

def countdown_solutions(nums):
    """{value: expression} for every value reachable from nums with integer-only steps (outer parentheses dropped)."""
    return {v: e[1:-1] if e.startswith("(") else e for v, e in _reachable([(n, str(n)) for n in nums]).items()}

def countdown_solve(nums, target):
    """An expression of nums equal to target with integer-only steps, or None."""
    return countdown_solutions(nums).get(target)

def _countdown_generate(count, seed, exclude=()):
    """Problems of 3 numbers in [1, 100] with a target drawn from the reachable values in [1, 100] (data.md 1.4)."""
    rng, seen, rows = random.Random(seed), {held_out_key("countdown", e) for e in exclude}, []
    while len(rows) < count:
        nums = [rng.randint(1, 100) for _ in range(3)]
        reach = {v: e for v, e in countdown_solutions(nums).items() if 1 <= v <= 100}
        if not reach:
            continue
        target = rng.choice(sorted(reach))
        key = held_out_key("countdown", {"nums": nums, "target": target})
        if key in seen:
            continue
        seen.add(key)
        rows.append({"nums": nums, "target": target, "solution": reach[target]})
    return rows

# ----------------------------------------------------------------------------------------------------------------
# Sudoku 4x4. Row (CSV, read as strings): {"puzzle": "0310200404001043", "solution": "4312213434211243"}

def _all_sudoku_grids():
    """The 288 valid 4x4 grids (digits 1-4 once per row, column and 2x2 box) as sorted 16-char strings."""
    def peers(cell):
        r, c = divmod(cell, 4)
        return [i for i in range(cell) if i // 4 == r or i % 4 == c or (i // 8, i % 4 // 2) == (r // 2, c // 2)]
    grids = [""]
    for cell in range(16):
        grids = [g + d for g in grids for d in "1234" if all(g[i] != d for i in peers(cell))]
    return sorted(grids)

SUDOKU_GRIDS = _all_sudoku_grids()
# indices into SUDOKU_GRIDS of the 88 solution grids of SPG's dataset/test_sudoku_split_new.csv (held out of training)
SUDOKU_HELDOUT = (5, 9, 12, 13, 25, 27, 30, 31, 32, 33, 35, 43, 47, 48, 55, 56, 57, 67, 71, 74, 75, 80, 82, 86, 89,
                  91, 94, 99, 101, 102, 104, 105, 107, 110, 111, 114, 116, 118, 121, 131, 132, 133, 134, 135, 137, 138,
                  146, 149, 151, 152, 153, 156, 157, 163, 164, 166, 167, 174, 183, 186, 188, 190, 192, 195, 197, 200,
                  203, 205, 214, 216, 217, 219, 220, 221, 222, 224, 229, 234, 236, 238, 243, 245, 253, 256, 265, 273,
                  274, 276)
SUDOKU_FEWSHOT_PUZZLES = ("3014002020004130", "0000100420013142", "2001403002001420")  # never train/eval puzzles
SUDOKU_CLUES = {4: 3, 5: 12, 7: 76, 8: 83, 9: 82}  # clue counts of the 256 published test puzzles (data.md 1.5)
SUDOKU_PER_GRID = 50  # training puzzles per training grid: 200 grids -> 10,000 puzzles
SUDOKU_EVAL_SEED = 42  # for the stand-in eval set when the published file is absent
# bit k of _GRID_BITS[cell][digit] is set when SUDOKU_GRIDS[k] has that digit in that cell
_GRID_BITS = [{d: sum(1 << k for k, g in enumerate(SUDOKU_GRIDS) if g[cell] == d) for d in "1234"}
              for cell in range(16)]

def sudoku_completions(puzzle):
    """Number of valid grids that agree with every clue of the puzzle (1 = unique completion)."""
    fits = (1 << len(SUDOKU_GRIDS)) - 1
    for cell, d in enumerate(puzzle):
        if d != "0":
            fits &= _GRID_BITS[cell][d]
    return bin(fits).count("1")

def _sudoku_generate(grid_ids, counts, rng):
    """counts[i] distinct unique-completion puzzles of grid grid_ids[i], clue counts drawn like the test set."""
    rows = []
    for gid, count in zip(grid_ids, counts):
        grid, made = SUDOKU_GRIDS[gid], set()
        while len(made) < count:
            clues = set(rng.sample(range(16), rng.choices(list(SUDOKU_CLUES), list(SUDOKU_CLUES.values()))[0]))
            for _ in range(1000):  # resample cells at this clue count until the completion is unique
                puzzle = "".join(d if i in clues else "0" for i, d in enumerate(grid))
                if sudoku_completions(puzzle) == 1 and puzzle not in SUDOKU_FEWSHOT_PUZZLES:
                    made.add(puzzle)
                    break
                clues = set(rng.sample(range(16), len(clues)))
        rows += [{"puzzle": p, "solution": grid} for p in sorted(made)]
    return rows

def _sudoku_cells_right(answer, ex):
    """Fraction of the puzzle's empty cells whose digit in answer (digits only, padded/cut to 16) is right."""
    pred = re.sub(r"[^0-9]", "", answer)[:16].ljust(16, "0")
    empty = [i for i, p in enumerate(ex["puzzle"]) if p == "0"]
    return sum(pred[i] == ex["solution"][i] for i in empty) / len(empty)

def _sudoku_reward(c, ex):
    """Reference sudoku_reward_func: the last closed <answer> pair, else 0."""
    answer = closed_answer_tag(c)
    return _sudoku_cells_right(answer, ex) if answer else 0.0

def _sudoku_answer(c):
    """What the Sudoku eval reads: the last <answer> (closed or cut off), else the last 16-digit run. The reference
    eval parser keeps non-digit characters (so `[4321...]` shifts every cell) and prefers the first <answer>; here
    only its digits count."""
    answer = answer_tag(c)
    if answer is None:
        runs = re.findall(r"(?<![0-9])[0-9]{16}(?![0-9])", c)
        answer = runs[-1] if runs else ""
    return answer

def _sudoku_score(c, ex):
    return _sudoku_cells_right(_sudoku_answer(c), ex)

# ----------------------------------------------------------------------------------------------------------------
# Data loading

def _read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]

def _read_sudoku_csv(path):
    """Puzzle/Solution rows; ValueError naming the first row that is not a puzzle (16 digits 0-4, 0 = empty, at
    least one empty) with its valid solution grid."""
    with open(path, newline="", encoding="utf-8") as f:  # csv keeps strings: leading zeros survive
        rows = [{"puzzle": r["Puzzle"].strip(), "solution": r["Solution"].strip()} for r in csv.DictReader(f)]
    grids = set(SUDOKU_GRIDS)
    for line, r in enumerate(rows, start=2):             # line 1 is the header
        p, sol = r["puzzle"], r["solution"]
        if not (re.fullmatch("[0-4]{16}", p) and sol in grids and "0" in p
                and all(d in ("0", s) for d, s in zip(p, sol))):
            raise ValueError(f"line {line}: {p!r}, {sol!r} is not a puzzle with its solution grid")
    return rows

def _load_hub(path, config, split):
    """Rows of a Hugging Face dataset; fails within seconds with a clear message when the Hub is unreachable."""
    hint = f"cannot load {path} from the Hugging Face Hub; pass --data-dir DIR (files laid out like shared/data)"
    try:
        if not any(os.environ.get(v, "0") not in ("", "0") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
            urllib.request.urlopen(HF_ENDPOINT, timeout=5).close()  # fail fast instead of hanging on retries
        import datasets
        return list(datasets.load_dataset(path, config, split=split))
    except Exception as e:
        raise RuntimeError(f"{hint} ({type(e).__name__}: {e})") from e

def _local(data_dir, rel_path):
    """data_dir/rel_path (data_dir defaults to ../shared/data when present) if that file exists, else None."""
    root = Path(data_dir) if data_dir is not None else DATA_DIR_DEFAULT
    return root / rel_path if root is not None and (root / rel_path).is_file() else None

def _data_root(data_dir):
    """The data folder as a message names it: --data-dir, else ../shared/data (found or not)."""
    return data_dir or DATA_DIR_DEFAULT or "../shared/data"

def _published_test_set(data_dir, rel_path):
    """The published test file if present; else None, with a warning that a generated stand-in is used instead."""
    path = _local(data_dir, rel_path)
    if path is None:
        warnings.warn(f"published test set {rel_path} not found under {_data_root(data_dir)}; generating a stand-in "
                      "held-out set instead (pass --data-dir DIR or --eval-file FILE to use the published one)",
                      stacklevel=4)
    return path

def _countdown_held_out(path):
    """Countdown's held-out problems: the file at path, else (None) the 256 generated stand-ins."""
    return [_countdown_row(r) for r in _read_jsonl(path)] if path else _countdown_generate(256, COUNTDOWN_EVAL_SEED)

def _rows(data_dir, rel_path, hub, split):
    """Raw rows from the local file, else (no data dir at all) from the Hub."""
    if _local(data_dir, rel_path):
        return _read_jsonl(_local(data_dir, rel_path))
    if data_dir is None and DATA_DIR_DEFAULT is None:
        return _load_hub(*hub, split)
    raise FileNotFoundError(f"{rel_path} not found under {_data_root(data_dir)}: lay it out like shared/data")

SAME_PROBLEM = {"gsm8k": "question", "math": "problem", "countdown": "numbers and target", "sudoku": "solution grid"}

def held_out_key(name, example):
    """What makes a training example the same problem as a held-out one (SAME_PROBLEM): the question / problem
    text (whitespace collapsed), Countdown's numbers and target, and Sudoku's solution grid (the split is by grid,
    so a training puzzle of a held-out grid counts as held out)."""
    if name in ("gsm8k", "math"):
        return " ".join(example["question" if name == "gsm8k" else "problem"].split())
    return (tuple(sorted(example["nums"])), example["target"]) if name == "countdown" else example["solution"]

def load_train(name, data_dir=None, *, seed=0, eval_file=None):
    """Training examples of task `name`, shuffled with `seed` (Countdown and Sudoku are generated locally).

    The default splits share no problem (tests/test_tasks.py checks the real data). With `eval_file`, training
    examples that are the same problem as one of its rows (held_out_key) are left out, with a warning that counts
    them; Countdown generates around them instead, so its set keeps COUNTDOWN_TRAIN_SIZE problems. Raises
    ValueError when eval_file holds every training problem."""
    get_task(name)
    evaluation = load_eval(name, eval_file=eval_file) if eval_file else []
    if name == "gsm8k":
        rows = [_gsm8k_row(r) for r in _rows(data_dir, "gsm8k/train.jsonl", GSM8K_HUB, "train")]
    elif name == "math":
        raw = _rows(data_dir, "math/math12k_train_problem_answer.jsonl", MATH_TRAIN_HUB, "train")
        rows = [r for r in map(_math_row, raw) if r["answer"]]  # 2 rows of the 12k file have an empty answer
    elif name == "countdown":
        published = _local(data_dir, COUNTDOWN_TEST)
        if published is None and eval_file is None:
            warnings.warn(f"{COUNTDOWN_TEST} not found under {_data_root(data_dir)}: the generated Countdown "
                          "training problems exclude only the generated stand-in held-out set, so they may overlap "
                          "the published test set (pass --data-dir DIR)", stacklevel=2)
        rows = _countdown_generate(COUNTDOWN_TRAIN_SIZE, seed, exclude=_countdown_held_out(published) + evaluation)
    else:
        train_ids = [k for k in range(len(SUDOKU_GRIDS)) if k not in SUDOKU_HELDOUT]
        rows = _sudoku_generate(train_ids, [SUDOKU_PER_GRID] * len(train_ids), random.Random(seed))
    held_out = {held_out_key(name, ex) for ex in evaluation}
    kept = [ex for ex in rows if held_out_key(name, ex) not in held_out]
    if not kept:
        raise UsageError(f"--eval-file {eval_file} holds every {name} training problem ({SAME_PROBLEM[name]}): "
                         "nothing is left to train on; pass an evaluation file that is not the training set")
    if len(kept) < len(rows):
        warnings.warn(f"{name}: left out {len(rows) - len(kept)} of {len(rows)} training examples with the same "
                      f"{SAME_PROBLEM[name]} as a row of --eval-file {eval_file}", stacklevel=2)
    random.Random(seed).shuffle(kept)
    return kept

EVAL_FILE_FORMAT = {
    "gsm8k": "JSON lines with question and answer (GSM8K's, ending in '#### <number>'), like shared/data/gsm8k",
    "math": "JSON lines with problem and answer (or a solution holding \\boxed{}), like shared/data/math",
    "countdown": "JSON lines with nums and target (or input '3,5,7' and output), like shared/data/countdown",
    "sudoku": "a CSV with Puzzle and Solution columns of 16 digits (0 = empty), like shared/data/sudoku",
}

GOLD = {"gsm8k": _gsm8k_gold, "math": _math_gold}  # an eval row without a gold is left out

def load_eval(name, data_dir=None, *, eval_file=None, n=None, seed=0):
    """Evaluation examples of task `name` in file order; `n` draws a seeded random subset. Rows without a usable
    gold answer (GOLD) are left out with a warning. UsageError naming the format (EVAL_FILE_FORMAT) when eval_file
    cannot be read as the task's or holds no scorable problem, and for n < 1."""
    get_task(name)
    if n is not None and n < 1:
        raise UsageError(f"--n {n}: pass a number of problems >= 1 (or leave it out for all of them)")
    if eval_file:
        try:
            rows = _eval_rows(name, data_dir, eval_file)
        except (KeyError, ValueError, TypeError, AttributeError, UnicodeDecodeError) as e:
            raise UsageError(f"--eval-file {eval_file} is not a {name} file ({type(e).__name__}: {e}); "
                             f"pass {EVAL_FILE_FORMAT[name]}") from e
    else:
        rows = _eval_rows(name, data_dir, None)
    scorable = [ex for ex in rows if name not in GOLD or GOLD[name](ex) not in (None, "")]
    if not scorable:
        raise UsageError(f"{eval_file or 'the evaluation set'} holds no {name} problem with a gold answer; "
                         f"pass {EVAL_FILE_FORMAT[name]}")
    if len(scorable) < len(rows):  # e.g. the 12k MATH training file's 2 empty answers
        warnings.warn(f"{name}: left out {len(rows) - len(scorable)} of {len(rows)} evaluation problems without a "
                      "usable gold answer (B03)", stacklevel=2)
    return random.Random(seed).sample(scorable, n) if n is not None and n < len(scorable) else scorable

def _eval_rows(name, data_dir, eval_file):
    """All evaluation examples of task `name`: eval_file's, else the published test set (or its stand-in)."""
    if name == "gsm8k":
        raw = _read_jsonl(eval_file) if eval_file else _rows(data_dir, "gsm8k/test.jsonl", GSM8K_HUB, "test")
        rows = [_gsm8k_row(r) for r in raw]
    elif name == "math":
        raw = _read_jsonl(eval_file) if eval_file else _rows(data_dir, "math/math500_test.jsonl", MATH_EVAL_HUB, "test")
        rows = [_math_row(r) for r in raw]
    elif name == "countdown":
        rows = _countdown_held_out(eval_file or _published_test_set(data_dir, COUNTDOWN_TEST))
    else:
        path = eval_file or _published_test_set(data_dir, "sudoku/test_sudoku_split_new.csv")
        if path:
            rows = _read_sudoku_csv(path)
        else:  # like SPG's split: 2 puzzles per held-out grid + 1 more for 80 of them = 256
            rng = random.Random(SUDOKU_EVAL_SEED)
            extra = set(rng.sample(SUDOKU_HELDOUT, 80))
            rows = _sudoku_generate(SUDOKU_HELDOUT, [2 + (g in extra) for g in SUDOKU_HELDOUT], rng)
    return rows

# ----------------------------------------------------------------------------------------------------------------
# Prompts and target completions

def build_prompt(name, example, *, split="train", style="paper"):
    """The user-turn content for `example` (the chat template and the eval prefill are added by the caller)."""
    ex, train = example, split == "train"
    if style == "tiny":  # short prompts for the tiny character-level CPU model
        return {"gsm8k": lambda: ex["question"], "math": lambda: ex["problem"],
                "countdown": lambda: f"Countdown {','.join(map(str, ex['nums']))} -> {ex['target']}",
                "sudoku": lambda: "Sudoku " + ex["puzzle"]}[name]()
    if name == "gsm8k":
        return (SYSTEM_PROMPT if train else GSM8K_EVAL_SYS) + "\n\n" + ex["question"]
    if name == "math":
        return (SYSTEM_PROMPT + "\n\n" + MATH_TRAIN_INSTRUCTION if train else MATH_EVAL_SYS + "\n\n") + ex["problem"]
    if name == "countdown" and train:
        return (SYSTEM_PROMPT + f"\nUsing only the numbers {ex['nums']}, create an arithmetic expression that evaluates "
                f"to exactly {ex['target']}. You must use all numbers from the list, and each number must be used "
                "exactly once. You may use the operations +, -, *, and / as needed. After reasoning, provide only your "
                "final expression inside <answer></answer> tags without including an equals sign or the target number. "
                "For example, if the numbers are [2, 3, 4] and the target is 5, a valid answer is: "
                "<answer>\n2*4-3\n</answer>")
    if name == "countdown":
        return COUNTDOWN_EVAL_SYS + f"\n\nNumbers: {ex['nums']}\nTarget: {ex['target']}"
    question = "Solve the following Sudoku puzzle: " + ex["puzzle"] + ("" if train else "\n")  # SPG 3-shot
    return SUDOKU_SYSTEM_PROMPT + "\n\n" + "\n\n".join(SUDOKU_FEWSHOT) + "\n\nQuestion: " + question + "\nAnswer:\n"

def target_completion(name, example, *, style="tiny"):
    """A correct completion in the format the training prompt asks for (supervised warm start, tests)."""
    ex = example
    answer = {"gsm8k": lambda: ex["answer"], "math": lambda: "\\boxed{" + ex["answer"] + "}",
              "countdown": lambda: ex.get("solution") or countdown_solve(ex["nums"], ex["target"]),
              "sudoku": lambda: ex["solution"]}[name]()
    if style == "tiny":
        return "<answer>\n" + answer + "\n</answer>"
    worked = re.sub(r"<<.*?>>", "", ex.get("solution", "").split("####")[0]).strip() if name == "gsm8k" else ""
    return f"<reasoning>\n{worked or 'Solve it step by step.'}\n</reasoning>\n<answer>\n{answer}\n</answer>\n"

# ----------------------------------------------------------------------------------------------------------------
# Task registry

@dataclass(frozen=True)
class Task:
    name: str
    reward_funcs: tuple  # ((name, fn(completion, example) -> float, weight), ...); reference weights are all 1.0
    max_reward: float
    score_fn: Callable  # eval credit in [0, 1]
    answer_fn: Callable  # completion -> the text score_fn reads (eval.py logs it)

    def reward(self, completion, example):
        """Training reward: the weighted sum of the task's reward functions (a failed one counts 0); never raises."""
        return sum(weight * (fn(completion, example) or 0.0) for _, fn, weight in self.reward_funcs)

    def score(self, completion, example):
        """Evaluation credit: 1/0 (Sudoku: fraction of the empty cells right); never raises."""
        return self.score_fn(completion, example)

    def answer(self, completion):
        """The text the evaluation score reads from completion (string scans only: never raises on a string)."""
        return self.answer_fn(str(completion))

def _funcs(*pairs):
    return tuple((name, _safe(fn), 1.0) for name, fn in pairs)

TASKS = {
    "gsm8k": Task("gsm8k", _funcs(("xmlcount", _xmlcount), ("soft_format", soft_format), ("strict_format",
                                  strict_format), ("int", _gsm8k_int), ("correctness", _gsm8k_correct)),
                  4.0, _safe(_gsm8k_score, failed=0.0), _gsm8k_answer),
    "math": Task("math", _funcs(("correctness", _math_correct), ("format", _math_format)), 2.75,
                 _safe(_math_score, failed=0.0), _math_pred),
    "countdown": Task("countdown", _funcs(("countdown", _countdown_reward)), 1.0, _safe(_countdown_score, failed=0.0),
                      _countdown_answer),
    "sudoku": Task("sudoku", _funcs(("sudoku", _sudoku_reward)), 1.0, _safe(_sudoku_score, failed=0.0), _sudoku_answer),
}

def _strict_format_d1(c, ex):
    return strict_format(c, ex, d1_compat=True)

def _soft_format_d1(c, ex):
    return soft_format(c, ex, d1_compat=True)

def get_task(name, *, d1_compat=False):
    """The task `name`; d1_compat=True swaps in the reference's single-line GSM8K format rewards (B01 parity)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    if not d1_compat or name != "gsm8k":
        return TASKS[name]
    compat = {"strict_format": _strict_format_d1, "soft_format": _soft_format_d1}
    return dataclasses.replace(TASKS[name], reward_funcs=tuple(
        (fname, _safe(compat[fname]) if fname in compat else fn, weight) for fname, fn, weight in TASKS[name].reward_funcs))

def aggregate(name, scores, examples):
    """Eval summary in %. Sudoku: cell accuracy micro-averaged over all empty cells (the paper's metric) + solved."""
    n = max(len(scores), 1)
    if name != "sudoku":
        return {"accuracy": 100.0 * sum(scores) / n, "n": len(scores)}
    empty = [ex["puzzle"].count("0") for ex in examples]
    cells = sum(s * e for s, e in zip(scores, empty)) / max(sum(empty), 1)
    return {"accuracy": 100.0 * cells, "solved": 100.0 * sum(s == 1.0 for s in scores) / n, "n": len(scores)}
