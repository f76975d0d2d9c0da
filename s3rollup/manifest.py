"""The published manifest: a small root that names a tree of immutable segment versions.

A dataset's result must name exactly the part versions behind it, verifiably, without a
publish rewriting one entry per part. ``results/<dataset>/manifest.json`` (the root,
written last by each publish) names the aggregate objects and the top of a B+-tree:

- a *leaf segment* (level 0) lists up to ``FANOUT`` parts in key order (key, version id,
  etag, rows, SHA-256 of the part and of its partial);
- an *internal segment* (level k > 0) lists up to ``FANOUT`` children of level k-1, each
  as a summary: the child segment's object (key, version id, SHA-256), its first key, its
  parts and rows, and its *merged partial* (the merge of every partial below it, under
  ``partials/<dataset>/nodes/``, since it holds every group, below the minimum size too);
- the root lists the children of the top level the same way (``tree``), and names the
  merge of everything (``merged_partial``), from which the result is finalized.

Segments live at ``results/<dataset>/manifest/<node-id>.json``; a rewritten segment keeps
its key and gets a new version, and every reference names a version and its SHA-256. So a
reader that starts from a root reads exactly the segments it names, whatever a later job
writes (old versions stay until the bucket's noncurrent-version expiration), and a
segment's bytes are checked against its parent: the root's SHA-256 is in the audit chain,
so the tree is a Merkle tree under it. A job writes segments first and the root last: a
crash in between leaves versions no root names, and the next job starts again from the
last root.

Updating: a change to one part touches the segments on its path (one per level). A node
that only gained parts merges its old merged partial with the new ones; a node that lost
or replaced a part merges its children's merged partials again (at most ``FANOUT`` per
level), since min and max cannot be taken out of a merge. So one more part costs O(depth)
segment reads and writes, a removal O(FANOUT x depth) partials re-merged, and depth grows
as log_FANOUT of the parts.

This module does the I/O of segments and the tree's arithmetic; what a partial is and how
partials merge is the ``Merger`` the job gives it (tests give it plain numbers).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from botocore.exceptions import ClientError, FlexibleChecksumError

from .aws import object_at
from .contract import PARTIALS, result_prefix
from .errors import S3RollupError

ROOT_FORMAT = "s3rollup-manifest/2"
NODE_FORMAT = "s3rollup-manifest-node/1"
FANOUT = 64
# The fields of a part's entry in a leaf segment (and in read_manifest's "parts").
ENTRY_FIELDS = ("key", "version_id", "etag", "rows", "sha256", "partial_sha256")

Entry = dict[str, Any]
Summary = dict[str, Any]
Ref = dict[str, str]
F = TypeVar("F")


class ManifestError(S3RollupError):
    """A segment a manifest names is missing or differs from its SHA-256."""


def node_key(dataset: str, node_id: str) -> str:
    """Where a segment lives (readable with the result)."""
    return f"{result_prefix(dataset)}manifest/{node_id}.json"


def node_merged_key(dataset: str, node_id: str) -> str:
    """Where a segment's merged partial lives (every group: under partials/, not results/)."""
    return f"{PARTIALS}{dataset}/nodes/{node_id}.parquet"


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of bytes."""
    return hashlib.sha256(data).hexdigest()


def encode(doc: Mapping[str, Any]) -> bytes:
    """A segment's or root's bytes: compact JSON, keys sorted, so equal content is equal bytes."""
    return json.dumps(doc, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()


class Objects:
    """Version-pinned, checksum-checked reads and stack-key-encrypted writes of one bucket."""

    def __init__(self, s3: Any, bucket: str, kms_key_arn: str = "") -> None:
        self.s3, self.bucket, self.kms_key_arn = s3, bucket, kms_key_arn

    def get(self, ref: Ref) -> bytes:
        """The bytes of ref's version; ManifestError when it is gone or differs from its SHA-256."""
        try:
            data: bytes = self.s3.get_object(**object_at(self.bucket, ref["key"], ref["version_id"]))[
                "Body"
            ].read()
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("NoSuchKey", "NoSuchVersion", "404"):
                raise ManifestError(
                    f"{ref['key']} (version {ref['version_id']}) named by the manifest is gone",
                    "SEGMENT_MISSING",
                ) from exc
            raise
        except FlexibleChecksumError as exc:  # the bytes differ from the checksum S3 stored
            raise ManifestError(f"{ref['key']} differs from its checksum in S3", "SEGMENT_CHANGED") from exc
        if sha256_hex(data) != ref["sha256"]:
            raise ManifestError(f"{ref['key']} differs from its SHA-256 in the manifest", "SEGMENT_CHANGED")
        return data

    def put(self, key: str, data: bytes, content_type: str) -> Ref:
        """Write data at key under the stack key; the reference to that version."""
        put = self.s3.put_object(
            Bucket=self.bucket,
            Key=key,
            Body=data,
            ContentType=content_type,
            ServerSideEncryption="aws:kms",
            SSEKMSKeyId=self.kms_key_arn,
        )
        return {"key": key, "version_id": str(put.get("VersionId") or "null"), "sha256": sha256_hex(data)}

    def delete(self, key: str) -> None:
        """Delete key's current version (earlier versions stay until they expire)."""
        self.s3.delete_object(Bucket=self.bucket, Key=key)


