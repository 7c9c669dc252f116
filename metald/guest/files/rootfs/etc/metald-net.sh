# Sourced by /etc/rc at boot and by the host (through the agent) to give a restored clone its own
# identity. NIC parameters are the kernel command line's metald.nic=MAC,IP4/PFX,GW4,IP6/PFX,GW6.

# find_dev MAC: print the interface whose MAC matches (case-insensitive); waits up to 2 s for it.
find_dev() {
  want=$(echo "$1" | tr A-F a-f)
  tries=0
  while [ $tries -lt 100 ]; do
    for dev in /sys/class/net/*; do
      if [ "$(cat "$dev/address" 2>/dev/null)" = "$want" ]; then
        echo "${dev##*/}"
        return 0
      fi
    done
    sleep 0.02
    tries=$((tries + 1))
  done
  return 1
}

# configure_nic METRIC MAC,IP4/PFX,GW4,IP6/PFX,GW6
configure_nic() {
  metric=$1
  IFS=, read -r mac ip4 gw4 ip6 gw6 <<NIC
$2
NIC
  if ! dev=$(find_dev "$mac"); then
    echo "metald: no interface with MAC $mac" > /dev/console
    return 1
  fi
  # busybox ip has no "nodad": turn duplicate address detection off for the device instead.
  [ -n "$ip6" ] && echo 0 > "/proc/sys/net/ipv6/conf/$dev/accept_dad"
  ip link set "$dev" up
  [ -n "$ip4" ] && ip addr add "$ip4" dev "$dev"
  [ -n "$gw4" ] && ip route add default via "$gw4" dev "$dev" metric "$metric"
  [ -n "$ip6" ] && ip -6 addr add "$ip6" dev "$dev"
  [ -n "$gw6" ] && ip -6 route add default via "$gw6" dev "$dev" metric "$metric"
  return 0
}

# metald_identity VM_ID NIC...: hostname and /run/metald/vm_id, then metald_nics NIC...
# (a restored clone gets the first two from the agent's REFRESH and runs only metald_nics).
metald_identity() {
  vm_id=$1
  shift
  hostname "$vm_id" || return 1
  mkdir -p /run/metald
  echo "$vm_id" > /run/metald/vm_id
  metald_nics "$@"
}

# metald_nics NIC...: for each NIC in order (eth0, eth1, ...): drop its addresses, set its MAC
# (QEMU follows the guest), address it anew.
metald_nics() {
  index=0
  for nic in "$@"; do
    dev=eth$index
    ip link set "$dev" down || return 1
    ip addr flush dev "$dev"
    ip link set "$dev" address "${nic%%,*}" || return 1
    configure_nic $((100 + index)) "$nic" || return 1
    index=$((index + 1))
  done
}
