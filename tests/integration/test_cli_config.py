"""The shipped LightningCLI example reports a value a constructor refuses like a parse error."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from helpers import ROOT, load_example

EXAMPLE = ROOT / "examples" / "cli" / "train.py"

NESTED = """predictor:
          class_path: lightning_metagrad.SubspacePredictor
          init_args:
            threshold: 1.5"""


def test_an_invalid_nested_predictor_value_exits_2_naming_the_argument(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(sys, "argv", ["train.py"])  # LightningCLI also looks at sys.argv
    module = load_example("cli/train")
    shipped = (EXAMPLE.parent / "config.yaml").read_text()
    assert "predictor: anchored" in shipped
    config = tmp_path / "config.yaml"
    config.write_text(shipped.replace("predictor: anchored", NESTED))
    args = ["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_:
        module.main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "`threshold`" in err and "1.5" in err and "Traceback" not in err
