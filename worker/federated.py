"""Federated evaluation: the sites' scores of one global model, combined into the figures people compare.

Each site scores the model on its own held-out split and sends only counts and means; the
federation's accuracy and loss are their means weighted by the number of examples (what one
evaluation over the union of the sites' splits would give), and the worst and best site show how
evenly the model serves them. The engine (status) and finalize (MLflow) both use `combine`, so
the two always agree, over the same scores: those the engine accepted, which the coordinator
records per round (``round-NNNN/federated.json``). Pure Python: the control plane imports it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedtrain.worker.sitetask import EXAMPLES_LIMIT, evaluation_output


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
    """The sites' scores combined."""

    accuracy: float
    loss: float
    examples: int
    sites: int
    worst_site: str
    worst_accuracy: float
    best_site: str
    best_accuracy: float


def combine(scores: dict[str, SiteScore]) -> FederatedScore | None:
    """Example-weighted accuracy and loss over the sites, with the worst and best site (None without scores).

    Ties between sites go to the name that sorts first, so the answer never depends on arrival order.
    """
    if not scores:
        return None
    examples = sum(s.examples for s in scores.values())
    accuracy = sum(s.accuracy * s.examples for s in scores.values()) / examples
    loss = sum(s.loss * s.examples for s in scores.values()) / examples
    ordered = sorted(scores.items(), key=lambda item: (item[1].accuracy, item[0]))
    worst = ordered[0]
    best = min(scores.items(), key=lambda item: (-item[1].accuracy, item[0]))
    return FederatedScore(accuracy, loss, examples, len(scores), worst[0], worst[1].accuracy, best[0],
                          best[1].accuracy)
