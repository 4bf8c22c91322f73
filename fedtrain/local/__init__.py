"""Running a FederatedTraining on one machine: local executor and runner."""
