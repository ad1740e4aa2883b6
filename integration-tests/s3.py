"""Helpers for the S3 test, talking to the local moto server with boto3 and pyarrow.

    s3.py ENDPOINT create BUCKET
    s3.py ENDPOINT read BUCKET PREFIX   -> prints "<files> <rows> <distinct (partition, offset)>"
    s3.py ENDPOINT put BUCKET KEY FILE
    s3.py ENDPOINT list BUCKET PREFIX   -> prints the keys, one a line
"""
import io
import os
import sys

import boto3
import pyarrow.parquet as pq

endpoint, command, bucket = sys.argv[1], sys.argv[2], sys.argv[3]
s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test",
                  aws_secret_access_key="test", region_name="us-east-1")
if command == "create":
    s3.create_bucket(Bucket=bucket)
elif command == "put":
    s3.put_object(Bucket=bucket, Key=sys.argv[4], Body=open(sys.argv[5], "rb").read())
elif command == "list":
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=sys.argv[4]):
        for o in page.get("Contents", []):
            print(o["Key"])
elif command == "read":
    prefix = sys.argv[4]
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    files = [k for k in keys if k.endswith(".parquet") and "/_sluice/" not in k]
    assert any("/_sluice/manifests/" in k for k in keys), f"no manifest in {keys}"
    rows, seen = 0, set()
    for key in files:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        table = pq.read_table(io.BytesIO(body))
        rows += table.num_rows
        seen.update(zip(table.column("_partition").to_pylist(), table.column("_offset").to_pylist()))
    print(len(files), rows, len(seen), flush=True)
    # pyarrow's thread pool can abort at interpreter exit after many reads; skip that teardown.
    os._exit(0)
