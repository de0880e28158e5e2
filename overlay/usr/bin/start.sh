#!/bin/sh
# The failback LiveCD's entry point for a static network address, as in the DRS
# Failback Client user guide:
#
#   IPADDR=192.168.10.20 NETMASK=255.255.255.0 GATEWAY=192.168.10.1 DNS=192.168.10.10 \
#     CONFIG_NETWORK=1 /usr/bin/start.sh
#
# With CONFIG_NETWORK=1 it checks every value first (and changes nothing if one is
# wrong), writes a systemd-networkd configuration for the NIC (NIC=<name>, or the first
# wired NIC with a link), restarts systemd-networkd, waits for the address and then
# restarts the failback client on its consoles. Without CONFIG_NETWORK it only restarts
# the client on the network as it is.
#
# NETMASK may be dotted (255.255.255.0) or a prefix length (24). DNS may list several
# servers separated by commas or spaces.
#
# HTTPS_PROXY=http://host:port (with or without CONFIG_NETWORK) sets the HTTPS proxy the
# client uses for DRS and S3 (kept in /run/failback/network.env, read by the launcher);
# HTTPS_PROXY= (set but empty) removes it. The replication stream (TCP 1500) never goes
# through the proxy.
#
# The failback client itself runs this with RESTART_CLIENT=0 to apply a static address
# asked at its prompt (or given in its seed) without restarting itself.
#
# Without NIC=, it waits for a wired NIC to have a link (FAILBACK_LINK_TIMEOUT seconds,
# default 30): right after boot the NIC may still be negotiating its link, or down until
# systemd-networkd (starting beside the client) brings it up.
#
# For tests: FAILBACK_ROOT prefixes the paths it reads and writes (/etc, /sys) and
# FAILBACK_ADDR_TIMEOUT bounds the wait for the address (seconds, default 30).
set -u

prog=start.sh
root=${FAILBACK_ROOT:-}
netdir=$root/etc/systemd/network
sysnet=$root/sys/class/net

die() {
	echo "$prog: error: $*" >&2
	exit 2
}

# ipv4_to_int ADDRESS: prints the address as a 32-bit number, fails if it is not a
# dotted quad of decimal octets 0-255 without leading zeros.
ipv4_to_int() {
	case $1 in
	'' | *[!0-9.]* | .* | *. | *..*) return 1 ;;
	esac
	IFS=. read -r o1 o2 o3 o4 extra <<EOF
