"""Fetch the dataset named by `data.source` into `data/raw`: download (with retries, a progress
bar and a checksum check) or copy it, extract archives safely, and swap the result in whole.

A failure at any step leaves the previous `data/raw`, if any, exactly as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from urllib.parse import unquote, urlparse

from tqdm import tqdm

from imageclf.errors import PipelineError

# An archive's format is read from its first bytes, not its name: many download links end in
# "download" or "?dl=1", and a renamed file should not be refused for its suffix.
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a member first, or an empty archive
COMPRESSED_TAR_MAGIC = (b"\x1f\x8b", b"\xfd7zXZ\x00", b"BZh")  # gzip, xz, bzip2
TAR_MAGIC_OFFSET = 257  # "ustar" in the first header of a POSIX or GNU tar
ARCHIVE_FORMATS = ".tar.gz, .tgz, .tar.xz, .tar.bz2, .tar or .zip"
RETRY_DELAY = 1.0  # seconds before the first retry; doubled for each further one
CHUNK = 1 << 20
HOW_TO_USE_A_LOCAL_COPY = (
    "Download a copy by other means and set data.source to its path or file:// URL "
    "(edit params.yaml, or `dvc exp run -S data.source=/path/to/archive`)."
)


def fetch_dataset(
    source: str, out_dir: Path, checksum: str | None = None, retries: int = 3
) -> None:
    """Put the dataset at `source` (URL or path; archive or folder) into `out_dir`.

    Raises:
        PipelineError: naming the source and what to do, when it cannot be fetched, does not
            match `checksum`, or is not a safe, readable archive.
    """
    algorithm, expected = _parse_checksum(checksum)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.", dir=out_dir.parent) as work:
        staging = Path(work) / "dataset"
        url = urlparse(source)
        if url.scheme in ("http", "https"):
            archive = Path(work) / "archive"  # its format is read from its content
            _download(source, archive, retries)
        else:
            local = Path(unquote(url.path) if url.scheme == "file" else source).expanduser()
            if not local.exists():
                # `dvc exp run --temp` and `--queue` run in a copy of the repository elsewhere
                relative = (
                    ""
                    if local.is_absolute()
                    else f" (here: {local.absolute()}; a relative path is taken from the "
                    "folder the stage runs in, which for `dvc exp run --temp` and `--queue` is "
                    "a copy of the repository elsewhere: use an absolute path)"
                )
                raise PipelineError(
                    f"data.source: {local} does not exist{relative}. {HOW_TO_USE_A_LOCAL_COPY}"
                )
            if local.is_dir():
                if expected:
                    raise PipelineError(
                        f"data.checksum: {local} is a folder; checksums apply to archives. "
                        "Set data.checksum to null."
                    )
                _copy_folder(local, staging)
                _require_files(staging, source)
                _swap_in(staging, out_dir)
                return
            archive = local
        archive_format = _archive_format(archive, source)
        if expected:
            actual = _hash_file(archive, algorithm)
            if actual != expected:
                raise PipelineError(
                    f"{source}: checksum mismatch: expected {algorithm}:{expected}, got "
                    f"{algorithm}:{actual}. The file is corrupt or not the one meant; download it "
                    "again, or set data.checksum to the new value if the change is intended."
                )
        _extract(archive, archive_format, staging, source)
        _require_files(staging, source)
        _swap_in(staging, out_dir)


def _require_files(staging: Path, source: str) -> None:
    """Refuse an empty dataset here, where the user's data.source can be named, rather than
    in preprocess, which sees only data/raw (and after DVC has recorded it)."""
    if not any(path.is_file() for path in staging.rglob("*")):
        raise PipelineError(
            f"data.source: {source} holds no files; point it at the dataset's folder or "
            "archive (one folder of images per class)"
        )


def _parse_checksum(checksum: str | None) -> tuple[str, str | None]:
    if not checksum:
        return "sha256", None
    algorithm, _, digest = checksum.partition(":")
    digest = digest.strip().lower()
    valid_length = {"md5": 32, "sha256": 64}.get(algorithm.lower())
    if valid_length is None or len(digest) != valid_length or not _is_hex(digest):
        raise PipelineError(
            f"data.checksum = {checksum!r}: expected 'md5:<32 hex digits>', "
            "'sha256:<64 hex digits>' or null"
        )
    return algorithm.lower(), digest


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


def _archive_format(archive: Path, source: str) -> str:
    """The archive's format, "zip" or "tar" (compressed or not), from its first bytes."""
    with archive.open("rb") as file:
        head = file.read(TAR_MAGIC_OFFSET + 5)
    if not head:
        raise PipelineError(f"data.source: {source} is an empty file; download it again")
    if head.startswith(ZIP_MAGIC):
        return "zip"
    if head.startswith(COMPRESSED_TAR_MAGIC) or head[TAR_MAGIC_OFFSET:] == b"ustar":
        return "tar"
    if tarfile.is_tarfile(archive):  # Unix V7 tar, from old tools: no "ustar", a valid header
        return "tar"
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head")):
        # what sharing sites answer a link that is not the file's own: a login or download page
        raise PipelineError(
            f"data.source: {source} is a web page, not an archive ({ARCHIVE_FORMATS}); use "
            "the link that downloads the file itself (the one your browser's download list "
            "shows), or download it and set data.source to its path"
        )
    raise PipelineError(
        f"data.source: {source} is neither a folder nor an archive of a supported format "
        f"({ARCHIVE_FORMATS}; its first bytes are {head[:8]!r}). Extract it into a folder and "
        "set data.source to that folder"
    )


