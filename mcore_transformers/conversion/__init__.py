"""Rule types, checkpoint reader, exporter and writer: HF ↔ megatron-core weights."""
