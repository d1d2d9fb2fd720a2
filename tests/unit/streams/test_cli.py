"""``sensor-anomaly`` (streams.cli): what ``--help`` and ``serve`` import, and the dev-tool commands' errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from streams.cli import main

REPO = Path(__file__).resolve().parents[3]
# the evaluation code, plotting and the River baseline, and the training stack: never needed to serve
HEAVY = ("torch", "matplotlib", "river", "anomaly.evaluation", "anomaly.training", "pandas", "kafka")


def _loaded_after(code: str) -> list[str]:
    """Top-level names of HEAVY modules in ``sys.modules`` after running ``code`` in a fresh interpreter."""
    probe = (f"import sys\n{code}\n"
             f"import json; print(json.dumps(sorted({{m for m in sys.modules for h in {HEAVY!r} "
             f"if m == h or m.startswith(h + '.')}})))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_help_imports_neither_torch_nor_evaluation_nor_kafka() -> None:
    loaded = _loaded_after("from streams.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass")
    assert loaded == []


def test_serve_imports_no_evaluation_plotting_river_or_training() -> None:
    loaded = _loaded_after("import streams.cli, streams.config, streams.service")
    assert "torch" in loaded  # the detector needs it; the check below is not vacuous
    assert not [m for m in loaded if m.split(".")[0] in ("matplotlib", "river")
                or m.startswith(("anomaly.evaluation", "anomaly.training"))]


def test_evaluate_and_export_flags_are_added_when_the_command_is_given(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["export", "--help"])
    assert exc.value.code == 0
    assert "--since" in capsys.readouterr().out


@pytest.mark.parametrize(("command", "module"), [
    (["simulate", "--bootstrap", "localhost:1"], "streams.dev.simulator"),
    (["demo", "--seconds", "1"], "streams.dev.demo"),
])
def test_dev_commands_say_so_where_the_dev_package_is_absent(command: list[str], module: str,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # what an install without streams/dev looks like to import
    assert main(command) == 2
    err = capsys.readouterr().err
    assert "development tool" in err and "streams.dev" in err
    assert len(err.strip().splitlines()) == 1
