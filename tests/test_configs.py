"""Every shipped evaluation config parses (keys, types, referenced files), without loading models."""

from pathlib import Path

import pytest

from cascadevlm.cascade.evaluate import EVAL_TRAINER_DEFAULTS, EvaluateCLI
from cascadevlm.clip.module import ClipClassifier
from cascadevlm.data.datamodule import CascadeDataModule

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs" / "experiments").glob("*.yaml")) + [REPO / "configs" / "demo.yaml"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_evaluation_config_parses(path, capsys):
    with pytest.raises(SystemExit) as done:
        EvaluateCLI(ClipClassifier, CascadeDataModule, run=False, trainer_defaults=EVAL_TRAINER_DEFAULTS,
                    save_config_callback=None, args=["--config", str(path), "--print_config"])  # fmt: skip
    assert done.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "model_name:" in printed and "cascade:" in printed
