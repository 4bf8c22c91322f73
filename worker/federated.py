"""Federated evaluation: the sites' scores of one global model, combined into the figures people compare.

Each site scores the model on its own held-out split and sends only counts and means; the
federation's accuracy and loss are their means weighted by the number of examples (what one
evaluation over the union of the sites' splits would give), and the worst and best site show how
evenly the model serves them. The engine (status) and finalize (MLflow) both use `combine`, so
the two always agree. Pure Python: the control plane imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SiteScore:
    """One site's evaluation: how many examples, the accuracy and mean loss over them."""

    examples: int
    accuracy: float
    loss: float

    @classmethod
    def from_output(cls, output: dict[str, Any]) -> SiteScore | None:
        """Read a site's evaluation output; None when it holds no usable figures (no examples, no numbers)."""
        examples, accuracy, loss = output.get("examples"), output.get("accuracy"), output.get("loss")
        numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (examples, accuracy, loss))
        if not numbers or int(examples or 0) <= 0:
            return None
        return cls(int(examples), float(accuracy), float(loss))  # type: ignore[arg-type]


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
