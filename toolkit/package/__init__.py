"""`phi3 package`: model libraries and weights laid out for MLC-LLM's iOS and Android app builds.

`spec` reads the package config (or flags), `plan` opens the models and names their libraries, `staticlib`
archives and checks the objects, `build` writes the `dist/` folder.
"""

from __future__ import annotations

from .build import APP_CONFIG, ARCHIVE_NAMES, PACKAGE_MANIFEST, PackageResult, package
from .spec import DEVICE_PRESETS, ModelEntry, PackageSpec, load_spec_file, spec_from_flags

__all__ = [
    "APP_CONFIG",
    "ARCHIVE_NAMES",
    "DEVICE_PRESETS",
    "PACKAGE_MANIFEST",
    "ModelEntry",
    "PackageResult",
    "PackageSpec",
    "load_spec_file",
    "package",
    "spec_from_flags",
]
