"""Small protobuf builders shared by the Controller and Task services."""

from __future__ import annotations

from google.protobuf.any_pb2 import Any as AnyMessage
from google.protobuf.timestamp_pb2 import Timestamp

from kwasm.api import cgroups_stats_pb2

METRICS_TYPE_URL = "io.containerd.cgroups.v2.Metrics"


def timestamp(seconds: float) -> Timestamp:
    """A Timestamp for UNIX time ``seconds``."""
    stamp = Timestamp()
    whole = int(seconds)
    stamp.seconds = whole
    stamp.nanos = int((seconds - whole) * 1e9)
    return stamp


def metrics_any(guests: int, memory_bytes: int, memory_limit: int = 0) -> AnyMessage:
    """cgroup v2 style Metrics (pids.current = running guests, memory.usage) packed in an Any."""
    metrics = cgroups_stats_pb2.Metrics()
    metrics.pids.current = guests
    metrics.memory.usage = memory_bytes
    metrics.memory.usage_limit = memory_limit
    return AnyMessage(type_url=METRICS_TYPE_URL, value=metrics.SerializeToString())
