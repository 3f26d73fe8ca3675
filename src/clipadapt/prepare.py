"""`python -m clipadapt.prepare <ids|all>`: download, verify and lay out the benchmark datasets in CoOp's layout.

    python -m clipadapt.prepare eurosat dtd        # or `all`; --data-root DIR (default: $CLIPADAPT_DATA or ./data)
    python -m clipadapt.prepare --check            # per dataset: ready / missing / incomplete, counts vs protocol.md

Per dataset: the split file (or class list) comes from the link in CoOp's DATASETS.md (the `split_url` of its
config), the images from the official source (or a mirror where the original host is gone, listed in order). Every
file is checked against its published size / checksum where one is known (RECIPES below says which), split files
against protocol.md's sizes and the content hash of a reference copy; archives are unpacked beside the data and
only their CoOp-layout members are moved into place. Then the dataset is read exactly as a run reads it, and every
listed image must be on disk, before it is marked prepared.

Idempotent and resumable: a prepared dataset is not fetched again (nor is one already laid out by hand: it is
recognised and marked); an interrupted download continues from where it stopped (HTTP Range), a half-unpacked
archive is unpacked again. Where a file cannot be fetched automatically (ImageNet's licence, Stanford Cars' dead
host, or any download that fails) the error says exactly what to put where; the next run validates it.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from filelock import FileLock
from omegaconf import DictConfig

from clipadapt.config import closest
from clipadapt.data import DatasetError, build_dataset, read_split_file
from clipadapt.data.benchmarks import PROTOCOL_SIZES, Sizes, dataset_config, read_classnames, sizes_of
from clipadapt.data.registry import dataset_root
from clipadapt.files import write_json_atomic

USER_AGENT = "clipadapt-prepare (+https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md)"
CHUNK = 1 << 20
STATE = ".clipadapt"  # per dataset folder: prepared.json and per-archive progress markers


class PrepareError(RuntimeError):
    """A dataset could not be prepared; the message names it and says what to do."""


class ManualStep(PrepareError):
    """Files a person must fetch (a licence, a dead host): the message is the exact route."""


@dataclass(frozen=True)
class Remote:
    """One file to fetch into the dataset folder (also where a hand-fetched copy goes)."""

    filename: str
    urls: tuple[str, ...] = ()  # tried in order; none: a person must fetch it (see Recipe.manual)
    md5: str | None = None
    sha256: str | None = None
    size: int | None = None  # bytes, where published
    content_sha256: str | None = None  # JSON: hash of the parsed content (independent of whitespace)
    unpack: tuple[tuple[str, str], ...] = ()  # archive: (member in the archive, destination in the folder)
    inner: str | None = None  # an archive inside the archive, unpacked too (Caltech's zip holds a .tar.gz)
    check: Callable[[Path], None] | None = None  # raises PrepareError when the fetched file is not usable

    @property
    def is_archive(self) -> bool:
        return bool(self.unpack)


@dataclass(frozen=True)
class Recipe:
    id: str
    remotes: tuple[Remote, ...]
    download: str  # for people: about how much `prepare` downloads
    manual: str = ""  # the route a person takes when a file has no URL; {folder} is filled in
    split_content_sha256: str | None = None  # the split file's content hash, where a reference copy was at hand
    expected: Sizes | None = None  # default: PROTOCOL_SIZES[id]
    unpack: Callable[["Recipe", Path], None] | None = None  # replaces the generic unpacking (ImageNet)


def drive(file_id: str) -> str:
    return f"https://drive.google.com/file/d/{file_id}/view"


def direct_url(url: str) -> str:
    """A Google Drive share link -> its direct download (confirm=t skips the large-file warning page)."""
    match = re.match(r"https://drive\.google\.com/file/d/([^/?#]+)", url)
    return f"https://drive.usercontent.google.com/download?id={match.group(1)}&export=download&confirm=t" if match else url


def _imagenet_unpack(recipe: Recipe, folder: Path) -> None:
    """ILSVRC-2012's official archives, placed by hand -> images/train/<wnid>/ and images/val/<wnid>/.

    torchvision's parsers do the work (they check the archives' MD5s, unpack the 1,000 per-class train tars and sort
    the val images into class folders with the devkit's ground truth); each split is built under a temporary name.
    """
    images = folder / "images"
    todo = [split for split in ("train", "val") if not (images / split).is_dir()]
    archives = {"train": ["ILSVRC2012_img_train.tar"], "val": ["ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz"]}
    missing = [name for split in todo for name in archives[split] if not (folder / name).is_file()]
    if missing:
        raise ManualStep(recipe.manual.format(folder=folder))
    from clipadapt._compat import ensure_torchvision

    ensure_torchvision()
    from torchvision.datasets.imagenet import parse_devkit_archive, parse_train_archive, parse_val_archive

    for split in todo:
        partial = images / f".{split}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        print(f"imagenet: unpacking {archives[split][0]} (checks its MD5 first; this takes a while)", flush=True)
        if split == "train":
            parse_train_archive(folder, folder=str(partial.relative_to(folder)))
        else:
            parse_devkit_archive(folder)
            parse_val_archive(folder, folder=str(partial.relative_to(folder)))
            (folder / "meta.bin").unlink(missing_ok=True)
        partial.rename(images / split)


def _check_classnames(path: Path) -> None:
    try:
        count = len(read_classnames(path))
    except DatasetError as error:
        raise PrepareError(str(error)) from error
    if count != 1000:
        raise PrepareError(f"{path.name} lists {count} classes, not ImageNet's 1000")


CLASSNAMES_URL = drive("1-61f_ol79pViBFDG_IDlUQSwoLcn2XXF")  # CoOp's ImageNet classnames.txt
HF = "https://huggingface.co/datasets"

IMAGENET_MANUAL = """\
imagenet: ImageNet (ILSVRC-2012) is licence-gated, so it cannot be downloaded for you.
  1. Sign in at https://image-net.org/download-images.php and accept the terms of access.
  2. Either put the three official archives into {folder}/ and run `python -m clipadapt.prepare imagenet` again
     (their MD5s are checked, then they are unpacked into images/train/<wnid>/ and images/val/<wnid>/):
       ILSVRC2012_img_train.tar        138 GB   md5 1d675b47d978889d74fa0da5fadfb00e
       ILSVRC2012_img_val.tar          6.3 GB   md5 29b22e2961454d5413ddabcf34fc5622
       ILSVRC2012_devkit_t12.tar.gz    2.5 MB   md5 fa75699e90414af021442c21a62c3abf
  3. or, if you have ImageNet unpacked already (train and val both in <wnid>/ class folders), link it:
       mkdir -p {folder}/images
       ln -s /path/to/imagenet/train {folder}/images/train
       ln -s /path/to/imagenet/val {folder}/images/val
     and run `python -m clipadapt.prepare imagenet` again to validate it.
  classnames.txt is downloaded for you."""

STANFORD_CARS_MANUAL = """\
stanford_cars: the original host (ai.stanford.edu/~jkrause/cars) is gone, so Stanford Cars cannot be downloaded for you.
  1. Get the original archives from a mirror you trust and put them into {folder}/:
       cars_train.tgz   md5 065e5b463ae28d29e77c1b4b166cfe61   (8,144 images)
       cars_test.tgz    md5 4ce7ebf6a94d07f1952d94dd34c4d501   (8,041 images)
     then run `python -m clipadapt.prepare stanford_cars` again (the MD5s are checked, the archives unpacked);
  2. or put the unpacked images there: {folder}/cars_train/00001.jpg ... 08144.jpg and
     {folder}/cars_test/00001.jpg ... 08041.jpg (the Kaggle copy "jessicali9530/stanford-cars-dataset" nests them
     one level deeper, in cars_train/cars_train/ and cars_test/cars_test/: move them up), and run it again to validate.
  The split file is downloaded for you."""

# What `prepare` fetches. Checksums: torchvision's dataset classes (EuroSAT, Caltech101, OxfordIIITPet, Flowers102,
# Food101, SUN397, DTD, ImageNet, and the former StanfordCars), torch-uncertainty's ImageNet-A/R classes, and a
# published SHA-256 and size of FGVC-Aircraft 2013b. Split-file content hashes: the copies of CoOp's split files in
# linzhiqiu/cross_modal_adaptation (those for Food101 and SUN397 were not at hand: only their sizes are checked).
# No published checksum for UCF101's mid-frames, ImageNet-V2 and ImageNet-Sketch: their image counts are checked.
RECIPES: dict[str, Recipe] = {recipe.id: recipe for recipe in [
    Recipe("eurosat", (
        Remote("EuroSAT.zip", (f"{HF}/torchgeo/eurosat/resolve/c877bcd43f099cd0196738f714544e355477f3fd/EuroSAT.zip",
                               "https://madm.dfki.de/files/sentinel/EuroSAT.zip"),
               md5="c8fa014336c82ac7804f0398fcb19387", unpack=(("2750", "2750"),)),
    ), "90 MB", split_content_sha256="7f5d4f79bba4f67d1ed4bc0b5fbafab565564c6ff8205b82d893897db0d8015b"),
    Recipe("caltech101", (
        Remote("caltech-101.zip", ("https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip",),
               md5="3138e1922a9193bfa496528edbbc45d0", inner="caltech-101/101_ObjectCategories.tar.gz",
               unpack=(("101_ObjectCategories", "101_ObjectCategories"),)),
    ), "140 MB", split_content_sha256="cb0e193bd69a6f898a6e0263e84960d3e6e4f33fd394803eab6f98cb1474c9e8"),
    Recipe("oxford_pets", (
        Remote("images.tar.gz", ("https://www.robots.ox.ac.uk/~vgg/data/pets/data/images.tar.gz",),
               md5="5c4f3ee8e5d25df40f4fd59a7f44e54c", unpack=(("images", "images"),)),
        Remote("annotations.tar.gz", ("https://www.robots.ox.ac.uk/~vgg/data/pets/data/annotations.tar.gz",),
               md5="95a8c909bbe2e81eed6a22bccdf3f68f", unpack=(("annotations", "annotations"),)),
    ), "800 MB", split_content_sha256="b1f67d4b99e64eae950bdad05b97623ba46e04e981ccc7d72691715916640dda"),
    Recipe("stanford_cars", (
        Remote("cars_train.tgz", md5="065e5b463ae28d29e77c1b4b166cfe61", unpack=(("cars_train", "cars_train"),)),
        Remote("cars_test.tgz", md5="4ce7ebf6a94d07f1952d94dd34c4d501", unpack=(("cars_test", "cars_test"),)),
    ), "1.9 GB", manual=STANFORD_CARS_MANUAL,
        split_content_sha256="dfe736f7b93100d1a65a4001d65e52d386a6ec090eebaf124353eab77a737fca"),
    Recipe("oxford_flowers", (
        Remote("102flowers.tgz", ("https://www.robots.ox.ac.uk/~vgg/data/flowers/102/102flowers.tgz",),
               md5="52808999861908f626f3c1f4e79d11fa", unpack=(("jpg", "jpg"),)),
        Remote("imagelabels.mat", ("https://www.robots.ox.ac.uk/~vgg/data/flowers/102/imagelabels.mat",),
               md5="e0620be6f572b9609742df49c70aed4d"),
        Remote("cat_to_name.json", (drive("1AkcxCXeK_RCGCEC_GvmWxjcjaNhu-at0"),),
               content_sha256="21072ea110ac9e3b874c33280d8e0fcc0f989bae3a2c261fea446ea87e583668"),
    ), "330 MB", split_content_sha256="3e0c54f6848d8f4413150006815dce589aefaed5fb7efaa6a3b6f66918146bcc"),
    Recipe("food101", (
        Remote("food-101.tar.gz", ("http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz",),
               md5="85eeb15f3717b99a5da872d97d918f87", unpack=(("food-101/images", "images"), ("food-101/meta", "meta"))),
    ), "5.0 GB"),
    Recipe("fgvc_aircraft", (
        Remote("fgvc-aircraft-2013b.tar.gz", ("https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz",),
               sha256="e4e323d410e29f0370c81eabdcbb0e2b813acea1de22891b70b58ff41bfc9834", size=2_753_340_328,
               unpack=tuple((f"fgvc-aircraft-2013b/data/{name}", name) for name in (
                   "images", "variants.txt", "images_variant_train.txt", "images_variant_val.txt", "images_variant_test.txt"))),
    ), "2.8 GB"),
    Recipe("sun397", (
        Remote("SUN397.tar.gz", ("http://vision.princeton.edu/projects/2010/SUN/SUN397.tar.gz",),
               md5="8ca2778205c41d23104230ba66911c7a", unpack=(("SUN397", "SUN397"),)),
    ), "37 GB"),
    Recipe("dtd", (
        Remote("dtd-r1.0.1.tar.gz", ("https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz",),
               md5="fff73e5086ae6bdbea199a49dfb8a4c1",
               unpack=(("dtd/images", "images"), ("dtd/imdb", "imdb"), ("dtd/labels", "labels"))),
    ), "625 MB", split_content_sha256="038c759d32099a1f1df63bf97f664fe86d3af2a1e3d2f59a84c884257314bd18"),
    Recipe("ucf101", (
        Remote("UCF-101-midframes.zip", (drive("10Jqome3vtUA2keJkNanAiFpgbyC9Hc2O"),),
               unpack=(("UCF-101-midframes", "UCF-101-midframes"),)),
    ), "size unpublished: 13,320 frames",
        split_content_sha256="875b6350cc32a4912942a97b5ef3b45c2de6c52324cfc77c6f741a1edac421da"),
    Recipe("imagenet", (
        Remote("ILSVRC2012_img_train.tar", md5="1d675b47d978889d74fa0da5fadfb00e"),
        Remote("ILSVRC2012_img_val.tar", md5="29b22e2961454d5413ddabcf34fc5622"),
        Remote("ILSVRC2012_devkit_t12.tar.gz", md5="fa75699e90414af021442c21a62c3abf"),
    ), "145 GB", manual=IMAGENET_MANUAL, unpack=_imagenet_unpack),
    Recipe("imagenet_v2", (
        Remote("imagenetv2-matched-frequency.tar.gz", (
            f"{HF}/vaishaal/ImageNetV2/resolve/main/imagenetv2-matched-frequency.tar.gz",
            "https://s3-us-west-2.amazonaws.com/imagenetv2public/imagenetv2-matched-frequency.tar.gz"),
            unpack=(("imagenetv2-matched-frequency-format-val", "imagenetv2-matched-frequency-format-val"),)),
    ), "1.3 GB"),
    Recipe("imagenet_sketch", (
        Remote("ImageNet-Sketch.zip", (f"{HF}/songweig/imagenet_sketch/resolve/main/data/ImageNet-Sketch.zip",),
               unpack=(("sketch", "images"),)),
    ), "8.4 GB"),
    Recipe("imagenet_a", (
        Remote("imagenet-a.tar", ("https://people.eecs.berkeley.edu/~hendrycks/imagenet-a.tar",),
               md5="c3e55429088dc681f30d81f4726b6595", unpack=(("imagenet-a", "imagenet-a"),)),
    ), "690 MB"),
    Recipe("imagenet_r", (
        Remote("imagenet-r.tar", ("https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar",),
               md5="a61312130a589d0ca1a8fca1f2bd3337", unpack=(("imagenet-r", "imagenet-r"),)),
    ), "2.1 GB"),
]}


# ------------------------------------------------------------------------------------------------- verification


def json_content_sha256(path: Path) -> str:
    """The hash of a JSON file's parsed content: the same for any whitespace or indentation."""
    content = json.loads(path.read_text())
    return hashlib.sha256(json.dumps(content, separators=(",", ":"), ensure_ascii=False).encode()).hexdigest()


