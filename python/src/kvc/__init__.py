# SPDX-License-Identifier: Apache-2.0
"""kvc: KV-cache compression for decoder LLMs, from Python.

The caches, policies and kernels are kvc's C++ headers, compiled into ``kvc._kvc``; see
python/README.md for the API and ``kvc.storages()`` / ``kvc.policies()`` for the names a spec may use.
"""
from ._kvc import Cache, CompressReport, Error, OutOfMemory, isa, isa_variants, policies, storages

# Raised from the extension; shown under the package's name in tracebacks.
Error.__module__ = OutOfMemory.__module__ = __name__

__all__ = ["Cache", "CompressReport", "Error", "OutOfMemory", "isa", "isa_variants", "policies", "storages"]


def __getattr__(name):
    # kvc.hf (the transformers cache) imports torch and transformers: only when asked for.
    if name == "hf":
        import importlib

        return importlib.import_module(".hf", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
