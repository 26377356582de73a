"""Reading and writing orch's YAML: YAML 1.2's core schema only (no `yes` as true, no `1e5` quirks, no tags or
anchors beyond plain data), bounded in size and depth, and the short quotes of values that messages show.

Light on purpose (PyYAML, no pydantic): `orch --help` and the messages of every command use it.
"""

from __future__ import annotations

import errno
import math
import re
import reprlib
from pathlib import Path
from typing import Any

import yaml

from orchestrator.core.errors import OrchError
from orchestrator.core.files import NotAPlainFile, read_plain

MAX_FILE_BYTES = 1 << 20  # profiles and recipes are a few hundred bytes
MAX_DEPTH = 32  # nesting of mappings and lists
SHOWN_VALUE_CHARS = 200  # a value quoted in a message
MAX_MESSAGE_CHARS = 3000  # a whole message stays one readable paragraph

TAG = "tag:yaml.org,2002:"


class Refused(yaml.MarkedYAMLError):
    """YAML that parses but is not accepted in orch's files."""


class Loader(yaml.SafeLoader):
    """YAML 1.2's core schema: only `true`/`false` are booleans, only `null`/`~`/empty is null, numbers are plain
    decimal (or 0o/0x) integers and floats. `yes`, `no`, `on`, `off`, `1:30:00`, `2024-01-01` stay strings, so a
    schema refuses them where a number or boolean belongs instead of guessing. Anchors, aliases and merge keys are
    refused (they let a few lines expand into gigabytes), as are duplicate keys, other tags and deep nesting."""

    yaml_implicit_resolvers: dict[Any, list[tuple[str, re.Pattern[str]]]] = {}  # none of YAML 1.1's
    yaml_constructors: dict[Any, Any] = {}  # only the core schema's, below

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise Refused(
                None, None, "anchors and aliases (&name, *name) are not allowed; write each value out", event.start_mark
            )
        self.depth = getattr(self, "depth", 0) + 1
        if self.depth > MAX_DEPTH:
            raise Refused(None, None, f"nested deeper than {MAX_DEPTH} levels", event.start_mark)
        node = super().compose_node(parent, index)
        self.depth -= 1
        if isinstance(node, yaml.MappingNode):
            seen: set[tuple[str, str]] = set()
            for key, _ in node.value:
                if key.tag == TAG + "merge":
                    raise Refused(None, None, "merge keys (<<) are not allowed; write each field out", key.start_mark)
                if isinstance(key, yaml.ScalarNode):
                    if (key.tag, key.value) in seen:
                        raise Refused(None, None, f"duplicate key {shown(key.value)}", key.start_mark)
                    seen.add((key.tag, key.value))
        return node

    def construct_yaml_bool(self, node: Any) -> bool:
        value = self.construct_scalar(node)
        if value.lower() not in ("true", "false"):
            raise Refused(None, None, f"{shown(value)} is not a boolean (true or false)", node.start_mark)
        return value.lower() == "true"

    def construct_yaml_int(self, node: Any) -> int:
        value = self.construct_scalar(node)
        sign, digits = (-1, value[1:]) if value[:1] == "-" else (1, value.lstrip("+"))
        base = {"0o": 8, "0x": 16}.get(digits[:2], 10)
        try:
            return sign * int(digits[2:] if base != 10 else digits, base)
        except ValueError:
            raise Refused(None, None, f"{shown(value)} is not an integer orch can read", node.start_mark) from None

    def construct_yaml_float(self, node: Any) -> float:
        value = self.construct_scalar(node)
        if re.fullmatch(r"[-+]?\.(?:inf|Inf|INF)", value):
            return -math.inf if value.startswith("-") else math.inf
        if re.fullmatch(r"\.(?:nan|NaN|NAN)", value):
            return math.nan
        try:
            return float(value)
        except ValueError:
            raise Refused(None, None, f"{shown(value)} is not a number", node.start_mark) from None

    def construct_undefined(self, node: Any) -> Any:
        raise Refused(None, None, f"the tag {shown(node.tag)} is not allowed", node.start_mark)


