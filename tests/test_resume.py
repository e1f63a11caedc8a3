"""Nothing lost: a run killed anywhere resumes to the same weights and metrics; SIGINT/SIGTERM save and exit 130;
non-finite steps are skipped (B10); the same seed gives the same run.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_resume.py      (about a minute on 2 CPU cores)

Training runs in a subprocess through a small runner (written to tmp) that swaps the Sudoku reward for one that
differs between completions (so that advantages are non-zero and the weights move) and adds the test hooks: pause
inside step N until a file appears, or die inside the Nth torch.save. Each hook fires once, guarded by a marker file,
so the resumed run is the same command in the same environment and runs clean.
"""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import model as M
import spg_min as S
import tasks as T

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--task", "sudoku", "--model", "tiny", "--num-prompts", "2", "--group-size", "3", "--gen-length", "8",
        "--block-length", "4", "--steps", "2", "--warm-start-steps", "0", "--eval-n", "8", "--eval-batch", "8",
        "--micro-batch", "6", "--mu", "1", "--lr", "1e-3", "--temperature", "1.0", "--max-steps", "4"]
TIMING = ("time/", "tokens_per_s")


def chars_reward(completion, example):
    """Deterministic in the text and varied across completions: the sum of character codes mod 5, in [0, 1]."""
    return sum(map(ord, completion)) % 5 / 4


RUNNER = f"""
import dataclasses, os, sys, time
from pathlib import Path
sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / 'tests')!r})
import torch, tasks as T, spg_min as S
from test_resume import chars_reward
real_get_task = T.get_task
T.get_task = lambda name, **kw: dataclasses.replace(real_get_task(name, **kw), reward_funcs=(("chars", chars_reward, 1.0),))
env = os.environ.get
def fire():                                    # each hook fires once: the marker file disarms it for the resume
    if not env("HOOK_MARK") or Path(env("HOOK_MARK")).exists():
        return False
    Path(env("HOOK_MARK")).touch()
    return True
def pause():                                   # hold here until the test has done its thing
    while not Path(env("GO")).exists():
        time.sleep(0.01)
calls, real_score = [0], S.score_rewards
def score_rewards(*a, **k):                    # called once per step, after the rollouts
    calls[0] += 1
    if env("PAUSE_IN") == "rewards" and calls[0] == int(env("PAUSE_AT_STEP")) and fire():
        pause()
    return real_score(*a, **k)
real_ckpt = S.save_checkpoint
def save_checkpoint(out, step, *a, **k):       # the step's metrics row is written, its checkpoint not yet
    if env("PAUSE_IN") == "save" and step == int(env("PAUSE_AT_STEP")) and fire():
        pause()
    return real_ckpt(out, step, *a, **k)
saves, real_save = [0], torch.save
def save(obj, f, *a, **k):                     # die in the Nth write, leaving half a file behind
    saves[0] += 1
    real_save(obj, f, *a, **k)
    if saves[0] == int(env("DIE_AT_SAVE", "0")) and fire():
        os.truncate(f, os.path.getsize(f) // 2)
        os._exit(9)
S.score_rewards, S.save_checkpoint, torch.save = score_rewards, save_checkpoint, save
S.train(S.parse_config(sys.argv[1:]))
"""


