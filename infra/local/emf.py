"""CloudWatch's embedded metric format, extracted as CloudWatch Logs does on AWS: each log line that
carries ``_aws.CloudWatchMetrics`` becomes ``PutMetricData`` calls, one per dimension set."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any


def metric_data(line: str) -> list[tuple[str, dict[str, Any]]]:
    """(namespace, datum) pairs of one EMF line; [] for anything that is not EMF."""
    try:
        record = json.loads(line)
        directives = record["_aws"]["CloudWatchMetrics"]
    except (ValueError, KeyError, TypeError):
        return []
    timestamp = datetime.fromtimestamp(record["_aws"].get("Timestamp", 0) / 1000, tz=UTC)
    found = []
    for directive in directives:
        for dimension_set in directive.get("Dimensions", [[]]):
            dimensions = [{"Name": name, "Value": str(record[name])} for name in dimension_set if name in record]
            for metric in directive.get("Metrics", []):
                value = record.get(metric["Name"])
                if value is None:
                    continue
                values = value if isinstance(value, list) else [value]
                datum: dict[str, Any] = {"MetricName": metric["Name"], "Dimensions": dimensions,
                                         "Timestamp": timestamp, "Unit": metric.get("Unit", "None"),
                                         "Values": [float(v) for v in values]}
                found.append((directive["Namespace"], datum))
    return found


def put_metrics(cloudwatch: Any, lines: list[str]) -> None:
    by_namespace: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        for namespace, datum in metric_data(line):
            by_namespace.setdefault(namespace, []).append(datum)
    for namespace, data in by_namespace.items():
        for start in range(0, len(data), 20):
            cloudwatch.put_metric_data(Namespace=namespace, MetricData=data[start:start + 20])
