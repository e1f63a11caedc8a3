"""scale/train.py on 2 CPU ranks (gloo): smoke runs, rank-count invariance (B31), exact resume, NaN skip (B32).

Run: python -m pytest -q tests/test_scale.py   (CPU, about 3 min on 2 cores; 16 torchrun launches)
Each test starts `torchrun --standalone` in a subprocess with a timeout, so a rank that hangs fails the test.
The untrained tiny model never earns a Sudoku reward in 8 tokens, so the numeric tests start the script through
a small shim (written to tmp_path) that swaps in a reward that differs between completions (non-zero advantages),
and, for the NaN test, makes one rank's loss NaN. scale/train.py itself carries no test hooks.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import psutil
import pytest
import torch

import model as M
import spg_min as S
import tasks as T

REPO = Path(__file__).resolve().parents[1]
TINY = ["--task", "sudoku", "--model", "tiny", "--num-prompts", "2", "--group-size", "3", "--gen-length", "8",
        "--block-length", "4", "--steps", "2", "--warm-start-steps", "0", "--eval-n", "8", "--mu", "1"]
SHIM = f"""
import dataclasses, os, runpy, sys, zlib
import torch
sys.path.insert(0, {str(REPO)!r})
import spg_min as S, tasks as T
varied = lambda text, ex: (zlib.crc32(text.encode()) % 101) / 100      # stand-in reward, differs by completion
T.TASKS["sudoku"] = dataclasses.replace(T.TASKS["sudoku"], reward_funcs=(("varied", varied, 1.0),))
if os.environ.get("EVAL_BY_PUZZLE"):                                   # eval credit known per puzzle
    T.TASKS["sudoku"] = dataclasses.replace(T.TASKS["sudoku"], score_fn=lambda text, ex: (zlib.crc32(
        ex["puzzle"].encode()) % 101) / 100)
if os.environ.get("ONE_ACTIVE"):                     # only global prompt ONE_ACTIVE of step 0 varies
    load_train_set, loaded = S.load_train_set, {{}}
    def remember(cfg, tok, style):
        loaded["set"] = load_train_set(cfg, tok, style)
        return loaded["set"]
    S.load_train_set = remember
    def one_active(text, ex):
        j = int(os.environ["ONE_ACTIVE"])
        chosen = int(torch.randperm(len(loaded["set"]), generator=S.make_generator(1, 0, 0))[j])   # seed 1, step 0
        return varied(text, ex) if ex is loaded["set"][chosen] else 0.5
    T.TASKS["sudoku"] = dataclasses.replace(T.TASKS["sudoku"], reward_funcs=(("one", one_active, 1.0),))
if os.environ.get("LEARNABLE"):                                        # the fraction of "1"s, on a small model
    import model as M
    ones = lambda text, ex: text.count("1") / max(len(text), 1)
    T.TASKS["sudoku"] = dataclasses.replace(T.TASKS["sudoku"], reward_funcs=(("ones", ones, 1.0),))
    S.load_model = lambda cfg, vocab: M.tiny_model(vocab, hidden_size=32, num_layers=2, seed=1)
if os.environ.get("REPEAT"):                     # every completion one repeated token; rank 1 decodes slowly
    import time
    S.generate = lambda model, prompt_ids, attn, *, gen_length, **kw: (
        time.sleep(0.3 * int(os.environ["RANK"])),
        torch.cat([prompt_ids, prompt_ids.new_full((len(prompt_ids), gen_length), 10)], 1))[1]
if os.environ.get("CHUNK_BYTES"):                                      # the loss pass's logits in small chunks
    S.LOGP_CHUNK_BYTES = int(os.environ["CHUNK_BYTES"])
if os.environ.get("NAN_AT"):                                           # "rank:n": that rank's n-th loss is NaN
    rank, n = map(int, os.environ["NAN_AT"].split(":"))
    calls, spg_loss = [0], S.spg_loss
    def nan_loss(*a, **kw):
        loss, stats = spg_loss(*a, **kw)
        calls[0] += 1
        hit = (int(os.environ["RANK"]), calls[0]) == (rank, n)
        return (loss + torch.tensor(float("nan")) if hit else loss), stats   # the value only: gradients stay finite
    S.spg_loss = nan_loss
