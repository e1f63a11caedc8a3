"""The fast decoding modes of spg_min.generate, and quick runs of the benchmark and diagnostic scripts.

Threshold rule under test (spg_min.generate docstring): each step commits max(k, #masked positions of the block
whose confidence > threshold) tokens per row, k from the per-block schedule; a row whose block is done leaves the
forward batch, and a block stops once no row is left. So threshold=None is the default sampler, a threshold never
met (> 1) decodes exactly like it with the same number of model calls, and a threshold always met (< 0) decodes
every block in one call.

Run: python -m pytest -q tests/test_bench.py      (about 5 min on 2 cores, most of it the quick runs)
"""
import argparse
import dataclasses
import json
import math
import re
import subprocess
import sys
import types
import zlib
from pathlib import Path

import pytest
import torch

import model as M
import spg_min as S

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))     # the bench scripts import as modules
GEN = dict(gen_length=24, block_length=8, steps=12)    # 3 blocks x 4 steps, 2 tokens a step


@pytest.fixture(scope="module")
def tiny():
    tok = M.tiny_tokenizer()
    net = M.tiny_model(len(tok), seed=0).eval()
    ids, attn = S.encode_prompts(tok, ["Sudoku 0310200404001043", "2+2="])   # left-padded batch of 2
    return net, tok, M.special_ids(tok)["mask"], ids, attn


def run(net, ids, attn, mask_id, **kw):
    """(output ids, number of decoder calls) of one greedy generate."""
    calls = []
    decoder, _ = M.decoder_and_head(net)
    handle = decoder.register_forward_pre_hook(lambda *_: calls.append(1))
    out = S.generate(net, ids, attn, temperature=0.0, mask_id=mask_id, **kw, **GEN)
    handle.remove()
    return out, len(calls)


def test_threshold_none_is_the_default_sampler(tiny):
    net, _, mask_id, ids, attn = tiny
    default, n_default = run(net, ids, attn, mask_id)
    none, n_none = run(net, ids, attn, mask_id, threshold=None, kv_cache=None)
    assert torch.equal(default, none) and n_default == n_none == 12


def test_threshold_never_met_falls_back_to_the_schedule(tiny):   # B22: the loop always ends
    net, _, mask_id, ids, attn = tiny
    default, _ = run(net, ids, attn, mask_id)
    out, calls = run(net, ids, attn, mask_id, threshold=1.5)
    assert torch.equal(out, default) and calls == 12
    assert not (out[:, ids.shape[1]:] == mask_id).any()


def test_threshold_always_met_decodes_each_block_in_one_call(tiny):
    net, _, mask_id, ids, attn = tiny
    out, calls = run(net, ids, attn, mask_id, threshold=-1.0)
    assert calls == 3                                              # one per block, then the block is done
    assert not (out[:, ids.shape[1]:] == mask_id).any()
    assert torch.equal(out[:, :ids.shape[1]], ids)                 # the prompt is never changed


@pytest.mark.parametrize("threshold", [0.0, 0.02, 0.5])
def test_threshold_leaves_no_mask_and_never_uses_more_calls(tiny, threshold):
    net, _, mask_id, ids, attn = tiny
    out, calls = run(net, ids, attn, mask_id, threshold=threshold)
    assert not (out[:, ids.shape[1]:] == mask_id).any()
    assert 3 <= calls <= 12


def test_rows_done_leave_the_batch():
    """Row 0 is sure of every token (one call per block), row 1 never passes the threshold (the schedule's 4 calls):
    the decoder sees 2 rows, then row 1 alone, and row 1 decodes as it does alone and as without a threshold."""
    mask_id = 4
    sure, unsure = torch.tensor([9.0, 0, 0, 0, 0]), torch.tensor([1.0, 0.9, 0.8, 0, 0])

    class Decoder(torch.nn.Module):   # hidden state = the row's first prompt token, at every position
        def forward(self, input_ids, attention_mask=None, position_ids=None):
            return type("Out", (), {"last_hidden_state": input_ids[:, :1, None].float().expand(*input_ids.shape, 1)})()

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Decoder()
            self.lm_head = lambda h: torch.where(h == 1, sure, unsure)          # [b, bl, 1] -> [b, bl, V]

    net, rows = Net(), []
    net.model.register_forward_pre_hook(lambda m, args, kw: rows.append(len(kw["input_ids"])), with_kwargs=True)
    ids, attn = torch.tensor([[1], [2]]), torch.ones(2, 1, dtype=torch.long)
    out = S.generate(net, ids, attn, temperature=0.0, mask_id=mask_id, threshold=0.9, **GEN)
    assert rows == [2, 1, 1, 1] * 3                                # 3 blocks of 4 scheduled steps
    assert (out[0, 1:] == 0).all()
    alone = S.generate(net, ids[1:], attn[1:], temperature=0.0, mask_id=mask_id, threshold=0.9, **GEN)
    default = S.generate(net, ids, attn, temperature=0.0, mask_id=mask_id, **GEN)
    assert torch.equal(out[1], alone[0]) and torch.equal(out[1], default[1])


@pytest.mark.parametrize("kv_cache", ["prefix", "dual"])
def test_kv_cache_is_exact_with_one_step_per_block(tiny, kv_cache):
    """With one step per block every call is the block's first, a full pass: nothing cached is reused."""
    net, _, mask_id, ids, attn = tiny
    kw = dict(temperature=0.0, mask_id=mask_id, gen_length=24, block_length=8, steps=3)
    assert torch.equal(S.generate(net, ids, attn, **kw), S.generate(net, ids, attn, kv_cache=kv_cache, **kw))