def start(tmp, out, extra=(), **hooks):
    runner = tmp / "runner.py"
    runner.write_text(RUNNER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", **{k: str(v) for k, v in hooks.items()}}
    cmd = [sys.executable, str(runner), *ARGS, "--out", str(out), "--cache-dir", str(tmp / "cache"), *extra]
    with open(tmp / f"{out.name}.log", "a") as log:      # the child holds its own copy of the descriptor
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def finish(proc, tmp, out, rc=0):
    assert proc.wait(timeout=300) == rc, (tmp / f"{out.name}.log").read_text()[-3000:]


def wait_for(path, proc, tmp, out, timeout=300):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, (tmp / f"{out.name}.log").read_text()[-3000:]
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def ckpts(out):
    return sorted(p.name for p in out.glob("ckpt_*"))


def state(out, step):
    return torch.load(out / f"ckpt_{step:06d}" / "state.pt", map_location="cpu", weights_only=False)


def small_run(tmp_path, step):
    """A checkpoint at `step` of a small tiny model, saved in tmp_path: (its dir, model, optimizer, config)."""
    tok = M.tiny_tokenizer()
    net = M.tiny_model(len(tok), hidden_size=16, num_layers=1, seed=0)   # seeded without the global RNG
    opt = torch.optim.AdamW(net.parameters())
    cfg = S.Config(task="sudoku", model="tiny")
    return S.save_checkpoint(tmp_path, step, net, opt, cfg), net, opt, cfg


def same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def metrics(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 4-step run, checkpoint every step."""
    tmp = tmp_path_factory.mktemp("ref")
    out = tmp / "ref"
    finish(start(tmp, out, ["--save-every", "1"]), tmp, out)
    first, last = state(out, 1)["model"], state(out, 4)["model"]
    assert not same_tensors(first, last), "the reference run must move the weights, or the comparisons prove nothing"
    return out


def assert_same_run(out, reference):
    assert same_tensors(state(out, 4)["model"], state(reference, 4)["model"])
    assert metrics(out) == metrics(reference)
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]
    summary, ref = (json.loads((o / "summary.json").read_text()) for o in (out, reference))
    assert summary["eval_after"] == ref["eval_after"] and summary["steps"] == 4
    assert not list(out.glob(".tmp_ckpt_*"))


@pytest.mark.parametrize("where", ["rewards", "save"])
def test_sigkill_mid_step_resumes_to_the_same_run(tmp_path, reference, where):
    """SIGKILL inside step 3: after its rollouts, or after its metrics row but before its checkpoint."""
    out, hooks = tmp_path / "run", dict(PAUSE_IN=where, PAUSE_AT_STEP=3, HOOK_MARK=tmp_path / "mark",
                                        GO=tmp_path / "go")
    proc = start(tmp_path, out, ["--save-every", "1"], **hooks)
    wait_for(tmp_path / "mark", proc, tmp_path, out)
    proc.kill()
    finish(proc, tmp_path, out, rc=-signal.SIGKILL)
    assert ckpts(out) == ["ckpt_000001", "ckpt_000002"]
    assert len(metrics(out)) == (3 if where == "save" else 2)       # a row past the checkpoint is dropped on resume
    finish(start(tmp_path, out, ["--save-every", "1"], **hooks), tmp_path, out)
    assert_same_run(out, reference)


def test_kill_inside_a_checkpoint_write_resumes_from_the_previous_one(tmp_path, reference):
    out, hooks = tmp_path / "run", dict(DIE_AT_SAVE=2, HOOK_MARK=tmp_path / "mark")
    finish(start(tmp_path, out, ["--save-every", "1"], **hooks), tmp_path, out, rc=9)
    assert ckpts(out) == ["ckpt_000001"]
    assert (out / ".tmp_ckpt_000002" / "state.pt").exists()          # the half-written one is never picked up
    assert S.latest_checkpoint(out).name == "ckpt_000001"
    finish(start(tmp_path, out, ["--save-every", "1"], **hooks), tmp_path, out)
    assert_same_run(out, reference)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_a_checkpoint_and_exits_130(tmp_path, reference, sig):
    """The signal arrives inside step 2; with --save-every 100 the only checkpoint is the one the signal asks for."""
    out, hooks = tmp_path / "run", dict(PAUSE_IN="rewards", PAUSE_AT_STEP=2, HOOK_MARK=tmp_path / "mark",
                                        GO=tmp_path / "go")
    proc = start(tmp_path, out, ["--save-every", "100"], **hooks)
    wait_for(tmp_path / "mark", proc, tmp_path, out)
    proc.send_signal(sig)
    (tmp_path / "go").touch()                                        # let step 2 finish
    finish(proc, tmp_path, out, rc=130)
    assert ckpts(out) == ["ckpt_000002"] and len(metrics(out)) == 2
    finish(start(tmp_path, out, ["--save-every", "100"], **hooks), tmp_path, out)
    assert ckpts(out) == ["ckpt_000002", "ckpt_000004"]
    assert_same_run(out, reference)


# ---------------------------------------------------------------- in-process runs

@pytest.fixture()
def inproc(monkeypatch):
    """train() in this process with the varied reward; the signal handlers it installs are put back afterwards."""
    real_get_task = T.get_task
    monkeypatch.setattr(T, "get_task", lambda name, **kw: __import__("dataclasses").replace(
        real_get_task(name, **kw), reward_funcs=(("chars", chars_reward, 1.0),)))
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield lambda out, *extra: S.train(S.parse_config(ARGS + ["--out", str(out), "--cache-dir", str(out / "cache"),
                                                            "--save-every", "1", *extra]))
    for s, h in handlers.items():
        signal.signal(s, h)


def nan_in_logits(monkeypatch, times):
    """Put a NaN into one sequence's logits in the next `times` loss passes (not in rollouts or evaluation)."""
    left, real_load = [times], S.load_model

    def hook(module, inputs, logits):               # logits [B * m * Lg, V], sequence by sequence
        if torch.is_grad_enabled() and left[0] > 0:
            left[0] -= 1
            logits = logits.clone()
            logits[:16, 5] = float("nan")            # sequence 0: m * Lg = 2 * 8 rows
            return logits

    def load_model(cfg, vocab_size):
        net = real_load(cfg, vocab_size)
        M.decoder_and_head(net)[1].register_forward_hook(hook)
        return net
    monkeypatch.setattr(S, "load_model", load_model)
    return left


class Crash(Exception):
    pass


def all_finite(tensors):
    return all(torch.isfinite(t).all() for t in tensors if torch.is_tensor(t) and t.is_floating_point())


def test_nan_logits_skip_the_step_and_training_goes_on(tmp_path, inproc, monkeypatch):  # B10
    left = nan_in_logits(monkeypatch, times=1)
    out, calls, real_score = tmp_path / "run", [0], S.score_rewards

    def crash_in_step_3(*args):                     # a crash after two steps: summary.json still lacks the count
        calls[0] += 1
        if calls[0] == 3:
            raise Crash
        return real_score(*args)
    monkeypatch.setattr(S, "score_rewards", crash_in_step_3)
    with pytest.raises(Crash):
        inproc(out, "--max-steps", "3")
    assert left[0] == 0 and ckpts(out) == ["ckpt_000001", "ckpt_000002"]
    summary = inproc(out, "--max-steps", "3")                       # resumed: the count survives
    assert summary["nonfinite_steps"] == 1 and "eval_after" in summary
    assert [r["nonfinite_steps"] for r in metrics(out)] == [1, 1, 1]   # the first loss pass is in step 1 here
    assert metrics(out)[0]["loss"] is None and "NaN" not in (out / "metrics.jsonl").read_text()   # strict JSON
    initial = {n: p for n, p in M.tiny_model(len(M.tiny_tokenizer()), seed=0).named_parameters()}
    s1, s3 = state(out, 1), state(out, 3)
    assert same_tensors(s1["model"], initial) and s1["optimizer"]["state"] == {}   # step 1 skipped: nothing moved
    assert not same_tensors(s3["model"], initial)                                 # steps 2 and 3 trained
    for step in (1, 2, 3):
        st = state(out, step)
        assert all_finite(st["model"].values())
        assert all_finite(v for per_param in st["optimizer"]["state"].values() for v in per_param.values())


def test_ten_nonfinite_steps_in_a_row_abort(tmp_path, inproc, monkeypatch):
    nan_in_logits(monkeypatch, times=10**6)
    with pytest.raises(RuntimeError, match="10 non-finite"):
        inproc(tmp_path / "run", "--mu", "10", "--max-steps", "2")


def test_batch_with_every_advantage_zero_trains_on(tmp_path):  # B12 in the loop: nothing active, no crash
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        S.train(S.parse_config(ARGS + ["--out", str(tmp_path), "--max-steps", "1"]))   # Sudoku reward: all 0
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    row, = metrics(tmp_path)
    assert row["reward/frac_zero_adv_groups"] == 1.0 and row["loss"] == 0.0 and row["grad_norm"] == 0.0


def test_same_seed_same_run(tmp_path, inproc):
    runs = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    for out, seed in zip(runs, ["42", "42", "7"]):
        inproc(out, "--max-steps", "3", "--seed", seed)
    a, b, c = runs
    assert metrics(a) == metrics(b) and metrics(a) != metrics(c)
    assert same_tensors(state(a, 3)["model"], state(b, 3)["model"])
    assert (a / "eval_generations.jsonl").read_text() == (b / "eval_generations.jsonl").read_text()


def test_resume_from_an_earlier_checkpoint_moves_the_later_ones_aside(tmp_path, inproc, reference):
    """--resume ckpt_000002 of a finished 4-step run: ckpt 3 and 4 of that run move to superseded_*/, so a later
    --resume auto cannot pick them up; redoing steps 3-4 gives the same run."""
    out = tmp_path / "run"
    inproc(out)
    old4 = state(out, 4)["model"]
    inproc(out, "--resume", str(out / "ckpt_000002"), "--max-steps", "3")
    aside, = out.glob("superseded_*")
    assert ckpts(out) == ["ckpt_000001", "ckpt_000002", "ckpt_000003"]
    assert S.latest_checkpoint(out).name == "ckpt_000003"
    assert sorted(p.name for p in aside.iterdir()) == ["ckpt_000003", "ckpt_000004", "eval_generations.jsonl",
                                                       "metrics.jsonl", "summary.json"]
    assert [json.loads(line)["step"] for line in (aside / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert same_tensors(torch.load(aside / "ckpt_000004" / "state.pt", weights_only=False)["model"], old4)
    inproc(out, "--max-steps", "4")                                 # --resume auto: from the new step 3
    assert_same_run(out, reference)


def test_a_finished_run_whose_last_checkpoints_are_gone_keeps_its_record(tmp_path, inproc):
    """The run's summary says it got to step 4, its checkpoints 3 and 4 were deleted: --resume auto restarts at
    step 2 and first copies the step-4 summary and log to superseded_1/."""
    out = tmp_path / "run"
    inproc(out)
    for step in (3, 4):
        __import__("shutil").rmtree(out / f"ckpt_{step:06d}")
    inproc(out, "--max-steps", "3")
    aside = out / "superseded_1"
    assert json.loads((aside / "summary.json").read_text())["steps"] == 4
    assert [json.loads(line)["step"] for line in (aside / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_a_branch_keeps_its_origin_s_record_from_the_start(tmp_path, inproc, monkeypatch):
    first, branch = tmp_path / "first", tmp_path / "branch"
    inproc(first, "--max-steps", "3")
    monkeypatch.setattr(S, "score_rewards", lambda *a: (_ for _ in ()).throw(Crash()))   # dies in its first step
    with pytest.raises(Crash):
        inproc(branch, "--max-steps", "3", "--resume", str(first / "ckpt_000002"))
    before = json.loads((first / "summary.json").read_text())["eval_before"]
    assert json.loads((branch / "summary.json").read_text())["eval_before"] == before


def test_a_checkpoint_spelled_another_way_is_this_run_s(tmp_path, inproc, monkeypatch):
    monkeypatch.chdir(tmp_path)
    inproc(Path("run"), "--max-steps", "2")
    inproc(Path("run"), "--max-steps", "3", "--resume", str(tmp_path / "run" / ".." / "run" / "ckpt_000002"))
    assert [r["step"] for r in metrics(tmp_path / "run")] == [1, 2, 3]


def test_a_checkpoint_of_another_run_is_refused_into_a_run(tmp_path, inproc):
    inproc(tmp_path / "a", "--max-steps", "1")
    inproc(tmp_path / "b", "--max-steps", "1")
    with pytest.raises(T.UsageError, match="holds another run than resume=.*pass a new --out to branch"):
        inproc(tmp_path / "b", "--max-steps", "2", "--resume", str(tmp_path / "a" / "ckpt_000001"))


def test_a_run_killed_before_its_first_step_leaves_no_log(tmp_path, inproc, monkeypatch):
    """So `--resume none` can still start it over (the evaluation before RL is long for LLaDA)."""
    monkeypatch.setattr(S, "evaluate", lambda *a, **k: (_ for _ in ()).throw(Crash()))
    with pytest.raises(Crash):
        inproc(tmp_path / "run", "--max-steps", "1")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    S.check_out(S.parse_config(ARGS + ["--out", str(tmp_path / "run"), "--resume", "none"]))


def test_a_restart_before_the_first_checkpoint_starts_the_log_over(tmp_path, inproc):
    out = tmp_path / "run"
    inproc(out, "--max-steps", "2")
    for ckpt in out.glob("ckpt_*"):                                 # as if killed before its first save
        __import__("shutil").rmtree(ckpt)
    inproc(out, "--max-steps", "2")
    assert [r["step"] for r in metrics(out)] == [1, 2]


def test_a_checkpoint_of_another_model_is_refused(tmp_path, inproc):
    out = tmp_path / "run"
    inproc(out, "--max-steps", "1")
    (out / "ckpt_000005").mkdir()                                    # --resume auto picks it up
    torch.save({**state(out, 1), "model": {"lm_head.weight": torch.zeros(1)}}, out / "ckpt_000005" / "state.pt")
    with pytest.raises(T.UsageError, match="does not fit this model"):
        inproc(out, "--max-steps", "6")
    saved = state(out, 1)["model"]                                   # every name, one of another shape
    torch.save({**state(out, 1), "model": {**saved, "lm_head.weight": torch.zeros(1)}}, out / "ckpt_000005" / "state.pt")
    with pytest.raises(T.UsageError, match=r"\(0 weights it has not, 0 it lacks, 1 of another shape\)"):
        inproc(out, "--max-steps", "6")


def test_a_checkpoint_of_scale_is_refused_with_the_command_that_continues_it(tmp_path, inproc, monkeypatch):
    """scale/'s checkpoints name their world size in meta.json (per-rank RNGs, a name-keyed optimizer): refused
    before any model loads, whatever their state.pt holds."""
    out = tmp_path / "run"
    inproc(out, "--max-steps", "1")
    (out / "ckpt_000005").mkdir()                                    # --resume auto picks it up
    torch.save(state(out, 1), out / "ckpt_000005" / "state.pt")
    (out / "ckpt_000005" / "meta.json").write_text(json.dumps({"step": 5, "world_size": 2, "config": {}}))
    monkeypatch.setattr(S, "load_model", lambda *a: pytest.fail("loaded a model before refusing"))
    with pytest.raises(T.UsageError, match="written by scale/train.py: continue it with torchrun"):
        inproc(out, "--max-steps", "6")
    assert ckpts(out) == ["ckpt_000001", "ckpt_000005"]                # nothing moved aside or lost


def test_resume_restores_the_global_rng(tmp_path):
    """LoRA dropout draws from the global RNG: resume_run puts back the stream a checkpoint saved."""
    torch.manual_seed(5)                                  # small_run draws nothing from the global RNG
    ckpt, net, opt, cfg = small_run(tmp_path, 1)
    expected = torch.rand(4)
    torch.manual_seed(0)
    S.resume_run(ckpt, ckpt.parent, net, opt, cfg)
    assert torch.equal(torch.rand(4), expected)


def test_a_resumed_run_takes_the_new_learning_rate_and_says_so(tmp_path, inproc, capsys):
    out = tmp_path / "run"
    inproc(out, "--max-steps", "1")
    inproc(out, "--max-steps", "2", "--lr", "1e-4", "--adam-eps", "1e-4", "--weight-decay", "0.05")
    assert "resumed with a changed config: lr 0.001 -> 0.0001" in capsys.readouterr().out
    groups = state(out, 2)["optimizer"]["param_groups"]
    assert [(g["lr"], g["eps"], g["weight_decay"]) for g in groups] == [(1e-4, 1e-4, 0.05)]
    assert [r["lr"] for r in metrics(out)] == [1e-3, 1e-4]


def test_resume_from_another_run_s_checkpoint_branches_it(tmp_path, inproc):
    """--resume DIR into a new --out: the origin's eval before RL and its metrics up to the step come along."""
    first, branch = tmp_path / "first", tmp_path / "branch"
    inproc(first, "--max-steps", "3")
    summary = inproc(branch, "--max-steps", "3", "--resume", str(first / "ckpt_000002"))
    assert summary["eval_before"] == json.loads((first / "summary.json").read_text())["eval_before"]
    assert metrics(branch) == metrics(first) and [r["step"] for r in metrics(branch)] == [1, 2, 3]   # same seed


def test_a_resumed_spg_run_does_not_rebuild_the_warm_start(tmp_path, inproc):
    """Its weights come from the checkpoint, so a deleted warm-start cache is not rebuilt (d1 still needs it: the
    reference model), and the run goes on as the uninterrupted one does."""
    out, whole = tmp_path / "run", tmp_path / "whole"
    inproc(whole, "--max-steps", "2", "--warm-start-steps", "2")
    inproc(out, "--max-steps", "1", "--warm-start-steps", "2")
    __import__("shutil").rmtree(out / "cache")
    inproc(out, "--max-steps", "2", "--warm-start-steps", "2")
    assert not (out / "cache").exists()
    assert metrics(out) == metrics(whole) and same_tensors(state(out, 2)["model"], state(whole, 2)["model"])


def test_a_bare_checkpoint_is_scored_at_its_step_not_as_before_rl(tmp_path, inproc):
    """A checkpoint copied out of its run has no record of the model RL started from: the first evaluation is
    eval_at_resume, never eval_before (which would be the score after some RL steps)."""
    import shutil
    inproc(tmp_path / "run", "--max-steps", "1")
    shutil.copytree(tmp_path / "run" / "ckpt_000001", tmp_path / "bare" / "ckpt_000001")
    summary = inproc(tmp_path / "new", "--max-steps", "2", "--resume", str(tmp_path / "bare" / "ckpt_000001"))
    assert "eval_before" not in summary and summary["eval_at_resume"]["step"] == 1 and "eval_after" in summary
    sys.path.insert(0, str(ROOT / "bench"))
    import plot_curves
    assert plot_curves.read_run(tmp_path / "new")[0] == [2]          # plots without an eval before RL


def test_links_and_restarts_never_lose_a_record(tmp_path, inproc):
    """A link to a checkpoint of this run is this run (only the later checkpoints move aside), and a fresh start
    over a log whose checkpoints were deleted keeps that log in superseded_*/."""
    import shutil
    out = tmp_path / "run"
    inproc(out)
    before = json.loads((out / "summary.json").read_text())["eval_before"]
    (tmp_path / "best").symlink_to(out / "ckpt_000002")
    inproc(out, "--resume", str(tmp_path / "best"), "--max-steps", "3")
    assert ckpts(out) == ["ckpt_000001", "ckpt_000002", "ckpt_000003"]
    assert json.loads((out / "summary.json").read_text())["eval_before"] == before
    log = (out / "metrics.jsonl").read_text()
    for ckpt in out.glob("ckpt_*"):
        shutil.rmtree(ckpt)
    inproc(out, "--max-steps", "1")                                  # starts over: the 3-step log is kept aside
    assert (out / "superseded_2" / "metrics.jsonl").read_text() == log and len(metrics(out)) == 1


def test_resume_auto_takes_only_this_run_s_numbered_checkpoints(tmp_path, inproc):
    """A link in out to another run's checkpoint and a ckpt_final copy are not this run's: --resume auto continues
    from the run's own newest ckpt_NNNNNN, and an earlier-checkpoint resume's new step 3 is then the newest."""
    import shutil
    other, out = tmp_path / "other", tmp_path / "run"
    inproc(other, "--max-steps", "5", "--seed", "7")
    inproc(out, "--max-steps", "3")
    (out / "ckpt_000005").symlink_to(other / "ckpt_000005")
    shutil.copytree(out / "ckpt_000003", out / "ckpt_final")
    assert S.latest_checkpoint(out).name == "ckpt_000003"
    inproc(out, "--resume", str(out / "ckpt_000002"), "--max-steps", "3")
    assert S.latest_checkpoint(out).name == "ckpt_000003" and (out / "superseded_1" / "ckpt_000003").is_dir()
    assert [r["step"] for r in metrics(out)] == [1, 2, 3] and metrics(out) != metrics(other)[:3]


# ---- the sixth mutation audit's survivors: each test below fails under the bug its comment names


def test_a_checkpoint_directory_without_its_state_is_not_a_checkpoint(tmp_path):      # S2
    small_run(tmp_path, 1)
    (tmp_path / "ckpt_000002").mkdir()                     # e.g. a copy that was cut short
    assert S.run_checkpoints(tmp_path) == {tmp_path / "ckpt_000001": 1}
    assert S.latest_checkpoint(tmp_path).name == "ckpt_000001"


def test_resume_takes_the_skip_count_of_the_checkpoint_s_own_row(tmp_path):            # S14
    ckpt, net, opt, cfg = small_run(tmp_path, 2)
    rows = [{"step": 1, "nonfinite_steps": 0}, {"step": 2, "nonfinite_steps": 1}, {"step": 3, "nonfinite_steps": 2}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    step, summary = S.resume_run(ckpt, tmp_path, net, opt, cfg)
    assert step == 2 and summary["nonfinite_steps"] == 1


def test_resuming_the_newest_checkpoint_moves_nothing_aside(tmp_path):                # S7, S8
    ckpt, net, opt, cfg = small_run(tmp_path, 1)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "nonfinite_steps": 0}\n')
    S.write_summary(tmp_path, {"eval_before": {"accuracy": 1.0}, "eval_after": {"accuracy": 2.0}, "steps": 1})
    S.resume_run(ckpt, tmp_path, net, opt, cfg)             # a finished 1-step run continued to more steps
    assert not list(tmp_path.glob("superseded_*"))


def test_a_resumed_summary_drops_the_old_end_and_takes_this_config(tmp_path):         # S12, S13
    old = S.Config(task="sudoku", model="tiny", max_steps=2)
    S.write_summary(tmp_path, {"config": dataclasses.asdict(old), "eval_before": {"accuracy": 1.0},
                               "eval_after": {"accuracy": 2.0}, "steps": 2, "nonfinite_steps": 0})
    new = S.Config(task="sudoku", model="tiny", max_steps=5)
    summary = S.resumed_summary(tmp_path, new)
    assert summary == {"config": dataclasses.asdict(new), "eval_before": {"accuracy": 1.0}, "nonfinite_steps": 0}


def test_a_resumed_d1_run_keeps_the_warm_start_as_its_reference(tmp_path, inproc):   # S27
    """d1's KL reference is the warm start: a resumed d1 run rebuilds it (SPG's does not need it) and goes on as
    the uninterrupted run does."""
    out, whole = tmp_path / "run", tmp_path / "whole"
    d1 = ["--estimator", "d1", "--warm-start-steps", "2", "--d1-beta-kl", "1.0"]
    inproc(whole, "--max-steps", "2", *d1)
    inproc(out, "--max-steps", "1", *d1)
    inproc(out, "--max-steps", "2", *d1)
    assert metrics(out) == metrics(whole)


def test_a_checkpoint_past_max_steps_is_recorded_at_its_own_step(tmp_path, inproc):
    """Rerun with a smaller --max-steps, the newest checkpoint (step 2) is what gets evaluated: summary.json says
    step 2, not 1."""
    out = tmp_path / "run"
    inproc(out, "--max-steps", "2")
    summary = inproc(out, "--max-steps", "1")
    assert summary["steps"] == 2 and json.loads((out / "summary.json").read_text())["steps"] == 2
    assert [row["step"] for row in metrics(out)] == [1, 2]
