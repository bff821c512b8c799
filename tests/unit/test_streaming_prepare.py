"""`data prepare` sources and `data inspect`, through the CLI and the library."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from roundhouse.data.streaming import (
    PrepareOptions,
    StreamConfig,
    StreamingDataset,
    WriteConfig,
    build_source,
    parse_size,
    prepare,
    read_index,
)
from roundhouse.errors import DataError
from roundhouse.launch.cli import main


def _first_batch(url: str, split: str = "train") -> dict:
    dataset = StreamingDataset(url, StreamConfig(split=split, global_batch_size=4, shuffle=False))
    return next(iter(dataset))[0]


def test_cli_prepare_and_inspect_digits(tmp_path, capsys):
    url = f"file://{tmp_path}/digits"
    assert main(["data", "prepare", "builtin:digits", url, "--shard-size", "40KB"]) == 0
    index = read_index(url)
    assert index.splits == {"train": 1438, "val": 179, "test": 180}
    assert len(index.shards) > 3 and index.num_classes == 10
    body = json.loads((tmp_path / "digits" / "index.json").read_text())
    assert body["format_version"] == 1 and body["codec"] == "zstd"
    assert all(len(s["sha256"]) == 64 for s in body["shards"])
    assert main(["data", "inspect", url, "--samples", "2"]) == 0
    out = capsys.readouterr().out
    assert "raw float32 [1, 8, 8]" in out and "split     val: 179 rows" in out
    assert out.count("sample    train-00000.parquet") == 2
    # Exactly the in-memory source's values (raw float32 is lossless).
    assert float(_first_batch(url)["input"].max()) <= 1.0
    assert main(["data", "prepare", "builtin:digits", url]) == 2
    assert "already holds a dataset" in capsys.readouterr().err


def test_png_images_round_trip(tmp_path):
    url = str(tmp_path / "syn")
    options = PrepareOptions(image_format="png", source_options={"num_samples": 40})
    prepare("builtin:synthetic", url, options, WriteConfig())
    batch = _first_batch(url)
    assert batch["input"].shape == (4, 3, 32, 32)
    # PNG stores uint8: decoded values are multiples of 1/255.
    scaled = batch["input"] * 255
    assert torch_allclose_int(scaled)


def torch_allclose_int(values) -> bool:
    return bool(((values - values.round()).abs() < 1e-4).all())


def test_image_folder(tmp_path):
    from PIL import Image

    for label, colour in (("cat", 40), ("dog", 200)):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        for k in range(5):
            Image.new("RGB", (10, 12), (colour, k, 0)).save(tmp_path / "imgs" / label / f"{k}.png")
    url = str(tmp_path / "pets")
    prepare(str(tmp_path / "imgs"), url, PrepareOptions(image_size=8), WriteConfig())
    index = read_index(url)
    assert index.input.shape == (3, 8, 8) and index.num_classes == 2
    batch = _first_batch(url)
    red = batch["input"][:, 0, 0, 0] * 255
    assert ((red.round() == 40) == (batch["target"] == 0)).all()
    (tmp_path / "imgs" / "dog" / "odd.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"cannot decode image .*odd.png"):
        build_source(str(tmp_path / "imgs"), PrepareOptions())


def test_npz_csv_jsonl_parquet(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.ones((10, 2, 3), np.float32), y=np.arange(10) % 3)
    np.save(tmp_path / "b.npy", np.zeros((6, 4), np.uint8))
    (tmp_path / "c.csv").write_text(
        "f1,f2,label\n" + "".join(f"{i},{i * 2},{i % 2}\n" for i in range(9))
    )
    (tmp_path / "d.jsonl").write_text(
        "".join(json.dumps({"v": [i, i], "y": i % 4}) + "\n" for i in range(8))
    )
    pq.write_table(pa.table({"a": [1.0, 2.0, 3.0], "target": [0, 1, 1]}), tmp_path / "e.parquet")
    cases = {
        "a.npz": ((2, 3), 3, PrepareOptions()),
        "b.npy": ((4,), None, PrepareOptions()),
        "c.csv": ((2,), 2, PrepareOptions(split=(0.5, 0.5))),
        "d.jsonl": ((2,), 4, PrepareOptions(input_field="v")),
        "e.parquet": ((1,), 2, PrepareOptions()),
    }
    for name, (shape, classes, options) in cases.items():
        url = str(tmp_path / f"out-{name}")
        index = prepare(str(tmp_path / name), url, options, WriteConfig())
        assert index.input.shape == shape and index.num_classes == classes, name
    assert set(read_index(str(tmp_path / "out-c.csv")).splits) == {"train", "val"}
    row = _first_batch(str(tmp_path / "out-c.csv"))
    assert row["input"].shape[1] == 2 and set(row["target"].tolist()) <= {0, 1}


def test_schema_that_does_not_fit(tmp_path):
    (tmp_path / "s.csv").write_text("name,label\nbob,1\nann,0\n")
    with pytest.raises(DataError, match=r"field 'name' has type string"):
        build_source(str(tmp_path / "s.csv"), PrepareOptions())
    (tmp_path / "l.csv").write_text("f,label\n1,cat\n2,dog\n")
    with pytest.raises(DataError, match=r"field 'label' has object values"):
        build_source(str(tmp_path / "l.csv"), PrepareOptions())
    with pytest.raises(DataError, match=r"field 'nope' is not in the source"):
        build_source(str(tmp_path / "l.csv"), PrepareOptions(target_field="nope"))


def test_hugging_face_folder_needs_datasets(tmp_path):
    pytest.importorskip("pyarrow")
    try:
        import datasets  # noqa: F401
    except ImportError:
        (tmp_path / "hf").mkdir()
        (tmp_path / "hf" / "dataset_info.json").write_text("{}")
        with pytest.raises(DataError, match=r"needs the `datasets` package"):
            build_source(str(tmp_path / "hf"), PrepareOptions())
    else:
        pytest.skip("datasets is installed")


def test_bad_inputs_one_line(tmp_path, capsys):
    assert main(["data", "inspect", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: dataset index not found") and "\n" not in err
    assert main(["data", "prepare", "builtin:nope", str(tmp_path / "x")]) == 2
    assert main(["data", "prepare", str(tmp_path / "missing.csv"), str(tmp_path / "x")]) == 2
    assert parse_size("64MB") == 64 << 20 and parse_size("1.5k") == 1536
    with pytest.raises(DataError):
        parse_size("lots")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "index.json").write_text("{not json")
    with pytest.raises(DataError, match=r"not a valid dataset index"):
        read_index(str(tmp_path / "bad"))
    assert Path(tmp_path / "x").exists() is False