def _file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def mismatch(remote: Remote, path: Path) -> str | None:
    """Why `path` is not the published file, or None when every known size / checksum / check agrees."""
    size = path.stat().st_size
    if remote.size is not None and size != remote.size:
        return f"it has {size:,} bytes, the published file {remote.size:,}"
    for algorithm in ("md5", "sha256"):
        expected = getattr(remote, algorithm)
        if expected and (got := _file_digest(path, algorithm)) != expected:
            return f"its {algorithm} is {got}, the published one {expected}"
    if remote.content_sha256:
        try:
            got = json_content_sha256(path)
        except ValueError as error:
            return f"it is not JSON ({error})"
        if got != remote.content_sha256:
            return f"its content hash is {got}, the reference copy's {remote.content_sha256}"
    if remote.check is not None:
        try:
            remote.check(path)
        except (PrepareError, DatasetError, ValueError) as error:
            return str(error)
    return None


def _split_check(expected: Sizes) -> Callable[[Path], None]:
    def check(path: Path) -> None:
        split = read_split_file(path)
        classes = len({item.label for items in split.values() for item in items})
        got = Sizes(classes, len(split["train"]), len(split["val"]), len(split["test"]))
        if got != expected:
            raise PrepareError(f"{path.name} has {_sizes_text(got)}, protocol.md says {_sizes_text(expected)}")

    return check


