"""distributed_hte: Ray-distributed training of causal and marketing models."""

__version__ = "0.1.0"
