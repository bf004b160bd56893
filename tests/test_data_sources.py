"""crmn/data/sources.py: the registry, download with checksums and retries, extraction."""
import hashlib
import tarfile
import threading

import pytest

from crmn import data
from crmn.data import sources
from crmn.errors import ConfigError, DataError
from data_helpers import Server, md5, set_md5, use_archive

pytestmark = pytest.mark.current  # framework-free: runs in the current environment too


@pytest.fixture
def data_server(monkeypatch):
    monkeypatch.setattr(sources, "_RETRY_WAIT_S", 0.0)
    monkeypatch.delenv(data.MIRROR_ENV, raising=False)
    s = Server()
    yield s
    s.close()


@pytest.fixture(scope="module")
def data_cifar10_archive(tmp_path_factory):
    return data.write_fake_archive("cifar10", tmp_path_factory.mktemp("arch10"), 60, 20)


# ------------------------------------------------------------------------------------------
# the registry

def test_datasets_name_official_sources_and_md5s():
    assert set(data.DATASETS) == {"cifar10", "cifar100", "svhn"}
    for name, info in data.DATASETS.items():
        assert info.name == name
        assert info.base_url.startswith(("https://www.cs.toronto.edu/~kriz/",
                                         "http://ufldl.stanford.edu/housenumbers/"))
        for fname, md5 in info.archives:
            assert len(md5) == 32 and int(md5, 16) >= 0
    assert data.DATASETS["cifar100"].archives[0] == (
        "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85")
    assert (data.DATASETS["cifar10"].classes, data.DATASETS["cifar100"].classes,
            data.DATASETS["svhn"].classes) == (10, 100, 10)


def test_the_table_holds_the_official_per_file_md5s_and_image_counts():
    """The values published for the extracted files (as torchvision's dataset code checks)."""
    d = data.DATASETS
    assert d["cifar10"].files == (
        ("data_batch_1", "c99cafc152244af753f735de768cd75f"),
        ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
        ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
        ("data_batch_4", "634d18415352ddfa80567beed471001a"),
        ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb"),
        ("test_batch", "40351d587109b95175f43aff81a1287e"),
        ("batches.meta", "5ff9c542aee3614f3951f8cda6e48888"))
    assert d["cifar100"].files == (("train", "16019d7e3df5f24257cddd939b257f8d"),
                                   ("test", "f0ef6b0ae62326f3e7ffdfab6717acfc"),
                                   ("meta", "7973b15100ade9c7d40fb424638fde48"))
    assert d["svhn"].files == (("train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373"),
                               ("test_32x32.mat", "eb5a983be6a315427106f1b164d9cef3"),
                               ("extra_32x32.mat", "a93ce644f1a588dc4d68dda5feec44a7"))
    assert d["svhn"].archives == d["svhn"].files  # SVHN's downloads are its files
    assert d["cifar10"].archives == (("cifar-10-python.tar.gz",
                                      "c58f30108f718f92721af3b95e74349a"),)
    counts = {name: dict(info.images) for name, info in d.items()}
    assert counts["cifar10"] == {**{f"data_batch_{i}": 10000 for i in range(1, 6)},
                                 "test_batch": 10000}
    assert counts["cifar100"] == {"train": 50000, "test": 10000}
    assert counts["svhn"] == {"train_32x32.mat": 73257, "test_32x32.mat": 26032,
                              "extra_32x32.mat": 531131}
    for info in d.values():  # the loader's files are official files
        assert set(info.required) <= {f for f, _ in info.files}
        assert set(dict(info.images)) <= set(info.required)


def test_unknown_dataset_name_is_a_config_error(tmp_path):
    for call in (lambda: data.ensure_downloaded("mnist", tmp_path),
                 lambda: data.load_raw("mnist", tmp_path),
                 lambda: data.prepare("mnist", tmp_path, "final", 0)):
        with pytest.raises(ConfigError, match="unknown dataset 'mnist'"):
            call()

