"""Verification accuracy (the standard 10-fold protocol), TAR@FAR, ROC and reports, from embeddings."""
from .verification import evaluate

__all__ = ["evaluate"]