@pytest.mark.parametrize("kv_cache", ["prefix", "dual"])
def test_kv_cache_finishes_and_honours_left_padding(tiny, kv_cache):    # B24 under the cache
    net, tok, mask_id, ids, attn = tiny
    out, calls = run(net, ids, attn, mask_id, kv_cache=kv_cache, threshold=0.9)
    assert not (out[:, ids.shape[1]:] == mask_id).any() and calls <= 12
    solo_ids, solo_attn = S.encode_prompts(tok, ["2+2="])
    solo, _ = run(net, solo_ids, solo_attn, mask_id, kv_cache=kv_cache, threshold=0.9)
    torch.testing.assert_close(out[1, -24:], solo[0, -24:], rtol=0, atol=0)


def test_unknown_kv_cache_raises(tiny):
    net, _, mask_id, ids, attn = tiny
    with pytest.raises(ValueError, match="kv_cache"):
        run(net, ids, attn, mask_id, kv_cache="suffix")


@pytest.mark.parametrize("dual, cached", [(False, 20), (True, 30)])
def test_block_hidden_reuses_the_cache(dual, cached):
    """A filled cache gives the same block states as a full pass while the sequence is unchanged: the prefix
    x[:, :20] is cached (prefix), or every position, the block's own entries masked out at reuse (dual)."""
    from transformers import DynamicCache
    net = M.tiny_model(108, seed=1).eval()
    x = torch.randint(0, 90, (2, 30))
    attn = torch.ones_like(x)
    attn[0, :4] = 0
    cache = DynamicCache()
    with torch.no_grad():
        first = S.block_hidden(net, x, attn, 20, 25, cache, dual)   # fills the cache
        again = S.block_hidden(net, x, attn, 20, 25, cache, dual)   # runs x[:, 20:] (prefix) or x[:, 20:25] (dual)
        full = S.block_hidden(net, x, attn, 20, 25)
    assert cache.get_seq_length() == cached
    torch.testing.assert_close(first, full, rtol=0, atol=0)
    torch.testing.assert_close(again, full, rtol=1e-5, atol=1e-5)


def run_bench(script, tmp_path):
    out = tmp_path / f"{script}.md"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / f"{script}.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out.read_text()


def test_decode_bench_quick(tmp_path):
    table = run_bench("decode", tmp_path)
    assert "identical to plain (greedy), all shapes: **True**" in table
    speedups = [float(v) for v in re.findall(r"\| LLaDA proportions[^|]*\| generate\([^|]*\| (?:[^|]*\|){5} ([\d.]+)x",
                                             table)]
    assert speedups and min(speedups) >= 3.0                       # fast modes vs plain at LLaDA's vocabulary


def test_loss_bench_quick(tmp_path):
    table = run_bench("loss", tmp_path)
    assert "equal loss and gradients (all V, all implementations): **True**" in table
    assert re.search(r"chunk_rows=64: peak tensor memory = 1/[\d.]+ of direct \(meets", table)
    assert re.search(r"LOGP_CHUNK_BYTES=\d+ MiB\): peak tensor memory = 1/[\d.]+ of direct \(meets", table)  # shipped


def test_memory_estimate_adds_up():
    """bench/memory.py without a GPU: the shape-based estimate for LLaDA-8B at the single-GPU defaults."""
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "memory.py"), "--estimate"], cwd=ROOT,
                         capture_output=True, text=True, check=True, timeout=120).stdout
    rows = [line.split("|")[1:3] for line in out.splitlines() if line.startswith("| ") and "GB" not in line]
    parts = {name.strip(): float(gb.strip(" *")) for name, gb in rows}
    total = parts.pop("**total**")
    assert abs(sum(parts.values()) - total) < 0.02 and 10 < total < 24     # fits a 24 GB card by this estimate
    linear = 32 * (4 * 4096 ** 2 + 3 * 4096 * 12288)    # LLaDA-8B: 32 layers of q, k, v, o (d = 4096) and SwiGLU
    nf4 = linear * (4 + 0.127) / 8 / 2 ** 30            # QLoRA Sec. 3: 4 bits + 0.127 bits of constants per weight
    assert parts["NF4 weights (0.5 B + double-quant constants)"] == pytest.approx(nf4, abs=0.01)   # 3.35 GiB


def test_ablation_run_done_only_at_its_length(tmp_path):
    """A run finished at 20 steps is not a finished 150-step run (it is continued, never reported as one)."""
    import ablation as A
    (tmp_path / "summary.json").write_text(json.dumps({"eval_after": {"accuracy": 40.0}, "steps": 20}))
    assert A.is_done(tmp_path, 20) and not A.is_done(tmp_path, 150)
    (tmp_path / "summary.json").write_text(json.dumps({"eval_before": {"accuracy": 40.0}}))   # still running
    assert not A.is_done(tmp_path, 20) and not A.is_done(tmp_path / "absent", 20)


def test_ablation_seeds_are_distinct_runs_and_the_threshold_is_inclusive(tmp_path):
    """Each seed 1..N is its own run (its own --seed and folder); "steps to +gain" counts an evaluation that lands
    exactly on the threshold."""
    import ablation as A
    args = A.parse_args(["--seeds", "3", "--out", str(tmp_path)])
    configs = [A.config_for("sudoku", "mix", s, args) for s in (1, 2, 3)]
    assert [c.seed for c in configs] == [1, 2, 3] and len({c.out for c in configs}) == 3
    assert A.steps_to_reach([(0, 50.0), (25, 55.0)], 55.0) == 25 and A.steps_to_reach([(0, 50.0)], 55.0) is None


def test_ablation_summary_hand_computed():
    """bench/ablation.py's per-config numbers on two hand-made seeds."""
    import ablation as A
    runs = [{"before": 50.0, "after": 58.0, "evals": [(0, 50.0), (25, 54.0), (50, 56.0), (75, 58.0)],
             "reward": [0.1] * 5 + [0.5] * 10},
            {"before": 50.0, "after": 52.0, "evals": [(0, 50.0), (25, 51.0), (50, 49.0), (75, 52.0)],
             "reward": [0.3] * 10}]
    s = A.seed_summary(runs, gain=5.0)
    assert (s["after"], s["lo"], s["hi"], s["change"]) == (55.0, 52.0, 58.0, 5.0)
    assert s["steps"] == 50 and s["reached"] == 1                 # seed 1 reaches 55 at step 50; seed 2 never
    assert s["reward"] == pytest.approx(0.4)                      # last 10 steps: 0.5 and 0.3
    assert A.steps_to_reach(runs[1]["evals"], 55.0) is None
    assert A.moving_average([1.0, 3.0, 5.0], 2) == [1.0, 2.0, 4.0]


