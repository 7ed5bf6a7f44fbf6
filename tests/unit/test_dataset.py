import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tidal.config.schema import ArithmeticTask, DataConfig
from tidal.dataflow.dataset import PromptDataset, PromptLoader, build_datasets
from tidal.tasks.tokenizer import build_char_tokenizer

GOOD = [
    {
        "prompt": [{"role": "user", "content": "12+3="}],
        "reward_model": {"ground_truth": "15"},
        "data_source": "sums",
    },
    {"prompt": "7*8=", "reward_model": {"ground_truth": 56}},
    {"prompt": [{"role": "user", "content": "9-12="}], "reward_model": {"ground_truth": "-3"}, "extra": 1},
]
BAD = [
    ({"prompt": "1+1="}, "missing 'reward_model.ground_truth'"),
    ({"reward_model": {"ground_truth": "2"}}, "missing 'prompt'"),
    (
        {"prompt": "1" * 40 + "=", "reward_model": {"ground_truth": "1"}},
        "prompt longer than data.max_prompt_length=16",
    ),
    (
        {"prompt": [{"role": "user"}], "reward_model": {"ground_truth": "1"}},
        "prompt is a list but not a chat of {'role', 'content'} messages",
    ),
    (
        {
            "prompt": [{"role": "system", "content": "1"}, {"role": "user", "content": "2"}],
            "reward_model": {"ground_truth": "1"},
        },
        "chat prompt of several messages needs data.apply_chat_template=true",
    ),
]


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def cfg(**kw) -> DataConfig:
    return DataConfig(**{"train_files": ["unused.jsonl"], "max_prompt_length": 16, **kw})


def write_jsonl(path, rows, extra_lines=()):
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return path


def test_jsonl_rows_in_verl_layout_and_skipped_rows_are_counted(tmp_path, tok):
    path = write_jsonl(tmp_path / "mixed.jsonl", GOOD + [row for row, _ in BAD], ["{not json", ""])
    ds = PromptDataset.from_files([str(path)], cfg(), tok)
    assert [(r.prompt_text, r.ground_truth, r.data_source) for r in ds] == [
        ("12+3=", "15", "sums"),
        ("7*8=", "56", "mixed"),
        ("9-12=", "-3", "mixed"),
    ]
    assert list(ds[0].prompt_ids) == tok("12+3=")["input_ids"]
    assert dict(ds.skipped) == {reason: 1 for _, reason in BAD} | {"invalid JSON line": 1}
    assert ds.num_skipped == len(BAD) + 1


def test_parquet_gives_the_same_rows_as_jsonl(tmp_path, tok):
    rows = [dict(r, reward_model={"ground_truth": str(r["reward_model"]["ground_truth"])}) for r in GOOD]
    rows = [{k: v for k, v in r.items() if k != "extra"} for r in rows]
    for r in rows:
        r["prompt"] = (
            r["prompt"] if isinstance(r["prompt"], list) else [{"role": "user", "content": r["prompt"]}]
        )
        r.setdefault("data_source", "mixed")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "mixed.parquet")
    write_jsonl(tmp_path / "mixed.jsonl", rows)
    from_parquet = PromptDataset.from_files([str(tmp_path / "mixed.parquet")], cfg(), tok)
    from_jsonl = PromptDataset.from_files([str(tmp_path / "mixed.jsonl")], cfg(), tok)
    assert list(from_parquet) == list(from_jsonl) and len(from_parquet) == 3 and not from_parquet.skipped


def test_ground_truth_key_is_a_dotted_path(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "2+2=", "extra_info": {"answer": {"value": "4"}}}])
    ds = PromptDataset.from_files(
        [str(path)], cfg(prompt_key="question", ground_truth_key="extra_info.answer.value"), tok
    )
    assert ds[0].ground_truth == "4" and ds[0].prompt_text == "2+2="


