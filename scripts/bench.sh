#!/usr/bin/env bash
# Every benchmark in bench/ (*.sh with bash, *.mjs with node), after a build (TypeScript and the native addon).
# Usage: npm run bench [-- NAME...]   (NAME: a benchmark's file name, with or without its extension;
# default: all of them)
set -euo pipefail
cd "$(dirname "$0")/.."
npm run build --silent
npm run build:native --silent
status=0
ran=0
for b in bench/*.sh bench/*.mjs; do
  [ -e "$b" ] || continue
  file=$(basename "$b")
  name=${file%.*}
  if [ $# -gt 0 ] && [[ " $* " != *" $name "* && " $* " != *" $file "* ]]; then continue; fi
  ran=$((ran + 1))
  echo "=== $file"
  case $b in
    *.sh) bash "$b" || status=1 ;;
    *.mjs) node "$b" || status=1 ;;
  esac
  echo
done
if [ "$ran" = 0 ]; then echo "no benchmark matched: $*" >&2; exit 1; fi
exit $status