def _sizes_text(sizes: Sizes) -> str:
    return f"{sizes.classes} classes, {sizes.train:,} / {sizes.val:,} / {sizes.test:,} train/val/test"


# ------------------------------------------------------------------------------------------------------ download


class _Interrupted(Exception):
    """The transfer stopped early; what arrived is kept in the .part file."""


def _total_of(response, offset: int) -> int | None:
    content_range = response.headers.get("Content-Range", "")
    if "/" in content_range and not content_range.endswith("/*"):
        return int(content_range.rsplit("/", 1)[1])
    length = response.headers.get("Content-Length")
    return offset + int(length) if length is not None else None


def _transfer(url: str, part: Path, name: str, progress: bool) -> None:
    """Fetch `url` into `part`, continuing after the bytes it already holds when the server honours Range."""
    from tqdm import tqdm

    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT, **({"Range": f"bytes={offset}-"} if offset else {})}
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:  # nothing past what we hold: the .part is complete (verified next)
            return
        raise
    with response:
        if offset and response.status != 206:  # the server ignored Range: start again from the first byte
            offset = 0
        content_type = response.headers.get("Content-Type", "")
        if content_type.startswith("text/html") and not name.endswith(".html"):
            raise urllib.error.URLError(
                "the server sent a web page instead of the file (Google Drive does when its download quota is "
                "exceeded or the file needs a sign-in)"
            )
        total = _total_of(response, offset)
        with open(part, "ab" if offset else "wb") as out, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=name,
            disable=not progress, mininterval=1.0, leave=False,
        ) as bar:
            try:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
            except (http.client.HTTPException, OSError) as error:
                raise _Interrupted(str(error) or type(error).__name__) from error
    if total is not None and part.stat().st_size < total:
        raise _Interrupted(f"{part.stat().st_size:,} of {total:,} bytes")


