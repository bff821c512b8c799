"""`builtin:pydoc-cls`: the standard library's docstrings labelled by package, split by hash."""

from __future__ import annotations

import pytest
import torch

from roundhouse.config import DataConfig
from roundhouse.data.pydoc_corpus import (
    class_names,
    encode_padded,
    load_pydoc_classification,
    split_of,
    stdlib_docstrings,
)
from roundhouse.data.sources import build_source_splits
from roundhouse.data.text import PAD_ID, decode
from roundhouse.errors import DataError


def test_records_are_public_documented_functions() -> None:
    records = stdlib_docstrings()
    assert len(records) > 3000
    keys = [r.key for r in records]
    assert len(set(keys)) > 0.95 * len(keys)
    dumps = [r for r in records if r.module == "json" and r.qualname == "dumps"]
    assert dumps and dumps[0].signature.startswith("def dumps(obj")
    assert "JSON" in dumps[0].docstring
    assert not any(r.qualname.split(".")[-1].startswith("_") for r in records)
    assert not any(r.module.split(".")[0] in {"test", "idlelib"} for r in records)


def test_split_is_fixed_by_name_and_close_to_80_10_10() -> None:
    records = stdlib_docstrings()
    parts = [split_of(r.key) for r in records]
    assert parts == [split_of(r.key) for r in records]
    shares = torch.bincount(torch.tensor(parts), minlength=3).float() / len(parts)
    assert torch.allclose(shares, torch.tensor([0.8, 0.1, 0.1]), atol=0.03)


def test_classes_keep_only_packages_with_enough_examples() -> None:
    names = class_names(stdlib_docstrings(), 50)
    assert {"asyncio", "email", "logging", "unittest"} <= set(names)
    assert names == sorted(names)


def test_encode_padded_cuts_and_pads_with_pad_id() -> None:
    out = encode_padded(["abc", "x" * 10], 5)
    assert out.shape == (2, 5)
    assert decode(out[0]) == "abc" and out[0, 3:].tolist() == [PAD_ID, PAD_ID]
    assert decode(out[1]) == "xxxxx"


def test_source_splits_are_the_same_for_every_seed() -> None:
    config = DataConfig(source="builtin:pydoc-cls", options={"seq_len": 64})
    first = build_source_splits(config, seed=0)
    second = build_source_splits(config, seed=123)
    assert torch.equal(first.test.inputs, second.test.inputs)
    assert first.info.num_classes == len(class_names(stdlib_docstrings(), 50))
    assert first.info.input_shape == (64,)
    assert int(first.train.targets.max()) < first.info.num_classes


def test_bad_options_are_data_errors() -> None:
    with pytest.raises(DataError, match="min_per_class"):
        load_pydoc_classification({"min_per_class": 0})
    with pytest.raises(DataError, match="unknown option"):
        load_pydoc_classification({"vocab": 3})
    with pytest.raises(DataError, match=r"lower data\.options\.min_per_class"):
        load_pydoc_classification({"min_per_class": 100_000})
