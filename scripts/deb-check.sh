#!/usr/bin/env bash
# The Debian package end to end (run by scripts/test, as root): build it from the
# debug binaries, install it with dpkg -i, check what it put where, that the meshd user
# exists and nothing was enabled or started, then remove it (configuration kept) and
# purge it (configuration gone).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "deb-check: needs root (dpkg -i)" >&2; exit 1; }
deb=$(scripts/package-deb --profile debug)
fail() { echo "deb-check: FAIL: $*" >&2; exit 1; }
ok() { echo "ok   $*"; }

# Each check reads a command's whole output before matching: `cmd | grep -q` under
# pipefail fails at random when grep exits first and cmd dies of SIGPIPE.
has() { grep -q -- "$1" <<<"$2"; }
info=$(dpkg-deb --info "$deb")
has '^ Depends: libc6 (>= 2\.[0-9]*), adduser$' "$info" || fail "Depends: $(grep Depends <<<"$info")"
dpkg -i "$deb" >/dev/null
ok "dpkg -i $deb"
for f in /usr/bin/meshd /usr/bin/meshctl /usr/bin/locksmith \
         /usr/share/man/man8/meshd.8.gz /usr/share/man/man1/meshctl.1.gz /usr/share/man/man1/locksmith.1.gz \
         /usr/share/bash-completion/completions/meshctl /usr/share/zsh/vendor-completions/_meshctl \
         /usr/share/fish/vendor_completions.d/meshctl.fish \
         /lib/systemd/system/meshd.service /lib/systemd/system/locksmith.service \
         /lib/systemd/system/locksmith-fleetlock.service /etc/meshd/meshd.yaml; do
  [ -e "$f" ] || fail "$f is not installed"
done
ok "binaries, man pages, completions, units and the example config are in place"
has '/etc/meshd/meshd.yaml' "$(dpkg-query -W -f='${Conffiles}\n' meshd)" || fail "meshd.yaml is not a conffile"
ok "/etc/meshd/meshd.yaml is a conffile"
has ':/var/lib/meshd:' "$(getent passwd meshd)" || fail "no meshd system user"
[ "$(id -u meshd)" -lt 1000 ] || fail "meshd is not a system user"
ok "the meshd system user exists"
for u in meshd locksmith locksmith-fleetlock; do
  [ ! -e "/etc/systemd/system/multi-user.target.wants/$u.service" ] || fail "$u.service was enabled"
done
ok "no unit enabled"
# As the README's set-up does: a mesh key, then the example configuration checks.
/usr/bin/meshd keygen > /etc/meshd/mesh.key
/usr/bin/meshd config check /etc/meshd/meshd.yaml >/dev/null || fail "the installed config does not check"
rm /etc/meshd/mesh.key
ok "meshd config check /etc/meshd/meshd.yaml (with a key from meshd keygen)"
man -w meshctl >/dev/null 2>&1 || [ ! -x /usr/bin/man ] || fail "man does not find meshctl(1)"
has "^meshctl " "$(/usr/bin/meshctl --version)" || fail "meshctl --version"
ok "man -w meshctl; meshctl --version"

dpkg -r meshd >/dev/null
[ ! -e /usr/bin/meshd ] || fail "remove left /usr/bin/meshd"
[ -e /etc/meshd/meshd.yaml ] || fail "remove deleted the configuration"
ok "dpkg -r: binaries gone, configuration kept"
dpkg -P meshd >/dev/null
[ ! -e /etc/meshd/meshd.yaml ] || fail "purge left /etc/meshd/meshd.yaml"
ok "dpkg -P: configuration gone"