def _download(dataset: str, url: str, part: Path, name: str, retries: int, progress: bool) -> None:
    """Fetch into `part`; an interrupted transfer resumes (up to `retries` times here, or on the next run)."""
    for attempt in range(retries + 1):
        try:
            _transfer(direct_url(url), part, name, progress)
            return
        except _Interrupted as error:
            if attempt == retries:
                raise PrepareError(
                    f"{dataset}: the download of {name} was interrupted ({error}); what arrived is kept in {part}: "
                    f"run `python -m clipadapt.prepare {dataset}` again to resume"
                ) from error
            print(f"{dataset}: transfer interrupted ({error}); resuming", flush=True)
            time.sleep(min(2**attempt - 1, 10))  # at once, then back off


def fetch(dataset: str, remote: Remote, path: Path, retries: int = 3, progress: bool = True) -> None:
    """`path` holds the verified file afterwards: already there, placed by hand, or downloaded (resuming a .part)."""
    if path.is_file():
        problem = mismatch(remote, path)
        if problem is None:
            return
        raise PrepareError(f"{dataset}: {path} is not the expected file: {problem}. Delete or replace it, then run "
                           f"`python -m clipadapt.prepare {dataset}` again")
    if not remote.urls:
        raise ManualStep(f"{dataset}: {remote.filename} cannot be downloaded automatically: put it at {path}")
    part = path.with_name(path.name + ".part")
    failures = []
    for url in remote.urls:
        print(f"{dataset}: downloading {remote.filename} from {url}", flush=True)
        try:
            _download(dataset, url, part, remote.filename, retries, progress)
        except (urllib.error.URLError, OSError, ValueError) as error:  # this source does not serve it: try the next
            http = isinstance(error, urllib.error.HTTPError)
            failures.append(f"{url}: {f'HTTP {error.code} {error.reason}' if http else getattr(error, 'reason', error)}")
            continue
        problem = mismatch(remote, part)
        if problem is not None:
            part.unlink()
            raise PrepareError(
                f"{dataset}: {remote.filename} from {url} failed verification ({problem}); the download was deleted. "
                f"Run `python -m clipadapt.prepare {dataset}` again, or download it yourself and put it at {path}"
            )
        part.replace(path)
        return
    raise PrepareError(
        f"{dataset}: could not download {remote.filename} ({'; '.join(failures)}). Download it yourself from "
        f"{' or '.join(remote.urls)} and put it at {path}, then run `python -m clipadapt.prepare {dataset}` again"
    )


