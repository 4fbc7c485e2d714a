"""The class-data archive of the JVM a local job starts: Spark's classes mapped from one file, not loaded one by one.

A local job's JVM loads some 9,000 classes from Spark's jars, half of them before its
first job is done: on 2 cores that is most of the 12 s from process start to the first
written table. HotSpot's dynamic class-data sharing (AppCDS, ``-XX:SharedArchiveFile``)
maps them from an archive that a previous run of the same JVM and jars dumped at its exit
(``-XX:ArchiveClassesAtExit``); with it the same start takes 5 s.

The first local job on a machine dumps the archive (about 9 s more, at its end) to a
temporary file that is renamed into ``$XDG_CACHE_HOME/mfdist`` (``~/.cache/mfdist``) only once
its JVM has exited: a partly written archive crashes the JVM that maps it. The file's name
holds a digest of the java binary and the jars, so another JDK or Spark makes a new one.
Only a JVM this process starts for a local master is touched; under spark-submit or on a
cluster the JVMs are the platform's. A ``-Xshare`` or ``SharedArchiveFile`` option in
``spark.driver.extraJavaOptions`` (``-Xshare:off`` turns it off) leaves it to the user.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pyspark

log = logging.getLogger(__name__)

JAVA_OPTIONS = "spark.driver.extraJavaOptions"
# An interrupted dump leaves its temporary file; the next dump removes those older than this.
STALE_SECONDS = 3600


@dataclass(frozen=True)
class Archive:
    """The archive for this JVM and jars, and the temporary file a dump in progress writes (None: use it)."""

    path: Path
    dumping: Optional[Path] = None

    def java_options(self) -> list[str]:
        if self.dumping is None:
            return [f"-XX:SharedArchiveFile={self.path}"]
        # Without -Xlog the dump lists every class it skips (signed jars, old class files) on stderr.
        return [f"-XX:ArchiveClassesAtExit={self.dumping}", "-Xlog:cds=off", "-Xlog:cds+dynamic=off"]


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")) / "mfdist"


def spark_home() -> Path:
    return Path(os.environ.get("SPARK_HOME") or Path(pyspark.__file__).parent)


def java_binary() -> Optional[Path]:
    """The java that spark-submit runs (JAVA_HOME's, else the one on PATH)."""
    home = os.environ.get("JAVA_HOME")
    found = Path(home) / "bin" / "java" if home else shutil.which("java")
    return Path(os.path.realpath(found)) if found and os.path.exists(found) else None


def archive_key(java: Path, jars: Path, class_path: str) -> str:
    """A digest of what the archive depends on: the java binary, Spark's jars, the driver's extra class path."""
    parts = [str(java), str(java.stat().st_mtime_ns), pyspark.__version__, class_path]
    if jars.is_dir():
        parts += sorted(f"{p.name}:{p.stat().st_size}" for p in jars.iterdir())
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def plan_archive(conf: dict[str, str], *, dump: bool) -> Optional[Archive]:
    """The archive to map, or with ``dump`` the one to write when there is none yet; None when the user decides."""
    options = conf.get(JAVA_OPTIONS, "")
    java = java_binary()
    if java is None or "-Xshare" in options or "SharedArchiveFile" in options or "ArchiveClassesAtExit" in options:
        return None
    key = archive_key(java, spark_home() / "jars", conf.get("spark.driver.extraClassPath", ""))
    path = cache_dir() / f"spark-{pyspark.__version__}-{key}.jsa"
    if path.is_file():
        return Archive(path)
    if not dump:
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_dumps(path.parent)
    except OSError as exc:  # no writable cache (a read-only home): the job runs as it would without one
        log.info("jvm: no class-data archive (%s)", exc)
        return None
    return Archive(path, dumping=path.with_name(f"{path.name}.{os.getpid()}.tmp"))


def with_archive(conf: dict[str, str], archive: Optional[Archive]) -> dict[str, str]:
    """``conf`` with the archive's options before the user's own JVM options."""
    if archive is None:
        return conf
    return {**conf, JAVA_OPTIONS: " ".join([*archive.java_options(), conf.get(JAVA_OPTIONS, "")]).strip()}


def finish_dump(archive: Optional[Archive], jvm_exited: bool) -> None:
    """Move a complete dump into place (the JVM exited cleanly and wrote it), else drop what it left."""
    if archive is None or archive.dumping is None:
        return
    try:
        if jvm_exited and archive.dumping.is_file():
            os.replace(archive.dumping, archive.path)
            log.info("jvm: class-data archive written to %s; later local jobs start from it", archive.path)
        else:
            archive.dumping.unlink(missing_ok=True)
    except OSError as exc:
        log.info("jvm: class-data archive not kept (%s)", exc)


def _remove_stale_dumps(folder: Path) -> None:
    for tmp in folder.glob("*.jsa.*.tmp"):
        if time.time() - tmp.stat().st_mtime > STALE_SECONDS:
            tmp.unlink(missing_ok=True)