def load_node(objects: Objects, ref: Ref) -> dict[str, Any]:
    """A segment, checked against its reference."""
    node: dict[str, Any] = json.loads(objects.get(ref))
    if node.get("format") != NODE_FORMAT:
        raise ManifestError(f"{ref['key']} is not a manifest segment", "SEGMENT_CHANGED")
    return node


def empty_tree() -> dict[str, Any]:
    """The tree of a dataset with no parts."""
    return {"format": NODE_FORMAT, "fanout": FANOUT, "level": 0, "children": [], "parts": 0, "rows": 0}


# ---- reading ---------------------------------------------------------------------------------


def entries(objects: Objects, tree: Mapping[str, Any], threads: int = 16) -> list[Entry]:
    """Every part entry of a tree, in key order, each segment read at its version and checked
    (level by level, ``threads`` reads at a time)."""
    level, children = int(tree["level"]), list(tree["children"])
    with ThreadPoolExecutor(max_workers=threads) as pool:
        while True:
            nodes = list(pool.map(lambda c: load_node(objects, c["node"]), children))
            if level == 0:
                return [e for n in nodes for e in n["entries"]]
            children = [c for n in nodes for c in n["children"]]
            level -= 1


def lookup(objects: Objects, tree: Mapping[str, Any], key: str) -> Entry | None:
    """The entry of one part key, or None: one segment read per level."""
    level, children = int(tree["level"]), tree["children"]
    while children:
        child = children[_child_index(children, key)]
        node = load_node(objects, child["node"])
        if level == 0:
            return next((e for e in node["entries"] if e["key"] == key), None)
        children, level = node["children"], level - 1
    return None


def _child_index(children: list[Summary], key: str) -> int:
    """The child whose key range holds key: the last whose first key is <= key (else the first)."""
    return max(0, bisect.bisect_right([c["first"] for c in children], key) - 1)


# ---- writing ---------------------------------------------------------------------------------


class Merger(Protocol[F]):
    """What the tree needs of partials (F: one partial, or the merge of several)."""

    def parts(self, entries: list[Entry]) -> Iterator[F]:
        """The partials of these parts, in order, each checked against its entry."""

    def load(self, ref: Ref) -> F:
        """A stored merged partial, checked against its reference."""

    def merge(self, partials: Iterable[F]) -> F:
        """The merge of partials (of none: the empty partial)."""

    def encode(self, partial: F) -> bytes:
        """A merged partial's bytes (Parquet)."""


