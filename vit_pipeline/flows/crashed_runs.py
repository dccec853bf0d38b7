"""The ``end-crashed-runs`` flow: a crashed flow run's MLflow runs end KILLED, with the reason.

Run by the automation of ``vit_pipeline.zombies`` for every ``prefect.flow-run.Crashed``
event: a flow run whose process was SIGKILLed, or whose host was lost, never ran its
``on_crashed`` hook, so its MLflow runs would stay RUNNING until some later command
reaped them. Its deployment (``prefect.yaml``) runs on the ``maintenance`` queue, so a
worker on another host ends what the lost one left.
"""

from __future__ import annotations

from uuid import UUID

from prefect import flow, get_run_logger

from vit_pipeline import progress, runs, zombies


@flow(name="end-crashed-runs")
def end_crashed_runs(flow_run_id: str) -> list[str]:
    """Ends KILLED the RUNNING MLflow runs tagged with ``flow_run_id`` (an id, or an event's resource id).

    The store is the one the crashed flow run tracked to (its parameters), else this
    worker's ``MLFLOW_TRACKING_URI`` / ``$VIT_PIPELINE_HOME`` default.
    """
    progress.quiet_libraries()  # a worker's flow run never goes through the CLI
    from prefect.client.orchestration import get_client

    run_id = zombies.flow_run_id(flow_run_id)
    with get_client(sync_client=True) as client:
        crashed = client.read_flow_run(UUID(run_id))
    state = crashed.state
    reason = (f"Marked KILLED by the end-crashed-runs flow: Prefect flow run {crashed.name} ({run_id}) "
              f"{state.name if state else 'ended'}: {(state.message if state else '') or 'no message'}")  # fmt: skip
    killed = runs.mark_flow_run_killed(runs.flow_run_config(crashed.parameters), run_id, reason)
    get_run_logger().info("Flow run %s: marked KILLED %s", run_id, killed or "no RUNNING MLflow run")
    return killed