def test_ablation_bench_quick(tmp_path, monkeypatch):
    """Every task x config for 1 step from a 3-step warm start; a second call finds every run done and trains nothing.

    A 3-step warm start earns no task reward, so every advantage would be 0 and no loss path would run: the
    in-process run swaps in a reward that differs between completions, so every config takes a real gradient.
    It generates 500 Countdown training problems, not 20,000 (most of a 1-step run's time was making them)."""
    import ablation as A
    import tasks as T
    varied = lambda text, ex: (zlib.crc32(text.encode()) % 101) / 100     # stand-in reward, differs by completion
    monkeypatch.setattr(T, "COUNTDOWN_TRAIN_SIZE", 500)
    for task in A.TASKS:
        monkeypatch.setitem(T.TASKS, task, dataclasses.replace(T.TASKS[task], reward_funcs=(("varied", varied, 1.0),)))
    A.main(["--quick", "--out", str(tmp_path)])
    runs = sorted(tmp_path.glob("*/*/seed1"))
    assert len(runs) == 14
    for run in runs:
        row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
        assert row["reward/frac_zero_adv_groups"] < 1 and row["grad_norm"] > 0, run     # a real update ran
    table = (tmp_path / "ablation.md").read_text()
    rows = [line.split("|")[1:-1] for line in table.splitlines() if re.match(r"\| (sudoku|countdown) \|", line)]
    assert len(rows) == 14 and all(0.0 <= float(r[3].split()[0]) <= 100.0 for r in rows)
    paper = {(r[0].strip(), r[1].strip()): r[7].strip() for r in rows}
    assert paper[("sudoku", "mix")] == "90.0" and paper[("countdown", "mix-random")] == "62.8"
    assert paper[("sudoku", "eubo-random")] == "-"                # Table 4 has no Sudoku rows
    change = {(r[0].strip(), r[1].strip()): r[8].strip() for r in rows}   # vs LLaDA-8B-Instruct's Table 1 average
    assert change[("sudoku", "mix")] == f"{90.0 - (5.7 + 27.7 + 26.2) / 3:+.1f}" == "+70.1"
    assert (tmp_path / "ablation.png").stat().st_size > 10_000
    config = lambda task, name: json.loads((tmp_path / task / name / "seed1" / "summary.json").read_text())["config"]
    assert (config("sudoku", "d1")["estimator"], config("sudoku", "d1")["masking"]) == ("d1", "d1")
    assert config("countdown", "eubo")["beta"] == 2.0 and config("countdown", "mix-random")["masking"] == "random"
    d1_rows = (tmp_path / "sudoku" / "d1" / "seed1" / "metrics.jsonl").read_text()
    assert '"d1/kl"' in d1_rows
    cmd = [sys.executable, str(ROOT / "bench" / "ablation.py"), "--quick", "--out", str(tmp_path)]
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert again.returncode == 0 and "seed 1 ->" not in again.stdout     # resumable: nothing is re-run


ONES = ["--reward", "ones", "--warm-start-steps", "100", "--temperature", "0.3"]


@pytest.fixture(scope="module")
def warm_cache(tmp_path_factory):
    """One --cache-dir for the quick runs of this module: a warm start of a given budget is trained once (about
    0.5 s a step) and loaded by the other runs, as spg_min's cache does between runs."""
    return tmp_path_factory.mktemp("warm_cache")


