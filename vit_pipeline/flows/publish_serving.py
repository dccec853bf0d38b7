"""The ``publish-serving`` flow: the champion as a Triton repository and KServe/Kubernetes manifests.

Scheduled (``prefect.yaml``): each run reads which version the alias points at and
writes it (``vit_pipeline.serving_export.publish``) only when the repository does not
hold it yet, so a new version folder appears when the champion moves and never
otherwise. Point Triton at ``<out_dir>/triton``; how it picks up a new version (explicit model
control and a load request in production, polling on one machine): deploy/README.md.
"""

from __future__ import annotations

from prefect import flow

from vit_pipeline import progress, serving_export, tracking


@flow(name="publish-serving", log_prints=True)
def publish_serving(model_uri: str = "models:/vit-cifar100@champion", out_dir: str = "serving",
                    storage_uri: str | None = None, tracking_uri: str | None = None,
                    consumer_tracking_uri: str | None = None) -> dict:  # fmt: skip
    """Publishes ``model_uri``'s current version under ``out_dir`` if it is not there yet."""
    progress.quiet_libraries()  # a worker's flow run never goes through the CLI
    result = serving_export.publish(model_uri, out_dir, tracking_uri or tracking.tracking_uri(),
                                    storage_uri=storage_uri, consumer_tracking_uri=consumer_tracking_uri)  # fmt: skip
    if result["published"]:
        print(f"Published {result['name']} version {result['version']} under {out_dir}")
        if result["note"]:
            print(f"Note: {result['note']}")
    else:
        print(f"Nothing to publish: {result['reason']}")
    return result