# -------------------------------------------------------------------------------------------------------- unpack


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _unpack_archive(archive: Path, into: Path) -> None:
    if zipfile.is_zipfile(archive):
        shutil.unpack_archive(archive, into, format="zip")
        return
    try:
        shutil.unpack_archive(archive, into, filter="data")  # tar: no absolute paths or links out of `into`
    except TypeError:  # a Python without tar extraction filters (before 3.10.12 / 3.11.4)
        shutil.unpack_archive(archive, into)


def unpack(dataset: str, remote: Remote, archive: Path, folder: Path) -> None:
    """Unpack into a scratch folder beside the data, then move the CoOp-layout members into place."""
    staging = folder / f".unpack-{remote.filename}"
    _remove(staging)
    print(f"{dataset}: unpacking {remote.filename}", flush=True)
    _unpack_archive(archive, staging)
    if remote.inner:
        _unpack_archive(staging / remote.inner, staging)
    for member, destination in remote.unpack:
        source, target = staging / member, folder / destination
        if not source.exists():
            raise PrepareError(f"{dataset}: {remote.filename} has no {member}: not the expected archive (delete it, run again)")
        _remove(target)  # a previous, interrupted unpacking
        source.rename(target)
    _remove(staging)


# ------------------------------------------------------------------------------------------------------- prepare