def test_chat_template_is_applied_when_asked(tmp_path, tok):
    path = write_jsonl(tmp_path / "c.jsonl", GOOD)
    with pytest.raises(ValueError, match="data.apply_chat_template=true but"):
        PromptDataset.from_files([str(path)], cfg(apply_chat_template=True), tok)
    templated = build_char_tokenizer()
    templated.chat_template = (
        "{% for m in messages %}{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %} {% endif %}"
    )
    ds = PromptDataset.from_files([str(path)], cfg(apply_chat_template=True), templated)
    assert [r.prompt_text for r in ds] == ["12+3=\n ", "7*8=\n ", "9-12=\n "]
    assert list(ds[1].prompt_ids) == templated("7*8=\n ")["input_ids"]


def test_file_errors_name_the_field(tmp_path, tok):
    with pytest.raises(ValueError, match="data.val_files holds .*does not exist"):
        PromptDataset.from_files([str(tmp_path / "nope.jsonl")], cfg(), tok, field="data.val_files")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="only .jsonl and .parquet"):
        PromptDataset.from_files([str(tmp_path / "x.csv")], cfg(), tok)
    empty = write_jsonl(tmp_path / "bad.jsonl", [row for row, _ in BAD])
    with pytest.raises(ValueError, match="yields no usable prompt"):
        build_datasets(cfg(train_files=[str(empty)]), tok)


def test_reference_responses_are_read_from_train_rows_and_bad_ones_counted(tmp_path, tok):
    """PAR's data baseline: a string or a list of strings per row; rows without a usable one are
    skipped and counted; validation rows need none; the loader's batch carries them per prompt."""
    truth = {"reward_model": {"ground_truth": "4"}}
    good = [
        {"prompt": "2+2=", **truth, "sft": {"answer": "4"}},
        {"prompt": "1+3=", **truth, "sft": {"answer": ["4", "5 "]}},
    ]
    bad = [
        ({"prompt": "3+1=", **truth}, "missing 'sft.answer'"),
        (
            {"prompt": "3+1=", **truth, "sft": {"answer": 4}},
            "'sft.answer' is not a string or a list of strings",
        ),
        (
            {"prompt": "3+1=", **truth, "sft": {"answer": ["4", 5]}},
            "'sft.answer' is not a string or a list of strings",
        ),
        (
            {"prompt": "3+1=", **truth, "sft": {"answer": []}},
            "'sft.answer' is empty or holds an empty response",
        ),
        (
            {"prompt": "3+1=", **truth, "sft": {"answer": " "}},
            "'sft.answer' is empty or holds an empty response",
        ),
    ]
    train_file = write_jsonl(tmp_path / "train.jsonl", good + [row for row, _ in bad])
    val_file = write_jsonl(
        tmp_path / "val.jsonl", [{"prompt": "5+5=", "reward_model": {"ground_truth": "10"}}]
    )
    data = cfg(train_files=[str(train_file)], val_files=[str(val_file)], reference_response_key="sft.answer")
    train, val = build_datasets(data, tok)
    assert [r.reference_responses for r in train] == [("4",), ("4", "5 ")]
    assert train.skipped == Counter(reason for _, reason in bad) and train.num_skipped == len(bad)
    assert len(val) == 1 and val[0].reference_responses == () and not val.skipped

    batch = PromptLoader(train, batch_size=3, shuffle=False, seed=0).next_batch()
    assert list(batch["reference_responses"]) == [("4",), ("4", "5 "), ("4",)]  # into the next epoch
    assert "reference_responses" not in PromptLoader(val, batch_size=1, shuffle=False, seed=0).next_batch()
    # Without the key nothing is read and the column is absent.
    plain = PromptDataset.from_files([str(train_file)], cfg(), tok)
    assert len(plain) == len(good) + len(bad) and all(r.reference_responses == () for r in plain)


def test_build_datasets_from_the_task(tok):
    data = DataConfig(task=ArithmeticTask(num_train=100, num_val=10))
    train, val = build_datasets(data, tok)
    assert len(train) == 100 and len(val) == 10
    assert {r.data_source for r in train} == {"arithmetic"}
    assert all(str(eval(r.prompt_text[:-1])) == r.ground_truth for r in val)  # noqa: S307 - our own prompts