@dataclass
class Update(Generic[F]):
    """One publish's change to a dataset's tree: apply() writes the changed segments and their
    merged partials, and says what the new root holds."""

    dataset: str
    objects: Objects
    merger: Merger[F]
    fanout: int = FANOUT
    # Segment ids the new tree no longer uses (emptied, or folded into the root): deleted
    # once the root that stops naming them is written.
    dropped: list[str] = field(default_factory=list)
    segments_written: int = 0
    partials_merged: int = 0
    written: set[str] = field(default_factory=set)  # ids of the segments it wrote

    def apply(
        self, tree: Mapping[str, Any], merged: Callable[[], F] | None, changes: Mapping[str, Entry | None]
    ) -> tuple[dict[str, Any], F]:
        """The new tree and its merge, given the current tree, how to read its merge (called only
        when only parts were added; None: merge the children's) and changes (key -> its new
        entry, or None to take it out).

        An entry equal to the current one, or the removal of an absent key, changes nothing.
        """
        level, children = int(tree["level"]), list(tree["children"])
        todo = dict(sorted(changes.items()))
        if children:
            children, delta = self._children(children, level, todo)
        else:
            children = self._leaves([e for e in todo.values() if e is not None])
            delta = None
        while len(children) > self.fanout:  # the root is full: a new level under it
            level += 1
            children = [self._internal(None, piece, level) for piece in self._pieces(children)]
        while len(children) == 1 and level > 0:  # one child: its children are the root's
            only = children[0]
            self.dropped.append(only["id"])
            children = load_node(self.objects, only["node"])["children"]
            level -= 1
        if delta == [] and merged is not None:
            total = merged()  # nothing changed
        elif delta is not None and merged is not None:
            total = self._merge([merged(), *delta])
        else:
            total = self._merge(self.merger.load(c["merged"]) for c in children)
        new_tree = {
            "format": NODE_FORMAT,
            "fanout": self.fanout,
            "level": level,
            "children": children,
            "parts": sum(int(c["parts"]) for c in children),
            "rows": sum(int(c["rows"]) for c in children),
        }
        return new_tree, total

    # Each of the next two returns the new summaries that replace the ones given, and what
    # they added: [] nothing, [partial] the merge of the parts added, None when a part was
    # removed or replaced (the parent must merge its children again).

    def _children(
        self, children: list[Summary], level: int, changes: dict[str, Entry | None]
    ) -> tuple[list[Summary], list[F] | None]:
        by_child: dict[int, dict[str, Entry | None]] = {}
        for key, entry in changes.items():
            by_child.setdefault(_child_index(children, key), {})[key] = entry
        out: list[Summary] = []
        added: list[F] | None = []
        for i, child in enumerate(children):
            if i not in by_child:
                out.append(child)
                continue
            replaced, delta = self._node(child, level, by_child[i])
            out.extend(replaced)
            if delta is None or added is None:
                added = None
            else:
                added.extend(delta)
        if added and len(added) > 1:
            added = [self._merge(added)]
        return out, added

    def _node(
        self, summary: Summary, level: int, changes: dict[str, Entry | None]
    ) -> tuple[list[Summary], list[F] | None]:
        node = load_node(self.objects, summary["node"])
        if level > 0:
            children, delta = self._children(node["children"], level - 1, changes)
            if children == node["children"]:
                return [summary], []
            pieces = self._pieces(children)
            if not pieces:
                self._drop(summary)
                return [], None
            if delta is not None and len(pieces) == 1:
                merged = self._merge([self.merger.load(summary["merged"]), *delta])
                return [self._internal(summary["id"], children, level, merged)], delta
            ids = [summary["id"], *(None for _ in pieces[1:])]
            return [self._internal(i, piece, level) for i, piece in zip(ids, pieces, strict=True)], delta
        current = {e["key"]: e for e in node["entries"]}
        added: list[Entry] = []
        additive = True
        for key, entry in changes.items():
            old = current.get(key)
            if entry is None:
                if old is not None:
                    del current[key]
                    additive = False
            elif old is None:
                current[key] = entry
                added.append(entry)
            elif old != entry:
                current[key] = entry
                additive = False
        if not added and additive:
            return [summary], []
        leaves = self._pieces(sorted(current.values(), key=lambda e: e["key"]))
        if not leaves:
            self._drop(summary)
            return [], None
        if additive and len(leaves) == 1:
            gained = self._merge(self.merger.parts(added))
            merged = self._merge([self.merger.load(summary["merged"]), gained])
            return [self._leaf(summary["id"], leaves[0], merged)], [gained]
        ids = [summary["id"], *(None for _ in leaves[1:])]
        out = [self._leaf(i, piece) for i, piece in zip(ids, leaves, strict=True)]
        return out, ([self._merge(self.merger.parts(added))] if additive else None)

    def _leaves(self, new: list[Entry]) -> list[Summary]:
        return [self._leaf(None, piece) for piece in self._pieces(sorted(new, key=lambda e: e["key"]))]

    def _leaf(self, node_id: str | None, items: list[Entry], merged: F | None = None) -> Summary:
        if merged is None:
            merged = self._merge(self.merger.parts(items))
        doc = {"format": NODE_FORMAT, "dataset": self.dataset, "level": 0, "entries": items}
        return self._write(
            node_id, doc, items[0]["key"], len(items), sum(int(e["rows"]) for e in items), merged
        )

    def _internal(
        self, node_id: str | None, children: list[Summary], level: int, merged: F | None = None
    ) -> Summary:
        if merged is None:
            merged = self._merge(self.merger.load(c["merged"]) for c in children)
        doc = {"format": NODE_FORMAT, "dataset": self.dataset, "level": level, "children": children}
        return self._write(
            node_id,
            doc,
            children[0]["first"],
            sum(int(c["parts"]) for c in children),
            sum(int(c["rows"]) for c in children),
            merged,
        )

    def _write(
        self, node_id: str | None, doc: dict[str, Any], first: str, parts: int, rows: int, merged: F
    ) -> Summary:
        node_id = node_id or uuid.uuid4().hex
        merged_ref = self.objects.put(
            node_merged_key(self.dataset, node_id),
            self.merger.encode(merged),
            "application/vnd.apache.parquet",
        )
        node_ref = self.objects.put(node_key(self.dataset, node_id), encode(doc), "application/json")
        self.segments_written += 1
        self.written.add(node_id)
        return {
            "id": node_id,
            "node": node_ref,
            "merged": merged_ref,
            "first": first,
            "parts": parts,
            "rows": rows,
        }

    def _drop(self, summary: Summary) -> None:
        self.dropped.append(summary["id"])

    def _merge(self, partials: Iterable[F]) -> F:
        counted = _Counted(partials)
        merged = self.merger.merge(counted)
        self.partials_merged += counted.count
        return merged

    def _pieces(self, items: list[Any]) -> list[list[Any]]:
        """items cut into the fewest pieces of at most fanout, as even as possible."""
        if not items:
            return []
        n = math.ceil(len(items) / self.fanout)
        size, extra = divmod(len(items), n)
        out, start = [], 0
        for i in range(n):
            end = start + size + (1 if i < extra else 0)
            out.append(items[start:end])
            start = end
        return out

    def delete_dropped(self, on_error: Callable[[str, ClientError], None]) -> None:
        """Delete the segments (and merged partials) the new root no longer names; their
        versions stay readable for readers of older roots until they expire."""
        for node_id in self.dropped:
            for key in (node_key(self.dataset, node_id), node_merged_key(self.dataset, node_id)):
                try:
                    self.objects.delete(key)
                except ClientError as exc:
                    on_error(key, exc)


def segment_ids(objects: Objects, dataset: str) -> set[str]:
    """The ids of every segment stored for a dataset (a listing: for rebuilding, not per publish)."""
    prefix = node_key(dataset, "")[: -len(".json")]
    ids: set[str] = set()
    for page in objects.s3.get_paginator("list_objects_v2").paginate(Bucket=objects.bucket, Prefix=prefix):
        ids.update(o["Key"][len(prefix) : -len(".json")] for o in page.get("Contents", []))
    return ids


class _Counted(Generic[F]):
    """An iterator that counts what it yields."""

    def __init__(self, items: Iterable[F]) -> None:
        self._items, self.count = iter(items), 0

    def __iter__(self) -> Iterator[F]:
        return self

    def __next__(self) -> F:
        item = next(self._items)
        self.count += 1
        return item
