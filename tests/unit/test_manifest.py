"""The manifest's tree (s3rollup.manifest) against a model: entries, merges, bounds, readers.

A partial here is a Counter of (key, version) pairs, so a node's merge is exactly the parts
under it; the S3 stand-in keeps every version, as a versioned bucket does.
"""

from __future__ import annotations

import io
import itertools
import json
import random
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import pytest
from botocore.exceptions import ClientError

from s3rollup.manifest import (
    FANOUT,
    ManifestError,
    Objects,
    Update,
    empty_tree,
    entries,
    load_node,
    lookup,
    node_key,
)

DATASET = "sales"


class VersionedBucket:
    """get/put/delete_object of one versioned bucket, in memory."""

    def __init__(self) -> None:
        self.versions: dict[str, list[tuple[str, bytes | None]]] = {}
        self._ids = itertools.count(1)
        self.puts = 0

    def put_object(self, Bucket: str, Key: str, Body: bytes, **_: Any) -> dict[str, Any]:
        vid = f"v{next(self._ids)}"
        self.versions.setdefault(Key, []).append((vid, bytes(Body)))
        self.puts += 1
        return {"VersionId": vid}

    def delete_object(self, Bucket: str, Key: str) -> dict[str, Any]:
        self.versions.setdefault(Key, []).append((f"v{next(self._ids)}", None))
        return {}

    def get_object(self, Bucket: str, Key: str, VersionId: str | None = None) -> dict[str, Any]:
        found = self.versions.get(Key, [])
        body = (
            next((b for v, b in found if v == VersionId), None)
            if VersionId
            else (found or [("", None)])[-1][1]
        )
        if body is None:
            code = "NoSuchVersion" if VersionId else "NoSuchKey"
            raise ClientError({"Error": {"Code": code, "Message": ""}}, "GetObject")
        return {"Body": io.BytesIO(body)}

    def tamper(self, key: str, version: str, body: bytes) -> None:
        self.versions[key] = [(v, body if v == version else b) for v, b in self.versions[key]]


class CountingMerger:
    """Partials as Counters of (key, version): a merge is their sum."""

    def __init__(self, objects: Objects) -> None:
        self.objects = objects

    def parts(self, items: list[dict[str, Any]]) -> Iterator[Counter[str]]:
        return (Counter({f"{e['key']}@{e['version_id']}": 1}) for e in items)

    def load(self, ref: dict[str, str]) -> Counter[str]:
        return Counter(json.loads(self.objects.get(ref)))

    def merge(self, partials: Iterable[Counter[str]]) -> Counter[str]:
        total: Counter[str] = Counter()
        for p in partials:
            total.update(p)
        return total

    def encode(self, partial: Counter[str]) -> bytes:
        return json.dumps(dict(sorted(partial.items()))).encode()


def entry(key: str, version: str) -> dict[str, Any]:
    return {
        "key": key,
        "version_id": version,
        "etag": "e",
        "rows": 100,
        "sha256": "s" + version,
        "partial_sha256": "p" + version,
    }


class Published:
    """A dataset's tree as successive publishes leave it (root kept in memory)."""

    def __init__(self, fanout: int = FANOUT) -> None:
        self.bucket = VersionedBucket()
        self.objects = Objects(self.bucket, "b")
        self.merger = CountingMerger(self.objects)
        self.fanout = fanout
        self.tree: dict[str, Any] = empty_tree()
        self.merged: Counter[str] | None = None
        self.last: Update[Counter[str]] | None = None

    def publish(self, changes: dict[str, dict[str, Any] | None]) -> Update[Counter[str]]:
        update: Update[Counter[str]] = Update(DATASET, self.objects, self.merger, fanout=self.fanout)
        merged = self.merged
        self.tree, self.merged = update.apply(self.tree, None if merged is None else lambda: merged, changes)
        update.delete_dropped(lambda key, exc: pytest.fail(f"delete of {key} failed: {exc}"))
        self.last = update
        return update


def expected(model: dict[str, str]) -> Counter[str]:
    return Counter({f"{k}@{v}": 1 for k, v in model.items()})


def check_invariants(pub: Published, model: dict[str, str]) -> None:
    """Entries equal the model; every node's merge is exactly the parts under it; sizes and
    first keys are right; depth is logarithmic."""
    assert [(e["key"], e["version_id"]) for e in entries(pub.objects, pub.tree)] == sorted(model.items())
    assert pub.merged == expected(model)
    assert pub.tree["parts"] == len(model) and pub.tree["rows"] == 100 * len(model)

    def walk(summary: dict[str, Any], level: int) -> list[str]:
        node = load_node(pub.objects, summary["node"])
        assert node["level"] == level
        if level == 0:
            keys = [f"{e['key']}@{e['version_id']}" for e in node["entries"]]
        else:
            assert 1 <= len(node["children"]) <= pub.fanout
            keys = [k for c in node["children"] for k in walk(c, level - 1)]
        assert len(keys) >= 1 and summary["parts"] == len(keys)
        assert summary["first"] == min(keys).split("@")[0]
        assert pub.merger.load(summary["merged"]) == Counter(keys)
        return keys

    for child in pub.tree["children"]:
        walk(child, pub.tree["level"])
    assert len(pub.tree["children"]) <= pub.fanout


