#!/usr/bin/env bash
# Nightly batchscan run for cron (see crontab.example; systemd users: batchscan.timer).
#
#   batchscan-nightly.sh CONFIG.toml [LOG_DIR]
#
# * runs `batchscan scan --config CONFIG.toml --no-progress` at low CPU and I/O priority
#   (nice 10, ionice best-effort 7), so the PACS and viewers on the same machine come first;
# * writes everything the run prints to LOG_DIR/batchscan-YYYYmmddTHHMMSSZ.log: one file per
#   run, named by UTC start time, so logrotate is not needed and a run never appends to
#   another run's log; logs older than BATCHSCAN_KEEP_LOG_DAYS (default 90) are deleted;
# * prints nothing when the run succeeds (cron mails whatever a job prints) and one line
#   plus the log's last lines when it does not;
# * exits with batchscan's own status: 0 done, 1 error, 2 bad arguments or config,
#   3 the previous run is still going (REPORT_DIR locked).
#
# BATCHSCAN names the command when it is not on cron's PATH, e.g. /opt/batchscan/venv/bin/batchscan.
set -u

config=${1:?usage: batchscan-nightly.sh CONFIG.toml [LOG_DIR]}
log_dir=${2:-${BATCHSCAN_LOG_DIR:-/var/log/batchscan}}
batchscan=${BATCHSCAN:-batchscan}

if ! mkdir -p "$log_dir"; then
    echo "batchscan-nightly: cannot create log folder $log_dir"
    exit 2
fi
log="$log_dir/batchscan-$(date -u +%Y%m%dT%H%M%SZ).log"

command=(nice -n 10)
if command -v ionice >/dev/null 2>&1; then
    command+=(ionice -c 2 -n 7)
fi
command+=("$batchscan" scan --config "$config" --no-progress)

"${command[@]}" >>"$log" 2>&1
status=$?

find "$log_dir" -maxdepth 1 -name 'batchscan-*.log' -mtime +"${BATCHSCAN_KEEP_LOG_DAYS:-90}" \
    -delete 2>/dev/null

case $status in
    0) ;;
    3) echo "batchscan-nightly: previous run still going, skipped (status 3); see $log" ;;
    *)
        echo "batchscan-nightly: batchscan exited with status $status; see $log"
        tail -n 3 "$log"
        ;;
esac
exit $status
