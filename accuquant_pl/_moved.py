"""Old module paths of the 0.1 layout, kept importable for one release so that existing YAML ``class_path``
values and user scripts keep working; each import names the new path (a ``FutureWarning``, shown by default)."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType

MOVED = {
    "accuquant_pl.evaluate": "accuquant_pl.evaluation.module",
    "accuquant_pl.generation": "accuquant_pl.evaluation.generation",
    "accuquant_pl.pretraining": "accuquant_pl.diffusion.pretraining",
    "accuquant_pl.sampling": "accuquant_pl.diffusion.sampling",
    "accuquant_pl.sample_metrics": "accuquant_pl.evaluation.quality",
    "accuquant_pl.quantized_model": "accuquant_pl.deploy.artifact",
    "accuquant_pl.models": "accuquant_pl.diffusion",
    "accuquant_pl.models.loading": "accuquant_pl.diffusion.loading",
}
"""Old module -> the module that now holds what configs and scripts imported from it."""
REMOVED_IN = "0.2"


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old module path to its new module object (one object under both names)."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} is now {new} (the old path goes in accuquant-pl {REMOVED_IN}); "
                      "update the class_path / import", FutureWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module: ModuleType) -> None:
        pass  # the new module is already executed


def install() -> None:
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, MovedModuleFinder())  # before PathFinder: an alias package's __path__ would load copies
