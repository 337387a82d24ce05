"""Process set-up shared by the gRPC server and the dispatcher."""

from __future__ import annotations

import gc


def freeze_startup_objects() -> None:
    """Move everything allocated so far (model, libraries: ~50k objects) out of the garbage collector's
    reach. Measured on the gRPC server under load: a full collection walked them in 33-40 ms, twice in
    20 s, with the whole process stopped; frozen, full collections took under 1 ms. Call once, after
    loading the model and before serving."""
    gc.collect()
    gc.freeze()
