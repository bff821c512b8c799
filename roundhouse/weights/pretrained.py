"""Pretrained weights from outside roundhouse: files, Hugging Face folders, torchvision dicts.

`model.init_from` names the weights a run starts from. This module reads the ones that are
not roundhouse runs (those need the trainer's checkpoint reader, `weights/finetune.py`):

- a `.safetensors` file, or any other file as a torch state dict (`weights_only=True`);
- a Hugging Face model folder (`config.json` + `model.safetensors`, else `pytorch_model.bin`):
  GPT-2 (`model_type: gpt2`) into `gpt`, BERT (`model_type: bert`) into `bert`. Its names are
  mapped onto the zoo's (GPT-2's Conv1D weights are stored `(in, out)` and are transposed; its
  fused `c_attn` is split into q/k/v), and `hf_build_options` turns config.json into the zoo
  model's options (width, layers, heads, vocabulary, positions, GELU variant, LayerNorm eps);
- torchvision state dicts load by name: the zoo's `resnet*`/`densenet*` flavors and the
  `torchvision:NAME` adapter use torchvision's module names; the zoo's `vgg*` flavors nest
  the same layers per block, and `align_by_order` maps torchvision's flat names onto them.

`apply_weights` then copies a name -> tensor dict into a model: every model tensor must be
there with its shape, except those matching `init_skip` globs; anything else is one
`CheckpointError` line with the counts and the first few names. Storage is any fsspec URL.
"""

from __future__ import annotations

import fnmatch
import io
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from roundhouse.errors import CheckpointError

logger = logging.getLogger(__name__)

HF_CONFIG = "config.json"
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
HF_MODELS = {"gpt2": "gpt", "bert": "bert"}  # config.json model_type -> zoo model
# Buffers Hugging Face checkpoints carry that have no counterpart (masks, position ids).
HF_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "position_ids")
HF_IGNORED_PREFIXES = ("pooler.", "cls.seq_relationship.")  # BertModel / pre-training heads
SHOWN = 3  # names listed per kind of mismatch


# --- reading ------------------------------------------------------------------------------------


def _fs(url: str) -> tuple[Any, str]:
    import fsspec

    return fsspec.core.url_to_fs(url)


def _join(url: str, name: str) -> str:
    return f"{url.rstrip('/')}/{name}"


def is_hf_folder(url: str) -> bool:
    """True when `url` is a folder holding a Hugging Face `config.json`."""
    fs, path = _fs(url)
    return fs.isdir(path) and fs.exists(_join(path, HF_CONFIG))


def read_hf_config(url: str) -> dict[str, Any]:
    """The folder's `config.json` as a dict."""
    fs, path = _fs(url)
    try:
        with fs.open(_join(path, HF_CONFIG), "r") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"model.init_from {url!r}: unreadable {HF_CONFIG}: {exc}", "check the folder"
        ) from None


def read_tensor_file(url: str) -> dict[str, Tensor]:
    """A `.safetensors` file, or a torch state dict loaded with `weights_only=True`."""
    fs, path = _fs(url)
    if not fs.isfile(path):
        raise CheckpointError(
            f"model.init_from {url!r} does not exist",
            "give a run folder, a checkpoints/step_N folder, a Hugging Face folder or a "
            "weights file",
        )
    with fs.open(path, "rb") as f:
        data = f.read()
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load

            return dict(load(data))
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors, pickle and zip errors have no common base
        raise CheckpointError(
            f"model.init_from {url!r} is not a readable weights file: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
            "pass a .safetensors file or a torch.save'd state dict",
        ) from None
    return _as_state_dict(state, url)


def _as_state_dict(state: Any, url: str) -> dict[str, Tensor]:
    """A plain name -> tensor dict (also from `{"state_dict": ...}`/`{"model": ...}` wrappers)."""
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(
            f"model.init_from {url!r} holds no state dict (name -> tensor)",
            "save the weights with torch.save(model.state_dict(), path)",
        )
    return dict(state)


