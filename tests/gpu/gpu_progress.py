"""A pytest plugin for tests/gpu/run.sh: one JSON line per test outcome, written as each test
ends, so a stage killed by its time box still leaves the results of the tests that ran (a
junit file is only written when pytest finishes).

    python -m pytest -p gpu_progress --gpu-progress=FILE ...    (tests/gpu on PYTHONPATH)

Each line: {"nodeid", "outcome": passed | failed | skipped | error, "when", "seconds",
"message"}; "error" is a failure outside the test's call (setup or teardown).
"""

from __future__ import annotations

import json

_OUT = []  # the open file, while a session runs


def pytest_addoption(parser):
    parser.addoption("--gpu-progress", default=None, help="append one JSON line per test here")


def pytest_configure(config):
    path = config.getoption("--gpu-progress")
    if path and not hasattr(config, "workerinput"):  # pytest-xdist: the controller writes
        _OUT.append(open(path, "a", buffering=1))  # noqa: SIM115  (line-buffered, kept open)


def pytest_unconfigure(config):
    while _OUT:
        _OUT.pop().close()


def pytest_runtest_logreport(report):
    if not _OUT or (report.when != "call" and report.outcome == "passed"):
        return
    outcome = "error" if report.when != "call" and report.outcome == "failed" else report.outcome
    message = ""
    if report.outcome == "skipped" and isinstance(report.longrepr, tuple):
        message = str(report.longrepr[2])
    elif report.outcome == "failed":
        message = str(report.longrepr)[-2000:]
    _OUT[0].write(json.dumps({"nodeid": report.nodeid, "outcome": outcome, "when": report.when,
                              "seconds": round(report.duration, 3), "message": message}) + "\n")
