"""hstu.data.parsing.read_delimited on what real CSV writers produce: quoted fields holding
the delimiter, a UTF-8 byte order mark, CRLF line ends; and the line a bad file is named by."""

from __future__ import annotations

import pytest

from hstu.data.errors import DataError
from hstu.data.parsing import TextFormat, read_delimited

WANTED = {"user_id": "int", "range": "str", "score": "float"}


def test_quoted_fields_bom_and_crlf() -> None:
    raw = (
        b"\xef\xbb\xbfuser_id,\"range\",score\r\n"
        b"1,\"[10,50)\",0.5\r\n"
        b"2,\"say \"\"hi\"\", twice\",1\r\n"
        b"3,plain,2.25\r\n"
    )
    cols = read_delimited(raw, "u.csv", WANTED, TextFormat(delimiter=",", header=True, quoted=True))
    assert cols.data["user_id"].tolist() == [1, 2, 3]
    assert cols.data["range"].tolist() == ["[10,50)", 'say "hi", twice', "plain"]
    assert cols.data["score"].tolist() == [0.5, 1.0, 2.25]


def test_unquoted_reader_splits_on_the_comma_inside_quotes() -> None:
    # the same file read without quote handling has a field too many on line 2
    raw = b"user_id,range,score\n1,\"[10,50)\",0.5\n"
    with pytest.raises(DataError, match=r"u\.csv:2: expected 3 fields, got 4"):
        read_delimited(raw, "u.csv", WANTED, TextFormat(delimiter=",", header=True))


def test_bad_value_in_a_quoted_file_names_its_line_and_field() -> None:
    raw = b"user_id,range,score\r\n1,\"[0,10)\",0.5\r\n2,\"[10,50)\",high\r\n"
    with pytest.raises(DataError, match=r"u\.csv:3: field score: expected a number, got .high."):
        read_delimited(raw, "u.csv", WANTED, TextFormat(delimiter=",", header=True, quoted=True))