def read_hf_weights(url: str) -> dict[str, Tensor]:
    """The weights file of a Hugging Face folder, names as stored."""
    fs, path = _fs(url)
    for name in HF_WEIGHTS:
        if fs.exists(_join(path, name)):
            return read_tensor_file(_join(url, name))
    raise CheckpointError(
        f"model.init_from {url!r} has {HF_CONFIG} but no {' or '.join(HF_WEIGHTS)}",
        "save the model with save_pretrained()",
    )


# --- Hugging Face: options and names ------------------------------------------------------------


def hf_model_type(config: Mapping[str, Any], url: str, model_name: str) -> str:
    """The zoo model config.json describes; another architecture is a `CheckpointError`."""
    kind = config.get("model_type")
    if HF_MODELS.get(kind) != model_name:
        wanted = [k for k, v in HF_MODELS.items() if v == model_name]
        raise CheckpointError(
            f"model.init_from {url!r} is a Hugging Face {kind!r} model, not one for "
            f"model.name={model_name!r}",
            f"{model_name!r} loads {' or '.join(wanted) or 'no Hugging Face'} folders; "
            f"Hugging Face folders load into {', '.join(sorted(set(HF_MODELS.values())))}",
        )
    return kind


def _activation(name: str) -> str:
    return "gelu_tanh" if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast") else "gelu"


def hf_build_options(config: Mapping[str, Any]) -> tuple[dict[str, Any], int]:
    """(zoo builder options, vocabulary size) that reproduce a GPT-2 or BERT config.json."""
    if config.get("model_type") == "gpt2":
        dim = config["n_embd"]
        options = {
            "dim": dim,
            "num_layers": config["n_layer"],
            "num_heads": config["n_head"],
            "mlp_ratio": (config.get("n_inner") or 4 * dim) // dim,
            "max_len": config["n_positions"],
            "positions": "learned",
            "norm": "pre",
            "tie_weights": config.get("tie_word_embeddings", True),
            "activation": _activation(config.get("activation_function", "gelu_new")),
            "norm_eps": config.get("layer_norm_epsilon", 1e-5),
        }
        return options, config["vocab_size"]
    dim = config["hidden_size"]
    options = {
        "dim": dim,
        "num_layers": config["num_hidden_layers"],
        "num_heads": config["num_attention_heads"],
        "mlp_ratio": config["intermediate_size"] // dim,
        "max_len": config["max_position_embeddings"],
        "positions": "learned",
        "norm": "post",
        "tie_weights": config.get("tie_word_embeddings", True),
        "activation": _activation(config.get("hidden_act", "gelu")),
        "norm_eps": config.get("layer_norm_eps", 1e-12),
        "embed_norm": True,
    }
    return options, config["vocab_size"]


def _strip(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k.removeprefix(prefix): v for k, v in state.items()}


