"""Evaluate a model the paper's way: greedy, block 32, steps = length / 2, at several generation lengths.

    python eval.py --task gsm8k --model GSAI-ML/LLaDA-8B-Instruct --adapter runs/gsm8k/ckpt_001500
    python eval.py --task sudoku --model tiny --adapter runs/demo/ckpt_000050 --gen-lengths 24 --block-length 8

--adapter is a checkpoint directory written by spg_min.py or scale/train.py (its trainable weights: the LoRA
adapter, or all weights of the tiny model). LLaDA is evaluated as the paper does: a bf16 base (not 4-bit) plus
the adapter. Writes every generation with its extracted answer and credit to OUT/generations_<task>_<L>.jsonl,
and the accuracy table to OUT/results_<task>.md. The decoding protocol is the paper's; answers are read by tasks.py,
whose parsing departs from the reference's where that loses answers (README "Deviations" 8).
"""
import argparse
import json
from pathlib import Path

import torch

import spg_min as S
import tasks as T


def load_for_eval(model_name: str, adapter: str | None, vocab_size: int):
    """The model to evaluate, in eval mode: tiny or LLaDA (bf16 on GPU, float32 on CPU) with the adapter's weights."""
    import model as M
    state = torch.load(Path(adapter) / "state.pt", map_location="cpu", weights_only=False) if adapter else None
    if model_name == "tiny":
        net = M.tiny_model(vocab_size)
    else:
        net = M.load_llada(model_name, load_in_4bit=False)
        if adapter:                                        # LoRA of the rank and alpha the run trained with
            trained = state.get("config", {})
            net = M.add_lora(net, r=trained.get("lora_rank", S.Config.lora_rank),
                             alpha=trained.get("lora_alpha", S.Config.lora_alpha), dropout=0.0)
    if adapter:
        keys = net.load_state_dict(state["model"], strict=False)
        absent = [k for k in keys.missing_keys if "lora_" in k]
        if keys.unexpected_keys or absent:
            raise T.UsageError(f"--adapter {adapter} does not fit this model (unexpected "
                             f"{keys.unexpected_keys[:3]}, absent {absent[:3]}); pass the --model it was trained on")
    return net.eval()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--task", required=True, choices=["gsm8k", "math", "countdown", "sudoku"])
    p.add_argument("--model", default="GSAI-ML/LLaDA-8B-Instruct",
                   help="hub id, local LLaDA dir, or tiny [%(default)s]")
    p.add_argument("--adapter", default=None, help="a checkpoint directory (ckpt_*) of a run; without it, the base "
                                                   "model as loaded (the tiny model: untrained)")
    p.add_argument("--gen-lengths", type=int, nargs="+", default=[128, 256, 512],
                   help="completion lengths, one evaluation each [128 256 512]")
    p.add_argument("--block-length", type=int, default=32, help="[%(default)s]; the tiny model's runs use 8")
    p.add_argument("--batch", type=int, default=8, help="problems decoded at once [%(default)s]")
    p.add_argument("--n", type=int, default=None, help="evaluate a random N of the problems (drawn with --seed)")
    p.add_argument("--seed", type=int, default=S.Config.seed,
                   help="draws the --n sample; the default is training's, so --n 256 scores its periodic-eval set")
    p.add_argument("--data-dir", default=None, help="local data laid out like ../shared/data")
    p.add_argument("--eval-file", default=None, help="evaluate on this file instead of the published test set")
    p.add_argument("--out", default="runs/eval", help="[%(default)s]")
    args = p.parse_args(argv)
    for length in args.gen_lengths:                   # in eval.py's own flags (validate() below names Config fields)
        blocks = length // args.block_length if args.block_length > 0 else 0
        if length < 1 or blocks < 1 or length % args.block_length or (length // 2) % blocks:
            p.error(f"--gen-lengths {length} with --block-length {args.block_length}: each length must be a multiple "
                    "of the block length, and half of it (the decoding steps) a multiple of the number of blocks")
    if args.batch < 1:
        p.error(f"--batch {args.batch}: decode at least 1 problem at a time")
    cfg0 = S.Config(task=args.task, model=args.model, eval_batch=args.batch, block_length=args.block_length,
                    eval_file=args.eval_file)
    configs = [S.Config(**{**vars(cfg0), "gen_length": length, "steps": length // 2}) for length in args.gen_lengths]
    try:                                              # every check before the model loads and the first length runs
        for cfg in configs:
            S.validate(cfg)
        if args.adapter and not (Path(args.adapter) / "state.pt").is_file():
            raise T.UsageError(f"--adapter {args.adapter} holds no state.pt: pass a checkpoint directory of a run")
    except ValueError as err:                         # validate() names the Config field
        p.error(str(err))
    try:
        tok, style, ids = S.load_tokenizer(cfg0)
        examples = T.load_eval(args.task, args.data_dir, eval_file=args.eval_file, n=args.n, seed=args.seed)
        if args.model == "tiny" and not args.adapter:
            print("eval.py: no --adapter: scoring the untrained tiny model (pass a run's ckpt_* directory)")
        net = load_for_eval(args.model, args.adapter, len(tok))
    except T.UsageError as err:                       # bad input, not a traceback; a library's own error still has one
        p.error(str(err))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    task, table = T.get_task(args.task), []
    for cfg in configs:
        length = cfg.gen_length
        metrics, rows = S.evaluate(net, tok, task, examples, cfg, style=style, mask_id=ids["mask"],
                                   stop_ids=(ids["eos"], ids["eot"]), desc=f"{args.task} L={length}")
        with open(out / f"generations_{args.task}_{length}.jsonl", "w") as f:
            for ex, row in zip(examples, rows):
                f.write(json.dumps({**row, "answer": task.answer(row["completion"]),
                                    "example": ex}) + "\n")
        table.append((length, metrics))
        print(f"{args.task} L={length}: {metrics}")
    keys = list(table[0][1])
    lines = ["| length | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {length} | " + " | ".join(f"{m[k]:.2f}" if isinstance(m[k], float) else str(m[k]) for k in keys)
              + " |" for length, m in table]
    (out / f"results_{args.task}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
