"""Prometheus metrics, all named undo_proxy_*. Labels are protocols, statuses and kinds only: never
users, paths or addresses."""
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry()

VERBS_STARTED = Counter("undo_proxy_verbs_started", "Requests that became verbs", ["protocol"],
                        registry=REGISTRY)
VERBS = Counter("undo_proxy_verbs", "Verbs recorded, by final status", ["protocol", "status"],
                registry=REGISTRY)
BYTES_RECORDED = Counter("undo_proxy_blob_bytes_stored", "Compressed bytes added to the blob store",
                         registry=REGISTRY)
COMMIT_SECONDS = Histogram("undo_proxy_timeline_commit_seconds", "Time of one group commit",
                           buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
                           registry=REGISTRY)
COMMIT_BATCH = Histogram("undo_proxy_timeline_commit_batch_size", "Writes sharing one commit",
                         buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=REGISTRY)
TIMELINE_UP = Gauge("undo_proxy_timeline_writable", "1 while the timeline accepts writes", registry=REGISTRY)
SNAPSHOTS = Counter("undo_proxy_snapshots_taken", "Snapshots taken", ["backend"], registry=REGISTRY)
SNAPSHOT_SECONDS = Histogram("undo_proxy_snapshot_seconds", "Time to take one snapshot", registry=REGISTRY)
GATE_PAUSE_SECONDS = Histogram("undo_proxy_gate_pause_seconds", "Mutating traffic held for a snapshot",
                               registry=REGISTRY)
SNAPSHOT_FAILURES = Counter("undo_proxy_snapshot_failures", "Snapshot operations that failed", ["operation"],
                            registry=REGISTRY)
REPLAYED = Counter("undo_proxy_replayed_verbs", "Verbs re-executed by replay", ["protocol"], registry=REGISTRY)
REPLAY_PROGRESS = Gauge("undo_proxy_replay_progress_ratio", "Share of the open cycle's replay done",
                        registry=REGISTRY)
INCONSISTENCIES = Counter("undo_proxy_inconsistencies", "Inconsistencies found by replay", ["kind"],
                          registry=REGISTRY)
COMPENSATIONS = Counter("undo_proxy_compensations", "Compensations run, by result", ["state"], registry=REGISTRY)
FRONTEND_ERRORS = Counter("undo_proxy_frontend_errors", "Requests refused or failed at a front-end",
                          ["protocol", "reason"], registry=REGISTRY)
MODE = Gauge("undo_proxy_cycle_open", "1 while an undo cycle is open", registry=REGISTRY)
