"""The documentation site's generated pages and its navigation (`make docs` builds it all)."""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _gen_pages():
    spec = importlib.util.spec_from_file_location("gen_pages", DOCS / "gen_pages.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the generators; main() runs only under mkdocs
    return module


def _nav_paths(nav) -> list[str]:
    out = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        out += _nav_paths(value) if isinstance(value, list) else [value]
    return out


def test_config_page_is_the_generated_reference():
    from agbcube.config import config_reference

    page = _gen_pages().config_page()
    assert page.endswith(config_reference())
    assert "`agb_range`" in page


def test_cli_page_lists_every_command_and_option():
    import typer

    from agbcube.cli import app

    page = _gen_pages().cli_page()
    group = typer.main.get_command(app)
    ctx = group.context_class(group, info_name="agbcube")
    for name in group.list_commands(ctx):
        assert f"## `agbcube {name}`" in page
        for param in group.get_command(ctx, name).params:
            if param.name != "help" and not type(param).__name__.endswith("Argument"):
                assert f"`{param.opts[0]}`" in page, (name, param.opts)
    assert "| `RUN_DIR` | required |" in page


def test_every_page_in_the_nav_exists_or_is_generated():
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)
    gen = _gen_pages()
    generated = {"reference/config.md", "reference/cli.md", "benchmarks.md"}
    generated |= {f"reference/api/{m}.md" for m in gen.API_MODULES}
    for path in _nav_paths(config["nav"]):
        assert path in generated or (DOCS / path).exists(), path
    for module in gen.API_MODULES:
        importlib.import_module(module)
    notebooks = {p.name for p in (ROOT / "notebooks").glob("*.ipynb")}
    assert {Path(p).name for p in _nav_paths(config["nav"]) if p.endswith(".ipynb")} == notebooks


def test_relative_links_between_pages_resolve():
    gen = _gen_pages()
    generated = {"reference/config.md", "reference/cli.md", "benchmarks.md"}
    generated |= {f"reference/api/{m}.md" for m in gen.API_MODULES}
    generated |= {"generated/folds_map_alpha.png", "generated/folds_map_gamma.png"}
    for page in DOCS.rglob("*.md"):
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            resolved = (page.parent / target).resolve()
            rel = (
                resolved.relative_to(DOCS.resolve()).as_posix()
                if resolved.is_relative_to(DOCS.resolve())
                else None
            )
            assert resolved.exists() or rel in generated, f"{page.name}: {target}"


def test_user_docs_speak_of_what_users_run_not_of_issues():
    """The README, BENCHMARKS.md (a docs page), the docs, notebooks and shipped configs cite no
    issue numbers of the project's tracker: a user cannot read them."""
    pages = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *ROOT.glob("configs/*.yaml")]
    pages += [*DOCS.rglob("*.md"), *DOCS.rglob("*.ipynb"), *ROOT.glob("notebooks/*.ipynb")]
    cited = re.compile(r"\bissues? ?#?\d|\bissues? \d+ (and|/) ", re.IGNORECASE)
    for page in pages:
        for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), start=1):
            assert not cited.search(line), f"{page.relative_to(ROOT)}:{n}: {line.strip()}"
