"""Makes ``gym.make("textenv/...")`` work without ``import textenv`` first.

Gymnasium 1.x no longer loads environment plugins from entry points, so tokengym installs a one-line ``.pth`` file
(``textenv-gym-hook.pth``) that imports this module at interpreter start. It costs next to nothing: it only adds an
import finder that waits for ``gymnasium`` to be imported and then imports ``textenv``, whose import registers the
``textenv/...`` ids (with string entry points, so no environment code runs until ``gym.make``).
"""

from __future__ import annotations

import sys

# Nothing else is imported at interpreter start: every Python process pays for this module.


class _RegisterAfterGymnasium:
    """An import finder (``sys.meta_path``) that finds ``gymnasium`` like the other finders would, and registers
    textenv's ids once gymnasium has run."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> object:
        if name != "gymnasium":
            return None
        import importlib.util

        sys.meta_path.remove(self)  # one shot: let the other finders find the real package
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run_module = spec.loader.exec_module

        def exec_then_register(module: object) -> None:
            run_module(module)
            _register()

        spec.loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


def _register() -> None:
    import importlib

    try:
        importlib.import_module("textenv")
    except Exception as err:  # never break gymnasium itself; say why textenv/ ids are missing
        import warnings

        warnings.warn(f"textenv environments are not registered: importing textenv failed ({err})", stacklevel=2)


def install() -> None:
    if "gymnasium" in sys.modules:
        _register()
    elif not any(isinstance(f, _RegisterAfterGymnasium) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterGymnasium())


install()
