"""Every configuration error is refused before any model or data is loaded, with a message naming the setting.

Run: python -m pytest -q tests/test_config.py
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import spg_min as S
import tasks as T

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def no_loading(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a model or data set was loaded before the configuration was checked")
    monkeypatch.setattr(S, "load_model", forbidden)
    import tasks
    monkeypatch.setattr(tasks, "load_train", forbidden)
    monkeypatch.setattr(tasks, "load_eval", forbidden)


@pytest.mark.parametrize("overrides, named", [
    (dict(gen_length=60, block_length=16), "block_length"),              # B21
    (dict(gen_length=64, block_length=16, steps=10), "steps"),
    (dict(group_size=1), "group_size"),                                  # B15
    (dict(beta=0.0), "beta"),
    (dict(omega=1.5), "omega"),
    (dict(estimator="ppo"), "estimator"),
    (dict(masking="bernoulli"), "masking"),
    (dict(p_mask_prompt=1.0), "p_mask_prompt"),
    (dict(block_length=0), "block_length"),                               # was a ZeroDivisionError
    (dict(num_prompts=0), "num_prompts"),
    (dict(eval_batch=0), "eval_batch"),
    (dict(lr=-1.0), "lr=-1.0"),
    (dict(grad_clip=0.0), "grad_clip"),
    (dict(temperature=-1.0), "temperature"),
    (dict(estimator="d1"), "num_mc=1 and masking=d1"),                    # d1 scores one fully masked copy
    (dict(estimator="d1", num_mc=1, masking="block"), "masking=d1"),
    (dict(estimator="d1", num_mc=1, masking="d1", d1_epsilon=1.5), "d1_epsilon"),
    (dict(max_steps=0), "max_steps"),
    (dict(eval_n=-3), "eval_n"),
    (dict(eval_every=-1), "eval_every"),
    (dict(adam_eps=0.0), "adam_eps"),
    (dict(eval_file="no/such/file.csv"), "eval_file"),
    (dict(eval_file="."), "eval_file"),                                  # a directory is not a file
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(micro_batch=0), "micro_batch"),
    (dict(estimator="d1", num_mc=1, masking="d1", d1_epsilon=0.0), "d1_epsilon"),
    (dict(estimator="d1", num_mc=1, masking="d1", d1_beta_kl=-0.1), "d1_beta_kl"),
])
def test_bad_setting_is_refused_first(tmp_path, no_loading, overrides, named):
    cfg = S.Config(task="sudoku", model="tiny", out=str(tmp_path), **overrides)
    with pytest.raises(ValueError, match=named):
        S.train(cfg)


@pytest.mark.parametrize("overrides", [dict(lora_rank=0), dict(lora_rank=-4), dict(lora_alpha=0)])
def test_a_lora_that_cannot_train_is_refused_first(tmp_path, no_loading, overrides):
    """r 0 stopped inside peft after the 8B model had loaded; alpha 0 scales LoRA by alpha/r = 0: no gradient."""
    cfg = S.Config(task="gsm8k", model="GSAI-ML/LLaDA-8B-Instruct", out=str(tmp_path), **overrides)
    with pytest.raises(ValueError, match="must be >= 1 and lora_alpha"):
        S.train(cfg)


def test_the_ends_of_documented_ranges_are_accepted():
    """omega 0 and 1 (Eq. 8: ELBO alone, EUBO alone), temperature 0 (greedy), p_mask_prompt 0, weight decay 0."""
    for overrides in (dict(omega=0.0), dict(omega=1.0), dict(temperature=0.0), dict(p_mask_prompt=0.0),
                      dict(weight_decay=0.0), dict(model="some/llada", lora_rank=1, lora_alpha=1)):
        S.validate(S.Config(**overrides))


def test_a_renyi_order_below_one_is_run_with_a_warning(recwarn):
    """Table 12 runs beta 0.5 and 0.75 (the "implicit mixture"): accepted, with a warning that Lemma 1's upper
    bound needs beta >= 1; beta 1 and above, or a loss without the EUBO, give no warning; beta <= 0 is refused."""
    for beta in (0.5, 0.75):
        with pytest.warns(UserWarning, match=f"beta={beta} < 1.*Lemma 1.*Table 12"):
            S.validate(S.Config(beta=beta))
    recwarn.clear()
    S.validate(S.Config(beta=1.0))
    S.validate(S.Config(beta=2.0))
    S.validate(S.Config(beta=0.5, estimator="elbo"))                   # no EUBO in the loss: nothing to warn of
    S.validate(S.Config(beta=0.5, omega=0.0))
    assert not [w for w in recwarn if "beta" in str(w.message)]
    with pytest.raises(ValueError, match="beta=-1.0 must be > 0"):
        S.validate(S.Config(beta=-1.0))


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere; permission bits do not bind it")
def test_unwritable_output_directory(tmp_path, no_loading):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    with pytest.raises(ValueError, match="out"):
        S.train(S.Config(task="sudoku", model="tiny", out=str(locked / "run")))


def test_output_path_that_is_a_file(tmp_path, no_loading):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(ValueError, match="out"):
        S.train(S.Config(task="sudoku", model="tiny", out=str(target)))
    (tmp_path / "link").symlink_to(tmp_path / "missing")                 # a broken link, refused before loading
    for out in (tmp_path / "link", tmp_path / "link" / "run", target / "run"):
        with pytest.raises(T.UsageError, match="is a file or a broken link"):
            S.train(S.Config(task="sudoku", model="tiny", out=str(out)))


def test_mask_id_used_for_text_is_refused(monkeypatch, no_loading, tmp_path):
    import model as M
    real = M.special_ids
    monkeypatch.setattr(M, "special_ids", lambda tok: {**real(tok), "mask": tok.convert_tokens_to_ids("a")})
    with pytest.raises(ValueError, match="mask id"):
        S.train(S.Config(task="sudoku", model="tiny", out=str(tmp_path)))


def test_unknown_flag_is_an_error():
    with pytest.raises(SystemExit):
        S.parse_config(["--task", "sudoku", "--no-such-flag", "1"])


def test_presets_and_flag_precedence():
    cfg = S.parse_config(["--task", "sudoku", "--model", "tiny", "--lr", "0.5"])
    assert cfg.lr == 0.5 and cfg.beta == 1.0 and cfg.gen_length == S.TINY_PRESET["gen_length"]
    assert cfg.max_prompt_length == 64                                      # preset > task
    assert (cfg.load_in_4bit, cfg.lora_rank) == (False, 0)                  # summary.json records what ran
    assert S.parse_config(["--task", "sudoku"]).max_prompt_length == 1500   # the 3-shot prompt fits
    assert S.parse_config(["--task", "sudoku"]).micro_batch == 1            # ... in 24 GB (bench/memory.py)
    assert S.parse_config(["--task", "sudoku", "--micro-batch", "3"]).micro_batch == 3
    assert S.parse_config(["--task", "sudoku", "--model", "tiny"]).micro_batch == 96     # preset > task
    assert S.parse_config(["--task", "gsm8k"]).micro_batch == 2
    cfg = S.parse_config(["--task", "gsm8k"])
    assert cfg.max_prompt_length == 512 and cfg.gen_length == 256 and cfg.block_length == 32 and cfg.steps == 128 and cfg.beta == 1.5
    assert S.parse_config(["--task", "countdown", "--estimator", "eubo"]).beta == 2.0   # App. G.2's exception
    assert S.parse_config(["--task", "countdown"]).beta == 1.5                          # mix
    assert S.parse_config(["--task", "countdown", "--estimator", "eubo", "--beta", "1"]).beta == 1.0
    cfg = S.parse_config(["--task", "sudoku", "--model", "tiny", "--estimator", "d1"])
    assert (cfg.num_mc, cfg.masking) == (1, "d1")                           # ESTIMATOR_DEFAULTS
    with pytest.raises(ValueError, match="num_mc=1"):
        S.validate(S.Config(**{**S.ESTIMATOR_DEFAULTS["d1"], "estimator": "d1", "num_mc": 2}))


@pytest.mark.parametrize("argv, message", [
    (["--task", "sudok"], "task='sudok': choose from gsm8k, math, countdown, sudoku"),
    (["--task", "sudoku", "--estimator", "mixx"], "estimator='mixx': choose from"),
    (["--estimator", "d1", "--num-mc", "2"], "needs num_mc=1"),
    (["--task", "sudoku", "--est", "mix"], "unrecognized arguments: --est mix"),   # no prefix matching
    (["--task", "sudoku", "--model", "tiny", "--block-length", "3", "--steps", "8"],   # 8 blocks; eval's 12 steps
     "gen_length / 2 = 12 steps, which must be a positive multiple of the number of blocks (8)"),
    (["--task", "sudoku", "--model", "tiny", "--lora-rank", "8"], "--lora-rank and --lora-alpha apply to LLaDA"),
    (["--task", "sudoku", "--model", "tiny", "--lora-alpha", "16"], "--lora-rank and --lora-alpha apply to LLaDA"),
    (["--task", "sudoku", "--model", "tiny", "--load-in-4bit", "true"], "the tiny model trains every weight"),
])
def test_the_cli_refuses_bad_values_with_a_usage_error_naming_the_fix(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        S.parse_config(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_prompts_over_the_limit_are_refused_whole_never_truncated():
    import model as M
    tok = M.tiny_tokenizer()
    examples = [{"id": 0}, {"id": 1}, {"id": 2}]
    contents = ["short", "a much longer prompt " * 5, "mid length"]
    limit = len(tok(S.prompt_texts(tok, ["mid length"]), add_special_tokens=False)["input_ids"][0])
    kept = S.within_prompt_limit(tok, examples, contents, limit)
    assert [ex["id"] for ex in kept] == [0, 2]
    with pytest.raises(ValueError, match="max_prompt_length"):
        S.within_prompt_limit(tok, examples, contents, 3)


def test_resume_from_a_missing_checkpoint_is_refused(tmp_path, no_loading):
    with pytest.raises(ValueError, match="resume"):
        S.train(S.Config(task="sudoku", model="tiny", out=str(tmp_path), resume=str(tmp_path / "ckpt_000007")))


def test_fresh_start_into_an_existing_run_is_refused(tmp_path, no_loading):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ValueError, match="resume"):
        S.train(S.Config(task="sudoku", model="tiny", out=str(tmp_path), resume="none"))
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'          # nothing lost
    (tmp_path / "metrics.jsonl").unlink()
    (tmp_path / "ckpt_000001").mkdir()                                           # checkpoints alone are a run too
    with pytest.raises(ValueError, match="already holds a run"):
        S.train(S.Config(task="sudoku", model="tiny", out=str(tmp_path), resume="none"))


def test_a_refused_run_leaves_no_output_directory(tmp_path):
    out = tmp_path / "new" / "run"
    gsm8k = T.DATA_DIR_DEFAULT / "gsm8k" / "test.jsonl"                        # not a Sudoku CSV
    with pytest.raises(T.UsageError, match="is not a sudoku file"):
        S.train(S.Config(task="sudoku", model="tiny", out=str(out), eval_file=str(gsm8k)))
    assert not (tmp_path / "new").exists()


def test_the_script_prints_a_refused_run_as_one_line_with_exit_2(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    proc = subprocess.run([sys.executable, str(ROOT / "spg_min.py"), "--task", "sudoku", "--model", "tiny",
                           "--out", str(tmp_path), "--resume", "none"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (f"spg_min.py: error: out={tmp_path} already holds a run: pass a "
                                                    "new --out, or --resume auto to continue it")


def test_help_gives_each_flag_its_config_comment_and_the_two_runs(capsys):
    with pytest.raises(SystemExit) as exit_:
        S.parse_config(["--help"])
    text = " ".join(capsys.readouterr().out.split())                        # argparse wraps lines
    assert exit_.value.code == 0
    assert "--temperature TEMPERATURE rollout temperature (Sudoku 0.3) [default 0.9]" in text
    assert "--lr LR AdamW learning rate [default 3e-06]" in text
    assert "python spg_min.py --task sudoku --model tiny --out runs/demo" in text


def test_bool_flags_read_the_usual_spellings():
    for text, value in [("1", True), ("true", True), ("Yes", True), ("0", False), ("false", False), ("no", False)]:
        assert S.parse_config(["--load-in-4bit", text]).load_in_4bit is value, text


def test_bool_flags_refuse_typos():
    assert S.parse_config(["--load-in-4bit", "false"]).load_in_4bit is False
    assert S.parse_config(["--load-in-4bit", "YES"]).load_in_4bit is True
    with pytest.raises(SystemExit):
        S.parse_config(["--load-in-4bit", "ture"])


def test_the_readme_s_paper_table_points_at_each_definition():
    """Each `name` ([N](spg_min.py#LN)) of the README's "Paper to code" table is spg_min's `def name` or `NAME =`
    at line N: the links go stale with any edit above them, and this names the row to fix."""
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Paper to code"):readme.index("## Defaults and where they come from")]
    links = re.findall(r"`(\w+)` \(\[(\d+)\]\(spg_min\.py#L(\d+)\)\)", table)
    source = (ROOT / "spg_min.py").read_text().splitlines()
    assert len(links) >= 15                                          # every row's function, not a few
    for name, shown, target in links:
        assert shown == target, name
        line = source[int(target) - 1]
        assert line.startswith((f"def {name}(", f"{name} = ")), f"README: {name} is not at spg_min.py:{target}"
