"""mnist_flax.data: a tiny IDX set the tests write themselves, plus the real MNIST once."""

import functools
import gzip
import hashlib
import http.server
import os
import shutil
import socket
import tempfile
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import idx_bytes
from mnist_flax import config, data, decoded, idx_files
from mnist_flax.errors import DataError

TINY_COUNTS = {"train": 20, "test": 10}


def tiny_idx_set(seed: int = 0) -> dict[str, bytes]:
    """Decompressed IDX bytes of a tiny MNIST look-alike, by file name."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, (images_name, labels_name) in idx_files.SPLIT_FILES.items():
        n = TINY_COUNTS[split]
        arrays[images_name] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[labels_name] = rng.integers(0, 10, (n,), dtype=np.uint8)
    return {name: idx_bytes(a) for name, a in arrays.items()}


def write_set(directory, files: dict[str, bytes], gz: bool = True):
    directory.mkdir(parents=True, exist_ok=True)
    for name, raw in files.items():
        if gz:
            (directory / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (directory / name).write_bytes(raw)
    return directory


def tiny_builder_cls(files: dict[str, bytes], mirrors=(), timeout_s=10.0):
    """A builder expecting exactly `files` (by sha256), with its own name and data dir."""

    class TinyMnist(data.MnistIdx, skip_registration=True):
        EXPECTED_SHA256 = {name: hashlib.sha256(raw).hexdigest() for name, raw in files.items()}
        NUM_EXAMPLES = TINY_COUNTS
        MIRRORS = tuple(mirrors)
        DOWNLOAD_TIMEOUT_S = timeout_s

    return TinyMnist


def expected_arrays(files: dict[str, bytes]) -> data.MnistArrays:
    def body(name, shape):
        raw = files[name]
        return np.frombuffer(raw[4 + 4 * raw[3] :], np.uint8).reshape(shape)

    return data.MnistArrays(
        body("train-images-idx3-ubyte", (20, 28, 28, 1)),
        body("train-labels-idx1-ubyte", (20,)).astype(np.int32),
        body("t10k-images-idx3-ubyte", (10, 28, 28, 1)),
        body("t10k-labels-idx1-ubyte", (10,)).astype(np.int32),
    )


def assert_arrays_equal(actual: data.MnistArrays, expected: data.MnistArrays):
    for field in data.MnistArrays._fields:
        a, e = getattr(actual, field), getattr(expected, field)
        assert a.dtype == e.dtype and a.shape == e.shape, field
        np.testing.assert_array_equal(a, e, err_msg=field)


@pytest.fixture(autouse=True)
def no_data_env(monkeypatch):
    """The builders here read only what each test gives them, whatever the environment says."""
    monkeypatch.delenv(idx_files.MANUAL_DIR_ENV, raising=False)
    monkeypatch.delenv(idx_files.MIRRORS_ENV, raising=False)


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "decompressed"])
def test_round_trip_keeps_values_and_order(tmp_path, gz):
    files = tiny_idx_set()
    manual = write_set(tmp_path / "manual", files, gz=gz)
    builder = tiny_builder_cls(files)(data_dir=tmp_path / "tfds", manual_dir=manual)
    assert_arrays_equal(data.load_builder(builder), expected_arrays(files))


@pytest.mark.parametrize("progress", [True, False], ids=["progress", "no-progress"])
def test_preparing_says_one_line_or_nothing(tmp_path, capfd, progress):
    """Not TFDS's "Downloading and preparing dataset Unknown size" and its bars: one line on stderr,
    once the files are verified, where progress is wanted; nothing with --no-progress, and nothing
    when the data is already prepared."""
    files = tiny_idx_set()
    manual = write_set(tmp_path / "manual", files)
    cls = tiny_builder_cls(files)
    builder = cls(data_dir=tmp_path / "tfds", manual_dir=manual, progress=progress)
    data.load_builder(builder)
    out, err = capfd.readouterr()
    assert out == ""
    if progress:
        assert err == f"MNIST: the four IDX files are verified; preparing them in {builder.data_dir} " \
                      "(once: later runs read it from there)\n"
    else:
        assert err == ""
    data.load_builder(cls(data_dir=tmp_path / "tfds", manual_dir=manual, progress=progress))
    assert capfd.readouterr() == ("", "")


def test_a_failed_prepare_prints_nothing_before_its_error(tmp_path, capfd):
    files = tiny_idx_set()
    manual = write_set(tmp_path / "manual", {**files, "t10k-labels-idx1-ubyte": b"bad"})
    with pytest.raises(DataError):
        data.load_builder(tiny_builder_cls(files)(data_dir=tmp_path / "tfds", manual_dir=manual))
    assert capfd.readouterr() == ("", "")


def test_preparing_leaves_nothing_in_the_temporary_directory(tmp_path, monkeypatch):
    """TFDS's DatasetInfo.initialize_from_bucket makes a directory there before it looks for a
    dataset's info in its bucket, and leaves it behind; every prepare would leave one."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    files = tiny_idx_set()
    manual = write_set(tmp_path / "manual", files)
    data.load_builder(tiny_builder_cls(files)(data_dir=tmp_path / "tfds", manual_dir=manual))
    assert list(scratch.iterdir()) == []


