#!/bin/sh
# kup early boot (dracut pre-pivot hook): runs with the real root mounted at $NEWROOT, before systemd
# switches to it. Everything the restore needs from this stage is written to /run/kup (kept across the
# switch): `pending` (the handoff id) or `refused` (why the handoff cannot be restored here).
type getarg >/dev/null 2>&1 || . /lib/dracut-lib.sh

id=$(getarg kup.handoff=)
[ -n "$id" ] || return 0 2>/dev/null || exit 0
mkdir -p /run/kup
root=${NEWROOT:-/sysroot}
handoff=$root/var/lib/kup/handoff
refuse() {
    echo "$1" > /run/kup/refused
    warn "kup: handoff $id cannot be restored: $1"
}
if [ ! -r "$handoff/manifest.json" ]; then
    refuse "no manifest at /var/lib/kup/handoff/manifest.json"
elif [ "$(cat "$handoff/id" 2>/dev/null)" != "$id" ]; then
    refuse "the manifest on disk belongs to handoff $(cat "$handoff/id" 2>/dev/null), not $id"
else
    # The restored processes need their old PIDs. Start every later process above the highest of them,
    # so nothing that boots from here on can take one (processes alive now are few and low).
    floor=$(cat "$handoff/pid-floor" 2>/dev/null)
    if [ -n "$floor" ] && [ -w /proc/sys/kernel/ns_last_pid ]; then
        echo "$floor" > /proc/sys/kernel/ns_last_pid
    fi
    echo "$id" > /run/kup/pending
    info "kup: handoff $id pending; PIDs from ${floor:-?} down kept free"
fi
