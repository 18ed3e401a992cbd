"""mergekit-like: stream, merge and average sharded safetensors checkpoints."""

__version__ = "0.1.0"