@pytest.mark.parametrize("extra", [ONES, ["--sft"], ["--unshared-masks"]])
def test_gradient_probe_quick(warm_cache, extra):
    """bench/gradient_probe.py --quick runs to the end: the gradient consistency line and one step, or SFT. The
    control reward (the fraction of "1" cells; a 100-step warm start writes the answer tag) gives batch gradients
    that agree (cos well above 0) and a step along their mean raises that reward."""
    cmd = [sys.executable, str(ROOT / "bench" / "gradient_probe.py"), "--quick", "--cache-dir", str(warm_cache), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if "--sft" in extra:
        assert "step 2: held-out" in proc.stdout
    else:
        assert math.isfinite(float(proc.stdout.split("cos ")[1].split(" ")[0]))     # all-zero gradients give 0
        assert "eta 0.05: held-out" in proc.stdout
    if extra == ONES:
        sampled = [float(line.split("sampled reward (T=0.3) ")[1]) for line in proc.stdout.splitlines()
                   if line.startswith("eta ")]                                    # eta 0, then eta 0.05
        assert float(proc.stdout.split("cos ")[1].split(" ")[0]) > 0.3 and sampled[1] > sampled[0] + 0.05, proc.stdout


def test_shuffled_within_groups_keeps_each_group():
    """bench/noise_control.py: rewards move only within their group, and every group keeps its multiset."""
    import noise_control as NC
    rewards = torch.tensor([0.0, 0.1, 0.2, 0.3, 1.0, 2.0, 3.0, 4.0, 5.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1])
    outs = [NC.shuffled_within_groups(rewards, groups, torch.Generator().manual_seed(seed)) for seed in range(5)]
    for out in outs:
        for g in (0, 1):
            assert sorted(out[groups == g].tolist()) == sorted(rewards[groups == g].tolist())
    assert any(not torch.equal(out, rewards) for out in outs)          # a permutation, not the identity every time


def test_perturbed_adds_noise_of_the_given_size():
    import noise_control as NC
    state = {"w": torch.zeros(200, 200), "steps": torch.tensor([3])}
    out = NC.perturbed(state, 1e-3, torch.Generator().manual_seed(0))
    assert out["w"].std().item() == pytest.approx(1e-3, rel=0.02) and torch.equal(out["steps"], state["steps"])
    assert torch.equal(state["w"], torch.zeros(200, 200))               # the warm state is left as it was


def noise_control(cache_dir, *args, warm_steps=3, spg_flags=()):
    flags = ["--warm-start-steps", str(warm_steps), "--cache-dir", str(cache_dir), "--max-steps", "1", "--num-prompts",
             "2", "--eval-n", "8", "--eval-every", "1", "--estimator", "elbo", *spg_flags]
    cmd = [sys.executable, str(ROOT / "bench" / "noise_control.py"), *args, "--", *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)   # a hang guard: ~1 min alone


def test_noise_control_shuffle_quick(tmp_path, warm_cache):
    """The shuffled run and the real run share their first rollouts, so their first losses differ only because the
    rewards were permuted; --adam-eps reaches the RL optimizer; a non-elbo estimator is refused. A 100-step warm
    start (about 50 s; gradient_probe's control run trains the same one) writes closed answers, so that rewards
    differ within a group."""
    runs = {}
    for name, extra in (("shuffled", []), ("real", ["--real"])):
        proc = noise_control(warm_cache, "shuffle", "--out", str(tmp_path / name), *extra, warm_steps=100)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[name] = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])
    assert runs["shuffled"]["reward/mean"] == runs["real"]["reward/mean"] and runs["real"]["reward/std"] > 0
    assert runs["shuffled"]["loss"] != runs["real"]["loss"]
    eps = noise_control(warm_cache, "shuffle", "--out", str(tmp_path / "eps"), spg_flags=["--adam-eps", "1e-4",
                                                                                     "--save-every", "1"])
    assert eps.returncode == 0
    state = torch.load(tmp_path / "eps" / "ckpt_000001" / "state.pt", weights_only=False)
    assert state["optimizer"]["param_groups"][0]["eps"] == 1e-4
    import noise_control as NC                                       # the refusal comes before any training
    args, cfg = NC.parse(["shuffle", "--out", str(tmp_path / "mix"), "--", "--estimator", "mix"])
    with pytest.raises(SystemExit, match="pass `-- --estimator elbo`"):
        NC.run_shuffle(args, cfg)
    assert not (tmp_path / "mix").exists()


