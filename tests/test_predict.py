"""`imageclf predict`, run as a user runs it (a subprocess of the installed console command), on
a folder of real image files in many formats, sizes and colour modes, broken ones included."""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import wcwidth
from PIL import Image

from imageclf.errors import PipelineError
from imageclf.images import BadImage, decode_image
from imageclf.predict import find_images
from tests.repos import run, venv_env
from tests.synthetic import CLASSES

# name -> (width, height, class, how it is saved); the class is the image's dominant colour
GOOD = {
    "red.png": (16, 16, 0, "RGB"),
    "green.jpg": (40, 23, 1, "RGB"),  # not square, not the model's size: resized inside it
    "blue.webp": (30, 30, 2, "RGB"),
    "nested/deeper/red.bmp": (20, 16, 0, "RGB"),
    "nested/green.gif": (16, 16, 1, "P"),
    "blue.tiff": (50, 40, 2, "RGB"),
    "gray.png": (16, 16, 0, "L"),
    "rgba.png": (16, 16, 2, "RGBA"),
    "palette.png": (24, 12, 1, "P"),
}


def coloured(width: int, height: int, label: int, seed: int) -> np.ndarray:
    pixels = np.random.default_rng(seed).integers(0, 90, (height, width, 3), dtype=np.uint8)
    pixels[..., label] += 140
    return pixels


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of good images, a broken file, a truncated JPEG, a 20,000 x 20,000 PNG, and a
    text file (not picked up from folders: not an image suffix)."""
    folder = tmp_path_factory.mktemp("photos")
    for seed, (name, (width, height, label, mode)) in enumerate(GOOD.items()):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(coloured(width, height, label, seed))
        image.convert(mode).save(path, **({"quality": 95} if path.suffix == ".jpg" else {}))
    (folder / "broken.png").write_bytes(b"this is not a PNG file")
    jpeg = (folder / "green.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    # 400 megapixels in 50 KB: one bit per pixel, all zero, compresses to almost nothing
    Image.new("1", (20_000, 20_000)).save(folder / "bomb.png")
    (folder / "notes.txt").write_text("not an image, and not an image suffix")
    return folder


@pytest.fixture(scope="module")
def keras_probabilities(photos: Path, tiny_model: Path) -> dict[str, dict[str, float]]:
    """What the Keras model itself says about each good image (class -> probability), decoded
    here with Pillow alone and passed at its own size, as a user of the .keras file would."""
    from imageclf.models import class_names, load_model

    model = load_model(tiny_model)
    result = {}
    for name in GOOD:
        with Image.open(photos / name) as image:
            pixels = np.asarray(image.convert("RGB"))
        probabilities = model.predict(pixels[None], verbose=0)[0]
        result[name] = dict(zip(class_names(model), probabilities.tolist()))
    return result


def predict(cwd: Path, *args: str) -> tuple[int, str, str]:
    result = run(cwd, "imageclf", "predict", *args, check=False)
    return result.returncode, result.stdout, result.stderr


def test_folder_of_every_format_same_answers_as_keras(
    photos: Path, tiny_model: Path, keras_probabilities: dict[str, np.ndarray]
) -> None:
    # batches of 2 by shape: several batches, images of one shape grouped across the folder
    status, out, err = predict(
        photos, ".", "--model", str(tiny_model), "--json", "--batch-size", "2"
    )
    rows = [json.loads(line) for line in out.splitlines()]
    # every image once, walked recursively, in path order; the text file left out
    assert [row["file"] for row in rows] == sorted(GOOD)
    for row in rows:
        expected = keras_probabilities[row["file"]]
        assert len(row["top"]) == 3  # the default top-k, here all classes
        assert row["top"][0]["class"] == max(expected, key=expected.get)
        # same photo, same answer: the probabilities the Keras model gives the same pixels
        for entry in row["top"]:
            assert entry["probability"] == pytest.approx(expected[entry["class"]], abs=1e-5)
    # the bad files: one line each on stderr naming it and why, then a count; status 1
    lines = err.strip().splitlines()
    assert any("broken.png" in line and "not a readable image" in line for line in lines)
    assert any("truncated.jpg" in line and "truncated" in line for line in lines)
    assert any("bomb.png" in line and "400,000,000 pixels" in line for line in lines)
    assert lines[-1] == "error: 3 of 12 files could not be classified"
    assert status == 1


def test_globs_files_csv_top_k_and_skip(photos: Path, tiny_model: Path) -> None:
    status, out, err = predict(
        photos,
        "**/*.gif",
        "*.png",
        "green.jpg",
        "--model",
        str(tiny_model),
        "--csv",
        "--top-k",
        "2",
        "--on-bad-image",
        "skip",
    )
    rows = list(csv.DictReader(io.StringIO(out)))
    assert list(rows[0]) == ["file", "class_1", "p_1", "class_2", "p_2"]
    # the glob's matches in order, then the named file; the PNGs that fail are skipped
    assert [row["file"] for row in rows] == [
        "nested/green.gif",
        "gray.png",
        "palette.png",
        "red.png",
        "rgba.png",
        "green.jpg",
    ]
    for row in rows:
        assert float(row["p_1"]) >= float(row["p_2"])
        assert {row["class_1"], row["class_2"]} <= set(CLASSES)
    assert "skipped: broken.png" in err and "skipped: bomb.png" in err
    assert status == 0


def test_odd_file_names_keep_one_record_each_and_a_closed_pipe_is_no_error(
    tiny_model: Path, tmp_path: Path
) -> None:
    names = ["new\nline.png", 'comma, "quote".png', "日本.png"]
    for name in names:
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / name)
    model = ("--model", str(tiny_model))
    status, out, _ = predict(tmp_path, ".", *model, "--csv")
    assert status == 0
    assert sorted(row["file"] for row in csv.DictReader(io.StringIO(out))) == sorted(names)
    status, out, _ = predict(tmp_path, ".", *model)
    assert status == 0
    rows = out.splitlines()[1:]  # after the header: one row per file, the newline escaped
    assert len(rows) == 3 and any(row.startswith("new\\nline.png ") for row in rows)
    # a reader that stops early (`| head -1`) ends the command quietly: 1,000 images print
    # more than a pipe holds, so the command is still writing when `head` has gone
    many = tmp_path / "many"
    many.mkdir()
    for index in range(1000):
        Image.fromarray(np.full((8, 8, 3), index % 256, np.uint8)).save(many / f"{index}.png")
    shell = f"imageclf predict many --model {tiny_model} --json | head -1"
    result = subprocess.run(
        ["bash", "-o", "pipefail", "-c", shell],
        cwd=tmp_path,
        env=venv_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert json.loads(result.stdout)["file"].startswith("many/")
    assert result.returncode == 141  # as any command whose reader went away (SIGPIPE)
    assert "Traceback" not in result.stderr and "Error" not in result.stderr


def test_a_large_photo_decoded_near_the_model_size_same_answer(
    tiny_model: Path, tmp_path: Path
) -> None:
    from imageclf.images import decode_image
    from imageclf.models import class_names, load_model

    # a smooth 640 x 480 photo with grain, as a JPEG and as a PNG
    y, x = np.mgrid[0:480, 0:640] / 640
    pixels = np.stack([120 + 100 * np.sin(6 * x + c) * np.cos(4 * y - c) for c in range(3)], -1)
    pixels += np.random.default_rng(0).normal(0, 12, pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    image.save(tmp_path / "photo.jpg", quality=90)
    image.save(tmp_path / "photo.png")
    # for a model of 16 x 16 inputs, libjpeg decodes at 1/8 (80 x 60 still covers 16); a
    # model of 100 lets it go to 1/4 only; a PNG has no such decoding and comes whole
    assert decode_image(tmp_path / "photo.jpg", size=16).shape == (60, 80, 3)
    assert decode_image(tmp_path / "photo.jpg", size=100).shape == (120, 160, 3)
    assert decode_image(tmp_path / "photo.png", size=16).shape == (480, 640, 3)

    # `imageclf predict` decodes so; the answer is the Keras model's on the whole photo
    status, out, _ = predict(tmp_path, "photo.jpg", "--model", str(tiny_model), "--json")
    [row] = [json.loads(line) for line in out.splitlines()]
    model = load_model(tiny_model)
    whole = model.predict(decode_image(tmp_path / "photo.jpg")[None], verbose=0)[0]
    expected = dict(zip(class_names(model), whole.tolist()))
    assert status == 0
    assert len(row["top"]) == len(expected)
    for entry in row["top"]:
        assert entry["probability"] == pytest.approx(expected[entry["class"]], abs=0.01)


def test_table_and_a_configurable_pixel_limit(photos: Path, tiny_model: Path) -> None:
    # 16 x 16 = 256 pixels pass a limit of 1,000; 40 x 23 = 920 too; 50 x 40 = 2,000 do not
    status, out, err = predict(
        photos,
        "red.png",
        "green.jpg",
        "blue.tiff",
        "--model",
        str(tiny_model),
        "--max-pixels",
        "1000",
    )
    header, *rows = out.splitlines()
    assert header.split() == ["file", "top", "1", "top", "2", "top", "3"]
    assert [row.split()[0] for row in rows] == ["red.png", "green.jpg"]
    assert all(row.count("%") == 3 for row in rows)
    assert "blue.tiff: 50 x 40 = 2,000 pixels, over the limit of 1,000" in err
    assert status == 1


def test_the_table_stays_aligned_with_wide_characters_in_names(
    photos: Path, tiny_model: Path, tmp_path: Path
) -> None:
    # CJK characters and emoji take two columns of a terminal each, a family of emoji joined
    # by zero-width joiners two in all, and a combining accent none
    names = ["赤い画像.png", "👨\u200d👩\u200d👧 family.png", "cafe\u0301.png", "red.png"]
    for name in names:
        (tmp_path / name).write_bytes((photos / "red.png").read_bytes())
    status, out, _ = predict(tmp_path, *names, "--model", str(tiny_model))
    header, *rows = out.splitlines()
    # the first class column starts at the same terminal column in the header and every row,
    # as wcwidth (the terminal-width library prompt_toolkit uses) counts them
    starts = {
        wcwidth.wcswidth(line[: re.search(r"\s{2,}\S", line).end() - 1]) for line in [header, *rows]
    }
    assert status == 0 and len(rows) == len(names) and len(starts) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.jpg"], "missing.jpg: no such file or folder"),
        (["gone.jpg"], "gone.jpg: a symbolic link to missing.jpg, which does not exist"),
        (["loop.jpg"], "loop.jpg: a loop of symbolic links"),
        (["empty"], "empty: no image files in this folder or below it"),
        (["*.heic"], "*.heic: no files match this pattern"),
        (["red.png", "--model", "nowhere.keras"], "nowhere.keras: no model here"),
        (["red.png", "--model", "notes.txt"], "notes.txt: not a .keras model file"),
        (["red.png", "--model", "broken.tflite"], "broken.tflite: cannot load this model"),
        (["red.png", "--model", "empty"], "empty: a folder without saved_model.pb"),
    ],
)
def test_bad_paths_and_models_one_clear_error(
    photos: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    for name in ("red.png", "notes.txt"):
        (tmp_path / name).write_bytes((photos / name).read_bytes())
    (tmp_path / "broken.tflite").write_bytes(b"not a flatbuffer")
    (tmp_path / "empty").mkdir()
    (tmp_path / "gone.jpg").symlink_to("missing.jpg")
    (tmp_path / "loop.jpg").symlink_to("loop.jpg")
    status, out, err = predict(tmp_path, *args)
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert message in err
    assert out == ""
    assert status == 1


def test_python_dash_m_imageclf_is_the_same_command(tmp_path: Path) -> None:
    # for where the console script is not on PATH
    result = run(tmp_path, "python", "-m", "imageclf", "predict", "missing.jpg", check=False)
    assert result.stderr == "error: missing.jpg: no such file or folder\n"
    assert result.returncode == 1


def test_broken_links_and_empty_files_in_a_folder_are_named_videos_left_out(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "gone.jpg").symlink_to("missing.jpg")
    (tmp_path / "loop.png").symlink_to("loop.png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    # files of formats Pillow only recognizes, not images to classify here
    (tmp_path / "model.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
    (tmp_path / "clip.mpg").write_bytes(b"\x00\x00\x01\xb3")
    (tmp_path / "IMG_0001.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic")  # no plugin here
    left_out: list[Path] = []
    found = find_images([tmp_path], left_out)
    assert [path.name for path in found] == ["empty.jpg", "gone.jpg", "loop.png", "ok.png"]
    assert sorted(path.name for path in left_out) == ["IMG_0001.HEIC", "clip.mpg", "model.h5"]
    reasons = {
        "empty.jpg": "empty file (0 bytes)",
        "gone.jpg": "a symbolic link to missing.jpg, which does not exist",
        "loop.png": "a loop of symbolic links; point it at a file or folder",
    }
    for name, reason in reasons.items():
        with pytest.raises(BadImage) as error:
            decode_image(tmp_path / name)
        assert str(error.value) == f"{tmp_path / name}: {reason}"
    # an upload says the same as a file
    with pytest.raises(BadImage, match="^upload: empty file \\(0 bytes\\)$"):
        decode_image(b"", name="upload")


def test_a_folder_of_other_formats_only_says_which(tmp_path: Path) -> None:
    (tmp_path / "IMG_0001.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic")
    with pytest.raises(PipelineError) as error:
        find_images([tmp_path])
    assert str(error.value) == (
        f"{tmp_path}: no image files in this folder or below it (1 file(s) of formats Pillow "
        "does not read, such as IMG_0001.HEIC)"
    )
