"""Old module paths kept importable with a DeprecationWarning (the modules moved into the
:mod:`~lightning_metagrad.predictors` and :mod:`~lightning_metagrad.boundaries` packages)."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

#: Old module -> the module it is now.
MOVED_MODULES = {
    "lightning_metagrad.subspace": "lightning_metagrad.predictors.subspace",
    "lightning_metagrad.meta_network": "lightning_metagrad.predictors.paper.meta_network",
    "lightning_metagrad.distillation": "lightning_metagrad.predictors.paper.distillation",
    "lightning_metagrad.tabulation": "lightning_metagrad.predictors.paper.tabulation",
    "lightning_metagrad.combination": "lightning_metagrad.predictors.rules",
    "lightning_metagrad.projection": "lightning_metagrad.predictors.basis",
    "lightning_metagrad.detection": "lightning_metagrad.boundaries.changepoint",
    "lightning_metagrad.novelty": "lightning_metagrad.boundaries.novelty",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old path as the module it moved to (the same module object)."""

    def find_spec(self, fullname, path, target=None):  # type: ignore[no-untyped-def]
        if fullname not in MOVED_MODULES:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = MOVED_MODULES[spec.name]
        warnings.warn(
            f"`{spec.name}` moved to `{new}`: import from there.",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module(new)

    def exec_module(self, module: ModuleType) -> None:
        """The module it aliases is already executed."""


def install() -> None:
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())