def test_second_load_reuses_prepared_data(tmp_path):
    files = tiny_idx_set()
    manual = write_set(tmp_path / "manual", files)
    cls = tiny_builder_cls(files)
    first = data.load_builder(cls(data_dir=tmp_path / "tfds", manual_dir=manual))
    for path in manual.iterdir():  # The sources are gone: only the prepared data can answer.
        path.unlink()
    manual.rmdir()
    assert_arrays_equal(data.load_builder(cls(data_dir=tmp_path / "tfds", manual_dir=manual)), first)


def test_wrong_hash_names_file_and_both_hashes(tmp_path):
    files = tiny_idx_set()
    good_hash = hashlib.sha256(files["t10k-images-idx3-ubyte"]).hexdigest()
    cls = tiny_builder_cls(files)
    bad = bytearray(files["t10k-images-idx3-ubyte"])
    bad[-1] ^= 0xFF  # Header still fine, one pixel changed.
    manual = write_set(tmp_path / "manual", {**files, "t10k-images-idx3-ubyte": bytes(bad)})
    with pytest.raises(DataError) as e:
        data.load_builder(cls(data_dir=tmp_path / "tfds", manual_dir=manual))
    message = str(e.value)
    assert "t10k-images-idx3-ubyte.gz" in message
    assert good_hash in message and hashlib.sha256(bad).hexdigest() in message
    # A file the user supplied is replaced by hand: deleting it and re-running would not re-download.
    assert "replace it with a good copy" in message and "re-download" not in message


def test_wrong_hash_of_a_download_says_to_delete_it(tmp_path, http_root):
    root, url = http_root
    files = tiny_idx_set()
    bad = bytearray(files["train-labels-idx1-ubyte"])
    bad[-1] = (bad[-1] + 1) % 10
    write_set(root, {**files, "train-labels-idx1-ubyte": bytes(bad)})
    with pytest.raises(DataError) as e:
        data.load_builder(tiny_builder_cls(files, mirrors=[url])(data_dir=tmp_path / "tfds"))
    message = str(e.value)
    assert str(tmp_path / "tfds" / "downloads" / "train-labels-idx1-ubyte.gz") in message
    assert "delete it and run again to re-download" in message and "--manual-dir" in message


def test_concurrent_first_loads_all_succeed(tmp_path):
    # Without the prepare lock, the later writers' renames fail with FileExistsError.
    files = tiny_idx_set()
    manual = write_set(tmp_path / "manual", files)
    cls = tiny_builder_cls(files)
    results, errors = [], []

    def load():
        try:
            results.append(data.load_builder(cls(data_dir=tmp_path / "tfds", manual_dir=manual)))
        except Exception as e:  # noqa: BLE001 - reported below, with its type
            errors.append(e)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for result in results:
        assert_arrays_equal(result, expected_arrays(files))
    assert [p.name for p in (tmp_path / "tfds" / "tiny_mnist").iterdir()] == [str(data.MnistIdx.VERSION)]


def test_prepared_data_loads_where_no_lock_can_be_taken(tmp_path):
    # As in a read-only data dir (which root, running the tests, can still write to).
    files = tiny_idx_set()
    manual = write_set(tmp_path / "manual", files)
    cls = tiny_builder_cls(files)
    data.load_builder(cls(data_dir=tmp_path / "tfds", manual_dir=manual))
    lock = tmp_path / "tfds" / ".tiny_mnist.lock"
    lock.unlink()
    lock.mkdir()  # open() on it fails with an OSError, as on a read-only file system
    assert_arrays_equal(data.load_builder(cls(data_dir=tmp_path / "tfds", manual_dir=manual)), expected_arrays(files))