def test_random_changes_keep_every_merge_exact() -> None:
    """Adds, removals, replacements and no-ops in random batches: the tree always lists exactly
    the model's parts, and every segment's merged partial is the merge of the parts under it."""
    rng = random.Random(7)
    pub, model = Published(fanout=4), {}
    for step in range(120):
        changes: dict[str, dict[str, Any] | None] = {}
        for _ in range(rng.choice([1, 1, 2, 5, 17])):
            key = f"incoming/{DATASET}/p{rng.randrange(60):03d}.csv"
            op = rng.random()
            if op < 0.55:
                version = f"{step}-{rng.randrange(1000)}"
                changes[key] = entry(key, version)
            elif op < 0.85:
                changes[key] = None
            elif key in model:  # the same entry again: no change
                changes[key] = entry(key, model[key])
        pub.publish(changes)
        for key, e in changes.items():
            if e is None:
                model.pop(key, None)
            else:
                model[key] = e["version_id"]
        check_invariants(pub, model)


def keys(n: int) -> list[str]:
    return [f"incoming/{DATASET}/part-{i:06d}.csv" for i in range(n)]


def test_one_more_part_costs_the_depth_and_a_removal_log_n_merges() -> None:
    pub, model = Published(), {}
    pub.publish({k: entry(k, "1") for k in keys(5000)})
    model.update(dict.fromkeys(keys(5000), "1"))
    assert pub.tree["level"] == 1  # 5000 parts: leaves under one level of segments
    depth = pub.tree["level"] + 1

    new = f"incoming/{DATASET}/part-002500x.csv"
    update = pub.publish({new: entry(new, "1")})
    model[new] = "1"
    # One segment per level rewritten; per level the old merge and the new part (or the
    # merge of what was added) merged, plus the root's.
    assert update.segments_written == depth
    assert update.partials_merged <= 2 * depth + 3

    gone = keys(5000)[1234]
    update = pub.publish({gone: None})
    del model[gone]
    assert update.segments_written == depth
    # The leaf's parts, its parent's children and the root's children: FANOUT per level.
    assert update.partials_merged <= FANOUT * (depth + 1)
    check_invariants(pub, model)


def test_a_reader_of_an_older_root_still_reads_exactly_its_parts() -> None:
    """Segments are rewritten in place (new versions); a root names versions, so a reader that
    holds the previous root (or a job that crashed before writing its root) sees the old set."""
    pub = Published(fanout=4)
    pub.publish({k: entry(k, "1") for k in keys(40)})
    old_tree, old_merged = pub.tree, pub.merged
    pub.publish({keys(40)[3]: None, keys(40)[7]: entry(keys(40)[7], "2")})
    assert [(e["key"], e["version_id"]) for e in entries(pub.objects, old_tree)] == [
        (k, "1") for k in keys(40)
    ]
    assert pub.merger.merge(pub.merger.load(c["merged"]) for c in old_tree["children"]) == old_merged
    # ...and the new root its own.
    assert lookup(pub.objects, pub.tree, keys(40)[3]) is None
    assert lookup(pub.objects, pub.tree, keys(40)[7])["version_id"] == "2"  # type: ignore[index]
    assert lookup(pub.objects, old_tree, keys(40)[7])["version_id"] == "1"  # type: ignore[index]


def test_a_changed_or_missing_segment_is_refused() -> None:
    pub = Published(fanout=4)
    pub.publish({k: entry(k, "1") for k in keys(40)})
    leaf = pub.tree["children"][0]
    while "entries" not in load_node(pub.objects, leaf["node"]):
        leaf = load_node(pub.objects, leaf["node"])["children"][0]
    ref = leaf["node"]
    node = json.loads(pub.objects.get(ref))
    node["entries"][0]["version_id"] = "forged"
    pub.bucket.tamper(ref["key"], ref["version_id"], json.dumps(node).encode())
    with pytest.raises(ManifestError) as err:
        entries(pub.objects, pub.tree)
    assert err.value.code == "SEGMENT_CHANGED"

    pub.bucket.versions[ref["key"]] = [
        (v, b) for v, b in pub.bucket.versions[ref["key"]] if v != ref["version_id"]
    ]
    with pytest.raises(ManifestError) as err:
        entries(pub.objects, pub.tree)
    assert err.value.code == "SEGMENT_MISSING"


def test_emptied_segments_are_deleted_and_the_tree_shrinks() -> None:
    pub = Published(fanout=4)
    pub.publish({k: entry(k, "1") for k in keys(64)})
    assert pub.tree["level"] == 1  # 16 leaves under 4 segments
    update = pub.publish(dict.fromkeys(keys(64)[:62]))
    check_invariants(pub, dict.fromkeys(keys(64)[62:], "1"))
    assert pub.tree["level"] == 0
    for node_id in update.dropped:
        with pytest.raises(ClientError):
            pub.bucket.get_object(Bucket="b", Key=node_key(DATASET, node_id))
    pub.publish(dict.fromkeys(keys(64)[62:]))
    check_invariants(pub, {})
    assert pub.tree["children"] == []
