"""Dataset contracts and the bucket's key layout.

A contract says what a dataset's part files look like (columns and types), how they are
grouped, which columns are summarised with which statistics, which derived columns are
computed from those statistics, and the minimum group size that may be published.

The default contract is the reference analysis s3rollup started from: group by
``category``; mean, std, min and max of ``value1..3``; and
``combined = value1.mean * value2.std + value3.max - value1.min``.

This module is imported on the Lambda side: standard library only.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

INCOMING = "incoming/"
QUARANTINE = "quarantine/"
PARTIALS = "partials/"
RESULTS = "results/"
CONTRACTS = "contracts/"

STATISTICS = ("mean", "std", "min", "max")
COLUMN_TYPES = ("int64", "float64", "string")

# The cells pandas' read_csv reads as missing by default (pandas._libs.parsers.STR_NA_VALUES;
# a unit test checks the installed pandas still says so). pandas, the reference analysis,
# reads them as missing in every column: so do the validator and the worker, unless a
# contract says otherwise (na_values, keep_default_na: pandas' own read_csv options).
DEFAULT_NA_VALUES: tuple[str, ...] = (
    "",
    "#N/A",
    "#N/A N/A",
    "#NA",
    "-1.#IND",
    "-1.#QNAN",
    "-NaN",
    "-nan",
    "1.#IND",
    "1.#QNAN",
    "<NA>",
    "N/A",
    "NA",
    "NULL",
    "NaN",
    "None",
    "n/a",
    "nan",
    "null",
)
# A contract's own spellings: at most this many, of at most this many characters, none
# holding a comma, a quote or a control character (a line break would end the record).
_MAX_NA_VALUES = 100
_MAX_NA_CHARS = 64
_NA_FORBIDDEN = re.compile(r'[,"\x00-\x1f\x7f]')

# Lower-case, digits, '-' and '_': safe in keys, table keys, log fields and file names.
_DATASET_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
# A derived term: "<column>.<statistic>".
_TERM_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\.(mean|std|min|max)$")


class ContractError(ValueError):
    """A contract file or a key that does not follow the layout."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Derived:
    """A derived column: a sum of signed products of statistics (e.g. a.mean * b.std - c.min)."""

    name: str
    # Each term: (sign, [factor, ...]) with factors like ("value1", "mean").
    terms: tuple[tuple[int, tuple[tuple[str, str], ...]], ...]

    def evaluate(self, stat: Callable[[tuple[str, str]], Any]) -> Any:
        """The column from stat((column, statistic)) (arrays or Series), left to right as
        the reference analysis's pandas expression is, so results match it bit for bit."""
        acc: Any = None
        for sign, factors in self.terms:
            prod = stat(factors[0])
            for f in factors[1:]:
                prod = prod * stat(f)
            if acc is None:
                acc = prod if sign > 0 else -prod
            else:
                acc = acc + prod if sign > 0 else acc - prod
        return acc


@dataclass(frozen=True)
class Contract:
    """What a dataset's parts contain and how they are rolled up."""

    columns: dict[str, str]
    group_by: tuple[str, ...]
    values: tuple[str, ...]
    statistics: tuple[str, ...] = STATISTICS
    derived: tuple[Derived, ...] = ()
    min_group_size: int = 1
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    # The cells read as missing (NaN in a value column; in a group key, the row is left out
    # of every group, as pandas' groupby leaves it out), matched exactly, sorted.
    na_values: tuple[str, ...] = DEFAULT_NA_VALUES

    @property
    def used_columns(self) -> tuple[str, ...]:
        """The columns the rollup reads: group keys, then value columns."""
        return self.group_by + self.values


def _seed_combined() -> Derived:
    return parse_derived("combined", "value1.mean * value2.std + value3.max - value1.min")