def _drop_ignored(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {
        k: v
        for k, v in state.items()
        if not k.endswith(HF_IGNORED_SUFFIXES) and not k.startswith(HF_IGNORED_PREFIXES)
    }


GPT2_LAYER = {  # Hugging Face name inside `h.<i>.` -> ours inside `blocks.<i>.`; True: transpose
    "ln_1.weight": ("ln1.weight", False),
    "ln_1.bias": ("ln1.bias", False),
    "ln_2.weight": ("ln2.weight", False),
    "ln_2.bias": ("ln2.bias", False),
    "attn.c_proj.weight": ("attn.out_proj.weight", True),
    "attn.c_proj.bias": ("attn.out_proj.bias", False),
    "mlp.c_fc.weight": ("ffn.fc1.weight", True),
    "mlp.c_fc.bias": ("ffn.fc1.bias", False),
    "mlp.c_proj.weight": ("ffn.fc2.weight", True),
    "mlp.c_proj.bias": ("ffn.fc2.bias", False),
}
GPT2_TOP = {
    "wte.weight": "embed.tok.weight",
    "wpe.weight": "embed.pos.weight",
    "ln_f.weight": "head.norm.weight",
    "ln_f.bias": "head.norm.bias",
    "lm_head.weight": "head.proj.weight",
}


def convert_gpt2(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """GPT-2 (`GPT2LMHeadModel`/`GPT2Model`) names and layouts -> the zoo `gpt`'s.

    Unknown names pass through unchanged (and are reported as unexpected by `apply_weights`).
    """
    state = _drop_ignored(_strip(state, "transformer."))
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        layer, _, rest = name.removeprefix("h.").partition(".")
        if name.startswith("h.") and rest in ("attn.c_attn.weight", "attn.c_attn.bias"):
            kind = rest.rsplit(".", 1)[1]
            fused = tensor.t() if kind == "weight" else tensor  # Conv1D: (C, 3C) -> (3C, C)
            for proj, part in zip(("q", "k", "v"), fused.chunk(3, dim=0), strict=True):
                out[f"blocks.{layer}.attn.{proj}_proj.{kind}"] = part.contiguous()
        elif name.startswith("h.") and rest in GPT2_LAYER:
            ours, transpose = GPT2_LAYER[rest]
            out[f"blocks.{layer}.{ours}"] = tensor.t().contiguous() if transpose else tensor
        else:
            out[GPT2_TOP.get(name, name)] = tensor
    if "head.proj.weight" not in out and "embed.tok.weight" in out:
        out["head.proj.weight"] = out["embed.tok.weight"]  # tied, stored once
    return out


BERT_LAYER = {  # inside `encoder.layer.<i>.` -> inside `blocks.<i>.`
    "attention.self.query.": "attn.q_proj.",
    "attention.self.key.": "attn.k_proj.",
    "attention.self.value.": "attn.v_proj.",
    "attention.output.dense.": "attn.out_proj.",
    "attention.output.LayerNorm.": "ln1.",
    "intermediate.dense.": "ffn.fc1.",
    "output.dense.": "ffn.fc2.",
    "output.LayerNorm.": "ln2.",
}
BERT_TOP = {
    "embeddings.word_embeddings.weight": "embed.tok.weight",
    "embeddings.position_embeddings.weight": "embed.pos.weight",
    "embeddings.LayerNorm.weight": "embed.norm.weight",
    "embeddings.LayerNorm.bias": "embed.norm.bias",
    "cls.predictions.transform.dense.weight": "head.transform.0.weight",
    "cls.predictions.transform.dense.bias": "head.transform.0.bias",
    "cls.predictions.transform.LayerNorm.weight": "head.transform.2.weight",
    "cls.predictions.transform.LayerNorm.bias": "head.transform.2.bias",
    "cls.predictions.decoder.weight": "head.proj.weight",
    "cls.predictions.decoder.bias": "head.proj.bias",
    "cls.predictions.bias": "head.proj.bias",
}


def _bert_name(name: str) -> str:
    name = name.replace(".gamma", ".weight").replace(".beta", ".bias")  # TF-era checkpoints
    if name.startswith("encoder.layer."):
        layer, _, rest = name.removeprefix("encoder.layer.").partition(".")
        for theirs, ours in BERT_LAYER.items():
            if rest.startswith(theirs):
                return f"blocks.{layer}.{ours}{rest.removeprefix(theirs)}"
    return BERT_TOP.get(name, name)


def convert_bert(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """BERT (`BertForMaskedLM`/`BertModel`) names -> the zoo `bert`'s.

    Token-type embeddings have no counterpart: every token is of type 0, so row 0 is added to
    the position table (the sum the embedding computes is the same).
    """
    state = _drop_ignored(_strip(state, "bert."))
    token_type = state.pop("embeddings.token_type_embeddings.weight", None)
    out = {_bert_name(name): tensor for name, tensor in state.items()}
    if token_type is not None and "embed.pos.weight" in out:
        out["embed.pos.weight"] = out["embed.pos.weight"] + token_type[0]
    if "head.proj.weight" not in out and "embed.tok.weight" in out:
        out["head.proj.weight"] = out["embed.tok.weight"]
    return out


HF_CONVERTERS = {"gpt2": convert_gpt2, "bert": convert_bert}


# --- torchvision --------------------------------------------------------------------------------


def _modules_in_order(names: Iterable[str]) -> list[tuple[str, list[str]]]:
    """`[(module prefix, [tensor suffixes])]` in first-seen order."""
    modules: dict[str, list[str]] = {}
    for name in names:
        prefix, _, suffix = name.rpartition(".")
        modules.setdefault(prefix, []).append(suffix)
    return list(modules.items())


def align_by_order(source: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Rename `source` onto `model`'s names module by module, in order.

    torchvision's VGG numbers its layers flat (`features.3.weight`, `classifier.6.weight`); the
    zoo's `vgg` nests them per block (`features.1.0.weight`) with the same layers in the same
    order. When both list the same number of modules with the same tensors each, the i-th
    module's tensors take the model's i-th module's names (shapes are checked afterwards);
    otherwise `source` is returned unchanged.
    """
    ours = _modules_in_order(model.state_dict().keys())
    # Files may list names sorted (safetensors does): put them back in module order, top-level
    # parts as the model orders them, numbered layers by number.
    tops = list(dict.fromkeys(prefix.split(".")[0] for prefix, _ in ours))

    def module_order(name: str) -> tuple:
        top, *rest = name.split(".")
        rank = tops.index(top) if top in tops else len(tops)
        return (rank, [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in rest])

    theirs = sorted(_modules_in_order(source.keys()), key=lambda m: module_order(m[0]))
    if set(source) == {f"{p}.{s}" for p, suffixes in ours for s in suffixes}:
        return dict(source)
    if len(ours) != len(theirs) or any(
        sorted(a[1]) != sorted(b[1]) for a, b in zip(ours, theirs, strict=True)
    ):
        return dict(source)
    return {
        f"{mine}.{suffix}": source[f"{other}.{suffix}"]
        for (mine, suffixes), (other, _) in zip(ours, theirs, strict=True)
        for suffix in suffixes
    }


ALIGNERS = {"vgg": align_by_order}  # zoo models whose torchvision names need mapping


# --- applying -----------------------------------------------------------------------------------


@dataclass
class LoadReport:
    """What `apply_weights` did: tensors copied and tensors left as initialised."""

    loaded: int
    skipped: int


def matches_any(name: str, globs: Iterable[str]) -> bool:
    """True when `name` matches one of the `fnmatch` globs (case-sensitive)."""
    return any(fnmatch.fnmatchcase(name, g) for g in globs)


def _tied_names(model: nn.Module) -> dict[str, str]:
    """`{alias: first name}` for tensors `state_dict` lists under several names."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        aliases_to = first.setdefault(id(tensor), name)
        if aliases_to != name:
            aliases[name] = aliases_to
    return aliases


def _listing(names: list[str]) -> str:
    more = f", +{len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def check_fit(
    model: nn.Module, source: Mapping[str, Tensor], skip: list[str], url: str
) -> list[str]:
    """The model's tensor names to load from `source`; a mismatch is one `CheckpointError`."""
    target = model.state_dict(keep_vars=True)
    aliases = _tied_names(model)
    wanted = [n for n in target if not matches_any(n, skip)]
    missing = [n for n in wanted if n not in source and aliases.get(n) not in source]
    unexpected = [n for n in source if n not in target and not matches_any(n, skip)]
    wrong = [
        f"{n} {tuple(source[n].shape)} vs {tuple(target[n].shape)}"
        for n in wanted
        if n in source and tuple(source[n].shape) != tuple(target[n].shape)
    ]
    problems = [
        f"{len(found)} {kind} ({_listing(found)})"
        for kind, found in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrong-shaped", wrong),
        )
        if found
    ]
    if problems:
        raise CheckpointError(
            f"model.init_from {url!r} does not fit the model: {'; '.join(problems)}",
            "check model.name, flavor and options, or list the names in model.init_skip to "
            "leave them freshly initialised",
        )
    return [n for n in wanted if n in source]


def apply_weights(
    model: nn.Module, source: Mapping[str, Tensor], skip: list[str], url: str
) -> LoadReport:
    """Copy `source` into `model` in place (tensors matching `skip` keep their init)."""
    names = check_fit(model, source, skip, url)
    target = model.state_dict(keep_vars=True)
    if not any(t.is_meta for t in target.values()):
        with torch.no_grad():
            for name in names:
                target[name].copy_(source[name])
    report = LoadReport(loaded=len(names), skipped=sum(matches_any(n, skip) for n in target))
    logger.info(
        "init_from %s: %d tensors loaded, %d skipped (left as initialised)",
        url,
        report.loaded,
        report.skipped,
    )
    return report
