"""YAML as the project's config and pool files are read: safe, and refusing a key written twice.

PyYAML keeps the last of two equal keys in one mapping without a word. In a hand-edited file that is
nearly always a mistake with a silent effect: a tenant's second entry replaces its first budget, a
pool's second `sources: alpha:` drops every model the first one mapped. Such a file is refused, with
the line of each occurrence. Keys brought in by a merge (`<<: *defaults`) may still be overridden,
as YAML intends.
"""

from __future__ import annotations

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode

_MERGE_TAG = "tag:yaml.org,2002:merge"


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping naming one key twice."""

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict:
        first_line: dict[object, int] = {}
        for key_node, _value in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                seen = first_line.get(key)
            except TypeError:  # an unhashable key: SafeLoader says so below
                continue
            if seen is not None:
                raise ConstructorError("while reading a mapping", node.start_mark,
                                       f"key {key!r} is written twice (first on line {seen + 1}); "
                                       "remove or rename one", key_node.start_mark)
            first_line[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def load_yaml(text: str, source: str = "<string>") -> object:
    """Parse one YAML document with SafeLoader's types; errors point into `source` (the file's name).

    Raises:
        yaml.YAMLError: invalid YAML, or a mapping that names one key twice (with both lines).
    """
    loader = _UniqueKeyLoader(text)
    loader.name = source  # what the error marks name, instead of "<unicode string>"
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
