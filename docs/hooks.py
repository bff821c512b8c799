"""mkdocs hooks: the CLI and job-file references, generated from the code at every build.

`docs/reference/cli.md` and `docs/reference/job-schema.md` hold one marker each; at build time
`on_page_markdown` replaces it with Markdown generated from the argparse parser of
`roundhouse.launch.cli` and from the pydantic model `roundhouse.config.JobSpec`. Nothing
generated is committed, so the reference cannot drift from the code. `on_config` adds every
page under `docs/guide/` that the nav does not list yet to a "Guides" section.

The two generators are plain functions (`cli_reference`, `schema_reference`) that import no
mkdocs; `tests/unit/test_docs_reference.py` checks that they cover every subcommand, option,
job section, strategy kind and key.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import types
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # document this tree's roundhouse, whatever the venv points at
    sys.path.insert(0, str(ROOT))

CLI_MARKER = "<!-- roundhouse:cli-reference -->"
SCHEMA_MARKER = "<!-- roundhouse:job-schema-reference -->"
USAGE_COLUMNS = "96"
# The guide page that explains a section, by the section's heading id (the strict build checks
# every link; a section without an entry simply has no link).
GUIDES = {
    "model": ("Models", "models.md"),
    "model-lora": ("Adapters (LoRA)", "fine-tuning.md#adapters-lora"),
    "data": ("Data", "data.md"),
    "data-train": ("Training on a prepared dataset", "data.md#training-on-a-prepared-dataset"),
    "data-augment": ("Augmentation", "data.md#augmentation"),
    "trainer": ("Training features", "job-files.md#training-features"),
    "trainer-optimizer-param_groups": (
        "Freezing and parameter groups",
        "fine-tuning.md#freezing-and-parameter-groups",
    ),
    "trainer-checkpoint": ("Checkpoints and resuming", "runs.md#checkpoints-and-resuming"),
    "trainer-distill": ("Distillation", "fine-tuning.md#distillation"),
    "strategy-single": ("single", "strategies/single.md"),
    "strategy-ring": ("ring all-reduce", "strategies/ring.md"),
    "strategy-ps": ("Parameter server", "strategies/ps.md"),
    "strategy-deepspeed": ("DeepSpeed", "strategies/deepspeed.md"),
    "strategy-auto": ("Planning", "planning.md#strategy-kind-auto"),
    "cluster": ("Clusters and failures", "clusters.md"),
    "tracking": ("Runs, checkpoints and tracking", "runs.md#weights-biases"),
    "storage": ("The run folder", "runs.md#the-run-folder"),
}

# --- the command line --------------------------------------------------------------------------


def build_cli_parser() -> argparse.ArgumentParser:
    """The `roundhouse` parser, as the console script builds it."""
    from roundhouse.launch.cli import build_parser

    return build_parser()


def subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    """The `(name, parser)` pairs of a parser's subcommands, in the order they were added."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return list(action.choices.items())
    return []


def subcommand_help(parser: argparse.ArgumentParser) -> dict[str, str]:
    """The one-line help of each of a parser's subcommands."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {choice.dest: choice.help or "" for choice in action._choices_actions}
    return {}


def walk_commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser, str]]:
    """Every command below `parser`, depth first: `(("models", "summary"), parser, help)`."""
    helps = subcommand_help(parser)
    for name, sub in subcommands(parser):
        yield (*path, name), sub, helps.get(name, "")
        yield from walk_commands(sub, (*path, name))


def documented_actions(parser: argparse.ArgumentParser, skip: set[str]) -> list[argparse.Action]:
    """The arguments of `parser` to document: not help, not subcommands, not in `skip`."""
    return [
        action
        for action in parser._actions
        if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction))
        and action.help != argparse.SUPPRESS
        and not set(action.option_strings) & skip
    ]


def cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def argument_name(action: argparse.Action) -> str:
    """`--resume latest|PATH`, `-o, --option KEY=VALUE`, or a positional's name."""
    if not action.option_strings:
        name = action.metavar or action.dest
        suffix = {"*": " ...", "+": " ...", "?": " (optional)"}.get(str(action.nargs), "")
        return f"`{name}`{suffix}"
    names = ", ".join(action.option_strings)
    if action.nargs == 0:
        return f"`{names}`"
    metavar = action.metavar or action.dest.upper()
    return f"`{names} {metavar}`"