$1
EOF
	[ -n "$o4" ] && [ -z "$extra" ] || return 1
	for o in "$o1" "$o2" "$o3" "$o4"; do
		case $o in
		0?*) return 1 ;;
		esac
		[ ${#o} -le 3 ] && [ "$o" -le 255 ] || return 1
	done
	echo $(((o1 << 24) | (o2 << 16) | (o3 << 8) | o4))
}

# mask_to_prefix NETMASK: prints the prefix length of a dotted or numeric netmask.
mask_to_prefix() {
	case $1 in
	/*) set -- "${1#/}" ;;
	esac
	case $1 in
	'' | *[!0-9.]*) return 1 ;;
	*.*) ;;
	*)
		case $1 in 0?*) return 1 ;; esac
		[ ${#1} -le 2 ] && [ "$1" -ge 1 ] && [ "$1" -le 32 ] || return 1
		echo "$1"
		return 0
		;;
	esac
	m=$(ipv4_to_int "$1") || return 1
	inv=$(((~m) & 0xFFFFFFFF))
	# A valid mask is ones then zeros: its inverse plus one is a power of two.
	[ $((inv & (inv + 1))) -eq 0 ] || return 1
	bits=0
	while [ "$m" -ne 0 ]; do
		bits=$((bits + (m & 1)))
		m=$((m >> 1))
	done
	[ "$bits" -ge 1 ] || return 1
	echo "$bits"
}

prefix_mask() {
	echo $(((0xFFFFFFFF << (32 - $1)) & 0xFFFFFFFF))
}

# first_wired_nic: the first en*/eth* interface whose carrier is up.
first_wired_nic() {
	for dev in "$sysnet"/en* "$sysnet"/eth*; do
		[ -e "$dev" ] || continue
		if [ "$(cat "$dev/carrier" 2>/dev/null)" = 1 ]; then
			basename "$dev"
			return 0
		fi
	done
	return 1
}

# retry SECONDS COMMAND...: runs COMMAND once a second until it succeeds; fails after SECONDS.
retry() {
	limit=$1
	shift
	waited=0
	until "$@"; do
		[ "$waited" -ge "$limit" ] && return 1
		sleep 1
		waited=$((waited + 1))
	done
}

# has_address NIC: NIC holds $IPADDR/$prefix.
has_address() {
	ip -4 -o addr show dev "$1" 2>/dev/null | grep -q "inet $IPADDR/$prefix "
}

# proxy_problem VALUE: prints why VALUE is not a proxy URL (never the value: it may hold a password).
proxy_problem() {
	p=$1
	case $p in
	http://* | https://*) p=${p#*://} ;;
	*://*)
		echo "the HTTPS proxy must be written http://host:port (or host:port)"
		return 0
		;;
	esac
	p=${p%/}
	p=${p##*@}
	case $p in
	*/* | *\?*)
		echo "the HTTPS proxy must be only http://host:port (no path)"
		return 0
		;;
	*:*) ;;
	*)
		echo "the HTTPS proxy needs a port, e.g. http://proxy.example.com:3128"
		return 0
		;;
	esac
	host=${p%:*}
	port=${p##*:}
	case $host in
	'' | *[!A-Za-z0-9.-]*)
		echo "the HTTPS proxy's host name is not valid"
		return 0
		;;
	esac
	case $port in
	'' | *[!0-9]* | 0*)
		echo "the HTTPS proxy's port is not a number 1-65535"
		return 0
		;;
	esac
	[ ${#port} -le 5 ] && [ "$port" -le 65535 ] || echo "the HTTPS proxy's port is not a number 1-65535"
}

check_proxy() {
	[ -n "${HTTPS_PROXY+set}" ] || return 0
	[ -n "$HTTPS_PROXY" ] || return 0
	case $HTTPS_PROXY in
	*"'"* | *" "* | *"	"*) die "HTTPS_PROXY: the proxy URL must not contain quotes or spaces" ;;
	esac
	why=$(proxy_problem "$HTTPS_PROXY")
	[ -z "$why" ] || die "HTTPS_PROXY: $why"
}

write_proxy() {
	[ -n "${HTTPS_PROXY+set}" ] || return 0
	envdir=$root/run/failback
	if [ -z "$HTTPS_PROXY" ]; then
		rm -f "$envdir/network.env"
		echo "$prog: HTTPS proxy removed"
		return 0
	fi
	case $HTTPS_PROXY in
	*://*) url=$HTTPS_PROXY ;;
	*) url=http://$HTTPS_PROXY ;;
	esac
	mkdir -p "$envdir" || die "cannot create $envdir"
	(
		umask 077
		# Single quotes: the launcher reads this with the shell; the checks above allow no quote.
		printf "https_proxy='%s'\nHTTPS_PROXY='%s'\n" "$url" "$url" >"$envdir/.network.env.tmp"
	) || die "cannot write $envdir/network.env"
	mv -f "$envdir/.network.env.tmp" "$envdir/network.env" || die "cannot write $envdir/network.env"
	echo "$prog: HTTPS proxy set for DRS and S3 (the replication stream on TCP 1500 stays direct)"
}

restart_client() {
	# --no-block: this script may itself run from one of the client's consoles.
	systemctl --no-block restart 'failback-client@*.service' ||
		die "could not restart the failback client (systemctl restart 'failback-client@*.service')"
	echo "$prog: the failback client is restarting on its consoles (tty1, ttyS0)."
}

config_network() {
	# 1. Check everything before touching anything.
	[ -n "${IPADDR:-}" ] || die "IPADDR is not set: give the static IPv4 address, e.g. IPADDR=192.168.10.20"
	ip_int=$(ipv4_to_int "$IPADDR") ||
		die "IPADDR='$IPADDR' is not an IPv4 address (four numbers 0-255 separated by dots, e.g. 192.168.10.20)"
	[ -n "${NETMASK:-}" ] || die "NETMASK is not set: give the subnet mask, e.g. NETMASK=255.255.255.0 (or 24)"
	prefix=$(mask_to_prefix "$NETMASK") ||
		die "NETMASK='$NETMASK' is not a subnet mask (e.g. 255.255.255.0, or a prefix length 1-32 such as 24)"
	[ -n "${GATEWAY:-}" ] || die "GATEWAY is not set: give the default gateway, e.g. GATEWAY=192.168.10.1"
	gw_int=$(ipv4_to_int "$GATEWAY") ||
		die "GATEWAY='$GATEWAY' is not an IPv4 address (e.g. 192.168.10.1)"
	mask=$(prefix_mask "$prefix")
	if [ "$prefix" -lt 32 ] && [ $((ip_int & mask)) -ne $((gw_int & mask)) ]; then
		die "GATEWAY=$GATEWAY is not in the subnet of IPADDR=$IPADDR/$prefix: check GATEWAY and NETMASK"
	fi
	[ "$gw_int" -ne "$ip_int" ] || die "GATEWAY=$GATEWAY is the same as IPADDR: give the router's address"
	[ -n "${DNS:-}" ] || die "DNS is not set: give one or more DNS servers, e.g. DNS=192.168.10.10"
	dns_list=$(printf "%s\n" "$DNS" | tr ',' ' ')
	dns_ok=""
	for server in $dns_list; do
		ipv4_to_int "$server" >/dev/null ||
			die "DNS='$DNS': '$server' is not an IPv4 address (separate several servers with commas)"
		dns_ok="$dns_ok $server"
	done
	[ -n "$dns_ok" ] || die "DNS='$DNS' names no server, e.g. DNS=192.168.10.10"
	if [ -n "${NIC:-}" ]; then
		case $NIC in
		*[!A-Za-z0-9_.:-]* | . | ..) die "NIC='$NIC' is not an interface name" ;;
		esac
		[ -e "$sysnet/$NIC" ] || die "NIC='$NIC': no such network interface (see 'ip link')"
		nic=$NIC
	else
		link_timeout=${FAILBACK_LINK_TIMEOUT:-30}
		case $link_timeout in
		*[!0-9]*) die "FAILBACK_LINK_TIMEOUT='$link_timeout' is not a number of seconds" ;;
		esac
		if ! nic=$(first_wired_nic); then
			echo "$prog: waiting up to $link_timeout s for a wired network interface with a link..." >&2
			nic=$(retry "$link_timeout" first_wired_nic) ||
				die "no wired network interface has a link after $link_timeout s: plug in a cable," \
					"or name one with NIC=<name> (see 'ip link')"
		fi
	fi

	# 2. Write the configuration (atomically) and apply it.
	mkdir -p "$netdir" || die "cannot create $netdir"
	file=$netdir/05-failback-static-$nic.network
	tmp=$netdir/.05-failback-static-$nic.network.tmp
	{
		echo "# Written by /usr/bin/start.sh (CONFIG_NETWORK=1): static address for $nic."
		echo "[Match]"
		echo "Name=$nic"
		echo
		echo "[Link]"
		echo "RequiredForOnline=routable"
		echo
		echo "[Network]"
		echo "Address=$IPADDR/$prefix"
		echo "Gateway=$GATEWAY"
		for server in $dns_ok; do
			echo "DNS=$server"
		done
		echo "DHCP=no"
		echo "LinkLocalAddressing=no"
		echo "IPv6AcceptRA=no"
	} >"$tmp" || die "cannot write $tmp"
	# One static NIC at a time: drop what an earlier run wrote for another NIC.
	for old in "$netdir"/05-failback-static-*.network; do
		[ -e "$old" ] && [ "$old" != "$file" ] && rm -f "$old"
	done
	mv -f "$tmp" "$file" || die "cannot write $file"
	echo "$prog: wrote $file ($IPADDR/$prefix via $GATEWAY, DNS$dns_ok)"

	systemctl restart systemd-networkd.service || die "systemctl restart systemd-networkd.service failed"

	timeout=${FAILBACK_ADDR_TIMEOUT:-30}
	if ! retry "$timeout" has_address "$nic"; then
		echo "$prog: error: $nic did not get $IPADDR/$prefix within $timeout s;" \
			"see 'networkctl status $nic' and 'journalctl -u systemd-networkd'" >&2
		exit 1
	fi
	echo "$prog: $nic is up with $IPADDR/$prefix"
}

check_proxy
case ${CONFIG_NETWORK:-} in
1 | yes | true) config_network ;;
'' | 0 | no | false) ;;
*) die "CONFIG_NETWORK='$CONFIG_NETWORK': use CONFIG_NETWORK=1 to configure a static address" ;;
esac
write_proxy
case ${RESTART_CLIENT:-1} in
0) ;;
*) restart_client ;;
esac
