"""Dataset preparation against a local HTTP server (127.0.0.1, a thread) serving small fake archives."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import threading
import zipfile
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import dataset_trees as trees
from clipadapt import prepare
from clipadapt.data import build_dataset
from clipadapt.data.benchmarks import Sizes, dataset_config
from clipadapt.prepare import (
    RECIPES, ManualStep, PrepareError, Recipe, Remote, direct_url, json_content_sha256, prepare_dataset,
)

MINI = Sizes(3, 9, 6, 6)  # the miniature trees: 3 classes, 3 / 2 / 2 images per class


class Server:
    """Serves `files`; honours Range; can drop a transfer half-way once, ignore Range, or answer with a web page."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.cut_once: dict[str, int] = {}  # path -> bytes sent before the connection drops (first request only)
        self.ignore_range: set[str] = set()
        self.html: set[str] = set()
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                server.requests.append((self.path, self.headers.get("Range")))
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start, status = 0, 200
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if match and self.path not in server.ignore_range:
                    start, status = int(match.group(1)), 206
                    if start >= len(data):
                        self.send_error(416)
                        return
                body = data[start:]
                self.send_response(status)
                self.send_header("Content-Type", "text/html" if self.path in server.html else "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                cut = server.cut_once.pop(self.path, None)
                self.wfile.write(body if cut is None else body[:cut])

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def serve(self, path: str, data: bytes) -> str:
        self.files[path] = data
        return self.url + path


@pytest.fixture
def server():
    served = Server()
    yield served
    served.httpd.shutdown()
    served.httpd.server_close()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def fake_eurosat(tmp_path: Path) -> tuple[bytes, bytes]:
    """EuroSAT.zip (2750/<class>/<image>.jpg) and its split file, from a miniature tree."""
    source = tmp_path / "source"
    split = trees.split_tree(source, "eurosat")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted((source / "eurosat" / "2750").rglob("*.jpg")):
            zf.write(path, str(path.relative_to(source / "eurosat")))
    return archive.getvalue(), json.dumps(split, indent=4).encode()


def eurosat_setup(tmp_path: Path, server: Server, archive_md5: str | None = None):
    archive, split = fake_eurosat(tmp_path)
    url = server.serve("/EuroSAT.zip", archive)
    cfg = dataset_config("eurosat")
    cfg.split_url = server.serve("/split_zhou_EuroSAT.json", split)
    recipe = Recipe("eurosat", (Remote("EuroSAT.zip", (url,), md5=archive_md5 or md5(archive), unpack=(("2750", "2750"),)),),
                    "1 KB", expected=MINI, split_content_sha256=hashlib.sha256(
                        json.dumps(json.loads(split), separators=(",", ":")).encode()).hexdigest())
    return recipe, cfg, archive


def test_good_download_is_laid_out_verified_and_not_fetched_again(tmp_path, server):
    recipe, cfg, _ = eurosat_setup(tmp_path, server)
    data = tmp_path / "data"
    status = prepare_dataset(recipe, cfg, data, progress=False)
    assert status.state == "ready" and status.sizes == MINI
    folder = data / "eurosat"
    assert (folder / "split_zhou_EuroSAT.json").is_file() and (folder / "2750" / "Forest").is_dir()
    assert not (folder / "EuroSAT.zip").exists() and not list(folder.glob(".unpack-*"))  # archive and scratch removed
    assert json.loads((folder / ".clipadapt" / "prepared.json").read_text())["sizes"] == vars(MINI)
    dataset = build_dataset(cfg, data)
    dataset.check_images_exist()
    assert dataset.classnames == ["Annual Crop Land", "Forest", "Sea or Lake"]

    fetched = len(server.requests)
    assert prepare_dataset(recipe, cfg, data, progress=False).state == "ready"
    (folder / ".clipadapt" / "prepared.json").unlink()  # a laid-out dataset without the marker is recognised
    assert prepare_dataset(recipe, cfg, data, progress=False).state == "ready"
    assert len(server.requests) == fetched  # nothing fetched again


def test_checksum_mismatch_is_an_error_and_keeps_nothing(tmp_path, server):
    recipe, cfg, _ = eurosat_setup(tmp_path, server, archive_md5="0" * 32)
    with pytest.raises(PrepareError, match=r"eurosat: EuroSAT\.zip from http://127\.0\.0\.1:\d+/EuroSAT\.zip failed verification "
                                           r"\(its md5 is [0-9a-f]{32}, the published one 0{32}\); the download was deleted"):
        prepare_dataset(recipe, cfg, tmp_path / "data", progress=False)
    folder = tmp_path / "data" / "eurosat"
    assert not (folder / "EuroSAT.zip").exists() and not (folder / "EuroSAT.zip.part").exists()
    assert not (folder / ".clipadapt" / "prepared.json").exists()


def test_an_interrupted_transfer_resumes(tmp_path, server):
    recipe, cfg, archive = eurosat_setup(tmp_path, server)
    half = len(archive) // 2
    server.cut_once["/EuroSAT.zip"] = half
    data = tmp_path / "data"
    resume = r"interrupted .* kept in .*EuroSAT\.zip\.part: run `python -m clipadapt\.prepare eurosat` again to resume"
    with pytest.raises(PrepareError, match=resume):
        prepare_dataset(recipe, cfg, data, retries=0, progress=False)
    assert (data / "eurosat" / "EuroSAT.zip.part").stat().st_size == half

    assert prepare_dataset(recipe, cfg, data, retries=0, progress=False).state == "ready"
    assert server.requests[-1] == ("/EuroSAT.zip", f"bytes={half}-")  # asked only for the rest


def test_a_dropped_connection_is_resumed_within_one_call(tmp_path, server):
    recipe, cfg, archive = eurosat_setup(tmp_path, server)
    server.cut_once["/EuroSAT.zip"] = 1000
    assert prepare_dataset(recipe, cfg, tmp_path / "data", retries=1, progress=False).state == "ready"
    assert [r for r in server.requests if r[0] == "/EuroSAT.zip"] == [("/EuroSAT.zip", None), ("/EuroSAT.zip", "bytes=1000-")]


def test_a_server_that_ignores_range_is_fetched_from_the_start(tmp_path, server):
    recipe, cfg, _ = eurosat_setup(tmp_path, server)
    server.ignore_range.add("/EuroSAT.zip")
    folder = tmp_path / "data" / "eurosat"
    folder.mkdir(parents=True)
    (folder / "EuroSAT.zip.part").write_bytes(b"stale bytes")
    assert prepare_dataset(recipe, cfg, tmp_path / "data", progress=False).state == "ready"  # the md5 held


def test_404_names_the_dataset_and_the_manual_route(tmp_path, server):
    recipe, cfg, _ = eurosat_setup(tmp_path, server)
    dead = replace(recipe.remotes[0], urls=(server.url + "/gone/EuroSAT.zip",))
    with pytest.raises(PrepareError) as error:
        prepare_dataset(replace(recipe, remotes=(dead,)), cfg, tmp_path / "data", progress=False)
    message = str(error.value)
    assert message.startswith("eurosat: could not download EuroSAT.zip (") and "gone/EuroSAT.zip: HTTP 404 Not Found" in message
    assert f"put it at {tmp_path / 'data' / 'eurosat' / 'EuroSAT.zip'}" in message
    assert "`python -m clipadapt.prepare eurosat` again" in message

    mirrored = replace(recipe.remotes[0], urls=(server.url + "/gone/EuroSAT.zip", recipe.remotes[0].urls[0]))
    assert prepare_dataset(replace(recipe, remotes=(mirrored,)), cfg, tmp_path / "data", progress=False).state == "ready"


def test_a_web_page_instead_of_the_file_is_refused(tmp_path, server):
    recipe, cfg, _ = eurosat_setup(tmp_path, server)
    server.html.add("/split_zhou_EuroSAT.json")
    with pytest.raises(PrepareError, match="sent a web page instead of the file"):
        prepare_dataset(recipe, cfg, tmp_path / "data", progress=False)
    assert not (tmp_path / "data" / "eurosat" / "split_zhou_EuroSAT.json").exists()


def test_a_split_file_with_other_sizes_is_refused(tmp_path, server):
    recipe, cfg, _ = eurosat_setup(tmp_path, server)
    sizes = r"has 3 classes, 9 / 6 / 6 train/val/test, protocol\.md says 10 classes, 13,500 / 5,400 / 8,100"
    with pytest.raises(PrepareError, match=sizes):
        prepare_dataset(replace(recipe, expected=None, split_content_sha256=None), cfg, tmp_path / "data", progress=False)


def cars_archive(tmp_path: Path) -> tuple[bytes, bytes]:
    """cars_train.tgz / a split file for a miniature Stanford Cars whose images all sit in cars_train/."""
    source = tmp_path / "cars"
    split = trees.split_tree(source, "stanford_cars")
    for item in split["test"]:  # keep one archive: move the test images into cars_train too
        item[0] = item[0].replace("cars_test/", "cars_train/9")
        trees.image(source / "stanford_cars" / item[0], 1)
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tf:
        tf.add(source / "stanford_cars" / "cars_train", arcname="cars_train")
    return archive.getvalue(), json.dumps(split).encode()


def test_a_manual_route_is_printed_then_what_was_placed_is_validated(tmp_path, server):
    archive, split = cars_archive(tmp_path)
    cfg = dataset_config("stanford_cars")
    cfg.split_url = server.serve("/split_zhou_StanfordCars.json", split)
    recipe = Recipe("stanford_cars", (Remote("cars_train.tgz", md5=md5(archive), unpack=(("cars_train", "cars_train"),)),),
                    "1 KB", manual=prepare.STANFORD_CARS_MANUAL, expected=MINI)
    data = tmp_path / "data"
    folder = data / "stanford_cars"
    with pytest.raises(ManualStep) as step:
        prepare_dataset(recipe, cfg, data, progress=False)
    assert str(step.value).startswith(prepare.STANFORD_CARS_MANUAL.format(folder=folder))
    assert "Now: stanford_cars: 21 listed images are missing" in str(step.value)

    (folder / "cars_train.tgz").write_bytes(archive[:-1] + b"x")  # a damaged copy: refused, and left alone
    with pytest.raises(PrepareError, match=r"cars_train\.tgz is not the expected file: its md5 is"):
        prepare_dataset(recipe, cfg, data, progress=False)
    assert (folder / "cars_train.tgz").exists()

    (folder / "cars_train.tgz").write_bytes(archive)
    assert prepare_dataset(recipe, cfg, data, progress=False).state == "ready"
    assert (folder / "cars_train.tgz").exists()  # a person's file is never deleted
    build_dataset(cfg, data).check_images_exist()


def test_check_reports_ready_missing_and_incomplete(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    trees.build(data, "eurosat")
    trees.build(data, "fgvc_aircraft")
    monkeypatch.setitem(RECIPES, "eurosat", replace(RECIPES["eurosat"], expected=MINI, split_content_sha256=None))
    assert prepare.main(["--check", "eurosat", "fgvc_aircraft", "dtd", "--data-root", str(data)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["eurosat", "ready", "3", "classes,", "9", "/", "6", "/", "6", "train/val/test"]
    assert lines[1].startswith("fgvc_aircraft    incomplete  3 classes, 9 / 6 / 6 train/val/test, "
                               "protocol.md says 100 classes, 3,334 / 3,333 / 3,333")
    assert lines[2] == "dtd              missing     not downloaded: run `python -m clipadapt.prepare dtd`"
    assert lines[3] == f"1 of 3 ready under {data.resolve()}"

    (data / "eurosat" / "2750" / "Forest" / "Forest_4.jpg").unlink()
    assert prepare.main(["--check", "eurosat", "--data-root", str(data)]) == 1
    assert "eurosat          incomplete  eurosat: 1 listed images are missing" in capsys.readouterr().out


def test_the_cli_prepares_and_reports_failures(tmp_path, server, monkeypatch, capsys):
    recipe, cfg, _ = eurosat_setup(tmp_path, server)
    monkeypatch.setitem(RECIPES, "eurosat", recipe)
    monkeypatch.setattr(prepare, "dataset_config", lambda name: cfg if name == "eurosat" else dataset_config(name))
    assert prepare.main(["eurosat", "--data-root", str(tmp_path / "data")]) == 0
    assert "eurosat: ready (3 classes, 9 / 6 / 6 train/val/test)" in capsys.readouterr().out
    cars = dataset_config("stanford_cars")
    cars.split_url = server.url + "/missing.json"
    monkeypatch.setattr(prepare, "dataset_config", lambda name: {"eurosat": cfg, "stanford_cars": cars}[name])
    assert prepare.main(["stanford_cars", "eurosat", "--data-root", str(tmp_path / "data")]) == 1
    out = capsys.readouterr()
    assert "error: stanford_cars: could not download split_zhou_StanfordCars.json" in out.err
    assert out.err.endswith("not prepared: stanford_cars\n") and "eurosat: ready (prepared before" in out.out


def test_the_recipe_table():
    configs = {p.stem for p in (Path(prepare.__file__).parents[2] / "conf" / "dataset").glob("*.yaml")}
    assert set(RECIPES) == configs - {"synthetic", "folder", "features"}
    unverified = set()
    for recipe in RECIPES.values():
        for remote in recipe.remotes:
            assert remote.md5 is None or re.fullmatch(r"[0-9a-f]{32}", remote.md5)
            assert remote.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", remote.sha256)
            if not (remote.md5 or remote.sha256 or remote.content_sha256):
                unverified.add(f"{recipe.id}/{remote.filename}")
            if not remote.urls:  # by hand: the manual route names the file
                assert recipe.manual and remote.filename in recipe.manual
    # the sources with no published checksum (their contents are checked by counting images after unpacking)
    assert unverified == {"ucf101/UCF-101-midframes.zip", "imagenet_v2/imagenetv2-matched-frequency.tar.gz",
                          "imagenet_sketch/ImageNet-Sketch.zip"}
    drive = "https://drive.google.com/file/d/1Ip7yaCWFi0eaOFUGga0lUdVi_DDQth1o/view"
    assert direct_url(drive) == "https://drive.usercontent.google.com/download?id=1Ip7yaCWFi0eaOFUGga0lUdVi_DDQth1o&export=download&confirm=t"
    assert direct_url("https://example.org/a.zip") == "https://example.org/a.zip"


def test_reference_hashes_match_the_shared_split_files(tmp_path, shared_splits):
    for name, file in {"eurosat": "split_zhou_EuroSAT.json", "caltech101": "split_zhou_Caltech101.json",
                       "oxford_pets": "split_zhou_OxfordPets.json", "stanford_cars": "split_zhou_StanfordCars.json",
                       "oxford_flowers": "split_zhou_OxfordFlowers.json", "dtd": "split_zhou_DescribableTextures.json",
                       "ucf101": "split_zhou_UCF101.json"}.items():
        assert json_content_sha256(shared_splits / file) == RECIPES[name].split_content_sha256, name
    cat_to_name = next(r for r in RECIPES["oxford_flowers"].remotes if r.filename == "cat_to_name.json")
    assert json_content_sha256(shared_splits / "cat_to_name.json") == cat_to_name.content_sha256
    compact = tmp_path / "compact.json"  # the content hash ignores layout: a re-serialised copy hashes the same
    compact.write_text(json.dumps(json.loads((shared_splits / "split_zhou_DescribableTextures.json").read_text())))
    assert json_content_sha256(compact) == RECIPES["dtd"].split_content_sha256


def tar_of(members: dict[str, bytes], mode: str = "w") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_imagenet_official_archives_are_checked_and_unpacked(tmp_path, server, monkeypatch):
    """The by-hand route with ILSVRC-2012's archive formats (per-class train tars, flat val images sorted by the
    devkit's ground truth), in miniature; torchvision's parsers see the miniatures' MD5s."""
    import numpy as np
    import scipy.io
    from PIL import Image

    from clipadapt._compat import ensure_torchvision

    ensure_torchvision()
    import torchvision.datasets.imagenet as tv_imagenet

    wnids = sorted(trees.WNIDS)
    jpeg = io.BytesIO()
    Image.new("RGB", (16, 16)).save(jpeg, format="JPEG")
    train = tar_of({f"{w}.tar": tar_of({f"{w}_{n}.JPEG": jpeg.getvalue() for n in range(2)}) for w in wnids})
    val_labels = [3, 1, 6, 2, 5, 4, 1, 2, 3, 4, 5, 6]  # 1-based ILSVRC2012_ID of each val image, two per class
    val = tar_of({f"ILSVRC2012_val_{k:08d}.JPEG": jpeg.getvalue() for k in range(1, len(val_labels) + 1)})
    mat = io.BytesIO()
    synsets = np.array([(i + 1, w, trees.WNIDS[w], "", 0) for i, w in enumerate(wnids)],
                       dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"), ("num_children", "O")])
    scipy.io.savemat(mat, {"synsets": synsets})
    ground_truth = "".join(f"{i}\n" for i in val_labels).encode()
    devkit = tar_of({"ILSVRC2012_devkit_t12/data/meta.mat": mat.getvalue(),
                     "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt": ground_truth}, mode="w:gz")
    archives = {"ILSVRC2012_img_train.tar": train, "ILSVRC2012_img_val.tar": val, "ILSVRC2012_devkit_t12.tar.gz": devkit}
    monkeypatch.setattr(tv_imagenet, "ARCHIVE_META", {key: (name, md5(archives[name])) for key, name in
                                                       [("train", "ILSVRC2012_img_train.tar"), ("val", "ILSVRC2012_img_val.tar"),
                                                        ("devkit", "ILSVRC2012_devkit_t12.tar.gz")]})
    cfg = dataset_config("imagenet")
    classnames = tmp_path / "classnames.txt"
    trees.classnames_txt(classnames)
    cfg.split_url = server.serve("/classnames.txt", classnames.read_bytes())
    recipe = replace(RECIPES["imagenet"], expected=Sizes(6, 12, 0, 12))
    monkeypatch.setattr(prepare, "_check_classnames", lambda path: None)  # the miniature lists 6 classes, not 1000
    data = tmp_path / "data"
    with pytest.raises(ManualStep, match="licence-gated"):
        prepare_dataset(recipe, cfg, data, progress=False)
    for name, content in archives.items():
        (data / "imagenet" / name).write_bytes(content)
    assert prepare_dataset(recipe, cfg, data, progress=False).state == "ready"
    dataset = build_dataset(cfg, data)
    assert [i.label for i in dataset.test] == sorted(label - 1 for label in val_labels)
    assert dataset.test[0].path == "val/n01440764/ILSVRC2012_val_00000002.JPEG"  # ground truth 1 -> wnids[0]
    assert all((data / "imagenet" / name).is_file() for name in archives)  # a person's files stay


def test_an_unknown_dataset_is_one_line_naming_the_closest(capsys):
    with pytest.raises(SystemExit) as end:
        prepare.main(["eurosatt", "dtd"])
    assert end.value.code == 2
    line = capsys.readouterr().err
    assert line.startswith("error: unknown dataset 'eurosatt' (did you mean eurosat?): use `all` or some of eurosat, ")
    assert line.count("\n") == 1
