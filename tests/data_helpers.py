"""Helpers shared by the tests of crmn/data/: official-format files and a loopback server.

The files are written in the official on-disk formats (Python-2-style CIFAR pickles, MATLAB
v5 SVHN files) with known contents, so the code is checked against the published layouts
rather than against :func:`crmn.data.write_fake`. Downloads go to a loopback HTTP server
(127.0.0.1 only) in a thread.
"""
import dataclasses
import hashlib
import http.server
import pickle
import threading
from pathlib import Path

import numpy as np

from crmn import data


def md5(path):
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def cifar_pickle(path, x, y, label_key=b"labels", **extra):
    """One batch as the official files hold it: byte keys, rows of 1024 R, G, B values;
    ``extra``: further keys (e.g. CIFAR-100's ``coarse_labels``)."""
    with open(path, "wb") as f:
        pickle.dump({b"data": x.reshape(len(x), 3072), label_key: [int(v) for v in y],
                     b"batch_label": b"test", **{k.encode(): v for k, v in extra.items()}},
                    f, protocol=2)


def meta_pickle(path, key: bytes, n_classes: int):
    """A label-names file (``meta`` of CIFAR-100, ``batches.meta`` of CIFAR-10)."""
    with open(path, "wb") as f:
        pickle.dump({key: [b"x"] * n_classes}, f, protocol=2)


def cifar100_folder(folder, n_train, n_test):
    """The extracted CIFAR-100 layout (``train``, ``test``, ``meta``), images all zero."""
    folder.mkdir(parents=True)
    for fname, n in (("train", n_train), ("test", n_test)):
        cifar_pickle(folder / fname, np.zeros((n, 3072), dtype=np.uint8), np.arange(n) % 100,
                     label_key=b"fine_labels", coarse_labels=(np.arange(n) % 20).tolist())
    meta_pickle(folder / "meta", b"fine_label_names", 100)
    return folder


def cifar10_folder(folder, n_per_batch=7):
    """The extracted CIFAR-10 layout with ``n_per_batch`` images per batch (not 10,000)."""
    folder.mkdir(parents=True)
    for i, fname in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        cifar_pickle(folder / fname, pattern(n_per_batch, seed=i), np.arange(n_per_batch) % 10)
    meta_pickle(folder / "batches.meta", b"label_names", 10)
    return folder


def pattern(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)


def use_archive(monkeypatch, name, archives):
    """Point DATASETS[name] at the MD5s of the fake archives (file name -> path)."""
    info = data.DATASETS[name]
    new = tuple((f, md5(archives[f])) for f, _ in info.archives)
    monkeypatch.setitem(data.DATASETS, name, dataclasses.replace(info, archives=new))


def set_md5(monkeypatch, name, md5):
    info = data.DATASETS[name]
    new = tuple((f, md5) for f, _ in info.archives)
    monkeypatch.setitem(data.DATASETS, name, dataclasses.replace(info, archives=new))


class Server:
    """A loopback HTTP server: ``files[name] = bytes``; ``short[name]`` bytes cut off."""

    def __init__(self):
        self.files, self.short, self.requests = {}, {}, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.lstrip("/")
                server.requests.append(name)
                body = server.files.get(name)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                cut = server.short.get(name, 0)
                self.wfile.write(body[:len(body) - cut])
                if cut:
                    self.close_connection = True

            def log_message(self, *args):  # keep pytest output clean
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def serve(self, archives):
        for fname, path in archives.items():
            self.files[fname] = Path(path).read_bytes()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()

