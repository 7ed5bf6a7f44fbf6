"""Prompts for RL: a dataset of tokenized prompts with ground truths, and an endless seeded loader.

Rows come from jsonl or parquet files in verl's layout, or from the built-in arithmetic task:

    {"prompt": [{"role": "user", "content": "..."}] or "...",   # data.prompt_key
     "reward_model": {"ground_truth": "72"},                     # data.ground_truth_key (dotted)
     "data_source": "gsm8k",                                     # optional (default: file name)
     "reference": "..." or ["...", ...]}                         # data.reference_response_key (dotted)

The reference responses (only read when data.reference_response_key is set, for PAR's data
baseline) are other models' answers to the prompt, e.g. the SFT model's; the program scores them
with the reward function to compare the policy's rewards against.

A row that cannot be used (missing prompt or ground truth, unreadable JSON, a prompt longer than
data.max_prompt_length, no usable reference response when they are read) is skipped and counted by
reason, never fatal: one bad line in a 100k-row file must not stop a run, but the count must be
visible (`skipped`, logged and reported as metrics).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from tidal.config.schema import ArithmeticTask, DataConfig
from tidal.dataflow.batch import Batch

log = logging.getLogger(__name__)
RowT = TypeVar("RowT")


@dataclass(frozen=True)
class PromptRow:
    prompt_text: str  # what the model sees, after the chat template when one is applied
    prompt_ids: tuple[int, ...]
    ground_truth: str
    data_source: str
    # The data's reference responses to the prompt (data.reference_response_key); empty when not
    # read. Keyword-only, so subclasses (PairRow) keep their positional fields.
    reference_responses: tuple[str, ...] = dataclasses.field(default=(), kw_only=True)


class SkipRow(Exception):
    """A row that cannot be used; the message is the (row-independent) reason it is counted under."""


def lookup(row: dict[str, Any], dotted_key: str) -> Any:
    """row["a"]["b"] for "a.b"; a flat column literally named "a.b" wins. Missing -> SkipRow."""
    if dotted_key in row:
        return row[dotted_key]
    node: Any = row
    for part in dotted_key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise SkipRow(f"missing {dotted_key!r}")
        node = node[part]
    return node


class RowEncoder:
    """Turns raw rows into PromptRows with one DataConfig and tokenizer."""

    def __init__(
        self, data_cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, read_references: bool = True
    ):
        if data_cfg.apply_chat_template and tokenizer.chat_template is None:
            raise ValueError(
                "data.apply_chat_template=true but the model's tokenizer has no chat template; "
                "set data.apply_chat_template=false or use a model whose tokenizer has one"
            )
        self.cfg = data_cfg
        self.tokenizer = tokenizer
        # Validation rows are never compared with references: they need none.
        self.reference_key = data_cfg.reference_response_key if read_references else None

    def prompt_text(self, prompt: Any) -> str:
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        elif isinstance(prompt, (list, tuple)):
            if not prompt or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in prompt
            ):
                raise SkipRow("prompt is a list but not a chat of {'role', 'content'} messages")
            messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
        elif prompt is None:
            raise SkipRow(f"missing {self.cfg.prompt_key!r}")
        else:
            raise SkipRow(f"prompt is a {type(prompt).__name__}, not a string or a chat list")
        if self.cfg.apply_chat_template:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if len(messages) != 1:
            raise SkipRow("chat prompt of several messages needs data.apply_chat_template=true")
        return messages[0]["content"]

    def encode_prompt(self, prompt: Any) -> tuple[str, tuple[int, ...]]:
        """(prompt text, token ids) of a row's prompt; SkipRow when empty or too long."""
        text = self.prompt_text(prompt)
        # A chat template writes its own special tokens; plain text gets the tokenizer's (e.g. BOS).
        ids = self.tokenizer(text, add_special_tokens=not self.cfg.apply_chat_template)["input_ids"]
        if not ids:
            raise SkipRow("empty prompt")
        if len(ids) > self.cfg.max_prompt_length:
            raise SkipRow(f"prompt longer than data.max_prompt_length={self.cfg.max_prompt_length}")
        return text, tuple(ids)

    def encode(self, prompt: Any, ground_truth: Any, data_source: str) -> PromptRow:
        if ground_truth is None:
            raise SkipRow(f"missing {self.cfg.ground_truth_key!r}")
        if isinstance(ground_truth, bool) or not isinstance(ground_truth, (str, int, float)):
            raise SkipRow(f"ground truth is a {type(ground_truth).__name__}, not a string or number")
        text, ids = self.encode_prompt(prompt)
        return PromptRow(text, ids, str(ground_truth), data_source)

    def reference_responses(self, record: dict[str, Any]) -> tuple[str, ...]:
        """The row's reference responses: a non-empty string or a non-empty list of them."""
        assert self.reference_key is not None
        value = lookup(record, self.reference_key)
        refs = [value] if isinstance(value, str) else value
        if not isinstance(refs, (list, tuple)) or not all(isinstance(r, str) for r in refs):
            raise SkipRow(f"{self.reference_key!r} is not a string or a list of strings")
        if not refs or not all(r.strip() for r in refs):
            raise SkipRow(f"{self.reference_key!r} is empty or holds an empty response")
        return tuple(refs)

    def encode_record(self, record: Any, default_source: str) -> PromptRow:
        if not isinstance(record, dict):
            raise SkipRow("row is not an object")
        source = record.get("data_source")  # an optional column of the row, not config
        row = self.encode(
            record.get(self.cfg.prompt_key),
            lookup(record, self.cfg.ground_truth_key),
            source if isinstance(source, str) and source else default_source,
        )
        if self.reference_key is None:
            return row
        return dataclasses.replace(row, reference_responses=self.reference_responses(record))


