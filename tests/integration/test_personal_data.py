"""No cell value or personal data reaches a log line, an audit record, a state item, a
reason file or an error message, whichever stage rejects the part."""

from __future__ import annotations

import json
from typing import Any

import pytest

from s3rollup.audit import AuditLog
from s3rollup.demo import generate_part, to_csv_bytes, wait_until_idle
from s3rollup.state import State
from tests.conftest import wait_for
from tests.helpers import put_part, run_cli, user_env, wait_manifest

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

EMAILS = ["alice.smith@example.com", "bob+tag@example.org"]
CARDS = ["4111 1111 1111 1111", "4111-1111-1111-1112", "5500005555555559", "6011000990139425"]
PLANTED = EMAILS + CARDS


def _csv_with(cells: dict[tuple[int, str], str], rows: int = 600) -> bytes:
    """A seed-schema CSV with some cells replaced by text."""
    lines = to_csv_bytes(generate_part(0, rows, seed=11)).decode().splitlines()
    header = [h.strip('"') for h in lines[0].split(",")]
    for (row, col), text in cells.items():
        fields = lines[row + 1].split(",")
        fields[header.index(col)] = f'"{text}"'
        lines[row + 1] = ",".join(fields)
    return ("\n".join(lines) + "\n").encode()


def corpus_logs(captured: Any) -> str:
    """Everything the test process and its worker subprocesses printed."""
    return str(captured.out + captured.err)


def _scan_table(stack: Any, table: str) -> str:
    items, kwargs = [], {"TableName": table}
    while True:
        page = stack.aws.dynamodb.scan(**kwargs)
        items += page["Items"]
        if "LastEvaluatedKey" not in page:
            return json.dumps(items)
        kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def test_personal_data_never_reaches_logs_audit_or_errors(stack: Any, capfd: Any) -> None:
    dataset, allowed = "pii-scan", "pii-allowed"
    bucket, outputs = stack.info.outputs["DataBucketName"], stack.info.outputs
    # GIVEN parts with e-mails and card numbers: inside the validator's sample (Lambda
    # rejects), beyond it (the worker's parser rejects), and in a declared string column.
    keys = {
        put_part(stack, dataset, "clean.csv", generate_part(1, 300, seed=11)),
    }
    bad = [
        put_part(stack, dataset, "email-early.csv", _csv_with({(3, "value1"): EMAILS[0]})),
        put_part(stack, dataset, "card-early.csv", _csv_with({(5, "value2"): CARDS[0]})),
        put_part(stack, dataset, "email-late.csv", _csv_with({(450, "value3"): EMAILS[1]})),
        put_part(
            stack, dataset, "card-late.csv", _csv_with({(500, "value1"): CARDS[1], (520, "value2"): CARDS[2]})
        ),
    ]
    contract = {
        "columns": {"note": "string", "category": "int64", "value1": "float64"},
        "group_by": ["category"],
        "values": ["value1"],
        "personal_data_allowed": ["note"],
    }
    stack.aws.s3.put_object(
        Bucket=bucket, Key=f"contracts/{allowed}.json", Body=json.dumps(contract).encode()
    )
    notes = "note,category,value1\n" + "".join(f'"{v}",{i % 3},{i}.5\n' for i, v in enumerate(PLANTED * 5))
    allowed_key = put_part(stack, allowed, "notes.csv", notes.encode())

    # WHEN the whole flow runs
    wait_manifest(stack, dataset, keys)
    wait_manifest(stack, allowed, {allowed_key})
    state = State(stack.aws.dynamodb, outputs["StateTableName"])
    wait_for(lambda: all(p.status == "REJECTED" for p in state.parts(dataset) if p.key in bad))
    audit = AuditLog(stack.aws.dynamodb, outputs["AuditTableName"])
    assert wait_until_idle(state, audit, dataset) and wait_until_idle(state, audit, allowed)
    cli_output = ""
    for args in (["audit", "show", dataset], ["audit", "verify", dataset], ["query", "pii-none"]):
        done = run_cli(args, user_env(stack, "reader"))
        cli_output += done.stdout + done.stderr
    reasons = ""
    for key in bad:
        name = key.rsplit("/", 1)[1]
        reasons += (
            stack.aws.s3.get_object(Bucket=bucket, Key=f"quarantine/{dataset}/{name}.reason.json")["Body"]
            .read()
            .decode()
        )
    captured = capfd.readouterr()

    # (the scan reads real output: the handler's and the worker's log lines are in it)
    assert '"decision": "REJECTED"' in corpus_logs(captured) or "part rejected" in corpus_logs(captured)
    assert "result written" in corpus_logs(captured)
    # THEN none of the planted values appear anywhere
    corpus = {
        "logs": captured.out + captured.err,
        "audit": _scan_table(stack, outputs["AuditTableName"]),
        "state": _scan_table(stack, outputs["StateTableName"]),
        "reasons": reasons,
        "cli": cli_output,
    }
    for where, text in corpus.items():
        for value in PLANTED:
            for form in {value, value.replace(" ", ""), json.dumps(value)[1:-1]}:
                assert form not in text, f"{value!r} leaked into {where}"
    # ... and the rejections say why, by code and line
    assert "PERSONAL_DATA" in reasons or "BAD_VALUE" in reasons
    assert '"line": 452' in reasons or '"line": 451' in reasons
    assert "intact" in cli_output
