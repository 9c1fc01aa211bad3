"""Downloads with HTTP Range resume, checksum verification, atomic rename and safe extraction.

Nothing can be fetched on the development machines; the code is exercised in the tests against
a local HTTP server. Checksums are the published ones (torchvision's for VOC and SBD, the COCO
archives' MD5s, the sha256 prefixes in the weight file names); VOC2012test.tar has none published, so
it is only checked to be an archive, and ``data check voc --splits test`` decodes every image.
"""

from __future__ import annotations

import http.client
import os
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tkpbench.errors import DownloadError
from tkpbench.io import file_digest


@dataclass(frozen=True)
class Resource:
    url: str
    filename: str
    checksum: str | None  # "md5:<hex>" or "sha256-prefix:<hex>"; None: no published checksum (said where listed)
    extract_to: str | None = ""  # folder under --root to extract into; None = keep the file


RESOURCES: dict[str, list[Resource]] = {
    "voc": [
        Resource(
            "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
            "VOCtrainval_11-May-2012.tar",
            "md5:6cd6e144f989b92b3379bac3b3de84fd",
        )
    ],
    # VOC 2012 test images (ImageSets/Segmentation/test.txt: 1,456 ids; no labels), extracted into the same
    # VOCdevkit/VOC2012 as trainval. The official copy (http://host.robots.ox.ac.uk:8080/eval/downloads/
    # VOC2012test.tar) is behind the evaluation server's login; this is the public mirror codebases fetch.
    # No checksum is published for it (torchvision's VOC lists its md5 as empty): none is checked.
    "voc-test": [Resource("http://pjreddie.com/media/files/VOC2012test.tar", "VOC2012test.tar", None)],
    "sbd": [
        Resource(
            "http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz",
            "benchmark.tgz",
            "md5:82b4d87ceb2ed10f6038a1cba92111cb",
        )
    ],
    "coco": [
        Resource("http://images.cocodataset.org/zips/train2014.zip", "train2014.zip", "md5:0da8c0bd3d6becc4dcb32757491aca88"),
        Resource("http://images.cocodataset.org/zips/val2014.zip", "val2014.zip", "md5:a3d79f5ed8d289b7a7554ce06a5782b3"),
        Resource(
            "http://images.cocodataset.org/annotations/annotations_trainval2014.zip",
            "annotations_trainval2014.zip",
            "md5:0a379cfc70b0e71301e0f377548639bd",
        ),
    ],
    "weights": [
        # ViT-B/16 384, original in21k -> in1k (timm 'vit_base_patch16_384.orig_in21k_ft_in1k', used by ViT-PCM)
        Resource(
            "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-vitjx/jx_vit_base_p16_384-83fb41ba.pth",
            "jx_vit_base_p16_384-83fb41ba.pth",
            "sha256-prefix:83fb41ba",
            None,
        ),
        # torchvision ResNet-101 ImageNet (IMAGENET1K_V1) for the DeepLab-v2 backbone
        Resource(
            "https://download.pytorch.org/models/resnet101-63fe2227.pth", "resnet101-63fe2227.pth", "sha256-prefix:63fe2227", None
        ),
    ],
}


def verify(path: Path, checksum: str) -> bool:
    kind, _, expected = checksum.partition(":")
    digest = file_digest(path, "md5" if kind == "md5" else "sha256")
    return digest == expected if kind == "md5" else digest.startswith(expected)


def fetch(url: str, dest: Path, checksum: str | None = None, chunk: int = 1 << 20, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest``. A partial ``dest.part`` is resumed with a Range request;
    the file is renamed into place only after its checksum matches. A mismatch deletes the
    partial file and raises DownloadError."""
    dest = Path(dest)
    if dest.is_file() and (checksum is None or verify(dest, checksum)):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            if have and resp.status != 206:
                have = 0  # server ignored the range: start over
            length = resp.headers.get("Content-Length")
            expected = have + int(length) if length is not None else None
            with open(part, "ab" if have else "wb") as f:
                while True:
                    data = resp.read(chunk)
                    if not data:
                        break
                    f.write(data)
        got = part.stat().st_size
        if expected is not None and got < expected:
            raise OSError(f"connection closed after {got} of {expected} bytes")
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to fetch: the part is complete
            pass
        else:
            raise DownloadError(f"{url}: HTTP {e.code} {e.reason}; the partial file {part} is kept for a resume") from e
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # IncompleteRead: a cut connection
        raise DownloadError(
            f"{url}: connection failed ({e}); {part.stat().st_size if part.exists() else 0} bytes kept in {part}. "
            "Run the same command again to resume."
        ) from e
    if checksum and not verify(part, checksum):
        part.unlink()
        raise DownloadError(f"{url}: checksum mismatch (expected {checksum}); the download was deleted. Run again.")
    os.replace(part, dest)
    return dest


def _inside(root: Path, name: str) -> bool:
    target = (root / name).resolve()
    return target == root or root in target.parents


def safe_extract(archive: Path, root: Path) -> None:
    """Extract a tar or zip under ``root``, refusing any member that would land outside it
    (absolute paths, '..', links). Extraction goes to a temporary folder first, then moves in."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".extract-{archive.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                for n in z.namelist():
                    if not _inside(tmp.resolve(), n):
                        raise DownloadError(f"{archive}: member {n!r} would be written outside {root}; refusing to extract")
                z.extractall(tmp)
        else:
            with tarfile.open(archive) as t:
                for m in t.getmembers():
                    if not _inside(tmp.resolve(), m.name) or m.issym() or m.islnk() or m.isdev():
                        raise DownloadError(
                            f"{archive}: member {m.name!r} is a link or would be written outside {root}; refusing to extract"
                        )
                t.extractall(tmp, filter="data")
        for item in tmp.iterdir():
            target = root / item.name
            if target.exists() and item.is_dir():
                shutil.copytree(item, target, dirs_exist_ok=True)
                shutil.rmtree(item)
            else:
                os.replace(item, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def download(name: str, root: Path, base_url: str | None = None) -> list[Path]:
    """Fetch and extract every resource of ``name`` under ``root``. ``base_url`` replaces each
    URL's folder (mirrors, tests)."""
    if name not in RESOURCES:
        raise DownloadError(f"unknown resource {name!r}; choose from {', '.join(RESOURCES)}")
    done = []
    for r in RESOURCES[name]:
        url = f"{base_url.rstrip('/')}/{r.filename}" if base_url else r.url
        # archives go to root/downloads/ and are extracted; plain files (weights) land in root/
        folder = Path(root) / "downloads" if r.extract_to is not None else Path(root)
        archive = fetch(url, folder / r.filename, r.checksum)
        if r.checksum is None and r.extract_to is not None and not (tarfile.is_tarfile(archive) or zipfile.is_zipfile(archive)):
            archive.unlink()
            raise DownloadError(
                f"{url} sent {archive.name} that is not an archive (a login or error page?); it was deleted. "
                f"Download it by hand (e.g. from the evaluation server, logged in), put it at {archive} and run again"
            )
        if r.extract_to is not None:
            marker = Path(root) / "downloads" / f"{r.filename}.extracted"
            if not marker.exists():
                safe_extract(archive, Path(root) / r.extract_to)
                marker.touch()
        done.append(archive)
    return done
