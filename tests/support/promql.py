"""The metric names a PromQL expression reads, for tests that keep alerts and dashboards in step with metrics.py.

Not a PromQL parser: a small scanner good enough for the expressions this repository ships. It drops, in
order: Grafana variables (``$pod``, ``${datasource}``, ``$__rate_interval``), string literals, label matchers
``{...}``, range and subquery brackets ``[...]``, grouping clauses (``by``/``without``/``on``/``ignoring``/
``group_left``/``group_right`` with their label list), ``offset`` durations and numbers. Every identifier left
that is not a keyword and not followed by ``(`` (a function or aggregation call) is a metric name.
"""

from __future__ import annotations

import re

KEYWORDS = frozenset(
    {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool"}
    | {"inf", "nan", "atan2"}
)
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")

_VARIABLE = re.compile(r"\$\{?\w+\}?")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_OFFSET = re.compile(r"\boffset\s+-?[0-9smhdwy]+")
_NUMBER = re.compile(r"(?<![\w:])(?:0x[0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)")
_IDENTIFIER = re.compile(r"(?<![\w:])([a-zA-Z_:][\w:]*)(\s*\()?")


def metric_names(expr: str) -> set[str]:
    """The metric names ``expr`` selects, for example ``{"auth_denied_total"}`` for
    ``sum by (reason) (rate(auth_denied_total{code="503"}[5m]))``."""
    text = _VARIABLE.sub("x", expr)  # before strings: a variable can sit inside a matcher's value
    text = _STRING.sub('""', text)
    text = _MATCHERS.sub(" ", text)
    text = _BRACKETS.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = _OFFSET.sub(" ", text)
    text = _NUMBER.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name, call = match.groups()
        if call is None and name.lower() not in KEYWORDS:
            names.add(name)
    return names


def exposed_names(families: dict[str, str]) -> set[str]:
    """The series names a scrape carries for ``families`` (name -> type, as in the exposition's ``# TYPE``
    lines): a histogram ``x`` is read as ``x_bucket``, ``x_count`` and ``x_sum``; other names as they are."""
    names = set()
    for name, kind in families.items():
        if kind == "histogram":
            names.update(name + suffix for suffix in HISTOGRAM_SUFFIXES)
        else:
            names.add(name)
    return names
