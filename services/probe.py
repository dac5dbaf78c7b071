"""Facts about a spec's model read from its config alone, without loading its weights."""

from __future__ import annotations

from api.jobspec import ModelSpec


def expected_width(model: ModelSpec) -> int | None:
    """d of the spec's model without loading its weights (None when its config cannot be read)."""
    if model.random is not None:
        return model.random.hidden_size
    try:
        from transformers import AutoConfig

        from services.models import _source

        folder, kwargs = _source(model)
        return int(AutoConfig.from_pretrained(folder, **kwargs).hidden_size)
    except Exception:  # noqa: BLE001 - a width we cannot read is simply not checked
        return None
