"""crmn/data/integrity.py: extracted folders are checked like downloads.

Folders are written here in the official layouts; the real data cannot be downloaded in
tests, so acceptance by checksum is proven by pointing the MD5 table at the files written.
"""
import dataclasses
import os

import numpy as np
import pytest
import scipy.io

from crmn import data
from crmn.data import integrity
from crmn.errors import DataError
from data_helpers import cifar10_folder, cifar100_folder, cifar_pickle, md5, pattern

pytestmark = pytest.mark.current  # framework-free: runs in the current environment too


@pytest.fixture(autouse=True)
def fresh_memory(monkeypatch):
    """Each test starts with no folder remembered as checked by this process."""
    monkeypatch.setattr(integrity, "_checked", set())


@pytest.fixture(scope="module")
def repacked_cifar100(tmp_path_factory):
    """The official CIFAR-100 layout with the official counts (50,000 / 10,000), other bytes."""
    return cifar100_folder(tmp_path_factory.mktemp("repacked") / "cifar-100-python",
                            50000, 10000)


def _table_of(monkeypatch, name, folder, counts=False):
    """Point the official table of ``name`` at the files in ``folder`` (MD5s, and counts)."""
    info = data.DATASETS[name]
    new = {"files": tuple((f, md5(folder / f)) for f, _ in info.files)}
    if counts:
        new["images"] = tuple((f, data.count_images(name, folder / f)) for f, _ in info.images)
    monkeypatch.setitem(data.DATASETS, name, dataclasses.replace(info, **new))


def _no_hashing(monkeypatch):
    def fail(path):
        raise AssertionError(f"{path} hashed again")
    monkeypatch.setattr(integrity, "_md5", fail)


# ------------------------------------------------------------------------------------------
# refused, unless unverified

def test_a_repacked_folder_is_refused_by_checksum_and_accepted_unverified(repacked_cifar100):
    folder = repacked_cifar100
    with pytest.raises(DataError) as e:
        data.provenance("cifar100", folder.parent)
    msg = str(e.value)
    # the counts are the official ones, so the bytes are what differs
    assert msg.startswith(f"{folder / 'train'} has MD5 {md5(folder / 'train')}, the official "
                          "file 16019d7e3df5f24257cddd939b257f8d")
    assert "--unverified-data" in msg and "\n" not in msg
    assert data.provenance("cifar100", folder.parent, unverified=True) == "unverified"
    assert data.ensure_downloaded("cifar100", folder.parent, progress=False,
                                  unverified=True) == folder
    assert not (folder / data.STAMP).exists()  # nothing was checked, nothing is claimed


def test_a_truncated_folder_is_refused_by_count_and_accepted_unverified(tmp_path, offline):
    folder = cifar10_folder(tmp_path / "cifar-10-batches-py")
    with pytest.raises(DataError, match=f"^{folder / 'data_batch_1'} holds 7 images, the "
                                        "official file 10,000 .*--unverified-data"):
        data.provenance("cifar10", tmp_path)
    with pytest.raises(DataError, match="holds 7 images"):  # prepare checks before reading
        data.prepare("cifar10", tmp_path, "final", 0, progress=False)
    assert data.provenance("cifar10", tmp_path, unverified=True) == "unverified"
    s = data.prepare("cifar10", tmp_path, "final", 0, progress=False, unverified=True)
    assert (len(s.train_x), len(s.eval_x)) == (35, 7)
    assert not list(tmp_path.glob(".*.lock"))  # found on disk: no download was attempted


def test_a_folder_missing_an_official_file_is_refused_and_accepted_unverified(tmp_path):
    folder = cifar10_folder(tmp_path / "cifar-10-batches-py")
    (folder / "batches.meta").unlink()  # the loader does not need it; the official set has it
    with pytest.raises(DataError, match=f"{folder} is not the complete official cifar10 "
                                        "folder: it lacks batches.meta"):
        data.provenance("cifar10", tmp_path)
    assert data.provenance("cifar10", tmp_path, unverified=True) == "unverified"


def test_nothing_found_names_every_place_looked(tmp_path):
    folder = cifar10_folder(tmp_path / "cifar-10-batches-py")
    (folder / "data_batch_5").unlink()  # without it the folder cannot be used at all
    with pytest.raises(DataError) as e:
        data.provenance("cifar10", tmp_path, unverified=True)
    msg = str(e.value)
    assert msg.startswith(f"no cifar10 data: looked in {folder} (lacks data_batch_5), "
                          f"{tmp_path} (lacks data_batch_1, ")
    assert f"{tmp_path / 'cifar-10-python.tar.gz'} (absent)" in msg
    assert data.MIRROR_ENV in msg


# ------------------------------------------------------------------------------------------
# accepted by checksum, once

