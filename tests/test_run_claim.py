"""Two evaluate.py runs of one run name at once: the second is refused in one line before any work
(they wrote one run directory together, and each one's part writer deleted the other's parts); the claim
ends with the run, so the rerun goes ahead."""

from __future__ import annotations

import fcntl
import subprocess
import sys
import textwrap

import pytest
from fake_cascade import fake_args

from cascadevlm.cascade.evaluate import run_claim_path
from cascadevlm.cli import run_evaluate as main

pytestmark = pytest.mark.usefixtures("clean_fake_lvlm")


def test_a_second_run_of_one_name_is_refused_while_the_first_writes(tiny_clip_path, data_root, tmp_path):
    out = tmp_path / "runs"
    run_dir = out / "r"
    claim = run_claim_path(run_dir)
    claim.parent.mkdir(parents=True, exist_ok=True)
    # the first run, in another process, holding the claim (as a running evaluate.py does)
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import fcntl, sys
            fh = open({str(claim)!r}, "a")
            fcntl.flock(fh, fcntl.LOCK_EX)
            print("held", flush=True)
            sys.stdin.read()  # until the test closes stdin
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError) as err:
            main(fake_args(tiny_clip_path, data_root, out, "r", limit=8))
        assert str(err.value) == (
            f"the run directory {run_dir} is being written by another evaluate.py run now (two runs of one "
            "name would delete each other's parts): wait for it to end, or set --run_name (or --output_dir) "
            "to another"
        )
        assert not run_dir.exists()  # refused before any work
        other = main(fake_args(tiny_clip_path, data_root, out, "r2", limit=8))  # another name runs
        assert other["params"]["images"] == 8
    finally:
        holder.stdin.close()
        holder.wait()
    metrics = main(
        fake_args(tiny_clip_path, data_root, out, "r", limit=8)
    )  # the claim ended with its process
    assert metrics["params"]["images"] == 8 and (run_dir / "metrics.json").is_file()
    with claim.open("a") as fh:  # and this run let go of its own claim when it ended
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert sorted(p.name for p in out.iterdir()) == ["cache", "r", "r2"]  # the output folder holds runs only
    assert claim.name != run_claim_path(out / "r2").name
