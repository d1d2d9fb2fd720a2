#!/usr/bin/env bash
# Resolve the jars of a local Apache Kafka broker (see pom.xml) into a cache folder outside the
# repository, and print that folder on stdout (everything else goes to stderr).
#
#   deploy/kafka/fetch-jars.sh            -> ${SENSOR_ANOMALY_CACHE:-$HOME/.cache/sensor-anomaly}/kafka-<version>/libs
#   deploy/kafka/fetch-jars.sh --force    re-resolve even if the folder is complete
#
# Idempotent: a marker file (.complete, holding the sha256 of pom.xml) says the folder is complete
# for this exact pom; a second run only checks it. The download goes to a temporary sibling folder
# that is renamed into place, so an interrupted run never leaves a half-filled libs folder behind.
# Needs Maven (mvn) and network access to Maven Central (or a mirror configured in ~/.m2/settings.xml).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
pom="$here/pom.xml"
force=0
case "${1:-}" in
  --force) force=1 ;;
  "") ;;
  -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "fetch-jars.sh: unknown argument '$1' (expected --force or nothing)" >&2; exit 2 ;;
esac

version="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$pom" | head -n 1)"
if [ -z "$version" ]; then
  echo "fetch-jars.sh: no <kafka.version> property in $pom" >&2
  exit 1
fi
cache="${SENSOR_ANOMALY_CACHE:-$HOME/.cache/sensor-anomaly}"
dest="$cache/kafka-$version"
libs="$dest/libs"
marker="$libs/.complete"
pom_sum="$(sha256sum "$pom" | cut -d' ' -f1)"

if [ "$force" = 0 ] && [ -f "$marker" ] && [ "$(cat "$marker")" = "$pom_sum" ]; then
  echo "$libs"
  exit 0
fi

if ! command -v mvn >/dev/null 2>&1; then
  echo "fetch-jars.sh: Maven (mvn) is not on PATH; install it (e.g. apt-get install maven) and rerun" >&2
  exit 1
fi

mkdir -p "$dest"
tmp="$(mktemp -d "$dest/libs.tmp.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
echo "fetch-jars.sh: resolving Kafka $version jars into $libs ..." >&2
mvn -q -B -Dstyle.color=never -f "$pom" dependency:copy-dependencies \
  -DincludeScope=runtime -DoutputDirectory="$tmp" >&2
if ! ls "$tmp"/kafka_2.13-"$version".jar >/dev/null 2>&1; then
  echo "fetch-jars.sh: Maven finished but kafka_2.13-$version.jar is missing from $tmp" >&2
  exit 1
fi
echo "$pom_sum" > "$tmp/.complete"
rm -rf "$libs"
# -T: never move into an existing folder. If a concurrent run got there first, its result is as good.
if ! mv -T "$tmp" "$libs" 2>/dev/null; then
  if [ ! -f "$marker" ] || [ "$(cat "$marker")" != "$pom_sum" ]; then
    echo "fetch-jars.sh: could not move $tmp to $libs" >&2
    exit 1
  fi
fi
echo "$libs"
