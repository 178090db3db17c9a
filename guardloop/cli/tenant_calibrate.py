"""The `--tenant NAME` side of `guardloop calibrate`: its reviewed traffic in, a policy snippet (or file) out."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import typer

from guardloop.cli.app import open_database
from guardloop.core.errors import UserError
from guardloop.core.settings import Settings
from guardloop.storage import ReviewRepository
from guardloop.trainer.tenant_calibration import policy_snippet, tenant_examples, tenant_thresholds, write_policy


@dataclass(frozen=True)
class TenantInputs:
    texts: list[str]
    labels: list[str]
    own: dict[str, float]  # the thresholds the tenant's policy sets itself
    previous: dict[str, float]  # what it decides with now: the model's (and the operator's), then its own


def tenant_inputs(settings: Settings, tenant: str, model_thresholds: dict[str, float]) -> TenantInputs:
    own = tenant_thresholds(settings.policy_path, tenant)
    reviews = ReviewRepository(
        open_database(),
        labels_per_item=settings.review_labels_per_item,
        second_opinion_share=settings.review_second_opinion_share,
    )
    examples = tenant_examples(reviews.database, tenant, reviews=reviews)
    if not examples.texts:
        raise UserError(
            f"--tenant {tenant}: no reviewed labels of its traffic yet; its review-band texts wait in the review queue"
        )
    previous = dict(model_thresholds) | settings.thresholds | own
    return TenantInputs(examples.texts, examples.labels, own, previous)


def finish_tenant(
    settings: Settings, tenant: str, inputs: TenantInputs, calibrated: dict[str, float], version: str, write: bool
) -> None:
    """Print the tenant's new thresholds as a policy snippet; with `write`, put them into the policy file."""
    thresholds = inputs.own | calibrated
    comment = (
        f"guardloop calibrate --tenant {tenant}: {len(inputs.texts)} reviewed texts, model {version}, "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
    )
    typer.echo(policy_snippet(tenant, thresholds, comment), nl=False)
    if write:
        if settings.policy_path is None:
            raise UserError("--write-policy: no policy file is configured (set GUARDLOOP_POLICY_PATH)")
        new_version = write_policy(settings.policy_path, tenant, thresholds)
        typer.echo(f"wrote {settings.policy_path} as version {new_version}; services reload it by themselves", err=True)
