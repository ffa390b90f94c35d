"""Reading a ``Metrics``' values the way a scrape sees them (prometheus_client's public API)."""

from __future__ import annotations

from forge.observability.metrics import Metrics

_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum"),
}


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    """The value of sample ``name`` with exactly ``labels`` in ``metrics``' registry, e.g.
    ``sample(ctx.metrics, "forge_retries_total", stream="new-data")``.

    A counter series that was never touched reads 0: nothing was counted. An unknown
    metric, labels other series of it do not use, or a gauge or histogram series that
    was never set raise ``LookupError``: "no value" is not 0 there."""
    registry = metrics.registry
    value = registry.get_sample_value(name, labels)
    if value is not None:
        return value
    for family in registry.collect():
        if not any(name == family.name + s for s in _SUFFIXES.get(family.type, ("",))):
            continue
        label_sets = {frozenset(s.labels) for s in family.samples if s.name == name}
        if family.type == "counter" and label_sets <= {frozenset(labels)}:
            return 0.0
        known = sorted(sorted(keys) for keys in label_sets)
        raise LookupError(f"{name} has no series {labels} (its series are labelled {known})")
    raise LookupError(f"no metric produces a sample named {name!r}")
