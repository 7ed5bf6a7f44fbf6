"""Preference pairs for offline training (DPO, SimPO, REDI): a prompt with a chosen and a rejected response.

Rows come from jsonl or parquet files, in the layout TRL and OpenRLHF read:

    {"prompt": "..." or [{"role": "user", "content": "..."}],      # data.prompt_key
     "chosen": "..." or [..., {"role": "assistant", "content": "..."}],   # data.chosen_key (dotted)
     "rejected": "..." or [..., {"role": "assistant", "content": "..."}]} # data.rejected_key (dotted)

or from the built-in arithmetic task (the right answer against a near miss, tidal/tasks/arithmetic.py).
A response given as a chat is its last message, which must be the assistant's. The prompt is
encoded exactly as for RL (`RowEncoder`: chat template, max_prompt_length); each response is its
text's tokens plus EOS, so the policy also learns where an answer ends. Bad rows are skipped and
counted by reason code, with the first of each located, as for prompts (tidal/dataflow/dataset.py:
invalid_utf8, bad_json, not_an_object, missing_prompt, bad_prompt, empty_prompt, too_long) plus
missing_response (no chosen or rejected), bad_response (not text, or a chat whose last message is
not the assistant's), empty_response (empty or whitespace only) and same_responses.

A batch has the prompt columns of `collate` (left-padded prompt_ids / prompt_mask, uid,
prompt_text, ground_truth = the chosen text, data_source) plus right-padded chosen_ids /
chosen_mask and rejected_ids / rejected_mask: one row per pair, so a data-parallel split never
separates a pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import PreTrainedTokenizerBase

from tidal.config.schema import ArithmeticTask, DataConfig
from tidal.dataflow.batch import Batch
from tidal.dataflow.dataset import (
    PromptDataset,
    PromptRow,
    RowEncoder,
    SkipRow,
    _pad_id,
    collate,
    encode_each,
    encode_files,
    lookup,
    require_rows,
)
from tidal.dataflow.tokenizer import load_tokenizer

PAIR_COLUMNS = ("prompt_ids", "prompt_mask", "chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask")


@dataclass(frozen=True)
class PairRow(PromptRow):
    """A prompt row (its ground_truth is the chosen text) with the two responses' token ids (EOS last)."""

    chosen_ids: tuple[int, ...] = ()
    rejected_ids: tuple[int, ...] = ()


class PairEncoder:
    """Turns raw pair rows into PairRows with one DataConfig and tokenizer."""

    def __init__(self, data_cfg: DataConfig, tokenizer: PreTrainedTokenizerBase):
        if tokenizer.eos_token_id is None:
            raise ValueError(
                "the model's tokenizer has no EOS token; preference responses end with EOS, give it one"
            )
        self.cfg = data_cfg
        self.prompts = RowEncoder(data_cfg, tokenizer)
        self.tokenizer = tokenizer

    def response_ids(self, response: Any, name: str) -> tuple[str, tuple[int, ...]]:
        if isinstance(response, (list, tuple)):
            last = response[-1] if response else None
            if not isinstance(last, dict) or last.get("role") != "assistant":
                raise SkipRow(f"{name} is a list but its last message is not the assistant's", "bad_response")
            response = last.get("content")
        if not isinstance(response, str):
            raise SkipRow(
                f"{name} is a {type(response).__name__}, not a string or a chat list", "bad_response"
            )
        ids = self.tokenizer(response, add_special_tokens=False)["input_ids"]
        if not ids or not response.strip():
            raise SkipRow(f"empty {name} response", "empty_response")
        ids = [*ids, self.tokenizer.eos_token_id]
        if len(ids) > self.cfg.max_response_length:
            raise SkipRow(
                f"{name} longer than data.max_response_length={self.cfg.max_response_length}", "too_long"
            )
        return response, tuple(ids)

    def encode(self, prompt: Any, chosen: Any, rejected: Any, data_source: str) -> PairRow:
        text, prompt_ids = self.prompts.encode_prompt(prompt)
        chosen_text, chosen_ids = self.response_ids(chosen, "chosen")
        _, rejected_ids = self.response_ids(rejected, "rejected")
        if chosen_ids == rejected_ids:
            raise SkipRow("chosen and rejected are the same response", "same_responses")
        return PairRow(text, prompt_ids, chosen_text, data_source, chosen_ids, rejected_ids)

    def encode_record(self, record: Any, default_source: str) -> PairRow:
        if not isinstance(record, dict):
            raise SkipRow("row is not an object", "not_an_object")
        source = record.get("data_source")
        return self.encode(
            lookup(record, self.cfg.prompt_key, "missing_prompt"),
            lookup(record, self.cfg.chosen_key, "missing_response"),
            lookup(record, self.cfg.rejected_key, "missing_response"),
            source if isinstance(source, str) and source else default_source,
        )


