"""Start-up hook: make ``stage: tlm`` known to an unmodified LLaMA-Factory.

The wheel installs ``llamafactory_tlm.pth`` into site-packages; Python executes its import line at every
interpreter start (torchrun workers included). This module must stay cheap and import nothing heavy: it only
registers a ``sys.meta_path`` finder that waits for ``llamafactory.train.tuner`` (``llamafactory-cli train``),
``llamafactory.api.app`` (``llamafactory-cli api``) or ``llamafactory.webui.interface`` (``llamafactory-cli webui``) to
be imported, lets the real loader run, then hands the module to :func:`tlm_plugin.patch.apply`,
:func:`tlm_plugin.modes.serve.hook` or :func:`tlm_plugin.webui.apply`.

Set ``LLAMAFACTORY_TLM_DISABLE=1`` to turn the automatic hook off (``tlm_plugin.install()`` still works).
"""

import importlib.abc
import os
import sys


TARGET = "llamafactory.train.tuner"
API_TARGET = "llamafactory.api.app"
WEBUI_TARGET = "llamafactory.webui.interface"
DISABLE_ENV = "LLAMAFACTORY_TLM_DISABLE"


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _PATCHES[module.__name__](module)


def _patch(tuner) -> None:
    # The one deferred import of the project: this module runs at every interpreter start and must stay cheap;
    # the patch (and the workflow it brings) is imported only once LLaMA-Factory's tuner is.
    from tlm_plugin.patch import apply

    apply(tuner)


def _patch_api(app) -> None:
    # Deferred as above: the serving mode (FastAPI, the learner) is imported only once LLaMA-Factory's API app is.
    from tlm_plugin.modes.serve import hook

    if not getattr(app.run_api, "__tlm_plugin_patched__", False):
        app.run_api = hook(app.run_api)
        app.run_api.__tlm_plugin_patched__ = True


def _patch_webui(interface) -> None:
    # Deferred as above: the web UI's stage tlm (Gradio components) is imported only once LlamaBoard's interface is.
    from tlm_plugin.webui import apply

    apply(interface)


_PATCHES = {TARGET: _patch, API_TARGET: _patch_api, WEBUI_TARGET: _patch_webui}


class _TunerFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the loader of the modules it watches."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _PATCHES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


def register() -> None:
    if not any(isinstance(f, _TunerFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TunerFinder())


def install() -> None:
    """Register the hook, and patch the watched modules now that are already imported."""
    register()
    for name, patch in _PATCHES.items():
        module = sys.modules.get(name)
        if module is not None:
            patch(module)


if os.environ.get(DISABLE_ENV, "").strip().lower() not in ("1", "true", "yes", "on"):
    register()
