"""Flow runs whose process died without a word: Prefect's own machinery marks them Crashed, then KILLED in MLflow.

A flow run whose process is SIGKILLed (or whose host is lost) never runs its
``on_crashed`` hook, and Prefect leaves it Running. Prefect documents the remedy
("How to detect and respond to zombie flows"): flow runs emit heartbeat events
(``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``, set for every deployment in
``prefect.yaml``), and an automation marks a flow run Crashed once its heartbeats
stop without a terminal state. This module creates that automation, and a second
one that reacts to every ``prefect.flow-run.Crashed`` event by running the
``end-crashed-runs`` deployment (``vit_pipeline/flows/crashed_runs.py``), which
ends the flow run's MLflow runs KILLED with the reason. Both are created (or
updated, by name) with ``vit-pipeline automations``, which ``deploy/local.sh
deploy`` runs after the deployments exist.
"""

from __future__ import annotations

from datetime import timedelta

ZOMBIE_AUTOMATION = "vit-pipeline: crash zombie flow runs"
CRASHED_AUTOMATION = "vit-pipeline: end the MLflow runs of crashed flow runs"
END_CRASHED_DEPLOYMENT = "end-crashed-runs/end-crashed-runs"
HEARTBEAT_SECONDS = 60  # prefect.yaml's PREFECT_FLOWS_HEARTBEAT_FREQUENCY for the deployments
MISSED_BEATS = 2  # heartbeats missed before a flow run counts as a zombie
FLOW_RUN_PREFIX = "prefect.flow-run."
# This project's flows: the automations judge only their runs (another project's flows on the same server
# may send heartbeats at another period, or none) - matched on the event's related flow, by name.
FLOW_NAMES = ["train-pipeline", "sweep", "sweep-trials", "benchmark-champion", "publish-serving",
              "proxy-experiment", "transfer-experiment", "end-crashed-runs"]  # fmt: skip
# The flows whose crash ends their MLflow runs: not end-crashed-runs itself (it opens none), whose crash (a
# worker that cannot check out the code) started another end-crashed-runs, which crashed too, for ever.
CLEANED_UP_FLOWS = [name for name in FLOW_NAMES if name != "end-crashed-runs"]


def _our_flows(names: list[str] = FLOW_NAMES):
    from prefect.events.schemas.events import ResourceSpecification

    return ResourceSpecification({"prefect.resource.role": "flow", "prefect.resource.name": names})


def zombie_automation(heartbeat_seconds: int = HEARTBEAT_SECONDS, missed: int = MISSED_BEATS):
    """Prefect's documented zombie automation: no heartbeat and no terminal state for ``missed`` beats -> Crashed."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    return Automation(
        name=ZOMBIE_AUTOMATION,
        description=f"A flow run that sent heartbeats and then none for {missed} x {heartbeat_seconds} s, "
        "with no terminal state, lost its process: mark it Crashed.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },  # fmt: skip
            match=ResourceSpecification({"prefect.resource.id": [f"{FLOW_RUN_PREFIX}*"]}),
            match_related=_our_flows(),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=missed * heartbeat_seconds),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"No heartbeat for {missed} x {heartbeat_seconds} s: its process is gone (zombie flow run)",
            )
        ],  # fmt: skip
    )


def crashed_automation(deployment_id):
    """Every Crashed flow run (a zombie, or one its worker saw die) -> ``end-crashed-runs`` for it."""
    from prefect.automations import Automation
    from prefect.events.actions import RunDeployment
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    return Automation(
        name=CRASHED_AUTOMATION,
        description="End the MLflow runs of a crashed flow run KILLED, with the reason (its hooks never ran).",
        trigger=EventTrigger(
            expect={"prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": [f"{FLOW_RUN_PREFIX}*"]}),
            match_related=_our_flows(CLEANED_UP_FLOWS),
            posture=Posture.Reactive,
            threshold=1,
        ),
        actions=[
            RunDeployment(
                source="selected",
                deployment_id=deployment_id,
                parameters={"flow_run_id": "{{ event.resource.id }}"},
            )
        ],  # fmt: skip
    )


def ensure_automations(
    heartbeat_seconds: int = HEARTBEAT_SECONDS, missed: int = MISSED_BEATS
) -> dict[str, str]:
    """Creates both automations, or updates the ones of the same name; returns name -> id.

    Raises:
        ValueError: the ``end-crashed-runs`` deployment does not exist yet (deploy first).
    """
    from prefect.automations import Automation
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name(END_CRASHED_DEPLOYMENT)
    except ObjectNotFound:
        raise ValueError(
            f"Deployment {END_CRASHED_DEPLOYMENT!r} does not exist on this Prefect server: run "
            "`prefect --no-prompt deploy --all` (deploy/local.sh deploy) first"
        ) from None
    out = {}
    for wanted in (zombie_automation(heartbeat_seconds, missed), crashed_automation(deployment.id)):
        try:
            existing = Automation.read(name=wanted.name)
        except ValueError:  # Automation.read raises ValueError when no automation has that name
            existing = None
        if existing is None:
            out[wanted.name] = str(wanted.create().id)
        else:
            wanted.id = existing.id
            wanted.update()
            out[wanted.name] = str(existing.id)
    return out


def flow_run_id(resource_id: str) -> str:
    """``prefect.flow-run.<uuid>`` (an event's resource) or ``<uuid>`` -> ``<uuid>``.

    Raises:
        ValueError: not a flow run id (a run of the deployment started by hand without one said only "badly
            formed hexadecimal UUID string").
    """
    from uuid import UUID

    found = resource_id.removeprefix(FLOW_RUN_PREFIX)
    try:
        return str(UUID(found))
    except ValueError:
        raise ValueError(f"Expected flow_run_id to be a Prefect flow run id (a UUID, or "
                         f"'{FLOW_RUN_PREFIX}<uuid>'). Received: {resource_id!r}") from None  # fmt: skip
