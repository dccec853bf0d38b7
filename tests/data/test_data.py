import io
import os
import pickle
import re
import shutil
import unicodedata
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import CIFAR_CUT, cifar_members, write_cifar_dir, write_cifar_tar
from vit_pipeline import data
from vit_pipeline.config import make_config
from vit_pipeline.errors import ConfigError, DataError


def test_digits_are_real_rgb_images():
    x, y, names = data.load_digits_rgb()
    assert x.shape == (1797, 32, 32, 3) and x.dtype == np.uint8
    assert names == [str(i) for i in range(10)]
    assert set(np.unique(y)) == set(range(10))
    assert x.max() == 255 and np.array_equal(x[..., 0], x[..., 2])


@pytest.mark.parametrize("layout", ["tar", "dir"])
def test_official_format_archive_and_directory(tmp_path, layout):
    members = cifar_members(n_train=20, n_test=10, num_classes=5)
    path = (
        write_cifar_tar(tmp_path / "c.tar.gz", members)
        if layout == "tar"
        else write_cifar_dir(tmp_path, members)
    )
    x_train, y_train, x_test, y_test, names = data.read_cifar100(path)
    assert x_train.shape == (20, 32, 32, 3) and x_test.shape == (10, 32, 32, 3)
    assert names == [f"class{i}" for i in range(5)]
    # R, G, B planes are turned into channels-last pixels.
    raw = members["train"][b"data"][3]
    assert np.array_equal(x_train[3, :, :, 1], raw[1024:2048].reshape(32, 32))
    assert list(y_train[:6]) == [0, 1, 2, 3, 4, 0]


def test_coarse_labels(tmp_path):
    path = write_cifar_tar(tmp_path / "c.tar.gz")
    _, y, _, _, names = data.read_cifar100(path, "coarse")
    assert names == ["even", "odd"] and set(y) == {0, 1}


def test_real_cifar_cut_committed_in_tests():
    x_train, y_train, x_test, y_test, names = data.read_cifar100(CIFAR_CUT)
    assert len(names) == 100 and names[:3] == ["apple", "aquarium_fish", "baby"]
    assert x_train.shape == (300, 32, 32, 3) and x_test.shape == (300, 32, 32, 3)
    assert np.bincount(y_train, minlength=100).min() == 3
    # Real photos, not noise: neighbouring pixels are strongly correlated.
    img = x_train.astype(float)
    corr = np.corrcoef(img[:, :, :-1].ravel(), img[:, :, 1:].ravel())[0, 1]
    assert corr > 0.8


class _Boom:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/vit_pipeline_pwned_marker",))


def test_pickle_payload_is_refused_without_running(tmp_path):
    import os

    marker = "/tmp/vit_pipeline_pwned_marker"
    if os.path.exists(marker):
        os.remove(marker)
    members = cifar_members()
    members["train"] = pickle.dumps({b"data": _Boom()}, protocol=4)
    path = write_cifar_tar(tmp_path / "evil.tar.gz", members)
    with pytest.raises(DataError, match="Refusing to load .*os.*system|Refusing to load .*posix.*system"):
        data.read_cifar100(path)
    assert not os.path.exists(marker)


def test_truncated_archive(tmp_path):
    good = write_cifar_tar(tmp_path / "c.tar.gz").read_bytes()
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="truncated or corrupt"):
        data.read_cifar100(bad)


def test_archive_without_expected_members(tmp_path):
    path = write_cifar_tar(tmp_path / "c.tar.gz", skip=("test",))
    with pytest.raises(DataError, match=r"lacks the cifar-100-python members \['test'\]"):
        data.read_cifar100(path)


def test_an_archive_with_two_files_of_one_member_name_is_an_error(tmp_path):
    """A repacked archive with an old copy (cifar-100-python/old/test, here the training images): the last one
    read silently became the test split."""
    import tarfile

    members = cifar_members()
    path = write_cifar_tar(tmp_path / "c.tar.gz", members)
    with tarfile.open(path, "r:gz") as src, tarfile.open(tmp_path / "two.tar.gz", "w:gz") as dst:
        for m in src.getmembers():
            dst.addfile(m, src.extractfile(m))
        copy = tarfile.TarInfo("cifar-100-python/old/test")
        copy.size = src.getmember("cifar-100-python/train").size
        dst.addfile(copy, src.extractfile("cifar-100-python/train"))
    with pytest.raises(
        DataError, match=re.escape("holds two test files (cifar-100-python/test, cifar-100-python/old/test)")
    ):
        data.read_cifar100(tmp_path / "two.tar.gz")


def test_missing_path():
    with pytest.raises(DataError, match="does not exist"):
        data.read_cifar100("/nonexistent/cifar.tar.gz")


