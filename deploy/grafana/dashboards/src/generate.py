"""Generate deploy/grafana/dashboards/*.json and docs/dashboards.md from the builders beside this file.

    python deploy/grafana/dashboards/src/generate.py           # write the JSON and the docs
    python deploy/grafana/dashboards/src/generate.py --check   # exit 1 if a committed file differs
"""

import argparse
import json
import sys
from pathlib import Path

from grafana_foundation_sdk.cog.encoder import JSONEncoder

import compare
import fleet
import node
import training_job

OUTPUT_DIR = Path(__file__).resolve().parent.parent
DOCS_PATH = OUTPUT_DIR.parents[2] / "docs" / "dashboards.md"
DASHBOARDS = {"training-job.json": training_job, "node.json": node, "fleet.json": fleet, "compare.json": compare}
DOCS_INTRO = """# Dashboards

Generated from code (`deploy/grafana/dashboards/src/`, grafana-foundation-sdk) into
`deploy/grafana/dashboards/*.json`, and provisioned by `deploy/grafana/provisioning/` (datasource with a
250 ms `timeInterval`, dashboards folder `trainmetrics`). Edit the Python, then run
`.venv/bin/python deploy/grafana/dashboards/src/generate.py`; `make test` fails when the committed JSON or
this page differ from what the code generates, and runs every panel query against a real Prometheus.
This page is generated too: panel descriptions are the single source.

Rate windows are `$__rate_interval`, panels go down to 1 s per point, and the refresh picker offers 1 s.
"""


def render() -> dict[Path, str]:
    """Output path → text: the dashboard JSON files and docs/dashboards.md."""
    encoder = JSONEncoder(sort_keys=True, indent=2)
    files = {OUTPUT_DIR / name: encoder.encode(module.build().build()) + "\n" for name, module in DASHBOARDS.items()}
    files[DOCS_PATH] = render_docs([json.loads(text) for text in files.values()])
    return files


def render_docs(dashboards: list[dict]) -> str:
    """A section per dashboard: what it is for, its variables, and what each panel answers."""
    parts = [DOCS_INTRO]
    for board in dashboards:
        variables = [v["name"] for v in board["templating"]["list"] if v["type"] != "datasource"]
        marks = [item["name"] for item in board.get("annotations", {}).get("list", []) if item.get("expr")]
        marked = (f" Annotations on every time-series panel where their alerts fire (not while pending): "
                  f"{', '.join(marks)}.") if marks else ""
        parts.append(f"\n## {board['title']}\n\n{board['description']}\n\n"
                     f"uid `{board['uid']}`; variables: {', '.join(f'`{v}`' for v in variables) or 'none'}.{marked}"
                     "\n\n| panel | what it answers |\n|---|---|\n")
        for panel in board["panels"]:
            if panel["type"] == "row":
                parts.append(f"| **{panel['title']}** | |\n")
            else:
                parts.append(f"| {panel['title']} | {panel['description']} |\n")
    return "".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with the committed files instead of writing")
    args = parser.parse_args()
    stale = []
    for path, text in render().items():
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
    if stale:
        print(f"stale generated files (run {Path(__file__).name}): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