def _hash_file(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with path.open("rb") as file:
        while chunk := file.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _download(url: str, target: Path, retries: int) -> None:
    """Download `url` to `target`, retrying transient failures with exponential backoff."""
    for attempt in range(retries + 1):
        try:
            _download_once(url, target)
            return
        except urllib.error.HTTPError as exc:
            if exc.code < 500 or attempt == retries:
                raise PipelineError(
                    f"{url}: download failed: HTTP {exc.code} {exc.reason}. "
                    f"{HOW_TO_USE_A_LOCAL_COPY}"
                ) from None
            reason = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError, _Truncated) as exc:
            reason = str(getattr(exc, "reason", exc))
            if attempt == retries:
                raise PipelineError(
                    f"{url}: download failed after {retries + 1} attempt(s): {reason}. "
                    f"{HOW_TO_USE_A_LOCAL_COPY}"
                ) from None
        delay = RETRY_DELAY * 2**attempt
        print(f"download of {url} failed ({reason}); retrying in {delay:g} s")
        time.sleep(delay)


class _Truncated(Exception):
    """The server closed the connection before sending the whole file."""


def _download_once(url: str, target: Path) -> None:
    with urllib.request.urlopen(url, timeout=60) as response, target.open("wb") as file:
        total = int(response.headers.get("Content-Length") or 0) or None
        received = 0
        name = Path(unquote(urlparse(url).path)).name or url
        with tqdm(total=total, unit="B", unit_scale=True, desc=name) as bar:
            while chunk := response.read(CHUNK):
                file.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
        if total is not None and received < total:
            raise _Truncated(f"connection closed after {received} of {total} bytes")


def _copy_folder(local: Path, staging: Path) -> None:
    """Copy the folder `local` (links followed) to `staging`, or fail naming the first file
    that could not be copied."""
    try:
        shutil.copytree(local, staging, symlinks=False)
    except shutil.Error as exc:  # copytree copies what it can, then lists what it could not
        source, _, reason = exc.args[0][0]
        if Path(source).is_symlink() and not Path(source).exists():
            # Failing is safer than skipping it: the link stands for an image the user
            # meant to train on, and a dataset quietly smaller than the folder looks is
            # worse than an error at the first step.
            raise PipelineError(
                f"data.source: {source} is a broken link (to {os.readlink(source)}, which "
                "does not exist); point it at the file, or delete it, and run again"
            ) from None
        raise PipelineError(
            f"data.source: cannot copy {source} ({reason}); fix or remove it, and run again"
        ) from None
    except OSError as exc:
        raise PipelineError(f"data.source: cannot copy {local} ({exc})") from None