def _write_image_folder(root, bad_file=False):
    rng = np.random.default_rng(0)
    for cls, mode, size in (("cat", "RGB", (40, 30)), ("dog", "L", (16, 16)), ("eel", "RGBA", (64, 64))):
        (root / cls).mkdir(parents=True)
        for i in range(6):
            arr = rng.integers(0, 256, size=(size[1], size[0], len(mode)), dtype=np.uint8).squeeze()
            Image.fromarray(arr, mode=mode).save(root / cls / f"{i}.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "cat" / "x.jpg")
    if bad_file:
        (root / "dog" / "broken.png").write_bytes(b"not an image at all")


def test_image_folder_converts_modes_and_sizes(tmp_path):
    _write_image_folder(tmp_path / "imgs", bad_file=True)
    x, y, names, skipped = data.read_image_folder(tmp_path / "imgs", 32)
    assert names == ["cat", "dog", "eel"]
    assert x.shape == (19, 32, 32, 3) and x.dtype == np.uint8
    assert list(np.bincount(y)) == [7, 6, 6]
    assert skipped == 1


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.read_image_folder(tmp_path / "missing", 32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        data.read_image_folder(tmp_path / "empty", 32)
    (tmp_path / "empty" / "cls").mkdir()
    with pytest.raises(DataError, match="Expected at least 2 class folders .* Received: 1 \\('cls'\\)"):
        data.read_image_folder(tmp_path / "empty", 32)  # one class is no classifier
    (tmp_path / "empty" / "other").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "empty" / "other" / "a.png")
    with pytest.raises(DataError, match="cls has no readable images .*in it or its sub-folders"):
        data.read_image_folder(tmp_path / "empty", 32)


def test_image_folders_as_users_bring_them(tmp_path):
    """Layouts from other tools: images in sub-folders of a class, Kaggle/Roboflow split names, a zip's
    __MACOSX folder, other JPEG suffixes, NFD class names (macOS), a decompression bomb and a corrupt
    file among good images, a class of one image (stays in training; the rest stays stratified)."""
    root = tmp_path / "photos"
    for split, n in (("training", 6), ("valid", 3), ("testing", 3)):
        for cls in ("cat", "caf\u00e9"):
            folder = (
                root / split / (unicodedata.normalize("NFD", cls) if split == "testing" else cls) / "batch1"
            )
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(
                    folder / f"{i}.jfif", format="JPEG"
                )
    (root / "__MACOSX" / "training").mkdir(parents=True)
    (root / "__MACOSX" / "training" / "._0.jpg").write_bytes(b"\0\5\x16\7")
    bomb = Image.new("L", (1, 1))
    bomb.save(root / "training" / "cat" / "bomb.png")
    raw = bytearray((root / "training" / "cat" / "bomb.png").read_bytes())
    raw[16:24] = (60000).to_bytes(4, "big") * 2  # IHDR says 60000 x 60000: a decompression bomb
    raw[29:33] = zlib.crc32(bytes(raw[12:29])).to_bytes(4, "big")  # with the CRC that makes it valid
    (root / "training" / "cat" / "bomb.png").write_bytes(bytes(raw))
    with pytest.raises(Image.DecompressionBombError):
        Image.open(root / "training" / "cat" / "bomb.png")
    (root / "training" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n nothing")
    cfg = make_config(
        "quickstart", {"dataset": "image_folder", "data_path": str(root), "dataset_name": "photos"}
    )
    splits = data.prepare(cfg, shard_dir=tmp_path / "shards")
    assert splits.class_names == ["caf\u00e9", "cat"] and splits.info["splits_given"] == "train,val,test"
    assert (len(splits.y_train), len(splits.y_val), len(splits.y_test)) == (12, 6, 6)
    assert splits.info["skipped_files"] == 2
    # More junk than images: the split is made of the files that are images (else val/test came out empty).
    dirty = tmp_path / "dirty"
    for cls in ("a", "b"):
        (dirty / cls).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(np.full((8, 8, 3), 9 * i, np.uint8)).save(dirty / cls / f"{i}.png")
        for i in range(24):
            (dirty / cls / f"junk{i}.jpg").write_bytes(b"\xff\xd8 not a jpeg" if i % 2 else b"")
    cfg = make_config("quickstart", {"dataset": "image_folder", "data_path": str(dirty), "test_split": 0.25,
                                     "validation_split": 0.34})  # fmt: skip
    splits = data.prepare(cfg, shard_dir=tmp_path / "shards2")
    for y, per_class in ((splits.y_train, [4, 4]), (splits.y_val, [2, 2]), (splits.y_test, [2, 2])):
        assert np.bincount(y, minlength=2).tolist() == per_class  # stratified over the images
    assert splits.info["skipped_files"] == 48


def test_images_are_decoded_for_training_as_the_service_reads_them(tmp_path):
    """16-bit and float greyscale scaled (not clipped white or black), EXIF orientation applied: the shards
    hold what the consumer would classify (both call ``vit_consumer.classifier.to_rgb``)."""
    from vit_pipeline.shards import decode_image

    ramp = np.tile(np.linspace(0, 1, 16), (16, 1))
    Image.fromarray((ramp * 65535).astype(np.uint16)).save(tmp_path / "deep.png")
    Image.fromarray(ramp.astype(np.float32), "F").save(tmp_path / "float.tif")
    expected = np.rint(ramp * 255).astype(np.uint8)
    for name in ("deep.png", "float.tif"):
        got = decode_image(tmp_path / name, 16)
        assert np.abs(got[..., 0].astype(int) - expected).max() <= 1, name
    upright = Image.fromarray(np.repeat(expected[..., None], 3, -1)).crop((0, 0, 16, 8))  # wider than tall
    exif = Image.Exif()
    exif[0x0112] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "phone.png", exif=exif.tobytes())
    np.testing.assert_array_equal(decode_image(tmp_path / "phone.png", 16),
                                  np.asarray(upright.resize((16, 16), Image.Resampling.BILINEAR)))  # fmt: skip


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_a_tiff_with_an_orientation_tag_is_turned_upright_once(tmp_path, orientation):
    """Pillow's TIFF reader turns the image as it loads and drops the tag: the tag read before the load turned
    it a second time (upside down, or a quarter turn the wrong way), unlike the same picture as a JPEG."""
    from PIL import ImageOps, TiffImagePlugin

    from vit_pipeline.shards import decode_image

    yy, xx = np.mgrid[0:12, 0:20]
    stored = Image.fromarray(np.stack([xx * 12, yy * 20, (xx + yy) * 8], -1).astype(np.uint8))
    tags = TiffImagePlugin.ImageFileDirectory_v2()
    tags[0x0112] = orientation
    stored.save(tmp_path / "turned.tif", tiffinfo=tags)
    exif = stored.getexif()
    exif[0x0112] = orientation
    stored.info["exif"] = exif.tobytes()
    upright = ImageOps.exif_transpose(stored)  # as a viewer shows it
    expected = np.asarray(upright.resize((16, 16), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(decode_image(tmp_path / "turned.tif", 16), expected)


def test_a_mistyped_exif_tag_is_read_upright_and_a_damaged_png_is_skipped_not_a_crash(tmp_path):
    """Pillow's exif_transpose fails to write back an EXIF whose SHORT tag is stored as ASCII (phones and editors
    write such tags), and its PNG decoder raises SyntaxError on a broken chunk: neither stops a prepare run."""
    import struct
    import zlib

    from vit_pipeline.shards import decode_image

    upright = np.random.default_rng(0).integers(0, 256, (8, 16, 3), np.uint8)  # wider than tall
    entries = [(0x112, 3, 1, struct.pack("<H", 6)), (0x14C, 2, 4, b"abc\0")]
    exif = b"II*\0" + struct.pack("<IH", 8, len(entries))
    exif += b"".join(struct.pack("<HHI", t, ty, c) + v.ljust(4, b"\0") for t, ty, c, v in entries) + b"\0" * 4
    Image.fromarray(np.ascontiguousarray(np.rot90(upright, 1))).save(
        tmp_path / "phone.png", exif=b"Exif\0\0" + exif
    )
    expected = np.asarray(Image.fromarray(upright).resize((16, 16), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(decode_image(tmp_path / "phone.png", 16), expected)

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), np.uint8)).save(buf, "PNG")
    png = buf.getvalue()
    i = png.find(b"IDAT")
    n = struct.unpack(">I", png[i - 4 : i])[0]

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        )

    damaged = (
        png[: i - 4] + chunk(b"IDAT", png[i + 4 : i + 104]) + chunk(b"ID\x00T", png[i + 104 : i + 4 + n])
    )
    (tmp_path / "damaged.png").write_bytes(damaged + png[i + 8 + n :])
    assert decode_image(tmp_path / "damaged.png", 16) is None


def test_a_class_of_one_image_is_trained_on_and_the_others_stay_stratified():
    y = np.repeat([0, 1, 2, 3], [12, 12, 1, 1])
    x = np.arange(len(y))
    for seed in range(20):
        x_a, y_a, x_b, y_b = data._split(x, y, 0.25, seed)
        assert sorted(np.concatenate([x_a, x_b]).tolist()) == x.tolist()  # a partition
        assert {2, 3} <= set(y_a.tolist())
        assert np.bincount(y_b, minlength=4).tolist() in ([3, 3, 0, 0], [4, 2, 0, 0], [2, 4, 0, 0])


def test_prepare_image_folder_end_to_end(tmp_path):
    _write_image_folder(tmp_path / "imgs")
    cfg = make_config("quickstart", {"dataset": "image_folder", "data_path": str(tmp_path / "imgs"),
                                     "validation_split": 0.2, "test_split": 0.25})  # fmt: skip
    splits = data.prepare(cfg)
    assert splits.class_names == ["cat", "dog", "eel"]
    assert len(splits.y_train) + len(splits.y_val) + len(splits.y_test) == 19


def test_image_folder_with_its_own_splits(tmp_path):
    """ROOT/{train,validation,test}/<class>/: the given splits are used as they are."""
    root = tmp_path / "Flowers 2024"
    for split in ("train", "validation", "test"):
        _write_image_folder(root / split)
    cfg = make_config("quickstart", {"dataset": "image_folder", "data_path": str(root)})
    assert cfg.dataset_tag == "flowers-2024" and cfg.resolved_experiment_name == "vit-flowers-2024"
    assert cfg.resolved_model_name == "vit-flowers-2024"
    splits = data.prepare(cfg)
    assert splits.class_names == ["cat", "dog", "eel"]  # not "train", "validation", "test"
    assert len(splits.y_train) == len(splits.y_val) == len(splits.y_test) == 19
    assert splits.info["splits_given"] == "train,val,test"
    # Only train and test given: validation is split off the training images, test kept as given.
    partial = tmp_path / "partial"
    _write_image_folder(partial / "train")
    _write_image_folder(partial / "test")
    cfg = make_config("quickstart", {"dataset": "image_folder", "data_path": str(partial), "validation_split": 0.25,
                                     "dataset_name": "my-data"})  # fmt: skip
    assert cfg.dataset_tag == "my-data"
    splits = data.prepare(cfg)
    assert (
        len(splits.y_test) == 19 and len(splits.y_train) + len(splits.y_val) == 19 and len(splits.y_val) >= 3
    )
    # Pointed at ROOT/train, the dataset keeps ROOT's name.
    assert make_config(
        "quickstart", {"dataset": "image_folder", "data_path": str(partial / "train")}
    ).dataset_tag == ("partial")


def test_image_folder_splits_must_have_the_same_classes(tmp_path):
    root = tmp_path / "pets"
    _write_image_folder(root / "train")
    _write_image_folder(root / "val")
    (root / "val" / "fox").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "val" / "fox" / "0.png")
    import shutil

    shutil.rmtree(root / "val" / "eel")
    cfg = make_config("quickstart", {"dataset": "image_folder", "data_path": str(root)})
    with pytest.raises(DataError, match=r"differ from .*train: missing \['eel'\], extra \['fox'\]"):
        data.check_source(cfg)
    (root / "validation").mkdir()
    with pytest.raises(DataError, match="both"):
        data.image_folder_layout(root)
    with pytest.raises(ConfigError, match="dataset_name"):
        make_config("quickstart", {"dataset_name": "no spaces please"})


