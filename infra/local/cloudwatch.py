"""CloudWatch as the local stack (and the tests) need it from moto.

* The embedded metric format, extracted as CloudWatch Logs does on AWS: each log line that carries
  ``_aws.CloudWatchMetrics`` becomes ``PutMetricData`` data, one per dimension set and value.
* Percentile statistics: moto's GetMetricData knows Sum/Average/Minimum/Maximum/SampleCount only (a
  ``pNN`` crashes its serializer); ``with_percentiles`` adds nearest-rank percentiles, as CloudWatch
  computes them, so the deploy health check's p99 reads the same locally."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
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
                for single in value if isinstance(value, list) else [value]:
                    found.append((directive["Namespace"], {
                        "MetricName": metric["Name"], "Dimensions": dimensions, "Timestamp": timestamp,
                        "Unit": metric.get("Unit", "None"), "Value": float(single)}))
    return found


def put_metrics(cloudwatch: Any, lines: list[str]) -> None:
    by_namespace: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        for namespace, datum in metric_data(line):
            by_namespace.setdefault(namespace, []).append(datum)
    for namespace, data in by_namespace.items():
        for start in range(0, len(data), 20):
            cloudwatch.put_metric_data(Namespace=namespace, MetricData=data[start:start + 20])


def with_percentiles(setattr_: Callable[..., None]) -> None:
    """Patch moto's statistics with ``pNN`` (``setattr_(owner, name, value)`` records the original)."""
    from moto.cloudwatch.models import Statistics

    original = Statistics.get_statistics_for_type

    def percentiles(self: Any, stat: str) -> Any:
        if stat.startswith("p") and stat[1:].replace(".", "").isdigit():
            values = sorted(self.metric_single_values_list)
            return values[max(math.ceil(float(stat[1:]) / 100 * len(values)), 1) - 1] if values else None
        return original(self, stat)

    setattr_(Statistics, "get_statistics_for_type", percentiles)
