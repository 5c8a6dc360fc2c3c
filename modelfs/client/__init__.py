"""``modelfs.client``: the Python API apps use to get models, in llamadart's shape.

    from modelfs.client import ModelSource, ModelLoadOptions, open_manager

    manager = open_manager()            # the shared store if its daemon answers, else a local cache
    entry = manager.ensure_model(ModelSource.parse("hf://org/repo/model.gguf"))
    print(entry.file_path)

The public surface is this module's ``__all__`` (``tests/test_client.py`` pins it);
the implementation lives in private modules: ``_source`` (ModelSource,
ModelLoadOptions), ``_entry`` (ModelCacheEntry), ``_manager`` (the manager protocol,
stages, cancel tokens), ``_local`` (the app-local cache), ``_shared`` (the daemon's
socket), ``_controller`` (one download's snapshots), ``_aio`` (the async face),
``_open`` (open_manager).
"""

from ._aio import AsyncModelDownloadManager
from ._controller import DownloadSnapshot, ModelDownloadController
from ._entry import LLAMADART_FIELDS, ModelCacheEntry
from ._local import LocalModelDownloadManager, default_root
from ._manager import Cancelled, CancelToken, DownloadEvent, ModelDownloadManager, Stage
from ._open import open_manager
from ._shared import SharedStoreManager
from ._source import CachePolicy, ModelLoadOptions, ModelSource, SourceKind

__all__ = [
    "LLAMADART_FIELDS", "AsyncModelDownloadManager", "CachePolicy", "CancelToken", "Cancelled", "DownloadEvent",
    "DownloadSnapshot", "LocalModelDownloadManager", "ModelCacheEntry", "ModelDownloadController",
    "ModelDownloadManager", "ModelLoadOptions", "ModelSource", "SharedStoreManager", "SourceKind", "Stage",
    "default_root", "open_manager",
]
