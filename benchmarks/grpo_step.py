"""Seconds per GRPO step: Tidal, and (with --vs-trl) Hugging Face TRL's GRPOTrainer, same workload.

Workload: a tiny Qwen2 (4 layers, hidden 256, 4 heads, 2 KV heads, intermediate 688; Tidal's
tiny_qwen2 builder, no supervised warm-up), the arithmetic task, 8 prompts x 8 samples, 32 new
tokens, temperature 1.0, fp32, one optimizer step per batch, no reference model, 2 CPU threads a
side. Run:

    python benchmarks/grpo_step.py --vs-trl --steps 5

With --vs-trl both sides run in this one process tree and alternate step by step (TRL step i,
then Tidal step i), so machine noise hits both alike. Medians over the timed steps are reported;
the last line of output is one JSON object.

--mode picks Tidal's trainer: sync (the default, as above), streaming (trainer.mode=streaming,
max_staleness 1, free schedule; the same 2 CPUs split into an actor pool and a rollout pool of 1
each) or both. A streaming rollout keeps generating between steps, so its steps are not
interleaved with TRL's: they run back to back after the TRL run (and the interleaved sync side).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the _helpers beside this file

import torch  # noqa: E402
from _report import build_result, print_report  # noqa: E402
from _workload import Workload, step_prompts  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side (at least 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps per side")
    parser.add_argument("--vs-trl", action="store_true", help="also run TRL's GRPOTrainer, interleaved")
    parser.add_argument("--trl-only", action="store_true", help="run only the TRL side (checks the harness)")
    parser.add_argument(
        "--mode",
        choices=["sync", "streaming", "both"],
        default="sync",
        help="Tidal's trainer.mode; streaming steps run back to back, not interleaved with TRL's",
    )
    parser.add_argument(
        "--workdir", type=Path, default=None, help="keep model and outputs here (default: temp)"
    )
    args = parser.parse_args(argv)
    if args.steps < 5:
        parser.error(f"--steps={args.steps}: use at least 5 timed steps so the median means something")
    if args.warmup < 0:
        parser.error(f"--warmup={args.warmup} must be >= 0")
    if args.trl_only and args.vs_trl:
        parser.error("--trl-only and --vs-trl exclude each other; pick one")
    if args.trl_only and args.mode != "sync":
        parser.error(f"--trl-only runs no Tidal side, so --mode={args.mode} has nothing to pick; drop one")
    return args


# ------------------------------------------------------------------------------------- running


def run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    workload = Workload(steps=args.steps, warmup=args.warmup)
    torch.set_num_threads(workload.num_threads)  # the TRL side (and anything else in this process)
    run_tidal = not args.trl_only and args.mode in ("sync", "both")
    run_streaming = not args.trl_only and args.mode in ("streaming", "both")
    run_trl = args.vs_trl or args.trl_only

    with tempfile.TemporaryDirectory(prefix="tidal-bench-") as tmp:
        workdir = (args.workdir or Path(tmp)).absolute()
        from _tidal_grpo import TidalRunner, tidal_config

        from tidal.tasks.prepare import prepare_model

        # Built once by Tidal's own preparation step (the tiny_qwen2 builder, deterministic); Job.start
        # then finds it ready, and TRL loads the same folder.
        cfg = tidal_config(workload, workdir / "model", workdir / "tidal", check_registries=False)
        model_dir = prepare_model(cfg.model, cfg.data)
        pairs = step_prompts(workload)
        expected = [
            [p for p, _ in pairs[i * workload.prompts_per_step : (i + 1) * workload.prompts_per_step]]
            for i in range(workload.total_steps)
        ]

        tidal, tidal_error = None, None
        if run_tidal:
            try:
                tidal = TidalRunner(
                    tidal_config(workload, model_dir, workdir / "tidal", check_registries=True)
                )
            except Exception:
                tidal_error = traceback.format_exc()

        def tidal_step(index: int) -> None:
            nonlocal tidal_error
            if tidal is None or tidal_error is not None:
                return
            try:
                tidal.step(index)
            except Exception:
                tidal_error = traceback.format_exc()

        trl_timings = None
        try:
            if run_trl:
                from _trl_grpo import StepTimer, TrlTimings, build_trainer, make_reward_fn

                from tidal.workers.rewards.arithmetic import arithmetic_reward

                trl_timings = TrlTimings()
                timer = StepTimer(trl_timings, between_steps=tidal_step)
                trainer = build_trainer(
                    model_dir, pairs, make_reward_fn(arithmetic_reward), workload, cfg, workdir / "trl", timer
                )
                trainer.train()
            else:
                for index in range(workload.total_steps):
                    tidal_step(index)
        finally:
            if tidal is not None:
                tidal.shutdown()
        streaming, streaming_error = None, None
        if run_streaming:
            streaming, streaming_error = run_streaming_side(workload, model_dir, workdir / "tidal-streaming")
    result = build_result(workload, tidal, tidal_error, trl_timings, expected, streaming, streaming_error)
    print_report(result, workload, tidal_error, streaming_error)
    return 1 if tidal_error is not None or streaming_error is not None else 0


def run_streaming_side(workload: Workload, model_dir: Path, output_dir: Path):
    """All steps of the streaming Tidal side back to back; (runner, None) or (runner or None, traceback)."""
    from _tidal_grpo import TidalRunner, tidal_config

    runner = None
    try:
        runner = TidalRunner(
            tidal_config(workload, model_dir, output_dir, check_registries=True, streaming=True)
        )
        for index in range(workload.total_steps):
            runner.step(index)
        return runner, None
    except Exception:
        return runner, traceback.format_exc()
    finally:
        if runner is not None:
            runner.shutdown()


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
