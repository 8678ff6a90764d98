"""Margin heads (ArcFace, CosFace, combined margin, softmax) and the sharded Partial FC classifier."""
from .build import HEADS, build_head
from .margins import ArcFace, CombinedMargin, CosFace, Softmax
from .partial_fc import PartialFC

__all__ = ["HEADS", "ArcFace", "CombinedMargin", "CosFace", "PartialFC", "Softmax", "build_head"]
