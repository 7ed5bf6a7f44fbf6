"""Streaming (asynchronous) vs. synchronous GRPO at equal trained samples, on long-tailed responses.

Task: chained sums answered step by step (tidal/tasks/chain.py): "3+5+9+2=" -> "8+9=17+2=19". The
number of additions per problem is ceil(lognormal(0, sigma)) capped at --max-additions; by default
sigma 1.5 and 24, so the right answers are 2-129 tokens, EOS included: median 6, mean 14, 90th
percentile 36, 99th 120 (training split), and responses are capped at --max-new-tokens 160. A
synchronous step waits for its longest sample; a streaming rollout keeps generating while the
trainer trains. `--sigma 1 --max-additions 10 --max-new-tokens 48` is the short-tailed setting in
which the trainer, not generation, takes most of a step (benchmarks/README.md has both).

Model: the quickstart's tiny Qwen2 (4 layers, hidden 256, fp32) with a supervised warm-up on the
default chain task's training split (`--sft-steps`, lr 1e-3, batch 32, chains of at most 3
additions), so that rewards start non-trivial; on longer chains it writes long, often wrong or
rambling (to the cap) responses, which is the long tail.
Built once, before any timed run, and shared by all runs.

Runs, each in its own process with its own Ray cluster, same prompts (data seed = run seed), same
steps x prompts x samples (so the same number of trained samples), same optimizer:
  sync               one pool, 1 worker with 2 CPUs (actor and rollout colocated)
  free_s1, free_s2   trainer.mode=streaming, free schedule, max_staleness 1 / 2; two pools of
                     1 worker x 1 CPU each (the same 2 CPUs in total)
  deterministic_s1   streaming, deterministic schedule, max_staleness 1
Order: all variants for seed 0, then in reverse order for seed 1, and so on (alternating), so that
slow drifts of the shared machine's load hit every variant alike.

Timed wall (see _async_run.py): the sum of perf/step_s over the steps after the first
--warmup-steps (default 2), i.e. steady state at equal trained samples; model building, Ray start,
evaluations and the warm-up steps' one-off costs are outside it (reported as warmup_s, eval0_s and
process_s per run). Speedups are ratios of timed walls summed over the seeds:
speedup_s1 = sync wall / free_s1 wall. Held-out reward = greedy exact match on the validation
split after the last step (`val/reward`), averaged over the seeds; with two seeds the spread
between them (reported) is the noise.

    python benchmarks/async_vs_sync.py            # 2 seeds x 4 variants, 2 + 8 steps of 8 x 8; ~10-15 min
    python benchmarks/async_vs_sync.py --quick    # sync and free_s1, 1 seed, 1 + 2 steps of 4 x 4; ~2-3 min

The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the _helpers beside this file

from _async_run import VARIANTS, summarise  # noqa: E402
from _report import machine_info  # noqa: E402

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 3 steps of 4 prompts x 4")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per variant (default 2; --quick 1)")
    parser.add_argument(
        "--steps", type=int, default=None, help="trained steps per run (default 10; --quick 3)"
    )
    parser.add_argument(
        "--warmup-steps", type=int, default=None, help="untimed first steps (default 2; --quick 1)"
    )
    parser.add_argument("--prompts-per-step", type=int, default=None, help="default 8 (--quick 4)")
    parser.add_argument("--n", type=int, default=None, help="samples per prompt (default 8; --quick 4)")
    parser.add_argument("--sft-steps", type=int, default=200, help="supervised warm-up steps of the model")
    parser.add_argument(
        "--max-additions", type=int, default=24, help="longest chain of the RL prompts (default 24)"
    )
    parser.add_argument(
        "--sigma", type=float, default=1.5, help="lognormal sigma of the chain lengths (default 1.5)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=160, help="response cap (default 160)")
    parser.add_argument(
        "--off-policy",
        default=None,
        help="algorithm.off_policy type for every run, e.g. tis (default: none, plain GRPO)",
    )
    parser.add_argument("--num-eval-prompts", type=int, default=None, help="held-out prompts (default 256)")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument(
        "--variants",
        nargs="+",
        default=None,
        choices=list(VARIANTS),
        help="default: all (--quick: sync free_s1)",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="keep model, data and runs here")
    args = parser.parse_args(argv)
    defaults = {
        "seeds": (1, 2),
        "steps": (3, 10),
        "warmup_steps": (1, 2),
        "prompts_per_step": (4, 8),
        "n": (4, 8),
        "num_eval_prompts": (64, 256),
    }
    for key, (quick, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    if args.variants is None:
        args.variants = ["sync", "free_s1"] if args.quick else list(VARIANTS)
    if args.steps <= args.warmup_steps:
        parser.error(f"--steps={args.steps} leaves no timed step after --warmup-steps={args.warmup_steps}")
    if "sync" not in args.variants:
        parser.error("--variants must include sync: every speedup is relative to it")
    return args


def prepare(workdir: Path, sft_steps: int, max_additions: int, sigma: float) -> dict[str, str]:
    """The warmed-up model and the jsonl splits (built once; reused when already there).

    The model is warmed up on the default chain task's short chains; the RL prompts come from a
    task with `max_additions` and `sigma` (the same held-out rule, so no validation prompt was
    ever trained on)."""
    from tidal.config.schema import TinyQwen2Build
    from tidal.tasks.chain import ChainTask, build_chain_model, make_chain_splits, write_jsonl

    task = ChainTask()
    rl_task = ChainTask(max_additions=max_additions, sigma=sigma)
    train, val = make_chain_splits(rl_task)
    tag = f"a{max_additions}-s{sigma:g}"
    build = TinyQwen2Build(
        num_layers=4, hidden_size=256, num_heads=4, num_kv_heads=2, intermediate_size=688,
        sft_steps=sft_steps, sft_batch_size=32, sft_lr=1e-3,
    )  # fmt: skip
    start = time.perf_counter()
    report = build_chain_model(build, task, workdir / f"model-sft{sft_steps}")
    print(f"model: {report} ({time.perf_counter() - start:.0f} s)", flush=True)
    return {
        "model_dir": str(workdir / f"model-sft{sft_steps}"),
        "train_file": str(write_jsonl(train, workdir / "data" / f"train-{tag}.jsonl")),
        "val_file": str(write_jsonl(val, workdir / "data" / f"val-{tag}.jsonl")),
        "sft": report,
    }


def schedule(variants: list[str], seeds: int) -> list[tuple[str, int]]:
    """(variant, seed) in run order: forward for even seeds, backward for odd ones."""
    order = []
    for seed in range(seeds):
        order += [(v, seed) for v in (variants if seed % 2 == 0 else variants[::-1])]
    return order


def run_one(spec: dict, workdir: Path, warmup_steps: int) -> dict:
    name = f"{spec['variant']}-seed{spec['seed']}"
    spec_path = workdir / "specs" / f"{name}.json"
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(spec))
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(HERE / "_async_run.py"), str(spec_path)],
        capture_output=True,
        text=True,
    )
    total = time.perf_counter() - start
    if proc.returncode != 0:
        (workdir / f"{name}.log").write_text(proc.stdout + proc.stderr)
        tail = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "no stderr"
        raise RuntimeError(f"run {name} failed (exit {proc.returncode}): {tail}; log: {workdir / name}.log")
    summary = summarise(
        Path(spec["output_dir"]) / "metrics.jsonl", spec["prompts_per_step"] * spec["n"], warmup_steps
    )
    return summary | {"process_s": total, "variant": spec["variant"], "seed": spec["seed"]}


def aggregate(runs: list[dict], variants: list[str]) -> dict[str, dict]:
    """Per variant: walls summed over seeds, means of the rest, and the per-seed figures."""
    out = {}
    for variant in variants:
        mine = [r for r in runs if r["variant"] == variant]
        wall = sum(r["wall_s"] for r in mine)

        def mean(key: str, mine: list[dict] = mine) -> float:
            return statistics.fmean(r[key] for r in mine)

        out[variant] = {
            "wall_s": wall,
            "wall_s_per_seed": [round(r["wall_s"], 2) for r in mine],
            # Robust to the shared box's spikes (single steps 10-50x slower at random).
            "median_step_s": statistics.median(s for r in mine for s in r["step_s"]),
            "trained_tokens_per_s": sum(r["trained_tokens"] for r in mine) / wall,
            "rollout_idle_ratio": 1.0 - sum(r["gen_s"] for r in mine) / wall,
            "train_idle_ratio": sum(r["train_wait_s"] for r in mine) / wall,
            "gen_s": sum(r["gen_s"] for r in mine),
            "update_s": sum(r["update_s"] for r in mine),
            "sync_weights_s": sum(r["sync_weights_s"] for r in mine),
            "staleness_mean": mean("staleness_mean"),
            "stale_dropped": sum(r["stale_dropped"] for r in mine),
            "response_length_mean": mean("response_length_mean"),
            "val_reward_initial": mean("val_reward_initial"),
            "val_reward_final": mean("val_reward_final"),
            "val_reward_final_per_seed": [r["val_reward_final"] for r in mine],
            "val_reward_errors": sum(r["val_reward_errors"] for r in mine),
            "reward_train_mean": mean("reward_train_mean"),
        }
        if "reward_busy_s" in mine[0]:
            out[variant]["reward_busy_s"] = sum(r["reward_busy_s"] for r in mine)
    return out


def headline(per_variant: dict[str, dict], machine: dict) -> dict:
    sync = per_variant["sync"]

    def speedup(variant: str) -> float | None:
        return sync["wall_s"] / per_variant[variant]["wall_s"] if variant in per_variant else None

    def speedup_of_medians(variant: str) -> float | None:
        if variant not in per_variant:
            return None
        return sync["median_step_s"] / per_variant[variant]["median_step_s"]

    streaming = per_variant.get("free_s1")
    return {
        "benchmark": "async_vs_sync",
        "speedup_s1": speedup("free_s1"),
        "speedup_s2": speedup("free_s2"),
        "speedup_deterministic_s1": speedup("deterministic_s1"),
        "speedup_s1_median_step": speedup_of_medians("free_s1"),
        "speedup_s2_median_step": speedup_of_medians("free_s2"),
        "speedup_deterministic_s1_median_step": speedup_of_medians("deterministic_s1"),
        "trained_tokens_per_s_sync": sync["trained_tokens_per_s"],
        "trained_tokens_per_s_streaming": streaming and streaming["trained_tokens_per_s"],
        "rollout_idle_ratio_sync": sync["rollout_idle_ratio"],
        "rollout_idle_ratio_streaming": streaming and streaming["rollout_idle_ratio"],
        "train_idle_ratio_sync": sync["train_idle_ratio"],
        "train_idle_ratio_streaming": streaming and streaming["train_idle_ratio"],
        "staleness_mean": streaming and streaming["staleness_mean"],
        "reward_final_sync": sync["val_reward_final"],
        "reward_final_streaming": streaming and streaming["val_reward_final"],
        "dropped_samples": sum(v["stale_dropped"] for v in per_variant.values()),
        "machine": f"{machine['cpu_model']}, {machine['cpus_usable']} CPUs, torch {machine['torch']}",
    }


def print_table(per_variant: dict[str, dict]) -> None:
    cols = [
        ("wall s", "wall_s", "{:.1f}"),
        ("med step s", "median_step_s", "{:.2f}"),
        ("tok/s", "trained_tokens_per_s", "{:.0f}"),
        ("gen s", "gen_s", "{:.1f}"),
        ("update s", "update_s", "{:.1f}"),
        ("sync s", "sync_weights_s", "{:.2f}"),
        ("rollout idle", "rollout_idle_ratio", "{:.2f}"),
        ("train idle", "train_idle_ratio", "{:.2f}"),
        ("stale", "staleness_mean", "{:.2f}"),
        ("dropped", "stale_dropped", "{:.0f}"),
        ("resp len", "response_length_mean", "{:.1f}"),
        ("val before", "val_reward_initial", "{:.3f}"),
        ("val after", "val_reward_final", "{:.3f}"),
    ]
    print("\n" + "variant".ljust(18) + "".join(f"{c[0]:>13}" for c in cols))
    for variant, row in per_variant.items():
        print(variant.ljust(18) + "".join(f"{fmt.format(row[key]):>13}" for _, key, fmt in cols))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tidal-async-") as tmp:
        workdir = (args.workdir or Path(tmp)).absolute()
        data = prepare(workdir, args.sft_steps, args.max_additions, args.sigma)
        runs = []
        for variant, seed in schedule(args.variants, args.seeds):
            spec = {
                "variant": variant,
                "seed": seed,
                "model_dir": data["model_dir"],
                "train_file": data["train_file"],
                "val_file": data["val_file"],
                "steps": args.steps,
                "prompts_per_step": args.prompts_per_step,
                "n": args.n,
                "max_new_tokens": args.max_new_tokens,
                "lr": args.lr,
                "num_eval_prompts": args.num_eval_prompts,
                "output_dir": str(workdir / "runs" / f"{variant}-seed{seed}"),
                "algorithm_settings": {"off_policy": {"type": args.off_policy}} if args.off_policy else {},
            }
            run = run_one(spec, workdir, args.warmup_steps)
            runs.append(run)
            print(
                f"{variant} seed {seed}: timed wall {run['wall_s']:.1f} s (warm-up steps {run['warmup_s']:.1f} s, "
                f"eval0 {run['eval0_s']:.1f} s, process {run['process_s']:.0f} s), "
                f"gen {run['gen_s']:.1f} s, val reward {run['val_reward_initial']:.3f} -> "
                f"{run['val_reward_final']:.3f}, staleness {run['staleness_mean']:.2f}",
                flush=True,
            )
    per_variant = aggregate(runs, args.variants)
    print_table(per_variant)
    machine = machine_info()
    result = headline(per_variant, machine) | {
        "per_variant": per_variant,
        "runs": runs,
        "sft": data["sft"],
        "machine_info": machine,
        "workload": {
            "task": (
                f"chain sums, ceil(lognormal(0,{args.sigma:g})) additions capped at {args.max_additions}, "
                f"max_new_tokens {args.max_new_tokens}"
            ),
            "seeds": args.seeds,
            "steps": args.steps,
            "prompts_per_step": args.prompts_per_step,
            "n": args.n,
            "trained_samples_per_run": args.steps * args.prompts_per_step * args.n,
            "lr": args.lr,
            "off_policy": args.off_policy,
            "sft_steps": args.sft_steps,
            "num_eval_prompts": args.num_eval_prompts,
            "warmup_steps": args.warmup_steps,
            "timed_wall": "sum of perf/step_s after the warm-up steps",
        },
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
