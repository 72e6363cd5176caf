"""Where an experiment lives (distributed/tuner.py): storage URIs, and what trials on other nodes
need to reach them.

Storage URIs: a local path or file:// (made absolute), s3://bucket/prefix (endpoint and keys from
the standard AWS_* variables, e.g. AWS_ENDPOINT_URL for MinIO or moto), gs://bucket/prefix (gcsfs;
credentials from GOOGLE_APPLICATION_CREDENTIALS).

Two clients write a remote experiment: our Store (fsspec: s3fs, gcsfs) and Ray Tune itself, which
opens the storage URI with pyarrow.fs.FileSystem.from_uri (S3FileSystem, GcsFileSystem; nothing is
passed as RunConfig.storage_filesystem). On gs:// both find real GCS by default credentials; an
emulator needs each client's variable: STORAGE_EMULATOR_HOST (gcsfs) and
CLOUD_STORAGE_EMULATOR_ENDPOINT (pyarrow's google-cloud-cpp, which still resolves default
credentials there: GOOGLE_APPLICATION_CREDENTIALS naming any service-account key, else it waits
minutes on the GCE metadata server). One without the other is refused (check_gcs_emulator).
"""

from __future__ import annotations

import os

from ..config import local_path
from ..errors import UsageError
from ..storage import Store

# Storage settings (never secrets) that trials on other nodes need to reach the same store.
FORWARD_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "STORAGE_EMULATOR_HOST",
    "CLOUD_STORAGE_EMULATOR_ENDPOINT",
)


def normalize_storage(uri: str) -> str:
    """Absolute local path for local/file:// URIs; remote URIs unchanged (no trailing slash)."""
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return local_path(uri) if "://" not in uri else uri.rstrip("/")


def _emulator(variable: str) -> str | None:
    """An emulator variable's endpoint as a URL (gcsfs adds http:// and ignores `default`)."""
    value = os.environ.get(variable, "").strip().rstrip("/")
    if value in ("", "default"):
        return None
    return value if "://" in value else f"http://{value}"


def check_gcs_emulator(uri: str, field: str) -> None:
    """A UsageError, naming `field`, when only one of the two gs:// clients is sent to an emulator
    (see the module docstring): our files would land in one place and Tune's state in another, or
    Tune would wait minutes for credentials. Nothing to check off gs:// or with neither variable set."""
    if not uri.startswith("gs://"):
        return
    ours, tunes = _emulator("STORAGE_EMULATOR_HOST"), _emulator("CLOUD_STORAGE_EMULATOR_ENDPOINT")
    if ours == tunes:
        return
    if tunes is None:
        fix = (
            f"STORAGE_EMULATOR_HOST={ours} sends distsearch's files to an emulator, but Ray Tune writes its "
            f"own state through pyarrow, which reads CLOUD_STORAGE_EMULATOR_ENDPOINT: set it to {ours} too, "
            "with GOOGLE_APPLICATION_CREDENTIALS naming a service-account key file (any key: pyarrow signs "
            "with it, an emulator ignores it)"
        )
    elif ours is None:
        fix = (
            f"CLOUD_STORAGE_EMULATOR_ENDPOINT={tunes} sends Ray Tune's state to an emulator, but distsearch's "
            f"files go through gcsfs, which reads STORAGE_EMULATOR_HOST: set it to {tunes} too (with "
            "FSSPEC_GS_TOKEN=anon)"
        )
    else:
        fix = (
            f"STORAGE_EMULATOR_HOST ({ours}, distsearch's files) and CLOUD_STORAGE_EMULATOR_ENDPOINT "
            f"({tunes}, Ray Tune's state) name different emulators: set both to the same one"
        )
    raise UsageError(f"{field}: {uri}: {fix}")


def check_storage(uri: str, field: str = "tune.storage") -> None:
    """One clear UsageError, naming `field`, when the storage URI cannot be opened or written
    (creates nothing), or when gs://'s two clients would not reach the same GCS (check_gcs_emulator)."""
    check_gcs_emulator(uri, field)
    Store(uri, field=field).check_writable()
