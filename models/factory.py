"""The one model factory: every method and local objective builds its model here, by name."""

from __future__ import annotations

import dataclasses

from lumosrec.core.errors import ConfigError
from lumosrec.models.cl4srec import CL4SRec, CL4SRecConfig
from lumosrec.models.lumos import LUMOS, LUMOSConfig
from lumosrec.models.sasrec import SASRec, SASRecConfig
from lumosrec.models.sracl import SRACL, SRACLConfig

#: model name -> (model class, its config class)
MODELS: dict[str, tuple[type[SASRec], type[SASRecConfig]]] = {
    "sasrec": (SASRec, SASRecConfig),
    "cl4srec": (CL4SRec, CL4SRecConfig),
    "lumos": (LUMOS, LUMOSConfig),
    "sracl": (SRACL, SRACLConfig),
}


def build_model(name: str, num_items: int, seed: int | None = None, **hyper: object) -> SASRec:
    """``name``'s model over ``num_items`` items.

    ``hyper`` sets fields of the model's config (named as in its paper); unknown ones are
    rejected by name. ``seed`` seeds the models that draw randomness in their loss
    (CL4SRec's augmentations, SRA-CL's substitutions) and is ignored by the others.
    """
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    model_class, config_class = MODELS[name]
    known = {field.name for field in dataclasses.fields(config_class)}
    unknown = sorted(set(hyper) - known)
    if unknown:
        raise ConfigError(f"{name} has no hyper-parameter(s) {', '.join(unknown)}")
    if seed is not None and "seed" in known:
        hyper = {**hyper, "seed": seed}
    return model_class(config_class(num_items=num_items, **hyper))