runpy.run_path({str(REPO / "scale" / "train.py")!r}, run_name="__main__")
"""


def torchrun(tmp_path, nproc, *args, script=None, env=None, timeout=120):
    """Run scale/train.py (or the shim) on nproc CPU ranks; fail on a non-zero exit or a hang."""
    if script is None:
        script = REPO / "scale" / "train.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), str(script),
           *TINY, "--cache-dir", str(tmp_path / "cache"), *args]
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen(cmd, cwd=REPO, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:      # torchrun starts each rank in its own session: end them by pid
        launcher = psutil.Process(proc.pid)
        for p in [*launcher.children(recursive=True), launcher]:
            p.kill()
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun hung for {timeout} s:\n{stdout[-3000:]}{stderr[-3000:]}")
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return stdout


FIXTURE = REPO.parent / "shared" / "fixtures" / "llada_tiny"       # LLaDA's file format at toy size


@pytest.fixture
def shim(tmp_path):
    path = tmp_path / "shim.py"
    path.write_text(SHIM)
    return path


def weights(out, step):
    state = torch.load(Path(out) / f"ckpt_{step:06d}" / "state.pt", weights_only=False)
    return state["model"], state


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("shard", ["fsdp", "ddp"])
def test_two_ranks_finish(tmp_path, shard):
    """The issue's command with tiny settings runs 3 steps, checkpoints step 3 and evaluates before and after."""
    out = tmp_path / "run"
    torchrun(tmp_path, 2, "--max-steps", "3", "--shard", shard, "--out", str(out))
    assert [row["step"] for row in metrics(out)] == [1, 2, 3]
    for row in metrics(out):   # spg_min's health and speed metrics, over both ranks: 2 x 3 completions of 8 tokens
        assert 0.0 <= row["health/repeated_frac"] <= 1.0 and row["nonfinite_steps"] == 0
        assert row["tokens_per_s"] * row["time/rollout_s"] == pytest.approx(2 * 3 * 8, rel=1e-9)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["shard"] == shard and summary["eval_after"]["n"] == 8
    assert (out / "ckpt_000003" / "state.pt").exists()


def test_a_collapse_on_both_ranks_is_counted_once(tmp_path, shim):       # B09 over ranks
    """Every completion on both ranks is one repeated token: health/repeated_frac is 1 (not 2) and the warning
    is printed once, by rank 0. Rank 1 decodes 0.3 s slower: time/rollout_s is its time, and tokens_per_s both
    ranks' 2 x 3 x 8 tokens over it."""
    out = tmp_path / "run"
    stdout = torchrun(tmp_path, 2, "--max-steps", "1", "--out", str(out), script=shim, env={"REPEAT": "1"})
    row = metrics(out)[0]
    assert row["health/repeated_frac"] == 1.0
    assert stdout.count("the collapse of field case B09") == 1
    assert row["time/rollout_s"] >= 0.3 and row["tokens_per_s"] * row["time/rollout_s"] == pytest.approx(48, rel=1e-9)


def test_groups_never_straddle_ranks():                                  # B15
    import importlib.util
    spec = importlib.util.spec_from_file_location("scale_train", REPO / "scale" / "train.py")
    scale_train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale_train)
    assert scale_train.groups_per_rank(16, 8) == 2 and scale_train.groups_per_rank(7, 7) == 1
    with pytest.raises(SystemExit, match=r"--num-prompts 8 must be a multiple of the number of ranks \(7\).*--num-prompts 14"):
        scale_train.groups_per_rank(8, 7)


def test_fsdp_with_4bit_base_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "scale" / "train.py"), "--model", "some/llada", "--shard", "fsdp",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "cannot shard a 4-bit" in proc.stderr