def argument_help(action: argparse.Action) -> str:
    """The help text, with its choices and any default that is not empty."""
    text = action.help or ""
    if "%(" in text:
        text = text % {**vars(action), "prog": ""}
    notes = []
    if action.choices and not isinstance(action, argparse._SubParsersAction):
        notes.append("one of " + ", ".join(f"`{c}`" for c in action.choices))
    default = action.default
    empty = action.nargs == 0 or default in (None, [], "", argparse.SUPPRESS)
    if not empty and f"default {default}" not in text and f"default: {default}" not in text:
        notes.append(f"default `{default}`")
    return cell("; ".join([text, *notes]) if text else "; ".join(notes))


@contextmanager
def fixed_columns() -> Iterator[None]:
    """argparse wraps usage to the terminal; make it the same on every machine."""
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = USAGE_COLUMNS
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old


def usage_text(parser: argparse.ArgumentParser) -> str:
    """The parser's usage without `usage: `, its continuation lines indented to match."""
    with fixed_columns():
        lines = parser.format_usage().rstrip().splitlines()
    prefix = len("usage: ")
    first = lines[0][prefix:]
    rest = [line[prefix:] if line[:prefix].isspace() else line for line in lines[1:]]
    return "\n".join([first, *rest])


def command_section(
    path: tuple[str, ...], parser: argparse.ArgumentParser, summary: str, skip: set[str]
) -> list[str]:
    """The Markdown of one (sub)command: heading, summary, usage, arguments table."""
    name = " ".join(path)
    anchor = "-".join(path)
    level = "#" * min(len(path) + 1, 4)
    usage = usage_text(parser)
    lines = [f"{level} roundhouse {name} {{#{anchor}}}", ""]
    if summary:
        lines += [summary[:1].upper() + summary[1:] + ".", ""]
    lines += ["```text", usage, "```", ""]
    actions = documented_actions(parser, skip)
    if actions:
        lines += ["| argument | what it does |", "|---|---|"]
        lines += [f"| {argument_name(a)} | {argument_help(a)} |" for a in actions]
        lines.append("")
    children = subcommands(parser)
    if children:
        links = ", ".join(f"[`{c}`](#{anchor}-{c})" for c, _ in children)
        lines += [f"Subcommands: {links}.", ""]
    return lines


def cli_reference(parser: argparse.ArgumentParser | None = None) -> str:
    """Markdown reference of every `roundhouse` command, subcommand and argument."""
    parser = parser or build_cli_parser()
    common = documented_actions(parser, set())
    skip = {s for action in common for s in action.option_strings}
    lines = [
        "Every command also takes these options:",
        "",
        "| option | what it does |",
        "|---|---|",
        *(f"| {argument_name(a)} | {argument_help(a)} |" for a in common),
        "",
        "Commands: " + ", ".join(f"[`{name}`](#{name})" for name, _ in subcommands(parser)) + ".",
        "",
    ]
    for path, sub, summary in walk_commands(parser):
        lines += command_section(path, sub, summary, skip)
    return "\n".join(lines).rstrip() + "\n"


# --- the job file ------------------------------------------------------------------------------


def job_spec() -> type:
    """The job file's pydantic model."""
    from roundhouse.config import JobSpec

    return JobSpec


def is_model(obj: Any) -> bool:
    """Whether `obj` is a pydantic model class."""
    return isinstance(obj, type) and hasattr(obj, "model_fields")


def tagged_sections(base: type) -> dict[str, type]:
    """`kind -> section class` for an open tagged union's base (e.g. the `strategy` sections).

    Every subclass that declares `kind: Literal[...]` is a member, as pydantic validates it;
    empty when `base` is an ordinary section.
    """
    found: dict[str, type] = {}
    pending = list(base.__subclasses__())
    while pending:
        cls = pending.pop(0)
        pending.extend(cls.__subclasses__())
        kind = cls.model_fields.get("kind")
        if kind is not None and typing.get_origin(kind.annotation) is typing.Literal:
            for value in typing.get_args(kind.annotation):
                found[value] = cls
    return found


