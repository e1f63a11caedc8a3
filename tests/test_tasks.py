"""Tests for tasks.py: data splits, prompts, rewards (field cases B01-B06) and eval scores.

Run: python -m pytest -q tests/test_tasks.py   (CPU only, well under a minute)
Tests on the real files need ../shared/data beside the checkout and skip with a reason when it is absent.
"""
import collections
import csv
import itertools
import json
import random
import re
import sys
import warnings
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tasks  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DATA_MD = Path(__file__).resolve().parents[2] / "shared" / "docs" / "data.md"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"real data not found at {DATA} (see SOURCES.md there)")
FN_MAX = {"xmlcount": 0.5, "soft_format": 0.5, "strict_format": 0.5, "int": 0.5, "correctness": 2.0, "format": 0.75,
          "countdown": 1.0, "sudoku": 1.0}
EXAMPLES = {"gsm8k": {"question": "q", "answer": "72"}, "math": {"problem": "p", "answer": "\\frac{1}{2}"},
            "countdown": {"nums": [30, 100, 93], "target": 23},
            "sudoku": {"puzzle": "0310200404001043", "solution": "4312213434211243"}}


def fns(name):
    return {fn_name: fn for fn_name, fn, _ in tasks.get_task(name).reward_funcs}


def paper(answer, reasoning="Step 1\nStep 2"):
    return f"<reasoning>\n{reasoning}\n</reasoning>\n<answer>\n{answer}\n</answer>\n"


def count_solutions(puzzle):
    """Independent backtracking count of the completions of a 4x4 puzzle."""
    i = puzzle.find("0")
    if i < 0:
        return 1
    r, c = divmod(i, 4)
    used = {puzzle[j] for j in range(16) if j // 4 == r or j % 4 == c or (j // 8, j % 4 // 2) == (r // 2, c // 2)}
    return sum(count_solutions(puzzle[:i] + d + puzzle[i + 1:]) for d in "1234" if d not in used)


def solve_countdown(nums, target):
    """Independent brute force over orders and operator trees with exact fractions (any intermediate value)."""
    def search(items):
        if len(items) == 1:
            yield items[0]
            return
        for i, j in itertools.permutations(range(len(items)), 2):
            (a, ea), (b, eb) = items[i], items[j]
            rest = [items[k] for k in range(len(items)) if k not in (i, j)]
            steps = [(a + b, f"({ea}+{eb})"), (a - b, f"({ea}-{eb})"), (a * b, f"({ea}*{eb})")]
            for step in steps + ([(a / b, f"({ea}/{eb})")] if b else []):
                yield from search(rest + [step])
    return next((e for v, e in search([(Fraction(n), str(n)) for n in nums]) if v == target), None)


# ---------------------------------------------------------------------------------------------------------------
# Sudoku

def test_sudoku_grids_are_the_288_valid_grids():
    grids = tasks.SUDOKU_GRIDS
    assert len(grids) == len(set(grids)) == 288 and grids == sorted(grids)
    assert all(count_solutions(g) == 1 and sorted(g) == sorted("1234" * 4) for g in grids)
    assert sum(count_solutions(p) for p in ["1234" + "0" * 12]) == 288 // 24  # 12 grids share a first row


@needs_data
def test_heldout_constant_equals_csv_solution_grids():
    with open(DATA / "sudoku" / "test_sudoku_split_new.csv", newline="") as f:
        solutions = {row["Solution"] for row in csv.DictReader(f)}
    assert len(solutions) == 88
    assert {tasks.SUDOKU_GRIDS[i] for i in tasks.SUDOKU_HELDOUT} == solutions


def test_sudoku_training_puzzles():
    rows = tasks.load_train("sudoku")
    heldout = {tasks.SUDOKU_GRIDS[i] for i in tasks.SUDOKU_HELDOUT}
    assert len(rows) >= 3000 and len({r["puzzle"] for r in rows}) == len(rows)
    assert not heldout & {r["solution"] for r in rows}
    assert not set(tasks.SUDOKU_FEWSHOT_PUZZLES) & {r["puzzle"] for r in rows}
    few_shot_grids = {re.search(r"<answer>\n(\d{16})", s).group(1) for s in tasks.SUDOKU_FEWSHOT}
    assert few_shot_grids <= {r["solution"] for r in rows}  # forced into the training grids, as in SPG
    assert {16 - r["puzzle"].count("0") for r in rows} == set(tasks.SUDOKU_CLUES)
    clues = collections.Counter(16 - r["puzzle"].count("0") for r in rows)     # the published mix (data.md 1.5)
    for k, count in tasks.SUDOKU_CLUES.items():
        assert abs(clues[k] / len(rows) - count / 256) < 0.015, (k, clues[k])
    for r in rows:
        assert all(p in ("0", s) for p, s in zip(r["puzzle"], r["solution"]))
        assert tasks.sudoku_completions(r["puzzle"]) == 1
    assert all(count_solutions(r["puzzle"]) == 1 for r in rows[::10])  # independent check on a sample
    assert tasks.load_train("sudoku", seed=1) != rows and tasks.load_train("sudoku") == rows


@needs_data
def test_sudoku_published_eval_set_gets_full_reward():
    rows, task = tasks.load_eval("sudoku"), tasks.get_task("sudoku")
    assert len(rows) == 256 and rows[0] == EXAMPLES["sudoku"]
    assert collections.Counter(16 - ex["puzzle"].count("0") for ex in rows) == tasks.SUDOKU_CLUES
    for ex in rows:
        assert count_solutions(ex["puzzle"]) == 1 and ex["puzzle"] not in tasks.SUDOKU_FEWSHOT_PUZZLES
        assert task.reward(tasks.target_completion("sudoku", ex, style="paper"), ex) == 1.0
        assert task.reward(tasks.target_completion("sudoku", ex), ex) == 1.0
        assert task.score(paper(ex["solution"]), ex) == 1.0
    assert tasks.aggregate("sudoku", [1.0] * 256, rows) == {"accuracy": 100.0, "solved": 100.0, "n": 256}


def test_sudoku_generated_eval_set(monkeypatch):
    monkeypatch.setattr(tasks, "DATA_DIR_DEFAULT", None)
    with pytest.warns(UserWarning, match="test_sudoku_split_new.csv not found.*--data-dir"):
        rows = tasks.load_eval("sudoku")
    grids = [r["solution"] for r in rows]
    assert len(rows) == 256 and len(set(grids)) == 88
    assert set(grids) == {tasks.SUDOKU_GRIDS[i] for i in tasks.SUDOKU_HELDOUT}
    assert all(count_solutions(r["puzzle"]) == 1 for r in rows)
    with pytest.warns(UserWarning, match="stand-in"):
        assert tasks.load_eval("sudoku") == rows


def test_sudoku_eval_file_and_subset(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("Puzzle,Solution\n0310200404001043,4312213434211243\n1002020100030310,1432324141232314\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # an --eval-file is the published set's stand-in by choice: no warning
        rows = tasks.load_eval("sudoku", eval_file=path)
    assert rows == [EXAMPLES["sudoku"], {"puzzle": "1002020100030310", "solution": "1432324141232314"}]
    subset = tasks.load_eval("sudoku", eval_file=path, n=1, seed=3)
    assert len(subset) == 1 and subset == tasks.load_eval("sudoku", eval_file=path, n=1, seed=3)


def test_sudoku_reward_and_score():
    ex, reward, score = EXAMPLES["sudoku"], tasks.get_task("sudoku").reward, tasks.get_task("sudoku").score
    half = ex["solution"]  # the puzzle 0310200404001043 has 8 empty cells: 0, 3, 5, 6, 8, 10, 11, 13
    assert reward("<answer>" + ex["puzzle"] + "</answer>", ex) == 0.0  # copying the clues earns nothing
    assert reward("<answer>" + "1" + half[1:3] + "1" + half[4:6] + "1" + half[7:] + "</answer>", ex) == 5 / 8
    assert reward("<answer>4312 2134\n3421 1243</answer>", ex) == 1.0  # digits only
    assert reward("<answer>0000</answer> then <answer>" + half + "</answer>", ex) == 1.0  # the last pair
    assert score("<answer>0000000000000000</answer> then <answer>" + half + "</answer>", ex) == 1.0   # eval: the last
    assert score("<answer>" + half + "</answer> then <answer>0000000000000000</answer>", ex) == 0.0   # too
    assert reward("<answer>" + half, ex) == 0.0 and score("<answer>" + half, ex) == 1.0  # cut off: score reads it
    assert reward("<answer>" + half + "9999</answer>", ex) == 1.0  # cut to 16
    assert score("so the grid is 4312213434211243.", ex) == 1.0 and score("no answer", ex) == 0.0
    assert score("<answer>[4,3,1,2,2,1,3,4,3,4,2,1,1,2,4,3]</answer>", ex) == 1.0  # reference eval would shift cells
    four_empty = {"puzzle": "0000324141232314", "solution": "1432324141232314"}
    assert score("<answer>1000</answer>", four_empty) == 0.25
    assert tasks.aggregate("sudoku", [1.0, 0.25], [ex, four_empty]) == pytest.approx(  # micro-average over cells
        {"accuracy": 100 * (8 + 1) / (8 + 4), "solved": 50.0, "n": 2})


@needs_data
def test_eval_subset_is_a_seeded_random_draw():
    """--n draws a random subset of the whole set, the same for the same seed: no duplicates, not the first rows."""
    full = tasks.load_eval("gsm8k")
    a, b = (tasks.load_eval("gsm8k", n=32, seed=s) for s in (0, 1))
    for subset in (a, b):
        assert len(subset) == 32 and all(ex in full for ex in subset)
        assert len({full.index(ex) for ex in subset}) == 32
    assert a != b and a == tasks.load_eval("gsm8k", n=32, seed=0) and a != full[:32]
    assert max(full.index(ex) for ex in a) > len(full) // 2       # drawn from the whole file


def test_countdown_reward_reads_only_a_closed_answer():
    """The training reward reads the last <answer>...</answer> pair (TinyZero's `<answer>(.*?)</answer>`): an
    answer cut off before </answer> earns nothing, the same text closed earns 1.0."""
    reward, ex = tasks.get_task("countdown").reward, EXAMPLES["countdown"]
    assert reward("<answer>\n30 + 93 - 100\n</answer>", ex) == 1.0
    assert reward("<answer>\n30 + 93 - 100", ex) == 0.0
    assert reward("<answer>\n30 + 93 - 100\n</answer> <answer>\n30 + 93", ex) == 1.0   # the last closed pair


def test_sudoku_prompts():
    ex = EXAMPLES["sudoku"]
    train, evaluation = (tasks.build_prompt("sudoku", ex, split=s) for s in ("train", "eval"))
    assert train.startswith(tasks.SUDOKU_SYSTEM_PROMPT + "\n\n" + tasks.SUDOKU_FEWSHOT[0] + "\n\n")
    assert train.endswith("</answer>\n\nQuestion: Solve the following Sudoku puzzle: 0310200404001043\nAnswer:\n")
    assert evaluation == train[:-len("\nAnswer:\n")] + "\n\nAnswer:\n"
    assert tasks.build_prompt("sudoku", ex, style="tiny") == "Sudoku 0310200404001043"
    assert tasks.target_completion("sudoku", ex) == "<answer>\n4312213434211243\n</answer>"


@pytest.mark.skipif(not DATA_MD.is_file(), reason=f"{DATA_MD} not found")
def test_prompt_constants_match_data_md():
    doc = DATA_MD.read_text()
    blocks = re.findall(r"```\n(.*?)```", doc[doc.index("`SUDOKU_SYSTEM_PROMPT` (starts"):], re.S)
    assert blocks[0][:-1] == tasks.SUDOKU_SYSTEM_PROMPT
    assert tuple(b[:-1] for b in blocks[1:4]) == tasks.SUDOKU_FEWSHOT

    def inline(prefix):  # `"..."` string after prefix; `\n` in the doc means a newline
        start = doc.index('`"', doc.index(prefix)) + 2
        return doc[start:doc.index('"`', start)].replace("\\n", "\n").replace('\\"', '"')
    assert inline("- GSM8K `SYS`") == tasks.GSM8K_EVAL_SYS
    assert inline("- MATH500 `SYS`") == tasks.MATH_EVAL_SYS
    assert inline("- Countdown `SYS`") == tasks.COUNTDOWN_EVAL_SYS
    math_train = re.search(r'- MATH: `SYSTEM_PROMPT \+ "(.*?)" \+ problem`', doc).group(1).replace("\\n", "\n")
    assert tasks.build_prompt("math", {"problem": "P"}) == tasks.SYSTEM_PROMPT + math_train + "P"
    countdown = re.search(r'- Countdown: `SYSTEM_PROMPT \+ "(.*?)" \+ str\(nums\) \+ "(.*?)" \+ str\(target\) \+ "(.*?)"`',
                          doc).groups()
    ex = EXAMPLES["countdown"]
    assert tasks.build_prompt("countdown", ex) == tasks.SYSTEM_PROMPT + (
        countdown[0] + str(ex["nums"]) + countdown[1] + str(ex["target"]) + countdown[2]).replace("\\n", "\n")
    eval_sep = re.search(r'User content = `SYS \+ "(.*?)" \+ question`', doc).group(1).replace("\\n", "\n")
    for name, sys_prompt, ex, question in [("gsm8k", tasks.GSM8K_EVAL_SYS, {"question": "Q", "answer": "1"}, "Q"),
                                           ("math", tasks.MATH_EVAL_SYS, {"problem": "P", "answer": "1"}, "P")]:
        assert tasks.build_prompt(name, ex, split="eval") == sys_prompt + eval_sep + question   # data.md 2.2


# ---------------------------------------------------------------------------------------------------------------
# Field cases B01-B06

B01 = "<reasoning>\nStep 1\nStep 2\n</reasoning>\n<answer>\n42\n</answer>\n"


def test_b01_format_rewards_match_multiline_reasoning():
    strict, soft = fns("gsm8k")["strict_format"], fns("gsm8k")["soft_format"]
    assert (strict(B01, {}), soft(B01, {})) == (0.5, 0.5)
    no_close = B01.replace("</answer>", "")
    assert (strict(no_close, {}), soft(no_close, {})) == (0.0, 0.0)
    assert (tasks.strict_format(B01, {}, d1_compat=True), tasks.soft_format(B01, {}, d1_compat=True)) == (0.0, 0.0)
    one_line = "<reasoning>\nStep 1\n</reasoning>\n<answer>\n42\n</answer>\n"  # reference: strict 0.5, soft 0.0
    assert tasks.strict_format(one_line, {}, d1_compat=True) == 0.5
    assert tasks.soft_format(one_line, {}, d1_compat=True) == 0.0
    compat = {name: fn for name, fn, _ in tasks.get_task("gsm8k", d1_compat=True).reward_funcs}   # the flagged mode
    assert (compat["strict_format"](B01, {}), compat["soft_format"](B01, {})) == (0.0, 0.0)
    assert (compat["strict_format"](one_line, {}), compat["soft_format"](one_line, {})) == (0.5, 0.0)
    assert compat["xmlcount"] is fns("gsm8k")["xmlcount"] and tasks.get_task("math", d1_compat=True) is tasks.TASKS["math"]
    import spg_min
    assert spg_min.parse_config(["--task", "gsm8k", "--d1-compat", "true"]).d1_compat is True
    assert spg_min.parse_config(["--task", "gsm8k"]).d1_compat is False
    assert soft("I think.\n" + B01, {}) == 0.5 and strict("I think.\n" + B01, {}) == 0.0
    xmlcount = fns("gsm8k")["xmlcount"]
    assert xmlcount(B01, {}) == 0.5 and xmlcount(B01 + "x" * 11, {}) == pytest.approx(0.489)


@pytest.mark.parametrize("completion, gold", [
    ("<answer>The total is 72 clips, altogether.</answer>", "72"),
    ("<answer>\n8,000\n</answer>", "8000"),
    ("<answer>\n8000\n</answer>", "8,000"),
    ("<answer>\\boxed{$9{,}500}</answer>", "9500"),
    ("<answer>$72</answer>", "72"),
    ("<answer>72.00</answer>", "72"),
    ("<answer>-5</answer>", "-5"),
])
def test_b02_gsm8k_answers_compare_as_numbers(completion, gold):
    ex = {"question": "q", "answer": gold}
    assert fns("gsm8k")["correctness"](completion, ex) == 2.0
    assert tasks.get_task("gsm8k").score(completion, ex) == 1.0


def test_b02_number_extraction():
    assert tasks.last_number("The total is 72 clips, altogether.") == 72
    assert tasks.last_number("8,000") == 8000 and tasks.last_number("9{,}500") == 9500
    assert tasks.last_number(", , ,") is None and tasks.last_number("$-5.") == -5
    assert tasks.get_task("gsm8k").score("\\boxed{$9{,}500}", {"answer": "9500"}) == 1.0
    score, ex = tasks.get_task("gsm8k").score, {"answer": "72"}
    assert score("The total is 72 clips, altogether.", ex) == 1.0       # no tag at all: the text's last number
    assert score("So 72 clips. <answer></answer>", ex) == 0.0           # an empty tag is an empty answer (B03)
    assert score("It is 72. <answer>7</answer>", ex) == 0.0             # the tag wins over the text
    int_reward = fns("gsm8k")["int"]
    assert int_reward("<answer>-5</answer>", {}) == 0.5 and int_reward("<answer>1,080</answer>", {}) == 0.5
    assert int_reward("<answer>$72</answer>", {}) == 0.0 and int_reward("<answer>72.5</answer>", {}) == 0.0


def test_b03_degenerate_answers_never_score():
    correct, ex = fns("gsm8k")["correctness"], {"question": "q", "answer": "72"}
    assert correct("<answer></answer>", ex) == 0.0 and correct("<answer>7</answer>", ex) == 0.0
    assert correct("<answer>72</answer>", ex) == 2.0 and correct("72", ex) == 0.0  # no answer tag
    with pytest.warns(UserWarning, match="gold"):
        assert tasks.get_task("gsm8k").reward(paper(""), {"question": "q", "answer": ""}) < 4.0
    with pytest.warns(UserWarning, match="gold"):
        assert fns("gsm8k")["correctness"]("<answer>72</answer>", {"question": "q", "answer": "n/a"}) == 0.0
    with pytest.warns(UserWarning, match="gold"):
        assert fns("math")["correctness"]("\\boxed{}", {"problem": "p", "answer": ""}) == 0.0
    with pytest.warns(UserWarning, match="gold"):  # a MATH solution with no \boxed gives no gold
        assert fns("math")["correctness"]("\\boxed{4}", tasks._math_row({"problem": "p", "solution": "It is 4."})) == 0.0
    assert fns("math")["correctness"]("<answer>\\boxed{}</answer>", EXAMPLES["math"]) == 0.0
    assert not tasks.math_equal("5", "") and not tasks.math_equal("", "")
    assert fns("countdown")["countdown"]("<answer></answer>", EXAMPLES["countdown"]) == 0.0
    assert tasks.get_task("sudoku").reward("<answer></answer>", EXAMPLES["sudoku"]) == 0.0


def test_b04_last_boxed_with_nested_braces():
    assert tasks.last_boxed("First guess \\boxed{2}. Correction: \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert tasks.last_boxed("\\boxed{\\sqrt{\\frac{a}{b}}}") == "\\sqrt{\\frac{a}{b}}"
    assert tasks.last_boxed("... so \\boxed 5$") == "5"
    assert tasks.last_boxed("no box at all") is None and tasks.last_boxed("\\boxed{\\frac{1}{2}") is None
    ex = {"problem": "p", "answer": "\\frac{1}{2}"}
    assert fns("math")["correctness"]("First guess \\boxed{2}. Correction: \\boxed{\\frac{1}{2}}", ex) == 2.0
    assert fns("math")["correctness"]("no box at all", ex) == 0.0


def test_the_prompts_boxed_placeholder_is_not_an_answer():
    """The eval prompts show `\\boxed{...}`; a model that echoes it after its real box keeps its answer (data.md 4.2
    (a): the reference GSM8K parser skips empty and `...` boxes). An unbalanced last box is still no box."""
    echoed = "so \\boxed{18}.\n</reasoning>\n<answer>\n\\boxed{...}\n</answer>"
    assert tasks.last_boxed(echoed) == "..." and tasks.last_answer_box(echoed) == "18"
    assert tasks.get_task("gsm8k").score(echoed, {"question": "q", "answer": "18"}) == 1.0
    assert tasks.get_task("gsm8k").score(echoed.replace("{...}", "{}"), {"question": "q", "answer": "18"}) == 1.0
    assert tasks.get_task("gsm8k").score("<answer>\\boxed{...}</answer>", {"question": "q", "answer": "18"}) == 0.0
    trailing = "<answer>\\boxed{18} \\boxed{...}</answer>"      # training rewards keep the reference's last box
    assert fns("gsm8k")["correctness"](trailing, {"answer": "18"}) == 0.0
    assert fns("math")["correctness"](trailing, {"answer": "18"}) == 0.0
    assert tasks.get_task("math").score(trailing, {"answer": "18"}) == 1.0
    assert tasks.get_task("math").score(echoed.replace("18", "\\frac{1}{2}"), EXAMPLES["math"]) == 1.0
    assert tasks.get_task("countdown").score("\\boxed{30 + 93 - 100} \\boxed{\\ldots}", EXAMPLES["countdown"]) == 1.0
    assert tasks.last_answer_box("\\boxed{2} then \\boxed{3") is None and tasks.last_answer_box("\\boxed{}") is None
    assert tasks.last_boxed("\\boxed\n{5}") == "5"                                  # LaTeX allows a newline there


def test_strict_format_is_one_reasoning_block_and_one_answer_block():
    strict = fns("gsm8k")["strict_format"]
    assert strict(paper("1", reasoning="a\nb"), {}) == 0.5
    assert strict(paper("1", reasoning="a") + paper("2", reasoning="b"), {}) == 0.0     # two of each
    assert strict("<reasoning>\na\n</reasoning>\n<answer>\n<answer>\n1\n</answer>\n", {}) == 0.0


def test_a_unicode_minus_is_a_minus():
    score = tasks.get_task("gsm8k").score
    assert score("<answer>\u22125</answer>", {"answer": "5"}) == 0.0
    assert score("<answer>\u22125</answer>", {"answer": "-5"}) == 1.0
    assert tasks.get_task("countdown").score("\\boxed{30 + 93 \u2212 100}", EXAMPLES["countdown"]) == 1.0


@pytest.mark.parametrize("pred, gold, equal", [
    ("\\frac{2}{3}", "2/3", True), ("\\dfrac{1}{2}", "0.5", True), ("\\frac{1}{2}", "0.51", False),
    ("\\frac{100}{3}", "33.3", False),  # policy: math-verify rounds floats to 6 decimals, so 33.333333 would match
    ("1,000", "1000", True),  # policy: thousands separators are stripped (math-verify); the reference says unequal
    ("(1, 2)", "(1,2)", True), ("x=5", "5", True), ("", "5", False),
])
def test_b05_math_equivalence(pred, gold, equal):
    assert tasks.math_equal(pred, gold) is equal
    ex = {"problem": "p", "answer": gold}
    assert fns("math")["correctness"](f"<answer>\\boxed{{{pred}}}</answer>", ex) == 2.0 * equal


def test_b06_countdown_multiset_and_exact_values():
    reward, score = tasks.get_task("countdown").reward, tasks.get_task("countdown").score
    ex = {"nums": [1, 81, 1, 1], "target": 81}
    assert reward("<answer>81*1</answer>", ex) == 0.1 and score("\\boxed{81*1}", ex) == 0.0
    assert reward("<answer>81*1*1*1</answer>", ex) == 1.0
    assert score("\\boxed{81 \\times 1 \\times 1 \\times 1 = 81}", ex) == 1.0
    ex = {"nums": [161, 2], "target": 80}
    assert reward("<answer>161/2</answer>", ex) == 0.1 and score("<answer>161/2</answer>", ex) == 0.0
    for bad in ["__import__('os').system('1')", "81**1*1*1", "81//1*1*1", "81.0*1*1*1", "81*1*1*1=81", "81 1 1 1"]:
        assert reward(f"<answer>{bad}</answer>", {"nums": [1, 81, 1, 1], "target": 81}) == 0.0, bad
    ex = {"nums": [30, 100, 93], "target": 23}                  # signs, as the reference's eval accepts them
    assert reward("<answer>-100 + 93 + 30</answer>", ex) == 1.0 and score("\\boxed{-100 + 93 + 30}", ex) == 1.0
    assert reward("<answer>-(100 - 93 - 30)</answer>", ex) == 1.0 and reward("<answer>+93-100+30</answer>", ex) == 1.0
    assert tasks.countdown_eval("-(1-81)*1*1") == (Fraction(80), [1, 1, 1, 81])
    assert tasks.countdown_eval("(100-93)/(30-23)*1") == (Fraction(1), [1, 23, 30, 93, 100])
    assert tasks.countdown_eval("1/(2-2)") is None


def test_eval_answer_is_what_the_score_reads():
    """Task.answer (logged by eval.py) is the text each score reads, and Countdown's eval falls back to the first
    inline `expr = number` when there is neither a box nor an answer tag (data.md 4.2)."""
    cd, ex = tasks.get_task("countdown"), {"nums": [30, 100, 93], "target": 23}
    assert cd.answer("Step 1: 30 + 93 = 123. So 30 + 93 - 100 = 23.") == "30 + 93"   # the first one, as the reference
    assert cd.score("Step 1: 30 + 93 = 123. So 30 + 93 - 100 = 23.", ex) == 0.0
    assert cd.answer("I get 30 + 93 - 100 = 23.") == "30 + 93 - 100" and cd.score("I get 30 + 93 - 100 = 23.", ex) == 1.0
    assert cd.answer("\\boxed{93 \\times 1 = 93}") == "93 * 1" and cd.answer("no equation") == ""
    assert cd.answer("We use 93\n30 + 93 - 100 = 23") == "30 + 93 - 100"        # an inline equation is one line
    assert cd.answer("4 \\times 6 \\times 1 = 24") == "4 * 6 * 1"              # LaTeX mapped before the search
    assert cd.score("4 \\times 6 \\times 1 = 24", {"nums": [4, 6, 1], "target": 24}) == 1.0
    gsm8k = tasks.get_task("gsm8k")
    assert gsm8k.answer("\\boxed{} the total is 72") == "" and gsm8k.score("\\boxed{} the total is 72", {"answer": "72"}) == 0
    assert tasks.get_task("gsm8k").answer("<answer>\\boxed{9{,}500}</answer>") == "9{,}500"
    assert tasks.get_task("gsm8k").answer("The total is 72 clips.") == "The total is 72 clips."
    assert tasks.get_task("math").answer("<answer>\\frac{1}{2}</answer>") == "\\frac{1}{2}"
    sudoku = tasks.get_task("sudoku")
    assert sudoku.answer("x 1234123412341234 y") == "1234123412341234" and sudoku.answer("<answer>\n12") == "12"


# ---------------------------------------------------------------------------------------------------------------
# GSM8K, MATH and Countdown on the real files

@needs_data
def test_gsm8k_gold_answers_parse_and_paper_completion_gets_max_reward():
    task = tasks.get_task("gsm8k")
    for split in (tasks.load_eval("gsm8k"), tasks.load_train("gsm8k")):
        for ex in split:
            assert tasks.last_number(ex["answer"]) == Fraction(ex["answer"].replace(",", ""))
            assert task.reward(tasks.target_completion("gsm8k", ex, style="paper"), ex) == 4.0
            assert task.score(paper("\\boxed{" + ex["answer"] + "}"), ex) == 1.0
    assert len(tasks.load_eval("gsm8k")) == 1319 and len(tasks.load_train("gsm8k")) == 7473
    assert tasks.load_eval("gsm8k", data_dir=DATA) == tasks.load_eval("gsm8k")
    ex = tasks.load_eval("gsm8k")[0]
    assert ex["answer"] == "18" and fns("gsm8k")["correctness"](tasks.target_completion("gsm8k", ex), ex) == 2.0


@needs_data
def test_math_paper_completion_gets_max_reward():
    task, rows = tasks.get_task("math"), tasks.load_eval("math")
    assert len(rows) == 500 and len(tasks.load_train("math")) == 11998
    for ex in rows:
        assert task.reward(tasks.target_completion("math", ex, style="paper"), ex) == 2.75
        assert task.score(paper("\\boxed{" + ex["answer"] + "}"), ex) == 1.0
        assert task.reward(tasks.target_completion("math", ex), ex) == 2.75


@needs_data
def test_countdown_published_problems():
    rows, task = tasks.load_eval("countdown"), tasks.get_task("countdown")
    assert len(rows) == 256 and rows[0] == {"nums": [30, 100, 93], "target": 23}
    for ex in rows:
        expr = solve_countdown(ex["nums"], ex["target"])
        assert expr is not None, ex
        assert task.reward(f"<answer>\n{expr}\n</answer>", ex) == 1.0
        changed = re.sub(r"\d+", lambda m: str(int(m.group()) + 1), expr, count=1)
        assert task.reward(f"<answer>\n{changed}\n</answer>", ex) < 1.0
        assert task.reward(tasks.target_completion("countdown", ex), ex) == 1.0  # integer-only solver solves all
    published = {(tuple(sorted(ex["nums"])), ex["target"]) for ex in rows}
    train = tasks.load_train("countdown")
    assert len(train) == tasks.COUNTDOWN_TRAIN_SIZE
    assert not published & {(tuple(sorted(e["nums"])), e["target"]) for e in train}


def test_countdown_generated_sets(monkeypatch):
    monkeypatch.setattr(tasks, "DATA_DIR_DEFAULT", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train = tasks.load_train("countdown")        # one warning: it excludes only the stand-in held-out set
        evaluation = tasks.load_eval("countdown")    # one warning: the held-out set is the stand-in
    assert len(caught) == 2 and re.search("countdown_cd3_test.jsonl not found.*may overlap", str(caught[0].message))
    assert re.search("countdown_cd3_test.jsonl not found.*stand-in held-out set instead", str(caught[1].message))
    with pytest.warns(UserWarning, match="stand-in"):
        assert len(evaluation) == 256 and evaluation == tasks.load_eval("countdown")
    keys = {(tuple(sorted(e["nums"])), e["target"]) for e in train}
    assert len(keys) == len(train) and not keys & {(tuple(sorted(e["nums"])), e["target"]) for e in evaluation}
    for ex in train[::20] + evaluation:
        assert len(ex["nums"]) == 3 and all(1 <= n <= 100 for n in ex["nums"] + [ex["target"]])
        assert tasks.get_task("countdown").reward(tasks.target_completion("countdown", ex), ex) == 1.0
    assert tasks.build_prompt("countdown", EXAMPLES["countdown"], style="tiny") == "Countdown 30,100,93 -> 23"
    assert tasks.target_completion("countdown", EXAMPLES["countdown"]) == "<answer>\n93-(100-30)\n</answer>"


@needs_data
@pytest.mark.parametrize("name", ["gsm8k", "math", "countdown", "sudoku"])
def test_default_splits_share_no_problem(name):
    """On the real files no training example is the same problem as a held-out one (Sudoku: no shared grid)."""
    held_out = {tasks.held_out_key(name, ex) for ex in tasks.load_eval(name)}
    assert len(held_out) == {"gsm8k": 1319, "math": 500, "countdown": 256, "sudoku": 88}[name]
    assert not held_out & {tasks.held_out_key(name, ex) for ex in tasks.load_train(name)}


@needs_data
def test_eval_file_problems_are_left_out_of_training(tmp_path):
    """An --eval-file's problems leave training: Sudoku drops every puzzle of its grids, GSM8K the same question
    (whitespace aside), with a warning that counts them; Countdown generates around them and keeps its size."""
    default = tasks.load_train("sudoku")
    other = next(ex for ex in default if ex["solution"] != default[0]["solution"])
    grids = [default[0]["solution"], other["solution"]]
    dropped = [ex for ex in default if ex["solution"] in grids]
    assert len(dropped) > 2                       # a grid gives several training puzzles
    path = tmp_path / "s.csv"
    path.write_text("Puzzle,Solution\n" + "".join(f"{ex['puzzle']},{ex['solution']}\n" for ex in (default[0], other)))
    with pytest.warns(UserWarning, match=f"left out {len(dropped)} of {len(default)} training examples"):
        kept = tasks.load_train("sudoku", eval_file=path)
    assert sorted(map(str, kept)) == sorted(str(ex) for ex in default if ex["solution"] not in grids)

    questions = [ex["question"] for ex in tasks.load_train("gsm8k")[:2]]
    path = tmp_path / "g.jsonl"
    path.write_text("".join(json.dumps({"question": "  " + q.replace(" ", "\n", 1), "answer": "#### 1"}) + "\n"
                            for q in questions))
    with pytest.warns(UserWarning, match="left out 2 of 7473"):
        kept = tasks.load_train("gsm8k", eval_file=path)
    assert len(kept) == 7471 and not set(questions) & {ex["question"] for ex in kept}
    with pytest.raises(ValueError, match="holds every gsm8k training problem"):
        tasks.load_train("gsm8k", eval_file=DATA / "gsm8k" / "train.jsonl")

    problems = tasks.load_train("countdown")[:3]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"nums": ex["nums"][::-1], "target": ex["target"]}) + "\n" for ex in problems))
    with warnings.catch_warnings():
        warnings.simplefilter("error")            # nothing to leave out: the generator never draws them
        kept = tasks.load_train("countdown", eval_file=path)
    assert len(kept) == tasks.COUNTDOWN_TRAIN_SIZE
    assert not {tasks.held_out_key("countdown", ex) for ex in problems} & {tasks.held_out_key("countdown", ex)
                                                                           for ex in kept}


# ---------------------------------------------------------------------------------------------------------------
# API, loading and robustness

def test_api_and_prompts():
    assert tasks.EVAL_PREFILL == "<reasoning>"
    max_rewards = {"gsm8k": 4.0, "math": 2.75, "countdown": 1.0, "sudoku": 1.0}
    assert {n: tasks.get_task(n).max_reward for n in tasks.TASKS} == max_rewards
    for name in tasks.TASKS:
        assert sum(FN_MAX[n] * w for n, _, w in tasks.get_task(name).reward_funcs) == tasks.get_task(name).max_reward
    with pytest.raises(ValueError, match="gsm8k, math, countdown, sudoku"):
        tasks.get_task("chess")
    q = {"question": "How many?", "answer": "3"}
    assert tasks.build_prompt("gsm8k", q) == tasks.SYSTEM_PROMPT + "\n\nHow many?"
    assert tasks.build_prompt("gsm8k", q, split="eval") == tasks.GSM8K_EVAL_SYS + "\n\nHow many?"
    countdown_eval = tasks.build_prompt("countdown", EXAMPLES["countdown"], split="eval")
    assert countdown_eval == tasks.COUNTDOWN_EVAL_SYS + "\n\nNumbers: [30, 100, 93]\nTarget: 23"
    assert "Using only the numbers [30, 100, 93]" in tasks.build_prompt("countdown", EXAMPLES["countdown"])
    assert tasks.target_completion("math", EXAMPLES["math"]) == "<answer>\n\\boxed{\\frac{1}{2}}\n</answer>"
    assert tasks.aggregate("gsm8k", [1.0, 0.0, 1.0, 1.0], [{}] * 4) == {"accuracy": 75.0, "n": 4}


@pytest.mark.parametrize("name, wrong, named", [
    ("sudoku", "gsm8k/test.jsonl", "Puzzle and Solution"),
    ("countdown", "sudoku/test_sudoku_split_new.csv", "nums and target"),
    ("gsm8k", "math/math500_test.jsonl", "question and answer"),
    ("math", "gsm8k/test.jsonl", "problem and answer"),
])
def test_an_eval_file_of_another_format_is_refused_naming_the_format(name, wrong, named):
    with pytest.raises(tasks.UsageError, match=f"--eval-file .* is not a {name} file .*pass .*{named}"):
        tasks.load_eval(name, eval_file=DATA / wrong)


@pytest.mark.parametrize("row", ["12,34", "0310200404001043,4312213434211244",   # too short; not a valid grid
                                 "0310200404001043,1234341221434321",            # a valid grid the givens contradict
                                 "4312213434211243,4312213434211243", "031020040400104a,4312213434211243"])
def test_a_sudoku_csv_row_that_is_not_a_puzzle_is_refused_with_its_line(tmp_path, row):
    path = tmp_path / "s.csv"
    path.write_text("Puzzle,Solution\n0310200404001043,4312213434211243\n" + row + "\n")
    with pytest.raises(tasks.UsageError, match="line 3: .* is not a puzzle with its solution grid"):
        tasks.load_eval("sudoku", eval_file=path)


def test_an_eval_set_without_a_scorable_problem_is_refused(tmp_path):
    """An empty file, a header-only CSV, rows without a gold answer and --n below 1 are usage errors, not a 0%
    result; rows without a gold among good ones are left out with a warning (B03)."""
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "header.csv").write_text("Puzzle,Solution\n")
    (tmp_path / "nohash.jsonl").write_text(json.dumps({"question": "q", "answer": "no hashes here"}) + "\n")
    for name, path in [("gsm8k", "empty.jsonl"), ("sudoku", "header.csv"), ("gsm8k", "nohash.jsonl")]:
        with pytest.raises(tasks.UsageError, match="holds no .* problem with a gold answer"):
            tasks.load_eval(name, eval_file=tmp_path / path)
    for n in (0, -1):
        with pytest.raises(tasks.UsageError, match=f"--n {n}: pass"):
            tasks.load_eval("sudoku", n=n)
    rows = [{"problem": "p1", "answer": "1"}, {"problem": "p2", "answer": ""}, {"problem": "p3", "answer": "3"}]
    (tmp_path / "math.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.warns(UserWarning, match="left out 1 of 3 evaluation problems without a usable gold"):
        assert [ex["problem"] for ex in tasks.load_eval("math", eval_file=tmp_path / "math.jsonl")] == ["p1", "p3"]
    with pytest.warns(UserWarning, match="gold"):
        assert tasks.get_task("gsm8k").score("<answer>72</answer>", {"answer": "no hashes here"}) == 0.0


def test_offline_without_data_dir_fails_fast_with_a_clear_message(monkeypatch, tmp_path):
    monkeypatch.setattr(tasks, "DATA_DIR_DEFAULT", None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="--data-dir"):
        tasks.load_eval("gsm8k")
    with pytest.raises(FileNotFoundError, match="gsm8k/test.jsonl"):
        tasks.load_eval("gsm8k", data_dir=tmp_path)


TEXT = st.one_of(st.text(max_size=300), st.lists(st.sampled_from(
    ["<reasoning>", "</reasoning>", "<answer>", "</answer>", "\n", " ", "\\boxed{", "\\boxed ", "{", "}", "$", "=",
     "72", "-5", "1,000", "0.5", "\\frac{1}{2}", "30", "100", "93", "+", "-", "*", "/", "(", ")", "**", "0", "x",
     "4312213434211243", "\\times"]), max_size=40).map("".join))


@settings(max_examples=150, deadline=None)
@given(text=TEXT)
def test_rewards_and_scores_never_raise_and_stay_in_range(text):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no internal exception may hide behind the catch-all either
        for name, task in tasks.TASKS.items():
            ex = EXAMPLES[name]
            for fn_name, fn, _ in task.reward_funcs:
                assert 0.0 <= fn(text, ex) <= FN_MAX[fn_name]
            assert 0.0 <= task.reward(text, ex) <= task.max_reward
            assert 0.0 <= task.score(text, ex) <= 1.0


# ---- the fourth mutation audit's survivors: each test below fails under the bug its comment names

def test_gsm8k_reads_the_last_number_and_a_minus_only_as_a_sign():   # B02
    assert tasks.last_number("3 apples and 72") == 72                            # the last, not the first
    assert tasks.last_number("2-3") == 3 and tasks.last_number("(4)-3") == 3    # subtraction, not -3
    assert tasks.last_number("it is -3") == -3
    ex = {"question": "q", "answer": "18"}
    assert fns("gsm8k")["correctness"]("<answer>16 - 3 - 4 = 9, so 9 * 2 = 18</answer>", ex) == 2.0
    assert tasks.get_task("gsm8k").score("<answer>16 - 3 - 4 = 9, so 9 * 2 = 18</answer>", ex) == 1.0


@pytest.mark.parametrize("answer, reward", [("72", 0.5), ("-72", 0.5), ("1,080", 0.5), (",", 0.0), ("1,2", 0.0),
                                            ("72,", 0.0), ("1,0800", 0.0)])
def test_gsm8k_int_reward_takes_only_an_integer_with_thousands_commas(answer, reward):   # B02
    assert fns("gsm8k")["int"](f"<answer>{answer}</answer>", {}) == reward


def test_an_echoed_placeholder_box_with_spaces_is_skipped():          # data.md 4.2 (a)
    assert tasks.get_task("gsm8k").score("so \\boxed{18}.\n<answer>\n\\boxed{ ... }\n</answer>", {"answer": "18"}) == 1.0


def test_a_bare_box_ends_at_the_line():                                # B04: `\boxed 5` then more text
    assert tasks.last_boxed("so \\boxed 5\nThe end") == "5"
    assert tasks.get_task("math").score("so \\boxed 5\nThe end", {"problem": "p", "answer": "5"}) == 1.0


def test_math_answers_equal_up_to_a_final_period():                    # B05: math-verify alone says 5. != 5
    assert tasks.math_equal("5.", "5") and tasks.math_equal("\\text{Monday}.", "\\text{Monday}")
    assert not tasks.math_equal("5.1", "5")


def test_math_format_needs_a_closed_answer_tag():                      # a cut-off completion earns no format
    fmt = fns("math")["format"]
    assert fmt("<answer>\\boxed{5}", {}) == 0.0
    assert fmt("<answer>\\boxed{5}</answer>", {}) == 0.75 and fmt("<answer>5</answer>", {}) == 0.5


def test_math_training_reward_reads_only_the_box():                   # data.md 3.2
    """The reference's correctness reward reads the last box, else the whole text: an answer tag without a box
    earns no correctness (eval, by our deviation, reads the tag); a bare answer is the whole text and passes."""
    task, ex = tasks.get_task("math"), {"problem": "p", "answer": "5"}
    tagged = "<reasoning>\nx\n</reasoning>\n<answer>\n5\n</answer>"
    assert fns("math")["correctness"](tagged, ex) == 0.0 and task.reward(tagged, ex) == 0.5
    assert task.score(tagged, ex) == 1.0
    boxed = "<reasoning>\nx\n</reasoning>\n<answer>\n\\boxed{5}\n</answer>"
    assert task.reward(boxed, ex) == 2.75 and task.score(boxed, ex) == 1.0
    assert fns("math")["correctness"](" 5 ", ex) == 2.0
    assert fns("math")["correctness"]("\\boxed{5} then \\boxed{6", ex) == 0.0      # an unbalanced last box: whole text


def test_countdown_division_by_zero_is_no_expression():              # README deviation 8 (reference: 0.1)
    reward = tasks.get_task("countdown").reward
    ex = {"nums": [30, 93, 100], "target": 23}
    assert reward("<answer>30/0+93-100</answer>", ex) == 0.0 and reward("<answer>30/1+93-100</answer>", ex) == 0.1


def test_countdown_reads_latex_division_and_string_numbers():          # data.md 4.2, pitfall 11
    ex = {"nums": [8, 4, 2], "target": 4}
    assert tasks.get_task("countdown").score("\\boxed{8 \\div 4 \\times 2}", ex) == 1.0
    row = tasks._countdown_row({"nums": ["30", "100", "93"], "target": "23"})
    assert row == {"nums": [30, 100, 93], "target": 23}
    assert tasks.get_task("countdown").score("\\boxed{30+93-100}", row) == 1.0


def test_xmlcount_counts_the_spec_s_tags_and_stays_in_its_range():    # data.md 3.1
    xmlcount = fns("gsm8k")["xmlcount"]
    assert xmlcount("<answer>\n42\n</answer>", {}) == 0.125                 # "\n<answer>\n" needs its newline
    assert xmlcount("<reasoning>\nr\n</reasoning><answer>\n42\n</answer>", {}) == 0.25
    assert xmlcount(paper("42") + "x" * 1000, {}) == 0.0                      # junk never makes it negative


def test_strict_format_takes_the_final_newline_as_optional():          # B01
    assert tasks.strict_format("<reasoning>\na\n</reasoning>\n<answer>\n1\n</answer>", {}) == 0.5
    assert tasks.strict_format("<reasoning>\na\n</reasoning>\n<answer>\n1\n</answer>\n\n", {}) == 0.0


@pytest.mark.parametrize("name, ex", [("math", {"problem": "p", "answer": "1"}),
                                      ("countdown", {"nums": [1, 2, 3], "target": 6})])
def test_aggregate_of_the_other_tasks_is_the_mean_score(name, ex):
    assert tasks.aggregate(name, [1.0, 0.0], [ex, ex]) == {"accuracy": 50.0, "n": 2}


def test_eval_files_tolerate_blank_lines_and_refuse_binary(tmp_path):
    jsonl = tmp_path / "gsm8k.jsonl"
    jsonl.write_text(json.dumps({"question": "q", "answer": "#### 7"}) + "\n\n\n")
    assert tasks.load_eval("gsm8k", eval_file=str(jsonl)) == [{"question": "q", "answer": "7", "solution": "#### 7"}]
    binary = tmp_path / "gsm8k.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(tasks.UsageError, match="is not a gsm8k file"):
        tasks.load_eval("gsm8k", eval_file=str(binary))


def test_a_math_answer_that_is_a_json_number_is_kept(tmp_path):
    path = tmp_path / "math.jsonl"
    path.write_text("".join(json.dumps({"problem": f"p{a}", "answer": a}) + "\n" for a in (2, 0, 1.5)))
    assert [ex["answer"] for ex in tasks.load_eval("math", eval_file=str(path))] == ["2", "0", "1.5"]


def test_n_as_large_as_the_set_keeps_file_order(tmp_path):
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"#### {i}"}) + "\n" for i in range(5)))
    assert [ex["answer"] for ex in tasks.load_eval("gsm8k", eval_file=str(path), n=5)] == ["0", "1", "2", "3", "4"]


def test_an_empty_gsm8k_gold_gives_no_correctness_and_says_so():      # B03 (2): no reward on an unparsable gold
    with pytest.warns(UserWarning, match="gold"):
        assert fns("gsm8k")["correctness"]("<answer>72</answer>", {"question": "q", "answer": ""}) == 0.0


# ---- the sixth mutation audit's survivors: each test below fails under the bug its comment names

def test_generated_countdown_problems_reach_100():                                    # T11, T13
    rows = tasks._countdown_generate(2000, 0)
    assert any(r["target"] == 100 for r in rows) and any(100 in r["nums"] for r in rows)


def test_the_training_order_depends_on_the_seed():                                    # T16
    a, b = tasks.load_train("gsm8k", seed=0), tasks.load_train("gsm8k", seed=1)
    assert a != b and sorted(map(str, a)) == sorted(map(str, b))


def test_paper_gsm8k_target_keeps_the_worked_solution_without_calculator_tags():     # T23, T24
    ex = tasks._gsm8k_row({"question": "q", "answer": "She has 2+3=<<2+3=5>>5 apples.\n#### 5"})
    assert tasks.target_completion("gsm8k", ex, style="paper") == \
        "<reasoning>\nShe has 2+3=5 apples.\n</reasoning>\n<answer>\n5\n</answer>\n"


def test_a_few_shot_puzzle_is_never_generated():                                      # T5
    few = tasks.SUDOKU_FEWSHOT_PUZZLES[0]
    clues = [i for i, d in enumerate(few) if d != "0"]
    gid, = [k for k, g in enumerate(tasks.SUDOKU_GRIDS) if all(p in ("0", d) for p, d in zip(few, g))]

    class Rigged(random.Random):                             # draws the few-shot puzzle's cells first
        first = True

        def sample(self, population, k):
            if self.first:
                self.first = False
                return list(clues)
            return super().sample(population, k)

        def choices(self, population, weights=None, **kw):
            return [len(clues)]
    rows = tasks._sudoku_generate([gid], [1], Rigged(0))
    assert len(rows) == 1 and rows[0]["puzzle"] != few and tasks.sudoku_completions(rows[0]["puzzle"]) == 1
