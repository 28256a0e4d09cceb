"""The released BiT checkpoints and their download into the torch hub cache.

Released names (``<base>/<name>.npz``, base ``https://storage.googleapis.com/bit_models``,
overridable with ``$BITFAST_WEIGHTS_URL``): ``BiT-S-R{50x1,50x3,101x1,101x3,152x4}``
(ImageNet-1k upstream), ``BiT-M-R{50x1,50x3,101x1,101x3,152x2,152x4}`` (ImageNet-21k) and
``BiT-M-R*-ILSVRC2012`` (ImageNet-21k, then fine-tuned on ImageNet-1k). BiT-L was never
released. Files land in ``torch.hub.get_dir()/checkpoints/`` (``$TORCH_HOME``), are
downloaded to a temporary file in that folder and renamed into place only when complete (a
partial file is never used), and are made read-only there: bitfast's loaders only read them.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request

import torch

__all__ = [
    "DEFAULT_BASE_URL",
    "ENV_URL",
    "RELEASES",
    "cache_dir",
    "check_release_arch",
    "download",
    "release_arch",
    "release_name",
    "resolve_source",
    "weights_url",
]

log = logging.getLogger("bitfast")

DEFAULT_BASE_URL = "https://storage.googleapis.com/bit_models"
ENV_URL = "BITFAST_WEIGHTS_URL"

_S = ("R50x1", "R50x3", "R101x1", "R101x3", "R152x4")
_M = ("R50x1", "R50x3", "R101x1", "R101x3", "R152x2", "R152x4")
RELEASES: tuple[str, ...] = (
    tuple(f"BiT-S-{a}" for a in _S) + tuple(f"BiT-M-{a}" for a in _M) + tuple(f"BiT-M-{a}-ILSVRC2012" for a in _M)
)
_BY_LOWER = {r.lower(): r for r in RELEASES}
_RELEASE_LIKE = re.compile(r"bit-[a-z]-r\d+x\d+(-[a-z0-9]+)?", re.IGNORECASE)
_ARCH = re.compile(r"-(R\d+x\d+)")


def release_name(name: str) -> str | None:
    """The released name ``name`` refers to (case-insensitive, ``.npz`` optional), or None."""
    base = name[:-4] if name.lower().endswith(".npz") else name
    return _BY_LOWER.get(base.lower())


def release_arch(name: str) -> str:
    """The architecture of a released checkpoint: ``"BiT-M-R50x1"`` -> ``"R50x1"``."""
    release = release_name(name)
    if release is None:
        raise ValueError(f"bitfast.checkpoint: {name!r} is not a released BiT checkpoint; expected one of {RELEASES}")
    return _ARCH.search(release)[1]


def _is_url(s: str) -> bool:
    return urllib.parse.urlsplit(s).scheme in ("http", "https", "file")


def _named_release(source: str) -> str | None:
    """The release a source string names: a release name, or a URL whose file is one."""
    if _is_url(source):
        return release_name(os.path.basename(urllib.parse.urlsplit(source).path))
    if os.path.exists(source):
        return None
    return release_name(source)


def _reject_unreleased(source: str) -> None:
    """ValueError for a name shaped like a release (``BiT-L-R152x4``) that was not released."""
    if _is_url(source) or os.path.exists(source) or release_name(source) is not None:
        return
    if _RELEASE_LIKE.fullmatch(source.removesuffix(".npz")):
        raise ValueError(
            f"bitfast.checkpoint: {source!r} is not a released BiT checkpoint (BiT-L was never released); "
            f"expected one of {RELEASES}, a local path or a URL"
        )


def check_release_arch(source, arch: str, fn: str = "load_pretrained") -> None:
    """Raise ValueError when ``source`` names a released checkpoint of another
    architecture than ``arch`` (e.g. ``"R50x1"``). Paths are left to the shape checks."""
    if not isinstance(source, str):
        return
    _reject_unreleased(source)
    release = _named_release(source)
    if release is not None and release_arch(release) != arch:
        raise ValueError(
            f"{fn}: checkpoint {release!r} is for {release_arch(release)} but the model is {arch}; "
            f"releases for {arch}: {[r for r in RELEASES if release_arch(r) == arch]}"
        )


def weights_url(name: str) -> str:
    """The URL of a released checkpoint: ``$BITFAST_WEIGHTS_URL`` (or the official base) ``/<name>.npz``."""
    release = release_name(name)
    if release is None:
        raise ValueError(f"bitfast.checkpoint: {name!r} is not a released BiT checkpoint; expected one of {RELEASES}")
    base = os.environ.get(ENV_URL) or DEFAULT_BASE_URL
    return f"{base.rstrip('/')}/{release}.npz"


def cache_dir() -> str:
    """Where downloaded checkpoints are kept: ``torch.hub.get_dir()/checkpoints``."""
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def download(url: str, dest: str, timeout: float = 60.0) -> str:
    """Download ``url`` to ``dest`` atomically (temporary file in the same folder, then
    rename); a short read against the announced Content-Length is an error, and nothing
    is left behind on failure. The file is made read-only (mode 0444) before the rename.
    Returns ``dest``."""
    folder = os.path.dirname(os.path.abspath(dest))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(dest)}.", suffix=".part", dir=folder)
    log.info("bitfast: downloading %s to %s", url, dest)
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as response:
            expected = response.headers.get("Content-Length")
            shutil.copyfileobj(response, f, length=1 << 20)
            written = f.tell()
        if expected is not None and written != int(expected):
            raise OSError(f"bitfast.checkpoint: download of {url} stopped after {written} of {expected} bytes")
        os.chmod(tmp, 0o444)
        os.replace(tmp, dest)
    except urllib.error.HTTPError as err:
        _remove(tmp)
        cls = FileNotFoundError if err.code == 404 else OSError
        raise cls(f"bitfast.checkpoint: could not download {url}: HTTP {err.code} {err.reason}") from err
    except urllib.error.URLError as err:
        _remove(tmp)
        raise OSError(
            f"bitfast.checkpoint: could not download {url}: {err.reason} (set ${ENV_URL} to a mirror, "
            "or pass a local path)"
        ) from err
    except (http.client.HTTPException, TimeoutError, ConnectionError) as err:
        _remove(tmp)
        raise OSError(f"bitfast.checkpoint: download of {url} failed: {type(err).__name__}: {err}") from err
    except BaseException:
        _remove(tmp)
        raise
    return dest


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def resolve_source(source: str | os.PathLike) -> str:
    """The local file a checkpoint source refers to, downloading it when needed.

    ``source`` is a local path, a ``file://`` URL, an ``http(s)://`` URL (cached under its
    file name prefixed with a hash of the whole URL, so that two URLs never share a cached
    file) or a released name such as ``"BiT-M-R50x1"`` (cached as
    ``<cache_dir>/BiT-M-R50x1.npz``; an existing file is reused).
    """
    if isinstance(source, os.PathLike):
        return os.fspath(source)
    if not isinstance(source, str):
        raise TypeError(f"bitfast.checkpoint: a checkpoint source must be a path or a name; got {type(source).__name__}")
    parts = urllib.parse.urlsplit(source)
    if parts.scheme == "file":
        return urllib.request.url2pathname(parts.path)
    if parts.scheme in ("http", "https"):
        name = os.path.basename(parts.path) or "checkpoint"
        digest = hashlib.sha256(source.encode()).hexdigest()[:12]
        dest = os.path.join(cache_dir(), f"{digest}-{name}")
        return dest if os.path.exists(dest) else download(source, dest)
    if os.path.exists(source):
        return source
    release = release_name(source)
    if release is not None:
        dest = os.path.join(cache_dir(), f"{release}.npz")
        return dest if os.path.exists(dest) else download(weights_url(release), dest)
    _reject_unreleased(source)
    raise FileNotFoundError(
        f"bitfast.checkpoint: no checkpoint file at {source} (and it is not a released name such as 'BiT-M-R50x1')"
    )
