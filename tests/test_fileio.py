"""write_atomically: whole files or the previous file, never a half-written one."""

import pytest

from cnnjax import fileio


def test_writes_and_replaces_whole_files_in_new_directories(tmp_path):
  path = tmp_path / "new" / "status.json"
  fileio.write_atomically(path, '{"a": 1}')
  fileio.write_atomically(path, b'{"a": 2}')
  assert path.read_text() == '{"a": 2}'
  assert [p.name for p in path.parent.iterdir()] == ["status.json"]


def test_a_failed_write_keeps_the_previous_file_and_no_temporary(tmp_path):
  path = tmp_path / "status.json"
  fileio.write_atomically(path, "previous")
  with pytest.raises(TypeError):
    fileio.write_atomically(path, 12345)  # not bytes: fails inside the write
  assert path.read_text() == "previous"
  assert [p.name for p in tmp_path.iterdir()] == ["status.json"]