def test_split_is_deterministic_stratified_and_disjoint():
    cfg = make_config("quickstart")
    a, b = data.prepare(cfg), data.prepare(cfg)
    assert a.digest() == b.digest()
    assert np.array_equal(a.y_val, b.y_val)
    # Stratified: every class in validation and test.
    assert set(a.y_val) == set(range(10)) and set(a.y_test) == set(range(10))
    total = len(a.y_train) + len(a.y_val) + len(a.y_test)
    assert total == 1797
    c = data.prepare(make_config("quickstart", {"seed": 1}))
    assert c.digest() != a.digest()


def test_caps_and_real_cut_preparation():
    cfg = make_config("cifar100", {"data_path": str(CIFAR_CUT), "max_test_images": 100})
    splits = data.prepare(cfg)
    assert splits.num_classes == 100 and len(splits.y_test) == 100
    assert len(splits.y_train) == 270 and len(splits.y_val) == 30


def test_empty_training_class_is_named(tmp_path):
    members = cifar_members(n_train=20, n_test=10, num_classes=5)
    members["meta"][b"fine_label_names"].append(b"ghost")  # 6 names, class 5 never appears
    path = write_cifar_tar(tmp_path / "c.tar.gz", members)
    cfg = make_config("cifar100", {"data_path": str(path), "validation_split": 0.2})
    with pytest.raises(DataError, match="no training images.*ghost"):
        data.prepare(cfg)


