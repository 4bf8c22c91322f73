"""Federated evaluation: the sites' scores of one global model, combined into the figures people compare.

Each site scores the model on its own held-out split and sends only counts and means; the
federation's accuracy and loss are their means weighted by the number of examples (what one
evaluation over the union of the sites' splits would give), or, robust to a site that lies, their
median or trimmed mean (spec.evaluation.combine); the worst and best site show how evenly the
model serves them, and the outliers which sites score far from the others. The engine (status)
and finalize (MLflow) both use `combine`, so the two always agree, over the same scores and the
same combination: those the engine accepted, which the coordinator records per round with how it
combined them (``round-NNNN/federated.json``). Pure Python: the control plane imports it.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedtrain.contract.sitetask import DEFAULT_OUTLIER_DISTANCE, EXAMPLES_LIMIT, Combination, evaluation_output


@dataclass(frozen=True)
class SiteScore:
    """One site's evaluation: how many examples, the accuracy and mean loss over them."""

    examples: int
    accuracy: float
    loss: float

    @classmethod
    def from_output(cls, output: Mapping[str, Any], max_examples: int = EXAMPLES_LIMIT, where: str = "output"
                    ) -> SiteScore:
        """A site's evaluation figures, valid or refused: `BadDataError` naming the field otherwise.

        Valid means an accuracy in [0, 1], a finite loss >= 0 and 1 to ``max_examples`` examples, so
        that no score outside them reaches a status, a mean, MLflow or the champion rule.
        """
        figures = evaluation_output(output, max_examples, where)
        return cls(figures.examples, figures.accuracy, figures.loss)


@dataclass(frozen=True)
class FederatedScore:
    """The sites' scores combined, how (``combination``), and the sites far from the others (``outliers``)."""

    accuracy: float
    loss: float
    examples: int
    sites: int
    worst_site: str
    worst_accuracy: float
    best_site: str
    best_accuracy: float
    combination: Combination = "weighted"
    outliers: tuple[str, ...] = ()


def combine(scores: Mapping[str, SiteScore], how: Combination = "weighted",
            outlier_distance: float = DEFAULT_OUTLIER_DISTANCE) -> FederatedScore | None:
    """The sites' accuracy and loss combined ``how``, the worst and best site and the outliers (None without scores).

    ``weighted``: means weighted by examples, what one evaluation over the union of the splits
    gives, but a site that claims many examples moves it most. ``median``: the median site's
    figures, unweighted: no single site moves them far. ``trimmed``: with three sites or more the
    highest and the lowest accuracy are left out and the rest weighted by examples. ``examples``
    counts every site. Ties between sites go to the name that sorts first, so the answer never
    depends on arrival order.
    """
    if not scores:
        return None
    ordered = sorted(scores.items(), key=lambda item: (item[1].accuracy, item[0]))
    if how == "median":
        accuracy = statistics.median(s.accuracy for s in scores.values())
        loss = statistics.median(s.loss for s in scores.values())
    else:
        kept = [s for _, s in (ordered[1:-1] if how == "trimmed" and len(ordered) >= 3 else ordered)]
        accuracy, loss = _weighted(kept)
    worst = ordered[0]
    best = min(scores.items(), key=lambda item: (-item[1].accuracy, item[0]))
    return FederatedScore(accuracy, loss, sum(s.examples for s in scores.values()), len(scores), worst[0],
                          worst[1].accuracy, best[0], best[1].accuracy, how, outliers(scores, outlier_distance))


def _weighted(kept: list[SiteScore]) -> tuple[float, float]:
    examples = sum(s.examples for s in kept)
    return (sum(s.accuracy * s.examples for s in kept) / examples,
            sum(s.loss * s.examples for s in kept) / examples)


def outliers(scores: Mapping[str, SiteScore], distance: float = DEFAULT_OUTLIER_DISTANCE) -> tuple[str, ...]:
    """Sites whose accuracy is more than ``distance`` from the median site accuracy (needs three sites or more).

    With two sites the median is their mean and both are equally far: neither can be told apart
    as the odd one. A far site is a broken or poisoned evaluation, or data unlike the others':
    either way someone should look, so it is named, never dropped by this rule.
    """
    if len(scores) < 3:
        return ()
    median = statistics.median(s.accuracy for s in scores.values())
    return tuple(sorted(site for site, s in scores.items() if abs(s.accuracy - median) > distance))
