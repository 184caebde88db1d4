"""``python -m loadtest.locust_run`` end to end: real Locust (a subprocess: gevent never enters pytest's
process) against the runner's own local stack (authz + real Envoy + echo upstream).

Two short runs: a standalone one that must pass with every scenario answered as due, and one in Apigee
mode (against the fake Apigee) told to expect a 403 on a path its key is granted, which the runner must
fail with exit code 1 and the wrong allows counted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from loadtest.locust_outcomes import DEFAULT_PATH, QUOTA, SCENARIOS, WRONG_PATH

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT = 120.0  # seconds: the runner's own hard timeout on Locust is duration + 60
EXPECTED = {"valid_key": {200}, "invalid_key": {401}, "jwt_cached": {200}, "jwt_unique": {200}}
EXPECTED.update({QUOTA: {200, 429}, WRONG_PATH: {403}})


def run_locust(work_dir: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    report_path = work_dir / "report.json"
    argv = [sys.executable, "-m", "loadtest.locust_run", "--users", "10", "--work-dir", str(work_dir)]
    argv += ["--report-json", str(report_path), *args]
    proc = subprocess.run(  # noqa: S603 - our own runner
        argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False
    )
    assert report_path.exists(), f"no report (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc, json.loads(report_path.read_text())


def statuses(report: dict[str, Any], scenario: str) -> dict[int, int]:
    return {int(status): count for status, count in report["tally"]["statuses"][scenario].items()}


def test_a_short_run_against_the_local_stack_passes_with_every_scenario_answered_as_due(tmp_path):
    proc, report = run_locust(tmp_path, "--duration", "6")
    output = f"{proc.stdout}\n{proc.stderr}"
    assert proc.returncode == 0, output
    assert report["problems"] == [] and report["exit_code"] == 0, output
    assert report["wrong_outcomes"] == 0 and report["wrong_allows"] == 0
    rows, total = report["rows"], report["total"]
    for scenario in SCENARIOS:
        assert rows[scenario]["requests"] > 0, f"{scenario} sent nothing:\n{output}"
        assert rows[scenario]["failures"] == 0
        assert set(statuses(report, scenario)) <= EXPECTED[scenario], (scenario, statuses(report, scenario))
        # Locust's own count (its final stats) and the locustfile's tally saw the same requests
        assert sum(statuses(report, scenario).values()) == rows[scenario]["requests"]
    assert total["requests"] == sum(row["requests"] for row in rows.values())
    assert total["failures"] == 0
    assert total["rps"] == pytest.approx(sum(row["rps"] for row in rows.values()), rel=1e-6)
    assert 0 <= total["p50"] <= total["p95"] <= total["p99"]  # whole ms: a fast machine may round to 0
    # The quota key: its limit spent at once, then refused; never more 200s than the windows allow.
    quota = report["quota"]
    assert statuses(report, QUOTA)[429] > 0
    assert 0 < quota["allowed"] <= quota["bound"] == quota["limit"] * quota["windows"]
    # What was printed is what was parsed.
    assert f"requests/s {total['rps']:.1f}, failure rate 0.00%" in proc.stdout
    assert f"p50/p95/p99 {total['p50']:.0f}/{total['p95']:.0f}/{total['p99']:.0f} ms" in proc.stdout
    assert "wrong outcomes 0 (wrong allows 0)" in proc.stdout
    assert f"quota: {quota['allowed']} allowed, at most {quota['bound']}" in proc.stdout
    assert "scenarios off" not in proc.stdout
    assert proc.stdout.rstrip().endswith("PASS")


def test_a_200_where_a_403_was_due_fails_the_run_as_wrong_allows(tmp_path):
    # Apigee mode this time; the wrong_path scenario is pointed at a path its key is granted.
    proc, report = run_locust(
        tmp_path, "--apigee", "--duration", "3", "--", "--authz-wrong-path", DEFAULT_PATH
    )
    output = f"{proc.stdout}\n{proc.stderr}"
    assert proc.returncode == 1, output
    wrong_path = report["rows"][WRONG_PATH]
    assert report["wrong_allows"] == wrong_path["failures"] == wrong_path["requests"] > 0
    assert statuses(report, WRONG_PATH) == {200: wrong_path["requests"]}
    assert report["wrong_outcomes"] == report["wrong_allows"]  # every other scenario was right
    assert all(report["rows"][name]["failures"] == 0 for name in SCENARIOS if name != WRONG_PATH)
    assert report["problems"] == [f"{report['wrong_allows']} wrong allows: a 200 where a deny was due"]
    assert f"failure x{wrong_path['requests']}: wrong_path: wrong allow: expected 403, got 200" in proc.stdout
    assert proc.stdout.rstrip().endswith("FAIL: " + report["problems"][0])
