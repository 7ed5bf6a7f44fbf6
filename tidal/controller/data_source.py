"""DataSource: the training loader, the fixed held-out batches and the data report of a job.

RL jobs load prompts (a built-in task or data.train_files); preference jobs load (prompt, chosen,
rejected) pairs and, with a built-in task, its held-out prompts for the greedy accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

from tidal.config.schema import JobConfig
from tidal.dataflow.batch import Batch
from tidal.dataflow.dataset import PromptDataset, PromptLoader, build_datasets
from tidal.dataflow.tokenizer import load_tokenizer


@dataclass
class DataSource:
    train_loader: PromptLoader  # endless, seeded, checkpointed with the job
    val_prompts: Batch | None  # held-out prompts for the generating evaluation
    val_pairs: Batch | None  # held-out preference pairs (preference jobs)
    report: dict[str, int]  # data/train_prompts, data/train_skipped, skips by reason, ...

    @classmethod
    def load(cls, cfg: JobConfig) -> DataSource:
        tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
        if cfg.algorithm.preference is None:
            train_set, val_set = build_datasets(cfg.data, tokenizer)
            loader, val, report = _loaders(cfg, train_set, val_set, "prompts")
            return cls(loader, val, None, report)
        from tidal.dataflow.pairs import build_pair_datasets

        train_set, val_set = build_pair_datasets(cfg.data, tokenizer)
        loader, val_pairs, report = _loaders(cfg, train_set, val_set, "pairs")
        val_prompts = None
        if cfg.data.task is not None:  # greedy accuracy on the task's held-out problems
            val_prompts = _held_out_batch(cfg, PromptDataset.from_task(cfg.data.task, "val", cfg.data, tokenizer))
        return cls(loader, val_prompts, val_pairs, report)


def _loaders(
    cfg: JobConfig, train_set: PromptDataset, val_set: PromptDataset | None, kind: str
) -> tuple[PromptLoader, Batch | None, dict[str, int]]:
    """The endless training loader, the fixed held-out batch (trainer.num_eval_prompts rows) and
    the data report (`data/train_<kind>`, `data/train_skipped`, ...)."""
    loader = PromptLoader(train_set, cfg.trainer.prompts_per_step, cfg.data.shuffle, cfg.data.seed)
    report = {f"data/train_{kind}": len(train_set), "data/train_skipped": train_set.num_skipped}
    report |= train_set.skip_report("data/train")  # skips by reason, so metrics say why rows went
    if val_set is None:
        return loader, None, report
    val = _held_out_batch(cfg, val_set)
    report |= {f"data/val_{kind}": len(val), "data/val_skipped": val_set.num_skipped}
    return loader, val, report | val_set.skip_report("data/val")


def _held_out_batch(cfg: JobConfig, val_set: PromptDataset) -> Batch:
    """The first trainer.num_eval_prompts rows of `val_set` (all when 0), in order, as one batch."""
    num_val = min(cfg.trainer.num_eval_prompts or len(val_set), len(val_set))
    return PromptLoader(val_set, num_val, shuffle=False, seed=0).next_batch()
