"""Keep the documentation true: README and docs/ are checked against the code they describe.

Each test reads the code's own definitions (Settings fields, metric objects, protocol constants,
modules) and fails when the documentation lost track of them, so a change in the code that is not
documented breaks the build instead of silently making the docs wrong.
"""

from __future__ import annotations

import os
import re
import subprocess
import unicodedata
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

import gateway.protocol as protocol
from gateway.auth import AUTH_FAILURE_REASONS
from gateway.config import Settings
from gateway.events import InvalidEvent
from gateway.metrics import CONNECTION_OUTCOMES, KIND_LABELS, REPLAY_SOURCES, Metrics

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
OUR_DOCS = ("protocol.md", "permissions.md", "architecture.md", "operations.md", "runbooks.md")


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _section(text: str, heading: str) -> str:
    """The body of the markdown section `heading` (e.g. "## Configuration") up to the next heading of
    the same or a higher level."""
    level = len(heading) - len(heading.lstrip("#"))
    lines = text.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == heading)
    except StopIteration:
        raise AssertionError(f"section {heading!r} not found") from None
    body = []
    for line in lines[start + 1 :]:
        m = re.match(r"^(#+)\s", line)
        if m and len(m.group(1)) <= level:
            break
        body.append(line)
    return "\n".join(body)


def _table_rows(text: str) -> list[list[str]]:
    """Cells of every markdown table row in `text` (header and separator rows excluded)."""
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("|") or re.fullmatch(r"\|[\s:|-]+\|", line):
            continue
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows[1:] if rows else rows  # drop the header row of the first table


