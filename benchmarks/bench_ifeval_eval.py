"""One evaluation of the shipped IFEval held-out prompts with SmolLM2-135M-Instruct: wall and CPU time, and where
the time goes (greedy generation vs judging), plus generation after a model is left in a trained state
(train mode, ``use_cache=False``, gradient checkpointing on) as the ratio to the fresh model, measured in the
same run.

    python benchmarks/bench_ifeval_eval.py --threads 1 [--num_prompts 300] [--max_new_tokens 48]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

from trl_refpo.research import ifeval_eval  # noqa: E402
from trl_refpo.research.ifeval_data import load_policy  # noqa: E402


def timed(function):
    wall, cpu = time.perf_counter(), time.process_time()
    result = function()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="offline:smollm2-135m-instruct")
    parser.add_argument("--num_prompts", type=int, default=300)
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--trained_state_prompts",
        type=int,
        default=16,
        help="prompts for the fresh vs trained-state generation ratio (0: skip)",
    )
    parser.add_argument("--output", default=None, help="write the report's dict and the timings as JSON")
    cli = parser.parse_args(argv)
    if cli.threads:
        torch.set_num_threads(cli.threads)
    model, tokenizer = load_policy(cli.model)
    rows = list(ifeval_eval.load_ifeval_split("heldout"))[: cli.num_prompts]
    judge_seconds = []
    real_judge = ifeval_eval.judge

    def counted_judge(*args, **kwargs):
        start = time.perf_counter()
        try:
            return real_judge(*args, **kwargs)
        finally:
            judge_seconds.append(time.perf_counter() - start)

    ifeval_eval.judge = counted_judge
    report, wall, cpu = timed(
        lambda: ifeval_eval.evaluate_policy(
            model, tokenizer, rows, batch_size=cli.batch_size, max_new_tokens=cli.max_new_tokens
        )
    )
    ifeval_eval.judge = real_judge
    timings = {
        "prompts": len(rows),
        "max_new_tokens": cli.max_new_tokens,
        "wall_s": wall,
        "cpu_s": cpu,
        "judge_s": sum(judge_seconds),
        "generated_tokens": sum(p["reply_tokens"] for p in report.per_prompt),
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
    }
    print(report.table())
    if cli.trained_state_prompts:
        subset = rows[: cli.trained_state_prompts]
        _, fresh, fresh_cpu = timed(
            lambda: ifeval_eval.evaluate_policy(
                model, tokenizer, subset, batch_size=cli.batch_size, max_new_tokens=cli.max_new_tokens, progress=False
            )
        )
        model.activation_checkpointing_enable()
        model.config.use_cache = False
        model.train()
        _, trained, trained_cpu = timed(
            lambda: ifeval_eval.evaluate_policy(
                model, tokenizer, subset, batch_size=cli.batch_size, max_new_tokens=cli.max_new_tokens, progress=False
            )
        )
        timings.update(fresh_state_s=fresh, trained_state_s=trained, trained_over_fresh_cpu=trained_cpu / fresh_cpu)
    print(json.dumps(timings, indent=1))
    if cli.output:
        with open(cli.output, "w") as f:
            json.dump({"report": report.to_dict(), "timings": timings}, f, indent=1)


if __name__ == "__main__":
    main()
