"""What the synchronous standby costs the tunnel: on a replicated lab, `lab bench` runs
the profile a second time with the standby stopped (the primary then commits alone,
as a lone database does), in the same run, and reports the ratio.

Stopping it is the cleanest "single node" here: same machine, same data, same
Patroni-managed primary; only the wait for the standby's flush (and the standby's own
replay work on the shared cores) goes away. The standby is started again afterwards
and the run waits until it follows as a synchronous standby once more.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from lab.backends.base import LabError, Progress
from lab.controller import Lab
from lab.measure import IperfResult

ALONE_TIMEOUT = 30.0
ALONE = ", standby stopped"


def bench_primary_alone(lab: Lab, duration: float, progress: Progress, raw_dir: Path | None,
                        underlay: IperfResult | None) -> dict[str, Any]:
    """The profile again with the synchronous standby stopped; its result is labelled
    '<run>, standby stopped'. The standby is back (and synchronous) when this returns."""
    from lab.bench import bench_profile  # bench imports nothing of this module

    cluster = lab.cluster()
    cluster.wait_healthy(progress)
    standby = next(cluster.node(m.name) for m in cluster.members() if m.role == "sync_standby")
    progress(f"the same with the synchronous standby {standby.name} stopped (the primary "
             "commits alone)")
    lab.backend.stop(standby)
    try:
        wait_committing_alone(lab)
        result = bench_profile(lab, duration, progress, raw_dir, underlay=underlay)
    finally:
        progress(f"starting {standby.name} again")
        lab.backend.start(standby, progress)
        cluster.wait_healthy(progress)
    result["run"] += ALONE
    result["standby"] = "stopped"
    return result


def wait_committing_alone(lab: Lab) -> None:
    """Until the primary no longer names a synchronous standby (Patroni's next loop)."""
    deadline = time.monotonic() + ALONE_TIMEOUT
    with lab.admin() as conn:
        while conn.execute("SELECT current_setting('synchronous_standby_names')"
                           ).fetchone() != ("",):
            if time.monotonic() > deadline:
                raise LabError("the primary still waits for a synchronous standby "
                               f"{ALONE_TIMEOUT:g}s after it stopped")
            time.sleep(0.3)


def standby_cost(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """With the standby / without: the ratio of the two runs' throughput."""
    synced = next((r for r in results if "error" not in r and r.get("standby") == "sync"),
                  None)
    alone = next((r for r in results if "error" not in r and r.get("standby") == "stopped"),
                 None)
    if not synced or not alone or not alone["receiver_mbps"]:
        return None
    return {"with_sync_standby_mbps": synced["receiver_mbps"],
            "primary_alone_mbps": alone["receiver_mbps"],
            "ratio": round(synced["receiver_mbps"] / alone["receiver_mbps"], 3)}
