"""Connecting to Ray: a cluster when RAY_ADDRESS is set (e.g. under `ray job submit`), else a local instance."""
from __future__ import annotations

import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def ensure_ray(num_cpus: int | None = None) -> None:
    """Start or join Ray once per process. Local mode binds the dashboard to 127.0.0.1 only."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        return
    # The dashboard (127.0.0.1 only) serves the state API that Ray Train's clean-up actors poll.
    ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True,
             configure_logging=True, logging_level="WARNING")
    # Ray Train's helper actors look the cluster up by address: name ours, in case other local instances run
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
