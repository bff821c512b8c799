"""`roundhouse sample`: PNG grids from image runs, text from LM runs, one-line errors."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from PIL import Image

from roundhouse.data.text import EOS_ID, decode, encode
from roundhouse.launch.cli import main
from roundhouse.launch.cli_sample import load_run
from tests.helpers.runs import only_run

ROOT = Path(__file__).resolve().parents[2]
COMMON = [
    "--local",
    "trainer.max_steps=2",
    "trainer.eval_every_steps=2",
    "trainer.checkpoint.every_steps=2",
    "tracking.wandb.mode=disabled",
    "tracking.console=off",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two-step runs of a class-conditional DDPM (8x8 digits) and a byte GPT."""
    storage = tmp_path_factory.mktemp("runs")
    ddpm = ["model.flavor=debug", "data.image_size=8", "data.batch_size=16"]
    assert (
        main(
            [
                "train",
                str(ROOT / "configs/ddpm_digits.yaml"),
                *COMMON,
                *ddpm,
                f"storage.path={storage}",
            ]
        )
        == 0
    )
    gpt = [
        "model.flavor=debug",
        "data.batch_size=4",
        "data.options={seq_len: 32, max_bytes: 60000}",
    ]
    assert (
        main(
            [
                "train",
                str(ROOT / "configs/gpt_pytext.yaml"),
                *COMMON,
                *gpt,
                f"storage.path={storage}",
            ]
        )
        == 0
    )
    return {"image": only_run(storage, "ddpm_digits"), "lm": only_run(storage, "gpt_pytext")}


def test_image_run_writes_a_png_grid_of_the_right_size(runs, tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    args = ["sample", str(runs["image"]), "--steps", "3", "--num", "6", "--class", "7"]
    assert main([*args, "--out", str(out)]) == 0
    with Image.open(out) as image:
        assert image.format == "PNG" and image.mode == "L"
        assert image.size == (3 * 9 + 1, 2 * 9 + 1)  # 3 x 2 tiles of 8x8, 1-pixel padding
    step_folder = runs["image"] / "checkpoints" / "step_2"
    out2 = tmp_path / "ddpm.png"
    assert (
        main(
            [
                "sample",
                str(step_folder),
                "--sampler",
                "ddpm",
                "--steps",
                "2",
                "--num",
                "1",
                "--guidance",
                "0",
                "--out",
                str(out2),
            ]
        )
        == 0
    )
    assert Image.open(out2).size == (10, 10)


def test_lm_run_prints_text_and_temperature_0_is_greedy(runs, capsys) -> None:
    base = ["sample", str(runs["lm"]), "--prompt", "def ", "--max-new-tokens", "12"]
    assert main([*base, "--temperature", "0"]) == 0
    printed = capsys.readouterr().out.rstrip("\n")
    model = load_run(str(runs["lm"])).model
    prompt = torch.tensor([[EOS_ID, *encode("def ")]])
    assert printed == decode(model.generate(prompt, 12)[0]) and printed.startswith("def ")
    assert main([*base, "--top-k", "1"]) == 0  # sampling among the top 1 is greedy
    assert capsys.readouterr().out.rstrip("\n") == printed
    sampled = [
        model.generate(prompt, 12, temperature=1.0, generator=torch.Generator().manual_seed(s))
        for s in (1, 1, 2)
    ]
    assert torch.equal(sampled[0], sampled[1]) and not torch.equal(sampled[0], sampled[2])


@pytest.mark.parametrize(
    ("which", "flags", "message"),
    [
        ("image", ["--prompt", "x"], "--prompt"),
        ("image", ["--temperature", "0.5"], "--temperature"),
        ("lm", ["--guidance", "2"], "--guidance"),
        ("image", ["--class", "12"], "--class 12"),
        (None, [], "no run at"),
    ],
)
def test_bad_input_is_one_line_exit_2(runs, capsys, which, flags, message, tmp_path) -> None:
    run = str(runs[which]) if which else str(tmp_path / "missing")
    assert main(["sample", run, *flags, "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not (tmp_path / "x.png").exists()


def test_parser_defaults_are_none_so_given_flags_are_detected() -> None:
    from roundhouse.launch.cli import build_parser

    args = build_parser().parse_args(["sample", "run"])
    assert isinstance(args, argparse.Namespace)
    assert args.guidance is None and args.temperature is None and args.seed == 0