def test_noise_control_perturb_quick(warm_cache):
    proc = noise_control(warm_cache, "perturb", "--sigmas", "1e-3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert [x["sigma"] for x in lines] == [0.0, 1e-3] and all(x["n"] == 8 for x in lines)


def test_warm_start_curve_quick():
    """bench/warm_start_curve.py: one line per budget, in order; a bad budget is a clear error."""
    cmd = [sys.executable, str(ROOT / "bench" / "warm_start_curve.py"), "--steps", "2,1", "--eval-n", "8"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert [x["warm_start_steps"] for x in lines] == [1, 2] and all(x["n"] == 8 for x in lines)
    bad = subprocess.run(cmd[:3] + ["0"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and "positive step counts" in bad.stderr


def cell_credit_setup():
    """bench/cell_credit.py, the tiny tokenizer, its digit ids and a puzzle whose cells 0 and 15 are empty."""
    import cell_credit as CC
    tok = M.tiny_tokenizer()
    digit_ids = {str(d): tok.convert_tokens_to_ids(str(d)) for d in range(10)}
    ex = {"puzzle": "0234" + "3412" + "2143" + "432" + "0", "solution": "1234341221434321"}
    return CC, tok, digit_ids, ex


def test_cell_advantages_by_hand():
    """bench/cell_credit.py: each empty cell's correctness minus its group mean, on the token that writes it."""
    CC, tok, digit_ids, ex = cell_credit_setup()
    rows = ["<answer>\n1234341221434321\n</answer>",      # both right
            "<answer>\n4234341221434321\n</answer>",      # cell 0 wrong
            "<answer>\n1234341221434324\n</answer>"]      # cell 15 wrong
    comp = torch.tensor([tok(r, add_special_tokens=False)["input_ids"] for r in rows])      # [3, 20]
    adv = CC.cell_advantages(comp, [ex] * 3, 3, digit_ids)
    cell0, cell15 = CC.FIRST_CELL, CC.FIRST_CELL + 15
    assert adv[:, cell0].tolist() == pytest.approx([1 / 3, -2 / 3, 1 / 3])
    assert adv[:, cell15].tolist() == pytest.approx([1 / 3, 1 / 3, -2 / 3])
    others = torch.ones(20, dtype=torch.bool)
    others[[cell0, cell15]] = False
    assert adv[:, others].abs().sum() == 0                                   # givens and tags get no credit
    assert adv.sum(0).abs().max() < 1e-6                                     # advantages sum to 0 in the group


def test_cell_credit_quick(tmp_path):
    """Two steps from a 3-step warm start: random digits differ between completions, so cells get credit and the
    update runs (grad norm > 0), and the run writes its metrics and before/after evaluations."""
    import cell_credit as CC
    summary = CC.main(["--max-steps", "2", "--warm-start-steps", "3", "--eval-n", "8", "--eval-every", "1",
                       "--cache-dir", str(tmp_path), "--out", str(tmp_path / "run")])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and "eval" in rows[0] and "eval" not in rows[1]   # 2: eval_after
    assert max(r["grad_norm"] for r in rows) > 0
    assert summary["eval_after"]["n"] == 8


def test_rl_variants_few_empties_reach_rl_only(monkeypatch, tmp_path):
    """bench/rl_variants.py few-empties: train()'s training set has the given clue counts; the warm start's set
    and the held-out set keep the published ones, and the module state is restored between the calls."""
    import rl_variants as RV
    import tasks as T
    for name in ("load_train_set", "warm_start_setup"):     # restored by monkeypatch after the test
        monkeypatch.setattr(S, name, getattr(S, name))
    published = T.SUDOKU_CLUES
    RV.rl_clue_counts([12, 13])
    cfg = S.parse_config(["--task", "sudoku", "--model", "tiny"])
    tok = M.tiny_tokenizer()
    rl_set = S.load_train_set(cfg, tok, "tiny")
    assert {16 - ex["puzzle"].count("0") for ex in rl_set} == {12, 13} and T.SUDOKU_CLUES is published
    warm_set, _, _ = S.warm_start_setup(M.tiny_model(len(tok)), tok, cfg, "tiny")
    assert {16 - ex["puzzle"].count("0") for ex in warm_set} == set(published)
    assert T.SUDOKU_CLUES is published
    assert {16 - ex["puzzle"].count("0") for ex in S.load_train_set(cfg, tok, "tiny")} == {12, 13}   # still RL's
    with pytest.warns(UserWarning, match="stand-in"):    # no published file there: generated like the test set
        generated = T.load_eval("sudoku", str(tmp_path))
    assert {16 - ex["puzzle"].count("0") for ex in generated} <= set(published) and len(generated) == 256
    assert RV.clue_counts("12,13") == [12, 13]
    for bad in ("4", "15", "16", "12,x", ""):    # 4 or 15 clues: too few unique puzzles for some grids (would hang)
        with pytest.raises(argparse.ArgumentTypeError):
            RV.clue_counts(bad)


def test_rl_variants_kl_anchor_adds_the_k3_kl(monkeypatch, tiny):
    """bench/rl_variants.py kl-anchor: at the warm start the loss is SPG's exactly; after the weights move, the
    patched loss is SPG's plus beta x the k3 KL to the warm start over the masked completion tokens, computed here
    from the two models' log-probs, and its gradient is SPG's plus that term's."""
    import rl_variants as RV
    for name in ("sft_warm_start", "sequence_bounds", "spg_loss"):     # restored by monkeypatch after the test
        monkeypatch.setattr(S, name, getattr(S, name))
    plain_bounds, plain_loss = S.sequence_bounds, S.spg_loss
    monkeypatch.setattr(S, "sft_warm_start", lambda model: None)     # the reference is taken right after it
    _, tok, mask_id, _, _ = tiny
    net = M.tiny_model(len(tok), seed=1)
    beta_kl, m, Lg = 0.5, 2, 8
    RV.kl_anchor(beta_kl)
    S.sft_warm_start(net)
    gen = torch.Generator().manual_seed(3)
    seqs = torch.randint(5, len(tok), (4, 6 + Lg), generator=gen)
    attn, c = torch.ones_like(seqs), torch.ones(4, Lg, dtype=torch.bool)
    c[1, 5:] = False
    masked, t = S.block_forward_process(c, 6, m=m, block_length=4, p_mask_prompt=0.0, generator=gen)
    adv, num_tokens = torch.tensor([0.5, -0.2, -0.3, 0.1]), c.sum() + 9     # a micro-batch of a larger batch
    kw = dict(beta=1.0, mask_id=mask_id)

    def both(fn_bounds, fn_loss):
        net.zero_grad()
        loss, stats = fn_loss(adv, *fn_bounds(net, seqs, attn, c, masked, t, **kw), num_tokens=num_tokens)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in net.parameters()], stats

    patched, plain = both(S.sequence_bounds, S.spg_loss), both(plain_bounds, plain_loss)
    assert patched[0] == plain[0] and patched[2]["kl_anchor/kl"] == 0.0                  # the same weights: KL = 0
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(patched[1], plain[1]))
    with torch.no_grad():
        ref = S.masked_logprobs(M.tiny_model(len(tok), seed=1), seqs, attn, masked, mask_id=mask_id, Lg=Lg)
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    patched, plain = both(S.sequence_bounds, S.spg_loss), both(plain_bounds, plain_loss)
    net.zero_grad()
    d = ref - S.masked_logprobs(net, seqs, attn, masked, mask_id=mask_id, Lg=Lg)         # [4, m, Lg]
    counted = masked[..., -Lg:] & c[:, None]
    kl = ((torch.exp(d) - d - 1) * counted).sum() / (m * num_tokens)
    kl.backward()
    assert kl > 1e-4 and torch.isclose(patched[0], plain[0] + beta_kl * kl.detach(), rtol=1e-5)
    assert all(torch.allclose(a, b + beta_kl * p.grad, atol=1e-6) for a, b, p in zip(patched[1], plain[1],
                                                                                        net.parameters()))


def test_rl_variants_kl_anchor_quick(tmp_path, monkeypatch, capsys):
    """kl-anchor end to end from an uncached warm start (whose own steps call the bounds before any reference
    exists): two RL steps of 2 inner updates log a finite KL > 0 (the weights have moved from the reference by the
    last update); with --estimator d1, which has its own KL, it refuses to run. A 3-step warm start earns no
    reward, so the in-process run swaps in one that differs between completions, as the ablation's quick test."""
    import rl_variants as RV
    import tasks as T
    for name in ("sft_warm_start", "sequence_bounds", "spg_loss"):     # restored by monkeypatch after the test
        monkeypatch.setattr(S, name, getattr(S, name))
    varied = lambda text, ex: (zlib.crc32(text.encode()) % 101) / 100
    sudoku = dataclasses.replace(T.TASKS["sudoku"], reward_funcs=(("varied", varied, 1.0),))
    monkeypatch.setitem(T.TASKS, "sudoku", sudoku)
    flags = ["kl-anchor", "--kl-beta", "0.5", "--out", str(tmp_path / "run"), "--", "--cache-dir", str(tmp_path),
             "--max-steps", "2", "--num-prompts", "2", "--eval-n", "8", "--eval-every", "0", "--warm-start-steps", "3"]
    RV.main(flags)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["grad_norm"] > 0 and math.isfinite(r["loss"]) for r in rows)
    assert all(math.isfinite(r["kl_anchor/kl"]) and r["kl_anchor/kl"] > 0 for r in rows)
    with pytest.raises(SystemExit) as refused:
        RV.parse(flags + ["--estimator", "d1"])
    assert refused.value.code == 2 and "--d1-beta-kl" in capsys.readouterr().err


@pytest.mark.parametrize("variant", ["lora", "frozen-embeddings"])
def test_rl_variants_quick(tmp_path, variant):
    """One RL step after a 3-step warm start: the trainable weights are the adapters (r x (in + out) per linear
    layer, head excluded) or everything but the embeddings and head, and the checkpoint saves exactly those. The
    change comes after the warm start: the cached warm start is a plain model whose embeddings were trained."""
    tok = M.tiny_tokenizer()
    net = M.tiny_model(len(tok))
    linears = [m for n, m in net.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    expected = {"lora": sum(16 * (m.in_features + m.out_features) for m in linears),
                "frozen-embeddings": sum(p.numel() for p in net.parameters())
                - net.get_input_embeddings().weight.numel() - net.get_output_embeddings().weight.numel()}[variant]
    script = [sys.executable, str(ROOT / "bench" / "rl_variants.py"), variant, "--out", str(tmp_path / "run"), "--",
              "--cache-dir", str(tmp_path), "--max-steps", "1", "--num-prompts", "2", "--eval-n", "8",
              "--eval-every", "0"]
    proc = subprocess.run(script + ["--warm-start-steps", "3"], capture_output=True, text=True, timeout=600,
                          cwd=ROOT)    # a hang guard: ~30 s alone
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{expected:,} trainable weights" in proc.stdout
    state = torch.load(tmp_path / "run" / "ckpt_000001" / "state.pt", weights_only=False)
    assert sum(v.numel() for v in state["model"].values()) == expected
    [cached] = tmp_path.glob("warm_sudoku_tiny_L24_s3_*.pt")
    warm = torch.load(cached)
    assert warm.keys() == net.state_dict().keys()                                           # no adapters in it
    assert not torch.equal(warm["model.embed_tokens.weight"], net.get_input_embeddings().weight)   # trained
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["variant"] == variant and result["after"]["n"] == 8
    recorded = json.loads((tmp_path / "run" / "summary.json").read_text())["config"]
    assert (recorded["lora_rank"], recorded["lora_alpha"]) == {"lora": (16, 32), "frozen-embeddings": (0, 0)}[variant]
    refused = subprocess.run(script + ["--warm-start-steps", "0"], capture_output=True, text=True, timeout=120,
                             cwd=ROOT)
    assert refused.returncode == 2 and "--warm-start-steps 0" in refused.stderr


# ---- the fifth mutation audit's survivors: each test below fails under the bug its comment names

def decoder_batch_sizes(net, fn):
    """fn()'s output and the batch size of each decoder call."""
    sizes = []
    decoder, _ = M.decoder_and_head(net)
    handle = decoder.register_forward_pre_hook(
        lambda mod, args, kw: sizes.append(len(kw["input_ids"] if "input_ids" in kw else args[0])), with_kwargs=True)
    out = fn()
    handle.remove()
    return out, sizes


@pytest.mark.parametrize("kv_cache", ["prefix", "dual"])
def test_rows_that_leave_take_only_their_own_cache(tiny, kv_cache):
    """Under a threshold, rows done with a block leave the batch and the cache keeps exactly the others' rows:
    each row decodes as that prompt alone (at threshold 0.017 three of these four rows finish block 1 at once)."""
    net, tok, mask_id, _, _ = tiny
    prompts = ["abc", "hello there", "2+2=", "Sudoku 0310200404001043"]
    ids, attn = S.encode_prompts(tok, prompts)
    kw = dict(GEN, temperature=0.0, mask_id=mask_id, threshold=0.017, kv_cache=kv_cache)
    out, sizes = decoder_batch_sizes(net, lambda: S.generate(net, ids, attn, **kw))
    assert sizes[:4] == [4, 1, 1, 1]                                  # the three leave after the first call
    for row, prompt in enumerate(prompts):
        alone_ids, alone_attn = S.encode_prompts(tok, [prompt])
        assert torch.equal(S.generate(net, alone_ids, alone_attn, **kw)[0, -24:], out[row, -24:]), row


def test_threshold_zero_is_a_threshold(tiny):
    """threshold=0.0 commits every masked position whose confidence is above 0: one call per block (3), not the
    schedule's 12 (a falsy test would drop it)."""
    net, tok, mask_id, _, _ = tiny
    ids, attn = S.encode_prompts(tok, ["abc", "de"])
    _, calls = run(net, ids, attn, mask_id, threshold=0.0)
    assert calls == 3


def test_threshold_is_strict():
    """Fast-dLLM commits confidence > threshold: a confidence exactly at the threshold waits for the schedule."""
    mask_id = 4
    sure, unsure = torch.tensor([9.0, 0, 0, 0, 0]), torch.tensor([1.0, 0.9, 0.8, 0, 0])
    calls = []
    net = torch.nn.Module()
    net.model = torch.nn.Module()
    net.model.forward = lambda input_ids, attention_mask=None, position_ids=None: (calls.append(1), types.SimpleNamespace(
        last_hidden_state=(input_ids != mask_id).float()[..., None]))[1]
    net.lm_head = lambda h: torch.where(h == 1, sure, unsure)          # a masked position's logits: unsure
    logits = unsure.clone()
    logits[mask_id] = -math.inf
    at = logits.softmax(-1)[0].item()                                  # a masked position's confidence, exactly
    S.generate(net, torch.tensor([[1]]), torch.ones(1, 1, dtype=torch.long), gen_length=4, block_length=4, steps=4,
               temperature=0.0, mask_id=mask_id, threshold=at)
    assert len(calls) == 4                                             # the schedule's 4 steps, one token each


def test_cell_advantages_of_two_groups_and_a_wrong_given():
    """Two groups of 2: each group's own mean; a wrong given cell earns nothing."""
    CC, tok, digit_ids, ex = cell_credit_setup()
    rows = ["<answer>\n1234341221434321\n</answer>", "<answer>\n4234341221434321\n</answer>",   # group 0
            "<answer>\n1334341221434321\n</answer>", "<answer>\n1234341221434321\n</answer>"]   # group 1: given 1 wrong
    comp = torch.tensor([tok(r, add_special_tokens=False)["input_ids"] for r in rows])
    adv = CC.cell_advantages(comp, [ex] * 4, 2, digit_ids)
    assert adv[:, CC.FIRST_CELL].tolist() == [0.5, -0.5, 0.0, 0.0]
    assert adv[:, CC.FIRST_CELL + 1].abs().sum() == 0


def test_ablation_reads_the_final_evaluation_and_prints_the_range(tmp_path):
    import ablation as A
    (tmp_path / "summary.json").write_text(json.dumps({"eval_before": {"accuracy": 50.0},
                                                       "eval_after": {"accuracy": 58.0}, "steps": 4}))
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(
        {"step": s, "reward/mean": 0.1 * s, **({"eval": {"accuracy": 52.0}} if s == 2 else {})}) for s in (1, 2, 3, 4)))
    assert A.read_run(tmp_path)["evals"] == [(0, 50.0), (2, 52.0), (4, 58.0)]
    args = A.parse_args(["--seeds", "2", "--out", str(tmp_path)])
    s = A.seed_summary([{"before": 50.0, "after": 52.0, "evals": [(0, 50.0)], "reward": [0.0]},
                        {"before": 50.0, "after": 58.0, "evals": [(0, 50.0)], "reward": [0.0]}], 5.0)
    assert "| 55.0 [52.0, 58.0] | +5.0 |" in A.markdown({(args.task_list[0], args.config_list[0]): s}, 5.0, args)