def read_records(path: Path) -> Iterator[dict[str, Any] | SkipRow]:
    """Rows of a .jsonl or .parquet file; an unreadable jsonl line is yielded as a SkipRow."""
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as lines:
            for line in lines:
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    yield SkipRow("invalid JSON line")
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for record_batch in pq.ParquetFile(path).iter_batches():
            yield from record_batch.to_pylist()
    else:
        raise AssertionError(f"unsupported suffix {path.suffix}")  # checked by PromptDataset.from_files


def encode_each(items: Iterable[Any], encode: Callable[[Any], RowT]) -> tuple[list[RowT], Counter[str]]:
    """`encode(item)` for every item (a built-in task's problems); SkipRows counted by reason."""
    rows: list[RowT] = []
    skipped: Counter[str] = Counter()
    for item in items:
        try:
            rows.append(encode(item))
        except SkipRow as reason:
            skipped[str(reason)] += 1
    return rows, skipped


def encode_files(
    paths: Sequence[str], field: str, encode: Callable[[dict[str, Any], str], RowT]
) -> tuple[list[RowT], Counter[str]]:
    """`encode(record, file stem)` over every row of the files; SkipRows counted by reason.

    `field` (e.g. "data.train_files") names the paths in errors: a wrong suffix or a missing
    file fails at once, before any row is read.
    """
    files = [Path(p).expanduser() for p in paths]
    for f in files:
        if f.suffix not in (".jsonl", ".parquet"):
            raise ValueError(f"{field} holds {str(f)!r}: only .jsonl and .parquet files are read")
        if not f.is_file():
            raise ValueError(f"{field} holds {str(f)!r}, which does not exist; fix the path")

    def encode_one(item: tuple[dict[str, Any] | SkipRow, str]) -> RowT:
        record, stem = item
        if isinstance(record, SkipRow):  # unreadable line, counted like a bad row
            raise record
        return encode(record, stem)

    return encode_each(((record, f.stem) for f in files for record in read_records(f)), encode_one)


class PromptDataset(Sequence[PromptRow]):
    def __init__(self, rows: list[PromptRow], skipped: Counter[str], name: str, pad_token_id: int):
        self.rows = rows
        self.skipped = skipped  # reason -> number of rows skipped for it
        self.name = name
        self.pad_token_id = pad_token_id
        if skipped:
            log.warning(
                "%s: skipped %d of %d rows: %s",
                name,
                self.num_skipped,
                len(rows) + self.num_skipped,
                dict(skipped),
            )

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> PromptRow:  # type: ignore[override]
        return self.rows[index]

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def collate(self, rows: Sequence[PromptRow], uids: Sequence[str]) -> Batch:
        """The loader's batch of `rows` (pair datasets add their response columns)."""
        return collate(rows, uids, self.pad_token_id)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_files(
        cls,
        paths: Sequence[str],
        data_cfg: DataConfig,
        tokenizer: PreTrainedTokenizerBase,
        field: str = "data.train_files",
        read_references: bool = True,
    ) -> PromptDataset:
        encoder = RowEncoder(data_cfg, tokenizer, read_references)
        rows, skipped = encode_files(paths, field, encoder.encode_record)
        return cls(rows, skipped, f"{field}={list(paths)}", _pad_id(tokenizer))

    @classmethod
    def from_task(
        cls,
        task: ArithmeticTask,
        split: Literal["train", "val"],
        data_cfg: DataConfig,
        tokenizer: PreTrainedTokenizerBase,
    ) -> PromptDataset:
        from tidal.tasks.arithmetic import DATA_SOURCE, make_split

        encoder = RowEncoder(data_cfg, tokenizer)
        rows, skipped = encode_each(
            make_split(task, split),
            lambda problem: encoder.encode(problem.prompt, problem.answer, DATA_SOURCE),
        )
        return cls(rows, skipped, f"data.task ({split})", _pad_id(tokenizer))


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    # Padded positions are masked out everywhere, so EOS is a safe stand-in when there is no pad.
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the model's tokenizer has neither a pad nor an EOS token; give it a pad_token")
    return pad


