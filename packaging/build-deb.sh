#!/usr/bin/env bash
# Build the Debian package of this checkout:
#
#   packaging/build-deb.sh [OUTDIR]        -> OUTDIR/modelfs_<version>_<arch>.deb (default: dist/)
#
# Debian 12's python3-pyfuse3, python3-httpx and python3-cryptography are older than
# pyproject.toml's minimums and it has no sqlite-utils, so the package carries its own
# virtual environment in /usr/lib/modelfs, made by Debian's Python ($PYTHON, default
# /usr/bin/python3) from this checkout and the requirements in pyproject.toml (pip may
# download them from PyPI; pyfuse3 is compiled: python3-dev, gcc, libfuse3-dev and
# pkg-config must be installed). /usr/bin/modelfs links to its console script. It ships
# the files of packaging/ (what `modelfs service install` writes for /usr/bin/modelfs),
# depends on Debian's python3 and fuse3, enables nothing and never edits /etc/fuse.conf.
#
# The environment is built in a scratch directory and moved: its scripts and pyvenv.cfg
# and byte code are made to name /usr/lib/modelfs; pip and setuptools are left out of it.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
out=$(realpath -m "${1:-$repo/dist}")
python=${PYTHON:-/usr/bin/python3}
prefix=/usr/lib/modelfs

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$repo/pyproject.toml")
arch=$(dpkg --print-architecture)
read -r major minor < <("$python" -c 'import sys; print(*sys.version_info[:2])')

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root=$stage/root
venv=$root$prefix

# What the wheel is made of, copied: a build in the checkout would reuse its build/ directory,
# which keeps modules since deleted.
mkdir "$stage/src"
cp -r "$repo/pyproject.toml" "$repo/README.md" "$repo/store" "$repo/modelfs" "$stage/src/"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-warn-script-location --no-compile \
    "$stage/src"
rm "$venv"/lib/python*/site-packages/modelfs-*.dist-info/direct_url.json  # it names $stage/src
sed -i '/direct_url\.json/d' "$venv"/lib/python*/site-packages/modelfs-*.dist-info/RECORD
"$venv/bin/python" -m pip uninstall --quiet --yes pip setuptools
rm -f "$venv"/bin/[Aa]ctivate*
# Byte code, compiled once here (a command starts faster), naming the installed paths.
"$venv/bin/python" -m compileall -q -f -j 0 -s "$root" -p / "$venv/lib"
grep -rlZ --fixed-strings "$venv" "$venv/bin" "$venv/pyvenv.cfg" | xargs -0 --no-run-if-empty sed -i "s|$venv|$prefix|g"
if grep -rl --fixed-strings "$stage" "$root"; then
    echo "build-deb: the scratch directory is still named in the files above" >&2
    exit 1
fi

install -d "$root/usr/bin"
ln -s "../lib/modelfs/bin/modelfs" "$root/usr/bin/modelfs"
install -D -m 644 "$here/systemd/modelfs.service" "$root/usr/lib/systemd/user/modelfs.service"
install -D -m 644 "$here/systemd/modelfs-system.service" "$root/usr/lib/systemd/system/modelfs-system.service"
install -D -m 644 "$here/sysusers.d/modelfs.conf" "$root/usr/lib/sysusers.d/modelfs.conf"
install -D -m 644 "$here/tmpfiles.d/modelfs.conf" "$root/usr/lib/tmpfiles.d/modelfs.conf"
install -D -m 644 "$here/debian/copyright" "$root/usr/share/doc/modelfs/copyright"
install -D -m 644 "$repo/README.md" "$root/usr/share/doc/modelfs/README.md"

install -d "$root/DEBIAN"
install -m 755 "$here/debian/postinst" "$here/debian/prerm" "$here/debian/postrm" "$root/DEBIAN/"
sed -e "s|@VERSION@|$version|" -e "s|@ARCH@|$arch|" -e "s|@PYTHON@|$major.$minor|" \
    -e "s|@PYTHON_NEXT@|$major.$((minor + 1))|" -e "s|@INSTALLED_SIZE@|$(du -sk --exclude=DEBIAN "$root" | cut -f1)|" \
    "$here/debian/control" > "$root/DEBIAN/control"

mkdir -p "$out"
deb=$out/modelfs_${version}_${arch}.deb
dpkg-deb --root-owner-group --build "$root" "$deb" >/dev/null
echo "$deb"
