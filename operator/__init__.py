"""The Kubernetes side: Jobs for engine tasks (and, with issue #4, the kopf operator). Never imports torch."""
