"""Fetching data.source: HTTP (real server on 127.0.0.1), file:// and local paths, checksums,
faults, and archives that try to write outside their folder."""

from __future__ import annotations

import hashlib
import io
import subprocess
import tarfile
import zipfile
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from imageclf import download
from imageclf.download import fetch_dataset
from imageclf.errors import PipelineError


@pytest.fixture(autouse=True)
def no_long_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download, "RETRY_DELAY", 0.01)


def dataset_folder(root: Path) -> Path:
    for name in ("cats", "dogs"):
        (root / "train" / name).mkdir(parents=True)
        (root / "train" / name / "1.txt").write_text(name)
    return root


def tar_bytes(members: dict[str, bytes], compression: str = "gz") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=f"w:{compression}") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def tree(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()
    }


GOOD = {"ds/train/cats/1.txt": b"cats", "ds/train/dogs/1.txt": b"dogs"}


@pytest.fixture
def served(tmp_path: Path, http_server) -> tuple[Path, str]:
    folder = tmp_path / "served"
    folder.mkdir()
    for suffix, compression in (("gz", "gz"), ("xz", "xz"), ("bz2", "bz2")):
        (folder / f"ds.tar.{suffix}").write_bytes(tar_bytes(GOOD, compression))
    with zipfile.ZipFile(folder / "ds.zip", "w") as zipped:
        for name, content in GOOD.items():
            zipped.writestr(name, content)
    return folder, http_server(folder)


@pytest.mark.parametrize("name", ["ds.tar.gz", "ds.tar.xz", "ds.tar.bz2", "ds.zip"])
def test_http_archives_are_extracted(tmp_path: Path, served, name: str) -> None:
    folder, url = served
    fetch_dataset(f"{url}/{name}", tmp_path / "raw")
    assert tree(tmp_path / "raw") == {k: v.decode() for k, v in GOOD.items()}


def test_format_is_read_from_the_content_not_the_name(tmp_path: Path, served) -> None:
    """Download links often end in "download" or "?dl=1", and files get renamed."""
    folder, url = served
    (folder / "download").write_bytes((folder / "ds.zip").read_bytes())
    (folder / "zipped.tar.gz").write_bytes((folder / "ds.zip").read_bytes())
    (folder / "ds.dat").write_bytes((folder / "ds.tar.xz").read_bytes())
    fetch_dataset(f"{url}/download?dl=1", tmp_path / "a")
    fetch_dataset(str(folder / "zipped.tar.gz"), tmp_path / "b")
    fetch_dataset(f"{url}/ds.dat", tmp_path / "c")
    expected = {k: v.decode() for k, v in GOOD.items()}
    assert tree(tmp_path / "a") == tree(tmp_path / "b") == tree(tmp_path / "c") == expected


def test_an_old_tar_without_the_ustar_magic_is_extracted(tmp_path: Path) -> None:
    """Unix V7 tar, as old tools write it (GNU tar --format=v7): no "ustar" in its headers."""
    dataset_folder(tmp_path / "ds")
    archive = tmp_path / "old.tar"
    subprocess.run(
        ["tar", "--format=v7", "-cf", str(archive), "-C", str(tmp_path), "ds"], check=True
    )
    assert b"ustar" not in archive.read_bytes()
    fetch_dataset(str(archive), tmp_path / "raw")
    assert tree(tmp_path / "raw") == {k: v.decode() for k, v in GOOD.items()}


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"<!DOCTYPE html><html><body>Sign in</body></html>", "is a web page, not an archive"),
        (b"Rar!\x1a\x07\x00 not a tar", "neither a folder nor an archive"),
        (b"", "is an empty file"),
    ],
    ids=["html", "rar", "empty"],
)
def test_a_download_that_is_not_an_archive_is_named(
    tmp_path: Path, http_server, content: bytes, says: str
) -> None:
    served = tmp_path / "served"
    served.mkdir()
    (served / "dataset.zip").write_bytes(content)
    raw = dataset_folder(tmp_path / "raw")
    before = tree(raw)
    url = f"{http_server(served)}/dataset.zip"
    with pytest.raises(PipelineError) as error:
        fetch_dataset(url, raw, "sha256:" + "0" * 64)  # the format is judged before the hash
    assert str(error.value).startswith(f"data.source: {url} ") and says in str(error.value)
    assert tree(raw) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw", "served"]


