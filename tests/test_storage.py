"""URIs and paths (indexing/storage.py): what counts as inside the folders an index was built from."""
import pytest

from indexing import storage


def test_a_scheme_inside_a_local_path_does_not_escape_the_roots(tmp_path):
    """`://` in the middle of a path is no URI scheme: the path is local, normalised and resolved
    before the containment check, so `ROOT/a://../../outside` is outside ROOT."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.txt").write_text("not for you")
    sneaky = f"{root}/a://../../outside/secret.txt"
    assert not storage.is_under(sneaky, [str(root)]) and storage.source_path(sneaky, [str(root)]) is None
    with pytest.raises(storage.SourceUnavailable):
        storage.read_source(sneaky, [str(root)])
    assert storage.is_local(sneaky)


def test_real_schemes_and_local_paths_are_told_apart(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    assert storage.relative_to(f"{tmp_path}/a.jpg", [str(tmp_path)]) == "a.jpg"
    assert storage.relative_to(f"file://{tmp_path}/a.jpg", [str(tmp_path)]) == "a.jpg"
    assert storage.relative_to("s3://bucket/photos/a.jpg", ["s3://bucket/photos"]) == "a.jpg"
    assert storage.relative_to("s3://bucket/photos/../a.jpg", ["s3://bucket/photos"]) is None
    assert storage.relative_to("s3://bucket/photos/a.jpg", ["gs://bucket/photos"]) is None
    assert not storage.is_local("s3://bucket/a.jpg") and storage.is_local(f"file://{tmp_path}/a.jpg")
    assert storage.read_source(f"{tmp_path}/a.jpg", [str(tmp_path)]) == b"x"
