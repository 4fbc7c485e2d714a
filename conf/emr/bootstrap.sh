#!/usr/bin/env bash
# EMR bootstrap action: install the mfdist wheel (and its dependencies) on every node.
# Usage: --bootstrap-actions Path=s3://my-bucket/mfdist/bootstrap.sh,Args=[s3://my-bucket/mfdist/mfdist-0.1.0-py3-none-any.whl]
set -euo pipefail
wheel="$1"
aws s3 cp "$wheel" /tmp/
sudo python3 -m pip install "/tmp/$(basename "$wheel")"
