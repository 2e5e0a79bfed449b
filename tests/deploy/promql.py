"""What a Grafana dashboard asks Prometheus for: the metric names and label names in each PromQL
expression of its panels and template variables (enough PromQL to check names, not to evaluate)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Query", "dashboard_queries"]

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)?\s*\{([^}]*)\}")
_MATCHER_LABEL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
             "inf", "nan", "e"}  # fmt: skip


@dataclass
class Query:
    where: str  # the panel (and target) or template variable it came from
    expr: str
    metrics: set[str] = field(default_factory=set)
    labels: set[str] = field(default_factory=set)  # in matchers and in by/without/on/ignoring(...)


def parse(where: str, expr: str) -> Query:
    query = Query(where, expr)
    text = re.sub(r"\$\{?\w+\}?", "1", expr)  # Grafana variables ($model, $__rate_interval) hold values, not names
    text = re.sub(r"\[[^\]]*\]", "", text)  # range and subquery durations
    for match in _SELECTOR.finditer(text):
        matchers = _STRING.sub('""', match.group(2))
        query.labels.update(_MATCHER_LABEL.findall(matchers))
        if match.group(1):
            query.metrics.add(match.group(1))
    text = _SELECTOR.sub(lambda m: f" {m.group(1) or ''} ", _STRING.sub('""', text))
    for match in _GROUPING.finditer(text):
        query.labels.update(name.strip() for name in match.group(2).split(",") if name.strip())
    text = _GROUPING.sub(" ", text)
    for match in _IDENT.finditer(text):
        rest = text[match.end():].lstrip()
        word = match.group(0)
        if rest.startswith("(") or word.lower() in _KEYWORDS or re.fullmatch(r"\d.*", word):
            continue  # a function (or aggregation) name, a keyword or a number
        query.metrics.add(word)
    return query


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # rows hold panels when collapsed


def dashboard_queries(dashboard: dict[str, Any]) -> list[Query]:
    queries = []
    for panel in _panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if "expr" in target:
                queries.append(parse(f"panel {panel.get('title')!r} target {target.get('refId')}", target["expr"]))
    for variable in dashboard.get("templating", {}).get("list", []):
        raw = variable.get("query")
        text = raw.get("query", "") if isinstance(raw, dict) else str(raw or "")
        values = re.fullmatch(r"\s*label_values\(\s*(.*?)\s*,\s*([A-Za-z_]\w*)\s*\)\s*", text)
        if values:
            query = parse(f"variable {variable.get('name')!r}", values.group(1))
            query.labels.add(values.group(2))
            queries.append(query)
        elif variable.get("type") == "query":
            queries.append(parse(f"variable {variable.get('name')!r}", text))
    return queries
