"""Where greedy worked solutions of synthetic chains first go wrong: a diagnostic for a warm-up's checkpoint.

    python benchmarks/chain_errors.py --model runs/compare_long/hf_seed1 --config configs/compare_long.yaml

Each held-out problem (the config's eval stream for --seed) is decoded greedily and its solution lines are
checked against the question in order; the first wrong line is classed as
  copy      a restated number (the starting count, or a step's amount) differs from the question's: the copy
            of a number from the question failed,
  operand   the line uses the wrong operand or operation (the lookup of the step in the question failed),
  carry     its left-hand side is not the running total so far,
  arith     the operation is right but the result is not (off by one in the last step, the demonstrator's
            mistake, is counted apart),
  format    fewer or more lines than steps, or no line where one is due.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nested_reft_ds.config import load_config  # noqa: E402
from nested_reft_ds.data import problems_from_config  # noqa: E402
from nested_reft_ds.data.templates import format_prompt  # noqa: E402
from nested_reft_ds.model import load_model_and_tokenizer  # noqa: E402

STEP = re.compile(r"(gets|gives away) (\d+)")
START = re.compile(r"has (\d+)")
LINE = re.compile(r"(\d+)([+-])(\d+)=(\d+)\.")


def first_error(question: str, completion: str) -> str:
    total = int(START.search(question).group(1))
    steps = STEP.findall(question)
    lines = LINE.findall(completion)
    # A restated solution ("Ann has 7 pens. (a) Ann gets 5 more: 7+5=12.") copies numbers from the question
    # before using them; a wrong copy is where such a solution first goes wrong.
    restated_start = START.search(completion)
    if restated_start and int(restated_start.group(1)) != total:
        return "copy"
    restated_steps = STEP.findall(completion)
    for index, (verb, amount) in enumerate(steps):
        if index >= len(lines):
            return "format"
        if index < len(restated_steps) and restated_steps[index] != (verb, amount):
            return "copy"
        left, op, operand, result = lines[index]
        if int(left) != total:
            return "carry"
        if op != ("+" if verb == "gets" else "-") or operand != amount:
            return "operand"
        total = total + int(amount) if op == "+" else total - int(amount)
        if int(result) != total:
            return "off_by_one_last" if index == len(steps) - 1 and int(result) == total + 1 else "arith"
    return "format" if len(lines) != len(steps) else "correct"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="Hugging Face model directory (nested-reft export)")
    parser.add_argument("--config", required=True, help="the experiment config whose held-out problems to decode")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, as for nested-reft train (repeatable)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--output", help="write the counts and every completion as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config, [*args.set, f"train.seed={args.seed}"])
    _, held_out = problems_from_config(cfg.data, args.seed)
    model, tokenizer = load_model_and_tokenizer(Path(args.model), attn_implementation="sdpa")
    model.eval()
    prompts = [format_prompt(p.question, tokenizer, cfg.data.prompt_template) for p in held_out]
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**encoded, max_new_tokens=args.max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    completions = tokenizer.batch_decode(out[:, encoded.input_ids.shape[1]:], skip_special_tokens=True)
    kinds = [first_error(p.question, c) for p, c in zip(held_out, completions)]
    counts = Counter(kinds)
    print(f"{len(held_out)} held-out problems, greedy: " + ", ".join(f"{k} {counts[k]}" for k in
          ("correct", "copy", "operand", "carry", "arith", "off_by_one_last", "format")))
    if args.output:
        Path(args.output).write_text(json.dumps({"counts": dict(counts), "completions": [
            {"question": p.question, "completion": c, "first_error": k}
            for p, c, k in zip(held_out, completions, kinds)]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
