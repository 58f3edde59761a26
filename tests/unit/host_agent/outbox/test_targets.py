"""`target_for` reads artifacts URIs as the substrates write them; DirectoryTarget copies whole files only."""

from __future__ import annotations

from pathlib import Path

import pytest

from host_agent.outbox import ArtifactsUriError, DirectoryTarget, S3Target, target_for


@pytest.fixture(autouse=True)
def _offline_aws(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building an S3 client needs a region and nothing else; make sure nothing reaches out for one."""
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.mark.parametrize(
    ("uri", "bucket", "prefix", "object_key"),
    [
        ("s3://km-artifacts", "km-artifacts", "", "agent-runs/sb/r/status"),
        ("s3://km-artifacts/", "km-artifacts", "", "agent-runs/sb/r/status"),
        ("s3://km-artifacts/team/a/", "km-artifacts", "team/a", "team/a/agent-runs/sb/r/status"),
    ],
)
def test_s3_uris_name_a_bucket_and_prefix(uri: str, bucket: str, prefix: str, object_key: str) -> None:
    target = target_for(uri)
    assert isinstance(target, S3Target)
    assert (target.bucket, target.prefix, target.object_key("agent-runs/sb/r/status")) == (bucket, prefix, object_key)


@pytest.mark.parametrize(
    ("uri", "root"),
    [
        ("file:///var/km/artifacts", "/var/km/artifacts"),
        ("/var/km/a%20b", "/var/km/a%20b"),
        ("file:///var/km/a%20b", "/var/km/a b"),
    ],
)
def test_file_uris_and_absolute_paths_name_a_directory(uri: str, root: str) -> None:
    target = target_for(uri)
    assert isinstance(target, DirectoryTarget)
    assert target.root == Path(root)


@pytest.mark.parametrize("uri", ["s3://", "artifacts/relative", "https://example.com/x", "file://otherhost/x", ""])
def test_unusable_uris_are_refused_with_the_uri_in_the_message(uri: str) -> None:
    with pytest.raises(ArtifactsUriError, match="expected s3://"):
        target_for(uri)


def test_directory_target_replaces_whole_files_and_leaves_no_temp_files(tmp_path: Path) -> None:
    source = tmp_path / "result.json"
    target = DirectoryTarget(tmp_path / "artifacts")
    for content in (b'{"status": "running"}', b'{"status": "succeeded"}'):
        source.write_bytes(content)
        target.put("agent-runs/sb/run-1/result.json", source)
    run_dir = tmp_path / "artifacts" / "agent-runs" / "sb" / "run-1"
    assert [p.name for p in run_dir.iterdir()] == ["result.json"]
    assert (run_dir / "result.json").read_bytes() == b'{"status": "succeeded"}'


@pytest.mark.parametrize("key", ["../escape", "/etc/passwd", "a/./b", "a//b", ""])
def test_directory_target_refuses_keys_that_leave_its_root(tmp_path: Path, key: str) -> None:
    source = tmp_path / "f"
    source.write_bytes(b"x")
    with pytest.raises(ValueError, match="invalid upload key"):
        DirectoryTarget(tmp_path / "artifacts").put(key, source)


def test_directory_target_raises_oserror_when_the_store_is_unusable(tmp_path: Path) -> None:
    source = tmp_path / "f"
    source.write_bytes(b"x")
    (tmp_path / "artifacts").write_bytes(b"a file where the directory should be")
    with pytest.raises(OSError):
        DirectoryTarget(tmp_path / "artifacts").put("agent-runs/sb/r/f", source)
