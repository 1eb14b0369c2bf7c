"""The supported-types table of docs/guide.md: each listed type is accepted at definition and
travels both ways; reflection and ``vrpc describe`` show each method's JSON schema."""

# No `from __future__ import annotations` here: the services below are built from type objects.

import dataclasses
import datetime
import decimal
import enum
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypedDict

import msgspec
import pytest

import vrpc
from vrpc.testing import serve_for_tests

ROOT = Path(__file__).resolve().parents[1]


class Color(enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


@dataclasses.dataclass
class Point:
    x: int
    y: int = 0


class Movie(TypedDict):
    title: str
    year: int


class Pair(NamedTuple):
    left: str
    right: int


class Item(msgspec.Struct):
    name: str
    blob: bytes


# Each row of the guide's table, with a value that must survive a round trip.
SAMPLES: list[tuple[str, Any, Any]] = [
    ("None", None, None),
    ("bool", bool, True),
    ("int", int, -(2**40)),
    ("float", float, 1.5),
    ("str", str, "héllo"),
    ("bytes", bytes, b"\x00\xff"),
    ("datetime", datetime.datetime, datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)),
    ("date", datetime.date, datetime.date(2026, 1, 2)),
    ("time", datetime.time, datetime.time(3, 4, 5)),
    ("timedelta", datetime.timedelta, datetime.timedelta(seconds=90)),
    ("UUID", uuid.UUID, uuid.UUID(int=7)),
    ("Decimal", decimal.Decimal, decimal.Decimal("1.10")),
    ("Enum", Color, Color.RED),
    ("IntEnum", Level, Level.HIGH),
    ("Literal", Literal["a", "b"], "b"),
    ("list", list[int], [1, 2]),
    ("tuple", tuple[int, ...], (1, 2)),
    ("tuple", tuple[str, int], ("a", 1)),
    ("set", set[int], {1, 2}),
    ("frozenset", frozenset[str], frozenset({"a"})),
    ("dict", dict[str, list[bytes]], {"k": [b"v"]}),
    ("Optional", int | None, None),
    ("Union", int | str, "x"),
    ("dataclass", Point, Point(1, 2)),
    ("TypedDict", Movie, {"title": "M", "year": 1999}),
    ("NamedTuple", Pair, Pair("a", 1)),
    ("msgspec.Struct", Item, Item("n", b"b")),
    ("Any", Any, {"free": [1, "form"]}),
]


def _service_for(tp: Any) -> type[vrpc.Service]:
    class Types(vrpc.Service, name="types.v1"):
        @vrpc.rpc
        async def same(self, value: tp) -> tp:  # type: ignore[valid-type]
            return value

    return Types


def test_the_guide_lists_every_tested_row() -> None:
    guide = (ROOT / "docs" / "guide.md").read_text()
    table = guide[guide.index("## Supported types") :]
    for row, _, _ in SAMPLES:
        assert f"`{row}`" in table, row


@pytest.mark.parametrize(
    ("row", "tp", "value"), SAMPLES, ids=[f"{s[0]}-{i}" for i, s in enumerate(SAMPLES)]
)
async def test_each_supported_type_travels(row: str, tp: Any, value: Any) -> None:
    async with serve_for_tests([_service_for(tp)()]) as client:
        result = await client.call("types.v1.same", [value])
        back = msgspec.convert(result, tp, strict=False) if tp is not Any else result
        assert back == value
        assert type(back) is type(value)


class Store(vrpc.Service, name="store.v1"):
    @vrpc.rpc
    async def put(self, item: Item, *, ttl: float | None = None, tags: list[str] = []) -> Point:  # noqa: B006
        raise NotImplementedError

    @vrpc.rpc
    async def upload(self, chunks: AsyncIterator[bytes], name: str) -> int:
        raise NotImplementedError


class StoreImpl(Store):
    async def put(self, item: Item, *, ttl: float | None = None, tags: list[str] = []) -> Point:  # noqa: B006
        return Point(len(item.blob), len(tags))

    async def upload(self, chunks: AsyncIterator[bytes], name: str) -> int:
        return sum([len(c) async for c in chunks])


async def test_reflection_shows_json_schemas() -> None:
    async with serve_for_tests([StoreImpl()]) as client:
        listing = await client.call("vrpc.reflection.list_services", [])
    methods = {m["name"]: m for m in listing["store.v1"]}
    put = methods["store.v1.put"]["schema"]
    args = put["arguments"]
    assert list(args["properties"]) == ["item", "ttl", "tags"]  # declaration order
    assert args["required"] == ["item"]
    assert args["x-keyword-only"] == ["ttl", "tags"]
    assert args["properties"]["item"] == {"$ref": "#/$defs/Item"}
    assert args["properties"]["ttl"]["default"] is None
    assert args["properties"]["tags"] == {
        "type": "array",
        "items": {"type": "string"},
        "default": [],
    }
    assert put["result"] == {"$ref": "#/$defs/Point"}
    # bytes appear in the JSON form the CLI reads and prints.
    blob = put["$defs"]["Item"]["properties"]["blob"]
    assert blob["properties"]["$b64"]["contentEncoding"] == "base64"
    assert put["$defs"]["Point"]["required"] == ["x"]
    upload = methods["store.v1.upload"]["schema"]
    assert upload["request_items"]["required"] == ["$b64"]
    assert list(upload["arguments"]["properties"]) == ["name"]


async def _chunks(*items: bytes) -> AsyncIterator[bytes]:
    for item in items:
        yield item


async def test_a_stream_declared_before_other_parameters_reaches_the_handler_in_place() -> None:
    async with serve_for_tests([StoreImpl()]) as client:
        assert await client.stub(Store).upload(_chunks(b"ab", b"c"), "n") == 3
