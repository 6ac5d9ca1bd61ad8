"""Per-version health from CloudWatch (``maas.ports.HealthSource`` on AWS).

The inference functions publish EMF metrics (``maas.backends.aws.telemetry.EmfMetrics``: namespace
``maas``, dimensions ``model`` and ``version``); the deploy workflow's ``check_health`` step reads a
canary's window back with one ``GetMetricData`` call: ``Invocations`` (Sum), ``Errors`` (Sum) and
``ModelLatency`` (p99, milliseconds). The window is widened to whole minutes (CloudWatch's standard
resolution) and read as a single period, so the p99 is the window's own. A statistic CloudWatch has
no value for (no request in the window) is 0 requests / no p99.

EMF metrics reach CloudWatch about a minute after the requests: bake for a few minutes on AWS."""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from typing import Any

from maas.backends.aws.errors import aws_errors
from maas.backends.aws.telemetry import NAMESPACE
from maas.ports import VersionHealth

WHAT = "the metrics store"
MINUTE = 60


def _floor_minute(moment: datetime) -> datetime:
    return moment.replace(second=0, microsecond=0)


class CloudWatchHealth:
    def __init__(self, client: Any, namespace: str = NAMESPACE):
        self.client = client
        self.namespace = namespace

    def queries(self, model: str, version: int, period: int) -> list[dict[str, Any]]:
        dimensions = [{"Name": "model", "Value": model}, {"Name": "version", "Value": str(version)}]

        def query(query_id: str, metric: str, stat: str) -> dict[str, Any]:
            return {"Id": query_id, "ReturnData": True, "MetricStat": {
                "Metric": {"Namespace": self.namespace, "MetricName": metric, "Dimensions": dimensions},
                "Period": period, "Stat": stat}}

        return [query("invocations", "Invocations", "Sum"), query("errors", "Errors", "Sum"),
                query("p99", "ModelLatency", "p99")]

    def health(self, model: str, version: int, since: datetime, until: datetime) -> VersionHealth:
        start = _floor_minute(since)
        end = max(until, start + timedelta(seconds=1))
        period = max(MINUTE, math.ceil((end - start).total_seconds() / MINUTE) * MINUTE)
        values: dict[str, list[float]] = {"invocations": [], "errors": [], "p99": []}
        request: dict[str, Any] = {"MetricDataQueries": self.queries(model, version, period), "StartTime": start,
                                   "EndTime": start + timedelta(seconds=period), "ScanBy": "TimestampAscending"}
        with aws_errors(WHAT):
            while True:
                answer = self.client.get_metric_data(**request)
                for result in answer.get("MetricDataResults", []):
                    found = values.get(str(result.get("Id")))
                    if found is not None:
                        found.extend(float(v) for v in result.get("Values", []) if _finite(v))
                token = answer.get("NextToken")
                if not token:
                    break
                request["NextToken"] = token
        requests = round(sum(values["invocations"]))
        errors = min(round(sum(values["errors"])), requests) if requests else 0
        p99 = max(values["p99"]) if values["p99"] else None
        return VersionHealth(requests=requests, errors=errors, p99_latency_ms=p99)


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


__all__ = ["CloudWatchHealth"]
