"""dht: the Sample-based Dynamic Hierarchical Transformer (Meng et al. 2024) and its pipeline library."""

__version__ = "0.1.0"