def parse_derived(name: str, expression: str) -> Derived:
    """Parse 'a.mean * b.std + c.max - a.min' into signed product terms."""
    tokens = expression.replace("+", " + ").replace("-", " - ").split()
    terms: list[tuple[int, tuple[tuple[str, str], ...]]] = []
    factors: list[tuple[str, str]] = []
    sign, expect_factor = 1, True
    for tok in tokens:
        if expect_factor:
            if tok in "+-" and not factors:
                sign = -sign if tok == "-" else sign
                continue
            m = _TERM_RE.match(tok)
            if not m:
                raise ContractError("BAD_DERIVED", f"derived column {name!r}: bad term {tok!r}")
            factors.append((m.group(1), m.group(2)))
            expect_factor = False
        elif tok == "*":
            expect_factor = True
        elif tok in "+-":
            terms.append((sign, tuple(factors)))
            sign, factors, expect_factor = (-1 if tok == "-" else 1), [], True
        else:
            raise ContractError("BAD_DERIVED", f"derived column {name!r}: unexpected {tok!r}")
    if expect_factor or not factors:
        raise ContractError("BAD_DERIVED", f"derived column {name!r}: incomplete expression")
    terms.append((sign, tuple(factors)))
    return Derived(name=name, terms=tuple(terms))


DEFAULT_CONTRACT = Contract(
    columns={
        "id": "int64",
        "value1": "float64",
        "value2": "float64",
        "value3": "float64",
        "category": "int64",
    },
    group_by=("category",),
    values=("value1", "value2", "value3"),
    derived=(_seed_combined(),),
)


