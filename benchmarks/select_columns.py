"""Materialising a few columns of a wide DistributedBatch: cut next to the shards vs. whole shards.

A step's batch in the object store holds many columns (token tensors, log-probs, text); a stage
that reads one small column (a reward task reads `seq_reward`, say) used to pull whole shards.
`DistributedBatch.materialize(cut="always")` cuts a selected part in a small Ray task next to its
shards and fetches only the selected columns; `cut="never"` is the old path, kept as the
reference; the default `cut="auto"` cuts only parts whose shards are not on the caller's node
(here, one node: it fetches directly, so its time should match "never").

Workload (one local Ray cluster, the caller is the driver): --rows rows in --shards shards, four
float32 token columns of --rows x --length (old/ref/rollout log-probs, a mask), and in the "text"
scenario two text columns of ~--text-chars characters per row (prompt and response), plus one
small column `seq_reward` (one float per row), the one selected. Each method materialises
`select("seq_reward")` over all rows and over one rank's rows (--shards ranks), interleaved over
--reps repetitions; medians reported.

bytes_fetched = sizes of the objects the caller's `ray.get` pulls (object-store sizes, from
`ray.experimental.get_object_locations`); on one node whole tensor shards are mapped zero-copy,
so their bytes cost little time here, but they are what crosses the network when the shard lives
on another node, and text columns are unpickled in full either way.

    python benchmarks/select_columns.py                 # both scenarios, defaults
    python benchmarks/select_columns.py --reps 9 --rows 1024

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import ray
import torch

from tidal.dataflow.batch import Batch
from tidal.dataflow.distributed_batch import DistributedBatch


def make_batch(rows: int, length: int, text_chars: int, with_text: bool) -> Batch:
    g = torch.Generator().manual_seed(0)
    tensors = {
        name: torch.randn(rows, length, generator=g) for name in ("old_lp", "ref_lp", "rollout_lp", "mask")
    }
    tensors["seq_reward"] = torch.randn(rows, generator=g)
    non_tensors = {}
    if with_text:
        non_tensors = {
            "prompt": [f"prompt {i} " + "x" * text_chars for i in range(rows)],
            "response": [f"response {i} " + "y" * text_chars for i in range(rows)],
        }
    return Batch.from_dict(tensors, non_tensors)


class FetchMeter:
    """Counts the object-store bytes that the caller's ray.get pulls, by wrapping ray.get."""

    def __init__(self) -> None:
        self.refs: list[ray.ObjectRef] = []
        self._get = ray.get

    def __enter__(self) -> FetchMeter:
        def get(refs, *args, **kwargs):
            self.refs.extend(refs if isinstance(refs, list) else [refs])
            return self._get(refs, *args, **kwargs)

        ray.get = get
        return self

    def __exit__(self, *exc) -> None:
        ray.get = self._get

    def bytes(self) -> int:
        locations = ray.experimental.get_object_locations(self.refs)
        return sum(int(locations[ref]["object_size"] or 0) for ref in self.refs)


def run_scenario(args: argparse.Namespace, with_text: bool) -> dict:
    batch = make_batch(args.rows, args.length, args.text_chars, with_text)
    stored = DistributedBatch.from_batch(batch, args.shards).select("seq_reward")
    rank_range = stored.row_ranges(args.shards)[1]
    ranges = {"all_rows": (0, args.rows), "one_rank": rank_range}
    methods = {
        "cut": lambda a, b: stored.materialize(a, b, cut="always"),
        "whole": lambda a, b: stored.materialize(a, b, cut="never"),
        "auto": stored.materialize,
    }
    times = {(r, m): [] for r in ranges for m in methods}
    fetched = {}
    for rep in range(args.reps + 1):  # the first repetition warms Ray's task workers up, untimed
        for rname, (start, stop) in ranges.items():
            for mname, fn in methods.items():
                with FetchMeter() as meter:
                    t0 = time.perf_counter()
                    got = fn(start, stop)
                    elapsed = time.perf_counter() - t0
                assert got.keys() == ["seq_reward"] and torch.equal(
                    got["seq_reward"], batch["seq_reward"][start:stop]
                )
                if rep:
                    times[rname, mname].append(elapsed)
                fetched[rname, mname] = meter.bytes()
    out = {"stored_bytes": _stored_bytes(stored)}
    for rname in ranges:
        cut_s = statistics.median(times[rname, "cut"])
        whole_s = statistics.median(times[rname, "whole"])
        auto_s = statistics.median(times[rname, "auto"])
        out[rname] = {
            "cut_bytes": fetched[rname, "cut"],
            "whole_bytes": fetched[rname, "whole"],
            "bytes_ratio_whole_over_cut": round(fetched[rname, "whole"] / max(fetched[rname, "cut"], 1), 1),
            "cut_s_median": round(cut_s, 5),
            "whole_s_median": round(whole_s, 5),
            "time_ratio_whole_over_cut": round(whole_s / cut_s, 2),
            "auto_bytes": fetched[rname, "auto"],
            "auto_s_median": round(auto_s, 5),
        }
    return out


def _stored_bytes(batch: DistributedBatch) -> int:
    locations = ray.experimental.get_object_locations(batch.refs)
    return sum(int(loc["object_size"] or 0) for loc in locations.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--text-chars", type=int, default=4000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        scenarios = {name: run_scenario(args, name == "text") for name in ("text", "tensors_only")}
    finally:
        ray.shutdown()
    for name, res in scenarios.items():
        for rname in ("all_rows", "one_rank"):
            r = res[rname]
            print(
                f"{name:13s} {rname:9s} bytes whole/cut {r['whole_bytes']:>10d} / {r['cut_bytes']:>7d}"
                f" = {r['bytes_ratio_whole_over_cut']:>8.1f}x   time whole/cut {r['whole_s_median'] * 1e3:7.2f}"
                f" / {r['cut_s_median'] * 1e3:6.2f} ms = {r['time_ratio_whole_over_cut']:.2f}x"
                f"   auto {r['auto_s_median'] * 1e3:6.2f} ms"
            )
    print(json.dumps({"config": vars(args), "scenarios": scenarios}))


if __name__ == "__main__":
    main()
