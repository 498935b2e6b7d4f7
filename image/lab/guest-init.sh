#!/bin/sh
# The lab guest's boot script, read from the per-run source disk (see runner.py). It prepares a
# minimal system (no systemd), runs /mnt/src/.lab/cmd, reports its exit status on ttyS1 and
# powers the guest off whatever happens.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 TERM=${TERM:-vt100}

mount -t tmpfs -o mode=0755 run /run
mount -t tmpfs tmp /tmp
mkdir -p /dev/pts /dev/shm /run/netns /var/run
mount -t devpts -o gid=5,mode=620 devpts /dev/pts
mount -t tmpfs shm /dev/shm
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
mount -t bpf bpf /sys/fs/bpf 2>/dev/null
mount -o ro,noload LABEL=isthmus-deps /mnt/deps 2>/dev/null || mount -o ro /dev/vdc /mnt/deps
hostname isthmus-lab
ip link set lo up
# The data plane the host kernel lacks.
for m in xfrm_user xfrm_interface esp4 esp6 esp4_offload esp6_offload ah4 ah6 xfrm4_tunnel xfrm6_tunnel \
         tunnel4 tunnel6 af_key gcm ccm chacha20poly1305 ctr cbc aes_generic sha256_generic \
         sha512_generic authenc authencesn seqiv echainiv veth dummy bridge nf_tables \
         nft_chain_nat nft_ct nft_limit nf_conntrack udp_tunnel ip6_udp_tunnel; do
    modprobe -q "$m" 2>/dev/null
done
sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 2>/dev/null

# Console scripts of the project, without installing it.
mkdir -p /tmp/bin
for s in isthmus:appliance.cli isthmusd:appliance.daemon; do
    printf '#!/bin/sh\nexec python3 -m %s "$@"\n' "${s#*:}" > "/tmp/bin/${s%%:*}"
    chmod 0755 "/tmp/bin/${s%%:*}"
done
export PATH=/tmp/bin:$PATH
export PYTHONPATH=/mnt/src:/mnt/deps PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
export ISTHMUS_IN_LAB=1 ISTHMUS_LAB_RESULTS=/dev/ttyS2
stty -F /dev/ttyS1 raw -echo 2>/dev/null
stty -F /dev/ttyS2 raw -echo 2>/dev/null

cd /mnt/src
/bin/sh /mnt/src/.lab/cmd </dev/null
rc=$?
echo "$rc" > /dev/ttyS1
sync
echo o > /proc/sysrq-trigger
sleep 10 2>/dev/null