def test_file_url_local_path_and_folder(tmp_path: Path, served, monkeypatch) -> None:
    folder, _ = served
    fetch_dataset(f"file://{folder / 'ds.tar.gz'}", tmp_path / "a")
    monkeypatch.chdir(tmp_path)
    fetch_dataset("served/ds.zip", tmp_path / "b")
    fetch_dataset(str(dataset_folder(tmp_path / "mine")), tmp_path / "c")
    assert tree(tmp_path / "a") == tree(tmp_path / "b")
    assert tree(tmp_path / "c") == {"train/cats/1.txt": "cats", "train/dogs/1.txt": "dogs"}
    # a relative path that is not there says where it was looked for
    with pytest.raises(PipelineError) as error:
        fetch_dataset("../elsewhere/ds.zip", tmp_path / "d")
    assert str(error.value).startswith(
        f"data.source: ../elsewhere/ds.zip does not exist (here: {tmp_path}/../elsewhere/ds.zip; "
        "a relative path is taken from the folder the stage runs in"
    )


@pytest.mark.parametrize("algorithm", ["md5", "sha256"])
def test_checksum_is_verified(tmp_path: Path, served, algorithm: str) -> None:
    folder, url = served
    right = hashlib.new(algorithm, (folder / "ds.tar.gz").read_bytes()).hexdigest()
    fetch_dataset(f"{url}/ds.tar.gz", tmp_path / "raw", f"{algorithm}:{right}")
    assert (tmp_path / "raw" / "ds").is_dir()


def test_checksum_mismatch_names_both_and_keeps_the_previous_data(tmp_path: Path, served) -> None:
    folder, url = served
    actual = hashlib.sha256((folder / "ds.tar.gz").read_bytes()).hexdigest()
    raw = dataset_folder(tmp_path / "raw")
    before = tree(raw)
    wrong = "0" * 64
    with pytest.raises(PipelineError) as error:
        fetch_dataset(f"{url}/ds.tar.gz", raw, f"sha256:{wrong}")
    message = str(error.value)
    assert f"{url}/ds.tar.gz" in message and wrong in message
    assert f"sha256:{actual}" in message
    assert tree(raw) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw", "served"]


class DropsHalfway(BaseHTTPRequestHandler):
    """Promises 1000 bytes, sends 100, hangs up: a connection cut off mid-download."""

    requests = 0

    def do_GET(self) -> None:
        type(self).requests += 1
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b"x" * 100)
        self.wfile.flush()
        self.connection.close()

    def log_message(self, *args: object) -> None:
        pass


def test_cut_off_download_fails_cleanly_after_retries(tmp_path: Path, http_server) -> None:
    url = http_server(handler=DropsHalfway) + "/cifar.tar.gz"
    with pytest.raises(PipelineError) as error:
        fetch_dataset(url, tmp_path / "raw", retries=2)
    assert url in str(error.value) and "data.source" in str(error.value)
    assert DropsHalfway.requests == 3
    assert list(tmp_path.iterdir()) == []


def test_transient_failure_is_retried(tmp_path: Path, http_server) -> None:
    archive = tar_bytes(GOOD)

    class FailsOnce(BaseHTTPRequestHandler):
        calls = 0

        def do_GET(self) -> None:
            type(self).calls += 1
            if self.calls == 1:
                self.send_error(503)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(archive)))
            self.end_headers()
            self.wfile.write(archive)

        def log_message(self, *args: object) -> None:
            pass

    fetch_dataset(http_server(handler=FailsOnce) + "/ds.tar.gz", tmp_path / "raw", retries=2)
    assert FailsOnce.calls == 2
    assert (tmp_path / "raw" / "ds" / "train" / "cats" / "1.txt").read_text() == "cats"