@dataclass
class Status:
    state: str  # ready | missing | incomplete
    detail: str
    sizes: Sizes | None = None


def inspect(recipe: Recipe, cfg: DictConfig, data_root: Path) -> Status:
    """Read the dataset as a run does: counts against protocol.md's, every listed image on disk."""
    expected = recipe.expected or PROTOCOL_SIZES[recipe.id]
    if not dataset_root(cfg, data_root).exists():
        return Status("missing", f"not downloaded: run `python -m clipadapt.prepare {recipe.id}`")
    try:
        dataset = build_dataset(cfg, data_root)
    except DatasetError as error:
        return Status("incomplete", str(error))
    sizes = sizes_of(dataset)
    if sizes != expected:
        return Status("incomplete", f"{_sizes_text(sizes)}, protocol.md says {_sizes_text(expected)}", sizes)
    split_path = dataset_root(cfg, data_root) / (cfg.split_file or "")
    if recipe.split_content_sha256 and split_path.is_file() and json_content_sha256(split_path) != recipe.split_content_sha256:
        return Status("incomplete", f"{split_path} differs from the reference copy of CoOp's split file: delete it, re-run", sizes)
    try:
        dataset.check_images_exist()
    except DatasetError as error:
        return Status("incomplete", str(error), sizes)
    return Status("ready", _sizes_text(sizes), sizes)


def _small_files(recipe: Recipe, cfg: DictConfig) -> list[Remote]:
    """The split file (or class list) from the dataset's config, and the recipe's other plain files."""
    files = [remote for remote in recipe.remotes if not remote.is_archive and remote.urls]
    if cfg.split_file and cfg.split_url:
        if cfg.split_file.endswith(".json"):
            check, content = _split_check(recipe.expected or PROTOCOL_SIZES[recipe.id]), recipe.split_content_sha256
        else:
            check, content = _check_classnames, None
        files.insert(0, Remote(cfg.split_file, (cfg.split_url,), content_sha256=content, check=check))
    return files


def _fetch_and_unpack(recipe: Recipe, folder: Path, status: Status, retries: int, progress: bool) -> None:
    for remote in (remote for remote in recipe.remotes if remote.is_archive):
        done = folder / STATE / f"{remote.filename}.unpacked"
        if done.exists():
            continue
        if not remote.urls and not (folder / remote.filename).is_file():
            raise ManualStep(recipe.manual.format(folder=folder) + f"\n  Now: {status.detail}")
        fetch(recipe.id, remote, folder / remote.filename, retries, progress)
        unpack(recipe.id, remote, folder / remote.filename, folder)
        done.touch()


