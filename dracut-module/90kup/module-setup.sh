#!/bin/bash
# dracut module 90kup: on a boot with kup.handoff=<id>, check the handoff manifest before the switch to
# the real root, keep the PIDs the restore needs free, record the pending handoff in /run/kup, and
# take the luo backend's LUO session back (kup-restore luo-claim-early).

check() {
    return 0
}

depends() {
    return 0
}

install() {
    inst_hook pre-pivot 90 "$moddir/kup-handoff.sh"
    inst_multiple cat mkdir rm mv grep
    # The early claim of the luo backend's session (kup-handoff.sh runs it).
    [ -x /usr/lib/kup/kup-restore ] && inst_binary /usr/lib/kup/kup-restore
    return 0
}
