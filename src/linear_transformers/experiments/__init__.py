"""The paper's experiments at a scale these machines run: `linear-transformers experiment <name>`."""
