#!/bin/sh
# `make demo`, run inside the lab guest: two "regions" (network namespaces) joined by an underlay
# link, an XFRM interface in each, an AES-GCM ESP tunnel between them, traffic across it and the
# kernel's SA counters. Keys are set by hand here; the IKE daemon will negotiate them.
set -eu
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
cleanup() { ip netns del region-a 2>/dev/null || true; ip netns del region-b 2>/dev/null || true; }
trap cleanup EXIT
A="ip netns exec region-a"; B="ip netns exec region-b"

say "two regions joined by an underlay link (192.0.2.0/24)"
ip netns add region-a; ip netns add region-b
ip link add wan type veth peer name wan-b
ip link set wan netns region-a; ip link set wan-b netns region-b
$B ip link set wan-b name wan
for ns in region-a region-b; do ip netns exec $ns ip link set lo up; ip netns exec $ns ip link set wan up; done
$A ip addr add 192.0.2.1/24 dev wan; $B ip addr add 192.0.2.2/24 dev wan

say "an XFRM interface per region (if_id 42), AES-GCM-256 ESP SAs, 0.0.0.0/0 policies"
k1=0x$(head -c 36 /dev/urandom | od -An -tx1 | tr -d ' \n'); k2=0x$(head -c 36 /dev/urandom | od -An -tx1 | tr -d ' \n')
side() { # ns local remote inner spi_out spi_in key_out key_in
    ip netns exec $1 ip link add xfrm-42 type xfrm dev wan if_id 42
    ip netns exec $1 ip addr add $4 dev xfrm-42
    ip netns exec $1 ip link set xfrm-42 up
    ip netns exec $1 ip xfrm state add src $2 dst $3 proto esp spi $5 reqid 1 mode tunnel aead 'rfc4106(gcm(aes))' $7 128 if_id 42
    ip netns exec $1 ip xfrm state add src $3 dst $2 proto esp spi $6 reqid 1 mode tunnel aead 'rfc4106(gcm(aes))' $8 128 if_id 42
    ip netns exec $1 ip xfrm policy add dir out src 0.0.0.0/0 dst 0.0.0.0/0 tmpl src $2 dst $3 proto esp reqid 1 mode tunnel if_id 42
    for d in in fwd; do
        ip netns exec $1 ip xfrm policy add dir $d src 0.0.0.0/0 dst 0.0.0.0/0 tmpl src $3 dst $2 proto esp reqid 1 mode tunnel if_id 42
    done
}
side region-a 192.0.2.1 192.0.2.2 169.254.21.1/30 0xa0000001 0xb0000001 $k1 $k2
side region-b 192.0.2.2 192.0.2.1 169.254.21.2/30 0xb0000001 0xa0000001 $k2 $k1
$A ip -br addr show xfrm-42

say "region A pings region B across the tunnel"
$A ping -c 5 -i 0.2 169.254.21.2

say "region A sends 4 MiB over TCP to region B"
$B sh -c 'nc -l -p 5001 > /tmp/received' & sleep 0.5
head -c 4194304 /dev/urandom > /tmp/sent
$A nc -N 169.254.21.2 5001 < /tmp/sent; wait
cmp /tmp/sent /tmp/received && echo "received $(stat -c %s /tmp/received) bytes, identical"

say "the kernel's ESP SA counters in region A"
$A ip -s xfrm state | grep -E '^src|spi|bytes'

say "on the wire: only ESP between the regions"
$A timeout 5 tcpdump -c 3 -n -i wan 2>/dev/null & sleep 1; $B ping -c 3 -i 0.2 169.254.21.1 >/dev/null; wait

printf '\n\033[1;32mDEMO OK\033[0m: ESP tunnel between two regions carried ping and TCP.\n'
