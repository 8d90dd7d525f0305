#!/usr/bin/env bash
# Determined startup hook: makes sure the COCO annotation files exist under the data root before
# the trial starts, downloading and unpacking them at most once per data root.
#
# Environment (set in the experiment YAML's environment.environment_variables):
#   DATA_ROOT           dataset folder; default: the experiment's data.root, read from Determined's
#                       cluster info, when data.backend is disk. Nothing to do without one.
#   ANNOTATION_FILES    space-separated paths relative to the data root, also their names in the zip
#                       (default: annotations/instances_{train,val}2017.json).
#   ANNOTATIONS_URL     http(s):// or gs:// URL of the zip (default: the official COCO 2017 one).
#   ANNOTATIONS_SHA256  expected SHA-256 of the zip; recommended (else only its CRCs are checked).
#
# Containers on one host may run this at once: the download happens under a flock in the data root,
# and files reach their final paths only by rename within that filesystem, complete.

# Determined *sources* this file from its entrypoint (which runs under set -e), so run the body in a
# child bash: its exit, shell options and traps must not end or change the entrypoint's shell.
if [[ ${BASH_SOURCE[0]} != "$0" ]]; then
    bash "${BASH_SOURCE[0]}"
    return
fi
set -euo pipefail

say() { echo "startup-hook: $*"; }
die() {
    echo "startup-hook: error: $*" >&2
    exit 1
}

PYTHON=${DET_PYTHON_EXECUTABLE:-python3}
URL=${ANNOTATIONS_URL:-https://images.cocodataset.org/annotations/annotations_trainval2017.zip}
DEFAULT_FILES="annotations/instances_train2017.json annotations/instances_val2017.json"
read -r -a FILES <<<"${ANNOTATION_FILES:-$DEFAULT_FILES}"
((${#FILES[@]})) || die "ANNOTATION_FILES is empty"
for f in "${FILES[@]}"; do
    [[ $f != /* && /$f/ != */../* ]] || die "ANNOTATION_FILES: $f is not inside the data root"
done
[[ $URL =~ ^(https?|gs):// ]] || die "ANNOTATIONS_URL $URL: use an http://, https:// or gs:// URL"

if [[ -z ${DATA_ROOT:-} ]]; then
    # user_data is the experiment's data section in trials and {} in other tasks (notebooks, ...).
    data=$("$PYTHON" -c 'import determined as det
info = det.get_cluster_info()
data = info.user_data if info else {}
print(data.get("backend", "disk") if info else "")
print(data.get("root") or "")') ||
        die "could not read the experiment's data section from Determined's cluster info"
    mapfile -t lines <<<"$data"
    backend=${lines[0]-} DATA_ROOT=${lines[1]-}
    if [[ -z $backend ]]; then
        say "no DATA_ROOT and no Determined cluster info: nothing to do"
        exit 0
    elif [[ $backend != disk ]]; then
        say "data.backend is $backend, not disk: nothing to do"
        exit 0
    elif [[ -z $DATA_ROOT ]]; then
        say "no DATA_ROOT and no data.root in the experiment: nothing to do"
        exit 0
    fi
fi
[[ -d $DATA_ROOT ]] ||
    die "data root $DATA_ROOT does not exist; check data.root (or DATA_ROOT) and bind_mounts"

find_missing() {  # sets MISSING to the annotation files that are absent or empty
    MISSING=()
    for f in "${FILES[@]}"; do [[ -s $DATA_ROOT/$f ]] || MISSING+=("$f"); done
}
find_missing
if ((${#MISSING[@]} == 0)); then
    say "annotation files present in $DATA_ROOT: nothing to do"
    exit 0
fi
# -w also fails for root on a read-only mount; the lock and temporaries need the data root itself,
# since only it is shared between containers (each has its own /tmp) and renames stay within it.
[[ -w $DATA_ROOT ]] || die "data root $DATA_ROOT is read-only and lacks ${MISSING[*]}:" \
    "mount it writable (bind_mounts read_only: false) or provide the files"

LOCK=$DATA_ROOT/.startup-hook.lock
exec 9>>"$LOCK"
if ! flock -n 9; then
    say "another container is fetching the annotations; waiting for $LOCK"
    flock 9
fi
find_missing
if ((${#MISSING[@]} == 0)); then
    say "annotation files placed in $DATA_ROOT by another container: nothing to do"
    exit 0
fi
for f in "${MISSING[@]}"; do
    dir=$(dirname "$DATA_ROOT/$f")
    if ! { mkdir -p "$dir" && [[ -w $dir ]]; }; then die "cannot write to $dir"; fi
done

# Holding the lock, any temporaries left here are from a killed run; ours go beside the targets.
rm -rf "$DATA_ROOT"/.startup-hook-tmp.*
TMP=$(mktemp -d "$DATA_ROOT/.startup-hook-tmp.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
trap 'exit 130' INT; trap 'exit 143' TERM  # so that the EXIT trap runs
ZIP=$TMP/annotations.zip

say "fetching ${MISSING[*]} from $URL"
case $URL in
gs://*)
    "$PYTHON" - "$URL" "$ZIP" <<'EOF' || die "could not download $URL"
import sys
from google.cloud import storage

bucket, _, blob = sys.argv[1].removeprefix("gs://").partition("/")
storage.Client().bucket(bucket).blob(blob).download_to_filename(sys.argv[2])
EOF
    ;;
*)
    if command -v curl >/dev/null; then
        curl -fsSL --retry 3 --connect-timeout 30 -o "$ZIP" "$URL" ||
            die "could not download $URL (curl exit $?)"
    else
        "$PYTHON" - "$URL" "$ZIP" <<'EOF' || die "could not download $URL"
import shutil, sys, urllib.request

try:
    with urllib.request.urlopen(sys.argv[1], timeout=30) as r, open(sys.argv[2], "wb") as f:
        shutil.copyfileobj(r, f)
        # read() returns short data, without an error, when the server closes early.
        if r.headers["Content-Length"] not in (None, str(f.tell())):
            raise OSError("connection closed before the end of the file")
except OSError as e:
    sys.exit(f"urllib: {e}")
EOF
    fi
    ;;
esac

if [[ -n ${ANNOTATIONS_SHA256:-} ]]; then
    actual=$(sha256sum "$ZIP" | cut -d' ' -f1)
    expected=${ANNOTATIONS_SHA256,,}
    [[ $actual == "$expected" ]] ||
        die "checksum mismatch for $URL: expected sha256 $expected, got $actual"
fi

# Python's zipfile, not `python -m zipfile -t` (exit 0 on bad CRCs): extraction checks each CRC.
"$PYTHON" - "$URL" "$ZIP" "$TMP/out" "${MISSING[@]}" <<'EOF' || exit 1
import sys, zipfile, zlib

url, archive, out, names = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
try:
    with zipfile.ZipFile(archive) as zf:
        sizes = {info.filename: info.file_size for info in zf.infolist()}
        for name in names:
            if not sizes.get(name):
                sys.exit(f"startup-hook: error: {name} is missing or empty in the zip from {url}")
            zf.extract(name, out)
except (zipfile.BadZipFile, EOFError, zlib.error) as e:
    sys.exit(f"startup-hook: error: the archive from {url} is truncated or corrupt ({e})")
except OSError as e:
    sys.exit(f"startup-hook: error: could not unpack the archive from {url}: {e}")
EOF

for f in "${MISSING[@]}"; do mv -f "$TMP/out/$f" "$DATA_ROOT/$f"; done
say "placed ${MISSING[*]} in $DATA_ROOT"