def test_load_clears_what_a_killed_prepare_left(tmp_path):
    files = tiny_idx_set()
    stale = tmp_path / "tfds" / "tiny_mnist" / f"incomplete.ABC123_{data.MnistIdx.VERSION}"
    stale.mkdir(parents=True)
    (stale / "tiny_mnist-train.array_record-00000-of-00001").write_bytes(b"half written")
    manual = write_set(tmp_path / "manual", files)
    data.load_builder(tiny_builder_cls(files)(data_dir=tmp_path / "tfds", manual_dir=manual))
    assert [p.name for p in (tmp_path / "tfds" / "tiny_mnist").iterdir()] == [str(data.MnistIdx.VERSION)]


def test_failed_prepare_leaves_nothing_that_loads(tmp_path):
    files = tiny_idx_set()
    cls = tiny_builder_cls(files)
    broken = write_set(tmp_path / "broken", {**files, "train-labels-idx1-ubyte": idx_bytes(np.zeros(20, np.uint8))})
    with pytest.raises(DataError):
        data.load_builder(cls(data_dir=tmp_path / "tfds", manual_dir=broken))
    assert not list((tmp_path / "tfds").glob("tiny_mnist/*")), "TFDS left a (partial) dataset behind"
    good = write_set(tmp_path / "good", files)
    assert_arrays_equal(data.load_builder(cls(data_dir=tmp_path / "tfds", manual_dir=good)), expected_arrays(files))


def _corrupt(files, name, fn):
    return {**files, name: fn(files[name])}