def test_unreachable_source_says_how_to_use_a_local_copy(tmp_path: Path) -> None:
    url = "http://127.0.0.1:9/cifar-10-python.tar.gz"  # port 9 (discard): nothing listens
    with pytest.raises(PipelineError) as error:
        fetch_dataset(url, tmp_path / "raw", retries=1)
    assert url in str(error.value)
    assert "set data.source to its path" in str(error.value)
    assert not (tmp_path / "raw").exists()


@pytest.mark.parametrize("name", ["bad.tar.gz", "bad.zip"])
def test_corrupt_or_truncated_archive(tmp_path: Path, name: str) -> None:
    content = tar_bytes(GOOD)[:60] if name.endswith("gz") else b"PK\x03\x04 garbage"
    (tmp_path / name).write_bytes(content)
    with pytest.raises(PipelineError, match="corrupt or truncated"):
        fetch_dataset(str(tmp_path / name), tmp_path / "raw")
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def link_tar(kind: bytes, to: str = "../../outside.txt") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("ds/escape")
        info.type = kind
        info.linkname = to
        tar.addfile(info)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "archive",
    [
        tar_bytes({"../evil.txt": b"x"}),
        tar_bytes({"/tmp/evil-absolute.txt": b"x"}),
        link_tar(tarfile.SYMTYPE),
        link_tar(tarfile.LNKTYPE),
    ],
    ids=["dotdot", "absolute", "symlink", "hardlink"],
)
def test_members_outside_the_target_are_refused(tmp_path: Path, archive: bytes) -> None:
    (tmp_path / "evil.tar.gz").write_bytes(archive)
    (tmp_path / "work").mkdir()
    with pytest.raises(PipelineError, match="refusing member"):
        fetch_dataset(str(tmp_path / "evil.tar.gz"), tmp_path / "work" / "raw")
    assert list((tmp_path / "work").iterdir()) == []
    assert not Path("/tmp/evil-absolute.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.tar.gz", "work"]


@pytest.mark.parametrize(
    ("kind", "to"), [(tarfile.SYMTYPE, "../ds/cats/1.txt"), (tarfile.LNKTYPE, "ds/cats/1.txt")]
)
def test_a_link_inside_the_archive_says_how_to_replace_it_by_its_file(
    tmp_path: Path, kind: bytes, to: str
) -> None:
    (tmp_path / "links.tar.gz").write_bytes(link_tar(kind, to))
    with pytest.raises(PipelineError) as error:
        fetch_dataset(str(tmp_path / "links.tar.gz"), tmp_path / "work" / "raw")
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'links.tar.gz'}: refusing member 'ds/escape': ")
    assert f"a link (to '{to}'); only files are extracted" in message and "cp -rL" in message
    assert "unsafe" not in message and not (tmp_path / "work" / "raw").exists()


def test_zip_member_outside_the_target_is_refused(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as zipped:
        zipped.writestr("../evil.txt", "x")
    with pytest.raises(PipelineError, match="refusing member"):
        fetch_dataset(str(tmp_path / "evil.zip"), tmp_path / "work" / "raw")
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "work" / "raw").exists()


def test_malformed_checksum_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="data.checksum = 'sha1:abc'"):
        fetch_dataset(str(dataset_folder(tmp_path / "x")), tmp_path / "raw", "sha1:abc")


def zip_without_utf8_flag(path: Path, members: dict[bytes, bytes]) -> Path:
    """A zip whose member names are raw bytes without the UTF-8 flag, as Info-ZIP's `zip` and
    macOS write them: zipfile sets the flag for any non-ASCII name, so each member is written
    under an ASCII stand-in of the same length whose bytes are then swapped for the name's."""
    stand_ins = {}
    with zipfile.ZipFile(path, "w") as zipped:
        for number, (name, content) in enumerate(members.items()):
            stand_in = f"{number:0{len(name)}d}".encode()
            zipped.writestr(stand_in.decode(), content)
            stand_ins[stand_in] = name
    data = path.read_bytes()
    for stand_in, name in stand_ins.items():
        assert data.count(stand_in) == 2  # the local header and the central directory
        data = data.replace(stand_in, name)
    path.write_bytes(data)
    return path