def _extract(archive: Path, archive_format: str, target: Path, source: str) -> None:
    """Extract `archive` into `target`, refusing members that would land outside it."""
    target.mkdir()
    try:
        if archive_format == "zip":
            with zipfile.ZipFile(archive) as zipped:
                members = zipped.infolist()
                for member in members:
                    member.filename = _zip_member_name(member)  # extracted under this name
                    # a symlink entry keeps its mode in the high bits of external_attr, and
                    # what it points to as its content
                    is_link = (member.external_attr >> 16) & 0o170000 == 0o120000
                    link = zipped.read(member).decode(errors="replace") if is_link else None
                    _check_member(member.filename, target, source, link)
                zipped.extractall(target, members)
        else:
            with tarfile.open(archive) as tar:  # any compression tarfile reads
                for member in tar.getmembers():
                    link = member.linkname if member.issym() or member.islnk() else None
                    # a hard link names its file from the archive's top
                    link_from = target if member.islnk() else None
                    _check_member(member.name, target, source, link, link_from)
                # the "data" filter refuses special files and unsafe permissions as well
                tar.extractall(target, filter="data")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise PipelineError(
            f"{source}: the archive is corrupt or truncated ({exc.__class__.__name__}: {exc}). "
            "Download it again."
        ) from None


def _zip_member_name(member: zipfile.ZipInfo) -> str:
    """The member's name as the archive's maker meant it. Without the UTF-8 flag (bit 11)
    zipfile decodes names as cp437, the format's old default; but the ordinary `zip` command
    (Info-ZIP) stores UTF-8 names without setting it, and "café" would come out as "caf├⌐".
    The common remedy: a name whose bytes are valid UTF-8 is taken as UTF-8 (cp437 text with
    accents almost never is), any other stays cp437.

    Backslashes are folder separators, as unzip takes them: the format wants "/", but some
    Windows tools wrote "\\", and "ds\\cat\\1.png" would come out as one file at the top."""
    name = member.filename
    if not member.flag_bits & 0x800:
        with contextlib.suppress(UnicodeError):
            name = name.encode("cp437").decode("utf-8")
    return name.replace("\\", "/")


def _check_member(
    name: str, target: Path, source: str, link: str | None = None, link_from: Path | None = None
) -> None:
    """Refuse a member that would land outside `target`, or that is a link: to `link`, a path
    from the folder `link_from` (by default the member's own, as for a symbolic link)."""
    resolved = (target / name).resolve()
    if Path(name).is_absolute() or not resolved.is_relative_to(target.resolve()):
        raise PipelineError(
            f"{source}: refusing member {name!r}: a path outside the target folder. The "
            "archive is unsafe; use a trusted copy of the dataset."
        )
    if link is not None:
        # links to files of the archive itself are harmless, but DVC would track the link,
        # not the image; links elsewhere are how archives write outside their folder
        pointed = ((link_from or resolved.parent) / link).resolve()
        if Path(link).is_absolute() or not pointed.is_relative_to(target.resolve()):
            raise PipelineError(
                f"{source}: refusing member {name!r}: a link to {link!r}, outside the archive. "
                "The archive is unsafe; use a trusted copy of the dataset."
            )
        raise PipelineError(
            f"{source}: refusing member {name!r}: a link (to {link!r}); only files are "
            "extracted. Extract the archive yourself with links replaced by the files they "
            "point to (`cp -rL extracted/ copy/` does that), and set data.source to the copy."
        )


def _swap_in(staging: Path, out_dir: Path) -> None:
    """Replace `out_dir` with the complete `staging` folder (same file system, two renames)."""
    old = staging.with_name("previous")
    if out_dir.exists():
        out_dir.rename(old)
    staging.rename(out_dir)
