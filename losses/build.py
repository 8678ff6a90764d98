"""Head registry: ``build_head(config, embedding_size, num_classes)`` -> :class:`PartialFC`."""
from .margins import ArcFace, CombinedMargin, CosFace, Softmax
from .partial_fc import PartialFC

# type -> (margin head class, its constructor arguments with their defaults)
_HEADS = {
    "arcface": (ArcFace, {"scale": 64.0, "margin": 0.5}),
    "cosface": (CosFace, {"scale": 64.0, "margin": 0.4}),
    "combined": (CombinedMargin, {"scale": 64.0, "m1": 1.0, "m2": 0.5, "m3": 0.0}),
    "softmax": (Softmax, {"scale": 64.0}),
}
HEADS = tuple(_HEADS)
_KEYS = ("type", "scale", "margin", "m1", "m2", "m3", "sample_rate")


def build_head(config: dict, embedding_size: int, num_classes: int) -> PartialFC:
    """Partial FC classifier with the margin head described by ``config``.

    ``config``: ``{"type": one of HEADS, "scale", "margin" (arcface/cosface), "m1", "m2", "m3"
    (combined), "sample_rate"}``; missing values take the defaults (ArcFace s=64 m=0.5, CosFace s=64
    m=0.4, combined s=64 (1, 0.5, 0), softmax s=64, sample_rate 1.0).  Keys that another type uses are
    accepted and ignored (a full config section names them all); other keys are refused.
    """
    unknown = sorted(set(config) - set(_KEYS))
    if unknown:
        raise ValueError(f"head: unknown key {unknown[0]!r}; allowed keys: {', '.join(_KEYS)}")
    kind = config.get("type", "arcface")
    if kind not in _HEADS:
        raise ValueError(f"head.type: unknown head {kind!r}; expected one of {', '.join(HEADS)}")
    cls, defaults = _HEADS[kind]
    kwargs = {name: _number(config, name, default) for name, default in defaults.items()}
    sample_rate = _number(config, "sample_rate", 1.0)
    return PartialFC(embedding_size, num_classes, cls(**kwargs), sample_rate=sample_rate)


def _number(config: dict, key: str, default: float) -> float:
    value = config.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"head.{key} must be a number, got {value!r}")
    return float(value)