def test_download_verifies_extracts_and_never_fetches_twice(tmp_path, data_server, monkeypatch,
                                                           data_cifar10_archive):
    use_archive(monkeypatch, "cifar10", data_cifar10_archive)
    data_server.serve(data_cifar10_archive)
    monkeypatch.setenv(data.MIRROR_ENV, data_server.url)
    folder = data.ensure_downloaded("cifar10", tmp_path / "d", progress=False)
    assert folder == tmp_path / "d" / "cifar-10-batches-py"
    assert data_server.requests == ["cifar-10-python.tar.gz"]
    archive = tmp_path / "d" / "cifar-10-python.tar.gz"
    assert md5(archive) == md5(data_cifar10_archive["cifar-10-python.tar.gz"])
    assert not list((tmp_path / "d").glob("*.part")) and not list((tmp_path / "d").glob(".ex*"))
    assert len(data.load_raw("cifar10", tmp_path / "d")["y_train"]) == 60
    # complete folder: nothing fetched; folder gone: re-extracted from the verified archive
    data.ensure_downloaded("cifar10", tmp_path / "d", progress=False)
    for f in folder.iterdir():
        f.unlink()
    folder.rmdir()
    data.ensure_downloaded("cifar10", tmp_path / "d", progress=False)
    assert data_server.requests == ["cifar-10-python.tar.gz"]
    assert len(data.load_raw("cifar10", tmp_path / "d")["y_test"]) == 20


def test_checksum_failure_removes_the_part_file_and_a_retry_succeeds(
        tmp_path, data_server, monkeypatch, data_cifar10_archive):
    data_server.serve(data_cifar10_archive)
    set_md5(monkeypatch, "cifar10", "0" * 32)
    with pytest.raises(DataError, match=r"checksum mismatch for .*cifar-10-python\.tar\.gz"):
        data.ensure_downloaded("cifar10", tmp_path, progress=False, mirror=data_server.url)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cifar10.lock"]
    use_archive(monkeypatch, "cifar10", data_cifar10_archive)
    data.ensure_downloaded("cifar10", tmp_path, progress=False, mirror=data_server.url)
    assert (tmp_path / "cifar-10-batches-py" / "test_batch").is_file()


def test_a_second_download_waits_for_the_first_and_fetches_nothing(
        tmp_path, data_server, monkeypatch, data_cifar10_archive, capfd):
    # two runs started side by side share one data dir: the second waits on the lock, then
    # finds the folder complete instead of writing the same .part file
    use_archive(monkeypatch, "cifar10", data_cifar10_archive)
    data_server.serve(data_cifar10_archive)
    info = data.DATASETS["cifar10"]
    results = []
    with sources._download_lock(tmp_path, info, progress=False):
        t = threading.Thread(target=lambda: results.append(data.ensure_downloaded(
            "cifar10", tmp_path, progress=True, mirror=data_server.url)))
        t.start()
        t.join(timeout=2.0)
        assert t.is_alive() and results == []  # blocked while the lock is held
        assert "waiting for another process to finish downloading cifar10" in \
            capfd.readouterr().err
        # the "first" run completes the dataset while holding the lock
        sources._download_and_extract(info, tmp_path, tmp_path / info.folder, data_server.url,
                                   False, 10.0)
    t.join(timeout=30.0)
    assert results == [tmp_path / "cifar-10-batches-py"]
    assert data_server.requests == ["cifar-10-python.tar.gz"]  # fetched once, by the first


def test_a_verified_archive_on_disk_is_never_deleted(tmp_path, data_server, monkeypatch,
                                                     data_cifar10_archive):
    data_server.serve(data_cifar10_archive)
    use_archive(monkeypatch, "cifar10", data_cifar10_archive)
    data.ensure_downloaded("cifar10", tmp_path, progress=False, mirror=data_server.url)
    archive = tmp_path / "cifar-10-python.tar.gz"
    before = archive.read_bytes()
    for f in (tmp_path / "cifar-10-batches-py").iterdir():
        f.unlink()
    set_md5(monkeypatch, "cifar10", "0" * 32)  # e.g. a wrong published checksum
    with pytest.raises(DataError, match="fails its MD5 check"):
        data.ensure_downloaded("cifar10", tmp_path, progress=False, mirror=data_server.url)
    assert archive.read_bytes() == before
    assert data_server.requests == ["cifar-10-python.tar.gz"]


def test_truncated_download_is_retried_then_reported(tmp_path, data_server, monkeypatch,
                                                     data_cifar10_archive):
    data_server.serve(data_cifar10_archive)
    data_server.short["cifar-10-python.tar.gz"] = 1000
    use_archive(monkeypatch, "cifar10", data_cifar10_archive)
    with pytest.raises(DataError, match="cannot download .*cifar-10-python.tar.gz"):
        data.ensure_downloaded("cifar10", tmp_path, progress=False, mirror=data_server.url)
    assert len(data_server.requests) == sources._ATTEMPTS
    assert not list(tmp_path.glob("*.part")) and not (tmp_path / "cifar-10-python.tar.gz").exists()


