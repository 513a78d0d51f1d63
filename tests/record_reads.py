"""Run a stage script with every read of its resolved configuration recorded, for tests/test_pipeline.py: which
params.yaml keys a stage really reads, to compare with the keys its rule tracks.

    python tests/record_reads.py OUT.json workflow/scripts/<stage>.py ARGS...

OUT.json maps each dotted key read to how: `field` (a value), `object` or `mapping` (a section or a mapping such
as dht.modes taken as a whole: to reach keys below it, or to look a name up in it), `section` (``Config.section``,
which copies a key's value: the MLflow params and the checkpoint fingerprint, built from the tracked list itself),
`dump` (``model_dump``: a copy of the whole profile, as policy.json keeps, `<profile>`). Reads made while the
configuration is loaded and validated are not the stage's. Nothing else of the stage changes.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import sys

from pydantic import BaseModel

import dht.config as config
import dht.config_loading as config_loading

reads: dict[str, set[str]] = {}
paths: dict[int, tuple[str, object]] = {}  # id of a configuration object -> (its dotted key, the object)
active = [True]


def register(obj: object, path: str) -> None:
    if isinstance(obj, BaseModel | dict | list | tuple):
        paths[id(obj)] = (path, obj)
    if isinstance(obj, BaseModel):
        for name in type(obj).model_fields:
            register(object.__getattribute__(obj, name), f"{path}.{name}".lstrip("."))
    elif isinstance(obj, dict):
        for key, value in obj.items():
            register(value, f"{path}.{key}")


def key_of(obj: object) -> str:
    found = paths.get(id(obj))
    if found is not None and found[1] is obj:
        return found[0]
    if isinstance(obj, config.Config):  # a copy (a training's --training-seed): the root
        return ""
    return f"?{type(obj).__name__}"  # built by the code, not read from params.yaml


def record(key: str, how: str) -> None:
    reads.setdefault(key or "<profile>", set()).add(how)


def getattribute(self: BaseModel, name: str) -> object:
    value = object.__getattribute__(self, name)
    if active[0] and not name.startswith("_") and name in type(self).model_fields:
        how = "object" if isinstance(value, BaseModel) else "mapping" if isinstance(value, dict) else "field"
        record(f"{key_of(self)}.{name}".lstrip("."), how)
    return value


def quietly(method, how: str, key=None):
    def wrapped(self, *args, **kwargs):
        if not active[0]:
            return method(self, *args, **kwargs)
        record(key(self, *args) if key else key_of(self), how)
        active[0] = False
        try:
            return method(self, *args, **kwargs)
        finally:
            active[0] = True
    return wrapped


config._Strict.__getattribute__ = getattribute
config._Strict.model_dump = quietly(BaseModel.model_dump, "dump")
config.Config.section = quietly(config.Config.section, "section", key=lambda self, dotted: dotted)
_load = config_loading.load_config


def load_config(*args, **kwargs):
    active[0] = False
    try:
        cfg = _load(*args, **kwargs)  # validation reads everything: not the stage's reads
    finally:
        active[0] = True
    register(cfg, "")
    return cfg


config_loading.load_config = load_config


def write(out: str) -> None:
    with open(out, "w") as f:
        json.dump({k: sorted(v) for k, v in sorted(reads.items())}, f, indent=1)


if __name__ == "__main__":
    out, script, *rest = sys.argv[1:]
    atexit.register(write, out)
    sys.argv = [script, *rest]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