def test_memory_estimate_term_by_term():
    """Each term for LLaDA-8B at the single-GPU defaults (P 200 + Lg 256, micro-batch 2 x m 2), by hand."""
    import memory as MEM
    d, n, f, V, GB = 4096, 32, 12288, 126464, 2 ** 30
    est = list(MEM.estimate(MEM.LLADA_8B_SHAPES, S.parse_config(["--task", "gsm8k"]), 200).values())
    by_hand = [n * (4 * d * d + 3 * d * f) * (4 + 8 / 64 + 32 / 16384) / 8 / GB,   # NF4 + double-quant constants
               2 * V * d * 4 / GB,                                          # embeddings and head, float32
               n * 128 * (2 * d * 3 + d + f) * 4 * 4 / GB,                    # LoRA r 128 on q, k, v, up: w, g, 2 Adam
               34 * d * 2 * 2 * (200 + 256) * n / GB,                        # activations
               S.LOGP_CHUNK_BYTES * (1 + 8 / 66) / GB]                      # a chunk of 66 rows + logsumexp's 8
    assert est == pytest.approx(by_hand, abs=1e-9)
    fixture = ROOT.parent / "shared" / "fixtures" / "llada_tiny"
    if fixture.is_dir():                                                     # a local dir's shapes win
        assert MEM.shapes(str(fixture))["d_model"] == json.loads((fixture / "config.json").read_text())["d_model"]


