#!/bin/sh
# Apply the series to a vLLM checkout at tag v0.33.0, one commit per patch, authored and
# signed off by you: vLLM's DCO check refuses any commit without a `Signed-off-by:` line, and
# only the person submitting can certify the DCO, so the patch files carry no author.
#
#   upstream/am.sh /path/to/vllm                 # the whole series, in the order of `series`
#   upstream/am.sh /path/to/vllm 0005-prompt-embeds-part-errors.patch   # one patch
#     (apply first the patches its "Depends on:" line names)
#
# Your identity is the checkout's `git config user.name` / `user.email`.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
vllm=${1:?usage: am.sh /path/to/vllm [patch ...]}
shift
name=$(git -C "$vllm" config user.name) || { echo "am.sh: set git user.name first" >&2; exit 2; }
email=$(git -C "$vllm" config user.email) || { echo "am.sh: set git user.email first" >&2; exit 2; }
if [ $# -eq 0 ]; then
    set -- $(grep -v '^#' "$here/series")
fi
for patch in "$@"; do
    { printf 'From: %s <%s>\n' "$name" "$email"; cat "$here/$(basename "$patch")"; } |
        git -C "$vllm" am --signoff --keep-non-patch --3way
done
