"""roundhouse: distributed training across many machines."""
