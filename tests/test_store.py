import numpy as np
import pytest
import xarray as xr

from zooaudit.errors import ZooauditError
from zooaudit.store import (
    Store,
    find_commit,
    open_group,
    resolve_store_url,
    write_dataset,
)


def test_store_url_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("ZOOAUDIT_STORE", raising=False)
    assert resolve_store_url(str(tmp_path)) == f"file://{tmp_path}"
    assert resolve_store_url(None).endswith("/zooaudit-store")
    monkeypatch.setenv("ZOOAUDIT_STORE", str(tmp_path / "x"))
    assert resolve_store_url(None) == f"file://{tmp_path / 'x'}"
    assert resolve_store_url("s3://bucket/some/prefix/") == "s3://bucket/some/prefix"


@pytest.mark.parametrize("url,match", [("ftp://host/x", "Unknown store URL scheme 'ftp'"),
                                       ("s3://ab/x", "bucket names must be 3–63")])
def test_bad_store_urls(url, match):
    with pytest.raises(ZooauditError, match=match):
        resolve_store_url(url)


def test_commit_carries_cache_key_and_failed_write_commits_nothing(store_url):
    store = Store.open(store_url)
    repo = store.model_repo("m")
    ds = xr.Dataset({"v": ("sample", np.arange(3.0))}, coords={"sample": [10, 11, 12]})
    snap = store.model_repository("m").commit(lambda s: write_dataset(s, ds, "g"), message="x",
                  metadata={"cache_key": "k1", "stage": "test"})
    assert find_commit(repo, "k1") == snap
    assert find_commit(repo, "missing") is None

    def boom(session):
        write_dataset(session, ds * 2, "g")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        store.model_repository("m").commit(boom, message="y", metadata={"cache_key": "k2"})
    assert repo.lookup_branch("main") == snap
    xr.testing.assert_identical(open_group(repo, "g").load(), ds)
