"""Released names: download from ``$BITFAST_WEIGHTS_URL`` into the torch hub cache
(``$TORCH_HOME``), served here by a local http.server with a synthetic BiT-M-R50x1.npz."""

import functools
import http.server
import os
import shutil
import stat
import threading

import numpy as np
import pytest
import torch

from bitfast import create_model, load_pretrained
from bitfast.checkpoint import RELEASES, weights_url
from bitfast.models import ResNetV2

from .synth import npz_arrays, random_state

R50 = (3, 4, 6, 3)


class _Handler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def log_message(self, *args):  # keep the test output quiet
        pass

    def do_GET(self):
        type(self).requests.append(self.path)
        if self.path.startswith("/short/"):
            # Announce more bytes than are sent, then close: a truncated download.
            self.send_response(200)
            self.send_header("Content-Length", "1000000")
            self.end_headers()
            self.wfile.write(b"PK\x03\x04" + bytes(1000))
            return
        super().do_GET()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    # A synthetic BiT-M-R50x1 (the R50x1 layout, a 10-class head to keep it small),
    # float16 arrays: the loader casts to the model's dtype.
    model = ResNetV2(R50, 1, num_classes=10)
    state = random_state(model, seed=7)
    np.savez(root / "BiT-M-R50x1.npz", **npz_arrays(state, R50, np.float16))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield {"url": f"http://127.0.0.1:{httpd.server_address[1]}", "state": state, "root": root}
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def env(server, tmp_path, monkeypatch):
    monkeypatch.setenv("BITFAST_WEIGHTS_URL", server["url"] + "/")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    _Handler.requests.clear()
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_release_names():
    assert len(RELEASES) == 5 + 6 + 6
    assert "BiT-S-R152x2" not in RELEASES and "BiT-M-R152x2" in RELEASES
    assert weights_url("bit-m-r50x1") == "https://storage.googleapis.com/bit_models/BiT-M-R50x1.npz"


def test_download_then_cache(server, env):
    model = create_model("resnetv2_50x1_bit", num_classes=10, pretrained="BiT-M-R50x1")
    cached = env / "BiT-M-R50x1.npz"
    assert cached.is_file()
    assert stat.S_IMODE(os.stat(cached).st_mode) == 0o444  # bitfast's loaders only read the cache
    assert sorted(os.listdir(env)) == ["BiT-M-R50x1.npz"]  # no temporary file left behind
    assert _Handler.requests == ["/BiT-M-R50x1.npz"]
    report = model.pretrained_report
    assert report.format == "npz" and report.head_loaded and report.path == str(cached)
    for k, v in model.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, server["state"][k]), k

    # Second use: from the cache, no request; 1000 classes: the 10-class head is skipped.
    again = create_model("bit_m_r50x1", pretrained=True)
    assert _Handler.requests == ["/BiT-M-R50x1.npz"]
    assert not again.pretrained_report.head_loaded
    assert again.pretrained_report.skipped_head == ["head.fc.weight", "head.fc.bias"]
    assert torch.equal(again.stem.conv.weight, server["state"]["stem.conv.weight"])

    # A plain path and a file:// URL work too.
    local = server["root"] / "BiT-M-R50x1.npz"
    for source in (str(local), local.as_uri()):
        m = create_model("resnetv2_50x1_bit", num_classes=10, pretrained=source)
        assert torch.equal(m.norm.weight, server["state"]["norm.weight"])
    assert _Handler.requests == ["/BiT-M-R50x1.npz"]


def test_urls_with_the_same_file_name_never_share_a_cached_file(server, env):
    sub = server["root"] / "other"
    sub.mkdir(exist_ok=True)
    shutil.copy(server["root"] / "BiT-M-R50x1.npz", sub / "BiT-M-R50x1.npz")
    first, second = f"{server['url']}/BiT-M-R50x1.npz", f"{server['url']}/other/BiT-M-R50x1.npz"
    for url in (first, second, first):
        create_model("resnetv2_50x1_bit", num_classes=10, pretrained=url)
    assert _Handler.requests == ["/BiT-M-R50x1.npz", "/other/BiT-M-R50x1.npz"]  # each once, then from the cache
    cached = sorted(os.listdir(env))
    assert len(cached) == 2 and all(name.endswith("-BiT-M-R50x1.npz") for name in cached)


def test_missing_release_on_server(server, env):
    model = ResNetV2(R50, 1, num_classes=10)
    with pytest.raises(FileNotFoundError, match=r"BiT-S-R50x1\.npz: HTTP 404"):
        load_pretrained(model, "BiT-S-R50x1")
    assert not env.exists() or os.listdir(env) == []


def test_truncated_download_leaves_nothing(server, env, monkeypatch):
    monkeypatch.setenv("BITFAST_WEIGHTS_URL", server["url"] + "/short")
    model = ResNetV2(R50, 1, num_classes=10)
    with pytest.raises(OSError, match=r"BiT-M-R50x1-ILSVRC2012\.npz"):
        load_pretrained(model, "BiT-M-R50x1-ILSVRC2012")
    assert _Handler.requests == ["/short/BiT-M-R50x1-ILSVRC2012.npz"]
    assert os.listdir(env) == []


def test_wrong_architecture_is_refused_before_download(server, env):
    model = ResNetV2(R50, 1, num_classes=10)
    with pytest.raises(ValueError, match="is for R152x4 but the model is R50x1"):
        load_pretrained(model, "BiT-M-R152x4")
    with pytest.raises(ValueError, match="is for R101x3 but the model is R50x1"):
        create_model("resnetv2_50x1_bit", pretrained="BiT-M-R101x3-ILSVRC2012")
    assert _Handler.requests == []
