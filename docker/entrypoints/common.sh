# shellcheck shell=bash
# Sourced by the entrypoints. Bad settings end the container at once with one line naming the variable and the fix
# (exit status 2), instead of a service that starts open or half-configured.

die() {
  echo "$(basename "$0"): $*" >&2
  exit 2
}

# require_secret NAME [MIN_LENGTH]: NAME must be set, not the placeholder from .env.example, and long enough.
require_secret() {
  local name=$1 min=${2:-16}
  local value=${!name:-}
  if [ -z "$value" ]; then
    die "$name is not set: put it in docker/.env (see docker/.env.example), e.g. \`openssl rand -hex 32\`"
  fi
  case $value in
    change-me* | CHANGE-ME* | changeme*)
      die "$name still holds the placeholder from .env.example: set a real secret, e.g. \`openssl rand -hex 32\`" ;;
  esac
  if [ "${#value}" -lt "$min" ]; then
    die "$name is too short (${#value} characters, at least $min needed): use e.g. \`openssl rand -hex 32\`"
  fi
}
