# The preamble the issue scripts share (sourced by bench/issueNN.sh, not run): sets `repo` (the
# checkout) and CARGO_TARGET_DIR (<repo>/target: the outrelay targets run the binaries in
# <repo>/target/release, so build there); `run OUT` creates OUT and sets `out` to its absolute
# path, anything else prints the calling script's header comment and exits 64.
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export CARGO_TARGET_DIR="$repo/target"

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 64
}

case "${1:-}" in
run) out=${2:?run needs an output directory} ;;
*) usage ;;
esac

mkdir -p "$out"
out=$(cd "$out" && pwd)
