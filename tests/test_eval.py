"""eval.py: the paper's evaluation protocol on the tiny model, with a checkpoint as the adapter.

Run: python -m pytest -q tests/test_eval.py
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
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
        assert [r["score"] for r in rows] == [task.score(r["completion"], r["example"]) for r in rows]
        if length == 24:                  # the adapter was loaded: the seed-3 model's own greedy completions
            import spg_min as S
            cfg = S.Config(task="sudoku", gen_length=24, block_length=8, eval_batch=8)
            ids = M.special_ids(tok)
            _, own = S.evaluate(net.eval(), tok, task, [r["example"] for r in rows], cfg, style="tiny",
                                mask_id=ids["mask"], stop_ids=(ids["eos"], ids["eot"]))
            assert [r["completion"] for r in rows] == [r["completion"] for r in own]
    table = (tmp_path / "ev" / "results_sudoku.md").read_text().splitlines()
    assert table[0].startswith("| length | accuracy") and len(table) == 4


def test_bad_input_is_a_usage_error_before_the_model_loads(tmp_path, capsys):
    """Every generation length, the --eval-file and the --adapter are checked before anything runs: exit 2 with
    the problem named, no traceback, no output folder (the script once, the other cases through main in-process)."""
    import eval as E
    base = ["--task", "sudoku", "--model", "tiny", "--block-length", "8", "--out", str(tmp_path / "ev")]
    run = subprocess.run([sys.executable, str(ROOT / "eval.py"), *base, "--gen-lengths", "16", "12"], cwd=ROOT,
                         timeout=120, capture_output=True, text=True)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert "--gen-lengths 12 with --block-length 8: each length must" in run.stderr
    for extra, named in [(["--gen-lengths", "8", "--block-length", "1"], "--gen-lengths 8 with --block-length 1"),
                         (["--batch", "0"], "--batch 0: decode at least 1"),
                         (["--eval-file", str(tmp_path / "absent.csv")], "is not a file"),
                         (["--adapter", str(tmp_path)], "holds no state.pt"),
                         (["--n", "0"], "--n 0: pass a number")]:
        with pytest.raises(SystemExit) as exit_:
            E.main(base + extra)
        assert exit_.value.code == 2 and named in capsys.readouterr().err, extra
        assert not (tmp_path / "ev").exists()


def test_eval_scores_and_tabulates_known_answers(tmp_path, monkeypatch):
    """eval.py end to end with decoding replaced by known completions: the even-numbered puzzles get their solution,
    the others the puzzle itself (every empty cell wrong). Each logged score is task.score of its completion, and
    the table holds the accuracy computed by hand: the solved puzzles' empty cells over all empty cells (the
    paper's cell accuracy), and half the puzzles solved."""
    import eval as E
    import spg_min as S
    tok = M.tiny_tokenizer()
    ids = M.special_ids(tok)
    examples = tasks.load_eval("sudoku", n=6, seed=42)
    answer = {ex["puzzle"]: ex["solution"] if i % 2 == 0 else ex["puzzle"] for i, ex in enumerate(examples)}

    def known_completions(model, prompt_ids, attention_mask, *, gen_length, **kw):
        rows = []
        for prompt in prompt_ids:
            puzzle = re.findall(r"[0-4]{16}", tok.decode(prompt, skip_special_tokens=True))[-1]
            text = tok(f"<answer>\n{answer[puzzle]}\n</answer>", add_special_tokens=False)["input_ids"]
            rows.append(text + [ids["eos"]] * (gen_length - len(text)))
        return torch.cat([prompt_ids, torch.tensor(rows)], 1)

    monkeypatch.setattr(S, "generate", known_completions)
    monkeypatch.setattr(sys, "argv", ["eval.py", "--task", "sudoku", "--model", "tiny", "--gen-lengths", "24",
                                      "--block-length", "8", "--n", "6", "--out", str(tmp_path)])
    E.main()
    rows = [json.loads(line) for line in (tmp_path / "generations_sudoku_24.jsonl").read_text().splitlines()]
    assert [r["example"] for r in rows] == examples
    assert [r["score"] for r in rows] == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert [r["answer"] for r in rows] == [answer[ex["puzzle"]] for ex in examples]
    empty = [ex["puzzle"].count("0") for ex in examples]
    accuracy = 100 * sum(empty[0::2]) / sum(empty)
    table = (tmp_path / "results_sudoku.md").read_text().splitlines()
    assert table[2] == f"| 24 | {accuracy:.2f} | 50.00 | 6 |", table