def test_label_out_of_range(tmp_path):
    members = cifar_members(num_classes=5)
    members["train"][b"fine_labels"][0] = 7
    path = write_cifar_tar(tmp_path / "c.tar.gz", members)
    with pytest.raises(DataError, match=r"labels in \[0, 5\). Received: min=0, max=7"):
        data.prepare(make_config("cifar100", {"data_path": str(path)}))


def test_bad_shape_in_pickle(tmp_path):
    members = cifar_members()
    members["train"][b"data"] = np.zeros((20, 100), np.uint8)
    path = write_cifar_tar(tmp_path / "c.tar.gz", members)
    with pytest.raises(DataError, match=r"shape \(N, 3072\)"):
        data.read_cifar100(path)


def test_splits_round_trip(tmp_path):
    splits = data.prepare(make_config("quickstart", {"max_train_images": 200}))
    path = splits.save(tmp_path / "d.npz")
    again = data.Splits.load(path)
    assert again.digest() == splits.digest() and again.class_names == splits.class_names
    assert not list(tmp_path.glob(".*tmp*"))  # no temp files left behind


def _bad_inputs(tmp_path):
    """name -> (data_path, dataset, expected message), each a different kind of bad input."""
    cases = {}
    cases["missing"] = (tmp_path / "nope.tar.gz", "cifar100", "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases["empty_folder"] = (empty, "image_folder", "no class sub-folders")
    no_images = tmp_path / "noimg"
    (no_images / "cat").mkdir(parents=True)
    (no_images / "cat" / "notes.txt").write_text("not an image")
    (no_images / "dog").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(no_images / "dog" / "a.png")
    cases["class_without_images"] = (no_images, "image_folder", "has no readable images")
    one_class = tmp_path / "one"
    _write_image_folder(one_class)
    for name in ("dog", "eel"):
        shutil.rmtree(one_class / name)
    cases["one_class"] = (one_class, "image_folder", "Expected at least 2 class folders")
    # Headers that read, pixels that do not: found out while decoding into shards, which must not stay.
    undecodable = tmp_path / "undecodable"
    _write_image_folder(undecodable)
    for png in (undecodable / "eel").glob("*.png"):
        png.write_bytes(png.read_bytes()[:120])
    cases["undecodable_class"] = (undecodable, "image_folder", "eel has no readable images")
    zipped = tmp_path / "c100.zip"
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("cifar-100-python/meta", b"x")
    cases["zip"] = (
        zipped,
        "cifar100",
        "is a .zip archive; give the official .tar.gz or the extracted folder",
    )
    good = write_cifar_tar(tmp_path / "good.tar.gz").read_bytes()
    (tmp_path / "trunc.tar.gz").write_bytes(good[: len(good) // 3])
    cases["truncated"] = (tmp_path / "trunc.tar.gz", "cifar100", "truncated or corrupt")
    cases["no_members"] = (write_cifar_tar(tmp_path / "nm.tar.gz", skip=("meta",)), "cifar100", "lacks")
    members = cifar_members()
    members["test"] = pickle.dumps({b"data": _Boom()}, protocol=4)
    cases["pickle_payload"] = (
        write_cifar_tar(tmp_path / "evil.tar.gz", members),
        "cifar100",
        "Refusing to load",
    )
    members = cifar_members()
    members["test"][b"fine_labels"][0] = 99
    cases["label_range"] = (write_cifar_tar(tmp_path / "lab.tar.gz", members), "cifar100", "labels in [0, 5)")
    return cases


@pytest.mark.integration  # the CLI as a process, for each case
@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "empty_folder",
        "class_without_images",
        "one_class",
        "undecodable_class",
        "zip",
        "truncated",
        "no_members",
        "pickle_payload",
        "label_range",
    ],
)
def test_bad_input_on_the_cli_is_one_line_and_writes_nothing(tmp_path, pipeline_home, case):
    import os

    from click.testing import CliRunner
    from mlflow.tracking import MlflowClient

    from vit_pipeline.cli import main

    marker = "/tmp/vit_pipeline_pwned_marker"
    if os.path.exists(marker):
        os.remove(marker)
    path, dataset, message = _bad_inputs(tmp_path)[case]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = CliRunner().invoke(main, ["train", "--dataset", dataset, "--data-path", str(path), "--epochs", "1",
                                       "--tracking-uri", uri])  # fmt: skip
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0]
    assert "Traceback" not in result.output
    assert (
        "Traceback" in (pipeline_home / "logs" / "vit-pipeline.log").read_text()
    )  # the full trace is logged
    assert not list(pipeline_home.glob("work/*/*"))  # no prepared data, checkpoint or model
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    # What a listing can tell (paths, archive members, class folders) opens no run; a bad pickle or image is
    # found while the data stage reads it, and fails the run it opened.
    read_by_the_stage = case in ("undecodable_class", "pickle_payload", "label_range")
    assert [r.info.status for r in runs] == (["FAILED"] if read_by_the_stage else [])
    assert client.search_registered_models() == []
    assert not os.path.exists(marker)