def test_loader_pads_left_and_covers_each_epoch_once(tok):
    train, _ = build_datasets(DataConfig(task=ArithmeticTask(max_digits=2, num_train=10, num_val=2)), tok)
    loader = PromptLoader(train, batch_size=4, shuffle=True, seed=0)
    batches = [loader.next_batch() for _ in range(5)]  # 20 prompts: two epochs of 10
    b = batches[0]
    assert b["prompt_ids"].dtype == torch.int64 and b["prompt_ids"].shape[0] == 4
    for ids, mask, text in zip(b["prompt_ids"], b["prompt_mask"], b["prompt_text"]):
        n = int(mask.sum())
        assert mask[-n:].all() and not mask[:-n].any()  # left padding
        assert (ids[:-n] == tok.pad_token_id).all() and tok.decode(ids[-n:]) == text
    uids = [u for batch in batches for u in batch["uid"]]
    assert len(set(uids)) == 20
    texts = [t for batch in batches for t in batch["prompt_text"]]
    assert sorted(texts[:10]) == sorted(texts[10:]) == sorted(r.prompt_text for r in train)
    assert texts[:10] != texts[10:]  # each epoch has its own order
    again = PromptLoader(train, batch_size=4, shuffle=True, seed=0)
    assert list(again.next_batch()["uid"]) == list(b["uid"])
    unshuffled = PromptLoader(train, batch_size=3, shuffle=False, seed=0).next_batch()
    assert list(unshuffled["prompt_text"]) == [r.prompt_text for r in train[:3]]


def test_loader_resumes_exactly(tok):
    train, _ = build_datasets(DataConfig(task=ArithmeticTask(num_train=7, num_val=2)), tok)
    loader = PromptLoader(train, batch_size=3, shuffle=True, seed=5)
    for _ in range(4):
        loader.next_batch()
    state = loader.state_dict()
    expected = [loader.next_batch() for _ in range(5)]
    resumed = PromptLoader(train, batch_size=3, shuffle=True, seed=5)
    resumed.load_state_dict(state)
    for want, got in zip(expected, [resumed.next_batch() for _ in range(5)]):
        assert list(want["uid"]) == list(got["uid"])
        assert torch.equal(want["prompt_ids"], got["prompt_ids"])
    other, _ = build_datasets(DataConfig(task=ArithmeticTask(num_train=8, num_val=2)), tok)
    with pytest.raises(ValueError, match="saved over 7 prompts"):
        PromptLoader(other, batch_size=3, shuffle=True, seed=5).load_state_dict(state)


