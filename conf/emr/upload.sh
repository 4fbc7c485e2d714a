#!/usr/bin/env bash
# Build what conf/emr/step.json and bootstrap.sh reference and upload it:
#   the wheel (bootstrap.sh pip-installs it, with its dependencies, on every node) and the package zip
#   (step.json puts it on --py-files: PySpark adds .zip files to the executors' path, never wheels).
# Usage: conf/emr/upload.sh s3://my-bucket/mfdist
set -euo pipefail
dest="${1:?usage: upload.sh s3://bucket/prefix}"
cd "$(dirname "$0")/../.."
python3 -m pip wheel --no-deps -w dist .
python3 jobs/package.py --out dist/mfdist-0.1.0.zip
aws s3 cp dist/mfdist-0.1.0-py3-none-any.whl "$dest/"
aws s3 cp dist/mfdist-0.1.0.zip "$dest/"
aws s3 cp jobs/train.py "$dest/jobs/train.py"
aws s3 cp jobs/gc.py "$dest/jobs/gc.py"
aws s3 cp conf/prod.yaml "$dest/conf/prod.yaml"
aws s3 cp conf/emr/bootstrap.sh "$dest/bootstrap.sh"