def prepare_dataset(recipe: Recipe, cfg: DictConfig, data_root: Path, *, keep_archives: bool = False,
                    retries: int = 3, progress: bool = True) -> Status:
    """Fetch, verify, unpack and validate one dataset; a no-op when it is prepared already."""
    folder = dataset_root(cfg, data_root)
    marker = folder / STATE / "prepared.json"
    if marker.is_file():
        return Status("ready", "prepared before (`--check` re-validates it)")
    (folder / STATE).mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / STATE / "lock")):
        for remote in _small_files(recipe, cfg):
            fetch(recipe.id, remote, folder / remote.filename, retries, progress)
        status = inspect(recipe, cfg, data_root)
        if status.state != "ready":  # else: laid out already (by hand, or by an earlier run): just validated
            if not recipe.manual:
                print(f"{recipe.id}: fetching the images ({recipe.download}) into {folder}", flush=True)
            if recipe.unpack is not None:
                recipe.unpack(recipe, folder)
            else:
                _fetch_and_unpack(recipe, folder, status, retries, progress)
            status = inspect(recipe, cfg, data_root)
            if status.state != "ready":
                raise PrepareError(f"{recipe.id}: {status.detail}")
        write_json_atomic(marker, {"dataset": recipe.id, "sizes": vars(status.sizes),
                                    "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
        for remote in recipe.remotes:
            if remote.is_archive and remote.urls and not keep_archives:
                (folder / remote.filename).unlink(missing_ok=True)  # what we downloaded; a person's files stay
    return status


# ----------------------------------------------------------------------------------------------------------- CLI


def default_data_root() -> Path:
    """The runs' paths.data_root: $CLIPADAPT_DATA, else $CLIPADAPT_HOME/data, else ./data."""
    if "CLIPADAPT_DATA" in os.environ:
        return Path(os.environ["CLIPADAPT_DATA"])
    return Path(os.environ.get("CLIPADAPT_HOME", ".")) / "data"


def _ids(names: list[str]) -> list[str]:
    if not names or names == ["all"]:
        return list(RECIPES)
    unknown = [name for name in names if name not in RECIPES]
    if unknown:
        named = ", ".join(f"{name!r} (did you mean {match}?)" if (match := closest(name, RECIPES)) else repr(name)
                          for name in unknown)
        print(f"error: unknown dataset {named}: use `all` or some of {', '.join(RECIPES)}", file=sys.stderr)
        raise SystemExit(2)
    return names


def check(ids: list[str], data_root: Path) -> int:
    """Print ready / missing / incomplete per dataset; 0 when every one is ready."""
    ready = 0
    for name in ids:
        status = inspect(RECIPES[name], dataset_config(name), data_root)
        ready += status.state == "ready"
        print(f"{name:<16} {status.state:<11} {status.detail}")
    print(f"{ready} of {len(ids)} ready under {data_root.resolve()}")
    return 0 if ready == len(ids) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Download, verify and lay out the benchmark datasets (CoOp layout).")
    parser.add_argument("datasets", nargs="*", help=f"`all` or some of: {' '.join(RECIPES)}")
    parser.add_argument("--check", action="store_true", help="only report ready / missing / incomplete per dataset")
    parser.add_argument("--data-root", type=Path, default=None, help="default: $CLIPADAPT_DATA or ./data")
    parser.add_argument("--keep-archives", action="store_true", help="keep downloaded archives after unpacking")
    args = parser.parse_args(argv)
    data_root = args.data_root or default_data_root()
    if args.check:
        return check(_ids(args.datasets), data_root)
    if not args.datasets:
        parser.error("name the datasets to prepare (or `all`), or pass --check")
    failed = []
    for name in _ids(args.datasets):
        recipe = RECIPES[name]
        try:
            status = prepare_dataset(recipe, dataset_config(name), data_root, keep_archives=args.keep_archives)
            print(f"{name}: ready ({status.detail})", flush=True)
        except ManualStep as step:
            print(str(step), file=sys.stderr, flush=True)
            failed.append(name)
        except PrepareError as error:
            print(f"error: {error}", file=sys.stderr, flush=True)
            failed.append(name)
    if failed:
        print(f"not prepared: {' '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
