"""The manifest's tree on the embedded stack: removals and replacements through it equal
pandas, a crash between segments and root loses nothing, readers keep their root, and a
changed segment is caught by `audit verify`."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from s3rollup.config import Settings
from s3rollup.contract import parse_part_key, partial_key
from s3rollup.demo import generate_part
from s3rollup.job import Job
from s3rollup.manifest import FANOUT, Objects, entries, load_node
from s3rollup.ops import read_manifest
from tests.helpers import (
    assert_equals_reference,
    put_version,
    register_quietly,
    run_cli,
    silent,
    task_aws,
    upload_silently,
    user_env,
)

pytestmark = pytest.mark.integration


def _job(stack: Any, dataset: str) -> Job:
    settings = Settings.from_env(stack.dispatcher.env)
    return Job(settings, task_aws(stack), dataset, uuid.uuid4().hex, actor="test:tree")


def _published(stack: Any, dataset: str) -> dict[str, str]:
    m = read_manifest(stack.aws, stack.info.outputs["DataBucketName"], dataset)
    assert m is not None
    return {p["key"]: p["version_id"] for p in m["parts"]}


def test_removals_and_replacements_through_the_tree_equal_pandas(stack: Any, dataset: str) -> None:
    # GIVEN more parts than one segment holds: two leaf segments under the root
    final = upload_silently(stack, dataset, FANOUT + 6, 30, seed=51)
    assert _job(stack, dataset).run() == 0
    root = read_manifest(stack.aws, stack.info.outputs["DataBucketName"], dataset, parts=False)
    assert root is not None and len(root["tree"]["children"]) == 2
    # WHEN, in the first segment, one part is deleted, one overwritten and one added (their
    # events lost)
    keys = sorted(final)
    bucket = stack.info.outputs["DataBucketName"]
    with silent(stack):
        stack.aws.s3.delete_object(Bucket=bucket, Key=keys[3])
        del final[keys[3]]
        frame = generate_part(1000, 40, seed=52)
        final[keys[20]] = (put_version(stack, keys[20], frame), frame)
        frame = generate_part(1001, 1, seed=53)  # a single-row group or two
        new = f"incoming/{dataset}/p03-new.csv"
        final[new] = (put_version(stack, new, frame), frame)
    register_quietly(stack, dataset)
    job = _job(stack, dataset)
    fetched: list[str] = []
    job.aws.s3.meta.events.register(
        "provide-client-params.s3.GetObject", lambda params, **_: fetched.append(params["Key"])
    )
    assert job.run() == 0
    # THEN the result is pandas over exactly the current parts, and the manifest names them
    assert _published(stack, dataset) == {k: v for k, (v, _) in final.items()}
    assert_equals_reference(stack, dataset, [f for _, f in final.values()])
    # A removal re-merges the partials of its segment (35) and the root's children (2), not
    # all 70.
    assert job.partials_merged == 35 + 2
    # ... of which the 2 computed by this round's tasks (on the job's own threads) were
    # merged from memory: only the segment's 33 others were fetched from the bucket
    computed = {partial_key(dataset, parse_part_key(k).part_id) for k in (keys[20], new)}
    of_parts = {partial_key(dataset, parse_part_key(k).part_id) for k in final} | {
        partial_key(dataset, parse_part_key(keys[3]).part_id)
    }
    partials = [k for k in fetched if k in of_parts]
    assert len(partials) == 33 and not computed & set(partials)


def test_a_crash_between_segments_and_root_loses_nothing(
    stack: Any, dataset: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    final = upload_silently(stack, dataset, 3, 20, seed=54)
    assert _job(stack, dataset).run() == 0
    before = _published(stack, dataset)
    with silent(stack):
        key = f"incoming/{dataset}/p99.csv"
        frame = generate_part(99, 25, seed=55)
        final[key] = (put_version(stack, key, frame), frame)
    register_quietly(stack, dataset)

    # WHEN the job dies after writing its segments, before the root
    real_put = Objects.put

    def put(self: Objects, key: str, data: bytes, content_type: str) -> dict[str, str]:
        if key.endswith("/manifest.json"):
            raise RuntimeError("task stopped")
        return real_put(self, key, data, content_type)

    monkeypatch.setattr(Objects, "put", put)
    assert _job(stack, dataset).run() == 1
    # THEN readers still see the last root, whole
    assert _published(stack, dataset) == before
    # AND the next job publishes the part: its change is still announced
    monkeypatch.setattr(Objects, "put", real_put)
    assert _job(stack, dataset).run() == 0
    assert _published(stack, dataset) == {k: v for k, (v, _) in final.items()}
    assert_equals_reference(stack, dataset, [f for _, f in final.values()])


def test_a_reader_keeps_the_parts_of_the_root_it_read(stack: Any, dataset: str) -> None:
    final = upload_silently(stack, dataset, 4, 20, seed=56)
    assert _job(stack, dataset).run() == 0
    bucket = stack.info.outputs["DataBucketName"]
    old = read_manifest(stack.aws, bucket, dataset, parts=False)
    assert old is not None
    first = sorted(final)[0]
    with silent(stack):
        stack.aws.s3.delete_object(Bucket=bucket, Key=first)
    register_quietly(stack, dataset)
    assert _job(stack, dataset).run() == 0
    # The segment was rewritten in place; the old root still reads the version it names.
    objects = Objects(stack.aws.s3, bucket)
    assert [e["key"] for e in entries(objects, old["tree"])] == sorted(final)
    assert first not in _published(stack, dataset)


def test_a_changed_segment_is_caught_by_audit_verify(stack: Any, dataset: str) -> None:
    from moto.s3.models import s3_backends

    upload_silently(stack, dataset, 2, 20, seed=57)
    assert _job(stack, dataset).run() == 0
    ok = run_cli(["audit", "verify", dataset], user_env(stack, "reader"))
    assert ok.returncode == 0, ok.stderr
    # WHEN the stored bytes of the leaf segment the manifest names are changed in storage
    bucket = stack.info.outputs["DataBucketName"]
    root = read_manifest(stack.aws, bucket, dataset, parts=False)
    assert root is not None
    ref = root["tree"]["children"][0]["node"]
    node = load_node(Objects(stack.aws.s3, bucket), ref)
    node["entries"][0]["rows"] = 1
    account = stack.info.outputs["DataKeyArn"].split(":")[4]
    fake = next(
        k
        for k in s3_backends[account]["global"].buckets[bucket].keys.getlist(ref["key"])
        if k.version_id == ref["version_id"]
    )
    fake.value = json.dumps(node).encode()
    # THEN `audit verify` fails and names the record of the result whose segment changed
    bad = run_cli(["audit", "verify", dataset], user_env(stack, "reader"))
    assert bad.returncode == 7 and "SEGMENT_CHANGED" in bad.stderr + bad.stdout, bad.stderr
