"""Rewrite the outputs of tests/agui_vectors.json (`out`, `messages`, `state`) from its inputs (`fold`,
`events`) with gateway/agui_map.py, keeping the file's layout (one event a line).

    .venv/bin/python scripts/gen_agui_vectors.py           # rewrite, then review `git diff tests/agui_vectors.json`
    .venv/bin/python scripts/gen_agui_vectors.py --check   # exit 1 if the file is not what the mapping produces

The inputs are the source: add a case by writing its `name`, `thread`, `fold` and `events` (with empty
outputs) and run this. The TypeScript twin must then produce the same outputs (clients/js/test/ag-ui.test.mjs,
which also runs them through @ag-ui/client's own verifier and state-applying pipeline), and
tests/test_agui_map.py checks docs/events.md's table against them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gateway.agui_map import AguiMapper  # noqa: E402

VECTORS = REPO / "tests" / "agui_vectors.json"


def _j(x: Any) -> str:
    return json.dumps(x, ensure_ascii=False, separators=(", ", ": "))


def render(doc: dict[str, Any]) -> str:
    parts = []
    for c in doc["cases"]:
        m = AguiMapper(c["thread"])
        for ev in c["fold"]:
            m.feed(ev)
        out = [m.prelude()] if c["fold"] else []
        out += [m.feed(ev) for ev in c["events"]]
        lines = [f'  {{"name": {_j(c["name"])}, "thread": {_j(c["thread"])},']
        for key in ("fold", "events"):
            body = ",\n".join("     " + _j(e) for e in c[key])
            inner = ("\n" + body + "\n   ") if body else ""
            lines.append(f'   "{key}": [{inner}],')
        groups = ["     [" + ",\n      ".join(_j(e) for e in o) + "]" if o else "     []" for o in out]
        lines.append('   "out": [\n' + ",\n".join(groups) + "\n   ],")
        lines.append(f'   "messages": {_j(m.messages)},')
        lines.append(f'   "state": {_j(m.state)}}}')
        parts.append("\n".join(lines))
    cases = ",\n".join(parts)
    return f'{{"about": {_j(doc["about"])},\n "cases": [\n{cases}\n ]}}\n'


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when the file differs")
    args = parser.parse_args(argv)
    current = VECTORS.read_text()
    text = render(json.loads(current))
    if args.check:
        if text != current:
            print(f"{VECTORS.relative_to(REPO)} is not what gateway/agui_map.py produces: run {__file__}")
            return 1
        return 0
    VECTORS.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
