#!/usr/bin/env bash
# Nightly batchscan run for cron (see crontab.example) and for systemd (batchscan.service
# runs this same script; see jobs/deploy/systemd/).
#
#   batchscan-nightly.sh CONFIG.toml [LOG_DIR]
#
# * runs `batchscan scan --config CONFIG.toml --no-progress` at low CPU and I/O priority
#   (nice 10, ionice best-effort 7), so the PACS and viewers on the same machine come first;
# * writes everything the run prints to LOG_DIR/batchscan-YYYYmmddTHHMMSSZ.log: one file per
#   run, named by UTC start time, so logrotate is not needed and a run never appends to
#   another run's log; logs older than BATCHSCAN_KEEP_LOG_DAYS (default 90) are deleted;
# * prints nothing when the run succeeds (cron mails whatever a job prints) and one line
#   plus the log's last lines when it does not; the scan's `WARNING: performance` lines
#   (monitoring against reports, reports_file in CONFIG.toml) and `WARNING: drift` line (the
#   films themselves against a reference) are printed even on success;
# * when the scan succeeded and CONFIG.toml names a PACS (send_to or send_stow, with
#   sr_out), sends the SRs the PACS has not acknowledged yet: `batchscan send --config
#   CONFIG.toml`, into the same log. A PACS that is down does not fail the scan: its SRs
#   wait in the outbox for the next night, and the wrapper prints one line saying how many;
# * exits with batchscan's own status: 0 done, 1 error (the scan's, or the send's when the
#   scan succeeded), 2 bad arguments or config, 3 the previous run is still going
#   (REPORT_DIR locked).
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
send_status=0
if [ $status -eq 0 ] && grep -Eq '^[[:space:]]*(send_to|send_stow)[[:space:]]*=' "$config"; then
    "$batchscan" send --config "$config" >>"$log" 2>&1
    send_status=$?
fi

find "$log_dir" -maxdepth 1 -name 'batchscan-*.log' -mtime +"${BATCHSCAN_KEEP_LOG_DAYS:-90}" \
    -delete 2>/dev/null

# the model against the radiologists' reports (--reports-file) and the films against their
# reference (the drift monitor): cron mails these lines even when the run succeeded, since a
# model getting worse, or its input changing, is news, not an error
grep -E '^WARNING: (performance|drift)' "$log" 2>/dev/null

case $status in
    0)
        if [ $send_status -ne 0 ]; then
            echo "batchscan-nightly: scan done, but sending SRs to the PACS failed (status $send_status); see $log"
            tail -n 1 "$log"
            status=$send_status
        fi
        ;;
    3) echo "batchscan-nightly: previous run still going, skipped (status 3); see $log" ;;
    *)
        echo "batchscan-nightly: batchscan exited with status $status; see $log"
        tail -n 3 "$log"
        ;;
esac
exit $status
