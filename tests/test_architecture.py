"""The import rules of docs/architecture.md, enforced from the real import graph: every import statement of
every module (those inside functions included), and what importing each service really loads."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The repository's folders and the import names they install as (pyproject's package-dir mapping).
PARTS = {"trainer": "trainer", "jobserver": "jobserver", "exporters": "exporters", "analytics": "analytics",
         "trainmetrics": "core"}
# Modules of the core that wire the parts together (the command line, the one-URL service, the demo).
COMPOSITION = {"trainmetrics.cli", "trainmetrics.service", "trainmetrics.demo", "trainmetrics.__main__"}
HEAVY = {"torch", "torchvision", "sklearn", "tqdm", "ray"}
# The one place Ray may be imported: the job server's Ray executor and its launcher (an optional extra).
RAY_MODULES = ("trainmetrics.jobserver.ray_executor", "trainmetrics.jobserver.ray_launch")
# What each part may not import (beyond itself and the core).
FORBIDDEN = {
    "core": {"trainer", "jobserver", "exporters", "analytics", *HEAVY},
    "trainer": {"jobserver", "exporters", "analytics"},
    "jobserver": {"trainer", "exporters", "analytics", *HEAVY},
    "exporters": {"trainer", "jobserver", "analytics", *HEAVY},
    "analytics": {"trainer", "jobserver", "exporters", *HEAVY},
}


def module_name(path: Path) -> str:
    relative = path.relative_to(REPO).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts if parts[0] == "trainmetrics" else ["trainmetrics", *parts])


def imports_of(path: Path, name: str) -> set[str]:
    """Every module name an import statement in the file names, relative imports resolved."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def part_of(module: str) -> str | None:
    """Which part a module name belongs to; a third-party top-level name for the heavy ones; None otherwise."""
    pieces = module.split(".")
    if pieces[0] == "trainmetrics":
        return PARTS.get(pieces[1], "core") if len(pieces) > 1 and pieces[1] in PARTS else "core"
    return pieces[0] if pieces[0] in HEAVY else None


def sources() -> list[tuple[Path, str, str]]:
    found = []
    for folder, part in PARTS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            found.append((path, module_name(path), part))
    return found


def test_the_sources_are_where_the_rules_expect_them():
    names = {name for _, name, _ in sources()}
    assert {"trainmetrics.contract", "trainmetrics.edge", "trainmetrics.trainer.metrics", "trainmetrics.jobserver.app",
            "trainmetrics.analytics.app", "trainmetrics.exporters.exporter"} <= names


@pytest.mark.parametrize("path,name,part", sources(), ids=[name for _, name, _ in sources()])
def test_each_module_keeps_to_its_parts_import_rules(path, name, part):
    imported = imports_of(path, name)
    old_names = sorted(m for m in imported if m.split(".")[0] in ("trainer", "jobserver", "exporters", "analytics"))
    assert not old_names, f"{name} imports by a repository folder name, not as trainmetrics.*: {old_names}"
    if name in COMPOSITION:
        return
    forbidden = FORBIDDEN[part] - ({"ray"} if name in RAY_MODULES else set())
    broken = sorted(m for m in imported if part_of(m) in forbidden)
    assert not broken, f"{name} ({part}) may not import {broken}"


def test_the_services_load_without_torch():
    code = ("import sys\n"
            "import trainmetrics.analytics.app, trainmetrics.jobserver.app, trainmetrics.exporters.exporter\n"
            "import trainmetrics.exporters.cli, trainmetrics.service, trainmetrics.cli\n"
            "import trainmetrics.exporters.collectors.jobs, trainmetrics.exporters.collectors.gpu\n"
            "import trainmetrics.trainer.metrics, trainmetrics.trainer.cli\n"   # the library and --help
            "import trainmetrics.jobserver.executors, trainmetrics.jobserver.supervisor\n"
            "trainmetrics.cli.build_parser()\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'sklearn', 'ray'))\n"
            "assert not heavy, heavy\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_stop_handlers_load_nothing_before_they_are_installed():
    """`python -m trainmetrics train` installs its stop handlers first: a stop signal before then kills the job
    with no result. Importing the contract there (for one function) put ~20 ms warm, and its first compile in a
    fresh checkout, before them: a SIGUSR1 0.15 s into the process killed it."""
    code = ("import sys, trainmetrics.trainer.stopping\n"
            "print(sorted(m for m in sys.modules if m.startswith('trainmetrics')))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == str(["trainmetrics", "trainmetrics.signals", "trainmetrics.trainer",
                                         "trainmetrics.trainer.stopping"]), result.stderr[-2000:]