MALFORMED = {
    "bad magic": ("train-images-idx3-ubyte", lambda raw: b"\x00\x00\x08\x01" + raw[4:]),
    "not unsigned bytes": ("train-labels-idx1-ubyte", lambda raw: b"\x00\x00\x0d\x01" + raw[4:]),
    "wrong count": ("t10k-labels-idx1-ubyte", lambda raw: idx_bytes(np.zeros(9, np.uint8))),
    "wrong image size": ("t10k-images-idx3-ubyte", lambda raw: idx_bytes(np.zeros((10, 27, 28), np.uint8))),
    "truncated": ("train-images-idx3-ubyte", lambda raw: raw[:-5]),
    "empty": ("train-images-idx3-ubyte", lambda raw: b""),
    "label out of range": ("train-labels-idx1-ubyte", lambda raw: idx_bytes(np.full(20, 10, np.uint8))),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_idx_is_a_data_error(tmp_path, case):
    name, fn = MALFORMED[case]
    files = _corrupt(tiny_idx_set(), name, fn)
    manual = write_set(tmp_path / "manual", files)
    cls = tiny_builder_cls(files)  # Hashes match, so only the structure checks can object.
    with pytest.raises(DataError, match=name):
        data.load_builder(cls(data_dir=tmp_path / "tfds", manual_dir=manual))


def test_bad_gzip_is_a_data_error(tmp_path):
    files = tiny_idx_set()
    manual = write_set(tmp_path / "manual", files)
    (manual / "train-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz"):
        data.load_builder(tiny_builder_cls(files)(data_dir=tmp_path / "tfds", manual_dir=manual))


def test_missing_manual_dir_names_path_and_files(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as e:
        data.load_mnist(data_dir=str(tmp_path / "tfds"), manual_dir=str(missing))
    assert str(missing) in str(e.value)
    assert all(name in str(e.value) for name in idx_files.FILE_NAMES)


def test_manual_dir_comes_from_env(tmp_path, monkeypatch):
    missing = tmp_path / "from_env"
    monkeypatch.setenv(idx_files.MANUAL_DIR_ENV, str(missing))
    with pytest.raises(DataError, match=str(missing)):
        data.load_mnist(data_dir=str(tmp_path / "tfds"))


def test_missing_file_in_manual_dir_names_it(tmp_path):
    files = tiny_idx_set()
    manual = write_set(tmp_path / "manual", files)
    (manual / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as e:
        data.load_builder(tiny_builder_cls(files)(data_dir=tmp_path / "tfds", manual_dir=manual))
    assert str(manual) in str(e.value) and "t10k-labels-idx1-ubyte.gz" in str(e.value)


@pytest.fixture
def http_root(tmp_path):
    """A local HTTP server for `tmp_path/www`; yields (root dir, base url)."""
    root = tmp_path / "www"
    root.mkdir()

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    # shutdown() waits for serve_forever's next poll: its default interval, 0.5 s, was each test's teardown.
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_download_tries_mirrors_in_order(tmp_path, http_root):
    root, url = http_root
    files = tiny_idx_set()
    write_set(root / "good", files)
    cls = tiny_builder_cls(files, mirrors=[f"{url}missing/", f"{url}good/"])
    assert_arrays_equal(data.load_builder(cls(data_dir=tmp_path / "tfds")), expected_arrays(files))
    assert sorted(p.name for p in (tmp_path / "tfds" / "downloads").glob("*.gz")) == sorted(f"{n}.gz" for n in files)


def test_mirrors_come_from_the_environment(tmp_path, http_root, monkeypatch):
    """$MNIST_FLAX_MIRRORS replaces the public mirrors (an organisation's own copy, a test's server)."""
    root, url = http_root
    files = tiny_idx_set()
    write_set(root / "ours", files)
    monkeypatch.setenv(idx_files.MIRRORS_ENV, f" {url}missing/ ,{url}ours/")
    cls = tiny_builder_cls(files, mirrors=["https://unreachable.invalid/"])
    assert_arrays_equal(data.load_builder(cls(data_dir=tmp_path / "tfds")), expected_arrays(files))


@pytest.fixture
def silent_server():
    """A TCP port that accepts connections and never answers: a network that hangs."""
    server = socket.create_server(("127.0.0.1", 0))
    server.listen(8)
    yield f"http://127.0.0.1:{server.getsockname()[1]}/"
    server.close()


def test_no_network_fails_fast_with_instructions(tmp_path, silent_server):
    refused = socket.create_server(("127.0.0.1", 0))
    refused_url = f"http://127.0.0.1:{refused.getsockname()[1]}/"
    refused.close()  # Nothing listens there any more: connection refused.
    files = tiny_idx_set()
    cls = tiny_builder_cls(files, mirrors=[refused_url, silent_server], timeout_s=0.5)
    start = time.monotonic()
    with pytest.raises(DataError) as e:
        data.load_builder(cls(data_dir=tmp_path / "tfds"))
    assert time.monotonic() - start < 5
    message = str(e.value)
    assert "--manual-dir" in message and idx_files.MANUAL_DIR_ENV in message
    assert refused_url in message and silent_server in message
    assert not (tmp_path / "tfds" / "downloads" / "train-images-idx3-ubyte.gz").exists()


def test_default_download_is_https_and_bounded():
    assert data.MnistIdx.MIRRORS and all(m.startswith("https://") for m in data.MnistIdx.MIRRORS)
    assert data.MnistIdx.DOWNLOAD_TIMEOUT_S <= 30


@settings(max_examples=30, deadline=None, derandomize=True)
@given(st.integers(0, 5), st.integers(1, 4), st.integers(1, 4), st.binary(min_size=80, max_size=80))
def test_parse_idx_round_trips(n, h, w, pixels):
    array = np.frombuffer(pixels, np.uint8)[: n * h * w].reshape(n, h, w)
    np.testing.assert_array_equal(idx_files.parse_idx(idx_bytes(array), (n, h, w), "x"), array)


def test_real_mnist(mnist_arrays):
    a = mnist_arrays
    assert a.train_images.shape == (60_000, 28, 28, 1) and a.test_images.shape == (10_000, 28, 28, 1)
    assert a.train_labels.shape == (60_000,) and a.test_labels.shape == (10_000,)
    assert a.train_images.dtype == a.test_images.dtype == np.uint8
    assert a.train_labels.dtype == a.test_labels.dtype == np.int32
    assert a.train_labels[:5].tolist() == [5, 0, 4, 1, 9]
    assert a.test_labels[:5].tolist() == [7, 2, 1, 0, 4]
    for labels, low, high in [(a.train_labels, 5_000, 7_000), (a.test_labels, 800, 1_200)]:
        counts = np.bincount(labels, minlength=10)
        assert len(counts) == 10 and counts.min() > low and counts.max() < high, counts
    assert a.train_images.mean() / 255 == pytest.approx(config.MNIST_MEAN, abs=1e-4)


# --------------------------------------------------------------------------- decoded arrays kept beside TFDS's


def prepared_tiny(tmp_path):
    """A builder class and data dir with the tiny set prepared (and its decoded arrays kept)."""
    files = tiny_idx_set()
    cls = tiny_builder_cls(files)
    manual = write_set(tmp_path / "manual", files)
    data.load_builder(cls(data_dir=tmp_path / "tfds", manual_dir=manual))
    return cls, tmp_path / "tfds", manual, expected_arrays(files)


def load_counting_decodes(cls, data_dir, manual, monkeypatch):
    calls = []
    real = data.decode_split
    monkeypatch.setattr(data, "decode_split", lambda b, split: calls.append(split) or real(b, split))
    return data.load_builder(cls(data_dir=data_dir, manual_dir=manual)), calls


def test_decoded_arrays_are_kept_and_used(tmp_path, monkeypatch):
    cls, data_dir, manual, expected = prepared_tiny(tmp_path)
    arrays, decodes = load_counting_decodes(cls, data_dir, manual, monkeypatch)
    assert decodes == []  # both splits came from the kept arrays
    assert_arrays_equal(arrays, expected)


def test_the_preparing_run_keeps_the_arrays_it_wrote_without_decoding(tmp_path, monkeypatch):
    files = tiny_idx_set()
    manual = write_set(tmp_path / "manual", files)
    arrays, decodes = load_counting_decodes(tiny_builder_cls(files), tmp_path / "tfds", manual, monkeypatch)
    assert decodes == []  # prepared here: the IDX arrays themselves were kept
    assert_arrays_equal(arrays, expected_arrays(files))
    assert all(a.flags.writeable for a in arrays)
    [kept] = (tmp_path / "tfds").glob(f"*/*/{decoded.DIR}")
    shutil.rmtree(kept)  # what TFDS decodes from its records is the same
    assert_arrays_equal(data.load_builder(tiny_builder_cls(files)(data_dir=tmp_path / "tfds", manual_dir=manual)),
                        arrays)


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "delete", "garbage manifest"])
def test_damaged_decoded_arrays_are_decoded_again(tmp_path, monkeypatch, damage):
    cls, data_dir, manual, expected = prepared_tiny(tmp_path)
    [kept] = data_dir.glob(f"*/*/{decoded.DIR}")
    npz = kept / "test.npz"
    if damage == "flip a byte":
        raw = bytearray(npz.read_bytes())
        raw[len(raw) // 2] ^= 0x01  # a pixel, most likely: still a valid .npz, different values
        npz.write_bytes(bytes(raw))
    elif damage == "truncate":
        npz.write_bytes(npz.read_bytes()[:100])
    elif damage == "delete":
        npz.unlink()
    else:
        (kept / decoded.MANIFEST).write_text("{not json")
    arrays, decodes = load_counting_decodes(cls, data_dir, manual, monkeypatch)
    assert_arrays_equal(arrays, expected)
    assert "test" in decodes
    _, decodes = load_counting_decodes(cls, data_dir, manual, monkeypatch)  # rewritten: used again
    assert decodes == []


def test_replaced_tfds_files_invalidate_the_decoded_arrays(tmp_path, monkeypatch):
    cls, data_dir, manual, expected = prepared_tiny(tmp_path)
    [shard] = data_dir.glob("*/*/*-train.array_record*")
    stat = shard.stat()
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # as a re-prepare would
    arrays, decodes = load_counting_decodes(cls, data_dir, manual, monkeypatch)
    assert decodes == ["train"]
    assert_arrays_equal(arrays, expected)


def test_a_read_only_data_dir_still_loads(tmp_path, monkeypatch):
    cls, data_dir, manual, expected = prepared_tiny(tmp_path)
    [kept] = data_dir.glob(f"*/*/{decoded.DIR}")
    shutil.rmtree(kept)
    monkeypatch.setattr(decoded, "atomic_write_bytes", lambda *a: (_ for _ in ()).throw(PermissionError("ro")))
    arrays, decodes = load_counting_decodes(cls, data_dir, manual, monkeypatch)
    assert sorted(decodes) == ["test", "train"]
    assert_arrays_equal(arrays, expected)
