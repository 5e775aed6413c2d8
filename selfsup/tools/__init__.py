"""Command-line tools: benchmarks, (later) t-SNE, publishing, parameter counts."""