def test_resume_with_a_value_is_refused(tmp_path):
    """scale/train.py's --resume is a switch; spg_min's `--resume none` must not leave `none` to a confusing error."""
    proc = subprocess.run([sys.executable, str(REPO / "scale" / "train.py"), "--resume", "none", "--model", "tiny",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--resume takes no value (got 'none')" in proc.stderr


def test_a_checkpoint_of_spg_min_is_refused_with_the_script_that_continues_it(tmp_path):
    """spg_min's optimizer state is keyed by position: loading it here would stop on a KeyError ('state.0.step')."""
    cfg = S.parse_config(TINY + ["--out", str(tmp_path)])
    net = M.tiny_model(len(M.tiny_tokenizer()))
    S.save_checkpoint(tmp_path, 3, net, torch.optim.AdamW(net.parameters()), cfg)
    proc = subprocess.run([sys.executable, str(REPO / "scale" / "train.py"), *TINY, "--out", str(tmp_path),
                           "--resume"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "ckpt_000003 was written by spg_min.py: continue it with spg_min.py" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_000003"]       # nothing written or moved


def test_one_step_same_for_one_and_two_ranks(tmp_path, shim):
    """B31: one optimizer step from the same global batch gives the same weights on 1 rank (rows accumulated one
    at a time) and on 2 ranks (FSDP2 and replicated + all-reduce), within 1e-5; and the step did move them.
    lr 1e-4: Adam's first step divides by |g| + 1e-8, so float noise in gradients near 1e-8 moves a weight by up
    to ~6e-3 x lr (measured); at the tiny preset's lr 1e-3 that is 6e-6, too close to the bound to be a test.
    "chunked": FSDP2 with the loss pass's logits in chunks of 5 rows (TargetLogprob, as at LLaDA's vocabulary)."""
    runs = {"1": ["--micro-batch", "1"], "fsdp": ["--shard", "fsdp"], "ddp": ["--shard", "ddp"],
            "chunked": ["--shard", "fsdp"]}
    for name, extra in runs.items():
        torchrun(tmp_path, 1 if name == "1" else 2, "--max-steps", "1", "--lr", "1e-4", "--out", str(tmp_path / name),
                 *extra, script=shim, env={"CHUNK_BYTES": str(5 * 108 * 4)} if name == "chunked" else None)
    one, _ = weights(tmp_path / "1", 1)
    import model as M
    init = {k: v for k, v in M.tiny_model(len(M.tiny_tokenizer()), seed=0).state_dict().items()}
    assert max_diff(one, init) > 5e-5, "the step changed nothing: the comparison would be vacuous"
    assert metrics(tmp_path / "1")[0]["reward/frac_zero_adv_groups"] < 1
    for name in ("fsdp", "ddp", "chunked"):
        assert max_diff(weights(tmp_path / name, 1)[0], one) < 1e-5, name
        for key in ("loss", "grad_norm"):   # Adam's first step is nearly scale-free: check the gradient's size too
            assert metrics(tmp_path / name)[0][key] == pytest.approx(metrics(tmp_path / "1")[0][key], rel=1e-5), key


def test_two_ranks_raise_a_learnable_reward(tmp_path, shim):
    """The distributed loop climbs a reward a policy learns quickly (the fraction of "1" characters) on a small
    model: a flipped sign, or advantages paired with other completions, on any rank make it fall."""
    out = tmp_path / "learn"
    torchrun(tmp_path, 2, "--max-steps", "30", "--num-prompts", "4", "--group-size", "8", "--lr", "1e-2",
             "--save-every", "100", "--out", str(out), script=shim, env={"LEARNABLE": "1"})
    rewards = [row["reward/mean"] for row in metrics(out)]
    assert rewards[0] < 0.05 and sum(rewards[-3:]) / 3 > 0.5, rewards


def test_eval_on_two_ranks_scores_each_problem_once_in_order(tmp_path, shim):
    """7 held-out problems on 2 ranks (4 + 3, the last padded): the result is the aggregate of each problem's own
    credit, as one process computes it."""
    out = tmp_path / "eval"
    torchrun(tmp_path, 2, "--max-steps", "1", "--eval-n", "7", "--seed", "1", "--out", str(out), script=shim,
             env={"EVAL_BY_PUZZLE": "1"})
    problems = T.load_eval("sudoku", n=7, seed=1)
    expected = T.aggregate("sudoku", [(zlib.crc32(ex["puzzle"].encode()) % 101) / 100 for ex in problems], problems)
    assert json.loads((out / "summary.json").read_text())["eval_after"] == pytest.approx(expected)


def test_zero_advantage_groups_fill_in_without_dropping_active_ones(tmp_path, shim):
    """One active group of 4 (3 with all-equal rewards): prompt 2, so rank 1 holds it and rank 0 none, and rank 0
    runs a filler. The step equals the one-rank step, and that one did train (its gradient is not 0). The filler's
    bounds are not logged: rank 0 scored no active group."""
    for name, ranks in (("one", 1), ("two", 2)):
        torchrun(tmp_path, ranks, "--max-steps", "1", "--num-prompts", "4", "--seed", "1", "--lr", "1e-4",
                 "--out", str(tmp_path / name), script=shim, env={"ONE_ACTIVE": "2"})
    one, two = metrics(tmp_path / "one")[0], metrics(tmp_path / "two")[0]
    assert one["reward/frac_zero_adv_groups"] == 0.75 and one["grad_norm"] > 0
    assert "bound/elbo" in one and "bound/elbo" not in two and "bound/eubo" not in two
    assert max_diff(weights(tmp_path / "two", 1)[0], weights(tmp_path / "one", 1)[0]) < 1e-5
    assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)


def test_resume_matches_uninterrupted_run(tmp_path, shim):
    """Stopped after step 2 and resumed with --resume: weights and optimizer at step 4 equal an unbroken run. The
    resumed run loads the checkpoint's weights without rebuilding the (2-step) warm start."""
    warm = ["--warm-start-steps", "2"]
    torchrun(tmp_path, 2, "--max-steps", "4", "--out", str(tmp_path / "full"), *warm, script=shim)
    torchrun(tmp_path, 2, "--max-steps", "2", "--out", str(tmp_path / "cut"), *warm, script=shim)
    resumed = torchrun(tmp_path, 2, "--max-steps", "4", "--out", str(tmp_path / "cut"), "--resume", *warm, script=shim)
    assert "warm start" not in resumed
    (full, full_state), (cut, cut_state) = weights(tmp_path / "full", 4), weights(tmp_path / "cut", 4)
    assert max_diff(full, cut) < 1e-6
    exp_avg = lambda s: {k: v["exp_avg"] for k, v in s["optimizer"]["state"].items()}
    assert max_diff(exp_avg(full_state), exp_avg(cut_state)) < 1e-6
    assert [row["step"] for row in metrics(tmp_path / "cut")] == [1, 2, 3, 4]
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert summary["config"]["max_steps"] == 4 and summary["steps"] == 4     # the command's config, not step 2's


def test_bad_input_is_a_usage_error(tmp_path):
    """An eval file of another format stops the ranks with the loader's message and exit 2, not a traceback."""
    bad = tmp_path / "bad.csv"
    bad.write_text("foo,bar\n1,2\n")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(REPO / "scale" / "train.py"), *TINY, "--eval-file", str(bad), "--out", str(tmp_path / "r")],
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "exitcode  : 2" in proc.stderr
    assert re.search(rf"scale/train.py: error( \[rank 1\])?: --eval-file {re.escape(str(bad))} is not a sudoku file",
                     proc.stderr), proc.stderr[-2000:]
    assert "UsageError" not in proc.stderr


def test_a_fresh_start_keeps_a_killed_runs_log(tmp_path):
    """--out holds a log but no checkpoint (killed before its first save): the old log goes to superseded_1/ and
    the new run's log starts at step 1."""
    out = tmp_path / "run"
    out.mkdir()
    old_rows = [{"step": 1, "reward/mean": 0.5}, {"step": 2, "reward/mean": 0.25}]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old_rows))
    torchrun(tmp_path, 1, "--max-steps", "1", "--out", str(out))
    assert [json.loads(l) for l in (out / "superseded_1" / "metrics.jsonl").read_text().splitlines()] == old_rows
    assert [row["step"] for row in metrics(out)] == [1] and metrics(out)[0]["reward/mean"] != 0.5