for _tag, _pattern, _first in (
    ("null", r"(?:~|null|Null|NULL|)\Z", ["~", "n", "N", ""]),
    ("bool", r"(?:true|True|TRUE|false|False|FALSE)\Z", list("tTfF")),
    ("int", r"(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)\Z", list("-+0123456789")),
    (
        "float",
        r"(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))\Z",
        list("-+0123456789."),
    ),
    ("merge", r"<<\Z", ["<"]),  # recognised only to be refused
):
    Loader.add_implicit_resolver(TAG + _tag, re.compile(_pattern), _first)
for _tag, _construct in (
    ("null", yaml.SafeLoader.construct_yaml_null),
    ("bool", Loader.construct_yaml_bool),
    ("int", Loader.construct_yaml_int),
    ("float", Loader.construct_yaml_float),
    ("str", yaml.SafeLoader.construct_yaml_str),
    ("seq", yaml.SafeLoader.construct_yaml_seq),
    ("map", yaml.SafeLoader.construct_yaml_map),
):
    Loader.add_constructor(TAG + _tag, _construct)
Loader.add_constructor(None, Loader.construct_undefined)


class Dumper(yaml.SafeDumper):
    """Writes what `Loader` reads back as the same values: a string that either YAML 1.1 or 1.2 would take for
    something else (`yes`, `1e5`, `0o7`) is quoted."""


for _first, _resolvers in Loader.yaml_implicit_resolvers.items():
    for _tag, _regexp in _resolvers:
        Dumper.add_implicit_resolver(_tag, _regexp, [_first])


def dump_yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=Dumper, sort_keys=False, allow_unicode=True)


def parse_yaml(text: str, where: str) -> Any:
    """A YAML document read with `Loader`; any problem is one OrchError paragraph that starts with `where`."""
    try:
        return yaml.load(text, Loader=Loader)  # noqa: S506 - Loader is a SafeLoader with fewer types
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        what = "" if isinstance(err, Refused) else "not valid YAML: "
        problem = "; ".join(str(part) for part in (err.context, err.problem) if part)
        raise OrchError(clip(f"{where}{at}: {what}{problem}.")) from None
    except yaml.YAMLError as err:
        raise OrchError(clip(f"{where}: not valid YAML: {' '.join(str(err).split())}.")) from None


def flow(value: Any) -> str:
    """A value as YAML on one line."""
    return yaml.dump(value, Dumper=Dumper, default_flow_style=True, width=10**6).removesuffix("\n...\n").strip()


def shown(value: Any) -> str:
    """A value as quoted in a message: its repr, at most SHOWN_VALUE_CHARS long (the whole of a huge value is never
    formatted)."""
    text = _REPR.repr(value)
    return text if len(text) <= SHOWN_VALUE_CHARS else text[: SHOWN_VALUE_CHARS - 3] + "..."


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = SHOWN_VALUE_CHARS
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 8
_REPR.maxlevel = 3


def clip(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """A message of at most `limit` characters, on one line."""
    message = " ".join(message.split())
    return message if len(message) <= limit else message[: limit - 30] + " ... (message shortened)"


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = read_plain(path, MAX_FILE_BYTES, follow_links=True)
    except NotAPlainFile as err:
        if err.errno == errno.EFBIG:
            err.strerror = f"larger than {MAX_FILE_BYTES >> 10} KiB"
        raise OrchError(f"{path}: {err.strerror}; profiles and recipes are plain YAML files of a few lines.") from None
    except OSError as err:
        raise OrchError(f"{path}: cannot be read: {err.strerror or err}.") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise OrchError(f"{path}: not UTF-8 text.") from None
    data = parse_yaml(text, str(path))
    if not isinstance(data, dict):
        raise OrchError(f"{path}: expected a mapping of fields at the top level, found {type(data).__name__}.")
    return data
