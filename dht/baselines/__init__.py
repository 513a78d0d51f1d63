"""Baselines of Section 6.2 (Table 2): DistilBERT students (BL2), FastBERT (BL3) and NAS pruning."""
