"""Prompts for RL: a dataset of tokenized prompts with ground truths, and an endless seeded loader.

Rows come from jsonl or parquet files in verl's layout, or from the built-in arithmetic task:

    {"prompt": [{"role": "user", "content": "..."}] or "...",   # data.prompt_key
     "reward_model": {"ground_truth": "72"},                     # data.ground_truth_key (dotted)
     "data_source": "gsm8k",                                     # optional (default: file name)
     "reference": "..." or ["...", ...]}                         # data.reference_response_key (dotted)

The reference responses (only read when data.reference_response_key is set, for PAR's data
baseline) are other models' answers to the prompt, e.g. the SFT model's; the program scores them
with the reward function to compare the policy's rewards against.

A row that cannot be used is skipped and counted by reason, never fatal: one bad line in a
100k-row file must not stop a run, but the count must be visible. Each skip has a reason code
(`SkipRow.reason`), and the dataset logs, per code, how many rows it skipped and where the first
one is (file:line for jsonl, file row N for parquet), and reports the counts as metrics
(`PromptDataset.skip_report`). The codes:

    invalid_utf8          a jsonl line that is not valid UTF-8
    bad_json              a jsonl line that is not JSON
    not_an_object         a row that is not a JSON object
    missing_prompt        no data.prompt_key
    bad_prompt            a prompt neither a string nor a chat of {role, content} messages, or a
                          chat of several messages without data.apply_chat_template
    empty_prompt          a prompt that is empty or whitespace only (every message's content)
    too_long              a prompt longer than data.max_prompt_length (pairs: a response longer
                          than data.max_response_length)
    missing_ground_truth  no data.ground_truth_key
    bad_ground_truth      a ground truth that cannot be scored: not a string or a number (a list,
                          a dict, a boolean: JSON true is no answer, and str(True) would compare
                          as "True"), a non-finite number (NaN, inf), or an empty/blank string
    missing_reference     no data.reference_response_key (when read)
    bad_reference         reference responses that are not a non-empty string or list of them
    (pairs) missing_response, bad_response, empty_response (blank), same_responses

Ground truths reach reward functions as strings (`fn(prompt, response, ground_truth: str)`):
an int is written as is ("7"), an integral float as the integer (7.0 -> "7", which is how the
answer is written, where str(7.0) = "7.0" could never match) and counted as
`normalised/ground_truth`, and any other finite float as Python writes it (0.5 -> "0.5").
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from tidal.config.schema import ArithmeticTask, DataConfig
from tidal.dataflow.batch import Batch
from tidal.dataflow.tokenizer import load_tokenizer

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
    """A row that cannot be used: the message (row-independent) says why, `reason` is its code
    (module docstring), which the skip counts and metrics are keyed by."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class SkipLog:
    """What reading a dataset left out or changed.

    by_reason: reason code -> rows skipped; by_message: the detailed message -> rows skipped;
    first: reason code -> where the first such row is and why ("file.jsonl:7: invalid UTF-8");
    normalised: what was changed in kept rows -> how many (e.g. "ground_truth": 7.0 -> "7").
    """

    by_reason: Counter[str] = dataclasses.field(default_factory=Counter)
    by_message: Counter[str] = dataclasses.field(default_factory=Counter)
    first: dict[str, str] = dataclasses.field(default_factory=dict)
    normalised: Counter[str] = dataclasses.field(default_factory=Counter)

    def add(self, skip: SkipRow, where: str) -> None:
        self.by_reason[skip.reason] += 1
        self.by_message[str(skip)] += 1
        self.first.setdefault(skip.reason, f"{where}: {skip}")

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())


def lookup(row: dict[str, Any], dotted_key: str, reason: str = "missing_field") -> Any:
    """row["a"]["b"] for "a.b"; a flat column literally named "a.b" wins. Missing -> SkipRow(reason)."""
    if dotted_key in row:
        return row[dotted_key]
    node: Any = row
    for part in dotted_key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise SkipRow(f"missing {dotted_key!r}", reason)
        node = node[part]
    return node