def constraint_text(metadata: list[Any]) -> str:
    """`> 0`, `>= 0, < 1`, `matching ^[a-z]+$` from pydantic/annotated-types metadata."""
    parts = []
    for item in metadata:
        if hasattr(item, "metadata") and not hasattr(item, "gt"):  # a nested FieldInfo
            parts.append(constraint_text(list(item.metadata)).strip(" ,"))
            continue
        for attr, symbol in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            value = getattr(item, attr, None)
            if value is not None:
                parts.append(f"{symbol} {value}")
        if getattr(item, "min_length", None) is not None:
            parts.append(f"at least {item.min_length} long")
        if getattr(item, "pattern", None):
            parts.append(f"matching `{item.pattern}`")
    return ", ".join(p for p in parts if p)


def type_text(annotation: Any, link: str) -> str:
    """A readable type: `integer > 0 or null`, `one of "sync", "async"`, `list of string`.

    A section inside the type links to `#link`, the heading of that section.
    """
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        constraint = constraint_text(list(annotation.__metadata__))
        base = type_text(args[0], link)
        return f"{base} {constraint}" if constraint else base
    if origin in (typing.Union, types.UnionType):
        kept = [type_text(a, link) for a in args if a is not type(None)]
        text = " or ".join(kept)
        return text + " or null" if type(None) in args else text
    if origin is typing.Literal:
        values = ", ".join(f"`{json.dumps(a)}`" for a in args)
        return f"one of {values}" if len(args) > 1 else values
    if origin is list:
        return f"list of {type_text(args[0], link)}" if args else "list"
    if origin is tuple:
        return "[" + ", ".join(type_text(a, link) for a in args) + "]"
    if origin is dict:
        return "mapping" if not args else f"mapping of {type_text(args[1], link)}"
    if is_model(annotation):
        return f"[section](#{link})"
    names = {int: "integer", float: "number", str: "string", bool: "boolean", Any: "any"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def default_text(field: Any) -> str:
    """The default of a field as YAML-ish text (`required` when it has none)."""
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if is_model(type(value)):
        if type(value) is field.annotation:
            return "its defaults"
        return "`" + json.dumps(value.model_dump(mode="json")) + "`"
    if isinstance(value, tuple):
        value = list(value)
    return "`" + json.dumps(value) + "`"


def models_in(annotation: Any) -> list[tuple[type, str]]:
    """The section classes a field's type holds, each with a path suffix (`[]` for lists,
    `.<name>` for the values of a mapping such as `task.optimizers`)."""
    origin = typing.get_origin(annotation)
    if is_model(annotation):
        return [(annotation, "")]
    if origin is list:
        return [(m, "[]" + s) for m, s in models_in(typing.get_args(annotation)[0])]
    if origin is dict and len(typing.get_args(annotation)) == 2:
        return [(m, ".<name>" + s) for m, s in models_in(typing.get_args(annotation)[1])]
    if origin in (typing.Union, types.UnionType, typing.Annotated):
        found = []
        for arg in typing.get_args(annotation)[: 1 if origin is typing.Annotated else None]:
            found += models_in(arg)
        return found
    return []


class SchemaSection(typing.NamedTuple):
    """One section of the job file, as the reference documents it.

    Attributes:
        path: Its place in a job file, `trainer.optimizer`; a list of sections ends in `[]`.
        cls: Its pydantic model.
        kind: In a member of a tagged union (`strategy`) and below it, the `kind` that
            selects the member.
        anchor: The HTML id of its heading.
    """

    path: str
    cls: type
    kind: str | None
    anchor: str


def child_anchor(anchor: str, name: str, kind: str | None = None) -> str:
    """The heading id of the section at key `name` below the section `anchor`."""
    base = f"{anchor}-{name}" if anchor != "top-level" else name
    return f"{base}-{kind}" if kind else base


def schema_sections(spec: type | None = None) -> list[SchemaSection]:
    """Every section of the job file, parents before children.

    A tagged union (`strategy`) contributes one entry per kind, with `kind` set; a list of
    sections (`trainer.optimizer.param_groups`) has the path `...param_groups[]`.
    """
    spec = spec or job_spec()
    found: list[SchemaSection] = []

    def visit(section: SchemaSection) -> None:
        found.append(section)
        for name, field in keys(section.cls):
            for child, suffix in models_in(field.annotation):
                path = f"{section.path}.{name}{suffix}".lstrip(".")
                members = tagged_sections(child) or {None: child}
                for kind, member in members.items():
                    anchor = child_anchor(section.anchor, name, kind)
                    visit(SchemaSection(path, member, kind or section.kind, anchor))

    visit(SchemaSection("", spec, None, "top-level"))
    return found


def keys(cls: type) -> list[tuple[str, Any]]:
    """`(key, field)` of a section, the key as a job file spells it (its alias, if any)."""
    return [(field.alias or name, field) for name, field in cls.model_fields.items()]


def doc_text(cls: type) -> str:
    """A class docstring, cleaned of its indentation."""
    return inspect.cleandoc(cls.__doc__ or "").strip()


def field_type(section: SchemaSection, name: str, field: Any) -> str:
    """The type column of one key: a readable type, or links to a tagged union's members."""
    kinds = tagged_sections(field.annotation) if is_model(field.annotation) else {}
    if kinds:
        links = ", ".join(f"[{k}](#{child_anchor(section.anchor, name, k)})" for k in kinds)
        return f"a section chosen by `kind`: {links}"
    text = type_text(field.annotation, child_anchor(section.anchor, name))
    extra = constraint_text(list(field.metadata))
    return f"{text} {extra}" if extra else text


def description(section: SchemaSection, name: str, field: Any) -> str:
    """A key's `Field(description=...)`; for a key without one that holds a section, the
    first line of that section's docstring."""
    if field.description:
        return field.description
    if name == "kind" and section.kind:
        return f"`{section.kind}` selects this section."
    if is_model(field.annotation) and tagged_sections(field.annotation):
        return "How workers share a step: chosen by `kind`, each kind with its own keys."
    children = models_in(field.annotation)
    return doc_text(children[0][0]).split("\n")[0] if children else ""


def section_markdown(section: SchemaSection) -> list[str]:
    """One section's heading, description and table of keys."""
    title = f"`{section.path}`" if section.path else "Top level"
    if section.kind:
        title += f" (`kind: {section.kind}`)"
    lines = [f"## {title} {{#{section.anchor}}}", ""]
    if doc_text(section.cls):
        lines += [doc_text(section.cls), ""]
    if section.anchor in GUIDES:
        title, page = GUIDES[section.anchor]
        lines += [f"Guide: [{title}](../{page}).", ""]
    lines += ["| key | type | default | description |", "|---|---|---|---|"]
    for name, field in keys(section.cls):
        row = (
            f"`{name}`",
            field_type(section, name, field),
            default_text(field),
            description(section, name, field),
        )
        lines.append("| " + " | ".join(cell(c) for c in row) + " |")
    return [*lines, ""]


def schema_reference(spec: type | None = None) -> str:
    """Markdown reference of every job-file section, key, type, default and description."""
    lines = []
    for section in schema_sections(spec):
        lines += section_markdown(section)
    return "\n".join(lines).rstrip() + "\n"


# --- mkdocs hooks ------------------------------------------------------------------------------


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Replace the reference markers with the generated Markdown."""
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_reference())
    if SCHEMA_MARKER in markdown:
        markdown = markdown.replace(SCHEMA_MARKER, schema_reference())
    return markdown


def nav_pages(nav: Any) -> set[str]:
    """Every page path named anywhere in an mkdocs nav."""
    if isinstance(nav, str):
        return {nav}
    if isinstance(nav, dict):
        return set().union(*(nav_pages(v) for v in nav.values()))
    if isinstance(nav, list):
        return set().union(*(nav_pages(v) for v in nav)) if nav else set()
    return set()


def guide_pages(docs_dir: Path, listed: set[str]) -> list[str]:
    """The pages under `docs/guide/` the nav does not list, sorted."""
    guide = docs_dir / "guide"
    found = sorted(p.relative_to(docs_dir).as_posix() for p in guide.glob("**/*.md"))
    return [p for p in found if p not in listed]


def on_config(config: Any) -> Any:
    """Add the `docs/guide/` pages that the nav does not list to a "Guides" section."""
    nav = config.get("nav")
    if nav is None:
        return config
    extra = guide_pages(Path(config["docs_dir"]), nav_pages(nav))
    if extra:
        nav.append({"Guides": extra})
    return config
