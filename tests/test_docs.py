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


def test_package_page_lists_every_export_where_it_is_documented():
    """`import agbcube`'s names are lazy (PEP 562), invisible to mkdocstrings: the page lists
    each, linked to its module's page or rendered there."""
    import agbcube

    page = _gen_pages().package_page()
    for name in agbcube.__all__:
        if name != "__version__":
            assert f"| `{name}` |" in page, name
    assert "[`agbcube.config`](agbcube.config.md#agbcube.config.load_config)" in page
    assert "::: agbcube._store.open_cube" in page  # a private module's export, rendered here


def test_docstrings_use_no_sphinx_roles():
    """mkdocstrings shows Sphinx roles (:class:`x`) as raw text: docstrings use `x`."""
    role = re.compile(r":(py:)?(class|func|meth|mod|attr|data|exc|obj|ref|const):`")
    for path in (ROOT / "agbcube").rglob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            assert not role.search(line), f"{path.relative_to(ROOT)}:{n}: {line.strip()}"


def test_site_url_is_set_for_the_404_page():
    """Without site_url, 404.html's links are relative to wherever the missing page was."""
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)
    env, default = config["site_url"]  # !ENV [variable, default]
    assert env == "AGBCUBE_SITE_URL" and default.startswith("http") and default.endswith("/")