def test_evaluate_decodes_the_paper_s_way(monkeypatch):
    """Greedy, steps = Lg / 2; LLaDA's prompts end with the <reasoning> prefill, the tiny model's do not."""
    import spg_min as S
    tok = M.tiny_tokenizer()
    net, ids = M.tiny_model(len(tok), seed=0), M.special_ids(tok)
    seen, real = [], S.generate
    monkeypatch.setattr(S, "generate", lambda model, prompt_ids, attn, **kw: (seen.append((prompt_ids, kw)),
                                                                             real(model, prompt_ids, attn, **kw))[1])
    examples = tasks.load_eval("sudoku", n=2, seed=42)
    cfg = S.Config(task="sudoku", gen_length=24, block_length=8, eval_batch=8)
    for style in ("tiny", "paper"):
        S.evaluate(net, tok, tasks.get_task("sudoku"), examples, cfg, style=style, mask_id=ids["mask"],
                   stop_ids=(ids["eos"], ids["eot"]))
    (tiny_prompts, tiny_kw), (paper_prompts, paper_kw) = seen
    assert (tiny_kw["steps"], tiny_kw["temperature"]) == (paper_kw["steps"], paper_kw["temperature"]) == (12, 0.0)
    assert not tok.decode(tiny_prompts[0]).endswith(tasks.EVAL_PREFILL)
    assert tok.decode(paper_prompts[0]).endswith(tasks.EVAL_PREFILL)


def run_eval(tmp_path, monkeypatch, *flags):
    """eval.py's main in this process on the tiny model, decoding replaced by the prompt's own puzzle as answer."""
    import eval as E
    import spg_min as S
    monkeypatch.setattr(S, "generate", lambda model, prompt_ids, attn, *, gen_length, **kw: torch.cat(
        [prompt_ids, prompt_ids.new_full((len(prompt_ids), gen_length), M.special_ids(M.tiny_tokenizer())["eos"])], 1))
    monkeypatch.setattr(sys, "argv", ["eval.py", "--task", "sudoku", "--model", "tiny", "--gen-lengths", "24",
                                      "--block-length", "8", "--out", str(tmp_path / "ev"), *flags])
    E.main()
    return [json.loads(line) for line in (tmp_path / "ev" / "generations_sudoku_24.jsonl").read_text().splitlines()]


def test_eval_seed_draws_the_n_sample(tmp_path, monkeypatch):
    rows = run_eval(tmp_path, monkeypatch, "--n", "6", "--seed", "1")
    assert [r["example"] for r in rows] == tasks.load_eval("sudoku", n=6, seed=1)
    assert tasks.load_eval("sudoku", n=6, seed=1) != tasks.load_eval("sudoku", n=6)      # --seed mattered


def test_an_adapter_is_loaded_at_its_own_rank_and_alpha_and_must_fit(tmp_path, monkeypatch):
    """A LoRA adapter is rebuilt with the r and alpha its run trained with; one with a weight the model lacks, or
    lacking one of its LoRA weights, is refused as not fitting."""
    import eval as E
    tok = M.tiny_tokenizer()
    monkeypatch.setattr(M, "load_llada", lambda *a, **kw: M.tiny_model(len(tok), seed=0))
    built = []
    add_lora = M.add_lora
    monkeypatch.setattr(M, "add_lora", lambda net, **kw: (built.append(kw), add_lora(net, **kw))[1])
    adapter = {n: p.detach() for n, p in add_lora(M.tiny_model(len(tok)), r=8, alpha=16).named_parameters()
               if "lora_" in n}
    (tmp_path / "ck").mkdir()
    for state, fits in ((adapter, True), ({**adapter, "x.lora_A.weight": torch.zeros(1)}, False),
                        (dict(list(adapter.items())[1:]), False)):
        torch.save({"model": state, "config": {"lora_rank": 8, "lora_alpha": 16}}, tmp_path / "ck" / "state.pt")
        if fits:
            net = E.load_for_eval("some/llada", str(tmp_path / "ck"), len(tok))
            assert built[-1]["r"] == 8 and built[-1]["alpha"] == 16 and not net.training
        else:
            with pytest.raises(tasks.UsageError, match="does not fit this model"):
                E.load_for_eval("some/llada", str(tmp_path / "ck"), len(tok))


def test_a_block_length_of_zero_is_a_usage_error(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--task", "sudoku", "--model", "tiny",
                          "--gen-lengths", "24", "--block-length", "0", "--out", str(tmp_path / "ev")],
                         cwd=ROOT, timeout=120, capture_output=True, text=True)
    assert run.returncode == 2 and "--block-length 0" in run.stderr and "Traceback" not in run.stderr
