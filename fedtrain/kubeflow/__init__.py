"""Kubeflow Pipelines (KFP v2) components and the sample pipeline ``gtsrb-federated``."""