@pytest.mark.integration  # `vit-pipeline run` as a process, Prefect included
@pytest.mark.parametrize(("case", "before_prefect"), [("truncated", True), ("no_members", True),
                                                       ("empty_folder", True), ("pickle_payload", False)])  # fmt: skip
def test_bad_input_under_run_is_one_line_too(tmp_path, pipeline_home, case, before_prefect):
    """`vit-pipeline run`: what can be checked is checked before Prefect starts; a task's error is one line."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    path, dataset, message = _bad_inputs(tmp_path)[case]
    env = {**os.environ, "VIT_PIPELINE_HOME": str(pipeline_home), "TF_CPP_MIN_LOG_LEVEL": "2",
           "PREFECT_HOME": str(tmp_path / "prefect")}  # fmt: skip
    env.pop("PREFECT_API_URL", None)
    cli = Path(sys.executable).parent / "vit-pipeline"
    out = subprocess.run([str(cli), "run", "--dataset", dataset, "--data-path", str(path), "--epochs", "1",
                          "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"], env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert out.returncode == 1, out.stderr[-3000:]
    text = out.stdout + out.stderr
    errors = [line for line in text.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], text[-3000:]
    assert "Traceback" not in text and 'File "' not in text, text[-3000:]
    assert f"(details: {pipeline_home / 'logs' / 'vit-pipeline.log'})" in out.stderr
    started_prefect = "temporary server" in text.lower() or "Beginning flow run" in text
    assert started_prefect != before_prefect, text[-2000:]


def _pngs(folder, n, fmt="PNG", suffix=".png"):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(folder)))
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), np.uint8)).save(folder / f"{i}{suffix}", format=fmt)


def _prepare(root, tmp_path, **options):
    cfg = make_config("quickstart", {"dataset": "image_folder", "data_path": str(root), **options})
    data.check_source(cfg)
    return data.prepare(cfg, shard_dir=tmp_path / "shards")


def test_kaggle_split_folder_names_are_splits_not_classes(tmp_path):
    """training_set/ and test_set/ (Kaggle's cats and dogs; seg_train/seg_test alike) were taken as two classes."""
    for split, n in (("training_set", 6), ("test_set", 3)):
        for cls in ("cats", "dogs"):
            _pngs(tmp_path / "root" / split / cls, n)
    splits = _prepare(tmp_path / "root", tmp_path)
    assert splits.class_names == ["cats", "dogs"] and splits.info["splits_given"] == "train,test"
    assert len(splits.y_test) == 6


def test_class_names_with_a_split_word_stay_classes(tmp_path):
    """training_wheels/ and test_tube/ with their images in sub-folders are classes, not a train and a test split
    (the words beside a split's name must be ones like set, data, images)."""
    for cls in ("training_wheels", "test_tube", "Train Station"):
        for year in ("2019", "2020"):
            _pngs(tmp_path / "root" / cls / year, 3)
    splits = _prepare(tmp_path / "root", tmp_path)
    assert splits.class_names == ["Train Station", "test_tube", "training_wheels"]
    assert splits.info["splits_given"] == "none"


@pytest.mark.parametrize(
    ("folders", "message"),
    [
        (
            ("train", "test", "val", "chest_xray/train"),
            "holds split folders (test, train, val) beside other folders",
        ),
        (("val", "test"), "but none to train on"),
    ],
)
def test_split_folders_that_cannot_be_read_as_splits_are_a_clear_error_not_classes(
    tmp_path, folders, message
):
    for folder in folders:
        for cls in ("normal", "pneumonia"):
            _pngs(tmp_path / "root" / folder / cls, 3)
    with pytest.raises(DataError, match=re.escape(message)):
        _prepare(tmp_path / "root", tmp_path)


@pytest.mark.parametrize(
    ("folders", "message"),
    [
        (
            ("train/cat", "train/dog", "unlabeled"),
            "holds split folders (train) beside other folders (unlabeled)",
        ),
        (
            ("cat", "dog", "test/cat", "test/dog"),
            "holds split folders (test) beside other folders (cat, dog)",
        ),
        (
            ("train/cat", "train/dog", "test"),
            "Split folder {root}/test has no class sub-folders (4 images of its own",
        ),
    ],
)
def test_one_split_folder_beside_other_folders_is_an_error_not_a_class(tmp_path, folders, message):
    """train/ beside unlabeled/ trained a "train or unlabeled" classifier; cat/, dog/, test/ a class "test"; Kaggle's
    train/<class>/ beside an unlabeled test/*.png failed with "missing ['cat', 'dog']"."""
    root = tmp_path / "root"
    for folder in folders:
        _pngs(root / folder, 4)
    with pytest.raises(DataError, match=re.escape(message.format(root=root))):
        _prepare(root, tmp_path)


def test_a_class_without_test_images_in_a_given_test_split_is_untested_not_an_error(tmp_path):
    root = tmp_path / "root"
    for cls in ("cats", "dogs", "owls"):
        _pngs(root / "train" / cls, 6)
        _pngs(root / "test" / cls, 0 if cls == "owls" else 3)
    splits = _prepare(root, tmp_path)
    assert splits.class_names == ["cats", "dogs", "owls"] and sorted(set(splits.y_test.tolist())) == [0, 1]
    shutil.rmtree(root / "train" / "owls")
    _pngs(root / "train" / "owls", 0)  # without training images it stays an error
    with pytest.raises(DataError, match="owls has no readable images"):
        _prepare(root, tmp_path)


def test_kaggle_archives_that_unpack_into_a_folder_of_their_own_name_are_read(tmp_path):
    """Kaggle's cats-and-dogs unpacks to training_set/training_set/<class>/ (Intel's to seg_train/seg_train/)."""
    for split in ("training_set", "test_set"):
        for cls in ("cats", "dogs"):
            _pngs(tmp_path / "root" / split / split / cls, 4)
    splits = _prepare(tmp_path / "root", tmp_path)
    assert splits.class_names == ["cats", "dogs"] and splits.info["splits_given"] == "train,test"
    assert len(splits.y_test) == 8


def test_images_in_no_class_folder_are_counted_and_said_not_dropped_silently(tmp_path, caplog):
    root = tmp_path / "root"
    for cls in ("cats", "dogs"):
        _pngs(root / cls, 6)
    _pngs(root, 3)  # beside the class folders: no label
    with caplog.at_level("WARNING", logger="vit_pipeline.data"):
        splits = _prepare(root, tmp_path)
    assert splits.info["unlabeled_files"] == 3
    assert len(splits.y_train) + len(splits.y_val) + len(splits.y_test) == 12
    assert f"Leaving out 3 image files in {root} itself" in caplog.text


def test_nas_thumbnail_folders_are_neither_classes_nor_images(tmp_path):
    """Synology writes @eaDir/<photo>/SYNOPHOTO_THUMB_*.jpg beside every photo: thumbnails of a class's test images
    counted as its training images (and @eaDir at the root as a class)."""
    root = tmp_path / "root"
    for cls in ("cats", "dogs"):
        _pngs(root / cls, 6)
        _pngs(root / cls / "@eaDir" / "0.png", 5)
    _pngs(root / "@eaDir" / "x", 2)
    _pngs(root / "$Recycle.Bin" / "x", 2)  # as Windows writes it
    splits = _prepare(root, tmp_path)
    assert splits.class_names == ["cats", "dogs"]
    assert len(splits.y_train) + len(splits.y_val) + len(splits.y_test) == 12


def test_a_folder_that_cannot_be_listed_is_an_error_not_fewer_images(tmp_path, monkeypatch):
    """os.walk skips a folder it cannot list unless told: half a class was trained on without a word (the test
    runs as root, where permissions do not stop a listing: the listing fails as it would without them)."""
    root = tmp_path / "root"
    for cls in ("cats", "dogs"):
        _pngs(root / cls, 4)
    _pngs(root / "cats" / "2024", 4)
    real = os.scandir

    def scandir(path="."):
        if str(path).endswith("2024"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DataError, match=re.escape(f"Cannot list {root / 'cats' / '2024'} (in class folder")):
        _prepare(root, tmp_path)


def test_many_classes_of_two_images_each_keep_one_of_each_for_training(tmp_path):
    """Fewer held-out images than classes: the split is random, but no class leaves training (a false "no readable
    images" error named a class whose images were all fine)."""
    for c in range(40):
        _pngs(tmp_path / "root" / f"class{c:02d}", 2)
    splits = _prepare(tmp_path / "root", tmp_path)
    assert len(splits.class_names) == 40 and set(splits.y_train.tolist()) == set(range(40))
    assert len(splits.y_train) + len(splits.y_val) + len(splits.y_test) == 80


def test_a_class_folder_name_that_is_not_utf8_is_a_one_line_error(tmp_path):
    import os

    root = tmp_path / "root"
    _pngs(root / "tea", 3)
    latin1 = os.fsdecode(os.fsencode(str(root)) + b"/caf\xe9")  # a Windows zip extracted by unzip
    _pngs(Path(latin1), 3)
    with pytest.raises(DataError, match="is not UTF-8 text"):
        _prepare(root, tmp_path)


def test_an_nfc_and_an_nfd_folder_of_one_name_are_one_class_with_every_image(tmp_path):
    for name in ("caf\u00e9", unicodedata.normalize("NFD", "caf\u00e9")):
        _pngs(tmp_path / "root" / name, 5)
    _pngs(tmp_path / "root" / "tea", 5)
    splits = _prepare(tmp_path / "root", tmp_path)
    assert splits.class_names == ["caf\u00e9", "tea"]
    assert len(splits.y_train) + len(splits.y_val) + len(splits.y_test) == 15


def test_files_of_a_format_the_service_does_not_read_leave_before_the_split(tmp_path):
    """AVIF named .jpg (web scrapes): Pillow opens it, the decoder and the service do not (contract.IMAGE_FORMATS);
    it must not be counted into a split that then comes out empty."""
    from PIL import features

    fmt, suffix = ("AVIF", ".jpg") if features.check("avif") else ("PCX", ".png")
    for cls in ("a", "b"):
        _pngs(tmp_path / "root" / cls, 6)
        _pngs(tmp_path / "root" / cls / "scraped", 30, fmt, suffix)
    splits = _prepare(tmp_path / "root", tmp_path, test_split=0.25, validation_split=0.2)
    assert splits.info["skipped_files"] == 60
    assert len(splits.y_train) + len(splits.y_val) + len(splits.y_test) == 12 and len(splits.y_test) == 3
    # Data validation's file statistics count them unreadable too (they were read, their modes in the schema).
    from vit_pipeline.data_validation import source_file_statistics

    assert source_file_statistics(tmp_path / "root")["unreadable"] == 60


def test_an_archive_or_a_wrapping_folder_gets_a_hint(tmp_path):
    (tmp_path / "flowers.zip").write_bytes(b"PK\x03\x04")
    with pytest.raises(DataError, match="is an archive: extract it"):
        _prepare(tmp_path / "flowers.zip", tmp_path)
    for cls in ("rose", "tulip"):
        _pngs(tmp_path / "root" / "flowers" / cls, 3)
    with pytest.raises(DataError, match="is .*flowers the folder of class folders"):
        _prepare(tmp_path / "root", tmp_path)


@pytest.mark.parametrize(
    ("names", "given"),
    [(("trainval", "test"), "train,test"), (("train", "dev", "test"), "train,val,test"),
     (("trainset", "testset"), "train,test"), (("train_2", "test_2"), "train,test"),
     (("TRAINING-SET", "val_images"), "train,val")],
)  # fmt: skip
def test_more_split_folder_names_people_download(tmp_path, names, given):
    for name in names:
        for cls in ("cats", "dogs"):
            _pngs(tmp_path / "root" / name / cls, 4)
    splits = _prepare(tmp_path / "root", tmp_path)
    assert splits.class_names == ["cats", "dogs"] and splits.info["splits_given"] == given


def test_a_split_folder_beside_one_of_another_name_with_the_same_classes_is_an_error(tmp_path):
    """train/ and eval/ (or 'train copy'/) with the same class folders: never a two-class "which folder" model."""
    for name in ("train", "eval"):
        for cls in ("cats", "dogs"):
            _pngs(tmp_path / "root" / name / cls, 4)
    with pytest.raises(
        DataError, match=re.escape("holds split folders (train) and eval, with the same class folders")
    ):
        _prepare(tmp_path / "root", tmp_path)


def test_an_nfc_and_an_nfd_class_folder_in_one_split_match_the_other_split(tmp_path):
    for name in ("caf\u00e9", unicodedata.normalize("NFD", "caf\u00e9"), "dog"):
        _pngs(tmp_path / "root" / "train" / name, 4)
    for name in ("caf\u00e9", "dog"):
        _pngs(tmp_path / "root" / "test" / name, 2)
    splits = _prepare(tmp_path / "root", tmp_path)
    assert splits.class_names == ["caf\u00e9", "dog"] and len(splits.y_test) == 4


def test_a_split_too_large_to_keep_every_class_loses_as_few_classes_as_it_can():
    """2 images of each of 50 classes, 51% held out: one class must leave training, not a dozen (a random split)."""
    y = np.repeat(np.arange(50), 2)
    for seed in range(5):
        x_a, y_a, x_b, y_b = data._split(np.arange(100), y, 0.51, seed)
        assert sorted(np.concatenate([x_a, x_b]).tolist()) == list(range(100)) and len(y_b) == 51
        assert len(set(y_a.tolist())) == 49


def test_classes_left_without_a_training_image_are_named_before_decoding(tmp_path):
    """Not a false "has no readable images" after decoding every file: the cause, and the options that help."""
    _pngs(tmp_path / "root" / "big", 3)
    for c in range(12):
        _pngs(tmp_path / "root" / f"c{c:02d}", 1)
    with pytest.raises(DataError, match="have no training image left after the test and validation splits"):
        _prepare(tmp_path / "root", tmp_path)


def test_every_command_checks_its_data_paths_before_it_starts_anything(tmp_path, pipeline_home):
    """sweep, proxy-experiment, transfer-experiment and evaluate opened runs (and Prefect) on a missing archive or
    folder, printed dozens of traceback lines, and transfer-experiment split thousands of images first."""
    from click.testing import CliRunner
    from mlflow.tracking import MlflowClient

    from tests.conftest import CIFAR_CUT
    from vit_pipeline.cli import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    missing = str(tmp_path / "nope.tar.gz")
    (tmp_path / "model.keras").write_text("not a model")
    import zipfile

    # A zip, not a Keras archive: a traceback inside a run.
    with zipfile.ZipFile(tmp_path / "zip.keras", "w") as z:
        z.writestr("notes.txt", "hello")
    (tmp_path / "afile").write_text("a file where a report folder goes")
    space = tmp_path / "space.yaml"
    space.write_text("preset: cifar100\nnum_trials: 1\nfixed:\n  epochs: 1\nparameters:\n  seed: [1, 2]\n")
    work = tmp_path / "work"
    cases = [
        (["sweep", str(space), "--data-path", missing], "nope.tar.gz"),
        (["proxy-experiment", "--data-path", missing, "--epochs", "1"], "nope.tar.gz"),
        (["proxy-experiment", "--data-path", str(CIFAR_CUT), "--report-dir", str(tmp_path / "afile")],
         "is a file, not a folder"),  # found after the training
        (["transfer-experiment", "--data-path", str(CIFAR_CUT), "--report-dir", str(tmp_path / "afile" / "x")],
         "is a file, not a folder"),
        (["transfer-experiment", "--data-path", missing], "nope.tar.gz"),
        (["transfer-experiment", "--data-path", str(CIFAR_CUT), "--target-folder", str(tmp_path / "none"),
          "--work-dir", str(work)], "none"),
        (["evaluate", str(tmp_path / "model.keras")], "Expected a Keras model file (.keras"),
        (["evaluate", str(tmp_path / "zip.keras")], "Expected a Keras model file (.keras"),
        (["evaluate", str(tmp_path / "model.keras"), "--dataset", "cifar100", "--data-path", missing], "Expected a Keras"),
    ]  # fmt: skip
    for args, says in cases:
        result = CliRunner().invoke(main, [*args, "--tracking-uri", uri])
        errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert result.exit_code != 0 and len(errors) == 1 and says in errors[0], (args, result.output[-2000:])
        assert "Traceback" not in result.output and "temporary server" not in result.output.lower()
    assert not work.exists() or not any(work.rglob("*.png"))
    if (tmp_path / "mlflow.db").exists():
        client = MlflowClient(tracking_uri=uri)
        assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []
