"""eval.py: the paper's evaluation protocol on the tiny model, with a checkpoint as the adapter.

Run: python -m pytest -q tests/test_eval.py
"""
import json
import subprocess
import sys
from pathlib import Path

import torch

import model as M
import tasks

ROOT = Path(__file__).resolve().parents[1]


def test_eval_writes_generations_and_table(tmp_path):
    tok = M.tiny_tokenizer()
    net = M.tiny_model(len(tok), seed=3)
    (tmp_path / "ckpt").mkdir()
    torch.save({"model": dict(net.named_parameters())}, tmp_path / "ckpt" / "state.pt")
    cmd = [sys.executable, str(ROOT / "eval.py"), "--task", "sudoku", "--model", "tiny", "--adapter",
           str(tmp_path / "ckpt"), "--gen-lengths", "24", "16", "--block-length", "8", "--n", "6",
           "--out", str(tmp_path / "ev")]
    subprocess.run(cmd, check=True, cwd=ROOT, timeout=300, capture_output=True)
    for length in (24, 16):
        text = (tmp_path / "ev" / f"generations_sudoku_{length}.jsonl").read_text()
        rows = [json.loads(line) for line in text.splitlines()]
        assert len(rows) == 6 and all({"completion", "score", "answer", "example"} <= set(r) for r in rows)
        assert all(0.0 <= r["score"] <= 1.0 for r in rows)
        task = tasks.get_task("sudoku")   # the logged answer is what the score read; the problems are training's
        assert all(r["answer"] == task.answer(r["completion"]) for r in rows)
        assert [r["example"] for r in rows] == tasks.load_eval("sudoku", n=6, seed=42)
    table = (tmp_path / "ev" / "results_sudoku.md").read_text().splitlines()
    assert table[0].startswith("| length | accuracy") and len(table) == 4


def test_bad_input_is_a_usage_error_before_the_model_loads(tmp_path):
    """Every generation length, the --eval-file and the --adapter are checked before anything runs: exit 2 with
    the problem named, no traceback, no output folder."""
    base = [sys.executable, str(ROOT / "eval.py"), "--task", "sudoku", "--model", "tiny", "--block-length", "8",
            "--out", str(tmp_path / "ev")]
    for extra, named in [(["--gen-lengths", "16", "12"], "gen_length=12 must be a multiple of block_length=8"),
                         (["--eval-file", str(tmp_path / "absent.csv")], "is not a file"),
                         (["--adapter", str(tmp_path)], "holds no state.pt"),
                         (["--n", "0"], "--n 0: pass a number")]:
        run = subprocess.run(base + extra, cwd=ROOT, timeout=120, capture_output=True, text=True)
        assert run.returncode == 2 and named in run.stderr and "Traceback" not in run.stderr, run.stderr
        assert not (tmp_path / "ev").exists()
