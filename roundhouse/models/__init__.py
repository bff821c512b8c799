"""Model registry and zoo.

`get(name)` returns a `ModelSpec`; `spec.build(BuildConfig(...))` returns an `nn.Module`.
Importing this package registers every built-in family: mlp, lenet, alexnet, vgg, nin,
googlenet, resnet, densenet; rnn_lm, gru_lm, lstm_lm, rnn_classifier, gpt, bert, moe;
bert_classifier, bert_tagger, gpt_classifier (fine-tuning heads); seq2seq;
vae, ddpm, ldm, dit; fasttext, dcgan.
`torchvision:<name>` and `package.module:callable` resolve through `adapters.py`.
"""

from roundhouse.models import (  # noqa: F401  (imported to register their specs)
    alexnet,
    bert,
    densenet,
    diffusion,
    fasttext,
    gan,
    googlenet,
    gpt,
    lenet,
    mlp,
    moe,
    nin,
    resnet,
    rnn,
    seq2seq,
    text_heads,
    vae,
    vgg,
)
from roundhouse.models.registry import (
    MODELS,
    BuildConfig,
    ModelSpec,
    build_model,
    get,
    list_models,
    parse_model_ref,
    register,
)
from roundhouse.models.summary import count_parameters, format_summary, summarize

__all__ = [
    "MODELS",
    "BuildConfig",
    "ModelSpec",
    "build_model",
    "count_parameters",
    "format_summary",
    "get",
    "list_models",
    "parse_model_ref",
    "register",
    "summarize",
]
