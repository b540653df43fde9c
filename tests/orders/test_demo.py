"""``kafkaworkers demo``: the installed CLI runs the whole order pipeline on the embedded broker."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from tests.conftest import KW


def demo(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # From an empty directory, so no kafkaworkers.toml of the checkout changes the services' rules.
    return subprocess.run(
        [KW, "demo", "--orders", "60", "--timeout", "120", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_demo_of_60_orders_ends_every_order_as_expected(tmp_path):
    done = demo(tmp_path)

    assert done.returncode == 0, done.stdout + done.stderr
    rows = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines() if line.strip()}
    assert rows["separado"] == ["45", "45", "yes"]
    assert rows["fraude"] == ["6", "6", "yes"]
    assert rows["pagamento_recusado"] == ["6", "6", "yes"]
    assert rows["sem_estoque"] == ["3", "3", "yes"]
    assert "unfinished" not in rows
    assert re.search(r"^kafkaworkers demo: 60 orders in [\d.]+ s \([\d.]+ orders/s\)$", done.stdout, re.M)
    assert re.search(r"^end-to-end latency \(criado_em to terminal event\): p50 \d+ ms, p99 \d+ ms$", done.stdout, re.M)
    assert done.stdout.rstrip().endswith("result: OK, every order ended as expected")


def test_demo_json_report_has_every_compensation_done(tmp_path):
    done = demo(tmp_path, "--seed", "11", "--format", "json")

    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] and not report["timed_out"] and report["mismatches"] == []
    assert {state: row["actual"] for state, row in report["states"].items()} == {
        "separado": 45, "fraude": 6, "pagamento_recusado": 6, "sem_estoque": 3,
    }  # fmt: skip
    compensations = report["compensations"]
    assert compensations["refunds_done"] == compensations["refunds_needed"]
    assert compensations["releases_done"] == compensations["releases_needed"]
    # Only fraud and declined orders can need a release; a cancellation that overtakes its order reserves nothing.
    assert compensations["releases_needed"] <= 12


def test_demo_of_5000_orders_has_the_stock_for_all_of_them_and_ends_each_as_expected(tmp_path):
    done = subprocess.run(
        [KW, "demo", "--orders", "5000", "--timeout", "120", "--format", "json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )

    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] and report["mismatches"] == []
    assert {state: (row["expected"], row["actual"]) for state, row in report["states"].items()} == {
        "separado": (3750, 3750), "fraude": (500, 500), "pagamento_recusado": (500, 500), "sem_estoque": (250, 250),
    }  # fmt: skip