class PairDataset(PromptDataset):
    """Pairs with the prompt dataset's bookkeeping (skip counts, name, pad id) and its loader."""

    rows: list[PairRow]

    @classmethod
    def from_files(  # type: ignore[override]
        cls,
        paths: Sequence[str],
        data_cfg: DataConfig,
        tokenizer: PreTrainedTokenizerBase,
        field: str = "data.train_files",
    ) -> PairDataset:
        rows, skips = encode_files(paths, field, PairEncoder(data_cfg, tokenizer).encode_record)
        return cls(rows, skips, f"{field}={list(paths)} (pairs)", _pad_id(tokenizer))

    @classmethod
    def from_task(  # type: ignore[override]
        cls,
        task: ArithmeticTask,
        split: Literal["train", "val"],
        data_cfg: DataConfig,
        tokenizer: PreTrainedTokenizerBase,
    ) -> PairDataset:
        from tidal.tasks.arithmetic import DATA_SOURCE, make_pairs

        encoder = PairEncoder(data_cfg, tokenizer)
        rows, skips = encode_each(
            make_pairs(task, split),
            lambda pair: encoder.encode(pair.prompt, pair.chosen, pair.rejected, DATA_SOURCE),
        )
        return cls(rows, skips, f"data.task ({split} pairs)", _pad_id(tokenizer))

    def collate(self, rows: Sequence[PromptRow], uids: Sequence[str]) -> Batch:
        return collate_pairs(rows, uids, self.pad_token_id)  # type: ignore[arg-type]


def _right_padded(
    sequences: Sequence[tuple[int, ...]], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(s) for s in sequences), default=0)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.int64)
    mask = torch.zeros((len(sequences), width), dtype=torch.int64)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.int64)
        mask[i, : len(seq)] = 1
    return ids, mask


def collate_pairs(rows: Sequence[PairRow], uids: Sequence[str], pad_token_id: int) -> Batch:
    """The prompt batch of `collate` plus right-padded chosen_* and rejected_* columns."""
    chosen_ids, chosen_mask = _right_padded([r.chosen_ids for r in rows], pad_token_id)
    rejected_ids, rejected_mask = _right_padded([r.rejected_ids for r in rows], pad_token_id)
    responses = Batch.from_dict(
        {
            "chosen_ids": chosen_ids,
            "chosen_mask": chosen_mask,
            "rejected_ids": rejected_ids,
            "rejected_mask": rejected_mask,
        }
    )
    return collate(rows, uids, pad_token_id).union(responses)


def build_pair_datasets(
    data_cfg: DataConfig, tokenizer: PreTrainedTokenizerBase | str | Path
) -> tuple[PairDataset, PairDataset | None]:
    """(train, val) pairs: data.train_files / data.val_files when set, else the task's splits."""
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        tokenizer = load_tokenizer(tokenizer)
    if data_cfg.train_files:
        train = PairDataset.from_files(data_cfg.train_files, data_cfg, tokenizer, "data.train_files")
    else:
        assert data_cfg.task is not None  # the schema requires files or a task
        train = PairDataset.from_task(data_cfg.task, "train", data_cfg, tokenizer)
    if data_cfg.val_files:
        val = PairDataset.from_files(data_cfg.val_files, data_cfg, tokenizer, "data.val_files")
    elif data_cfg.task is not None:
        val = PairDataset.from_task(data_cfg.task, "val", data_cfg, tokenizer)
    else:
        val = None
    require_rows((train, val), "pair")
    return train, val