def test_http_error_names_url_and_file(tmp_path, data_server):
    with pytest.raises(DataError, match=r"cannot download http://127\.0\.0\.1:\d+/cifar-100"):
        data.ensure_downloaded("cifar100", tmp_path, progress=False, mirror=data_server.url)
    assert data_server.requests == ["cifar-100-python.tar.gz"]  # a 404 is not retried


def test_corrupt_archive_is_reported_and_kept(tmp_path, data_server, monkeypatch,
                                              data_cifar10_archive):
    good = data_cifar10_archive["cifar-10-python.tar.gz"].read_bytes()
    data_server.files["cifar-10-python.tar.gz"] = good[:len(good) // 2]
    set_md5(monkeypatch, "cifar10", hashlib.md5(good[:len(good) // 2]).hexdigest())
    with pytest.raises(DataError, match="corrupt or truncated archive .*cifar-10-python") as e:
        data.ensure_downloaded("cifar10", tmp_path, progress=False, mirror=data_server.url)
    # not only "delete it": the offline routes too
    assert "delete it to download it again" in str(e.value)
    assert f"extracted folder at {tmp_path}/cifar-10-batches-py/" in str(e.value)
    assert data.MIRROR_ENV in str(e.value)
    assert (tmp_path / "cifar-10-python.tar.gz").is_file()
    assert not (tmp_path / "cifar-10-batches-py").exists()
    assert not list(tmp_path.glob(".extract-*"))


def test_archive_missing_files_after_extraction(tmp_path, data_server, monkeypatch):
    folder = data.write_fake("cifar10", tmp_path / "src", 20, 5)
    (folder / "test_batch").unlink()
    bad = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(bad, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    data_server.serve({"cifar-10-python.tar.gz": bad})
    use_archive(monkeypatch, "cifar10", {"cifar-10-python.tar.gz": bad})
    with pytest.raises(DataError, match="lacks test_batch"):
        data.ensure_downloaded("cifar10", tmp_path / "d", progress=False,
                               mirror=data_server.url)


def test_archive_with_a_member_outside_its_folder_is_refused(tmp_path, data_server,
                                                             monkeypatch):
    evil = tmp_path / "cifar-10-python.tar.gz"
    (tmp_path / "payload").write_text("x")
    with tarfile.open(evil, "w:gz") as tar:
        tar.add(tmp_path / "payload", arcname="../escaped")
    data_server.serve({"cifar-10-python.tar.gz": evil})
    use_archive(monkeypatch, "cifar10", {"cifar-10-python.tar.gz": evil})
    with pytest.raises(DataError, match="archive .*cifar-10-python.tar.gz"):
        data.ensure_downloaded("cifar10", tmp_path / "d", progress=False,
                               mirror=data_server.url)
    assert not (tmp_path / "escaped").exists()


def test_svhn_downloads_three_mat_files(tmp_path, data_server, monkeypatch):
    archives = data.write_fake_archive("svhn", tmp_path / "src", 30, 8)
    assert sorted(archives) == ["extra_32x32.mat", "test_32x32.mat", "train_32x32.mat"]
    data_server.serve(archives)
    use_archive(monkeypatch, "svhn", archives)
    folder = data.ensure_downloaded("svhn", tmp_path / "d", progress=False,
                                    mirror=data_server.url)
    assert folder == tmp_path / "d" / "svhn"
    assert sorted(data_server.requests) == sorted(archives)
    # a download whose MD5s matched is stamped as checked: not hashed again
    assert (folder / data.STAMP).is_file()
    s = data.prepare("svhn", tmp_path / "d", "final", 0, download=True, progress=False)
    assert (len(s.train_x), len(s.eval_x)) == (30, 8)
    assert len(data_server.requests) == 3


def test_unwritable_data_dir_is_a_data_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(DataError, match="data directory .*a_file/sub is not writable"):
        data.ensure_downloaded("cifar10", blocker / "sub", progress=False,
                               mirror="http://127.0.0.1:9/")
    with pytest.raises(DataError, match="data directory .*a_file is a file, not a directory"):
        data.ensure_downloaded("cifar10", blocker, progress=False, mirror="http://127.0.0.1:9/")
    assert blocker.read_text() == "not a folder"




# ------------------------------------------------------------------------------------------
# offline: every refusal says where the files go by hand and names the mirror variable

@pytest.mark.parametrize("name, routes", [
    ("cifar100", ["{d}/cifar-100-python.tar.gz", "{d}/cifar-100-python/{{train,test,meta}}"]),
    ("cifar10", ["{d}/cifar-10-python.tar.gz", "{d}/cifar-10-batches-py/{{data_batch_1,"
                 "data_batch_2,data_batch_3,data_batch_4,data_batch_5,test_batch,"
                 "batches.meta}}"]),
    ("svhn", ["{d}/svhn/{{train_32x32.mat,test_32x32.mat,extra_32x32.mat}}"]),
])
def test_offline_message_names_the_files_and_the_mirror_variable(tmp_path, monkeypatch,
                                                                 closed_url, name, routes):
    monkeypatch.setattr(sources, "_RETRY_WAIT_S", 0.0)
    monkeypatch.setenv(data.MIRROR_ENV, closed_url)
    d = tmp_path / "data"
    with pytest.raises(DataError) as e:
        data.ensure_downloaded(name, d, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"cannot download {closed_url}")
    assert f"(base URL from ${data.MIRROR_ENV})" in msg  # says where the URL came from
    assert f"set {data.MIRROR_ENV} to a base URL" in msg
    for route in routes:
        assert route.format(d=d) in msg
    # every place looked at, and what each lacks
    info = data.DATASETS[name]
    assert f"looked in {d / info.folder} (no such folder), {d} (lacks " in msg


def test_the_mirror_may_be_a_local_folder(tmp_path, monkeypatch, data_cifar10_archive):
    use_archive(monkeypatch, "cifar10", data_cifar10_archive)
    mirror = data_cifar10_archive["cifar-10-python.tar.gz"].parent
    monkeypatch.setenv(data.MIRROR_ENV, mirror.as_uri())
    folder = data.ensure_downloaded("cifar10", tmp_path, progress=False)
    assert (folder / "test_batch").is_file() and data.is_fake("cifar10", tmp_path)
    assert md5(tmp_path / "cifar-10-python.tar.gz") == md5(mirror / "cifar-10-python.tar.gz")


def test_a_repacked_archive_is_refused_with_both_md5s_and_the_folder_route(
        tmp_path, monkeypatch, closed_url, data_cifar10_archive):
    # the real table: a tarball packed from other files is not the official archive
    monkeypatch.setenv(data.MIRROR_ENV, closed_url)
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(data_cifar10_archive["cifar-10-python.tar.gz"].read_bytes())
    with pytest.raises(DataError) as e:
        data.ensure_downloaded("cifar10", tmp_path, progress=False)
    msg = str(e.value)
    assert f"archive {archive} fails its MD5 check: got {md5(archive)}, expected " \
        "c58f30108f718f92721af3b95e74349a" in msg
    assert f"extracted folder at {tmp_path}/cifar-10-batches-py/{{data_batch_1," in msg
    assert data.MIRROR_ENV in msg and "\n" not in msg
    assert archive.read_bytes() == data_cifar10_archive["cifar-10-python.tar.gz"].read_bytes()


def test_a_hand_placed_svhn_file_is_hashed_before_a_download_completes_the_set(
        tmp_path, monkeypatch, closed_url):
    monkeypatch.setenv(data.MIRROR_ENV, closed_url)
    folder = data.write_fake("svhn", tmp_path / "src", 10, 4)
    (tmp_path / "svhn").mkdir()
    placed = tmp_path / "svhn" / "train_32x32.mat"
    placed.write_bytes((folder / "train_32x32.mat").read_bytes())
    with pytest.raises(DataError, match=f"file {placed} fails its MD5 check: got "
                                        f"{md5(placed)}, expected e26dedcc"):
        data.ensure_downloaded("svhn", tmp_path, progress=False)
    assert placed.is_file()


def test_an_incomplete_extracted_folder_given_as_data_dir_is_not_downloaded_into(
        tmp_path, closed_url):
    folder = data.write_fake("cifar10", tmp_path, 20, 5)
    (folder / "data_batch_5").unlink()
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(DataError, match=f"{folder} holds part of the cifar10 files but lacks "
                                        "data_batch_5"):
        data.ensure_downloaded("cifar10", folder, progress=False, mirror=closed_url)
    assert sorted(p.name for p in folder.iterdir()) == before  # no lock, no download
