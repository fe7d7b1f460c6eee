"""The runtime every modality shares: building megatron-core chunks, the forward driver, the fast layer
subclasses, the KV cache on transformers' `Cache` API, and the transformers-facing model classes."""
