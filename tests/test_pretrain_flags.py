"""cascadevlm.zoo.pretrain's flags: a bad value is refused in one line before any data or training."""

from __future__ import annotations

import pytest

from cascadevlm.zoo import pretrain


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--clip-from", "/no/such/clip.safetensors"], "--clip-from /no/such/clip.safetensors is not a file"),
        (["--letters-fraction", "2"], "--letters-fraction must be in [0, 1], got 2.0"),
    ],
)
def test_bad_flags_are_refused_before_any_work(monkeypatch, tmp_path, capsys, argv, message):
    monkeypatch.setattr(pretrain, "pretrain", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(SystemExit):
        pretrain.main(["--out", str(tmp_path), *argv])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in err, err
