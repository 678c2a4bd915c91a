import pytest

from lvm_pl import atomic


def test_atomic_write_replaces_whole_file(tmp_path):
    p = tmp_path / "a" / "out.json"
    atomic.write_json(p, {"x": 1})
    atomic.write_json(p, {"x": 2})
    assert p.read_text().strip().endswith("}")
    assert '"x": 2' in p.read_text()
    assert [f.name for f in p.parent.iterdir()] == ["out.json"]


def test_failure_leaves_previous_file_and_no_temp(tmp_path):
    p = tmp_path / "out.txt"
    atomic.write_text(p, "good")
    with pytest.raises(RuntimeError), atomic.atomic_path(p) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert p.read_text() == "good"
    assert [f.name for f in tmp_path.iterdir()] == ["out.txt"]


def test_outputs_get_the_permissions_of_a_plain_open(tmp_path):
    plain, atomic_file = tmp_path / "plain.txt", tmp_path / "atomic.txt"
    plain.write_text("x")
    atomic.write_text(atomic_file, "x")
    assert atomic_file.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_atomic_dir_appears_whole_or_not_at_all(tmp_path):
    out = tmp_path / "model"
    with pytest.raises(RuntimeError), atomic.atomic_dir(out) as tmp:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("killed before the weights")
    assert list(tmp_path.iterdir()) == []
    out.mkdir()  # an empty directory is taken over
    with atomic.atomic_dir(out) as tmp:
        (tmp / "config.json").write_text("{}")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "weights.bin").write_bytes(b"w")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["config.json", "sub", "sub/weights.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    plain = tmp_path / "plain"
    plain.mkdir()
    assert out.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
