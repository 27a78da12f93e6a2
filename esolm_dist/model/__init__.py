"""The Eso-LM transformer, built from megatron-core tensor-parallel layers."""
