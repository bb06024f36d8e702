# Shared by the launch/ scripts: print every command of the plan; run it unless --dry-run.
# shellcheck shell=bash
DRY_RUN=${DRY_RUN:-0}

quote() {  # a word as a reader (and bash) would type it
  if [[ "$1" =~ ^[A-Za-z0-9_./:=,@%+~-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

plan() {  # plan CMD ARGS...: print the command, then run it unless dry-run.
  local line='' word
  for word in "$@"; do line+="$(quote "$word") "; done
  echo "+ ${line% }"
  if [[ "$DRY_RUN" != 1 ]]; then
    "$@"
  fi
}

die() {
  echo "$(basename "$0"): error: $*" >&2
  exit 2
}
