"""Verification .bin files: round trip, insightface compatibility, refusal of code-running pickles."""
import os
import pickle

import numpy as np
import pytest

from data import DataError, decode_image, encode_image, load_bin, write_bin


def _images(n):
    rng = np.random.default_rng(0)
    return [encode_image(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(n)]


def test_round_trip(tmp_path):
    images, issame = _images(6), [True, False, True]
    path = tmp_path / "x.bin"
    write_bin(path, images, issame)
    got, flags = load_bin(path)
    assert got == images and flags.dtype == bool and flags.tolist() == issame
    assert decode_image(got[0]).shape == (16, 16, 3)
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]  # no temporary left behind


def test_readable_by_insightface_loader(tmp_path):
    """insightface: ``bins, issame_list = pickle.load(open(path, 'rb'), encoding='bytes')``."""
    images = _images(4)
    path = tmp_path / "lfw.bin"
    write_bin(path, images, np.array([1, 0]))
    with open(path, "rb") as f:
        bins, issame_list = pickle.load(f, encoding="bytes")
    assert isinstance(bins, list) and all(type(b) is bytes for b in bins) and bins == images
    assert issame_list == [True, False] and all(type(v) is bool for v in issame_list)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_loads_other_writers_layouts(tmp_path, protocol):
    """Protocol 2 (bytes via _codecs.encode), numpy bool arrays / scalars, bytearray, uint8 arrays."""
    images = _images(4)
    path = tmp_path / "old.bin"
    mixed = [images[0], bytearray(images[1]), np.frombuffer(images[2], np.uint8), images[3]]
    for issame in (np.array([True, False]), [np.bool_(True), np.bool_(False)]):
        with open(path, "wb") as f:
            pickle.dump((mixed, issame), f, protocol=protocol)
        got, flags = load_bin(path)
        assert got == images and flags.tolist() == [True, False]


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    with open(path, "wb") as f:
        pickle.dump((_images(2), [_Exploit(marker)]), f, protocol=2)
    with pytest.raises(DataError, match=r"evil\.bin.*(posix|os)\.system"):
        load_bin(path)
    assert not marker.exists()


@pytest.mark.parametrize("global_name", [b"builtins\neval", b"numpy\nload", b"_codecs\ndecode", b"os\nkill"])
def test_other_globals_refused(tmp_path, global_name):
    path = tmp_path / "g.bin"
    path.write_bytes(b"c" + global_name + b"\n.")
    with pytest.raises(DataError, match="refused"):
        load_bin(path)


def test_codecs_encode_limited_to_latin1(tmp_path):
    path = tmp_path / "c.bin"
    # _codecs.encode("x", "rot13") then STOP
    path.write_bytes(b"c_codecs\nencode\n(X\x01\x00\x00\x00xX\x05\x00\x00\x00rot13tR.")
    with pytest.raises(DataError, match="rot13"):
        load_bin(path)


@pytest.mark.parametrize(
    "payload,message",
    [
        ((["a"], [True]), "image 0 is str"),
        (([b"a", b"b", b"c"], [True]), "3 images for 1 pairs"),
        (([b"a", b"b"], [[True]]), "flat list"),
        (([b"a", b"b"], [2]), "other than 0/1"),
        ({"bins": []}, "expected a pickled"),
        (([b"a", b"b"],), "expected a pickled"),
    ],
)
def test_wrong_structure(tmp_path, payload, message):
    path = tmp_path / "w.bin"
    path.write_bytes(pickle.dumps(payload, protocol=4))
    with pytest.raises(DataError, match=message):
        load_bin(path)


def test_not_a_pickle_and_missing(tmp_path):
    path = tmp_path / "n.bin"
    path.write_bytes(b"\x89PNG not a pickle")
    with pytest.raises(DataError, match=r"n\.bin"):
        load_bin(path)
    path.write_bytes(pickle.dumps(([b"a", b"b"], [True]))[:-5])  # truncated
    with pytest.raises(DataError, match=r"n\.bin"):
        load_bin(path)
    with pytest.raises(FileNotFoundError):
        load_bin(tmp_path / "missing.bin")


def test_write_bin_validates(tmp_path):
    with pytest.raises(ValueError, match="3 images for 1 pairs"):
        write_bin(tmp_path / "v.bin", [b"a", b"b", b"c"], [True])
    assert not list(tmp_path.iterdir())


def test_bytearray_only_from_bytes(tmp_path):
    path = tmp_path / "b.bin"
    path.write_bytes(b"cbuiltins\nbytearray\n(J\x00\x00\x00\x40tR.")  # bytearray(2**30)
    with pytest.raises(DataError, match="bytearray"):
        load_bin(path)


def test_python2_pickle(tmp_path):
    """Published files are Python-2 pickles: str images (SHORT_BINSTRING) must come back as bytes."""
    path = tmp_path / "py2.bin"
    path.write_bytes(b"\x80\x02](U\x02abU\x02cde]\x88a\x86.")  # ([str 'ab', str 'cd'], [True]) from Python 2
    images, issame = load_bin(path)
    assert images == [b"ab", b"cd"] and issame.tolist() == [True]
