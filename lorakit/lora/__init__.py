"""The LoRA core: the layer, which modules it wraps, whole-model operations, the adapter file and its analysis."""
