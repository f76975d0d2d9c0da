"""Key layout and contracts: pure functions, no AWS."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from s3rollup.contract import (
    DEFAULT_CONTRACT,
    DEFAULT_NA_VALUES,
    ContractError,
    load_contract,
    parse_derived,
    parse_part_key,
    partial_key,
)


def test_part_key_splits_dataset_and_name() -> None:
    part = parse_part_key("incoming/sales/2026/11/part 1+é.csv")
    assert (part.dataset, part.name) == ("sales", "2026/11/part 1+é.csv")
    assert len(part.part_id) == 32 and part.part_id.isalnum()


@pytest.mark.parametrize(
    ("key", "code"),
    [
        ("results/sales/x.csv", "NOT_INCOMING"),
        ("incoming/sales", "BAD_KEY"),
        ("incoming/sales/", "BAD_KEY"),
        ("incoming/Sales/x.csv", "BAD_DATASET"),
        ("incoming/../x.csv", "BAD_DATASET"),
    ],
)
def test_keys_outside_the_layout_are_refused_with_a_code(key: str, code: str) -> None:
    with pytest.raises(ContractError) as err:
        parse_part_key(key)
    assert err.value.code == code


def test_part_ids_differ_for_keys_that_differ_only_in_case_or_encoding() -> None:
    ids = {parse_part_key(k).part_id for k in ("incoming/a/x.csv", "incoming/a/X.csv", "incoming/a/x%2Ecsv")}
    assert len(ids) == 3
    assert partial_key("a", "abc") == "partials/a/abc.parquet"


def test_default_contract_is_the_reference_analysis() -> None:
    c = load_contract(None, default_min_group_size=3)
    assert c.group_by == ("category",) and c.values == ("value1", "value2", "value3")
    assert c.statistics == ("mean", "std", "min", "max") and c.min_group_size == 3
    assert c.derived == DEFAULT_CONTRACT.derived
    (combined,) = c.derived
    assert combined.terms == (
        (1, (("value1", "mean"), ("value2", "std"))),
        (1, (("value3", "max"),)),
        (-1, (("value1", "min"),)),
    )


def test_contract_document_is_validated() -> None:
    doc = {
        "columns": {"k": "string", "v": "float64"},
        "group_by": ["k"],
        "values": ["v"],
        "derived": {"spread": "v.max - v.min"},
        "min_group_size": 5,
    }
    c = load_contract(json.dumps(doc).encode())
    assert c.used_columns == ("k", "v") and c.min_group_size == 5
    for bad in (
        {**doc, "values": ["k"]},
        {**doc, "group_by": ["nope"]},
        {**doc, "min_group_size": 0},
        {**doc, "derived": {"x": "v.median"}},
        {"columns": {}},
    ):
        with pytest.raises(ContractError):
            load_contract(json.dumps(bad).encode())
    with pytest.raises(ContractError):
        load_contract(b"{not json")


def test_missing_value_spellings_default_to_pandas_and_a_contract_narrows_or_extends_them() -> None:
    doc = {"columns": {"k": "int64", "v": "float64"}, "group_by": ["k"], "values": ["v"]}
    assert load_contract(json.dumps(doc).encode()).na_values == DEFAULT_NA_VALUES
    assert load_contract(None).na_values == DEFAULT_NA_VALUES
    extended = load_contract(json.dumps({**doc, "na_values": ["missing", "NA"]}).encode())
    assert set(extended.na_values) == {*DEFAULT_NA_VALUES, "missing"}
    narrow = load_contract(json.dumps({**doc, "na_values": ["", "NA"], "keep_default_na": False}).encode())
    assert narrow.na_values == ("", "NA")


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("na_values", "NA", "list of strings"),
        ("na_values", [1], "list of strings"),
        ("na_values", ["a,b"], "na_values[0]: a comma"),
        ("na_values", ["ok", 'a"b'], "na_values[1]: a comma"),
        ("na_values", ["line\nbreak"], "control character"),
        ("na_values", ["x" * 65], "longer than 64"),
        ("na_values", [str(i) for i in range(101)], "at most 100"),
        ("keep_default_na", "no", "true or false"),
    ],
)
def test_bad_missing_value_spellings_are_refused_with_a_clear_error(
    field: str, value: object, says: str
) -> None:
    doc = {"columns": {"k": "int64", "v": "float64"}, "group_by": ["k"], "values": ["v"], field: value}
    with pytest.raises(ContractError) as err:
        load_contract(json.dumps(doc).encode())
    assert err.value.code == "BAD_CONTRACT" and says in str(err.value)


def test_derived_expression_parser_rejects_garbage() -> None:
    assert parse_derived("d", "-a.mean").terms == ((-1, (("a", "mean"),)),)
    for bad in ("a.mean *", "a.mean b.min", "import os", "a.mean / b.std"):
        with pytest.raises(ContractError):
            parse_derived("d", bad)


def test_the_readme_s_contract_example_loads() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split("### Dataset contracts", 1)[1].split("```json", 1)[1].split("```", 1)[0]
    c = load_contract(block.encode())
    assert c.group_by == ("region",) and {"-", "missing", "NA"} <= set(c.na_values)
