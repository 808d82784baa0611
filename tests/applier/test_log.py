"""Log lines go to the stderr of the moment, even after a caller swapped and closed one."""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Iterator

import pytest

from applier import _log


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)


def test_records_after_the_setup_stream_closed_reach_the_current_stderr(
        root_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    swapped = io.StringIO()
    monkeypatch.setattr(sys, "stderr", swapped)
    _log.setup("gitops-apply", verbose=False)
    logging.getLogger("applier.watch").info("first")
    assert swapped.getvalue() == "gitops-apply: first\n"
    swapped.close()
    monkeypatch.undo()
    logging.getLogger("applier.watch").warning("second")
    err = capsys.readouterr().err
    assert "gitops-apply: warning: second" in err
    assert "Logging error" not in err
