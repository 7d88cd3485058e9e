"""The load path: a request becomes a prepared load, a running Checkpoint, tensors."""
