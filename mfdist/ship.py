"""Ship the package to executors that do not have it: a zip of ``mfdist/`` for ``--py-files``.

PySpark puts ``.zip``, ``.egg`` and ``.py`` files given to ``--py-files`` (or
``SparkContext.addPyFile``) on the executors' ``sys.path``, not wheels. The zip
holds the package's sources only; the third-party dependencies (pyspark,
pyarrow, numpy, pandas, numba) come from the executors' Python environment
(an EMR bootstrap action, a Databricks library, or a packed venv on
``--archives``; see README "Run on a cluster").
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import mfdist

PACKAGE_DIR = Path(mfdist.__file__).resolve().parent


def build_zip(dest: Path) -> Path:
    """Write every ``.py`` file of the package under ``mfdist/`` into the zip ``dest``; returns ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
        for source in sorted(PACKAGE_DIR.rglob("*.py")):
            zf.write(source, Path("mfdist") / source.relative_to(PACKAGE_DIR))
    return dest


def default_zip() -> Path:
    """``dist/mfdist-<version>.zip`` beside the package's source tree."""
    return PACKAGE_DIR.parent / "dist" / f"mfdist-{mfdist.__version__}.zip"
