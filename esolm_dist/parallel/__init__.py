"""Process groups, the DeepSpeed engine, pipeline stages and the CPU compatibility layer."""
