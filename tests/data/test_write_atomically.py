"""The locked, atomic folder swap behind both synthetic-dataset generators."""

import os

import pytest

from seg_methods.data.datasets._synthetic import write_atomically


def _write(files):
    def write(folder):
        for name, text in files.items():
            with open(os.path.join(folder, name), "w") as f:
                f.write(text)

    return write


def test_writes_swaps_and_respects_done(tmp_path):
    root = str(tmp_path / "ds")
    assert write_atomically(root, _write({"a.txt": "1"}), {"v": 1}, lambda: False)
    assert sorted(os.listdir(root)) == ["a.txt", "params.json"]
    # an existing dataset is replaced whole (no file of the old one survives)
    assert write_atomically(root, _write({"b.txt": "2"}), {"v": 2}, lambda: False)
    assert sorted(os.listdir(root)) == ["b.txt", "params.json"]
    # done(): nothing is written
    assert not write_atomically(root, _write({"c.txt": "3"}), {"v": 3}, lambda: True)
    assert sorted(os.listdir(root)) == ["b.txt", "params.json"]
    assert sorted(os.listdir(tmp_path)) == ["ds"]  # no temp or stale folder left


def test_an_interrupted_write_leaves_the_old_dataset_and_no_temp(tmp_path):
    root = str(tmp_path / "ds")
    write_atomically(root, _write({"a.txt": "1"}), {"v": 1}, lambda: False)

    def failing(folder):
        _write({"half.txt": "x"})(folder)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(root, failing, {"v": 2}, lambda: False)
    assert sorted(os.listdir(root)) == ["a.txt", "params.json"]
    assert sorted(os.listdir(tmp_path)) == ["ds"]
    # leftovers of a killed run (temp / stale folders) are removed by the next call
    os.makedirs(tmp_path / "ds.tmp-dead")
    os.makedirs(tmp_path / "ds.stale-123")
    write_atomically(root, _write({"b.txt": "2"}), {"v": 3}, lambda: False)
    assert sorted(os.listdir(tmp_path)) == ["ds"]