def test_bad_rows_are_counted_by_reason_code_with_the_first_located(tmp_path, tok, caplog):
    """An invalid UTF-8 byte, a blank prompt and unscoreable ground truths are bad rows like the
    others: counted by reason code, the first of each named by file and line, reported as metrics."""
    truth = {"reward_model": {"ground_truth": "1"}}
    path = tmp_path / "d.jsonl"
    lines = [
        json.dumps({"prompt": "1+0=", **truth}).encode(),  # line 1, kept
        b'{"prompt": "caf\xe9=", "reward_model": {"ground_truth": "1"}}',  # 2: latin-1, not UTF-8
        b"{not json",  # 3
        json.dumps({"prompt": "   \n", **truth}).encode(),  # 4: blank prompt
        json.dumps({"prompt": [{"role": "user", "content": " "}], **truth}).encode(),  # 5: blank chat
        json.dumps({"prompt": "2+5=", "reward_model": {"ground_truth": 7.0}}).encode(),  # 6: kept, "7"
        json.dumps({"prompt": "1/2=", "reward_model": {"ground_truth": 0.5}}).encode(),  # 7: kept, "0.5"
        b'{"prompt": "0/0=", "reward_model": {"ground_truth": NaN}}',  # 8: Python's json reads NaN
        b'{"prompt": "1/0=", "reward_model": {"ground_truth": Infinity}}',  # 9
        json.dumps({"prompt": "1=", "reward_model": {"ground_truth": [1]}}).encode(),  # 10
        json.dumps({"prompt": "1=", "reward_model": {"ground_truth": {"a": 1}}}).encode(),  # 11
        json.dumps({"prompt": "1=", "reward_model": {"ground_truth": True}}).encode(),  # 12
        json.dumps({"prompt": "1=", "reward_model": {"ground_truth": " "}}).encode(),  # 13
        json.dumps({"prompt": "1=", "reward_model": {"ground_truth": None}}).encode(),  # 14
        json.dumps([1, 2]).encode(),  # 15
        json.dumps({"prompt": "1" * 40, **truth}).encode(),  # 16
        b"\xff\xfe",  # 17
        json.dumps({"prompt": "3*3=", "reward_model": {"ground_truth": 9}}).encode(),  # 18: kept, "9"
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    with caplog.at_level("WARNING", logger="tidal.dataflow.dataset"):
        ds = PromptDataset.from_files([str(path)], cfg(), tok)
    assert [(r.prompt_text, r.ground_truth) for r in ds] == [
        ("1+0=", "1"),
        ("2+5=", "7"),
        ("1/2=", "0.5"),
        ("3*3=", "9"),
    ]
    assert ds.num_skipped_by_reason == {
        "invalid_utf8": 2,
        "bad_json": 1,
        "empty_prompt": 2,
        "bad_ground_truth": 6,
        "missing_ground_truth": 1,
        "not_an_object": 1,
        "too_long": 1,
    }
    assert ds.num_skipped == 14 == sum(ds.skipped.values())
    assert ds.skips.first["invalid_utf8"] == f"{path}:2: invalid UTF-8 (byte 16 of the line)"
    assert ds.skips.first["bad_ground_truth"].startswith(f"{path}:8: ")
    assert ds.skips.first["empty_prompt"].startswith(f"{path}:4: ")
    assert ds.skip_report("data/train") == {
        "data/train_skipped/bad_ground_truth": 6,
        "data/train_skipped/bad_json": 1,
        "data/train_skipped/empty_prompt": 2,
        "data/train_skipped/invalid_utf8": 2,
        "data/train_skipped/missing_ground_truth": 1,
        "data/train_skipped/not_an_object": 1,
        "data/train_skipped/too_long": 1,
        "data/train_normalised/ground_truth": 1,
    }
    (message,) = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert f"invalid_utf8 2 (first at {path}:2: invalid UTF-8" in message
    assert f"bad_json 1 (first at {path}:3: invalid JSON line)" in message


def test_parquet_rows_are_located_and_float_truths_normalised(tmp_path, tok):
    rows = [
        {"prompt": "2+5=", "reward_model": {"ground_truth": 7.0}},
        {"prompt": "0/0=", "reward_model": {"ground_truth": float("nan")}},
        {"prompt": " ", "reward_model": {"ground_truth": 1.0}},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "f.parquet")
    ds = PromptDataset.from_files([str(tmp_path / "f.parquet")], cfg(), tok)
    assert [r.ground_truth for r in ds] == ["7"]
    assert ds.num_skipped_by_reason == {"bad_ground_truth": 1, "empty_prompt": 1}
    assert ds.skips.first["bad_ground_truth"].startswith(f"{tmp_path / 'f.parquet'} row 1: ")
    # Only kept rows count as normalised: the blank prompt's 1.0 does not.
    assert ds.skip_report("data/val")["data/val_normalised/ground_truth"] == 1


def test_a_utf8_bom_is_not_a_bad_row(tmp_path, tok):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD[1]).encode() + b"\n")
    ds = PromptDataset.from_files([str(path)], cfg(), tok)
    assert len(ds) == 1 and not ds.skipped and ds.skip_report("data/train") == {}
