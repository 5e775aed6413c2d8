"""Evaluation of learned features (kNN monitor; linear/SVM/semi-supervised benchmarks later)."""