def test_plot_reads_every_kind_of_run(tmp_path):
    """bench/plot_curves.py: before / periodic / after evaluations in order; a bare checkpoint's resume evaluation
    at its step; a run with no evaluation yet plots its rewards (it crashed on unpacking)."""
    import plot_curves as PC

    def run(name, summary, rows):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps({"config": {"temperature": 1.0}, **summary}))
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        return tmp_path / name
    rows = [{"step": 1, "reward/mean": 0.1}, {"step": 2, "reward/mean": 0.2, "eval": {"accuracy": 45.0}}]
    full = run("full", {"eval_before": {"accuracy": 40.0}, "eval_after": {"accuracy": 50.0}, "steps": 2}, rows)
    assert PC.read_run(full) == ([1, 2], [0.1, 0.2], 1.0, (0, 2, 2), (40.0, 45.0, 50.0))
    after_only = run("after_only", {"eval_after": {"accuracy": 40.0}, "steps": 2}, rows[:1])
    assert PC.read_run(after_only)[3:] == ((2,), (40.0,))
    resumed = run("resumed", {"eval_at_resume": {"step": 1, "accuracy": 30.0}}, [{"step": 2, "reward/mean": 0.1}])
    assert PC.read_run(resumed)[3:] == ((1,), (30.0,))
    nothing = run("nothing", {}, [{"step": 1, "reward/mean": 0.1}])
    assert PC.read_run(nothing) == ([1], [0.1], 1.0, (), ())
    subprocess.run([sys.executable, str(ROOT / "bench" / "plot_curves.py"), str(full), str(nothing), "--out",
                    str(tmp_path / "c.png")], check=True, capture_output=True, timeout=120)
    assert (tmp_path / "c.png").stat().st_size > 1000


# ---- the sixth mutation audit's survivors: each test below fails under the bug its comment names

def test_warm_start_curve_trains_each_budget_once(monkeypatch):                       # B8
    import warm_start_curve as W
    done, seen = [0], []
    monkeypatch.setattr(S, "sft_step", lambda *a, **k: done.__setitem__(0, done[0] + 1) or 0.5)
    monkeypatch.setattr(S, "evaluate", lambda *a, **k: (seen.append(done[0]) or ({"accuracy": 0.0, "n": 1}, [])))
    monkeypatch.setattr(sys, "argv", ["warm_start_curve.py", "--steps", "3,1", "--eval-n", "1"])
    W.main()
    assert seen == [1, 3]