def test_a_folder_matching_the_table_is_official_and_checked_once(repacked_cifar100,
                                                                 monkeypatch):
    folder = repacked_cifar100
    _table_of(monkeypatch, "cifar100", folder)
    assert data.provenance("cifar100", folder.parent) == "official"
    stamp = (folder / data.STAMP).read_text()
    assert '"train": [' in stamp
    # a new process (memory cleared) trusts the stamp while sizes and times are unchanged
    monkeypatch.setattr(integrity, "_checked", set())
    with monkeypatch.context() as m:
        _no_hashing(m)
        assert data.provenance("cifar100", folder.parent) == "official"
        assert data.provenance("cifar100", folder.parent, unverified=True) == "official"
    # the real table: the stamp recorded other expected MD5s, so it does not apply
    monkeypatch.undo()
    monkeypatch.setattr(integrity, "_checked", set())
    with pytest.raises(DataError, match="has MD5"):
        data.provenance("cifar100", folder.parent)


def test_a_changed_file_voids_the_stamp(tmp_path, monkeypatch):
    folder = cifar10_folder(tmp_path / "cifar-10-batches-py")
    _table_of(monkeypatch, "cifar10", folder, counts=True)
    assert data.provenance("cifar10", tmp_path) == "official"
    # other pixels, the same image count, a later modification time: checked again, refused
    st = (folder / "data_batch_2").stat()
    cifar_pickle(folder / "data_batch_2", pattern(7, seed=99), np.arange(7) % 10)
    os.utime(folder / "data_batch_2", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    monkeypatch.setattr(integrity, "_checked", set())
    with pytest.raises(DataError, match=f"{folder / 'data_batch_2'} has MD5 "):
        data.provenance("cifar10", tmp_path)


def test_an_unwritable_folder_is_checked_once_per_process(tmp_path, monkeypatch):
    folder = cifar10_folder(tmp_path / "cifar-10-batches-py")
    _table_of(monkeypatch, "cifar10", folder, counts=True)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(integrity, "replace_file", refuse)  # the stamp's atomic writer
    assert data.provenance("cifar10", tmp_path) == "official"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f for f, _ in data.DATASETS["cifar10"].files)  # no stamp, no stray file
    _no_hashing(monkeypatch)
    assert data.provenance("cifar10", tmp_path) == "official"


def test_svhn_is_counted_from_the_mat_header_and_checked(tmp_path, monkeypatch):
    folder = tmp_path / "svhn"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for part, n in (("train", 6), ("test", 3), ("extra", 4)):
        scipy.io.savemat(str(folder / f"{part}_32x32.mat"), {
            "X": rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8),
            "y": np.arange(1, n + 1, dtype=np.uint8).reshape(-1, 1)})
    assert data.count_images("svhn", folder / "extra_32x32.mat") == 4
    with pytest.raises(DataError, match=f"{folder / 'train_32x32.mat'} holds 6 images, the "
                                        "official file 73,257"):
        data.provenance("svhn", tmp_path)
    _table_of(monkeypatch, "svhn", folder, counts=True)
    assert data.provenance("svhn", tmp_path) == "official"


def test_fake_data_is_reported_as_fake_without_checks(tmp_path, monkeypatch):
    data.write_fake("cifar100", tmp_path, 20, 5)
    _no_hashing(monkeypatch)
    assert data.provenance("cifar100", tmp_path) == "fake"
    assert data.provenance("cifar100", tmp_path, unverified=True) == "fake"


# ------------------------------------------------------------------------------------------
# --data-dir = the extracted folder itself

def test_data_dir_may_be_the_extracted_folder_and_gets_no_lock_file(repacked_cifar100,
                                                                   monkeypatch, offline):
    folder = repacked_cifar100
    _table_of(monkeypatch, "cifar100", folder)
    before = {p.name for p in folder.iterdir()} - {data.STAMP}
    assert data.locate("cifar100", folder) == folder
    assert data.ensure_downloaded("cifar100", folder, progress=False) == folder
    assert data.provenance("cifar100", folder) == "official"
    assert {p.name for p in folder.iterdir()} - {data.STAMP} == before  # no lock, no download
    monkeypatch.undo()  # the real table: verified like any folder, and refused
    monkeypatch.setattr(integrity, "_checked", set())
    with pytest.raises(DataError, match="has MD5"):
        data.ensure_downloaded("cifar100", folder, progress=False)


def test_a_run_reads_the_extracted_folder_given_as_data_dir(tmp_path, offline):
    folder = data.write_fake("cifar10", tmp_path, 40, 10, seed=2)
    whole = data.prepare("cifar10", tmp_path, "search", 3, progress=False)
    direct = data.prepare("cifar10", folder, "search", 3, progress=False)
    for a, b in zip(whole[:4], direct[:4]):
        np.testing.assert_array_equal(a, b)
    assert data.is_fake("cifar10", folder) and data.provenance("cifar10", folder) == "fake"
    assert data.load_raw("cifar10", folder)["x_test"].shape == (10, 3, 32, 32)
    assert not list(folder.glob(".*.lock")) and not list(tmp_path.glob(".*.lock"))
