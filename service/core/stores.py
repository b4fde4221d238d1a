"""Which blob store a process uses: S3 when ``KDQ_STORAGE_URL`` is set, else the local directory
(the embedded default, unchanged)."""

from __future__ import annotations

from .settings import Settings
from .store import BlobStore, make_store


def store_for(settings: Settings) -> BlobStore:
    if settings.storage_url:
        from .s3store import S3Store  # boto3 only where S3 is configured

        return S3Store.from_settings(settings)
    assert settings.storage_dir is not None
    return make_store(settings.storage_dir)


def is_remote(store: object) -> bool:
    """Whether the store is shared by every host (S3): checkpoints then go there too."""
    return bool(getattr(store, "remote", False))
