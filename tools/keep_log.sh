# Sourced by the launch scripts (examples/tiny/train.sh, examples/recipes/run.sh).
# keep_log OUT_DIR: from here on, the script's output (stdout and stderr, its own and that of the
# training it execs) also goes to OUT_DIR/logs/train-DATE-HOST.log. The path is exported as
# MHC_LOG_FILE; pretrain_mhc.py names it in its last line.
keep_log() {
  local dir="$1/logs"
  mkdir -p "$dir"
  MHC_LOG_FILE="$dir/train-$(date +%Y%m%d-%H%M%S)-$(hostname -s 2>/dev/null || echo host).log"
  export MHC_LOG_FILE
  exec > >(tee -a "$MHC_LOG_FILE") 2>&1
  KEEP_LOG_TEE=$!
  # A script that exits (an error before it execs the training) first lets tee write the rest:
  # bash does not wait for a process substitution, and a caller that reads the output as soon
  # as the script ended would miss its last lines (seen with the sweep's failed-run report).
  trap 'exec >&- 2>&-; wait "$KEEP_LOG_TEE" 2>/dev/null' EXIT
}
