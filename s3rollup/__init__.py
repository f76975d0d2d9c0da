"""s3rollup: secure, event-driven, incremental per-group statistics over part files in S3."""

__version__ = "0.1.0"
