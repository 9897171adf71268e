"""nerve_hf: NerVE eigenspectrum metrics of transformer feed-forward networks.

Importing the package is cheap: heavy submodules (transformers, the Trainer callback) load on first use.
"""

from importlib import import_module

__version__ = "0.1.0"

# public name -> submodule that defines it
_LAZY = {
    "metrics": None,
    "CovarianceAccumulator": "stats.covariance",
    "FFNTracker": "tracking.tracker",
    "SpectralReport": "report",
    "NerveCallback": "integrations.callback",
    "NerveConfig": "integrations.config",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'nerve_hf' has no attribute {name!r}")
    module_name = _LAZY[name]
    if module_name is None:
        return import_module(f"{__name__}.{name}")
    return getattr(import_module(f"{__name__}.{module_name}"), name)
