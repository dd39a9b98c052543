#!/usr/bin/env bash
# Makes a SoftHSM2 development token under DIR, once: a softhsm2.conf, a token
# folder, and a random user PIN and SO PIN kept in files of mode 0600.
# Usage: setup-token.sh DIR [LABEL]     Prints nothing when the token exists.
# softhsm2-util takes PINs only as arguments, so they show in `ps` while it runs:
# acceptable for a development token on your own machine, never for production.
set -euo pipefail
dir=$(realpath -m "$1")
label=${2:-keysvc}
umask 077
mkdir -p "$dir/tokens"
conf="$dir/softhsm2.conf"
if [ ! -f "$conf" ]; then
  printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n' \
    "$dir/tokens" > "$conf"
fi
export SOFTHSM2_CONF=$conf
if softhsm2-util --show-slots 2>/dev/null | grep -q "Label:[[:space:]]*$label[[:space:]]*$"; then
  exit 0
fi
[ -f "$dir/pin" ] || head -c 18 /dev/urandom | base64 | tr -d '/+=' > "$dir/pin"
[ -f "$dir/so-pin" ] || head -c 18 /dev/urandom | base64 | tr -d '/+=' > "$dir/so-pin"
chmod 600 "$dir/pin" "$dir/so-pin"
softhsm2-util --init-token --free --label "$label" --pin "$(cat "$dir/pin")" --so-pin "$(cat "$dir/so-pin")" >/dev/null
echo "created SoftHSM2 token '$label' in $dir/tokens (PIN in $dir/pin)"
