"""Summaries, the printed table and the final JSON line of the GRPO step benchmark.

Medians over the timed steps are the headline figures (the issue asks for them). The minimum is
reported beside them: on a shared 2-core machine, contention slows steps by several times at
random, and the fastest step is the closest to the cost of the work itself.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from _workload import Workload


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    import transformers

    model = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            line.split(":", 1)[1].strip()
            for line in cpuinfo.read_text().splitlines()
            if line.startswith("model name")
        ]
        model = names[0] if names else model
    return {
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": installed_version("trl"),  # the --vs-trl extra; absent is fine for a Tidal-only run
    }


def side_summary(
    step_s: list[float], gen_s: list[float], gen_tokens_per_s: list[float], lengths: list[float], warmup: int
) -> dict[str, Any]:
    """Medians (and the fastest step) over the timed steps of one side; all step times kept."""
    steps, gens = step_s[warmup:], gen_s[warmup:]
    return {
        "s_per_step": median(steps),
        "min_s_per_step": min(steps) if steps else float("nan"),
        "gen_s": median(gens),
        "rest_s": median([s - g for s, g in zip(steps, gens)]),
        "gen_tokens_per_s": median(gen_tokens_per_s[warmup:]),
        "response_length_mean": statistics.fmean(lengths[warmup:]) if lengths[warmup:] else float("nan"),
        "step_s_all": [round(x, 4) for x in step_s],
    }


def tidal_summary(timings, workload: Workload) -> dict[str, Any]:
    t, w = timings, workload.warmup
    summary = side_summary(t.step_s, t.gen_s, t.gen_tokens_per_s, t.response_length, w)
    return summary | {
        "grpo_step_s": median(t.grpo_step_s[w:]),
        "sync_s": median(t.sync_s[w:]),
        "score_logprobs_adv_s": median([e - g for e, g in zip(t.experience_s, t.gen_s)][w:]),
        "update_s": median(t.update_s[w:]),
        "startup_s": round(t.startup_s, 2),
    }


def trl_summary(timings, workload: Workload) -> dict[str, Any]:
    t = timings
    tokens_per_s = [tok / s for tok, s in zip(t.gen_tokens, t.gen_s)]
    lengths = [tok / n for tok, n in zip(t.gen_tokens, t.gen_sequences)]
    summary = side_summary(t.step_s, t.gen_s, tokens_per_s, lengths, workload.warmup)
    return summary | {"num_threads": sorted(set(t.num_threads)), "generate_calls": len(t.gen_s)}


def build_result(
    workload: Workload,
    tidal,
    tidal_error: str | None,
    trl,
    expected: list[list[str]],
    streaming=None,
    streaming_error: str | None = None,
) -> dict[str, Any]:
    """`tidal` is the sync runner, `streaming` the runner with trainer.mode=streaming (either may be
    None: --mode picks which ran); their keys are `tidal_*` and `tidal_streaming_*`."""
    result: dict[str, Any] = {
        "benchmark": "grpo_step",
        "machine": machine_info(),
        "workload": workload.describe(),
    }
    if tidal is not None and tidal_error is None:
        summary = tidal_summary(tidal.timings, workload)
        result |= {
            "tidal_s_per_step": summary["s_per_step"],
            "tidal_gen_tokens_per_s": summary["gen_tokens_per_s"],
            "tidal": summary,
            "tidal_same_prompts": tidal.timings.prompts == expected,
        }
    if streaming is not None and streaming_error is None:
        summary = tidal_summary(streaming.timings, workload)
        # The rollout thread draws prompts ahead of the trainer (and the store hands them out in
        # its own order), so check the prompts drawn, in order, not the ones each step trained on.
        drawn = [p for batch in streaming.timings.prompts for p in batch]
        wanted = [p for batch in expected for p in batch]
        result |= {
            "tidal_streaming_s_per_step": summary["s_per_step"],
            "tidal_streaming": summary,
            "tidal_streaming_same_prompts_drawn": drawn[: len(wanted)] == wanted,
        }
    if trl is not None:
        summary = trl_summary(trl, workload)
        result |= {
            "trl_s_per_step": summary["s_per_step"],
            "trl_gen_tokens_per_s": summary["gen_tokens_per_s"],
            "trl": summary,
            "trl_same_prompts": trl.prompts == expected,
        }
    if "tidal" in result and "trl" in result:
        result["speedup"] = result["trl_s_per_step"] / result["tidal_s_per_step"]
        result["speedup_of_fastest_steps"] = (
            result["trl"]["min_s_per_step"] / result["tidal"]["min_s_per_step"]
        )
        pairs = list(zip(trl.step_s, tidal.timings.step_s))[workload.warmup :]
        result["speedup_median_of_pairs"] = median([a / b for a, b in pairs])
    if "tidal_streaming" in result and "trl" in result:
        result["speedup_streaming"] = result["trl_s_per_step"] / result["tidal_streaming_s_per_step"]
    if "tidal_streaming" in result and "tidal" in result:
        result["streaming_over_sync"] = result["tidal_s_per_step"] / result["tidal_streaming_s_per_step"]
    if tidal_error is not None:
        result["tidal_error"] = tidal_error.strip().splitlines()[-1]
    if streaming_error is not None:
        result["tidal_streaming_error"] = streaming_error.strip().splitlines()[-1]
    return result


def print_report(
    result: dict[str, Any], workload: Workload, tidal_error: str | None, streaming_error: str | None = None
) -> None:
    """The readable table, warnings, then the JSON object as the very last line."""
    m, w = result["machine"], workload
    print(
        f"\nGRPO step: Qwen2 4 layers/hidden 256, {w.prompts_per_step} prompts x {w.samples_per_prompt} samples, "
        f"{w.max_new_tokens} new tokens, fp32, {w.num_threads} threads/side, {w.warmup} warm-up + {w.steps} timed steps"
    )
    print(
        f"machine: {m['cpu_model']}, {m['cpu_count']} CPUs, load {m['load_average_1m']}, torch {m['torch']}\n"
    )
    tidal, trl, streaming = result.get("tidal"), result.get("trl"), result.get("tidal_streaming")
    sides = [("Tidal", tidal)] if tidal or "tidal_streaming" not in result else []
    if streaming or streaming_error is not None:
        sides.append(("Tidal streaming", streaming))
    sides.append((f"TRL {m['trl']}" if trl else "TRL (not run)", trl))

    def cell(summary: dict[str, Any] | None, key: str, fmt: str = "{:.3f}") -> str:
        return fmt.format(summary[key]) if summary and key in summary else "-"

    rows = [
        ("s/step, median", "s_per_step", "{:.3f}"),
        ("s/step, fastest step", "min_s_per_step", "{:.3f}"),
        ("generation s/step, median", "gen_s", "{:.3f}"),
        ("rest of step s, median", "rest_s", "{:.3f}"),
        ("generation tokens/s, median", "gen_tokens_per_s", "{:.0f}"),
        ("mean response length, tokens", "response_length_mean", "{:.1f}"),
        ("  Tidal: score+old log-probs+adv. s", "score_logprobs_adv_s", "{:.3f}"),
        ("  Tidal: actor update s", "update_s", "{:.3f}"),
        ("  Tidal: weight sync s", "sync_s", "{:.4f}"),
    ]
    table = [("", *[name for name, _ in sides])]
    table += [(label, *[cell(summary, key, fmt) for _, summary in sides]) for label, key, fmt in rows]
    width = max(len(r[0]) for r in table) + 2
    col = max(len(c) for r in table for c in r[1:]) + 2
    for name, *cells in table:
        print(f"{name:<{width}}" + "".join(f"{c:>{col}}" for c in cells))
    if streaming:
        print(
            "(streaming: generation s is the rollout pool's busy time since the previous step, overlapping "
            "the trainer; score+old log-probs includes the trainer's wait for samples)"
        )
    if "speedup" in result:
        print(
            f"\nspeedup = TRL s/step / Tidal s/step: {result['speedup']:.2f}x (medians); "
            f"median of per-step pairs {result['speedup_median_of_pairs']:.2f}x; "
            f"fastest steps {result['speedup_of_fastest_steps']:.2f}x"
        )
    if "speedup_streaming" in result:
        print(
            f"speedup of Tidal streaming = TRL s/step / Tidal streaming s/step: {result['speedup_streaming']:.2f}x"
        )
    if "streaming_over_sync" in result:
        print(f"Tidal sync s/step / Tidal streaming s/step: {result['streaming_over_sync']:.2f}x")
    for side in ("tidal", "trl"):
        if result.get(f"{side}_same_prompts") is False:
            print(f"WARNING: the {side} side did not train on the expected prompts in order", file=sys.stderr)
    if result.get("tidal_streaming_same_prompts_drawn") is False:
        print("WARNING: the streaming side did not draw the expected prompts in order", file=sys.stderr)
    if tidal_error is not None:
        print(f"\nTidal side failed:\n{tidal_error}", file=sys.stderr)
    if streaming_error is not None:
        print(f"\nTidal streaming side failed:\n{streaming_error}", file=sys.stderr)
    sys.stderr.flush()
    print(json.dumps(result), flush=True)
