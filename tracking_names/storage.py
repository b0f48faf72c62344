"""Ray storage: a local folder, or a URI that ``pyarrow.fs`` opens (``s3://BUCKET/PREFIX``, ``gs://...``).

Ray Tune writes trials and checkpoints to either itself; dettune's own small files (``search.json``, the saved
space) go through the same ``pyarrow.fs`` filesystem, and readers that need a checkpoint on disk (export,
ensemble) download it. Credentials come from the standard variables (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``, ``AWS_DEFAULT_REGION``) each time a
filesystem is opened: a :class:`Storage` holds its location only, so no file and no pickle of Tune's holds them.
pyarrow 25's ``FileSystem.from_uri`` reads the endpoint variables itself (Ray's ``storage_path`` goes through it).
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs

from spaces.errors import BadArgument
from spaces.usercache import cache_dir
from tracking_names import local_tracking_uri

DOWNLOADS = "storage"  # under the user's cache: object-store files copied to disk, and trials' local folders
CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
SETTING_VARIABLES = (*CREDENTIAL_VARIABLES, "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                     "AWS_DEFAULT_REGION")


def is_uri(location: str | Path) -> bool:
    """Whether ``--storage`` names an object store rather than a local folder."""
    return "://" in str(location) and not str(location).startswith("file://")


@dataclass(frozen=True)
class Storage:
    """A folder or file in Ray storage; ``location`` is an absolute local path or a URI without credentials."""

    location: str

    @classmethod
    def of(cls, location: str | Path | Storage) -> Storage:
        text = str(location)
        return cls(text.rstrip("/")) if is_uri(text) else cls(str(Path(text).resolve()))

    @property
    def is_local(self) -> bool:
        return not is_uri(self.location)

    @property
    def local_path(self) -> Path:
        if not self.is_local:
            raise ValueError(f"{self.location} is not a local folder")
        return Path(self.location)

    @property
    def name(self) -> str:
        return self.location.rsplit("/", 1)[-1]

    @property
    def parent(self) -> Storage:
        return Storage(self.location.rsplit("/", 1)[0])

    def __truediv__(self, part: str) -> Storage:
        return Storage(f"{self.location}/{part}")

    def __str__(self) -> str:
        return self.location

    def local_root(self) -> Path:
        """Where trials keep what stays on their node (work dirs, logs, failure reasons): this folder itself, or
        for a URI a folder of the user's cache named after it."""
        return self.local_path if self.is_local else _cache_folder("trials", self.location)

    def _fs(self) -> tuple[pyarrow.fs.FileSystem, str]:
        if self.is_local:
            return pyarrow.fs.LocalFileSystem(), self.location
        filesystem, path = _filesystem(self.location.split("://", 1)[0], _bucket(self.location), _settings())
        return filesystem, path + self.location.split("://", 1)[1].removeprefix(_bucket(self.location))

    def exists(self) -> bool:
        filesystem, path = self._fs()
        return filesystem.get_file_info(path).type != pyarrow.fs.FileType.NotFound

    def read_text(self) -> str | None:
        """The file's text, or None if there is no such file."""
        filesystem, path = self._fs()
        if filesystem.get_file_info(path).type != pyarrow.fs.FileType.File:
            return None
        with filesystem.open_input_stream(path) as stream:
            return bytes(stream.read()).decode("utf-8")

    def write_text(self, text: str) -> None:
        """Writes the file whole: a reader sees the old file or the new one, never half of it (an object store's
        upload is whole by itself; a local file is written beside and renamed)."""
        if self.is_local:
            self.local_path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.local_path.with_name(self.local_path.name + ".partial")
            partial.write_text(text, encoding="utf-8")
            partial.replace(self.local_path)
            return
        filesystem, path = self._fs()
        with filesystem.open_output_stream(path) as stream:
            stream.write(text.encode("utf-8"))

    def delete(self) -> None:
        """Deletes this folder and everything in it."""
        filesystem, path = self._fs()
        filesystem.delete_dir(path)

    def files(self) -> set[str]:
        """Every file below this folder, as a path relative to it."""
        filesystem, path = self._fs()
        selector = pyarrow.fs.FileSelector(path, recursive=True, allow_not_found=True)
        return {info.path[len(path):].lstrip("/") for info in filesystem.get_file_info(selector)
                if info.type == pyarrow.fs.FileType.File}

    def on_disk(self) -> Path:
        """This folder on this machine: itself, or for a URI a copy downloaded once into the user's cache (what
        Tune writes there, a checkpoint or a result file, never changes under the same name)."""
        if self.is_local:
            return self.local_path
        target = _cache_folder("downloads", self.location)
        if not target.is_dir():
            target.parent.mkdir(parents=True, exist_ok=True)
            staged = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
            try:
                filesystem, path = self._fs()
                pyarrow.fs.copy_files(path, str(staged), source_filesystem=filesystem,
                                      destination_filesystem=pyarrow.fs.LocalFileSystem())
                staged.rename(target)  # atomic: a racing reader keeps its own complete copy or this one
            except OSError:
                shutil.rmtree(staged, ignore_errors=True)
                if not target.is_dir():
                    raise
        return target


