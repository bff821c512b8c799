"""`model.init_from`: Hugging Face GPT-2/BERT parity, torchvision state dicts, files, errors.

The Hugging Face models are randomly initialised and `save_pretrained` to a temp folder (no
download); the zoo model built from that folder through the job path (`build_model_for` +
`apply_init_from`) must give the same logits within 1e-5.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from roundhouse.config import JobSpec
from roundhouse.config.loading import validate_job
from roundhouse.errors import CheckpointError
from roundhouse.launch.cli import main
from roundhouse.weights.finetune import apply_init_from
from roundhouse.weights.model_build import build_model_for
from tests.helpers.hf import save_random_gpt2

transformers = pytest.importorskip("transformers")


def job_with(name: str, flavor: str = "debug", **model: Any) -> JobSpec:
    return validate_job({"name": "ft", "model": {"name": name, "flavor": flavor, **model}})


def load(job: JobSpec, input_shape: tuple[int, ...], num_classes: int) -> torch.nn.Module:
    model = build_model_for(job, input_shape, num_classes)
    apply_init_from(model, job)
    return model.eval()


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    folder = tmp_path_factory.mktemp("gpt2")
    model = save_random_gpt2(folder)
    return folder, model


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    torch.manual_seed(1)
    config = transformers.BertConfig(
        vocab_size=300,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=40,
    )
    model = transformers.BertForMaskedLM(config).eval()
    folder = tmp_path_factory.mktemp("bert")
    model.save_pretrained(folder)
    return folder, model


def test_gpt2_folder_gives_the_same_logits(gpt2_folder: tuple[Path, Any]) -> None:
    folder, reference = gpt2_folder
    ours = load(job_with("gpt", init_from=str(folder)), (16,), 260)  # vocab from config.json
    tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = reference(tokens).logits, ours(tokens)
    assert got.shape == (2, 16, 300)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert ours.embed.pos.num_embeddings == 32  # max length from n_positions


def test_bert_folder_gives_the_same_logits(bert_folder: tuple[Path, Any]) -> None:
    folder, reference = bert_folder
    ours = load(job_with("bert", init_from=str(folder)), (24,), 260)
    tokens = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = reference(tokens).logits, ours(tokens)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_job_options_win_over_config_json(gpt2_folder: tuple[Path, Any]) -> None:
    folder, _ = gpt2_folder
    job = job_with("gpt", init_from=str(folder), options={"num_layers": 1})
    with pytest.raises(CheckpointError, match=r"unexpected \(blocks\.1\."):
        load(job, (16,), 260)


def test_a_folder_of_another_architecture_is_refused(bert_folder: tuple[Path, Any]) -> None:
    folder, _ = bert_folder
    with pytest.raises(CheckpointError, match="Hugging Face 'bert' model, not one for"):
        build_model_for(job_with("gpt", init_from=str(folder)), (16,), 260)


def torchvision_resnet18(path: Path, num_classes: int) -> torch.nn.Module:
    import torchvision

    torch.manual_seed(2)
    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    with torch.no_grad():  # non-trivial batch-norm statistics
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.9, 1.1)
    torch.save(model.state_dict(), path)
    return model.eval()


def test_torchvision_resnet18_state_dict_into_the_zoo_flavor(tmp_path: Path) -> None:
    reference = torchvision_resnet18(tmp_path / "r18.pt", 10)
    ours = load(job_with("resnet", "resnet18", init_from=str(tmp_path / "r18.pt")), (3, 32, 32), 10)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours(images), reference(images), rtol=0, atol=1e-5)


def test_new_head_needs_init_skip(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    reference = torchvision_resnet18(tmp_path / "r18.pt", 1000)
    job = job_with("resnet", "resnet18", init_from=str(tmp_path / "r18.pt"))
    with pytest.raises(CheckpointError, match=r"2 wrong-shaped \(fc\.weight \(1000, 512\) vs"):
        load(job, (3, 32, 32), 5)
    skipped = job_with("resnet", "resnet18", init_from=str(tmp_path / "r18.pt"), init_skip=["fc.*"])
    with caplog.at_level("INFO"):
        ours = load(skipped, (3, 32, 32), 5)
    assert "120 tensors loaded, 2 skipped" in caplog.text
    assert torch.equal(ours.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)


def test_torchvision_vgg_names_map_onto_the_zoo_vgg(tmp_path: Path) -> None:
    import torchvision

    torch.manual_seed(4)
    reference = torchvision.models.vgg11(weights=None, num_classes=10).eval()
    save_file(reference.state_dict(), str(tmp_path / "vgg.safetensors"))
    job = job_with("vgg", "vgg11", init_from=str(tmp_path / "vgg.safetensors"))
    ours = load(job, (3, 32, 32), 10)
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), reference(images), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        (b"not a checkpoint at all", "is not a readable weights file"),
    ],
)
def test_missing_or_corrupt_init_from_is_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes | None, message: str
) -> None:
    source = tmp_path / "weights.pt"
    if content is not None:
        source.write_bytes(content)
    code = main(
        [
            "train",
            "configs/quickstart.yaml",
            "--local",
            f"model.init_from={source}",
            f"storage.path={tmp_path / 'runs'}",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "runs").exists()


def test_max_steps_0_converts_a_safetensors_file_to_a_step_0_checkpoint(tmp_path: Path) -> None:
    job = validate_job({"name": "q", "model": {"name": "resnet"}})  # the quickstart's model
    model = build_model_for(job, (1, 8, 8), 10)
    weights = {
        k: torch.rand_like(v) if v.is_floating_point() else v + 3
        for k, v in model.state_dict().items()
    }
    save_file(weights, str(tmp_path / "w.safetensors"))
    code = main(
        [
            "train",
            "configs/quickstart.yaml",
            "--local",
            "trainer.max_steps=0",
            f"model.init_from={tmp_path / 'w.safetensors'}",
            f"storage.path={tmp_path}",
            "tracking.wandb.mode=disabled",
            "tracking.console=off",
        ]
    )
    assert code == 0
    (state,) = tmp_path.glob("*/*/checkpoints/step_0/state.pt")
    saved = torch.load(state, weights_only=True)["strategy"]["model"]
    for name, tensor in weights.items():
        assert torch.equal(saved[name], tensor), name


def test_init_from_reads_any_fsspec_url() -> None:
    import fsspec
    from safetensors.torch import save

    job = job_with("mlp")
    weights = {
        k: torch.rand_like(v) for k, v in build_model_for(job, (1, 8, 8), 10).state_dict().items()
    }
    with fsspec.open("memory://init/w.safetensors", "wb") as f:
        f.write(save(weights))
    model = load(job_with("mlp", init_from="memory://init/w.safetensors"), (1, 8, 8), 10)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, weights[name]), name
