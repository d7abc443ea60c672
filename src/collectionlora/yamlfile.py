"""Strict YAML for the files people edit by hand (params.yaml, bank manifests, `--set` values): a key
written twice is an error naming both lines, where PyYAML would silently keep the last value; and `1e-4`
is the float YAML 1.2 says it is, not PyYAML's string."""

from __future__ import annotations

import re

import yaml

MERGE_TAG = "tag:yaml.org,2002:merge"


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a duplicate mapping key (a ConstructorError marked at the second one)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._key_paths: dict[int, tuple] = {}  # id(mapping node) -> its keys from the top, for messages

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        where = self._key_paths.get(id(node), ())
        first_lines: dict[object, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == MERGE_TAG:  # `<<: *anchor` merges are SafeLoader's own business
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                first = first_lines.get(key)
            except TypeError:  # an unhashable key: SafeLoader reports it below
                continue
            field = ".".join(str(part) for part in (*where, key))
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{field}: duplicate key (first on line {first})", key_node.start_mark
                )
            first_lines[key] = key_node.start_mark.line + 1
            if isinstance(value_node, yaml.MappingNode):
                self._key_paths[id(value_node)] = (*where, key)
        return super().construct_mapping(node, deep=deep)


# YAML 1.2 exponent floats (`1e-4`, `1.5e3`): PyYAML (YAML 1.1) wants a dot and a signed exponent and
# reads these as strings, which a strictly typed learning rate would then refuse.
UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(text: str) -> object:
    """Parse one YAML document with `UniqueKeyLoader`; errors are yaml.YAMLError (see `yaml_problem`)."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def yaml_problem(error: yaml.YAMLError, with_line: bool = True) -> str:
    """The error as one line: 'line N: problem' (without the line for a one-line value such as `--set`)."""
    mark = getattr(error, "problem_mark", None)
    problem = " ".join(str(getattr(error, "problem", None) or error).split())
    return f"line {mark.line + 1}: {problem}" if with_line and mark is not None else problem
