"""The documents against the code, where that is cheap to check without running anything: every test the docs
name exists where they say, every error code docs/api.md promises is one the code gives (and the reverse), every
route the hardening tables name is one the service they name serves, every flag shown after `trainmetrics COMMAND`
or a benchmark script is one it takes, and every deploy/, bench/, scripts/ and docs/ path named exists."""

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "bench" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TESTS = REPO / "tests"


def functions_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


def all_functions_of() -> dict[str, set[Path]]:
    where: dict[str, set[Path]] = {}
    for path in TESTS.rglob("*.py"):
        for name in functions_of(path):
            where.setdefault(name, set()).add(path)
    return where


def files_named(text: str) -> set[Path]:
    """Test files a text names, by path (tests/x/test_y.py) or by file name alone (test_y.py)."""
    files = {REPO / path for path in re.findall(r"\b(tests/[\w/]+\.py)", text)}
    for name in re.findall(r"(?<![\w/])(test_\w+\.py)", text):
        files |= set(TESTS.rglob(name))
    return {path for path in files if path.exists()}


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: str(path.relative_to(REPO)))
def test_every_test_a_document_names_exists_where_it_says(doc):
    text = doc.read_text()
    where = all_functions_of()
    for path in re.findall(r"\b(tests/[\w/]+\.py)", text):
        assert (REPO / path).exists(), f"{doc.name} names {path}, which does not exist"
    for name in re.findall(r"(?<![\w/])(test_\w+)\.py", text):
        assert list(TESTS.rglob(f"{name}.py")), f"{doc.name} names {name}.py, which does not exist"
    # file::test, and the ::test after it
    for file, first, rest in re.findall(r"((?:tests/[\w/]+/)?test_\w+\.py)::(test_\w+)((?:,? ::test_\w+)*)", text):
        candidates = [REPO / file] if file.startswith("tests/") else list(TESTS.rglob(file))
        for name in [first, *re.findall(r"::(test_\w+)", rest)]:
            assert any(name in functions_of(path) for path in candidates if path.exists()), \
                f"{doc.name}: {file}::{name} does not exist"
    # a bare name ("test_stops_that_race_…" abbreviates: a prefix of one is enough)
    for name in set(re.findall(r"(?<![\w/.:])(test_\w+)\b(?!\.py)", text)):
        assert name in where or any(known.startswith(name) for known in where), \
            f"{doc.name} names {name}, no test of that name exists"


def test_the_tests_reliability_md_names_lie_in_the_files_its_sections_run():
    """Each section of docs/reliability.md gives the command that runs its tests: a test it names must be in a
    file that section names (its command, or a path beside the test)."""
    where = all_functions_of()
    text = (REPO / "docs" / "reliability.md").read_text()
    for section in re.split(r"\n## ", text):
        title = section.splitlines()[0]
        files = files_named(section)
        for name in set(re.findall(r"(?<![\w/.:])(test_\w+)\b(?!\.py)", section)):
            found = set().union(*(paths for known, paths in where.items() if known.startswith(name)))
            assert found & files, f'docs/reliability.md, "{title}": {name} is in {sorted(map(str, found))}, ' \
                                  "a file the section does not name"


def api_text() -> str:
    """docs/api.md with its line breaks as spaces (a `409` may end one line, its `conflict` start the next), and
    its "POST .../pause | resume | cancel" heading spelled out."""
    text = " ".join((REPO / "docs" / "api.md").read_text().split())
    return re.sub(r"(/\S+/)pause \| resume \| cancel", r"\1pause \1resume \1cancel", text)


def source_text() -> str:
    return "\n".join(path.read_text() for folder in ("trainmetrics", "jobserver", "analytics")
                     for path in (REPO / folder).rglob("*.py"))


def documented_codes() -> set[str]:
    """Error codes docs/api.md promises: its tables' rows and the `NNN code` it names in its text."""
    text = api_text()
    codes = set(re.findall(r"\| \d{3} \| `([a-z_]+)` \|", text))
    codes |= set(re.findall(r"`\d{3} ([a-z_]+)`", text))
    codes |= set(re.findall(r"\d{3} `([a-z_]+)`", text))
    return codes


def test_every_error_code_docs_api_md_promises_is_one_the_code_gives():
    source = source_text()
    from trainmetrics.analytics.prometheus import PrometheusError

    given = {f"prometheus_{kind}" for kind in PrometheusError.STATUS}
    codes = documented_codes()
    assert {"bad_request", "not_found", "prometheus_unavailable", "too_large", "conflict"} <= codes
    missing = sorted(code for code in codes if f'"{code}"' not in source and code not in given)
    assert missing == [], f"docs/api.md promises error codes the code never gives: {missing}"


def test_every_error_code_the_code_gives_is_in_docs_api_md():
    source = source_text()
    raised = set(re.findall(r'(?:ApiError|error_response)\(\s*\d{3},\s*"([a-z_]+)"', source))
    raised |= set(re.findall(r'\b\d{3}: "([a-z_]+)"', source))        # status -> code tables
    raised -= {"internal"}      # a bug's 500: "Nothing answers 500 with anything but the JSON shape"
    text = api_text()
    undocumented = sorted(code for code in raised if f"`{code}`" not in text and f" {code}`" not in text)
    assert undocumented == [], f"error codes the code gives that docs/api.md does not name: {undocumented}"