def test_rl_variants_accept_the_ends_of_the_clue_range():                            # B11
    import rl_variants as RV
    assert RV.clue_counts(f"{RV.MIN_CLUES},{RV.MAX_CLUES}") == [5, 14]


def test_decode_work_per_token_by_hand():                                             # D1
    import decode as D
    assert D.work_per_token([(16, 70)] * 12, 16, 70) == (0.5, 0.5)
    assert D.work_per_token([(8, 70), (16, 10)], 16, 70) == (2 / 24, (8 * 70 + 16 * 10) / (16 * 70 * 24))


def test_perturb_adds_each_sigma_to_the_warm_start_not_to_the_last_draw(monkeypatch):  # B3
    import noise_control as NC
    monkeypatch.setattr(S, "sft_warm_start", lambda *a, **k: None)
    warm, stds = {}, []

    def evaluate(model, *a, **k):
        sd = model.state_dict()
        if not warm:
            warm.update({n: v.clone() for n, v in sd.items()})
        stds.append(torch.cat([(sd[n] - warm[n]).flatten() for n in sd if sd[n].is_floating_point()]).std().item())
        return {"accuracy": 0.0, "n": 1}, []
    monkeypatch.setattr(S, "evaluate", evaluate)
    args, cfg = NC.parse(["perturb", "--sigmas", "1e-3,1e-3", "--", "--eval-n", "1"])
    NC.run_perturb(args, cfg)
    assert stds[0] == 0.0 and stds[1:] == pytest.approx([1e-3, 1e-3], rel=0.05)


def test_gradient_probe_reports_the_pairwise_cosine_without_the_diagonal(tmp_path, monkeypatch, capsys):  # G2
    """Batch gradients made exactly opposite (+1 and -1 on every weight): the pairwise cosine is -1."""
    import gradient_probe as GP
    nets, calls, bounds = [], [0], S.sequence_bounds
    monkeypatch.setattr(S, "sequence_bounds", lambda net, *a, **k: (nets.append(net) or bounds(net, *a, **k)))

    def opposite(adv, elbo_b, eubo_b, **kw):
        calls[0] += 1
        return 0 * elbo_b.sum() + (-1) ** calls[0] * sum(p.sum() for p in nets[-1].parameters()), {}
    monkeypatch.setattr(S, "spg_loss", opposite)
    GP.main(["--quick", "--cache-dir", str(tmp_path), "--warm-start-steps", "1"])
    assert "cos -1.000 |" in capsys.readouterr().out


def test_gradient_probe_sft_raises_the_elbo_of_its_batch(tmp_path, monkeypatch):      # G4
    import gradient_probe as GP
    seen, bounds = [], S.sequence_bounds

    def record(net, *a, **k):
        out = bounds(net, *a, **k)
        seen.append((net, a, k, out[0].detach().sum().item()))
        return out
    monkeypatch.setattr(S, "sequence_bounds", record)
    GP.main(["--quick", "--sft", "--sft-steps", "1", "--lr", "1e-3", "--cache-dir", str(tmp_path),
             "--warm-start-steps", "1"])
    net, a, k, before = seen[-1]                          # the last update's batch, after that update
    with torch.no_grad():
        after = bounds(net, *a, **k)[0].sum().item()
    assert after > before


def test_the_real_comparison_run_takes_any_estimator(monkeypatch, tmp_path):          # B5
    """Only the shuffled control needs --estimator elbo; the --real run is the comparison and runs as asked."""
    import noise_control as NC
    ran = []
    monkeypatch.setattr(S, "train", lambda cfg: ran.append(cfg.estimator) or {"eval_before": {}, "eval_after": {}})
    args, cfg = NC.parse(["shuffle", "--real", "--out", str(tmp_path / "r"), "--", "--estimator", "mix"])
    NC.run_shuffle(args, cfg)
    assert ran == ["mix"]
    with pytest.raises(SystemExit, match="--estimator elbo"):
        NC.run_shuffle(*NC.parse(["shuffle", "--out", str(tmp_path / "s"), "--", "--estimator", "mix"]))


def test_kl_anchor_logs_the_kl_per_counted_token(monkeypatch, tiny):                 # RV1
    import rl_variants as RV
    for name in ("sft_warm_start", "sequence_bounds", "spg_loss"):
        monkeypatch.setattr(S, name, getattr(S, name))
    monkeypatch.setattr(S, "sft_warm_start", lambda model: None)
    _, tok, mask_id, _, _ = tiny
    net = M.tiny_model(len(tok), seed=1)
    RV.kl_anchor(0.5)
    S.sft_warm_start(net)
    gen = torch.Generator().manual_seed(3)
    Lg, m = 8, 2
    seqs = torch.randint(5, len(tok), (2, 6 + Lg), generator=gen)
    attn, c = torch.ones_like(seqs), torch.ones(2, Lg, dtype=torch.bool)
    c[1, 4:] = False
    masked, t = S.block_forward_process(c, 6, m=m, block_length=4, p_mask_prompt=0.0, generator=gen)
    with torch.no_grad():
        ref = S.masked_logprobs(M.tiny_model(len(tok), seed=1), seqs, attn, masked, mask_id=mask_id, Lg=Lg)
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
        d = ref - S.masked_logprobs(net, seqs, attn, masked, mask_id=mask_id, Lg=Lg)
    counted = masked[..., -Lg:] & c[:, None]
    expected = ((torch.exp(d) - d - 1) * counted).sum() / counted.sum()
    _, stats = S.spg_loss(torch.tensor([0.5, -0.5]), *S.sequence_bounds(net, seqs, attn, c, masked, t, beta=1.0,
                                                                          mask_id=mask_id), num_tokens=c.sum())
    assert stats["kl_anchor/kl"] == pytest.approx(expected.item(), rel=1e-5)