def test_nan_on_one_rank_skips_the_step_on_both(tmp_path, shim):
    """B32: rank 1's loss is NaN at step 2; both ranks skip that update (weights at 2 == at 1) and run to step 3."""
    out = tmp_path / "nan"
    torchrun(tmp_path, 2, "--max-steps", "3", "--save-every", "1", "--out", str(out), script=shim,
             env={"NAN_AT": "1:2"}, timeout=90)
    assert [row["skipped"] for row in metrics(out)] == [0, 1, 0]
    w1, w2, w3 = (weights(out, s)[0] for s in (1, 2, 3))
    assert max_diff(w1, w2) == 0.0 and max_diff(w2, w3) > 0
    assert json.loads((out / "summary.json").read_text())["nonfinite_steps"] == 1
    stdout = torchrun(tmp_path, 2, "--max-steps", "4", "--out", str(out), "--resume", "--lr", "1e-5", script=shim,
                      timeout=90)
    assert [row["nonfinite_steps"] for row in metrics(out)] == [0, 1, 1, 1]      # the count goes on after --resume
    assert json.loads((out / "summary.json").read_text())["nonfinite_steps"] == 1
    assert "resumed with a changed config: lr 5e-05 -> 1e-05, save_every 1 -> 25\n" in stdout    # as spg_min
    shutil.rmtree(out / "ckpt_000004")                     # resume auto takes ckpt_000003: a run would cut row 4
    state = torch.load(out / "ckpt_000003" / "state.pt", weights_only=False)
    state["model"]["extra.weight"] = torch.zeros(1)                                # a weight this model has not
    torch.save(state, out / "ckpt_000003" / "state.pt")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                           str(REPO / "scale" / "train.py"), *TINY, "--cache-dir", str(tmp_path / "cache"),
                           "--max-steps", "5", "--out", str(out), "--resume"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0 and "exitcode  : 2" in proc.stderr and "UsageError" not in proc.stderr
    assert "does not fit this model (1 weights it has not, 0 it lacks, 0 of another shape)" in proc.stderr
    assert [row["step"] for row in metrics(out)] == [1, 2, 3, 4]                   # refused: nothing trained or cut


