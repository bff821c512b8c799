"""fastText: hashed n-gram ids stay inside the table by construction; sparse gradients."""

from __future__ import annotations

import pytest
import torch

from roundhouse import models
from roundhouse.errors import ModelError
from roundhouse.models.fasttext import PAD_TOKEN, hash_ngrams


@pytest.mark.parametrize("buckets", [1, 7, 4096, 2**21, 2**40])
def test_hashed_ids_are_inside_the_buckets_for_any_token(buckets: int) -> None:
    gen = torch.Generator().manual_seed(buckets % 1000)
    tokens = torch.randint(-(2**40), 2**40, (64, 33), generator=gen)
    tokens[:, -5:] = PAD_TOKEN
    ids = hash_ngrams(tokens, ngrams=3, buckets=buckets)
    assert ids.shape == (64, 33 + 32 + 31)
    real = ids[ids != buckets]
    assert real.numel() > 0 and int(real.min()) >= 0 and int(real.max()) < buckets
    # Every window that touches padding is the padding row, and only those.
    assert bool((ids[:, 28:33] == buckets).all()) and bool((ids[:, :28] < buckets).all())


def test_ngrams_hash_the_window_not_its_position() -> None:
    tokens = torch.tensor([[1, 2, 1, 2, PAD_TOKEN]])
    ids = hash_ngrams(tokens, ngrams=2, buckets=2**21)
    unigrams, bigrams = ids[0, :5], ids[0, 5:]
    assert unigrams[0] == unigrams[2] and unigrams[1] == unigrams[3]
    assert bigrams[0] == bigrams[2] and bigrams[0] != bigrams[1]
    assert bigrams[3] == 2**21  # (2, PAD)


def test_forward_shape_and_sparse_gradient_rows() -> None:
    model = models.build_model("fasttext", models.BuildConfig(input_shape=(12,), num_classes=5))
    tokens = torch.randint(0, 256, (4, 12))
    tokens[0, 6:] = PAD_TOKEN
    logits = model(tokens)
    assert logits.shape == (4, 5)
    logits.sum().backward()
    grad = model.embed.weight.grad
    assert grad.is_sparse
    rows = grad.coalesce().indices()[0]
    expected = hash_ngrams(tokens, 2, 4096).unique()
    assert set(rows.tolist()) == set(expected.tolist()) - {4096}  # no padding row


def test_dense_option_and_bad_inputs() -> None:
    model = models.build_model(
        "fasttext", models.BuildConfig(input_shape=(8,), num_classes=3, options={"sparse": False})
    )
    model(torch.randint(0, 256, (2, 8))).sum().backward()
    assert not model.embed.weight.grad.is_sparse
    with pytest.raises(ModelError, match=r"\(T,\) token"):
        models.build_model("fasttext", models.BuildConfig(input_shape=(1, 8, 8)))
    with pytest.raises(ModelError, match="buckets"):
        models.build_model("fasttext", models.BuildConfig(input_shape=(8,), options={"buckets": 0}))


def test_debug_flavor_learns_a_token_rule() -> None:
    torch.manual_seed(0)
    model = models.build_model("fasttext", models.BuildConfig(input_shape=(16,), num_classes=2))
    optimizer = torch.optim.Adagrad(model.parameters(), lr=0.5)
    tokens = torch.randint(0, 128, (64, 16))
    target = (tokens[:, 0] % 2 == 0).long()
    tokens[:, 1:4] = torch.where(target[:, None] == 1, 200, 201)  # a class marker
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model(tokens), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    accuracy = (model(tokens).argmax(1) == target).float().mean()
    assert accuracy > 0.95


def _job(strategy: dict, **optimizer: object) -> dict:
    return {
        "name": "ft",
        "model": {"name": "fasttext", "flavor": "debug"},
        "data": {"source": "builtin:digits", "batch_size": 8},
        "trainer": {"max_steps": 1, "optimizer": {"name": "sgd", **optimizer}},
        "strategy": strategy,
        "cluster": {"num_workers": 2},
    }


def test_sparse_gradients_need_a_sparse_optimizer_and_no_deepspeed(
    tmp_path, capsys: pytest.CaptureFixture
) -> None:
    from roundhouse.config.loading import validate_job
    from roundhouse.errors import JobFileError
    from roundhouse.launch.cli import main
    from roundhouse.parallel.deepspeed.config import check_job
    from roundhouse.trainer.checks import check_sparse_optimizer

    check_sparse_optimizer(validate_job(_job({"kind": "ps"})))  # sgd: fine
    with pytest.raises(JobFileError, match=r"sparse gradients.*adam"):
        check_sparse_optimizer(validate_job(_job({"kind": "ps"}, name="adam")))
    with pytest.raises(JobFileError, match="weight_decay"):
        check_sparse_optimizer(validate_job(_job({"kind": "ring"}, weight_decay=0.1)))
    deepspeed = validate_job(_job({"kind": "deepspeed", "zero_stage": 0}))
    with pytest.raises(JobFileError, match="deepspeed cannot carry"):
        check_job(deepspeed, 2)
    dense = _job({"kind": "deepspeed", "zero_stage": 0})
    dense["model"]["options"] = {"sparse": False}
    check_job(validate_job(dense), 2)
    import yaml

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(_job({"kind": "deepspeed", "zero_stage": 0})))
    assert main(["train", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: model 'fasttext' makes sparse gradients")


def test_the_export_path_computes_the_bags_mean_in_onnx_ops() -> None:
    """Under tracing or ONNX export the bag is a gather and a masked mean (ONNX has no
    EmbeddingBag with padding_idx): the same logits, an all-padding text included."""
    model = models.build_model("fasttext", models.BuildConfig(input_shape=(10,), num_classes=3))
    tokens = torch.randint(0, 256, (5, 10))
    tokens[0, 4:] = PAD_TOKEN
    tokens[1, :] = PAD_TOKEN
    features = hash_ngrams(tokens, 2, 4096)
    torch.testing.assert_close(
        model.gathered_mean(features), model.embed(features), rtol=0, atol=1e-7
    )