def ground_truth_text(value: Any, key: str) -> tuple[str, bool]:
    """(the ground truth as a reward function gets it, whether it was normalised); SkipRow when it
    cannot be scored. See the module docstring for the rules."""
    if value is None:
        raise SkipRow(f"missing {key!r}", "missing_ground_truth")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise SkipRow(f"ground truth is a {type(value).__name__}, not a string or number", "bad_ground_truth")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise SkipRow("ground truth is not a finite number (NaN or inf)", "bad_ground_truth")
        if value.is_integer():
            return str(int(value)), True
    text = str(value)
    if not text.strip():
        raise SkipRow("ground truth is an empty string", "bad_ground_truth")
    return text, False


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
        self.normalised: Counter[str] = Counter()  # what encode changed in the rows it returned

    def prompt_text(self, prompt: Any) -> str:
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        elif isinstance(prompt, (list, tuple)):
            if not prompt or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in prompt
            ):
                raise SkipRow("prompt is a list but not a chat of {'role', 'content'} messages", "bad_prompt")
            messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
        elif prompt is None:
            raise SkipRow(f"missing {self.cfg.prompt_key!r}", "missing_prompt")
        else:
            raise SkipRow(f"prompt is a {type(prompt).__name__}, not a string or a chat list", "bad_prompt")
        if not any(m["content"].strip() for m in messages):
            raise SkipRow("empty prompt", "empty_prompt")
        if self.cfg.apply_chat_template:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if len(messages) != 1:
            raise SkipRow("chat prompt of several messages needs data.apply_chat_template=true", "bad_prompt")
        return messages[0]["content"]

    def encode_prompt(self, prompt: Any) -> tuple[str, tuple[int, ...]]:
        """(prompt text, token ids) of a row's prompt; SkipRow when empty or too long."""
        text = self.prompt_text(prompt)
        # A chat template writes its own special tokens; plain text gets the tokenizer's (e.g. BOS).
        ids = self.tokenizer(text, add_special_tokens=not self.cfg.apply_chat_template)["input_ids"]
        if not ids:
            raise SkipRow("empty prompt", "empty_prompt")
        if len(ids) > self.cfg.max_prompt_length:
            raise SkipRow(
                f"prompt longer than data.max_prompt_length={self.cfg.max_prompt_length}", "too_long"
            )
        return text, tuple(ids)

    def encode(
        self,
        prompt: Any,
        ground_truth: Any,
        data_source: str,
        reference_responses: tuple[str, ...] = (),
    ) -> PromptRow:
        truth, normalised = ground_truth_text(ground_truth, self.cfg.ground_truth_key)
        text, ids = self.encode_prompt(prompt)
        row = PromptRow(text, ids, truth, data_source, reference_responses=reference_responses)
        if normalised:  # counted only for rows that are kept
            self.normalised["ground_truth"] += 1
        return row

    def reference_responses(self, record: dict[str, Any]) -> tuple[str, ...]:
        """The row's reference responses: a non-empty string or a non-empty list of them."""
        assert self.reference_key is not None
        value = lookup(record, self.reference_key, "missing_reference")
        refs = [value] if isinstance(value, str) else value
        if not isinstance(refs, (list, tuple)) or not all(isinstance(r, str) for r in refs):
            raise SkipRow(f"{self.reference_key!r} is not a string or a list of strings", "bad_reference")
        if not refs or not all(r.strip() for r in refs):
            raise SkipRow(f"{self.reference_key!r} is empty or holds an empty response", "bad_reference")
        return tuple(refs)

    def encode_record(self, record: Any, default_source: str) -> PromptRow:
        if not isinstance(record, dict):
            raise SkipRow("row is not an object", "not_an_object")
        source = record.get("data_source")  # an optional column of the row, not config
        truth = lookup(record, self.cfg.ground_truth_key, "missing_ground_truth")
        refs = self.reference_responses(record) if self.reference_key is not None else ()
        return self.encode(
            record.get(self.cfg.prompt_key),
            truth,
            source if isinstance(source, str) and source else default_source,
            refs,
        )


def read_records(path: Path) -> Iterator[tuple[str, dict[str, Any] | SkipRow]]:
    """(where, row) for the rows of a .jsonl or .parquet file, `where` being "path:line" (jsonl,
    1-based) or "path row N" (parquet, 0-based); a jsonl line that is not UTF-8 or not JSON is
    yielded as a SkipRow. Blank lines are ignored; a UTF-8 byte order mark at the start is allowed."""
    if path.suffix == ".jsonl":
        with path.open("rb") as lines:
            for number, raw in enumerate(lines, 1):
                where = f"{path}:{number}"
                try:
                    line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError as err:
                    yield where, SkipRow(f"invalid UTF-8 (byte {err.start + 1} of the line)", "invalid_utf8")
                    continue
                if not line.strip():
                    continue
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError:
                    yield where, SkipRow("invalid JSON line", "bad_json")
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        number = 0
        for record_batch in pq.ParquetFile(path).iter_batches():
            for record in record_batch.to_pylist():
                yield f"{path} row {number}", record
                number += 1
    else:
        raise AssertionError(f"unsupported suffix {path.suffix}")  # checked by PromptDataset.from_files


