"""S3 storage, plain boto3/pydantic/Pillow code, no Ray.

- ``s3``: settings, bounded clients, prefix downloads (weights);
- ``generations``: the generation layout, ids, encoding and :class:`GenerationStore` (the ResultStore
  deployment's storage);
- ``idempotency_records``: conditional-write records that let ingress replicas agree on idempotency keys;
- ``inputs``: input photos from allowed ``s3://`` buckets;
- ``spool``: a disk spool for generations S3 would not take.
"""

from .generations import (
    GenerationNotFound,
    GenerationStore,
    ImageFormat,
    StorageError,
    StoredGeneration,
    StoredImage,
    encode_image,
    generation_date,
    generation_prefix,
    new_generation_id,
    validate_generation_id,
)
from .s3 import (
    S3Client,
    S3Settings,
    download_prefix,
    ensure_bucket,
    make_client,
    parse_s3_uri,
    validate_bucket_name,
)

__all__ = [
    "GenerationNotFound",
    "GenerationStore",
    "ImageFormat",
    "S3Client",
    "S3Settings",
    "StorageError",
    "StoredGeneration",
    "StoredImage",
    "download_prefix",
    "encode_image",
    "ensure_bucket",
    "generation_date",
    "generation_prefix",
    "make_client",
    "new_generation_id",
    "parse_s3_uri",
    "validate_bucket_name",
    "validate_generation_id",
]
