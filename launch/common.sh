# Shell helpers shared by the launch scripts (gpu.sh, tpu_vm.sh): sourced, not run.
# PROG is the sourcing script's name, for its messages.

die() {
  echo "$PROG: error: $*" >&2
  echo "run '$PROG --help' for usage" >&2
  exit 2
}

# One word as a shell reads it back: bare when safe, else single-quoted.
quote() {
  local word=$1
  if [[ $word =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$word"
  else
    printf "'%s'" "${word//\'/\'\\\'\'}"
  fi
}

quote_words() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(quote "$word")"
  done
  printf '%s' "$out"
}
