#!/bin/bash
# dracut module 90kup: on a boot with kup.handoff=<id>, check the handoff manifest before the switch to
# the real root, keep the PIDs the restore needs free, and record the pending handoff in /run/kup.

check() {
    return 0
}

depends() {
    return 0
}

install() {
    inst_hook pre-pivot 90 "$moddir/kup-handoff.sh"
    inst_multiple cat mkdir rm mv grep
}