def encode_located(
    items: Iterable[tuple[str, Any]], encode: Callable[[Any], RowT]
) -> tuple[list[RowT], SkipLog]:
    """`encode(item)` for every (where, item); SkipRows (raised, or given as the item) are logged
    under their reason with `where`."""
    rows: list[RowT] = []
    skips = SkipLog()
    for where, item in items:
        try:
            if isinstance(item, SkipRow):  # unreadable line, counted like a bad row
                raise item
            rows.append(encode(item))
        except SkipRow as skip:
            skips.add(skip, where)
    return rows, skips


def encode_each(items: Iterable[Any], encode: Callable[[Any], RowT]) -> tuple[list[RowT], SkipLog]:
    """`encode(item)` for every item (a built-in task's problems); SkipRows logged by reason."""
    return encode_located(((f"item {i}", item) for i, item in enumerate(items)), encode)


def encode_files(
    paths: Sequence[str], field: str, encode: Callable[[dict[str, Any], str], RowT]
) -> tuple[list[RowT], SkipLog]:
    """`encode(record, file stem)` over every row of the files; SkipRows logged by reason.

    `field` (e.g. "data.train_files") names the paths in errors: a wrong suffix or a missing
    file fails at once, before any row is read.
    """
    files = [Path(p).expanduser() for p in paths]
    for f in files:
        if f.suffix not in (".jsonl", ".parquet"):
            raise ValueError(f"{field} holds {str(f)!r}: only .jsonl and .parquet files are read")
        if not f.is_file():
            raise ValueError(f"{field} holds {str(f)!r}, which does not exist; fix the path")

    def encode_one(item: tuple[dict[str, Any], str]) -> RowT:
        record, stem = item
        return encode(record, stem)

    located = (
        (where, record if isinstance(record, SkipRow) else (record, f.stem))
        for f in files
        for where, record in read_records(f)
    )
    return encode_located(located, encode_one)


class PromptDataset(Sequence[PromptRow]):
    def __init__(self, rows: list[PromptRow], skips: SkipLog, name: str, pad_token_id: int):
        self.rows = rows
        self.skips = skips
        self.name = name
        self.pad_token_id = pad_token_id
        if skips.total:
            log.warning(
                "%s: skipped %d of %d rows: %s",
                name,
                self.num_skipped,
                len(rows) + self.num_skipped,
                "; ".join(
                    f"{reason} {count} (first at {skips.first[reason]})"
                    for reason, count in sorted(skips.by_reason.items())
                ),
            )
        if skips.normalised:
            log.info("%s: normalised in kept rows: %s", name, dict(skips.normalised))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> PromptRow:  # type: ignore[override]
        return self.rows[index]

    @property
    def skipped(self) -> Counter[str]:
        """Detailed skip message -> rows skipped for it."""
        return self.skips.by_message

    @property
    def num_skipped(self) -> int:
        return self.skips.total

    @property
    def num_skipped_by_reason(self) -> dict[str, int]:
        """Reason code (module docstring) -> rows skipped for it; only reasons that occurred."""
        return dict(self.skips.by_reason)

    def skip_report(self, prefix: str) -> dict[str, int]:
        """The skip and normalisation counts as metrics, e.g. for prefix "data/train":
        {"data/train_skipped/invalid_utf8": 2, "data/train_normalised/ground_truth": 5}; only
        reasons that occurred (the total is `num_skipped`)."""
        report = {f"{prefix}_skipped/{reason}": n for reason, n in sorted(self.skips.by_reason.items())}
        return report | {
            f"{prefix}_normalised/{what}": n for what, n in sorted(self.skips.normalised.items())
        }

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
        rows, skips = encode_files(paths, field, encoder.encode_record)
        skips.normalised.update(encoder.normalised)
        return cls(rows, skips, f"{field}={list(paths)}", _pad_id(tokenizer))

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
        rows, skips = encode_each(
            make_split(task, split),
            lambda problem: encoder.encode(problem.prompt, problem.answer, DATA_SOURCE),
        )
        skips.normalised.update(encoder.normalised)
        return cls(rows, skips, f"data.task ({split})", _pad_id(tokenizer))


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
        tokenizer = load_tokenizer(tokenizer)
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
    require_rows((train, val), "prompt")
    return train, val


def require_rows(datasets: Iterable[PromptDataset | None], what: str) -> None:
    """Raise ValueError for a dataset that yields no usable `what`, with its skips and where each first was."""
    for dataset in datasets:
        if dataset is not None and not len(dataset):
            raise ValueError(
                f"{dataset.name} yields no usable {what}; skipped rows: {dict(dataset.skipped)}; "
                f"first of each: {dataset.skips.first}"
            )


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
