"""Bulk captioning, the pure half: no Ray here. Its modules are the stages of a caption job:

    reader.py   input records -> fixed shards (the unit of work and of resume); each image's bytes
    decode.py   a shard's bytes -> decoded images at every input size the bundles need
    worker.py   CaptionWorker: hosts every bundle, captions a shard, writes each model's part
    writer.py   where parts go, the resume plan (plan.json), reading the parts back
    summary.py  one row per model from the parts written
    schema.py   the output tables' schemas, declared once

capfleet.cluster.caption_pipeline wires them into a Ray Data pipeline; a test can call every
stage on a hand-built batch.
"""