def _cache_folder(kind: str, location: str) -> Path:
    """A URI's folder in the user's cache, one level per segment: a child's folder lies in its parent's."""
    scheme, rest = location.split("://", 1)
    segments = [urllib.parse.quote(segment, safe="") for segment in rest.split("/")]
    segments = [segment if segment.strip(".") else segment.replace(".", "%2E") for segment in segments]  # no ..
    return cache_dir() / DOWNLOADS / kind / scheme / Path(*segments)


def _bucket(uri: str) -> str:
    return uri.split("://", 1)[1].split("/", 1)[0]


def _settings() -> tuple[str | None, ...]:
    """The variables a filesystem is opened with: a filesystem is opened again when they change."""
    return tuple(os.environ.get(name) for name in SETTING_VARIABLES)


@functools.lru_cache(maxsize=8)
def _filesystem(scheme: str, bucket: str, settings: tuple[str | None, ...]) -> tuple[pyarrow.fs.FileSystem, str]:
    """The filesystem of one bucket, opened once per process and settings (pyarrow reads them itself)."""
    return pyarrow.fs.FileSystem.from_uri(f"{scheme}://{bucket}")


def open_storage(location: str | Path) -> Storage:
    """``--storage`` checked: a local folder as is; a URI opened, its bucket asked for, before anything is written.

    Raises:
        BadArgument: A URI with credentials in it, one pyarrow cannot open, S3 without its credential variables,
            an endpoint that does not answer, or a bucket that does not exist; the message names the fix.
    """
    storage = Storage.of(location)
    if storage.is_local:
        return storage
    parts = urllib.parse.urlsplit(storage.location)
    if parts.username or parts.password:
        raise BadArgument(f"--storage {parts._replace(netloc=parts.hostname or '').geturl()} holds credentials: "
                          f"remove them from the URI and set {' and '.join(CREDENTIAL_VARIABLES)} instead")
    if parts.scheme == "s3" and not all(os.environ.get(name) for name in CREDENTIAL_VARIABLES):
        raise BadArgument(f"--storage {storage} needs S3 credentials: set {' and '.join(CREDENTIAL_VARIABLES)} "
                          "(and AWS_ENDPOINT_URL for an S3-compatible server such as MinIO)")
    bucket = _bucket(storage.location)
    try:
        filesystem, _ = _filesystem(parts.scheme, bucket, _settings())
    except (ValueError, NotImplementedError, OSError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise BadArgument(f"--storage {storage} is not a folder or a URI pyarrow opens ({error}): give a local "
                          "folder or s3://BUCKET/PREFIX") from None
    try:
        found = filesystem.get_file_info(bucket).type != pyarrow.fs.FileType.NotFound
    except OSError as error:
        raise BadArgument(f"--storage {storage} cannot be reached ({error}): check AWS_ENDPOINT_URL (or "
                          f"AWS_ENDPOINT_URL_S3), AWS_DEFAULT_REGION and the credentials") from None
    if not found:
        raise BadArgument(f"the bucket {bucket} of --storage {storage} does not exist: create it (e.g. "
                          f"`aws s3 mb s3://{bucket}`) or fix the URI")
    return storage


def tracking_uri_for(storage: str | Path | Storage, tracking_uri: str | None) -> str:
    """The tracking URI a command uses: the given one, else the SQLite store of a local ``storage``.

    Raises:
        BadArgument: ``storage`` is a URI and no tracking URI is given (SQLite cannot live in an object store).
    """
    if tracking_uri:
        return tracking_uri
    if is_uri(str(storage)):
        raise BadArgument(f"--storage {storage} is an object store, where MLflow's SQLite store cannot live: pass "
                          "--tracking-uri (or set MLFLOW_TRACKING_URI), e.g. http://HOST:5000 of an `mlflow server`")
    return local_tracking_uri(Path(str(storage)).resolve())