def build_datasets(
    data_cfg: DataConfig, tokenizer: PreTrainedTokenizerBase | str | Path
) -> tuple[PromptDataset, PromptDataset | None]:
    """(train, val). Train: data.train_files if set, else the task's train split. Val: data.val_files
    if set, else the task's val split when a task is set, else None."""
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    if data_cfg.train_files:
        train = PromptDataset.from_files(data_cfg.train_files, data_cfg, tokenizer, "data.train_files")
    else:
        assert data_cfg.task is not None  # the schema requires files or a task
        train = PromptDataset.from_task(data_cfg.task, "train", data_cfg, tokenizer)
    if data_cfg.val_files:
        val = PromptDataset.from_files(
            data_cfg.val_files, data_cfg, tokenizer, "data.val_files", read_references=False
        )
    elif data_cfg.task is not None:
        val = PromptDataset.from_task(data_cfg.task, "val", data_cfg, tokenizer)
    else:
        val = None
    for dataset in (train, val):
        if dataset is not None and not len(dataset):
            raise ValueError(f"{dataset.name} yields no usable prompt; skipped rows: {dict(dataset.skipped)}")
    return train, val


# ---------------------------------------------------------------------------------------- loader


def collate(rows: Sequence[PromptRow], uids: Sequence[str], pad_token_id: int) -> Batch:
    """Left-padded prompt_ids / prompt_mask plus the text columns, as one Batch.

    Rows read with reference responses add `reference_responses` (a tuple of strings per prompt).
    """
    width = max((len(r.prompt_ids) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for i, row in enumerate(rows):
        n = len(row.prompt_ids)
        ids[i, width - n :] = torch.tensor(row.prompt_ids, dtype=torch.int64)
        mask[i, width - n :] = 1
    text = {
        "uid": list(uids),
        "prompt_text": [r.prompt_text for r in rows],
        "ground_truth": [r.ground_truth for r in rows],
        "data_source": [r.data_source for r in rows],
    }
    if any(r.reference_responses for r in rows):
        text["reference_responses"] = [r.reference_responses for r in rows]
    return Batch.from_dict({"prompt_ids": ids, "prompt_mask": mask}, text)


class PromptLoader:
    """Endless batches of `batch_size` prompts, epoch after epoch.

    Epoch e visits the rows in the order of a permutation seeded by (seed, e) (or in file order
    without shuffle); a batch that reaches the end of an epoch continues into the next one, so every
    batch has exactly `batch_size` prompts. The uid "epoch-index" names a prompt within a run: the
    samples generated from it share it, and no other prompt of any step has it. The state is just
    (epoch, position), which makes resuming exact.
    """

    def __init__(self, dataset: PromptDataset, batch_size: int, shuffle: bool, seed: int):
        if not len(dataset):
            raise ValueError(f"{dataset.name} has no prompts to load")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.dataset))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))

    def _take(self, count: int) -> Iterable[tuple[int, int]]:
        """(epoch, row index) of the next `count` prompts, advancing the state."""
        for _ in range(count):
            if self.position == len(self.dataset):
                self.epoch += 1
                self.position = 0
                self._order = self._epoch_order(self.epoch)
            yield self.epoch, int(self._order[self.position])
            self.position += 1

    def next_batch(self) -> Batch:
        picks = list(self._take(self.batch_size))
        rows = [self.dataset[i] for _, i in picks]
        return self.dataset.collate(rows, [f"{epoch}-{i}" for epoch, i in picks])

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "num_rows": len(self.dataset)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["num_rows"] != len(self.dataset):
            raise ValueError(
                f"the loader state was saved over {state['num_rows']} prompts but {self.dataset.name} has "
                f"{len(self.dataset)}; resume with the same data (and data.max_prompt_length)"
            )
        self.epoch = state["epoch"]
        self.position = state["position"]
        self._order = self._epoch_order(self.epoch)