def test_zip_names_without_the_utf8_flag_keep_their_accents(tmp_path: Path) -> None:
    archive = zip_without_utf8_flag(
        tmp_path / "ds.zip",
        {
            "ds/café crème/1.txt".encode(): b"coffee",
            "ds/thé/1.txt".encode(): b"tea",
            # an old DOS archive: cp437 bytes, not valid UTF-8, read as cp437 still
            "ds/été/1.txt".encode("cp437"): b"summer",
        },
    )
    with zipfile.ZipFile(archive) as zipped:
        assert not any(member.flag_bits & 0x800 for member in zipped.infolist())
    fetch_dataset(str(archive), tmp_path / "raw")
    assert tree(tmp_path / "raw") == {
        "ds/café crème/1.txt": "coffee",
        "ds/thé/1.txt": "tea",
        "ds/été/1.txt": "summer",
    }


def test_zip_names_with_backslashes_keep_their_folders(tmp_path: Path) -> None:
    # as some Windows tools wrote them; on Linux zipfile keeps the backslashes in the name
    with zipfile.ZipFile(tmp_path / "ds.zip", "w") as zipped:
        for name, content in GOOD.items():
            zipped.writestr(name.replace("/", "\\"), content)
    fetch_dataset(str(tmp_path / "ds.zip"), tmp_path / "raw")
    assert tree(tmp_path / "raw") == {k: v.decode() for k, v in GOOD.items()}
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as zipped:
        zipped.writestr("..\\evil.txt", b"x")
    with pytest.raises(PipelineError, match="refusing member '../evil.txt'"):
        fetch_dataset(str(tmp_path / "evil.zip"), tmp_path / "work" / "raw")


def test_zip_name_outside_the_target_is_refused_by_its_utf8_name(tmp_path: Path) -> None:
    archive = zip_without_utf8_flag(tmp_path / "evil.zip", {"../café.txt".encode(): b"x"})
    with pytest.raises(PipelineError, match="refusing member '../café.txt'"):
        fetch_dataset(str(archive), tmp_path / "work" / "raw")
    assert not (tmp_path / "café.txt").exists() and not (tmp_path / "work" / "raw").exists()


def test_broken_link_in_a_source_folder_is_named_and_nothing_is_replaced(tmp_path: Path) -> None:
    source = dataset_folder(tmp_path / "mine")
    link = source / "train" / "cats" / "2.jpg"
    link.symlink_to(tmp_path / "photos" / "gone.jpg")
    raw = dataset_folder(tmp_path / "data" / "raw")
    before = tree(raw)
    with pytest.raises(PipelineError) as error:
        fetch_dataset(str(source), raw)
    assert str(error.value) == (
        f"data.source: {link} is a broken link (to {tmp_path / 'photos' / 'gone.jpg'}, which "
        "does not exist); point it at the file, or delete it, and run again"
    )
    assert tree(raw) == before
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["raw"]


@pytest.mark.parametrize("kind", ["folder", "archive"])
def test_an_empty_source_is_named_and_nothing_is_replaced(tmp_path: Path, kind: str) -> None:
    source = tmp_path / "empty"
    (source / "cats").mkdir(parents=True)  # folders, no files
    if kind == "archive":
        with tarfile.open(tmp_path / "empty.tar.gz", "w:gz") as tar:
            tar.add(source, arcname="empty")
        source = tmp_path / "empty.tar.gz"
    raw = dataset_folder(tmp_path / "data" / "raw")
    before = tree(raw)
    with pytest.raises(PipelineError, match=f"data.source: {source} holds no files"):
        fetch_dataset(str(source), raw)
    assert tree(raw) == before
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["raw"]
