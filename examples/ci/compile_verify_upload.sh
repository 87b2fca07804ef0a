#!/usr/bin/env bash
# A CI stage: compile a model into tensor-parallel shards, verify them, and upload them.
#
#   compile_verify_upload.sh MODEL [options] [-- extra tpcompile options]
#
#   --tp N              ranks (env TP, default 2)
#   --out DIR           where to compile (env OUT, default build/artifact)
#   --reference MODEL   verify a generic program against MODEL with `tpcompile verify`
#                       (env REFERENCE, default: MODEL itself)
#   --prompt TEXT       language models (verified by a smoke run instead): `tprun OUT --prompt TEXT
#                       --max-new-tokens 8` (env SMOKE_PROMPT, default "Hello")
#   --dest DIR          upload = copy the artifact to DIR/NAME (env UPLOAD_DEST); the copy is staged
#                       beside it, compared file by file with OUT, then renamed into place
#   --name NAME         name of the uploaded artifact (env ARTIFACT_NAME, default: basename of OUT)
#   --upload-cmd CMD    upload with a command instead: run as `bash -c CMD upload OUT NAME`, so CMD
#                       sees the artifact directory as "$1" and the name as "$2"
#                       (env UPLOAD_CMD; e.g. 'aws s3 sync "$1" "s3://models/$2"')
#
# Every step must succeed: the script stops at the first failure and exits with that step's code
# (tpcompile/tprun: 1 internal error or failed verification, 2 bad input, 3 unsupported model).
# Nothing is uploaded unless the compile and the verification passed. The machine-readable compile
# summary (`tpcompile --json`: per-file sha256, bytes per rank, collectives) is written to OUT.json.
# The commands are taken from $TPCOMPILE and $TPRUN (default: tpcompile and tprun on PATH).
set -euo pipefail

die() { echo "ci: error: $*" >&2; exit 2; }
step() { echo "ci: $*" >&2; }

[[ $# -ge 1 && $1 != -* ]] || die "usage: $0 MODEL [--tp N] [--out DIR] [--dest DIR | --upload-cmd CMD] ..."
MODEL=$1
shift
TP=${TP:-2}
OUT=${OUT:-build/artifact}
REFERENCE=${REFERENCE:-}
SMOKE_PROMPT=${SMOKE_PROMPT:-}
UPLOAD_DEST=${UPLOAD_DEST:-}
UPLOAD_CMD=${UPLOAD_CMD:-}
ARTIFACT_NAME=${ARTIFACT_NAME:-}
EXTRA=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --tp) TP=${2:?--tp needs a value}; shift 2 ;;
        --out) OUT=${2:?--out needs a value}; shift 2 ;;
        --reference) REFERENCE=${2:?--reference needs a value}; shift 2 ;;
        --prompt) SMOKE_PROMPT=${2:?--prompt needs a value}; shift 2 ;;
        --dest) UPLOAD_DEST=${2:?--dest needs a value}; shift 2 ;;
        --name) ARTIFACT_NAME=${2:?--name needs a value}; shift 2 ;;
        --upload-cmd) UPLOAD_CMD=${2:?--upload-cmd needs a value}; shift 2 ;;
        --) shift; EXTRA=("$@"); break ;;
        *) die "unknown option $1" ;;
    esac
done
[[ -n $UPLOAD_DEST || -n $UPLOAD_CMD ]] || die "no upload destination: pass --dest DIR or --upload-cmd CMD"
[[ -z $UPLOAD_DEST || -z $UPLOAD_CMD ]] || die "pass either --dest or --upload-cmd, not both"
read -r -a TPCOMPILE_CMD <<<"${TPCOMPILE:-tpcompile}"
read -r -a TPRUN_CMD <<<"${TPRUN:-tprun}"
OUT=${OUT%/}
NAME=${ARTIFACT_NAME:-$(basename "$OUT")}
[[ $NAME != */* && $NAME != . && $NAME != .. ]] || die "invalid artifact name '$NAME'"

step "compile $MODEL for tp=$TP into $OUT"
mkdir -p "$(dirname "$OUT")"
"${TPCOMPILE_CMD[@]}" "$MODEL" --tp "$TP" -o "$OUT" --force --json ${EXTRA[@]+"${EXTRA[@]}"} >"$OUT.json"

if grep -q '"kind": "causal_lm"' "$OUT/manifest.json"; then
    step "smoke-run the language model (tprun checks every file's sha256 first)"
    "${TPRUN_CMD[@]}" "$OUT" --prompt "${SMOKE_PROMPT:-Hello}" --max-new-tokens 8 >/dev/null
else
    step "verify against ${REFERENCE:-$MODEL}"
    "${TPCOMPILE_CMD[@]}" verify "$OUT" --reference "${REFERENCE:-$MODEL}"
fi

if [[ -n $UPLOAD_CMD ]]; then
    step "upload $OUT as $NAME with: $UPLOAD_CMD"
    bash -c "$UPLOAD_CMD" upload "$OUT" "$NAME"
else
    mkdir -p "$UPLOAD_DEST"
    dest=$UPLOAD_DEST/$NAME
    staging=$UPLOAD_DEST/.$NAME.partial-$$
    trap 'rm -rf "$staging" "$staging.json"' EXIT
    step "upload $OUT to $dest"
    cp -R "$OUT" "$staging"
    cp "$OUT.json" "$staging.json"
    diff -r "$OUT" "$staging" >/dev/null || die "the copy in $staging differs from $OUT"
    rm -rf "$dest"
    mv "$staging" "$dest"
    mv "$staging.json" "$dest.json"
fi
step "done"
