"""esolm-dist: distributed training, export and KV-cached sampling for Esoteric Language Models."""

__version__ = "0.1.0"
