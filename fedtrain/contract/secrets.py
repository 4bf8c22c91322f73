"""A secure-aggregation client's master secret, as it passes from whoever makes it to the worker that reads it.

``fedtrain run`` lets the worker make each client's secret, in a folder beside the store; on
Kubernetes the operator makes them, as the keys of a Secret whose key each client's Jobs mount.
Both name and size it from here. The secret never enters the store: every round's keys derive
from it, so whoever reads it can unmask that client's updates.
"""

from __future__ import annotations

MASTER_SECRET_BYTES = 32


def secret_file(client: str) -> str:
    """The file (and Secret key) that holds ``client``'s master secret."""
    return f"{client}.key"
