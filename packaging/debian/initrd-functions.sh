# kup maintainer scripts: initrds and kup's early-boot hook (pasted into postinst and postrm by
# packaging/build-deb at @INITRD_FUNCTIONS@; postrm runs when the package's own files are gone).

# kup_initrd_generator: the initrd generator the kernel packages use, dracut or initramfs-tools
# (kup::initrd::Generator::detect): the one whose package is installed, as the two conflict; the
# commands only where dpkg tells neither (dracut-core, with /usr/bin/dracut, stays installed after
# a switch from dracut to initramfs-tools).
kup_initrd_generator() {
    for p in initramfs-tools dracut; do
        case "$(dpkg-query -W -f '${db:Status-Abbrev}' "$p" 2>/dev/null)" in
            ?[UFWti]*) echo "$p"; return 0 ;;
        esac
    done
    if command -v dracut >/dev/null 2>&1; then
        echo dracut
    elif command -v update-initramfs >/dev/null 2>&1; then
        echo initramfs-tools
    fi
}

# kup_initrd_has_hook FILE: whether the initrd FILE carries kup-handoff.sh (either generator; the
# installed generator's lister first).
kup_initrd_has_hook() {
    if [ "$(kup_initrd_generator)" = initramfs-tools ] && command -v lsinitramfs >/dev/null 2>&1; then
        lsinitramfs "$1" 2>/dev/null | grep -q 'kup-handoff\.sh$'
    elif command -v lsinitrd >/dev/null 2>&1; then
        lsinitrd "$1" 2>/dev/null | grep -q 'kup-handoff\.sh$'
    elif command -v lsinitramfs >/dev/null 2>&1; then
        lsinitramfs "$1" 2>/dev/null | grep -q 'kup-handoff\.sh$'
    else
        return 1
    fi
}

# kup_initrd_rebuild VERSION: rebuilds the initrd of kernel VERSION with the installed generator.
kup_initrd_rebuild() {
    case "$(kup_initrd_generator)" in
        dracut) dracut -q -f --kver "$1" ;;
        initramfs-tools) update-initramfs -u -k "$1" ;;
        *)
            echo "kup: neither dracut nor initramfs-tools is installed: the initrd of $1 was not rebuilt" >&2
            return 1
            ;;
    esac
}

# kup_initrds_fix WANT: rebuilds every initrd in /boot whose kup hook is not as WANT says
# ("with": add it, postinst; "without": drop it, postrm). Failures are reported, not fatal: kup
# refuses an update to a kernel whose initrd lacks its hook, with the command that fixes it.
kup_initrds_fix() {
    for initrd in /boot/initrd.img-* /boot/initramfs-*.img; do
        [ -f "$initrd" ] || continue
        version=${initrd#/boot/initrd.img-}
        [ "$version" != "$initrd" ] || { version=${initrd#/boot/initramfs-}; version=${version%.img}; }
        [ -f "/boot/vmlinuz-$version" ] || continue
        if kup_initrd_has_hook "$initrd"; then has=with; else has=without; fi
        [ "$has" = "$1" ] && continue
        echo "kup: rebuilding the initrd of $version ($1 kup's early-boot hook)"
        kup_initrd_rebuild "$version" ||
            echo "kup: rebuilding the initrd of $version failed; fix what the generator reported, then rebuild it" >&2
    done
}