def routes():
    """The analytics' routes and the job server's (with the edge's /healthz and /metrics on both)."""
    from trainmetrics.analytics.app import ROUTES as ANALYTICS
    from trainmetrics.jobserver.app import ROUTES as SERVER

    analytics = {path for path, _endpoint in ANALYTICS} | {"/healthz", "/metrics"}
    server = {route.path for route in SERVER} | analytics
    return analytics, server


def matches(path: str, patterns: set[str]) -> bool:
    for pattern in patterns:
        regex = re.sub(r"\\\{[a-z_]+(:path)?\\\}", lambda m: ".+" if m.group(1) else "[^/]+", re.escape(pattern))
        if re.fullmatch(regex, path):
            return True
    return False


def test_every_route_the_injection_table_names_is_served_by_the_service_it_names():
    """docs/reliability.md's PromQL-injection table: 'analytics: GET /x' must be a route of the analytics."""
    analytics, server = routes()
    text = (REPO / "docs" / "reliability.md").read_text()
    section = text.split("### 2. PromQL injection", 1)[1].split("\n### ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "`" in line.split("|")[1]]
    assert rows
    for row in rows:
        cell = row.split("|")[1]
        services = {word for word in ("analytics", "server") if re.search(rf"\b{word}\b", cell.split(":")[0])}
        assert services, row
        for path in re.findall(r"`(?:GET|POST) (/[^`]*)`", cell):
            path = path.split("?")[0].replace("{job_id}", "j1").replace("{id}", "j1")
            path = path.replace("…", "/api/training/jobs/j1")
            for service in services:
                served = analytics if service == "analytics" else server
                assert matches(path, served), f"docs/reliability.md: {service} has no route {path}"


def test_every_route_is_in_docs_api_md():
    analytics, server = routes()
    text = api_text()
    for route in sorted(server):
        shown = re.sub(r"\{name:path\}", "{name}", route)
        assert shown in text, f"docs/api.md does not describe {route}"


def test_the_readme_layout_names_every_module():
    """README.md's "Layout": every module of each part is on its part's lines."""
    layout = (REPO / "README.md").read_text().split("## Layout", 1)[1].split("```")[1]
    lines: dict[str, str] = {}
    part = None
    for line in layout.splitlines():
        if line[:1].strip():
            part = line.split("/", 1)[0]
        if part:
            lines[part] = lines.get(part, "") + line
    for folder in ("trainmetrics", "trainer", "jobserver", "exporters", "analytics"):
        named = set(re.findall(r"\b(\w+)\.py\b", lines[folder]))
        modules = {path.stem for path in (REPO / folder).glob("*.py")} - {"__init__", "__main__"}
        assert modules <= named, f"README.md's layout leaves out {folder}/: {sorted(modules - named)}"


FENCED = re.compile(r"```[^\n]*\n(.*?)```", re.S)
COMMAND = re.compile(r"(?<![\w/-])trainmetrics (train|exporter|analytics|server|demo)\b([^|;&#\n]*)")
FLAG = re.compile(r"(?<![\w.-])(--[a-z][\w.-]*[a-z0-9])")


def commands_shown(text: str) -> list[tuple[str, str]]:
    """(command, the words after it) for every `trainmetrics COMMAND ...` in a fenced block (a line continued with
    a backslash read as one) or in an inline code span; a shell comment, pipe or `;` ends the command."""
    blocks = [re.sub(r"\\\n\s*", " ", block) for block in FENCED.findall(text)]
    spans = re.findall(r"`([^`]+)`", " ".join(FENCED.sub("", text).split()))
    return [match.groups() for chunk in blocks + spans for match in COMMAND.finditer(chunk)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: str(path.relative_to(REPO)))
def test_every_flag_a_document_gives_a_trainmetrics_command_is_one_that_command_takes(doc):
    """Nothing checked the flags the documents show after `trainmetrics COMMAND`: a renamed or misspelt one
    stayed in the text a user copies."""
    from trainmetrics.cli import build_parser

    parsers = build_parser().commands
    for command, words in commands_shown(doc.read_text()):
        for flag in FLAG.findall(words):
            assert flag in parsers[command]._option_string_actions, \
                f"{doc.name} shows `trainmetrics {command} {flag}`, which that command does not take"


def test_every_flag_a_document_gives_a_benchmark_is_one_that_script_takes():
    """The benchmarks' command lines in the documents (`bench/x.py --flag`) were not checked against the
    scripts' own arguments."""
    for doc in DOCS:
        text = re.sub(r"\\\n\s*", " ", doc.read_text())
        for script, words in re.findall(r"\b(bench/\w+\.py)\b([^|;&#\n`]*)", text):
            taken = set(re.findall(r'add_argument\(\s*"(--[\w.-]+)"', (REPO / script).read_text()))
            for flag in FLAG.findall(words):
                assert flag in taken, \
                    f"{doc.relative_to(REPO)} shows `{script} {flag}`, which that script does not take"


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: str(path.relative_to(REPO)))
def test_every_repository_file_a_document_names_exists(doc):
    """Paths under deploy/, bench/, scripts/ and docs/ were not checked: a file moved or renamed left the
    documents pointing at nothing."""
    text = doc.read_text()
    for path in set(re.findall(r"(?<![\w./-])((?:deploy|bench|scripts|docs)/[\w./-]*[\w/])", text)):
        assert (REPO / path).exists(), f"{doc.name} names {path}, which does not exist"
