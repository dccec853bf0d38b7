"""Progress: live bars on a terminal, plain lines elsewhere.

Training on a real pseudo-terminal: tests/code/test_reliability.py (the SIGKILL test's trainer);
one line per epoch without a terminal: tests/model/test_model.py.
"""

import contextlib
import logging
import sys
from pathlib import Path

from vit_pipeline import progress

BIN = Path(sys.executable).parent


def test_without_a_terminal_a_stage_logs_its_start_and_its_end(monkeypatch, caplog, capsys):
    monkeypatch.delenv(progress.ENV, raising=False)
    with caplog.at_level(logging.INFO, logger="vit_pipeline.progress"), progress.task("Parity", 4) as shown:
        for _ in range(4):
            shown.advance()
    assert [r.getMessage() for r in caplog.records][0] == "Parity ..."
    assert caplog.records[-1].getMessage().startswith("Parity: done in ") and "4/4 steps" in caplog.text
    assert capsys.readouterr().err == ""  # no bar drawn into a log
    # Stopped part-way (a Ctrl-C): said so ("done in 1.4 s, 0/21 steps" before).
    caplog.clear()
    with (
        caplog.at_level(logging.INFO, logger="vit_pipeline.progress"),
        contextlib.suppress(KeyboardInterrupt),
        progress.task("Epoch 1/1", 21) as shown,
    ):
        shown.advance()
        raise KeyboardInterrupt
    assert (
        caplog.records[-1].getMessage().startswith("Epoch 1/1: stopped after ")
        and "1/21 steps" in caplog.text
    )


def test_on_a_terminal_a_stage_draws_a_bar(monkeypatch, capsys):
    monkeypatch.setenv(progress.ENV, "1")
    with progress.task("int8 calibration", 64) as shown:
        shown.advance(32, info="half")
        shown.advance(32)
    err = capsys.readouterr().err
    assert "int8 calibration" in err and "64/64" in err and "ETA" in err
