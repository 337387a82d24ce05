"""freeze_startup_objects, which the server and the dispatcher call once loaded."""

from __future__ import annotations


def test_freeze_startup_objects_takes_them_out_of_collections() -> None:
    import gc

    from serving.common.startup import freeze_startup_objects

    try:
        freeze_startup_objects()
        frozen = gc.get_freeze_count()
        assert frozen > 1000  # this test process has imported grpc, numpy, onnxruntime...
        assert len(gc.get_objects(generation=2)) < frozen  # what a full collection still walks
    finally:
        gc.unfreeze()