# ---- the sixth mutation audit's survivors: each test below fails under the bug its comment names

def test_scale_resume_puts_back_each_rank_s_global_rng(tmp_path):                     # SC3
    """LoRA dropout draws from the global RNG: a shim draws torch.rand once per loss call and logs it per rank; a run
    cut after step 2 and resumed with --resume draws at steps 3-4 what the unbroken run drew there."""
    hook = ('if os.environ.get("RNG_LOG"):\n'
            '    _loss = S.spg_loss\n'
            '    def drawing(*a, **kw):\n'
            '        with open(os.environ["RNG_LOG"] + os.environ["RANK"], "a") as f:\n'
            '            f.write(repr(torch.rand(1).item()) + "\\n")\n'
            '        return _loss(*a, **kw)\n'
            '    S.spg_loss = drawing\n')
    shim = tmp_path / "shim.py"
    shim.write_text(SHIM.replace("runpy.run_path", hook + "runpy.run_path", 1))
    for name, runs in (("full", [["--max-steps", "4"]]), ("cut", [["--max-steps", "2"], ["--max-steps", "4", "--resume"]])):
        for extra in runs:
            torchrun(tmp_path, 2, *extra, "--out", str(tmp_path / name), script=shim,
                     env={"RNG_LOG": str(tmp_path / f"{name}_rank")})
    for rank in (0, 1):
        full, cut = ((tmp_path / f"{n}_rank{rank}").read_text().split() for n in ("full", "cut"))
        assert len(full) >= 4 and cut == full


@pytest.mark.skipif(not FIXTURE.is_dir(), reason="needs ../shared/fixtures/llada_tiny beside the checkout")
def test_a_4bit_lora_run_saves_only_the_adapter_and_resumes(tmp_path):
    """The single-node GPU setting at toy size on 1 CPU rank: the LLaDA-format fixture as a 4-bit NF4 base + LoRA,
    replicated (--shard ddp, the default for it). get_state_dict also returns the base's quantisation state
    (absmax, quant_map, ...): the checkpoint keeps only the LoRA weights, as spg_min's, and --resume takes it."""
    llada = ["--task", "gsm8k", "--model", str(FIXTURE), "--gen-length", "32", "--block-length", "16", "--steps", "4",
             "--num-prompts", "1", "--group-size", "2", "--eval-n", "2", "--eval-batch", "2", "--lora-rank", "8",
             "--lora-alpha", "16", "--max-prompt-length", "600", "--out", str(tmp_path / "run")]
    torchrun(tmp_path, 1, *llada, "--max-steps", "1", timeout=300)
    state = torch.load(tmp_path / "run" / "ckpt_000001" / "state.pt", weights_only=False)
    assert state["model"] and all("lora_" in name for name in state["model"])
    resumed = torchrun(tmp_path, 1, *llada, "--max-steps", "2", "--resume", timeout=300)
    assert "resumed with a changed config" not in resumed and [row["step"] for row in metrics(tmp_path / "run")] == [1, 2]
