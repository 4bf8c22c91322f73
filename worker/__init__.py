"""The data plane: everything a training or aggregation Job runs (data, models, training, strategies)."""
