"""The docs site: its generated references cover the whole CLI and job schema, and it holds
together (docs/hooks.py, mkdocs.yml, README.md). No mkdocs build: `make docs` does that."""

from __future__ import annotations

import argparse
import importlib.util
import re
from pathlib import Path
from types import ModuleType
from typing import Literal

import pytest
import yaml
from pydantic import BaseModel, Field

from roundhouse.config import JobSpec, strategy_sections
from roundhouse.launch.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hooks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("roundhouse_docs_hooks", ROOT / "docs/hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """Every (sub)command path with its parser, walked here independently of the generator."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from commands(sub, (*path, name))


def sections_by_anchor(markdown: str) -> dict[str, str]:
    """Heading id -> the Markdown under that heading, up to the next heading."""
    parts = re.split(r"^#+ .*\{#([^}]+)\}$", markdown, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_every_command_and_argument_is_in_the_cli_reference(hooks: ModuleType) -> None:
    parser = build_parser()
    sections = sections_by_anchor(hooks.cli_reference(parser))
    found = list(commands(parser))
    assert {("train",), ("models", "summary"), ("jobs", "logs"), ("schema",)} <= {
        p for p, _ in found
    }
    for path, sub in found:
        anchor = "-".join(path)
        assert anchor in sections, f"roundhouse {' '.join(path)} has no section"
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if action.option_strings in (["--debug"], ["--verbose"]):
                continue  # documented once, for every command
            name = action.option_strings[0] if action.option_strings else action.metavar
            assert f"`{name or action.dest}" in sections[anchor], (path, action.dest)
    assert "`--debug`" in hooks.cli_reference(parser).split("## ")[0]


def test_every_job_section_strategy_kind_and_key_is_in_the_schema_reference(
    hooks: ModuleType,
) -> None:
    sections = sections_by_anchor(hooks.schema_reference(JobSpec))
    top = sections["top-level"]
    for name in JobSpec.model_fields:
        assert f"| `{name}` |" in top
    for name in ("model", "data", "trainer", "cluster", "tracking", "storage"):
        section = JobSpec.model_fields[name].annotation
        for key, field in section.model_fields.items():
            key = field.alias or key  # as a job file spells it
            assert f"| `{key}` |" in sections[name], f"{name}.{key}"
    kinds = strategy_sections()
    assert {"single", "ring", "ps", "deepspeed", "auto"} <= set(kinds)
    for kind, section in kinds.items():
        for key, field in section.model_fields.items():
            key = field.alias or key
            assert f"| `{key}` |" in sections[f"strategy-{kind}"], f"strategy.{key} ({kind})"
    nested = ["model-lora", "trainer-optimizer-param_groups", "trainer-distill", "data-augment"]
    for anchor in [*nested, "data-train", "data-val", "strategy-ps-slow_worker"]:
        assert anchor in sections
    assert "[section](#data-val) or null" in sections["data"]  # each key links its own heading


def test_types_defaults_and_descriptions_come_from_the_model(hooks: ModuleType) -> None:
    sections = sections_by_anchor(hooks.schema_reference(JobSpec))
    rows = {line.split(" | ")[0]: line for line in sections["trainer"].splitlines()}
    assert rows["| `grad_accum_steps`"].startswith("| `grad_accum_steps` | integer > 0 | `1` |")
    assert 'one of `"auto"`, `"fp32"`, `"bf16"`' in rows["| `precision`"]
    description = JobSpec.model_fields["trainer"].annotation.model_fields["freeze"].description
    assert description.split()[0] in rows["| `freeze`"]
    assert "| `name` | string at least 1 long" in sections["top-level"]
    assert '`{"kind": "single"}`' in sections["top-level"]  # the strategy's default


class _Base(BaseModel):
    kind: str


class _Alpha(_Base):
    """The alpha kind."""

    kind: Literal["alpha"]
    rate: float = Field(0.5, ge=0, description="How fast.")


class _Beta(_Base):
    kind: Literal["beta", "gamma"]


class _Inner(BaseModel):
    """Inner settings."""

    items: list[str] = Field(default_factory=list)
    async_: bool = Field(False, alias="async")


class _Spec(BaseModel):
    """A spec."""

    choice: _Base
    inner: _Inner | None = None


def test_a_tagged_union_documents_every_member_kind(hooks: ModuleType) -> None:
    sections = sections_by_anchor(hooks.schema_reference(_Spec))
    assert set(sections) == {"top-level", "choice-alpha", "choice-beta", "choice-gamma", "inner"}
    assert "| `rate` | number >= 0 | `0.5` | How fast. |" in sections["choice-alpha"]
    assert "[alpha](#choice-alpha)" in sections["top-level"]
    assert "[section](#inner) or null" in sections["top-level"]
    assert "| `items` | list of string | `[]` |" in sections["inner"]
    assert "| `async` | boolean | `false` |" in sections["inner"]  # the key, not the attribute


def test_the_hook_fills_the_reference_pages_and_only_them(hooks: ModuleType) -> None:
    cli_page = (ROOT / "docs/reference/cli.md").read_text()
    schema_page = (ROOT / "docs/reference/job-schema.md").read_text()
    assert hooks.CLI_MARKER in cli_page and hooks.SCHEMA_MARKER in schema_page
    filled = hooks.on_page_markdown(cli_page, None, None, None)
    assert hooks.CLI_MARKER not in filled and "## roundhouse train {#train}" in filled
    filled = hooks.on_page_markdown(schema_page, None, None, None)
    assert hooks.SCHEMA_MARKER not in filled and "{#strategy-deepspeed}" in filled
    assert hooks.on_page_markdown("# plain\n", None, None, None) == "# plain\n"


def test_guide_pages_join_the_nav(hooks: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "guide").mkdir()
    (tmp_path / "guide/listed.md").write_text("# a\n")
    (tmp_path / "guide/new.md").write_text("# b\n")
    config = {"docs_dir": str(tmp_path), "nav": [{"Home": "index.md"}, "guide/listed.md"]}
    assert hooks.on_config(config)["nav"][-1] == {"Guides": ["guide/new.md"]}


def test_the_nav_and_the_readme_name_only_files_that_exist(hooks: ModuleType) -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert config["hooks"] == ["docs/hooks.py"]
    pages = hooks.nav_pages(config["nav"])
    assert {"index.md", "reference/cli.md", "reference/job-schema.md", "ARCHITECTURE.md"} <= pages
    assert [p for p in pages if not (ROOT / "docs" / p).is_file()] == []
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme)
    assert links and [link for link in links if not (ROOT / link).is_file()] == []


def test_the_readme_is_a_short_landing_page_with_the_two_commands_first() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 200
    first_block = readme.split("```")[1]
    assert "make demo" in first_block and "make test" in first_block


def test_make_docs_is_strict_and_ci_runs_it_after_the_tests() -> None:
    makefile = (ROOT / "Makefile").read_text()
    build = next(line for line in makefile.splitlines() if "mkdocs build" in line)
    # --quiet hides the warnings that --strict counts: with it a broken link would pass.
    assert "--strict" in build and "--quiet" not in build and "-q " not in build
    ci = (ROOT / ".ci/run").read_text()
    assert ci.index("make test") < ci.index("make docs")
