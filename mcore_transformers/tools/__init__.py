"""Tools on top of the runtime: the `mcore-transformers` command, the demo, the precision check, tiny checkpoints.

Nothing in the runtime imports this package."""
