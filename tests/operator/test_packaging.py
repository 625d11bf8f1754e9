"""The package lives in operator/ but must never shadow the standard library's `operator`; the CLI entry."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from gateway.cli import build_parser, main
from wsgateway_operator.cli import NAMESPACES_ENV, watched_namespaces
from wsgateway_operator.crd import CHART_CRD_PATH

ROOT = Path(__file__).resolve().parents[2]
STDLIB = Path(sysconfig.get_paths()["stdlib"]).resolve()


def test_import_operator_is_the_standard_library_here() -> None:
    import operator

    assert Path(operator.__file__).resolve().is_relative_to(STDLIB), operator.__file__
    assert operator.itemgetter(1)([0, 7]) == 7
    assert not (ROOT / "operator" / "__init__.py").exists()


def test_import_operator_is_the_standard_library_from_the_repo_root() -> None:
    """`python -c` puts the current directory (the repo root, which has an operator/ folder) first on
    sys.path; a namespace-package folder never wins over a real module, so stdlib stays."""
    code = ("import operator, sys; print(operator.__file__); print(operator.itemgetter(0)('x')); "
            "import wsgateway_operator; print(wsgateway_operator.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    operator_file, item, package_file = out.stdout.splitlines()
    assert Path(operator_file).resolve().is_relative_to(STDLIB), operator_file
    assert item == "x"
    assert Path(package_file).resolve() == ROOT / "operator" / "wsgateway_operator" / "__init__.py"


def test_crd_check_command() -> None:
    out = subprocess.run([sys.executable, "-m", "wsgateway_operator.crd", "--check", "--output", str(CHART_CRD_PATH)],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_operator_subcommand_arguments(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["operator", "-n", "a", "--namespace", "team-*", "--standalone",
                                      "--liveness", "http://0.0.0.0:8080/healthz"])
    assert watched_namespaces(args) == ["a", "team-*"] and args.standalone and not args.all_namespaces
    monkeypatch.setenv(NAMESPACES_ENV, "x, y,")
    assert watched_namespaces(build_parser().parse_args(["operator"])) == ["x", "y"]
    monkeypatch.delenv(NAMESPACES_ENV)
    assert main(["operator"]) == 2
    assert "say which namespaces" in capsys.readouterr().err
    assert main(["operator", "-A", "-n", "a"]) == 2
    with pytest.raises(SystemExit):
        build_parser().parse_args(["operator", "--peering", "p", "--standalone"])
