"""Imported at interpreter start by peft_lalora_hint.pth. Costs nothing until peft is imported.

When `peft.mapping` is first imported, its config table becomes a dict whose missing "LALORA" key raises a
message that says to `import peft_lalora`, instead of a bare `KeyError('LALORA')`. Importing peft_lalora
registers the real entry and the hint is never seen.
"""

import importlib.abc
import importlib.machinery
import sys

_MESSAGE = (
    "This adapter has `peft_type` 'LALORA', a tuner type that peft only knows after `import peft_lalora`. "
    "Add `import peft_lalora` before loading it (or load the stock-LoRA export made by "
    "`peft_lalora.export_as_lora`)."
)


class _HintingDict(dict):
    def __missing__(self, key):
        if str(key) == "LALORA":
            try:
                from peft_lalora.errors import NotRegisteredError
            except Exception:  # pragma: no cover - the package itself is broken
                raise KeyError(_MESSAGE) from None
            raise NotRegisteredError(_MESSAGE)
        raise KeyError(key)


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        for name in ("PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING"):
            table = getattr(module, name, None)
            if isinstance(table, dict) and not isinstance(table, _HintingDict):
                setattr(module, name, _HintingDict(table))


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != "peft.mapping":
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _PatchingLoader(spec.loader)
        return spec


if not any(isinstance(f, _Finder) for f in sys.meta_path):
    sys.meta_path.insert(0, _Finder())