def _without_code_blocks(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _render_default(value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


# --- README: configuration table -----------------------------------------------------------------


def _config_rows() -> dict[str, list[str]]:
    rows: dict[str, list[str]] = {}
    for cells in _table_rows(_section(_read(README), "## Configuration")):
        m = re.fullmatch(r"`(WSGATEWAY_[A-Z0-9_]+)`", cells[0])
        assert m, f"configuration row without a `WSGATEWAY_*` variable in its first cell: {cells}"
        assert m.group(1) not in rows, f"{m.group(1)} listed twice"
        rows[m.group(1)] = cells
    return rows


def test_settings_use_the_documented_prefix() -> None:
    assert Settings.model_config.get("env_prefix") == "WSGATEWAY_"


@pytest.mark.parametrize("field", sorted(Settings.model_fields))
def test_every_setting_is_in_the_readme_table_with_its_default(field: str) -> None:
    env = f"WSGATEWAY_{field.upper()}"
    rows = _config_rows()
    assert env in rows, f"{env} missing from the README configuration table"
    cells = rows[env]
    assert len(cells) == 3 and cells[2], f"{env}: expected | variable | default | meaning |, got {cells}"
    default = _render_default(Settings.model_fields[field].default)
    assert cells[1].strip("`") == default, f"{env}: README says default {cells[1]!r}, the code says {default!r}"


def test_readme_table_has_no_settings_the_code_does_not_know() -> None:
    known = {f"WSGATEWAY_{f.upper()}" for f in Settings.model_fields}
    assert set(_config_rows()) <= known, f"stale rows: {sorted(set(_config_rows()) - known)}"


def test_every_wsgateway_variable_named_in_the_docs_exists() -> None:
    from wsgateway_operator.cli import NAMESPACES_ENV
    from wsgateway_operator.controller import OPERATOR_ENV

    known = {f"WSGATEWAY_{f.upper()}" for f in Settings.model_fields} | {*OPERATOR_ENV.values(), NAMESPACES_ENV}
    for path in [README, *(DOCS / name for name in OUR_DOCS)]:
        named = set(re.findall(r"WSGATEWAY_[A-Z0-9_]*[A-Z0-9]", _read(path)))
        assert named <= known, f"{path.name} names unknown variables: {sorted(named - known)}"


# --- README: quick start -------------------------------------------------------------------------


def test_quick_start_is_exactly_make_run_and_make_test() -> None:
    section = _section(_read(README), "## Quick start")
    block = re.search(r"```(?:sh|bash|console)?\n(.*?)```", section, flags=re.S)
    assert block, "the quick start needs a code block with the commands"
    commands = [line.split("#", 1)[0].strip() for line in block.group(1).splitlines()]
    assert [c for c in commands if c] == ["make run", "make test"]


def test_make_targets_behind_the_quick_start_exist() -> None:
    makefile = _read(ROOT / "Makefile")
    run = re.search(r"^run:.*\n((?:\t.*\n)+)", makefile, flags=re.M)
    test = re.search(r"^test:.*\n((?:\t.*\n)+)", makefile, flags=re.M)
    assert run and "wsgateway dev" in run.group(1)
    assert test and "pytest" in test.group(1)
    assert "make test" in _read(ROOT / ".ci" / "run")


def _outside_make() -> dict[str, str]:
    """The environment without what a calling make passes down (`make test` runs this suite): a nested make
    would print "Entering directory" lines and inherit the caller's flags."""
    return {k: v for k, v in os.environ.items() if k not in {"MAKELEVEL", "MAKEFLAGS", "MFLAGS", "MAKEOVERRIDES"}}


def test_make_run_installs_only_the_venv_and_nats_server() -> None:
    """The demo's system dependency is nats-server alone; chromium, prometheus, npm tools, buildah come with
    `make test` (what `make -n -B run` would do: the venv, ensure-apt.sh nats-server, wsgateway dev)."""
    out = subprocess.run(["make", "--no-print-directory", "-n", "-B", "run"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, check=True, env=_outside_make())
    apt = [line.split()[1:] for line in out.stdout.splitlines() if line.startswith("scripts/ensure-apt.sh")]
    assert apt == [["nats-server=nats-server"]], out.stdout
    assert "ensure-npm" not in out.stdout and "build-" not in out.stdout, out.stdout
    assert out.stdout.splitlines()[-1] == ".venv/bin/wsgateway dev", out.stdout


# --- metrics -------------------------------------------------------------------------------------


def _metric_objects(monkeypatch: pytest.MonkeyPatch) -> list[MetricWrapperBase]:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    metrics = Metrics(CollectorRegistry())
    return [v for v in vars(metrics).values() if isinstance(v, MetricWrapperBase)]


def _exposed_name(metric: MetricWrapperBase) -> str:
    name: str = metric._name  # type: ignore[attr-defined]
    return f"{name}_total" if metric._type == "counter" else name  # type: ignore[attr-defined]


def _operations_row(exposed: str) -> list[str]:
    for cells in _table_rows(_read(DOCS / "operations.md")):
        if cells and cells[0] == f"`{exposed}`":
            return cells
    raise AssertionError(f"metric {exposed} has no row in the docs/operations.md metrics table")


def test_every_metric_in_the_source_is_a_metric_object(monkeypatch: pytest.MonkeyPatch) -> None:
    source = _read(ROOT / "gateway" / "metrics.py")
    in_source = set(re.findall(r'"(wsgateway_[a-z0-9_]+)"', source))
    objects = {m._name for m in _metric_objects(monkeypatch)}  # type: ignore[attr-defined]
    assert {n.removesuffix("_total") for n in in_source} == objects


def test_every_metric_is_documented_with_type_labels_and_label_values(monkeypatch: pytest.MonkeyPatch) -> None:
    metrics = _metric_objects(monkeypatch)
    assert metrics
    label_values = {
        "reason": set(AUTH_FAILURE_REASONS),
        "outcome": set(CONNECTION_OUTCOMES),
        "kind": set(KIND_LABELS),
        "source": set(REPLAY_SOURCES),
    }
    for metric in metrics:
        exposed = _exposed_name(metric)
        cells = _operations_row(exposed)
        assert metric._type in cells[1], f"{exposed}: type {metric._type} not in {cells[1]!r}"  # type: ignore[attr-defined]
        labels = metric._labelnames  # type: ignore[attr-defined]
        if not labels:
            assert cells[2] == "—", f"{exposed} has no labels, the docs say {cells[2]!r}"
        for label in labels:
            assert f"`{label}`" in cells[2], f"{exposed}: label {label} not documented"
        values = set()
        if exposed == "wsgateway_events_invalid_total":
            values = set(InvalidEvent.REASONS)
        elif exposed == "wsgateway_client_frames_rejected_total":
            values = {protocol.ERR_BAD_REQUEST, protocol.ERR_READ_ONLY}
        elif labels:
            values = label_values[labels[0]]
        for value in values:
            assert f"`{value}`" in cells[2], f"{exposed}: label value {value} not documented"


def test_every_operator_metric_is_documented_with_type_labels_and_label_values() -> None:
    from wsgateway_operator import metrics as op
    from wsgateway_operator.builders import ALL_KINDS

    registered = {family.name: family.type for family in op.OperatorMetrics().registry.collect()}
    assert registered == {m.name.removesuffix("_total"): m.type for m in op.METRICS}
    source = _read(ROOT / "operator" / "wsgateway_operator" / "metrics.py")
    assert set(re.findall(r'"(wsgateway_operator_[a-z0-9_]+)"', source)) == {m.name for m in op.METRICS}
    values = {"trigger": op.TRIGGERS, "outcome": op.OUTCOMES, "reason": op.ERROR_REASONS,
              "state": op.REPLICA_STATES, "type": op.CONDITION_TYPES, "kind": ALL_KINDS}
    for metric in op.METRICS:
        cells = _operations_row(metric.name)
        assert metric.type in cells[1], f"{metric.name}: type {metric.type} not in {cells[1]!r}"
        for label in metric.labels:
            assert f"`{label}`" in cells[2], f"{metric.name}: label {label} not documented"
            for value in values.get(label, ()):
                assert f"`{value}`" in cells[2], f"{metric.name}: label value {value} not documented"


# --- protocol ------------------------------------------------------------------------------------


def _protocol() -> str:
    return _read(DOCS / "protocol.md")


def _close_codes_in_code() -> dict[str, int]:
    codes = {n: v for n, v in vars(protocol).items() if n.startswith("CLOSE_") and isinstance(v, int)}
    import gateway.core.replay as replay

    codes["replay.CLOSE_INTERNAL"] = replay.CLOSE_INTERNAL
    return codes


def test_every_close_code_is_in_the_close_codes_table() -> None:
    table = {cells[0] for cells in _table_rows(_section(_protocol(), "## Close codes"))}
    for name, code in _close_codes_in_code().items():
        assert str(code) in table, f"{name} = {code} missing from the close codes table of docs/protocol.md"


def test_every_error_code_is_documented() -> None:
    table = {cells[0] for cells in _table_rows(_section(_protocol(), "## Error codes"))}
    for name, code in vars(protocol).items():
        if name.startswith("ERR_"):
            assert f"`{code}`" in table, f"error code {code} missing from docs/protocol.md"


def test_every_auth_failure_reason_is_documented() -> None:
    table = {cells[0] for cells in _table_rows(_section(_protocol(), "### Failure reasons (close 4401)"))}
    assert table == {f"`{r}`" for r in AUTH_FAILURE_REASONS}


def test_every_client_op_and_write_op_is_documented() -> None:
    text = _protocol()
    table = {cells[0] for cells in _table_rows(_section(text, "## Client frames"))}
    for model in (protocol.Subscribe, protocol.Unsubscribe, protocol.Refresh, protocol.Ping):
        op = model.model_fields["op"].annotation.__args__[0]  # type: ignore[union-attr]
        assert f"`{op}`" in table, f"client op {op} missing"
    for op in protocol.WRITE_OPS:
        assert f"`{op}`" in text, f"write op {op} missing"


def test_every_server_frame_type_is_documented() -> None:
    types = {"event"}
    for path in (ROOT / "gateway").rglob("*.py"):
        types |= set(re.findall(r'control\(\s*"([a-z_]+)"', _read(path)))
    table = {cells[0] for cells in _table_rows(_section(_protocol(), "## Server frames"))}
    assert {f"`{t}`" for t in types} <= table, f"undocumented frame types: {types - {c.strip('`') for c in table}}"


# --- architecture --------------------------------------------------------------------------------


def test_module_map_lists_every_module() -> None:
    text = _read(DOCS / "architecture.md")
    for path in sorted((ROOT / "gateway").rglob("*.py")):
        name = path.relative_to(ROOT).as_posix()
        assert f"`{name}`" in text, f"{name} missing from the module map"


# --- links ---------------------------------------------------------------------------------------


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = unicodedata.normalize("NFKC", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in _without_code_blocks(_read(path)).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = _slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files_and_anchors(path: Path) -> None:
    text = _without_code_blocks(_read(path))
    for target in re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        assert dest.exists(), f"{path.name}: link to missing file {target}"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest), f"{path.name}: link to missing anchor {target}"
