#!/usr/bin/env bash
# Copy the training cache (geopose-ray prepare) from an object store to this node's disk, once per node.
#
#   launch/sync-cache.sh s3://YOUR-BUCKET/geopose/cache-1024 /data/geopose/cache-1024
#
# The source is any URI pyarrow reads (s3://, gs://, file:// in the tests), with the node's own credentials
# (instance profile, service account, workload identity): nothing to configure here. The copy goes to a
# temporary directory next to the destination and is renamed into place when complete, so a killed sync or
# two syncs at once (pods sharing a node) never leave a half cache behind; a destination that is already a
# complete copy (it holds .geopose-synced) is left alone. PYTHON (default: python) must have pyarrow, as
# every Ray image does.
set -euo pipefail

if [[ $# -ne 2 ]]; then
	echo "usage: launch/sync-cache.sh SOURCE_URI DEST_DIR" >&2
	exit 2
fi
src="${1%/}"
dest="${2%/}"
marker=.geopose-synced

if [[ -f "$dest/$marker" ]]; then
	echo "cache: $dest is already a copy of $(cat "$dest/$marker")"
	exit 0
fi
if [[ -e "$dest" ]]; then
	echo "cache: $dest exists but is not a complete copy (no $marker): remove it and run again" >&2
	exit 1
fi
mkdir -p "$(dirname "$dest")"
tmp="$(mktemp -d "$dest.partial.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

start=$SECONDS
"${PYTHON:-python}" - "$src" "$tmp" <<'PY'
import sys

import pyarrow.fs as pafs

src, dst = sys.argv[1], sys.argv[2]
fs, path = pafs.FileSystem.from_uri(src)
info = fs.get_file_info(path)
if info.type != pafs.FileType.Directory:
    sys.exit(f"cache: {src} is not a directory in the object store (nothing copied)")
pafs.copy_files(path, dst, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem(),
                chunk_size=8 << 20, use_threads=True)
PY
if [[ ! -f "$tmp/cache.json" ]]; then
	echo "cache: $src has no cache.json: it is not a training cache (geopose-ray prepare writes one)" >&2
	exit 1
fi
echo "$src" >"$tmp/$marker"

if mv -T "$tmp" "$dest" 2>/dev/null; then
	trap - EXIT
	echo "cache: $src -> $dest in $((SECONDS - start)) s"
elif [[ -f "$dest/$marker" ]]; then
	echo "cache: another sync finished $dest first; keeping that copy"
else
	echo "cache: could not move the copy into $dest" >&2
	exit 1
fi
