#!/usr/bin/env bash
# Print the Debian mirror this host's apt uses, as "MIRROR SECURITY_MIRROR", read from
# /etc/apt/sources.list.d/*.sources (deb822) and /etc/apt/sources.list. No host name is written
# in the tree: whatever the host's apt reaches, the lab and the image reach the same way.
# ISTHMUS_DEBIAN_MIRROR / ISTHMUS_DEBIAN_SECURITY_MIRROR override either.
#
#   apt-mirror.sh [SUITE]     (default bookworm)
set -euo pipefail
suite=${1:-bookworm}
etc=${ISTHMUS_APT_ETC:-/etc/apt}

entries() {  # one "URI SUITE" line per (uri, suite) of every deb source
    local f
    for f in "$etc"/sources.list.d/*.sources; do
        [ -r "$f" ] || continue
        # deb822: stanzas separated by blank lines; continuation lines start with a space
        awk 'BEGIN{RS=""; FS="\n"}
             { types=""; uris=""; suites=""; enabled="yes"
               for (i=1;i<=NF;i++) { line=$i; if (line ~ /^#/) continue
                 k=line; sub(/:.*/,"",k); v=line; sub(/^[^:]*:[ \t]*/,"",v)
                 k=tolower(k)
                 if (k=="types") types=v; else if (k=="uris") uris=v
                 else if (k=="suites") suites=v; else if (k=="enabled") enabled=tolower(v) }
               if (enabled=="no" || types !~ /(^|[ \t])deb([ \t]|$)/) next
               nu=split(uris,U,/[ \t]+/); ns=split(suites,S,/[ \t]+/)
               for (a=1;a<=nu;a++) for (b=1;b<=ns;b++) if (U[a]!="" && S[b]!="") print U[a], S[b] }' "$f"
    done
    for f in "$etc"/sources.list "$etc"/sources.list.d/*.list; do
        [ -r "$f" ] || continue
        # deb [options] URI SUITE COMPONENTS...
        sed -e 's/#.*//' -e 's/\[[^]]*\]//' "$f" | awk '$1=="deb" && NF>=3 {print $2, $3}'
    done
}

main="" sec=""
while read -r uri s; do
    uri=${uri%/}
    case "$s" in
        "$suite") [ -n "$main" ] || main=$uri ;;
        "$suite-security"|"$suite/updates") [ -n "$sec" ] || sec=$uri ;;
    esac
done < <(entries)
main=${ISTHMUS_DEBIAN_MIRROR:-$main}
if [ -z "$main" ]; then
    echo "apt-mirror: no 'deb' source for $suite in $etc (set ISTHMUS_DEBIAN_MIRROR)" >&2
    exit 1
fi
# No security source configured: use the main mirror's sibling path, as Debian lays mirrors out.
sec=${ISTHMUS_DEBIAN_SECURITY_MIRROR:-${sec:-${main%/debian}/debian-security}}
echo "$main $sec"
