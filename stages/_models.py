"""The up-front weights check, for the stages that load models and for `check`.

It lives apart from `_common` so that only those stages import the model wrappers: DVC then
reruns train, evaluate or report for no edit of a model wrapper."""

from __future__ import annotations

from pipeline.config import Params


def check_models(params: Params) -> None:
    """Raise `WeightsMissing` naming every model of the run whose weights are absent, so that a
    missing one is reported in seconds, before hours of work by an earlier stage."""
    # Imported here like every stage's library code: nothing loads before the params are valid.
    from pipeline.models import check_weights, needed_roles

    check_weights(params.models, needed_roles(params))
