"""The contract between the coordinator, the sites and the worker: one torch-free place.

What crosses between the parties is defined here and nowhere else: the store's layout
(`layout`), store access with its bounded reads (`storage`), the task and result documents and
their limits (`sitetask`), how site scores combine (`federated`) and the exit codes a worker's
process ends with (`errors`). The engine, the site relay, the site agent, the operator and the
worker all import it; it imports nothing of theirs, and no torch, so the operator image can hold it.
"""
