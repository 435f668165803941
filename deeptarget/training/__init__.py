"""Transfer learning: classification heads trained on frozen embeddings (issue 6, first part)."""
