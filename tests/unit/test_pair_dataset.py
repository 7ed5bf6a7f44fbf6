"""Preference pairs: files in TRL's layout (bad rows counted, not fatal), the built-in arithmetic
pairs, and the collated tensors (left-padded prompts, right-padded responses ending in EOS)."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tidal.config.schema import ArithmeticTask, DataConfig
from tidal.dataflow.dataset import PromptLoader
from tidal.dataflow.pairs import PAIR_COLUMNS, PairDataset, build_pair_datasets
from tidal.tasks.arithmetic import make_pairs, make_split
from tidal.tasks.tokenizer import build_char_tokenizer

GOOD = [
    {"prompt": "12+3=", "chosen": "15", "rejected": "16"},
    {
        "prompt": [{"role": "user", "content": "7*8="}],
        "chosen": [{"role": "user", "content": "7*8="}, {"role": "assistant", "content": "56"}],
        "rejected": [{"role": "assistant", "content": "57"}],
        "data_source": "products",
    },
]
BAD = [
    ({"prompt": "1+1=", "rejected": "3"}, "missing 'chosen'"),
    ({"chosen": "2", "rejected": "3"}, "missing 'prompt'"),
    ({"prompt": "1+1=", "chosen": "2", "rejected": "2"}, "chosen and rejected are the same response"),
    ({"prompt": "1+1=", "chosen": "2", "rejected": 3}, "rejected is a int, not a string or a chat list"),
    ({"prompt": "1+1=", "chosen": "", "rejected": "3"}, "empty chosen response"),
    ({"prompt": "1+1=", "chosen": "2" * 9, "rejected": "3"}, "chosen longer than data.max_response_length=8"),
    (
        {"prompt": "1+1=", "chosen": [{"role": "user", "content": "2"}], "rejected": "3"},
        "chosen is a list but its last message is not the assistant's",
    ),
]


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def cfg(**kw) -> DataConfig:
    return DataConfig(
        **{"train_files": ["unused.jsonl"], "max_prompt_length": 16, "max_response_length": 8, **kw}
    )


def test_pair_rows_are_read_and_bad_rows_counted_by_reason(tmp_path, tok):
    path = tmp_path / "pairs.jsonl"
    with path.open("w") as f:
        for row in GOOD + [bad for bad, _ in BAD]:
            f.write(json.dumps(row) + "\n")
        f.write("{not json\n")
    data = PairDataset.from_files([str(path)], cfg(), tok)
    assert len(data) == 2
    assert data.num_skipped == len(BAD) + 1
    assert dict(data.skipped) == {reason: 1 for _, reason in BAD} | {"invalid JSON line": 1}
    first, second = data.rows
    eos = tok.eos_token_id
    assert first.chosen_ids == (*tok.encode("15", add_special_tokens=False), eos)
    assert first.rejected_ids == (*tok.encode("16", add_special_tokens=False), eos)
    assert first.ground_truth == "15" and first.data_source == "pairs"
    assert second.prompt_text == "7*8=" and second.ground_truth == "56" and second.data_source == "products"


def test_dotted_keys_and_parquet(tmp_path, tok):
    rows = [{"question": {"text": "2+2="}, "answers": {"good": "4", "bad": "5"}}]
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    data = PairDataset.from_files(
        [str(path)],
        cfg(prompt_key="question.text", chosen_key="answers.good", rejected_key="answers.bad"),
        tok,
    )
    assert [r.ground_truth for r in data.rows] == ["4"]
    with pytest.raises(ValueError, match="data.train_files holds .*pairs.csv.*only .jsonl and .parquet"):
        PairDataset.from_files([str(tmp_path / "pairs.csv")], cfg(), tok)


def test_arithmetic_pairs_are_right_against_a_near_miss():
    task = ArithmeticTask(max_digits=2, operations=["+", "-", "*"], num_train=500, num_val=50)
    pairs = make_pairs(task, "train")
    assert pairs == make_pairs(task, "train")  # deterministic
    assert [p.prompt for p in pairs] == [p.prompt for p in make_split(task, "train")]
    for pair, problem in zip(pairs, make_split(task, "train")):
        assert pair.chosen == problem.answer
        assert int(pair.rejected) != int(pair.chosen)
        assert len(pair.rejected) == len(pair.chosen)  # one digit changed, same format
        assert sum(a != b for a, b in zip(pair.chosen, pair.rejected)) == 1
        assert not pair.rejected.lstrip("-").startswith("0") or pair.rejected == "0"


def test_collated_pairs_and_loader(tok):
    data_cfg = DataConfig(task=ArithmeticTask(max_digits=2, num_train=40, num_val=8))
    train, val = build_pair_datasets(data_cfg, tok)
    assert (len(train), len(val)) == (40, 8)
    loader = PromptLoader(train, batch_size=5, shuffle=True, seed=0)
    batch = loader.next_batch()
    for key in PAIR_COLUMNS:
        assert batch[key].shape[0] == 5 and batch[key].dtype == torch.int64
    assert (batch["prompt_mask"][:, -1] == 1).all()  # prompts left-padded
    for ids, mask in (
        (batch["chosen_ids"], batch["chosen_mask"]),
        (batch["rejected_ids"], batch["rejected_mask"]),
    ):
        assert (mask[:, 0] == 1).all()  # responses right-padded
        lengths = mask.sum(1)
        assert (ids[torch.arange(5), lengths - 1] == tok.eos_token_id).all()
    texts = [
        tok.decode(row[m.bool()], skip_special_tokens=True)
        for row, m in zip(batch["chosen_ids"], batch["chosen_mask"])
    ]
    assert texts == list(batch.non_tensors["ground_truth"])
    state = loader.state_dict()
    again = PromptLoader(train, batch_size=5, shuffle=True, seed=0)
    again.load_state_dict(state)
    assert torch.equal(again.next_batch()["chosen_ids"], loader.next_batch()["chosen_ids"])


def test_pair_files_skip_invalid_utf8_and_blank_fields_by_reason(tmp_path, tok):
    path = tmp_path / "p.jsonl"
    lines = [
        json.dumps(GOOD[0]).encode(),
        b'{"prompt": "\xe9", "chosen": "1", "rejected": "2"}',  # 2: not UTF-8
        json.dumps({"prompt": " \t", "chosen": "1", "rejected": "2"}).encode(),  # 3
        json.dumps({"prompt": "1+1=", "chosen": "  ", "rejected": "3"}).encode(),  # 4
        json.dumps({"prompt": "1+1=", "chosen": "2", "rejected": "\n"}).encode(),  # 5
        json.dumps({"prompt": "1+1=", "rejected": "3"}).encode(),  # 6
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    data = PairDataset.from_files([str(path)], cfg(), tok)
    assert len(data) == 1
    assert data.num_skipped_by_reason == {
        "invalid_utf8": 1,
        "empty_prompt": 1,
        "empty_response": 2,
        "missing_response": 1,
    }
    assert data.skips.first["invalid_utf8"].startswith(f"{path}:2: invalid UTF-8")
    assert data.skips.first["empty_response"] == f"{path}:4: empty chosen response"
    assert data.skip_report("data/train")["data/train_skipped/empty_response"] == 2
