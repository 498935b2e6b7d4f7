"""YAML loading that remembers where every key and value came from.

PyYAML's SafeLoader throws line numbers away once it has built Python objects. Validation needs
them (``isthmus.yaml:14: tunnels.to-b.ike.proposals[0]: ...``), so this loader builds
:class:`MarkedMap` / :class:`MarkedSeq` (a ``dict`` / ``list`` subclass) that carry the 1-based
line of the node itself, of each key and of each value. Scalars stay plain Python values as the
YAML 1.1 safe schema resolves them.

Duplicate keys, which PyYAML silently accepts (the last one wins), are recorded as problems.

Syntax errors are re-raised as :class:`YamlSyntaxError` with only the problem, line and column:
PyYAML's own message quotes the offending source line, which could be a line holding a secret.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, SequenceNode


class MarkedMap(dict):
    """A mapping from YAML with the lines of itself, its keys and its values (1-based)."""

    line: int
    key_lines: dict[Any, int]
    value_lines: dict[Any, int]

    def __init__(self, line: int = 0) -> None:
        super().__init__()
        self.line = line
        self.key_lines = {}
        self.value_lines = {}

    def key_line(self, key: Any) -> int:
        return self.key_lines.get(key, self.line)

    def value_line(self, key: Any) -> int:
        return self.value_lines.get(key, self.line)


class MarkedSeq(list):
    """A sequence from YAML with the lines of itself and of each item (1-based)."""

    line: int
    item_lines: list[int]

    def __init__(self, line: int = 0) -> None:
        super().__init__()
        self.line = line
        self.item_lines = []

    def item_line(self, index: int) -> int:
        return self.item_lines[index] if 0 <= index < len(self.item_lines) else self.line


@dataclass(frozen=True)
class DuplicateKey:
    """A key that appears twice in one mapping (line of the second occurrence)."""

    key: Any
    line: int
    first_line: int


class YamlSyntaxError(Exception):
    """The document is not well-formed YAML. Never quotes source text."""

    def __init__(self, problem: str, line: int, column: int) -> None:
        super().__init__(f"line {line}, column {column}: {problem}")
        self.problem = problem
        self.line = line
        self.column = column


class _Marking:
    """Constructors building MarkedMap/MarkedSeq and collecting duplicate keys."""

    duplicates: list[DuplicateKey]

    def construct_marked_map(self, node: MappingNode):  # generator constructor, as PyYAML's own
        data = MarkedMap(node.start_mark.line + 1)
        yield data
        self.flatten_mapping(node)  # YAML merge keys (<<)
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                raise ConstructorError(None, None, "a mapping key must be a plain value (string or number)",
                                       key_node.start_mark)
            key_line = key_node.start_mark.line + 1
            if key in data:
                self.duplicates.append(DuplicateKey(key, key_line, data.key_lines[key]))
            data[key] = self.construct_object(value_node, deep=True)
            data.key_lines[key] = key_line
            data.value_lines[key] = value_node.start_mark.line + 1

    def construct_marked_seq(self, node: SequenceNode):
        data = MarkedSeq(node.start_mark.line + 1)
        yield data
        for item_node in node.value:
            data.append(self.construct_object(item_node, deep=True))
            data.item_lines.append(item_node.start_mark.line + 1)


class MarkedLoader(_Marking, yaml.SafeLoader):
    """SafeLoader (PyYAML's Python parser) building MarkedMap/MarkedSeq; its syntax error
    messages are the ones users see."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self.duplicates = []


_CSafeLoader = getattr(yaml, "CSafeLoader", None)
if _CSafeLoader is not None:
    class FastMarkedLoader(_Marking, _CSafeLoader):  # type: ignore[valid-type,misc]
        """The same on libyaml's parser (~10x faster: a 1,000-tunnel file, issue 13)."""

        def __init__(self, stream: Any) -> None:
            super().__init__(stream)
            self.duplicates = []
else:  # pragma: no cover - PyYAML built without libyaml
    FastMarkedLoader = None  # type: ignore[assignment,misc]

for _loader in (MarkedLoader, FastMarkedLoader):
    if _loader is not None:
        _loader.add_constructor("tag:yaml.org,2002:map", _Marking.construct_marked_map)
        _loader.add_constructor("tag:yaml.org,2002:seq", _Marking.construct_marked_seq)


def load_marked(text: str) -> tuple[Any, list[DuplicateKey]]:
    """Parse one YAML document; return (data, duplicate keys). Raises YamlSyntaxError.

    libyaml parses; a document it refuses is parsed again by PyYAML's Python parser so that
    the error reads the same whichever parser is installed."""
    if FastMarkedLoader is not None:
        fast = FastMarkedLoader(text)
        try:
            return fast.get_single_data(), fast.duplicates
        except yaml.YAMLError:
            pass
        finally:
            fast.dispose()
    loader = MarkedLoader(text)
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark is not None else (0, 0)
        problem = exc.problem or exc.context or "invalid YAML"
        raise YamlSyntaxError(problem, line, column) from None
    except yaml.YAMLError as exc:  # pragma: no cover - PyYAML raises MarkedYAMLError for documents
        raise YamlSyntaxError(type(exc).__name__, 0, 0) from None
    finally:
        loader.dispose()
    return data, loader.duplicates
