"""The trainer's data layer: text sources, the resumable order, the collators."""
import json

import numpy as np
import pytest
import torch

from fastkd.train.data import CausalCollator, OrderSampler, load_texts

TEXTS = ["Zoë has 3 🍎.", "2 + 2 = 4", "Ana gets 7 more, so Ana has 9."]


def test_text_sources_agree(tmp_path):
    (tmp_path / "a.txt").write_text("\n".join(TEXTS) + "\n\n", encoding="utf-8")
    with open(tmp_path / "a.jsonl", "w", encoding="utf-8") as handle:
        for text in TEXTS:
            handle.write(json.dumps({"body": text}, ensure_ascii=False) + "\n")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": TEXTS + [""], "n": [1, 2, 3, 4]}), tmp_path / "a.parquet")
    assert load_texts(str(tmp_path / "a.txt")) == TEXTS
    assert load_texts(str(tmp_path / "a.jsonl"), "body") == TEXTS
    assert load_texts(str(tmp_path / "a.parquet"), "body") == TEXTS  # empty strings dropped
    with pytest.raises(ValueError, match="no column 'text'"):
        load_texts(str(tmp_path / "a.parquet"))
    with pytest.raises(ValueError, match="not a file"):
        load_texts(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="suffix"):
        (tmp_path / "a.csv").write_text("x")
        load_texts(str(tmp_path / "a.csv"))


def test_order_is_seeded_covers_every_item_and_resumes():
    a = OrderSampler(10, seed=3)
    first = a.take(7) + a.take(7)  # wraps into the second epoch
    assert sorted(first[:10]) == list(range(10))  # an epoch is a permutation
    assert first != list(range(14))
    b = OrderSampler(10, seed=3)
    b.take(4)
    state = b.state_dict()
    c = OrderSampler(10, seed=3)
    c.load_state_dict(state)
    assert c.take(10) == b.take(10)
    assert OrderSampler(10, seed=4).take(10) != OrderSampler(10, seed=3).take(10)
    with pytest.raises(ValueError, match="same data"):
        OrderSampler(11, seed=3).load_state_dict(state)


def test_causal_collator_pads_and_masks_the_prompt():
    items = [{"input_ids": torch.tensor([5, 6, 7, 8]), "prompt_length": 2},
             {"input_ids": torch.tensor([9, 10]), "n_bytes": 3}]
    batch = CausalCollator(pad_id=1)(items)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8], [9, 10, -100, -100]]
    assert "n_bytes" not in batch  # only when every item knows its bytes
    np.testing.assert_array_equal(CausalCollator(0)([items[1]])["labels"].numpy(), [[9, 10]])
