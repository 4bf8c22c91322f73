"""FedTrain: federated training as a Kubernetes resource, or on one machine.

`fedtrain.worker` (folder `worker/`) holds everything a Job runs; `fedtrain.operator` (folder
`operator/`) the kopf controller. The folders are mapped onto these names in `pyproject.toml`.
"""

__version__ = "0.1.0"