def contract_from_json(doc: dict[str, Any], default_min_group_size: int = 1) -> Contract:
    """Build a contract from the JSON document stored at contracts/<dataset>.json."""
    try:
        columns = {str(k): str(v) for k, v in dict(doc["columns"]).items()}
        group_by = tuple(str(c) for c in doc["group_by"])
        values = tuple(str(c) for c in doc["values"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ContractError("BAD_CONTRACT", f"contract needs columns, group_by, values: {exc}") from None
    for col, typ in columns.items():
        if typ not in COLUMN_TYPES:
            raise ContractError("BAD_CONTRACT", f"column {col!r}: type must be one of {COLUMN_TYPES}")
    for col in group_by + values:
        if col not in columns:
            raise ContractError("BAD_CONTRACT", f"column {col!r} is used but not declared")
    for col in values:
        if columns[col] not in ("int64", "float64"):
            raise ContractError("BAD_CONTRACT", f"value column {col!r} must be numeric")
    stats = tuple(doc.get("statistics", STATISTICS))
    if not set(stats) <= set(STATISTICS):
        raise ContractError("BAD_CONTRACT", f"statistics must be among {STATISTICS}")
    derived = tuple(parse_derived(n, e) for n, e in dict(doc.get("derived", {})).items())
    for d in derived:
        for _, factors in d.terms:
            for col, stat in factors:
                if col not in values or stat not in stats:
                    raise ContractError("BAD_DERIVED", f"derived {d.name!r} uses {col}.{stat}")
    k = int(doc.get("min_group_size", default_min_group_size))
    if k < 1:
        raise ContractError("BAD_CONTRACT", "min_group_size must be at least 1")
    na = na_values_from(doc.get("na_values", []), doc.get("keep_default_na", True))
    return Contract(columns, group_by, values, stats, derived, k, extra=dict(doc), na_values=na)


def na_values_from(extra: Any, keep_default: Any) -> tuple[str, ...]:
    """The missing-value spellings of a contract document, as pandas' read_csv takes them:
    ``na_values`` added to its defaults, or alone when ``keep_default_na`` is false."""
    if not isinstance(keep_default, bool):
        raise ContractError("BAD_CONTRACT", "keep_default_na must be true or false")
    if not isinstance(extra, list) or not all(isinstance(v, str) for v in extra):
        raise ContractError("BAD_CONTRACT", "na_values must be a list of strings")
    if len(extra) > _MAX_NA_VALUES:
        raise ContractError("BAD_CONTRACT", f"na_values: at most {_MAX_NA_VALUES} spellings")
    for i, v in enumerate(extra):
        # Spellings are quoted by position only: a contract is configuration, but the
        # message may end up next to a part's in a log.
        if len(v) > _MAX_NA_CHARS:
            raise ContractError("BAD_CONTRACT", f"na_values[{i}]: longer than {_MAX_NA_CHARS} characters")
        if _NA_FORBIDDEN.search(v):
            raise ContractError(
                "BAD_CONTRACT", f"na_values[{i}]: a comma, quote or control character cannot be a spelling"
            )
    return tuple(sorted(set(extra) | (set(DEFAULT_NA_VALUES) if keep_default else set())))


def load_contract(raw: bytes | None, default_min_group_size: int = 1) -> Contract:
    """The dataset's contract from its JSON bytes, or the default contract when there is none."""
    if raw is None:
        return Contract(
            DEFAULT_CONTRACT.columns,
            DEFAULT_CONTRACT.group_by,
            DEFAULT_CONTRACT.values,
            DEFAULT_CONTRACT.statistics,
            DEFAULT_CONTRACT.derived,
            default_min_group_size,
        )
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise ContractError("BAD_CONTRACT", f"contract is not JSON: {exc.__class__.__name__}") from None
    if not isinstance(doc, dict):
        raise ContractError("BAD_CONTRACT", "contract must be a JSON object")
    return contract_from_json(doc, default_min_group_size)


# ---- key layout -------------------------------------------------------------------------


@dataclass(frozen=True)
class PartKey:
    """An object key under incoming/<dataset>/, decoded."""

    key: str
    dataset: str
    name: str

    @property
    def part_id(self) -> str:
        """A stable, key-safe identifier of the part (its key may hold any character)."""
        return hashlib.sha256(self.key.encode("utf-8")).hexdigest()[:32]


def parse_part_key(key: str) -> PartKey:
    """Split 'incoming/<dataset>/<name>' or raise ContractError with a reason code."""
    if not key.startswith(INCOMING):
        raise ContractError("NOT_INCOMING", "key is outside incoming/")
    rest = key[len(INCOMING) :]
    dataset, sep, name = rest.partition("/")
    if not sep or not name or name.endswith("/"):
        raise ContractError("BAD_KEY", "key must be incoming/<dataset>/<part file>")
    if not _DATASET_RE.match(dataset):
        raise ContractError("BAD_DATASET", "dataset name must match [a-z0-9][a-z0-9_-]{0,62}")
    return PartKey(key=key, dataset=dataset, name=name)


def check_dataset(dataset: str) -> str:
    """Return the dataset name if valid, else raise ContractError."""
    if not _DATASET_RE.match(dataset):
        raise ContractError("BAD_DATASET", "dataset name must match [a-z0-9][a-z0-9_-]{0,62}")
    return dataset


def contract_key(dataset: str) -> str:
    """Where the dataset's optional contract lives."""
    return f"{CONTRACTS}{dataset}.json"


def partial_key(dataset: str, part_id: str) -> str:
    """Where the partial aggregate of a part lives."""
    return f"{PARTIALS}{dataset}/{part_id}.parquet"


def merged_partial_key(dataset: str) -> str:
    """Where the job keeps the merge of every partial behind the published result.

    Under partials/, not results/: it holds every group, below the minimum group size too.
    """
    return f"{PARTIALS}{dataset}/merged.parquet"


def result_prefix(dataset: str) -> str:
    """The prefix of a dataset's published result."""
    return f"{RESULTS}{dataset}/"


# The published objects, by their name in the manifest. The Parquet file has a prefix of
# its own so that a query engine given a location (Athena, Glue, Spark) finds Parquet only.
RESULT_OBJECTS = {
    "aggregate.parquet": "parquet/aggregate.parquet",
    "aggregate.json": "aggregate.json",
}


def result_key(dataset: str, name: str) -> str:
    """The key of one published object ("aggregate.parquet", "aggregate.json", "manifest.json")."""
    return result_prefix(dataset) + RESULT_OBJECTS.get(name, name)


def quarantine_key(part: PartKey) -> str:
    """Where a rejected part is copied to."""
    return f"{QUARANTINE}{part.dataset}/{part.name}"
