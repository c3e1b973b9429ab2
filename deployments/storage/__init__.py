"""S3 storage: settings and clients (``s3``) and the generation result store (``results``).

Plain boto3/pydantic/Pillow code, no Ray: the ResultStore Serve deployment and the CLI both use it.
"""

from .results import (
    GenerationNotFound,
    ImageFormat,
    ResultWriter,
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
    "ImageFormat",
    "ResultWriter",
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
