"""`roundhouse data prepare` and `roundhouse data inspect`.

roundhouse data prepare SOURCE URL [--shard-size 64MB] [--image-format raw|png] ...
roundhouse data prepare corpus.jsonl URL --tokenizer bytes --text-field text [--seq-len 128]
roundhouse data inspect URL [--samples 3]
"""

from __future__ import annotations

import argparse
from typing import Any

import yaml

from roundhouse.errors import DataError


def add_data_parser(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Adds `data prepare` and `data inspect` to the CLI."""
    data = commands.add_parser("data", parents=[common], help="prepare and inspect datasets")
    sub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    prep = sub.add_parser("prepare", parents=[common], help="write a source as Parquet shards")
    prep.add_argument("source", help="builtin:NAME, image folder, .npy/.npz, .csv/.jsonl, ...")
    prep.add_argument("url", help="destination folder, any fsspec URL (s3://, gs://, file://)")
    prep.add_argument("--shard-size", default="64MB", help="target shard size (default 64MB)")
    prep.add_argument("--block-rows", type=int, default=0, help="rows per shuffle block")
    prep.add_argument("--codec", default="zstd", help="zstd | snappy | lz4 | gzip | none")
    prep.add_argument("--image-format", default="raw", choices=("raw", "png"))
    prep.add_argument("--image-size", type=int, help="resize folder images to N x N")
    prep.add_argument("--split", help="train,val,test fractions, e.g. 0.8,0.1,0.1")
    prep.add_argument("--seed", type=int, default=0, help="seed of the row shuffle and split")
    prep.add_argument("--no-shuffle", action="store_true", help="keep the source's row order")
    prep.add_argument("--input-field", help="column/array holding the inputs")
    prep.add_argument("--target-field", help="column/array holding the targets (labels/values)")
    prep.add_argument(
        "--target-kind",
        choices=("auto", "class", "value"),
        default="auto",
        help="class ids, or float values for regression (auto: values when the targets are "
        "vectors or have a fractional part)",
    )
    prep.add_argument(
        "--option",
        "-o",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="built-in source option, e.g. -o num_samples=4096 -o shape=[3,64,64]",
    )
    prep.add_argument(
        "--tokenizer", help="text: tokenize and pack (bytes, or a Hugging Face tokenizer)"
    )
    prep.add_argument("--text-field", default="text", help="text: column holding documents")
    prep.add_argument("--seq-len", type=int, default=128, help="text: tokens per packed row")
    prep.add_argument("--overwrite", action="store_true", help="replace a dataset at URL")
    inspect = sub.add_parser("inspect", parents=[common], help="describe a prepared dataset")
    inspect.add_argument("url")
    inspect.add_argument("--samples", type=int, default=3, help="decoded samples to show")


def _fractions(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        parts = tuple(float(p) for p in text.split(","))
    except ValueError:
        parts = ()
    if not 1 <= len(parts) <= 3 or min(parts) <= 0:
        raise DataError(f"--split {text!r} is not 1 to 3 positive fractions", "e.g. 0.8,0.1,0.1")
    return parts


def _options(pairs: list[str]) -> dict[str, Any]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise DataError(f"--option {pair!r} is not KEY=VALUE", "e.g. -o num_samples=4096")
        options[key] = yaml.safe_load(value)
    return options


def _prepare(args: argparse.Namespace) -> int:
    from roundhouse.data.streaming import PrepareOptions, WriteConfig, parse_size, prepare

    options = PrepareOptions(
        image_format=args.image_format,
        image_size=args.image_size,
        split=_fractions(args.split),
        seed=args.seed,
        shuffle=not args.no_shuffle,
        input_field=args.input_field,
        target_field=args.target_field,
        target_kind=args.target_kind,
        source_options=_options(args.option),
        tokenizer=args.tokenizer,
        text_field=args.text_field,
        seq_len=args.seq_len,
    )
    config = WriteConfig(
        shard_bytes=parse_size(args.shard_size),
        codec=args.codec,
        block_rows=args.block_rows,
        overwrite=args.overwrite,
    )
    index = prepare(args.source, args.url, options, config)
    total = sum(s.bytes for s in index.shards)
    splits = ", ".join(f"{k} {v}" for k, v in index.splits.items())
    print(f"wrote {len(index.shards)} shards ({_size(total)}) to {args.url}: {splits}")
    return 0


def _size(num_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1024 or unit == "GB":
            return f"{num_bytes:.1f} {unit}" if unit != "B" else f"{int(num_bytes)} B"
        num_bytes /= 1024
    return f"{num_bytes:.1f} GB"


def _target_text(index: Any) -> str:
    """`int64, K classes`, `float32 values [shape]` (regression) or `-` without targets."""
    values = index.extra.get("target_shape")
    if values is not None:
        return f"float32 values {values}"
    return f"int64, {index.num_classes} classes" if index.num_classes else "-"


def _describe(url: str, index: Any) -> list[str]:
    schema = index.input
    lines = [
        f"dataset   {url}",
        f"format    version {index.format_version}, codec {index.codec}, source {index.source}",
        f"input     {schema.encoding} {schema.dtype} {list(schema.shape)}",
        f"target    {_target_text(index)}",
        f"total     {len(index.shards)} shards, {sum(index.splits.values())} rows, "
        f"{_size(sum(s.bytes for s in index.shards))}",
    ]
    for split, rows in index.splits.items():
        shards = [s for s in index.shards if s.split == split]
        blocks = sum(len(s.blocks) for s in shards)
        lines.append(
            f"split     {split}: {rows} rows, {len(shards)} shards, {blocks} blocks, "
            f"{_size(sum(s.bytes for s in shards))}"
        )
    lines.extend(
        f"  {s.name}  {s.rows} rows  {len(s.blocks)} blocks  {_size(s.bytes)}  "
        f"sha256 {s.sha256[:16]}"
        for s in index.shards[:8]
    )
    if len(index.shards) > 8:
        lines.append(f"  ... {len(index.shards) - 8} more shards")
    return lines


def _samples(url: str, index: Any, count: int) -> list[str]:
    import io

    import pyarrow.parquet as pq

    from roundhouse.data.streaming.codec import decode_table
    from roundhouse.data.streaming.storage import join, open_url, storage_errors

    if count <= 0:
        return []
    first = index.shards[0]
    fs, root = open_url(url)
    with storage_errors(f"shard {first.name}", join(url, first.name), "re-run data prepare"):
        table = pq.ParquetFile(io.BytesIO(fs.cat_file(join(root, first.name)))).read_row_group(0)
    batch = decode_table(table.slice(0, count), index.input)
    if index.input.dtype == "int32":
        return _text_samples(first.name, batch["input"], index)
    lines = []
    for k in range(batch["input"].shape[0]):
        x = batch["input"][k]
        target = f"target {batch['target'][k].tolist()}  " if "target" in batch else ""
        lines.append(
            f"sample    {first.name}[{k}]: {target}input {list(x.shape)} min {x.min():.3f} "
            f"max {x.max():.3f} mean {x.mean():.3f}"
        )
    return lines


def _text_samples(name: str, tokens: Any, index: Any) -> list[str]:
    extra = index.extra
    lines = [
        f"text      tokenizer {extra.get('tokenizer')}, vocabulary {extra.get('vocab_size')}, "
        f"seq_len {extra.get('seq_len')}, eos id {extra.get('eos_id')}"
    ]
    for k in range(tokens.shape[0]):
        row = tokens[k]
        shown = f"ids {row[:12].tolist()} ..."
        if extra.get("tokenizer") == "bytes":
            from roundhouse.data.text import decode

            shown = repr(decode(row[:60]))
        lines.append(f"sample    {name}[{k}]: {shown}")
    return lines


def _inspect(args: argparse.Namespace) -> int:
    from roundhouse.data.streaming import read_index

    index = read_index(args.url)
    for line in _describe(args.url, index) + _samples(args.url, index, args.samples):
        print(line)
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    """Runs `roundhouse data prepare|inspect`; returns the exit code."""
    if args.data_command == "prepare":
        return _prepare(args)
    return _inspect(args)
